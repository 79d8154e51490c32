"""The model contract (MMRec's, with a few additions that keep the trainer model-agnostic).

```python
class MyModel(GeneralRecommender):
    def __init__(self, config, dataset): ...
    def calculate_loss(self, interaction) -> Tensor | dict[str, Tensor]
    def full_sort_predict(self, interaction) -> Tensor        # [batch users, n_items]
    def pre_epoch_processing(self) -> None                    # optional
    def post_epoch_processing(self) -> str | None             # optional, returned text is logged
    def epoch_stats(self) -> dict[str, float]                 # optional, logged per epoch
    def extra_results(self) -> dict                           # optional, stored in result.json
    def drain_trace(self) -> list[dict]                       # optional, per-step rows -> trace.jsonl
```
``interaction`` is a dict with LongTensors ``users``, ``pos_items``, ``neg_items`` (training) or
``users`` (evaluation), already on the model's device.  A dict returned by ``calculate_loss`` holds
named loss parts; the trainer optimises their sum and logs each part per epoch.

Evaluation caching: the trainer wraps every evaluation pass in ``start_evaluation(split)`` /
``end_evaluation()`` (``self.eval_split`` says which split inside the pass); inside a pass ``self.cached(name, fn)`` computes ``fn()`` once and returns the
same tensors for every user block, so a deterministic full forward runs once per pass.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from mmrec import graph
from mmrec.config import ConfigError, check_declared, grid_points


class AbstractRecommender(nn.Module):
    #: set False in a model whose forward is stochastic at evaluation (then nothing is cached)
    deterministic_eval: bool = True
    #: allowed values of the model's own keys, declared once: key -> ("in", choices) | ("subset", choices)
    #: | (">=", n) | (">", n) | ("between", (lo, hi)).  Checked with the resolved configuration before any
    #: data is loaded (and again when the model is built), so a bad value is one line naming its source.
    config_schema: dict[str, tuple[str, Any]] = {}
    #: optimiser hooks the trainer reads: parameter-name prefixes without weight decay (e.g. ID tables),
    #: learning-rate factors per prefix ({prefix: factor}; parameter groups), and whether the optimiser is
    #: rebuilt before every epoch after the first (a reference quirk some baselines keep)
    no_weight_decay: tuple[str, ...] = ()
    lr_scale: dict[str, float] = {}
    reset_optimizer_each_epoch: bool = False
    #: parameter-name prefixes renamed since checkpoints were written ({old: new}); loading maps them
    renamed_parameters: dict[str, str] = {}
    #: True on a shared skeleton that is not a model itself (the registry then does not list it)
    abstract_model: bool = False

    @classmethod
    def check_config(cls, config) -> None:
        """Rules across keys (e.g. MAGNET's K <= E); raise ValueError saying what to change.  Called for
        every grid point before any data is loaded."""
        return None

    @classmethod
    def validate_config(cls, config) -> None:
        """``config_schema`` and ``check_config`` on one configuration (every point of a grid)."""
        check_declared(config, cls.config_schema, cls.__name__)
        points = grid_points(config) if hasattr(config, "sources") else [({}, config)]
        for point, cfg in points:
            try:
                cls.check_config(cfg)
            except ConfigError:
                raise
            except ValueError as err:
                at = f" (grid point {point})" if point else ""
                raise ConfigError(f"{cls.__name__}: {err}{at}") from None

    def __init__(self, config, dataset):
        super().__init__()
        type(self).validate_config(config)
        self.config = config
        self.dataset = dataset
        self.n_users: int = dataset.n_users
        self.n_items: int = dataset.n_items
        self.device = torch.device(config.get("device", "cpu"))
        self._eval_cache: dict[str, Any] | None = None
        self.eval_split: str | None = None  # 'valid' or 'test' inside an evaluation pass, else None

    # -- the contract -------------------------------------------------------------------------
    def calculate_loss(self, interaction: dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
        raise NotImplementedError

    def full_sort_predict(self, interaction: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores [batch users, n_items] as a fresh tensor (the evaluator masks it in place)."""
        raise NotImplementedError

    def pre_epoch_processing(self) -> None:
        return None

    def post_epoch_processing(self) -> str | None:
        return None

    def epoch_stats(self) -> dict[str, float]:
        return {}

    def extra_results(self) -> dict:
        return {}

    def drain_trace(self) -> list[dict]:
        """Per-step rows recorded since the last call (the trainer appends them to trace.jsonl each epoch)."""
        return []

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for old, new in self.renamed_parameters.items():  # checkpoints from before a rename
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- evaluation pass caching --------------------------------------------------------------
    def start_evaluation(self, split: str | None = None) -> None:
        """An evaluation pass begins (on ``split``, readable as ``self.eval_split``)."""
        self.eval_split = split
        self._eval_cache = {} if self.deterministic_eval else None

    def end_evaluation(self) -> None:
        self._eval_cache = None
        self.eval_split = None

    def cached(self, name: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` once per evaluation pass (outside a pass, or in training, every call)."""
        if self._eval_cache is None or self.training:
            return fn()
        if name not in self._eval_cache:
            self._eval_cache[name] = fn()
        return self._eval_cache[name]


class GeneralRecommender(AbstractRecommender):
    """A recommender over users x items with optional item content features.

    Provides ``v_feat`` / ``t_feat`` (float32 tensors on the device, or None), ``train_matrix`` (scipy
    CSR, training split only) and helpers for the shared graph primitives.  A model that reads no item
    features sets ``uses_features = False``: the dataset then neither requires nor loads feature files."""

    uses_features = True
    #: one name per thing across models (ID tables ``user_embedding`` / ``item_embedding``, feature
    #: projections ``image_proj`` / ``text_proj``); checkpoints written under the earlier names still load
    renamed_parameters = {"item_id_embedding.": "item_embedding.", "image_trs.": "image_proj.",
                          "text_trs.": "text_proj.", "v_proj.": "image_proj.", "t_proj.": "text_proj.",
                          "proj_visual.": "image_proj.", "proj_text.": "text_proj."}
    #: True in a model that needs both image and text features: a null feature-file key is a configuration
    #: error before any data is loaded, and ``__init__`` checks that the loaded dataset has both
    needs_both_modalities = False

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.train_matrix = dataset.train_matrix
        feats = getattr(dataset, "features", {})
        self.v_feat = torch.from_numpy(np.asarray(feats["v"])).to(self.device) if "v" in feats else None
        self.t_feat = torch.from_numpy(np.asarray(feats["t"])).to(self.device) if "t" in feats else None
        self.embedding_size = int(config.get("embedding_size", 64))
        if self.needs_both_modalities:
            self.require_both_modalities()

    def require_both_modalities(self) -> None:
        """For models that use image and text features: fail before training when one is missing."""
        if self.v_feat is None or self.t_feat is None:
            missing = " and ".join(n for n, f in (("image (vision_feature_file)", self.v_feat),
                                                  ("text (text_feature_file)", self.t_feat)) if f is None)
            raise ValueError(f"{type(self).__name__} needs both image and text features, but the dataset has no "
                             f"{missing} features: add the .npy file to the dataset folder or set the key in "
                             f"configs/dataset/<dataset>.yaml")

    def norm_adj(self, flavour: graph.AdjFlavour = "sym", item_item=None) -> torch.Tensor:
        """The normalised (U+I) x (U+I) training adjacency as a torch sparse tensor on the device."""
        return graph.to_torch_sparse(graph.norm_adjacency(self.train_matrix, flavour, item_item), self.device)

    def item_knn_lists(self, modality: str, k: int, include_self: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Cosine top-k lists (indices, values) of one modality ('v' or 't'), on the features the run's
        ``similarity_whitening`` / ``similarity_smoothing`` select (raw by default); cached."""
        return graph.cached_knn(self.dataset, modality, k, include_self, device=self.device,
                                **graph.similarity_settings(self.config))

    def item_knn_matrix(self, modality: str, k: int, flavour: graph.KnnFlavour, include_self: bool = True,
                        degree_eps: float = 0.0) -> sp.csr_matrix:
        """A normalised item-item kNN graph of one modality as a scipy matrix (``item_knn_lists``, then the
        named normalisation; ``graph.knn_graph``)."""
        return graph.knn_graph(self.dataset, modality, k, flavour, include_self, degree_eps, self.device,
                               **graph.similarity_settings(self.config))

    def item_knn(self, modality: str, k: int, flavour: graph.KnnFlavour, include_self: bool = True,
                 degree_eps: float = 0.0) -> torch.Tensor:
        """A normalised item-item kNN graph of one modality ('v' or 't') as a torch sparse tensor."""
        return graph.to_torch_sparse(self.item_knn_matrix(modality, k, flavour, include_self, degree_eps), self.device)

    def train_edges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(users, items) LongTensors of the training interactions, on the device."""
        coo = self.train_matrix.tocoo()
        return (torch.from_numpy(coo.row.astype(np.int64)).to(self.device),
                torch.from_numpy(coo.col.astype(np.int64)).to(self.device))
