"""SOIL: Second-Order Interest and Interest-aware Item Graphs for Multimodal Recommendation
(Su et al., ACM MM 2024).  Reference: ``TL-UESTC/SOIL`` ``models/soil.py``, ``utils/utils.py``.

Notation: ``Y`` the train interactions (U x I), ``I_u`` user u's train items, ``sim_m`` the cosine
similarity of the *raw* (frozen) features of modality m in {v, t}.

Interest-aware item graphs (Sec. 3.2), frozen, built once from the training split:

    cols_u   = top_{knn_i}(sum_{i in I_u} sim_v[i, :])  U  top_{knn_i}(sum_{i in I_u} sim_t[i, :])
    Int_m    = sum_u sum_{i in I_u, c in cols_u} sim_m(i, c) e_i e_c^T
    G_m      = norm(Int_m) + norm(kNN_m)

``norm`` is KNN-SIM-SOIL: w_ij / sqrt(r_i r_j) with r the row sums, clamped to >= 1e-7; kNN_m the
cosine top-``knn_k`` graph (self included).

Second-order user-item graph (Sec. 3.3): for each user, ``P_u = sim_v[I_u] * sim_t[I_u]``
(element-wise, |I_u| x I); the global top ``n_u = knn_a + |I_u|`` entries of P_u give weighted edges
(u, j) (the same j from several rows is summed) -> ``W`` (U x I).  With ``A_2`` the weighted bipartite
matrix [[0, W], [W^T, 0]] normalised by weighted degrees (then clamped >= 1e-7):

    A_aug = D^-1/2 A D^-1/2 + A_2 / 2,        R_aug = R + R_2 / 2

Views and fusion (Sec. 3.4):

    e_m    = E_i * sigmoid(W_m (P_m x_m) + b_m)
    C      = LightGCN(A_aug, [E_u; E_i], n_ui_layers)            (mean readout)
    i_m    = G_m^{n_layers} e_m,  u_m = R_aug i_m,  X_m = [u_m; i_m]
    common = sum_m softmax_m(q(X_m)) X_m,    side = (X_v + X_t - common) / 3,    Z = C + side

Loss: BPR-mean(Z) + cl_loss * [NCE(side_p, C_p) + NCE(side_u, C_u)]
+ cl_loss2 * [NCE(Z_u, C_p) + NCE(Z_u, side_p)], temperature 0.2 (the paper's lambda_ii = cl_loss,
lambda_ui = cl_loss2).  The reference's ``reg_weight`` is read but unused; we do not define it.

Reference quirks (BASELINES.md section 8; docs/baselines.md):
- ``R_2``'s normaliser indexes the *user*-degree vector by item id for the column factor:
  ``R_2[u, j] = w_uj / sqrt(deg_u * deg_user(j))``.  Reproduced with ``r2_degree_quirk: true`` (the
  default; it needs n_items <= n_users, as the reference silently does); ``false`` uses the item's
  weighted degree, i.e. the user-item block of ``A_2``.
- A row of ``Int_m`` whose accumulated similarity is <= 0 gives NaN in the reference; here its inverse
  degree is 0 (its entries then clamp to 1e-7) and a warning reports how many rows that hit.

Scaling (the reference materialises four dense I x I matrices and adds sparse tensors user by user):
user profiles ``Y[b] @ x_m`` scored against all items in user blocks (sum_{i in I_u} sim(i, c) =
<sum_i x_i, x_c> on row-normalised features), unique (i, c) pairs counted once and weighted by their
multiplicity, per-item top-(knn_a + 1) of sim_v * sim_t in item blocks, a per-user top-n_u by one sort
over all candidates.  The second-order graph is exact whenever each of a user's rows contributes its
own maximum (its self-similarity, 1) to the user's top n_u, so no row contributes more than knn_a + 1
entries; that holds except for ties with duplicated features.
"""
from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from mmrec import graph
from mmrec.layers import BehaviourPurifier, ScalarAttentionFuser, item_graph_view, xavier_tables
from mmrec.losses import dot_bpr, info_nce
from mmrec.recommender import GeneralRecommender

log = logging.getLogger(__name__)

SOIL_CLAMP = 1e-7
BLOCK_ELEMENTS = 1 << 24  # scores held at once while building graphs (64 MB of float32)


def _normalised_features(x, device) -> torch.Tensor:
    return graph.l2_normalize_rows(torch.as_tensor(x, dtype=torch.float32, device=device))


