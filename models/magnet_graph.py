"""MAGNET's graph side: the triplet-template expert pool (Eqs. 12-15) and the content-induced edges E+
of the augmented view G_UIG (Eqs. 1-3).  Helpers of ``models/magnet.py`` (no recommender here).

Candidate expansion (Sec. 3.2.1), from the training split only:

    s^m_ij = cos(x^m_i, x^m_j)                                        (Eq. 1, top-k lists N^m(i))
    pool(u) = U_{i in I_u} (N^A(i) u N^S(i))  minus  I_u
    c(u, j) = sum_{i in I_u} (s^A_ij + s^S_ij) / 2                     (Eq. 2)
    E+ = {(u, j): j in the top-r of pool(u) by c}                      (Eq. 3)

``candidate_score``: ``pool_dense`` scores the pool with the full cosine (the literal Eq. 2; with
row-normalised features c(u, j) = (<p^A_u, x^A_j> + <p^S_u, x^S_j>) / 2, p^m_u = sum_{i in I_u} x^m_i);
``topk_sparse`` counts s^m_ij only where j is in N^m(i) (c = R ((S^A_k + S^S_k) / 2)).
Users are processed in blocks; a block holds at most a [block x needed-columns] dense score matrix,
never users x items or items x items.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import scipy.sparse as sp
import torch

from mmrec import graph

log = logging.getLogger("mmrec." + __name__)

GROUPS = ("B", "A", "S")
FAMILIES = ("dom", "bal", "com")
INDUCED_EDGES_VERSION = 1
# dense score entries per user block (float32: 64 MiB); sets the block size for pool_dense
BLOCK_SCORE_BUDGET = 1 << 24


# ----------------------------------------------------------------------------------------------
# triplet templates (Eqs. 12-15)
def canonical_template(family: str, alpha: float, beta: float, delta: float, eps: float) -> np.ndarray:
    """w~^t over [anchor, aux1, aux2] (Eqs. 12-14)."""
    if family == "dom":  # Eq. 12
        return (1 - alpha) * np.array([0.5, 0.25, 0.25]) + alpha * np.array([1.0, 0.0, 0.0])
    if family == "bal":  # Eq. 13
        return np.array([1 / 3 + beta / 6, 1 / 3 - beta / 12, 1 / 3 - beta / 12])
    if family == "com":  # Eq. 14
        return np.array([eps, (1 - eps) * delta, (1 - eps) * (1 - delta)])
    raise ValueError(f"unknown expert family {family!r}; use dom, bal or com")


def group_order(group: str, aux_order: str = "global") -> list[str]:
    """[anchor, aux1, aux2] of a group: ``global`` keeps the other two in the order B, A, S;
    ``cyclic`` rotates (B -> [B, A, S], A -> [A, S, B], S -> [S, B, A])."""
    if aux_order == "global":
        return [group] + [g for g in GROUPS if g != group]
    if aux_order == "cyclic":
        k = GROUPS.index(group)
        return [GROUPS[(k + j) % 3] for j in range(3)]
    raise ValueError(f"unknown aux_order {aux_order!r}; use global or cyclic")


def permute(canonical: np.ndarray, group: str, aux_order: str = "global") -> np.ndarray:
    """P_g (Eq. 15): canonical [anchor, aux1, aux2] -> global order [B, A, S]."""
    out = np.zeros(3)
    for pos, modality in enumerate(group_order(group, aux_order)):
        out[GROUPS.index(modality)] = canonical[pos]
    return out


def template_pool(alpha: float, beta: float, delta: float, eps: float, aux_order: str = "global",
                  families=FAMILIES, replicas: int = 1) -> tuple[np.ndarray, list[str]]:
    """The expert pool: weights [E, 3] over [B, A, S] and names like 'Dom-B' (family-major order:
    Dom-B, Dom-A, Dom-S, Bal-B, ...); each template repeated ``replicas`` times (E = 3 |families| p)."""
    rows, names = [], []
    for family in families:
        fam = str(family).lower()
        base = canonical_template(fam, alpha, beta, delta, eps)
        for group in GROUPS:
            for rep in range(replicas):
                rows.append(permute(base, group, aux_order))
                names.append(f"{fam.capitalize()}-{group}" + (f"#{rep}" if replicas > 1 else ""))
    return np.stack(rows).astype(np.float32), names


# ----------------------------------------------------------------------------------------------
# candidate expansion and induced edges (Eqs. 1-3)
def _neighbour_entries(hist_users: np.ndarray, hist_items: np.ndarray, knn_idx: list[np.ndarray],
                       knn_val: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (u, j, s^m_ij / 2) for i in I_u, j in N^m(i), over the modalities (duplicates kept)."""
    us, js, ss = [], [], []
    for idx, val in zip(knn_idx, knn_val):
        k = idx.shape[1]
        us.append(np.repeat(hist_users, k))
        js.append(idx[hist_items].ravel())
        ss.append(val[hist_items].ravel().astype(np.float64) / 2.0)
    return np.concatenate(us), np.concatenate(js), np.concatenate(ss)


