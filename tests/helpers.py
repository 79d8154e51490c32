"""What the tests share, in one place: tiny MMRec-format datasets, the held-out-variant pair for leakage
tests, model builders, and the reference formulas (dense graphs, InfoNCE, BPR) that model tests check
our sparse, batched code against in float64."""
from __future__ import annotations

import io
import logging
import os
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmrec.config import load_config
from mmrec.data import RecDataset

# one training batch used by the dense-reference loss tests (a repeated user, items across the catalogue)
BATCH = {"users": torch.tensor([0, 3, 5, 7, 3]), "pos_items": torch.tensor([1, 2, 4, 8, 0]),
         "neg_items": torch.tensor([5, 6, 9, 11, 13])}


ROOT = Path(__file__).resolve().parent.parent


# -- the command line, in-process ------------------------------------------------------------------
@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args, cwd: Path = ROOT) -> CliResult:
    """``python main.py ARGS`` in this process (no interpreter start-up or torch import per call), run
    from ``cwd`` like the real command; returns its exit code and what it printed.  An uncaught exception
    propagates, so a test fails on what would have been a traceback.  Torch's thread count and the
    ``mmrec`` log handlers are restored afterwards."""
    import main as cli

    out, err = io.StringIO(), io.StringIO()
    threads, here = torch.get_num_threads(), os.getcwd()
    try:
        os.chdir(cwd)
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = cli.main([str(a) for a in args])
            except SystemExit as stop:  # argparse errors and explicit exits
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
                if isinstance(stop.code, str):
                    print(stop.code, file=err)
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
        logger = logging.getLogger("mmrec")
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
    return CliResult(int(code or 0), out.getvalue(), err.getvalue())


# -- datasets ----------------------------------------------------------------------------------------
def write_dataset(folder: Path, name: str, users, items, labels, v_feat=None, t_feat=None) -> Path:
    """Write an MMRec-format dataset folder (``<name>.inter`` + features) and return it."""
    d = Path(folder) / name
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{name}.inter", "w") as fh:
        fh.write("userID\titemID\trating\ttimestamp\tx_label\n")
        for k, (u, i, lab) in enumerate(zip(users, items, labels)):
            fh.write(f"{u}\t{i}\t5\t{k}\t{lab}\n")
    if v_feat is not None:
        np.save(d / "image_feat.npy", np.asarray(v_feat, dtype=np.float32))
    if t_feat is not None:
        np.save(d / "text_feat.npy", np.asarray(t_feat, dtype=np.float32))
    return d


def random_interactions(n_users: int, n_items: int, per_user: int = 6, seed: int = 0):
    """Each user gets ``per_user`` distinct items; the last two are valid and test (x_label 1, 2)."""
    rng = np.random.default_rng(seed)
    users, items, labels = [], [], []
    for u in range(n_users):
        chosen = rng.choice(n_items, size=per_user, replace=False)
        users += [u] * per_user
        items += chosen.tolist()
        labels += [0] * (per_user - 2) + [1, 2]
    # make sure every item id up to n_items - 1 exists (n_items = max id + 1)
    if n_items - 1 not in items:
        items[0] = n_items - 1
    return np.array(users), np.array(items), np.array(labels)


def tiny_setup(tmp_path: Path, model: str, n_users: int = 30, n_items: int = 20, seed: int = 0,
               image_dim: int = 16, text_dim: int = 8, overrides: dict | None = None):
    """(config, dataset) for ``model`` on a random tiny dataset 'toy' under tmp_path."""
    users, items, labels = random_interactions(n_users, n_items, seed=seed)
    rng = np.random.default_rng(seed + 1)
    write_dataset(tmp_path, "toy", users, items, labels,
                  rng.normal(size=(n_items, image_dim)), rng.normal(size=(n_items, text_dim)))
    sets = {"data_path": str(tmp_path), "cache_dir": str(tmp_path / "cache")}
    sets.update(overrides or {})
    config = load_config(model, "toy", sets)
    return config, RecDataset(config)


def held_out_variants(tmp_path: Path, model: str, overrides: dict | None = None, n_users: int = 25,
                      n_items: int = 18, seed: int = 3) -> list[tuple]:
    """Two (config, dataset) pairs with the same training rows and features and different valid/test items
    (each held-out item moved to an item its user has not seen): whatever a model builds from training
    data must come out the same on both."""
    users, items, labels = random_interactions(n_users, n_items, seed=seed)
    rng = np.random.default_rng(seed + 1)
    v, t = rng.normal(size=(n_items, 16)), rng.normal(size=(n_items, 8))
    moved = items.copy()
    for row in np.flatnonzero(labels > 0):
        seen = set(moved[users == users[row]].tolist())
        moved[row] = next(i for i in range(n_items) if i not in seen)
    out = []
    for name, its in (("a", items), ("b", moved)):
        write_dataset(tmp_path / name, "toy", users, its, labels, v, t)
        config = load_config(model, "toy", {"data_path": str(tmp_path / name),
                                            "cache_dir": str(tmp_path / f"cache_{name}"), **(overrides or {})})
        out.append((config, RecDataset(config)))
    (_, first), (_, second) = out
    assert (first.train_matrix != second.train_matrix).nnz == 0
    assert (first.valid_matrix != second.valid_matrix).nnz + (first.test_matrix != second.test_matrix).nnz > 0
    return out


def build(tiny, model_cls, seed: int = 0, **overrides):
    """(model, dataset): ``model_cls`` on the ``tiny`` fixture's dataset, weights drawn after ``seed``."""
    config, dataset = tiny(model_cls.__name__, overrides=overrides)
    torch.manual_seed(seed)
    return model_cls(config, dataset), dataset


