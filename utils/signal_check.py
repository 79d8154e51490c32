"""Does a dataset carry signal in its content?  Simple item-kNN baselines.

    python -m utils.signal_check mini [--data data] [--seed S] [--topk 50]

Scorers (all built from TRAIN interactions only):
  cooc   item-item cosine on the train user x item matrix
  text   cosine of text features
  image  cosine of image features
  pop    train popularity (reference only, not part of the check)
  sum    cooc + w_t * text + w_i * image, weights picked on validation Recall@20
Each similarity keeps its top-k neighbours per item; score(u, j) = sum over u's
train items i of sim(i, j).  The dataset is read by the toolkit's loader, feature
neighbours come from ``mmrec.graph.cosine_topk`` and every figure from the
evaluator (``mmrec.evaluation.evaluate``: full ranking, train items masked), so
they mean what a model's Recall/NDCG@20 mean.  "tail" = Recall@20 on test items
among the least popular 80% of items (by train count), over users having such
test items.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from mmrec import graph
from mmrec.config import load_config
from mmrec.data import RecDataset
from mmrec.data.sources import ensure_generated
from mmrec.evaluation import evaluate

K = 20
WEIGHT_GRID = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)


def load(data_path: Path | str, name: str) -> RecDataset:
    """The dataset as every run reads it (its yaml, split and feature files)."""
    config = load_config("BPR", name, {"data_path": str(data_path)})
    config["model"] = None  # not an ID-only model: load every configured feature file
    ensure_generated(config)  # a registered synthetic preset: generated first if missing
    return RecDataset(config)


def feature_sim(features: np.ndarray, k: int) -> sp.csr_matrix:
    """Top-k cosine neighbours of every item (itself excluded), negative similarities clipped to 0."""
    idx, val = graph.cosine_topk(features, min(k, features.shape[0] - 1), include_self=False)
    rows = np.repeat(np.arange(idx.shape[0]), idx.shape[1])
    return sp.csr_matrix((np.maximum(val.ravel(), 0), (rows, idx.ravel())), shape=(idx.shape[0],) * 2)


def cooc_sim(train: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Item-item cosine on the train matrix, top-k neighbours per item (itself excluded)."""
    x = train.T.tocsr().astype(np.float32)                    # items x users
    inv = 1.0 / np.maximum(np.sqrt(np.asarray(x.sum(1)).ravel()), 1e-12)
    co = (sp.diags(inv) @ (x @ x.T) @ sp.diags(inv)).tocsr()
    co.setdiag(0)
    co.eliminate_zeros()
    lens = np.diff(co.indptr)
    row_of = np.repeat(np.arange(co.shape[0]), lens)
    order = np.lexsort((-co.data, row_of))                    # by row, value descending
    rank = np.arange(len(co.data)) - np.repeat(co.indptr[:-1], lens)
    keep = order[rank < k]
    return sp.csr_matrix((co.data[keep], (row_of[keep], co.indices[keep])), shape=co.shape)


def user_scores(train_rows: sp.csr_matrix, sim: sp.csr_matrix) -> np.ndarray:
    """score(u, j) = sum of sim(i, j) over u's train items, divided by the user's max (so scorers add);
    for the rows given (a block of users)."""
    s = np.asarray((train_rows @ sim).todense(), dtype=np.float32)
    m = s.max(1, keepdims=True)
    return s / np.where(m > 0, m, 1.0)


class Scorer(torch.nn.Module):
    """An item-kNN scorer behind the evaluator's model interface: per block of users,
    sum_s w_s * user_scores(train[block], sim_s), or a fixed per-item ``prior`` (popularity).
    Scores are made per block, so no users x items matrix is ever held."""

    def __init__(self, train: sp.csr_matrix, terms: list[tuple[float, sp.csr_matrix]] = (),
                 prior: np.ndarray | None = None):
        super().__init__()
        self.train_matrix, self.terms = train, [(w, sim) for w, sim in terms if w]
        self.prior = None if prior is None else torch.from_numpy(np.asarray(prior, dtype=np.float32))

    def start_evaluation(self, split: str | None = None) -> None:
        return None

    def end_evaluation(self) -> None:
        return None

    def full_sort_predict(self, interaction: dict) -> torch.Tensor:
        block = interaction["users"].cpu().numpy()
        if self.prior is not None:
            return self.prior.expand(len(block), -1).clone()
        rows = self.train_matrix[block]
        return torch.from_numpy(sum(w * user_scores(rows, sim) for w, sim in self.terms))


