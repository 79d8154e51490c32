"""GUME: Graphs and User Modalities Enhancement for Long-Tail Multimodal Recommendation
(Lin et al., CIKM 2024).  Reference: ``NanGongNingYi/GUME`` ``src/models/gume.py``.

Notation: ``Y`` the train interactions (U x I), ``E_u``/``E_i`` ID tables, ``x_m`` raw item features of
modality m in {v, t} (trainable, initialised to the loaded features), ``S_m`` the KNN-SIM item graph
(k = ``knn_k``, cosine weights / sqrt(r_i r_j)).

Graph enhancement.  For every item i, the items that are in *both* its image and its text top-k
neighbour lists (itself excluded) give directed edges i -> j of weight 1 (``S_int``).  They fill the
item-item block of the bipartite adjacency before normalisation:

    A_aug = [[0, Y], [Y^T, S_int]],     A_hat = D^-1/2 A_aug D^-1/2   (D: row sums)
    R = the user-item block of A_hat

Encoders and views (Sec. 3.2-3.3):

    e_m   = E_i * sigmoid(W_m (P_m x_m) + b_m)                       # modality-ID item embedding
    C     = LightGCN(A_hat, [E_u; E_i], n_ui_layers)                 # extended ID view (mean readout)
    i_m   = S_m^{n_layers} e_m,  u_m = R i_m,  X_m = [u_m; i_m]      # explicit modality view
    X'_m  = LightGCN(A_hat, [F_m; i_m], n_ui_layers)                 # extended user modality view
    X'_vt = (X'_v + X'_t) / 2

Attribute separation (Sec. 3.4): a_m = softmax_m(q(X_m)),  coarse = sum_m a_m X_m,
``fine_m = sigmoid(W'_m C + b'_m) * (X_m - coarse)``,  ``integ = (fine_v + fine_t + coarse) / 3``,
final ``Z = C + integ``; score y_ui = <Z_u, Z_i>.

Loss (all on the batch; ``B`` = the configured train_batch_size):

    BPR-mean(Z) + reg_weight_1 * 0.5 (|Z_u|^2 + |Z_p|^2 + |Z_n|^2) / B
    + vt_loss * (|var X_v - var X_t| + |mean X_v - mean X_t|)
    + bm_loss * [NCE(integ_u, C_u; bm_temp) + NCE(integ_p, C_p; bm_temp)]
    + um_loss * [NCE(X'_vt,u, integ_u; um_temp) + NCE(p(integ)_u, p'(integ)_u; um_temp)
                 + NCE(p(X'_vt)_u, p'(X'_vt)_u; um_temp)]
    + reg_weight_2 * 0.5 |X'_vt,p|^2 / B

with ``p``, ``p'`` two independent SimGCL perturbations (eps 0.1) of the whole user matrix.

Reference quirks (BASELINES.md section 7; docs/baselines.md):
- The reference builds the intersection by walking the flattened kNN index lists in fixed groups of
  **10** entries whatever ``knn_k`` is (a group's item id is the row of its last entry, a later group
  with the same id overwrites an earlier one).  ``intersection_group: 10`` reproduces that (identical
  to per-row intersection when ``knn_k`` = 10); ``intersection_group: 0`` intersects per item row.
- The reference caches the intersection in ``inter.json`` without a key; ours is keyed by the feature
  hashes, the similarity settings, ``knn_k`` and the grouping, so a stale file is never reused.
The intersection is computed vectorised (a [rows, 10, 10] membership test), not by a Python loop.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from mmrec import graph
from mmrec.layers import BehaviourPurifier, ScalarAttentionFuser, SigmoidGate, item_graph_view, xavier_tables
from mmrec.losses import dot_bpr, half_sq, info_nce, side_content_nce, mean_var_alignment, simgcl_perturb
from mmrec.recommender import GeneralRecommender


def knn_intersection_edges(image_idx: np.ndarray, text_idx: np.ndarray, group: int = 10
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Directed item -> item edges (rows, cols) of GUME's kNN-intersection graph.

    ``image_idx``/``text_idx``: [I, k] top-k neighbour lists (each row in top-k order, self included).
    ``group`` = 0: for every item i, the items in both of its lists, i itself removed.
    ``group`` = g > 0 (the reference's walk): the flattened lists are cut into consecutive groups of g
    entries (a trailing partial group is ignored); a group's id is the row of its last entry and a later
    group with the same id replaces an earlier one; edges go from the id to every item that occurs in
    both the image and the text slice of its group, the id itself removed.
    """
    n, k = image_idx.shape
    if group and group != k:
        flat_rows = np.repeat(np.arange(n), k)
        n_groups = (n * k) // group
        span = n_groups * group
        img = image_idx.reshape(-1)[:span].reshape(n_groups, group)
        txt = text_idx.reshape(-1)[:span].reshape(n_groups, group)
        ids = flat_rows[group - 1:span:group]
        last = np.ones(n_groups, dtype=bool)  # ids are non-decreasing: keep each id's last group
        last[:-1] = ids[:-1] != ids[1:]
        img, txt, ids = img[last], txt[last], ids[last]
    else:
        img, txt, ids = image_idx, text_idx, np.arange(n)
    member = (img[:, :, None] == txt[:, None, :]).any(axis=2)  # [G, g]: image entry also in text slice
    member &= img != ids[:, None]
    rows = np.broadcast_to(ids[:, None], img.shape)[member]
    cols = img[member]
    # set semantics: a repeated (id, item) pair inside one group counts once
    key = np.unique(rows.astype(np.int64) * n + cols.astype(np.int64))
    return key // n, key % n


