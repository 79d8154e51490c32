"""Full-ranking top-K evaluation, defined exactly as MMRec defines its metrics
(``src/utils/metrics.py``, ``src/utils/topk_evaluator.py``), computed on tensors in user blocks.

For a user u with ground-truth set T_u (the user's items in the evaluated split) and a ranking of all
items with u's *training* items removed, let hit_r = 1 if the item at rank r is in T_u:

- Recall@K    = sum_{r<=K} hit_r / |T_u|
- Precision@K = sum_{r<=K} hit_r / K
- NDCG@K      = sum_{r<=K} hit_r / log2(r + 1)  /  sum_{r=1}^{min(|T_u|, K)} 1 / log2(r + 1)
- MAP@K       = sum_{r<=K} hit_r * Precision@r  /  min(|T_u|, K)

Each metric is averaged over the users that have at least one item in the split.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from mmrec import native
from mmrec.config import METRIC_NAMES

METRICS = METRIC_NAMES  # one list, declared with the configuration checks
# On CPU a block of scores stays at most this size: glibc serves allocations up to 32 MiB from memory it
# keeps (its largest mmap threshold, which ``cpu_malloc_reuse`` sets), while a larger one is mapped fresh
# and page-faulted in for every block (~10% of a LightGCN evaluation pass at 7,050 items and 2,048 users).
CPU_SCORE_BLOCK_BYTES = 32 << 20


def block_users(batch_users: int, n_items: int, device) -> int:
    """Users per scoring block: ``batch_users`` (``eval_batch_size``), on CPU capped so the float32 score
    block fits CPU_SCORE_BLOCK_BYTES (at least one user)."""
    if torch.device(device).type != "cpu":
        return int(batch_users)
    return max(1, min(int(batch_users), CPU_SCORE_BLOCK_BYTES // (4 * max(int(n_items), 1))))


def topk_metrics(hits: torch.Tensor, n_pos: torch.Tensor, ks: list[int],
                 metrics=METRICS) -> dict[str, torch.Tensor]:
    """Per-user metric values.  ``hits``: [users, maxK] 0/1 in rank order; ``n_pos``: [users] = |T_u|.
    Returns {'recall@10': tensor[users], ...}."""
    hits = hits.to(torch.float64)
    n_pos = n_pos.to(torch.float64)
    max_k = hits.shape[1]
    ranks = torch.arange(1, max_k + 1, dtype=torch.float64, device=hits.device)
    cum_hits = hits.cumsum(dim=1)
    discount = 1.0 / torch.log2(ranks + 1.0)
    dcg = (hits * discount).cumsum(dim=1)
    idcg_table = discount.cumsum(dim=0)
    prec_at_r = cum_hits / ranks
    ap_sum = (prec_at_r * hits).cumsum(dim=1)
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        if k > max_k:
            raise ValueError(f"topk {k} exceeds the {max_k} ranked items")
        denom_len = torch.clamp(n_pos, max=k)
        for name in metrics:
            if name == "recall":
                val = cum_hits[:, k - 1] / n_pos
            elif name == "precision":
                val = cum_hits[:, k - 1] / k
            elif name == "ndcg":
                idcg = idcg_table[(denom_len - 1).long()]
                val = dcg[:, k - 1] / idcg
            elif name == "map":
                val = ap_sum[:, k - 1] / denom_len
            else:
                raise ValueError(f"unknown metric {name!r}; use {', '.join(METRICS)}")
            out[f"{name}@{k}"] = val
    return out


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of each row's ``k`` (at most the row length) largest scores, best first: the compiled
    ``mmrec.native.row_topk`` on CPU where it builds (a fifth of an evaluation pass at Baby size was
    ``torch.topk``), else ``torch.topk``.  The two differ only in the order of equal scores."""
    k = min(k, scores.shape[1])
    top = native.row_topk(scores, k)
    return top if top is not None else torch.topk(scores, k, dim=1).indices


