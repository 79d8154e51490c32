"""Does a dataset carry signal in its content?  Simple item-kNN baselines.

    python -m utils.signal_check mini [--data data] [--seed S] [--topk 50]

Scorers (all built from TRAIN interactions only):
  cooc   item-item cosine on the train user x item matrix
  text   cosine of text features
  image  cosine of image features
  pop    train popularity (reference only, not part of the check)
  sum    cooc + w_t * text + w_i * image, weights picked on validation Recall@20
Each similarity keeps its top-k neighbours per item; score(u, j) = sum over u's
train items i of sim(i, j).  Full ranking over all items with the user's train
items masked; Recall@K = hits / |T_u|, NDCG@K with IDCG over min(|T_u|, K),
averaged over users with at least one target item.  "tail" = Recall@20 on test
items among the least popular 80% of items (by train count), over users having
such test items.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

K = 20


def load(folder: Path, name: str):
    raw = np.loadtxt(folder / f"{name}.inter", dtype=np.int64, delimiter="\t", skiprows=1)
    user, item, label = raw[:, 0], raw[:, 1], raw[:, 4]
    img = np.load(folder / "image_feat.npy")
    txt = np.load(folder / "text_feat.npy")
    n_users, n_items = int(user.max()) + 1, img.shape[0]

    def mat(mask):
        return sp.csr_matrix((np.ones(mask.sum(), np.float32), (user[mask], item[mask])),
                             shape=(n_users, n_items))

    return mat(label == 0), mat(label == 1), mat(label == 2), img, txt


def topk_sim(x: np.ndarray, k: int, block: int = 2048) -> sp.csr_matrix:
    """Row-wise top-k cosine similarity (self excluded), computed in blocks."""
    x = x.astype(np.float32)
    nrm = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.maximum(nrm, 1e-12)
    n = x.shape[0]
    k = min(k, n - 1)
    rows, cols, vals = [], [], []
    for s in range(0, n, block):
        e = min(n, s + block)
        sim = x[s:e] @ x.T
        sim[np.arange(e - s), np.arange(s, e)] = -np.inf
        idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        v = np.take_along_axis(sim, idx, 1)
        rows.append(np.repeat(np.arange(s, e), k))
        cols.append(idx.ravel())
        vals.append(v.ravel())
    v = np.concatenate(vals)
    v = np.maximum(v, 0)
    return sp.csr_matrix((v, (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))


def cooc_sim(train: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Item-item cosine on the train matrix, top-k neighbours per item."""
    X = train.T.tocsr().astype(np.float32)                    # items x users
    co = (X @ X.T).tocsr()
    deg = np.sqrt(np.asarray(X.sum(1)).ravel())
    d = 1.0 / np.maximum(deg, 1e-12)
    co = sp.diags(d) @ co @ sp.diags(d)
    co.setdiag(0)
    co.eliminate_zeros()
    co = co.tocsr()
    # keep top-k per row
    indptr, indices, data = co.indptr, co.indices, co.data
    lens = np.diff(indptr)
    row_of = np.repeat(np.arange(co.shape[0]), lens)
    order = np.lexsort((-data, row_of))                       # by row, value desc
    rank = np.arange(len(data)) - np.repeat(indptr[:-1], lens)
    keep = order[rank < k]
    return sp.csr_matrix((data[keep], (row_of[keep], indices[keep])), shape=co.shape)


def scores(train: sp.csr_matrix, sim: sp.csr_matrix, users: np.ndarray) -> np.ndarray:
    s = np.asarray((train[users] @ sim).todense(), dtype=np.float32)
    m = s.max(1, keepdims=True)
    return s / np.where(m > 0, m, 1.0)        # per-user scale, so scorers can be summed


def topk_items(score: np.ndarray, train: sp.csr_matrix, users: np.ndarray, k=K):
    score = score.copy()
    tr = train[users]
    score[np.repeat(np.arange(len(users)), np.diff(tr.indptr)), tr.indices] = -np.inf
    idx = np.argpartition(-score, k - 1, axis=1)[:, :k]
    o = np.argsort(-np.take_along_axis(score, idx, 1), axis=1)
    return np.take_along_axis(idx, o, 1)