def _top_r_per_user(users: np.ndarray, items: np.ndarray, scores: np.ndarray, r: int) -> np.ndarray:
    """Mask of the r best-scored entries per user (ties: smaller item id first)."""
    order = np.lexsort((items, -scores, users))
    su = users[order]
    starts = np.flatnonzero(np.r_[True, su[1:] != su[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, su.size]))
    keep = np.zeros(users.size, dtype=bool)
    keep[order[(np.arange(su.size) - run_start) < r]] = True
    return keep


def candidate_block(train: sp.csr_matrix, user_lo: int, user_hi: int, knn_idx, knn_val,
                    normed_feats: list[torch.Tensor] | None, candidate_score: str):
    """Pool entries (users, items, scores) of users [user_lo, user_hi) (Eq. 2)."""
    block = train[user_lo:user_hi].tocoo()
    hist_u = block.row.astype(np.int64)
    hist_i = block.col.astype(np.int64)
    n_items = train.shape[1]
    if hist_u.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    eu, ej, es = _neighbour_entries(hist_u, hist_i, knn_idx, knn_val)
    keys = eu * n_items + ej
    uniq, inverse = np.unique(keys, return_inverse=True)
    sparse_score = np.bincount(inverse, weights=es, minlength=uniq.size)  # R ((S^A_k + S^S_k) / 2)
    history = np.unique(hist_u * n_items + hist_i)
    pool = ~np.isin(uniq, history, assume_unique=True)  # minus I_u
    uniq, sparse_score = uniq[pool], sparse_score[pool]
    users, items = uniq // n_items, uniq % n_items
    if candidate_score == "topk_sparse":
        return users + user_lo, items, sparse_score
    if candidate_score != "pool_dense":
        raise ValueError(f"unknown candidate_score {candidate_score!r}; use pool_dense or topk_sparse")
    # pool_dense: the full cosine of every (history item, candidate) pair, Eq. 2 literally
    cols, col_pos = np.unique(items, return_inverse=True)
    n_rows = user_hi - user_lo
    hist_t = torch.from_numpy(np.vstack([hist_u, hist_i]))
    score = torch.zeros(users.size, dtype=torch.float64)
    cols_t = torch.from_numpy(cols)
    users_t, pos_t = torch.from_numpy(users), torch.from_numpy(col_pos)
    for x in normed_feats:
        ones = torch.ones(hist_u.size, dtype=x.dtype)
        r_block = torch.sparse_coo_tensor(hist_t, ones, (n_rows, n_items), check_invariants=False)
        profile = torch.sparse.mm(r_block, x)  # p^m_u = sum_{i in I_u} x^m_i   [b, dim]
        dense = profile @ x[cols_t].T  # [b, |needed columns|]
        score += dense[users_t, pos_t].double() / 2.0
    return users + user_lo, items, score.numpy()