def batch(users, pos, neg) -> dict[str, torch.Tensor]:
    return {"users": torch.tensor(users), "pos_items": torch.tensor(pos), "neg_items": torch.tensor(neg)}


# -- reference formulas (dense, float64, written from the papers' definitions) -------------------------
def info_nce_ref(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """-mean_i log( exp(cos(a_i, b_i)/t) / sum_j exp(cos(a_i, b_j)/t) )."""
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    sim = torch.exp(a @ b.T / t)
    return (-torch.log(sim.diagonal() / sim.sum(1))).mean()


def bpr_half_sq_ref(zu, zi, batch, reg_weight, batch_size):
    """BPR-mean on dot products + reg_weight * 0.5 * squared norms of the batch rows / batch_size."""
    u, p, n = zu[batch["users"]], zi[batch["pos_items"]], zi[batch["neg_items"]]
    x = (u * p).sum(1) - (u * n).sum(1)
    bpr = torch.log1p(torch.exp(-x)).mean()
    reg = 0.5 * (u.pow(2).sum() + p.pow(2).sum() + n.pow(2).sum()) / batch_size
    return bpr + reg_weight * reg


def dense_sym_adjacency(train: np.ndarray) -> np.ndarray:
    """D^-1/2 A D^-1/2 of A = [[0, Y], [Y^T, 0]], 1/0 -> 0."""
    n_users, n_items = train.shape
    a = np.zeros((n_users + n_items,) * 2)
    a[:n_users, n_users:] = train
    a[n_users:, :n_users] = train.T
    deg = a.sum(1)
    inv = np.where(deg > 0, 1.0 / np.sqrt(np.where(deg > 0, deg, 1.0)), 0.0)
    return inv[:, None] * a * inv[None, :]


def dense_knn_sim(features: np.ndarray, k: int) -> np.ndarray:
    """Brute-force top-k cosine (self included), values / sqrt(r_i r_j) with row sums r."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    sim = unit @ unit.T
    keep = np.zeros_like(sim)
    for i in range(sim.shape[0]):
        top = np.argsort(-sim[i])[:k]
        keep[i, top] = sim[i, top]
    r = keep.sum(1)
    return keep / np.sqrt(np.outer(r, r)) * (keep != 0)


def lightgcn_mean(adj: np.ndarray, ego: torch.Tensor, layers: int) -> torch.Tensor:
    """mean_{l=0..L} A^l ego."""
    a = torch.from_numpy(adj)
    out, h = [ego], ego
    for _ in range(layers):
        h = a @ h
        out.append(h)
    return sum(out) / len(out)


def params64(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().double() for k, v in model.state_dict().items()}


def lin(p, name, x):
    """The linear layer ``name`` of a params64 dict applied to x."""
    return x @ p[f"{name}.weight"].T + (p[f"{name}.bias"] if f"{name}.bias" in p else 0.0)


def assert_graphs_from_training_only(tmp_path: Path, model_cls, graph_names, overrides: dict | None = None) -> None:
    """Build ``model_cls`` on both held-out variants: every named (sparse) graph must be identical."""
    built = [model_cls(config, dataset)
             for config, dataset in held_out_variants(tmp_path, model_cls.__name__, overrides)]
    for name in graph_names:
        first, second = (getattr(m, name).to_dense() for m in built)
        assert torch.equal(first, second), f"{model_cls.__name__}.{name} depends on valid/test interactions"


def model_factory(tmp_path: Path, model_cls, base: dict, **dataset_kw):
    """``build(**overrides)`` -> ``model_cls`` (weights after seed 0) on one tiny dataset loaded once, with
    ``base`` and then ``overrides`` on top of its yaml (one dataset per test: LMDB allows one open
    environment per path and process)."""
    name = model_cls.__name__
    _, dataset = tiny_setup(tmp_path, name, overrides=base, **dataset_kw)

    def build_model(**overrides):
        config = load_config(name, "toy", {"data_path": str(tmp_path), "cache_dir": str(tmp_path / "cache"),
                                           **base, **overrides})
        torch.manual_seed(0)
        return model_cls(config, dataset)

    return build_model


def dense_user_item(dataset) -> tuple[np.ndarray, torch.Tensor]:
    """(sym-normalised (U+I) x (U+I) training adjacency, its user-item block R as a tensor)."""
    adj = dense_sym_adjacency(dataset.train_matrix.toarray())
    return adj, torch.from_numpy(adj[:dataset.n_users, dataset.n_users:])


def mgcn_objective_ref(z, side, content, n_users: int, reg_weight: float, cl_weight: float,
                       temperature: float = 0.2, batch=BATCH, batch_size: int = 2048) -> torch.Tensor:
    """MGCN Eq. 13-14 (shared by SMORE): BPR + reg on Z, InfoNCE(side, content) on the batch's items and users."""
    nu, pos, users = n_users, batch["pos_items"], batch["users"]
    return (bpr_half_sq_ref(z[:nu], z[nu:], batch, reg_weight, batch_size)
            + cl_weight * (info_nce_ref(side[nu:][pos], content[nu:][pos], temperature)
                           + info_nce_ref(side[:nu][users], content[:nu][users], temperature)))


def loss_and_params64(tiny, model_cls, seed: int, **overrides) -> tuple:
    """(dataset, the model's summed loss on BATCH, its parameters in float64) for a dense-reference test."""
    model, dataset = build(tiny, model_cls, seed, **overrides)
    return dataset, sum(model.calculate_loss(BATCH).values()).item(), params64(model)