def _row_keys(matrix: sp.csr_matrix, rows: np.ndarray, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(local_row, col) index tensors of the non-zeros of ``matrix[rows]``."""
    sub = matrix[rows].tocoo()
    return torch.from_numpy(sub.row.astype(np.int64)), torch.from_numpy(sub.col.astype(np.int64))


def _masked_scores(model, block: np.ndarray, train: sp.csr_matrix, device) -> torch.Tensor:
    """Scores [block, n_items] from ``full_sort_predict`` with the block's training items at -inf."""
    n_items = train.shape[1]
    scores = model.full_sort_predict({"users": torch.from_numpy(block).to(device)})
    if scores.shape != (len(block), n_items):
        raise RuntimeError(f"{type(model).__name__}.full_sort_predict returned shape "
                           f"{tuple(scores.shape)}, expected ({len(block)}, {n_items})")
    scores = scores.float()  # masked in place: the contract asks for a fresh tensor
    r, c = _row_keys(train, block, n_items)
    scores[r.to(device), c.to(device)] = -torch.inf
    return scores


@torch.no_grad()
def recommend(model, dataset, users: np.ndarray, k: int, batch_users: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` items and their scores for ``users`` over all items, the users' training items excluded
    (the ranking evaluation uses): arrays [len(users), k] of item ids and of scores."""
    train = dataset.train_matrix.tocsr()
    device = getattr(model, "device", torch.device("cpu"))
    was_training = model.training
    model.eval()
    model.start_evaluation("test")
    items, scores = [], []
    batch_users = block_users(batch_users, train.shape[1], device)
    try:
        for start in range(0, len(users), batch_users):
            block = np.asarray(users[start:start + batch_users], dtype=np.int64)
            block_scores = _masked_scores(model, block, train, device)
            top = topk_indices(block_scores, k)
            items.append(top.cpu().numpy())
            scores.append(block_scores.gather(1, top).cpu().numpy())
    finally:
        model.end_evaluation()
        model.train(was_training)
    if not items:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate(items), np.concatenate(scores)


@torch.no_grad()
def evaluate(model, dataset, split: str, ks: list[int], metrics=METRICS, batch_users: int = 2048,
             keep_topk: int = 0, per_user: bool = False) -> dict:
    """Full ranking over all items for every user with items in ``split`` ('valid' or 'test').

    The user's training items are excluded from the ranking.  Returns {'metrics': {name: mean},
    'users': array, optionally 'topk' ([users, keep_topk] item ids) and 'per_user' ({name: array})}.
    The model is put in eval mode and its forward is computed once for the pass (``start_evaluation``).
    """
    truth = dataset.eval_matrix(split).tocsr()
    truth.sort_indices()
    train = dataset.train_matrix.tocsr()
    users = np.flatnonzero(np.diff(truth.indptr) > 0)
    max_k = max(max(ks), keep_topk)
    n_items = dataset.n_items
    device = getattr(model, "device", torch.device("cpu"))
    was_training = model.training
    model.eval()
    model.start_evaluation(split)
    batch_users = block_users(batch_users, n_items, device)
    sums = {f"{m}@{k}": 0.0 for m in metrics for k in ks}
    per_user_vals: dict[str, list] = {name: [] for name in sums} if per_user else {}
    top_lists = []
    try:
        for start in range(0, len(users), batch_users):
            block = users[start:start + batch_users]
            scores = _masked_scores(model, block, train, device)
            top = topk_indices(scores, max_k).cpu()
            tr, tc = _row_keys(truth, block, n_items)
            truth_keys = tr * n_items + tc  # sorted: rows ascending, columns sorted within rows
            local = torch.arange(len(block)).unsqueeze(1)
            top_keys = local * n_items + top
            pos = torch.searchsorted(truth_keys, top_keys).clamp_max(max(truth_keys.numel() - 1, 0))
            hits = truth_keys[pos] == top_keys
            if hits.shape[1] < max(ks):  # fewer items than K: the missing ranks are misses
                hits = torch.nn.functional.pad(hits, (0, max(ks) - hits.shape[1]))
            n_pos = torch.from_numpy(np.diff(truth.indptr)[block].astype(np.int64))
            vals = topk_metrics(hits[:, : max(ks)], n_pos, ks, metrics)
            for name, v in vals.items():
                sums[name] += float(v.sum())
                if per_user:
                    per_user_vals[name].append(v.numpy())
            if keep_topk:
                top_lists.append(top[:, :keep_topk].numpy())
    finally:
        model.end_evaluation()
        model.train(was_training)
    n = max(len(users), 1)
    result = {"metrics": {name: s / n for name, s in sums.items()}, "users": users}
    if keep_topk:
        result["topk"] = np.concatenate(top_lists) if top_lists else np.zeros((0, keep_topk), np.int64)
    if per_user:
        result["per_user"] = {k: np.concatenate(v) if v else np.zeros(0) for k, v in per_user_vals.items()}
    return result
