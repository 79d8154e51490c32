"""FREEDOM: A Tale of Two Graphs: Freezing and Denoising Graph Structures for Multimodal
Recommendation (Zhou & Shen, ACM MM 2023).

    S     = w_v S_v + (1 - w_v) S_t          frozen KNN-BIN item graphs (k = knn_k), w_v = mm_image_weight
    h     = S^{L_mm} E_i                      item-item branch (no normalisation)             (Eq. 3)
    A_p   = degree-sensitive pruned sym(A)    re-sampled every epoch, used in training only   (Eq. 4-6)
    C     = mean_{l=0..L_ui} A_p^l [E_u; E_i] LightGCN on the pruned graph (full graph at evaluation)
    z_u   = C_u,  z_i = C_i + h,   y_ui = <z_u, z_i>                                          (Eq. 7)

    L = BPR(z_u, z_pos, z_neg) + reg_weight * [BPR(z_u, P_t f_t[pos], P_t f_t[neg])
                                             + BPR(z_u, P_v f_v[pos], P_v f_v[neg])]          (Eq. 8-9)

all BPR terms BPR-mean (no epsilon).  ``reg_weight`` weighs the modality BPR terms; there is no L2 term.

Parity with MMRec ``src/models/freedom.py`` (= enoche/FREEDOM), including its surprises:
- ``dropout`` is the share of training edges *dropped* each epoch (0.8 keeps 20%): keep
  int(|E| * (1 - dropout)) edges sampled without replacement with probability ~ 1/sqrt(d_u d_i)
  (full-graph degrees + 1e-7), re-normalised with the kept edges' own degrees
  (``mmrec.graph.degree_sensitive_prune``, global torch RNG, so the trainer's RNG checkpoint covers it).
- Degrees carry +1e-7 everywhere (``sym_eps`` adjacency, KNN-BIN entries 1/(k + 1e-7)).
- The projections P_v, P_t of the trainable raw-feature tables enter only the auxiliary loss, never
  the score.  The reference projects all items every batch; we project each distinct item of the
  batch once, which gives the same loss and the same (dense, zero outside the batch) gradients.  At reg_weight = 0 the
  auxiliary branch is skipped (the reference computes it and its gradient is exactly zero).
- Evaluation uses the full (unpruned) graph.
"""
from __future__ import annotations

import torch
from torch import nn

from mmrec import graph
from mmrec.layers import xavier_tables
from mmrec.losses import dot_bpr
from mmrec.recommender import GeneralRecommender


class FREEDOM(GeneralRecommender):
    """LightGCN on the user-item graph plus a frozen, fused item-item kNN graph from the features, with
    degree-sensitive edge pruning. Paper and equations: this module's docstring. Keys it reads
    (configs/model/FREEDOM.yaml): dropout, feat_embed_dim, knn_k, mm_image_weight, n_mm_layers, n_ui_layers,
    reg_weight."""
    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        d = self.embedding_size
        self.knn_k = int(config["knn_k"])
        self.n_mm_layers = int(config["n_mm_layers"])
        self.n_ui_layers = int(config["n_ui_layers"])
        self.reg_weight = float(config["reg_weight"])
        self.image_weight = float(config["mm_image_weight"])
        self.drop_ratio = float(config["dropout"])
        feat_dim = int(config["feat_embed_dim"])
        if self.v_feat is None and self.t_feat is None:
            raise ValueError("FREEDOM needs image or text features; the dataset provides neither")

        self.user_embedding, self.item_embedding = xavier_tables(self.n_users, self.n_items, dim=d)

        # user-item graphs (training split only)
        self.full_adj = self.norm_adj("sym_eps")
        self.train_users, self.train_items = self.train_edges()
        self.train_adj: torch.Tensor | None = None  # the pruned graph of the current epoch

        # frozen item-item graph: KNN-BIN per modality, mixed after normalisation
        self.mm_adj = graph.to_torch_sparse(self._item_graph(dataset), self.device)

        if self.v_feat is not None:
            self.image_embedding = nn.Embedding.from_pretrained(self.v_feat, freeze=False)
            self.image_proj = nn.Linear(self.v_feat.shape[1], feat_dim)
        if self.t_feat is not None:
            self.text_embedding = nn.Embedding.from_pretrained(self.t_feat, freeze=False)
            self.text_proj = nn.Linear(self.t_feat.shape[1], feat_dim)

    def _item_graph(self, dataset):
        knn = {m: self.item_knn_matrix(m, self.knn_k, "bin", True, graph.DEGREE_EPS)
               for m, f in (("v", self.v_feat), ("t", self.t_feat)) if f is not None}
        if len(knn) == 1:
            return next(iter(knn.values()))
        return self.image_weight * knn["v"] + (1.0 - self.image_weight) * knn["t"]

    def pre_epoch_processing(self) -> None:
        """Eq. 4-6: re-sample the degree-sensitive pruned training graph."""
        if self.drop_ratio <= 0.0:
            self.train_adj = self.full_adj
            return
        self.train_adj = graph.degree_sensitive_prune(self.train_users, self.train_items, self.n_users,
                                                      self.n_items, self.drop_ratio)

    def forward(self, adj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.item_embedding.weight
        for _ in range(self.n_mm_layers):  # Eq. 3
            h = graph.spmm(self.mm_adj, h)
        ego = torch.cat([self.user_embedding.weight, self.item_embedding.weight], dim=0)
        c = graph.propagate(adj, ego, self.n_ui_layers)
        return c[: self.n_users], c[self.n_users:] + h  # Eq. 7

    def calculate_loss(self, interaction: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        users, pos, neg = interaction["users"], interaction["pos_items"], interaction["neg_items"]
        if self.train_adj is None:  # the trainer calls pre_epoch_processing first; direct calls may not
            self.pre_epoch_processing()
        zu, zi = self.forward(self.train_adj)
        u = zu[users]
        parts = {"bpr": dot_bpr(u, zi[pos], zi[neg], "mean")}
        if self.reg_weight != 0.0:  # Eq. 8-9: modality BPR terms
            # project each distinct batch item once (at most min(2B, I) rows; the reference projects all I)
            items, where = torch.unique(torch.cat([pos, neg]), return_inverse=True)
            where_pos, where_neg = where[: pos.numel()], where[pos.numel():]
            modal = u.new_zeros(())
            for table, proj in (("text_embedding", "text_proj"), ("image_embedding", "image_proj")):
                if hasattr(self, table):
                    feats = getattr(self, proj)(getattr(self, table)(items))
                    modal = modal + dot_bpr(u, feats[where_pos], feats[where_neg], "mean")
            parts["modal_bpr"] = self.reg_weight * modal
        return parts

    def full_sort_predict(self, interaction: dict[str, torch.Tensor]) -> torch.Tensor:
        zu, zi = self.cached("forward", lambda: self.forward(self.full_adj))
        return zu[interaction["users"]] @ zi.T
