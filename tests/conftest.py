"""Shared test fixtures: tiny MMRec-format datasets written into a temporary folder."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import utils.synth  # noqa: E402,F401  (registers the synthetic presets, as main.py does)
from mmrec.config import load_config  # noqa: E402
from mmrec.data import RecDataset  # noqa: E402

torch.set_num_threads(1)


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


@pytest.fixture
def tiny(tmp_path):
    """Factory fixture: ``tiny(model, **kw)`` -> (config, dataset)."""
    return lambda model, **kw: tiny_setup(tmp_path, model, **kw)