def build_induced_edges(train: sp.spmatrix, knn_idx: list[np.ndarray], knn_val: list[np.ndarray],
                        features: list[np.ndarray] | None, r: int, candidate_score: str = "pool_dense",
                        block_users: int | None = None, popularity_discount: float = 0.0) -> dict[str, np.ndarray]:
    """E+ (Eq. 3): top-r pool candidates per user, from the training matrix only.

    ``popularity_discount`` gamma > 0 (an extension; 0 = Eq. 3): candidates are ranked by
    c(u, j) / (1 + deg(j))^gamma, deg(j) = j's training interactions, so the induced edges go less to items
    that already have many observed ones.  Returns arrays ``users``, ``items``, ``scores`` (c(u, j) of the
    kept edges) and ``pool_sizes`` (|pool(u)| per user; a user whose pool is smaller than r keeps the whole
    pool)."""
    train = sp.csr_matrix(train)
    n_users, n_items = train.shape
    discount = (1.0 + np.asarray(train.sum(axis=0)).ravel()) ** -popularity_discount if popularity_discount else None
    normed = None
    if candidate_score == "pool_dense":
        normed = [graph.l2_normalize_rows(torch.as_tensor(np.asarray(f), dtype=torch.float32)) for f in features]
    if block_users is None:
        block_users = max(1, min(n_users, BLOCK_SCORE_BUDGET // max(n_items, 1)))
    out_u, out_i, out_s = [], [], []
    pool_sizes = np.zeros(n_users, dtype=np.int64)
    for lo in range(0, n_users, block_users):
        hi = min(lo + block_users, n_users)
        users, items, scores = candidate_block(train, lo, hi, knn_idx, knn_val, normed, candidate_score)
        pool_sizes[lo:hi] = np.bincount(users - lo, minlength=hi - lo)
        keep = _top_r_per_user(users, items, scores if discount is None else scores * discount[items], r)
        out_u.append(users[keep])
        out_i.append(items[keep])
        out_s.append(scores[keep])
    users, items, scores = (np.concatenate(a) if a else np.zeros(0) for a in (out_u, out_i, out_s))
    return {"users": users.astype(np.int64), "items": items.astype(np.int64),
            "scores": scores.astype(np.float32), "pool_sizes": pool_sizes}


def cached_induced_edges(dataset, k: int, r: int, candidate_score: str, popularity_discount: float = 0.0,
                         whitening_dim: int = 0, smoothing_k: int = 0) -> dict[str, np.ndarray]:
    """E+ of a dataset, cached on disk keyed by everything it depends on (train split, features, k, r,
    candidate score, popularity discount, similarity features); kNN lists come from the shared cache (cosine,
    item not its own neighbour) on the features ``graph.similarity_features`` gives for (whitening_dim,
    smoothing_k): raw when both are 0 (Eq. 1 as written)."""
    mods = [m for m in ("v", "t") if m in dataset.features]
    key = {"version": INDUCED_EDGES_VERSION, "train": dataset.train_fingerprint,
           "features": {m: dataset.feature_hash(m) for m in mods}, "k": int(k), "r": int(r),
           "candidate_score": candidate_score}
    # (each absent at 0, so existing caches keep their keys)
    for name, value in (("popularity_discount", float(popularity_discount)), ("whitening_dim", int(whitening_dim)),
                        ("smoothing_k", int(smoothing_k))):
        if value:
            key[name] = value

    def build() -> dict[str, np.ndarray]:
        lists = [graph.cached_knn(dataset, m, k, include_self=False, whitening_dim=whitening_dim,
                                  smoothing_k=smoothing_k) for m in mods]
        feats = [graph.similarity_features(dataset, m, whitening_dim, smoothing_k) for m in mods]
        return build_induced_edges(dataset.train_matrix, [a for a, _ in lists], [b for _, b in lists],
                                   feats, r, candidate_score, popularity_discount=popularity_discount)

    return dataset.cache.get_or_build("magnet_induced_edges", key, build)


def config_induced_edges(dataset, cfg) -> dict[str, np.ndarray]:
    """E+ of a dataset under a MAGNET config (``knn_k``, ``expansion_r``, ``candidate_score``,
    ``candidate_popularity_discount``, ``similarity_whitening``, ``similarity_smoothing``): the one place that
    reads those keys, for the model, the benchmark and ``utils.magnet_parts --induced``."""
    return cached_induced_edges(dataset, int(cfg["knn_k"]), int(cfg["expansion_r"]), str(cfg["candidate_score"]),
                                float(cfg.get("candidate_popularity_discount", 0.0) or 0.0),
                                **graph.similarity_settings(cfg))


def augmented_matrix(train: sp.spmatrix, induced: dict[str, np.ndarray], weight: str = "binary",
                     scale: float = 1.0) -> sp.csr_matrix:
    """The user-item matrix of G_UIG: observed edges (1) plus E+ (1, or ``score``: c(u, j) divided by
    the user's best kept score, clipped to [0, 1]), times ``scale`` (``induced_edge_scale``; 1 = as the
    paper, where induced edges weigh as much as observed ones)."""
    train = sp.csr_matrix(train, dtype=np.float32)
    users, items = induced["users"], induced["items"]
    if weight == "binary":
        vals = np.ones(users.size, dtype=np.float32)
    elif weight == "score":
        scores = induced["scores"].astype(np.float64)
        best = np.full(train.shape[0], -math.inf)
        np.maximum.at(best, users, scores)
        vals = np.clip(scores / np.where(best[users] > 0, best[users], 1.0), 0.0, 1.0).astype(np.float32)
    else:
        raise ValueError(f"unknown induced_edge_weight {weight!r}; use binary or score")
    plus = sp.csr_matrix((vals * np.float32(scale), (users, items)), shape=train.shape)
    return (train + plus).tocsr()


# ----------------------------------------------------------------------------------------------
# neighbour sampling (Eq. 4's optional fanout F)
def sample_fanout(adj: sp.spmatrix, fanout: int, rng: np.random.Generator) -> sp.csr_matrix:
    """Keep up to ``fanout`` neighbours per row of a sparse adjacency, drawn uniformly without
    replacement; kept weights are scaled by deg / kept so the sampled product is an unbiased estimate of
    A H.  Rows with at most ``fanout`` entries are kept whole.

    A partial Fisher-Yates shuffle inside each row's CSR segment, vectorised over rows: F rounds of one
    swap per heavy row, O(nnz + F x rows) with no global sort."""
    adj = sp.csr_matrix(adj)
    indptr = adj.indptr.astype(np.int64)
    deg = np.diff(indptr)
    kept = np.minimum(deg, fanout)
    heavy = np.flatnonzero(deg > fanout)
    perm = np.arange(adj.nnz, dtype=np.int64)
    start, heavy_deg = indptr[heavy], deg[heavy]
    for j in range(fanout):  # position start + j receives a uniform pick from the not-yet-drawn rest
        a = start + j
        b = a + (rng.random(heavy.size) * (heavy_deg - j)).astype(np.int64)
        perm[a], perm[b] = perm[b], perm[a]
    new_ptr = np.zeros(deg.size + 1, dtype=np.int64)
    np.cumsum(kept, out=new_ptr[1:])
    pos = np.repeat(indptr[:-1] - new_ptr[:-1], kept) + np.arange(new_ptr[-1])
    chosen = perm[pos]
    scale = np.repeat(deg / np.maximum(kept, 1), kept)
    out = sp.csr_matrix(((adj.data[chosen] * scale).astype(np.float32), adj.indices[chosen], new_ptr),
                        shape=adj.shape)
    out.sort_indices()
    return out


def without_pairs(adj: sp.csr_matrix, users: np.ndarray, items: np.ndarray, n_users: int) -> sp.csr_matrix:
    """A bipartite propagation matrix over [users; items] with the entries of the given (user, item) pairs
    removed in both directions, (u, n_users + i) and (n_users + i, u); every other entry as it was
    (``target_edges: drop``: a training batch's positives leave the graphs it propagates over)."""
    n = adj.shape[0]
    rows = np.concatenate([users, items + n_users])
    cols = np.concatenate([items + n_users, users])
    mask = sp.csr_matrix((np.ones(rows.size, dtype=bool), (rows, cols)), shape=(n, n))  # repeats stay True
    out = (adj - adj.multiply(mask)).tocsr()
    out.eliminate_zeros()
    return out