class GUME(GeneralRecommender):
    """Graph and user-modality enhancement for long-tail items: modality-aware item graphs, augmented user
    modalities and alignment losses. Paper and equations: this module's docstring. Keys it reads
    (configs/model/GUME.yaml): bm_loss, bm_temp, intersection_group, knn_k, n_layers, n_ui_layers,
    reg_weight_1, reg_weight_2, train_batch_size, um_loss, um_temp, vt_loss."""
    needs_both_modalities = True  # image and text features, checked before any data is loaded

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        d = self.embedding_size
        self.n_layers = int(config["n_layers"])
        self.n_ui_layers = int(config["n_ui_layers"])
        self.knn_k = int(config["knn_k"])
        self.intersection_group = int(config["intersection_group"])
        self.reg_weight_1 = float(config["reg_weight_1"])
        self.reg_weight_2 = float(config["reg_weight_2"])
        self.vt_loss = float(config["vt_loss"])
        self.bm_loss = float(config["bm_loss"])
        self.bm_temp = float(config["bm_temp"])
        self.um_loss = float(config["um_loss"])
        self.um_temp = float(config["um_temp"])
        self.batch_size = int(config["train_batch_size"])

        # ID tables and the users' extended modality tables F_v, F_t
        (self.user_embedding, self.item_embedding, self.extended_image_user,
         self.extended_text_user) = xavier_tables(self.n_users, self.n_items, self.n_users, self.n_users, dim=d)
        # raw features are trainable in the reference (nn.Embedding.from_pretrained(freeze=False))
        self.image_features = nn.Parameter(self.v_feat.clone())
        self.text_features = nn.Parameter(self.t_feat.clone())

        # frozen graphs: KNN-SIM item graphs, the intersection edges and the augmented adjacency
        image_idx, image_val = self.item_knn_lists("v", self.knn_k)
        text_idx, text_val = self.item_knn_lists("t", self.knn_k)
        self.image_graph = graph.to_torch_sparse(
            graph.knn_matrix(image_idx, image_val, self.n_items, "sim"), self.device)
        self.text_graph = graph.to_torch_sparse(
            graph.knn_matrix(text_idx, text_val, self.n_items, "sim"), self.device)
        rows, cols = self.intersection_edges(image_idx, text_idx)
        self.n_intersection_edges = int(rows.size)
        adj_aug = self.augmented_adjacency(self.train_matrix, rows, cols, self.n_items)
        self.norm_adj_aug = graph.to_torch_sparse(adj_aug, self.device)
        self.R = graph.to_torch_sparse(graph.user_item_block(adj_aug, self.n_users), self.device)

        # encoders: P_m (raw -> d) then the purifier gate sigmoid(W_m . + b_m) times E_i
        self.image_proj = nn.Linear(self.v_feat.shape[1], d)
        self.text_proj = nn.Linear(self.t_feat.shape[1], d)
        self.image_purifier = BehaviourPurifier(d)
        self.text_purifier = BehaviourPurifier(d)
        self.separate_coarse = ScalarAttentionFuser(d)
        self.image_behaviour = SigmoidGate(d)
        self.text_behaviour = SigmoidGate(d)

    # -- graphs ---------------------------------------------------------------------------------
    def intersection_edges(self, image_idx: np.ndarray, text_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """S_int edge list, cached under the feature hashes, the similarity features the lists were taken
        on (``similarity_whitening`` / ``similarity_smoothing``), k and the grouping (features only: the
        intersection does not depend on interactions)."""
        key = {"v": self.dataset.feature_hash("v"), "t": self.dataset.feature_hash("t"),
               "similarity": graph.similarity_settings(self.config),
               "k": self.knn_k, "group": self.intersection_group, "n_items": self.n_items}
        arrays = self.dataset.cache.get_or_build(
            "gume_knn_intersection", key,
            lambda: dict(zip(("rows", "cols"), knn_intersection_edges(image_idx, text_idx,
                                                                      self.intersection_group))))
        return arrays["rows"], arrays["cols"]

    @staticmethod
    def augmented_adjacency(train: sp.spmatrix, rows: np.ndarray, cols: np.ndarray, n_items: int) -> sp.csr_matrix:
        """D^-1/2 [[0, Y], [Y^T, S_int]] D^-1/2 with D the row sums (degrees include S_int's out-edges)."""
        s_int = sp.csr_matrix((np.ones(rows.size, dtype=np.float32), (rows, cols)), shape=(n_items, n_items))
        return graph.norm_adjacency(train, "sym", item_item=s_int)

    # -- forward --------------------------------------------------------------------------------
    def forward(self) -> dict[str, torch.Tensor]:
        item_ids = self.item_embedding.weight
        image_items = self.image_purifier(item_ids, self.image_proj(self.image_features))  # e_v
        text_items = self.text_purifier(item_ids, self.text_proj(self.text_features))      # e_t

        ego = torch.cat([self.user_embedding.weight, item_ids], dim=0)
        extended_id = graph.propagate(self.norm_adj_aug, ego, self.n_ui_layers)            # C

        explicit_image = item_graph_view(self.image_graph, self.R, image_items, self.n_layers)  # X_v
        explicit_text = item_graph_view(self.text_graph, self.R, text_items, self.n_layers)     # X_t
        image_item_part = explicit_image[self.n_users:]
        text_item_part = explicit_text[self.n_users:]
        extended_image = graph.propagate(
            self.norm_adj_aug, torch.cat([self.extended_image_user.weight, image_item_part]), self.n_ui_layers)
        extended_text = graph.propagate(
            self.norm_adj_aug, torch.cat([self.extended_text_user.weight, text_item_part]), self.n_ui_layers)
        extended_modal = (extended_image + extended_text) / 2                               # X'_vt

        coarse, _ = self.separate_coarse([explicit_image, explicit_text])
        fine_image = self.image_behaviour(extended_id) * (explicit_image - coarse)
        fine_text = self.text_behaviour(extended_id) * (explicit_text - coarse)
        integration = (fine_image + fine_text + coarse) / 3
        return {"final": extended_id + integration, "integration": integration, "extended_id": extended_id,
                "extended_modal": extended_modal, "explicit_image": explicit_image, "explicit_text": explicit_text}

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[: self.n_users], x[self.n_users:]

    # -- training ---------------------------------------------------------------------------------
    def calculate_loss(self, interaction: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        users, pos_items, neg_items = interaction["users"], interaction["pos_items"], interaction["neg_items"]
        out = self.forward()
        z_users, z_items = self._split(out["final"])
        u, p, n = z_users[users], z_items[pos_items], z_items[neg_items]
        bpr = dot_bpr(u, p, n, "mean")
        reg = self.reg_weight_1 * half_sq(u, p, n, batch_size=self.batch_size)

        integ_users = out["integration"][: self.n_users]
        modal_users, modal_items = self._split(out["extended_modal"])
        vt = self.vt_loss * mean_var_alignment(out["explicit_image"], out["explicit_text"])
        bm = self.bm_loss * side_content_nce(out["integration"], out["extended_id"], self.n_users, users, pos_items,
                                             self.bm_temp)
        um = self.um_loss * (info_nce(modal_users[users], integ_users[users], self.um_temp)
                             + self._noise_nce(integ_users, users) + self._noise_nce(modal_users, users))
        reg2 = self.reg_weight_2 * half_sq(modal_items[pos_items], batch_size=self.batch_size)
        return {"bpr": bpr, "reg": reg + reg2, "vt": vt, "bm": bm, "um": um}

    def _noise_nce(self, embeddings: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        """InfoNCE between two independent SimGCL perturbations of the whole user matrix, on the batch."""
        view1 = simgcl_perturb(embeddings, 0.1)
        view2 = simgcl_perturb(embeddings, 0.1)
        return info_nce(view1[users], view2[users], self.um_temp)

    def full_sort_predict(self, interaction: dict[str, torch.Tensor]) -> torch.Tensor:
        final = self.cached("final", lambda: self.forward()["final"])
        z_users, z_items = self._split(final)
        return z_users[interaction["users"]] @ z_items.T

    def extra_results(self) -> dict:
        return {"intersection_edges": self.n_intersection_edges}