class _TailView:
    """The dataset with its test split restricted to the tail items (for the "tail" column)."""

    def __init__(self, dataset: RecDataset, tail_items: np.ndarray):
        keep = np.zeros(dataset.n_items, bool)
        keep[tail_items] = True
        test = dataset.eval_matrix("test").multiply(keep[None, :]).tocsr()
        test.eliminate_zeros()
        self.train_matrix, self.n_items, self._test = dataset.train_matrix, dataset.n_items, test

    def eval_matrix(self, split: str) -> sp.csr_matrix:
        return self._test


def recall_ndcg(scorer: Scorer, dataset, split: str) -> tuple[float, float]:
    out = evaluate(scorer, dataset, split, [K], metrics=("recall", "ndcg"))["metrics"]
    return out[f"recall@{K}"], out[f"ndcg@{K}"]


def evaluate_all(dataset: RecDataset, topk: int = 50, verbose: bool = True) -> dict[str, dict[str, float]]:
    train = dataset.train_matrix.tocsr()
    n_users, n_items = train.shape
    pop = np.asarray(train.sum(0)).ravel()
    tail = _TailView(dataset, np.argsort(pop, kind="stable")[: int(0.8 * n_items)])

    sims = {"cooc": cooc_sim(train, topk), "text": feature_sim(dataset.features["t"], topk),
            "image": feature_sim(dataset.features["v"], topk)}

    def combined(wt: float, wi: float) -> Scorer:
        return Scorer(train, [(1.0, sims["cooc"]), (wt, sims["text"]), (wi, sims["image"])])

    def run(scorer: Scorer) -> dict[str, float]:
        (vr, vn), (tr, tn) = recall_ndcg(scorer, dataset, "valid"), recall_ndcg(scorer, dataset, "test")
        return {"valid_R": vr, "valid_N": vn, "test_R": tr, "test_N": tn, "tail_R": recall_ndcg(scorer, tail, "test")[0]}

    res = {"pop (reference)": run(Scorer(train, prior=pop))}
    res.update({name: run(Scorer(train, [(1.0, sim)])) for name, sim in sims.items()})
    best = None  # (valid Recall@20, w_t, w_i): chosen on validation only
    for wt in WEIGHT_GRID:
        for wi in WEIGHT_GRID:
            r = recall_ndcg(combined(wt, wi), dataset, "valid")[0]
            if best is None or r > best[0] + 1e-12:
                best = (r, wt, wi)
    _, wt, wi = best
    res[f"sum(wt={wt},wi={wi})"] = run(combined(wt, wi))
    if verbose:
        valid, test = dataset.eval_matrix("valid"), dataset.eval_matrix("test")
        n_int = train.nnz + valid.nnz + test.nnz
        print(f"{dataset.name}: {n_users} users, {n_items} items, {n_int} interactions "
              f"(train {train.nnz}, valid {valid.nnz}, test {test.nnz}), "
              f"density {n_int / n_users / n_items:.5f}, item-kNN top-{topk}")
        print(f"{'scorer':<22}{'valid R@20':>11}{'valid N@20':>11}{'test R@20':>10}"
              f"{'test N@20':>10}{'tail R@20':>10}")
        for k, r in res.items():
            print(f"{k:<22}{r['valid_R']:>11.4f}{r['valid_N']:>11.4f}{r['test_R']:>10.4f}"
                  f"{r['test_N']:>10.4f}{r['tail_R']:>10.4f}")
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name")
    p.add_argument("--data", default="data")
    p.add_argument("--seed", type=int, default=None,
                   help="generate NAME with this generator seed into <data>/<NAME>_s<seed>")
    p.add_argument("--topk", type=int, default=50)
    a = p.parse_args(argv)
    import utils.synth as synth  # registers the presets: generated on first use by the loader

    name = a.name
    if a.seed is not None:
        if a.name not in synth.PRESETS:
            p.error("--seed needs a synthetic preset name")
        name = f"{a.name}_s{a.seed}"
        synth._ensure_args(a.data, name, a.seed, {k: v for k, v in synth.preset_args(a.name).items() if k != "seed"})
    res = evaluate_all(load(a.data, name), a.topk)
    c, t = res["cooc"]["test_R"], res["text"]["test_R"]
    sk = [k for k in res if k.startswith("sum")][0]
    ok1 = t >= 0.5 * c
    ok2 = res[sk]["test_R"] > max(c, t, res["image"]["test_R"])
    print(f"check: text >= 0.5*cooc on test R@20: {ok1} ({t:.4f} vs {c:.4f}); "
          f"tuned sum beats every single scorer on test: {ok2}")
    return 0 if (ok1 and ok2) else 1


if __name__ == "__main__":
    sys.exit(main())