def metrics(top: np.ndarray, target: sp.csr_matrix, k=K):
    """Recall@k and NDCG@k averaged over rows of `target` with >= 1 item."""
    n_t = np.diff(target.indptr)
    rows = np.repeat(np.arange(top.shape[0]), k)
    hit = np.asarray(target[rows, top.ravel()]).reshape(top.shape) > 0
    ok = n_t > 0
    recall = hit.sum(1)[ok] / n_t[ok]
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (hit * disc).sum(1)
    idcg = np.cumsum(disc)[np.minimum(n_t, k) - 1]
    ndcg = dcg[ok] / idcg[ok]
    return float(recall.mean()), float(ndcg.mean())


def evaluate_all(folder: Path, name: str, topk: int = 50, verbose=True):
    train, valid, test, img, txt = load(folder, name)
    n_users, n_items = train.shape
    pop = np.asarray(train.sum(0)).ravel()
    tail_items = np.argsort(pop, kind="stable")[: int(0.8 * n_items)]
    tail_mask = np.zeros(n_items, bool)
    tail_mask[tail_items] = True
    test_tail = test.multiply(tail_mask[None, :]).tocsr()
    test_tail.eliminate_zeros()

    sims = {"cooc": cooc_sim(train, topk), "text": topk_sim(txt, topk), "image": topk_sim(img, topk)}
    users = np.arange(n_users)
    S = {k: scores(train, v, users) for k, v in sims.items()}

    def run(score):
        top = topk_items(score, train, users)
        return dict(zip(["valid_R", "valid_N"], metrics(top, valid))) | \
            dict(zip(["test_R", "test_N"], metrics(top, test))) | \
            {"tail_R": metrics(top, test_tail)[0]}

    res = {"pop (reference)": run(np.broadcast_to(pop.astype(np.float32), (n_users, n_items)))}
    res.update({k: run(v) for k, v in S.items()})
    grid = [0.0, 0.1, 0.25, 0.5, 1.0, 2.0]
    best = None
    for wt in grid:
        for wi in grid:
            top = topk_items(S["cooc"] + wt * S["text"] + wi * S["image"], train, users)
            r = metrics(top, valid)[0]
            if best is None or r > best[0] + 1e-12:
                best = (r, wt, wi)
    _, wt, wi = best
    res[f"sum(wt={wt},wi={wi})"] = run(S["cooc"] + wt * S["text"] + wi * S["image"])
    if verbose:
        n_int = train.nnz + valid.nnz + test.nnz
        print(f"{name}: {n_users} users, {n_items} items, {n_int} interactions "
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
    from utils.synth import PRESETS, ensure_dataset
    folder = Path(a.data) / a.name
    name = a.name
    if a.seed is not None:
        if a.name not in PRESETS:
            p.error("--seed needs a synthetic preset name")
        import utils.synth as synth
        args = synth.preset_args(a.name)
        args.pop("seed", None)
        n_u, n_i = args.pop("n_users"), args.pop("n_items")
        name = f"{a.name}_s{a.seed}"
        folder = synth._ensure_args(a.data, name, a.seed, dict(args, n_users=n_u, n_items=n_i))
    elif a.name in PRESETS:
        folder = ensure_dataset(a.data, a.name)
    res = evaluate_all(folder, name, a.topk)
    c, t = res["cooc"]["test_R"], res["text"]["test_R"]
    sk = [k for k in res if k.startswith("sum")][0]
    ok1 = t >= 0.5 * c
    ok2 = res[sk]["test_R"] > max(c, t, res["image"]["test_R"])
    print(f"check: text >= 0.5*cooc on test R@20: {ok1} ({t:.4f} vs {c:.4f}); "
          f"tuned sum beats every single scorer on test: {ok2}")
    return 0 if (ok1 and ok2) else 1


if __name__ == "__main__":
    sys.exit(main())