def _pair_dots(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, chunk: int) -> torch.Tensor:
    """<x[rows[e]], x[cols[e]]> for every pair e, in chunks."""
    out = torch.empty(rows.numel(), dtype=torch.float32, device=x.device)
    for s in range(0, rows.numel(), chunk):
        out[s:s + chunk] = (x[rows[s:s + chunk]] * x[cols[s:s + chunk]]).sum(dim=1)
    return out


@torch.no_grad()
def interest_graph_entries(train: sp.csr_matrix, image, text, knn_i: int, device="cpu",
                           block_elements: int = BLOCK_ELEMENTS) -> dict[str, np.ndarray]:
    """The accumulated interest matrices Int_v, Int_t as one shared (rows, cols) pattern with per-modality
    values: Int_m[i, c] = sum over users u with i in I_u and c in cols_u of sim_m(i, c)."""
    train = sp.csr_matrix(train)
    n_users, n_items = train.shape
    feats = {"v": _normalised_features(image, device), "t": _normalised_features(text, device)}
    k = min(knn_i, n_items)
    block = max(1, block_elements // n_items)
    keys = []
    for start in range(0, n_users, block):
        sub = train[start:start + block]
        if sub.nnz == 0:
            continue
        sub_t = graph.to_torch_sparse(sub, device)
        tops = [torch.topk(torch.sparse.mm(sub_t, x) @ x.T, k, dim=1).indices for x in feats.values()]
        cols = torch.cat(tops, dim=1).sort(dim=1).values  # cols_u, duplicates adjacent
        fresh = torch.ones_like(cols, dtype=torch.bool)
        fresh[:, 1:] = cols[:, 1:] != cols[:, :-1]  # the union keeps each column once
        coo = sub.tocoo()
        edge_user = torch.from_numpy(coo.row.astype(np.int64)).to(device)
        edge_item = torch.from_numpy(coo.col.astype(np.int64)).to(device)
        cand = cols[edge_user]
        keep = fresh[edge_user]
        keys.append(edge_item[:, None].expand_as(cand)[keep] * n_items + cand[keep])
    if not keys:
        empty = np.zeros(0, dtype=np.int64)
        return {"rows": empty, "cols": empty, "v": np.zeros(0, np.float32), "t": np.zeros(0, np.float32)}
    pairs, counts = torch.unique(torch.cat(keys), return_counts=True)
    rows, cols = pairs // n_items, pairs % n_items
    chunk = max(1, block_elements // max(x.shape[1] for x in feats.values()))
    out = {"rows": rows.cpu().numpy(), "cols": cols.cpu().numpy()}
    for m, x in feats.items():
        out[m] = (_pair_dots(x, rows, cols, chunk) * counts.float()).cpu().numpy()
    return out


def soil_normalize(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n: int,
                   what: str = "graph") -> sp.csr_matrix:
    """KNN-SIM-SOIL on arbitrary non-zeros: v / sqrt(r_i r_j) with r the row sums, clamped >= 1e-7.
    Exact zeros are dropped first (the reference takes ``nonzero()`` of a dense accumulator).  A row with
    a non-positive sum (NaN in the reference) gets inverse degree 0 and is reported."""
    nz = values != 0
    rows, cols, values = rows[nz], cols[nz], values[nz].astype(np.float64)
    bad = int(np.sum(np.bincount(rows, weights=values, minlength=n) < 0))
    if bad:
        log.warning("SOIL %s: %d rows have a non-positive weighted degree (NaN in the reference); "
                    "their inverse degree is set to 0", what, bad)
    return graph.normalize_edges(rows, cols, values, n, "sim_soil")


@torch.no_grad()
def product_topk(image, text, k: int, device="cpu", block_elements: int = BLOCK_ELEMENTS
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per item, the top-k entries of sim_v[i, :] * sim_t[i, :] (self included), in item-row blocks."""
    xv, xt = _normalised_features(image, device), _normalised_features(text, device)
    n = xv.shape[0]
    k = min(k, n)
    block = max(1, block_elements // n)
    idx = np.empty((n, k), dtype=np.int64)
    val = np.empty((n, k), dtype=np.float32)
    for s in range(0, n, block):
        prod = (xv[s:s + block] @ xv.T) * (xt[s:s + block] @ xt.T)
        v, i = torch.topk(prod, k, dim=1)
        idx[s:s + block], val[s:s + block] = i.cpu().numpy(), v.cpu().numpy()
    return idx, val


def second_order_entries(train: sp.csr_matrix, image, text, knn_a: int, device="cpu",
                         block_elements: int = BLOCK_ELEMENTS) -> dict[str, np.ndarray]:
    """W: for each user the top n_u = knn_a + |I_u| entries of sim_v[I_u] * sim_t[I_u], summed per item.
    Returns coalesced (users, items, weights)."""
    train = sp.csr_matrix(train)
    n_users, n_items = train.shape
    top_idx, top_val = product_topk(image, text, knn_a + 1, device, block_elements)
    m = top_idx.shape[1]
    coo = train.tocoo()
    cand_user = np.repeat(coo.row.astype(np.int64), m)
    cand_item = top_idx[coo.col].ravel()
    cand_val = top_val[coo.col].ravel()
    order = np.lexsort((-cand_val, cand_user))  # by user, then decreasing value
    cand_user, cand_item, cand_val = cand_user[order], cand_item[order], cand_val[order]
    first = np.searchsorted(cand_user, np.arange(n_users))
    rank = np.arange(cand_user.size) - first[cand_user]
    n_keep = knn_a + np.diff(train.indptr)  # n_u = knn_a + |I_u|
    keep = rank < n_keep[cand_user]
    w = sp.coo_matrix((cand_val[keep].astype(np.float64), (cand_user[keep], cand_item[keep])),
                      shape=(n_users, n_items)).tocsr()  # duplicates summed
    w.sort_indices()
    wc = w.tocoo()
    return {"users": wc.row.astype(np.int64), "items": wc.col.astype(np.int64),
            "weights": wc.data.astype(np.float32)}


def second_order_graphs(users: np.ndarray, items: np.ndarray, weights: np.ndarray, n_users: int,
                        n_items: int, degree_quirk: bool = True) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(N, R_2), both U x I.  N[u, j] = w_uj / sqrt(deg_u deg_j) (weighted degrees of the symmetric
    bipartite matrix) is the user-item block of A_2; R_2 is N or, with ``degree_quirk``, the reference's
    w_uj / sqrt(deg_u deg_user(j)).  Every entry is clamped to >= 1e-7."""
    w = weights.astype(np.float64)
    deg_user = np.bincount(users, weights=w, minlength=n_users)
    deg_item = np.bincount(items, weights=w, minlength=n_items)
    inv_u, inv_i = graph.inverse_sqrt_degree(deg_user), graph.inverse_sqrt_degree(deg_item)
    n_block = np.maximum(inv_u[users] * w * inv_i[items], SOIL_CLAMP)
    shape = (n_users, n_items)
    adj_block = sp.csr_matrix((n_block.astype(np.float32), (users, items)), shape=shape)
    if not degree_quirk:
        return adj_block, adj_block.copy()
    if items.size and items.max() >= n_users:
        raise ValueError(f"r2_degree_quirk indexes user degrees by item id, which needs n_items <= n_users "
                         f"(here {n_items} > {n_users}); set r2_degree_quirk: false")
    r2 = np.maximum(inv_u[users] * w * inv_u[items], SOIL_CLAMP)
    return adj_block, sp.csr_matrix((r2.astype(np.float32), (users, items)), shape=shape)


class SOIL(GeneralRecommender):
    """Second-order interest graphs and interest-aware item graphs with contrastive terms over a LightGCN
    backbone. Paper and equations: this module's docstring. Keys it reads (configs/model/SOIL.yaml):
    cl_loss, cl_loss2, cl_temperature, knn_a, knn_i, knn_k, n_layers, n_ui_layers, r2_degree_quirk."""
    needs_both_modalities = True  # image and text features, checked before any data is loaded

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        d = self.embedding_size
        self.n_layers = int(config["n_layers"])
        self.n_ui_layers = int(config["n_ui_layers"])
        self.knn_k = int(config["knn_k"])
        self.knn_i = int(config["knn_i"])
        self.knn_a = int(config["knn_a"])
        self.cl_loss = float(config["cl_loss"])
        self.cl_loss2 = float(config["cl_loss2"])
        self.cl_temperature = float(config["cl_temperature"])
        self.r2_degree_quirk = bool(config["r2_degree_quirk"])

        self.user_embedding, self.item_embedding = xavier_tables(self.n_users, self.n_items, dim=d)

        adj_aug, r_aug = self.augmented_ui_graphs()
        self.norm_adj_aug = graph.to_torch_sparse(adj_aug, self.device)
        self.R = graph.to_torch_sparse(r_aug, self.device)
        image_graph, text_graph = self.interest_item_graphs()
        self.image_graph = graph.to_torch_sparse(image_graph, self.device)
        self.text_graph = graph.to_torch_sparse(text_graph, self.device)

        # raw features stay frozen (self.v_feat / self.t_feat); P_m then the purifier gate
        self.image_proj = nn.Linear(self.v_feat.shape[1], d)
        self.text_proj = nn.Linear(self.t_feat.shape[1], d)
        self.image_purifier = BehaviourPurifier(d)
        self.text_purifier = BehaviourPurifier(d)
        self.fuser = ScalarAttentionFuser(d)

    # -- graphs ---------------------------------------------------------------------------------
    def _key(self, **extra) -> dict:
        return {"train": self.dataset.train_fingerprint, "v": self.dataset.feature_hash("v"),
                "t": self.dataset.feature_hash("t"), **extra}

    def interest_item_graphs(self) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """G_m = norm(Int_m) + norm(kNN_m) for m = v, t."""
        entries = self.dataset.cache.get_or_build(
            "soil_interest", self._key(knn_i=self.knn_i),
            lambda: interest_graph_entries(self.train_matrix, self.v_feat, self.t_feat, self.knn_i, self.device))
        graphs = []
        for m in ("v", "t"):
            interest = soil_normalize(entries["rows"], entries["cols"], entries[m], self.n_items, f"Int_{m}")
            graphs.append(interest + self.item_knn_matrix(m, self.knn_k, "sim_soil"))
        return graphs[0], graphs[1]

    def augmented_ui_graphs(self) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """(A_aug, R_aug) = (norm_sym(A) + A_2 / 2, R + R_2 / 2)."""
        entries = self.dataset.cache.get_or_build(
            "soil_second_order", self._key(knn_a=self.knn_a),
            lambda: second_order_entries(self.train_matrix, self.v_feat, self.t_feat, self.knn_a, self.device))
        self.n_second_order_edges = int(entries["users"].size)
        block, r2 = second_order_graphs(entries["users"], entries["items"], entries["weights"],
                                        self.n_users, self.n_items, self.r2_degree_quirk)
        norm_adj = graph.norm_adjacency(self.train_matrix, "sym")
        adj_aug = norm_adj + 0.5 * graph.bipartite_adjacency(block)
        r_aug = graph.user_item_block(norm_adj, self.n_users) + 0.5 * r2
        return sp.csr_matrix(adj_aug, dtype=np.float32), sp.csr_matrix(r_aug, dtype=np.float32)

    # -- forward --------------------------------------------------------------------------------
    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Z, side, C), each [U+I, d]."""
        item_ids = self.item_embedding.weight
        image_items = self.image_purifier(item_ids, self.image_proj(self.v_feat))
        text_items = self.text_purifier(item_ids, self.text_proj(self.t_feat))
        ego = torch.cat([self.user_embedding.weight, item_ids], dim=0)
        content = graph.propagate(self.norm_adj_aug, ego, self.n_ui_layers)              # C
        image_view = item_graph_view(self.image_graph, self.R, image_items, self.n_layers)  # X_v
        text_view = item_graph_view(self.text_graph, self.R, text_items, self.n_layers)    # X_t
        common, _ = self.fuser([image_view, text_view])
        side = (image_view + text_view - common) / 3
        return content + side, side, content

    def calculate_loss(self, interaction: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        users, pos_items, neg_items = interaction["users"], interaction["pos_items"], interaction["neg_items"]
        final, side, content = self.forward()
        nu = self.n_users
        u, p, n = final[users], final[nu + pos_items], final[nu + neg_items]
        bpr = dot_bpr(u, p, n, "mean")
        side_p, content_p = side[nu + pos_items], content[nu + pos_items]
        t = self.cl_temperature
        # the four terms share the indexed rows (one gradient accumulation per row set, as the reference)
        item_item = info_nce(side_p, content_p, t) + info_nce(side[users], content[users], t)
        user_item = info_nce(u, content_p, t) + info_nce(u, side_p, t)
        return {"bpr": bpr, "cl_ii": self.cl_loss * item_item, "cl_ui": self.cl_loss2 * user_item}

    def full_sort_predict(self, interaction: dict[str, torch.Tensor]) -> torch.Tensor:
        final = self.cached("final", lambda: self.forward()[0])
        return final[interaction["users"]] @ final[self.n_users:].T

    def extra_results(self) -> dict:
        return {"second_order_edges": self.n_second_order_edges,
                "interest_nnz": {"v": int(self.image_graph._nnz()), "t": int(self.text_graph._nnz())}}
