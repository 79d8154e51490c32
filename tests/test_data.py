"""Loading, both split modes, cold-start filtering, the negative sampler and every bad-input error."""
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrec.config import load_config
from mmrec.data import DataError, NegativeSampler, RecDataset, TrainBatches, mmrec_split_labels
from tests.helpers import random_interactions, write_dataset


def _config(tmp_path, model="FREEDOM", **sets):
    """A content model's config (its dataset loads and checks the feature files; BPR's would not)."""
    base = {"data_path": str(tmp_path), "cache_dir": ""}
    base.update(sets)
    return load_config(model, "toy", base)


def _write(tmp_path, users, items, labels, n_items=None, v=None, t=None):
    n_items = n_items or int(max(items)) + 1
    rng = np.random.default_rng(0)
    v = rng.normal(size=(n_items, 4)) if v is None else v
    t = rng.normal(size=(n_items, 3)) if t is None else t
    write_dataset(tmp_path, "toy", users, items, labels, v, t)


def test_x_label_split_and_cold_start_filter(tmp_path):
    # user 2 has no training interaction: its valid/test rows are dropped; item 5 only in test stays rankable
    users = [0, 0, 0, 1, 1, 1, 2, 2]
    items = [0, 1, 2, 1, 3, 5, 4, 0]
    labels = [0, 1, 2, 0, 0, 2, 1, 2]
    _write(tmp_path, users, items, labels)
    ds = RecDataset(_config(tmp_path))
    assert (ds.n_users, ds.n_items) == (3, 6)
    assert ds.train_matrix.nnz == 3 and ds.valid_matrix.nnz == 1 and ds.test_matrix.nnz == 2
    assert ds.valid_matrix[2].nnz == 0 and ds.test_matrix[2].nnz == 0
    assert ds.test_matrix[1, 5] == 1
    keep = RecDataset(_config(tmp_path, filter_out_cod_start_users=False))
    assert keep.test_matrix[2, 0] == 1


def test_random_split_follows_mmrec_rule_and_is_disjoint(tmp_path):
    rng = np.random.default_rng(1)
    counts = [5, 9, 10, 14, 23, 40]
    users = np.repeat(np.arange(len(counts)), counts)
    items = np.concatenate([rng.choice(60, c, replace=False) for c in counts])
    labels = mmrec_split_labels(users, seed=3)
    for u, n in enumerate(counts):
        lab = labels[users == u]
        n_vt = 2 if n < 10 else int(np.floor(0.2 * n))
        n_v = 1 if n < 10 else n_vt // 2
        assert (lab == 1).sum() == n_v and (lab == 2).sum() == n_vt - n_v and (lab == 0).sum() == n - n_vt
    assert not np.array_equal(labels, mmrec_split_labels(users, seed=4))
    assert np.array_equal(labels, mmrec_split_labels(users, seed=3))
    _write(tmp_path, users, items, np.zeros_like(users), n_items=60)
    ds = RecDataset(_config(tmp_path, split="random", split_seed=3))
    tr, va, te = ds.train_matrix, ds.valid_matrix, ds.test_matrix
    assert tr.multiply(va).nnz == 0 and tr.multiply(te).nnz == 0 and va.multiply(te).nnz == 0
    assert tr.nnz + va.nnz + te.nnz == len(users)
    assert (np.diff(va.indptr) >= 1).all() and (np.diff(te.indptr) >= 1).all()


def test_negative_sampler_never_returns_a_training_positive():
    rng = np.random.default_rng(0)
    n_users, n_items = 50, 12
    users = np.repeat(np.arange(n_users), 10)  # each user owns 10 of the 12 items: hard rejection case
    items = np.concatenate([rng.choice(n_items, 10, replace=False) for _ in range(n_users)])
    sampler = NegativeSampler(users, items, n_items)
    owned = {(u, i) for u, i in zip(users, items)}
    g = torch.Generator().manual_seed(0)
    q = torch.from_numpy(users)
    neg = sampler.sample(q, g)
    assert all((int(u), int(j)) not in owned for u, j in zip(q, neg))
    # only items that occur in training are candidates
    assert set(neg.tolist()) <= set(items.tolist())


def test_train_batches_reproducible_and_cover_all_interactions(tmp_path):
    users, items, labels = random_interactions(20, 15)
    _write(tmp_path, users, items, labels)
    ds = RecDataset(_config(tmp_path))
    a = TrainBatches(ds, 16, seed=5)
    b = TrainBatches(ds, 16, seed=5)
    ea, eb = list(a.epoch()), list(b.epoch())
    for x, y in zip(ea, eb):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert sum(len(x["users"]) for x in ea) == ds.n_train
    assert len(ea[-1]["users"]) == ds.n_train % 16 or ds.n_train % 16 == 0
    pairs = sorted(zip(torch.cat([x["users"] for x in ea]).tolist(), torch.cat([x["pos_items"] for x in ea]).tolist()))
    assert pairs == sorted(zip(ds.train_users.tolist(), ds.train_items.tolist()))
    # a second epoch is a different order; state round-trips
    state = a.state_dict()
    nxt = list(a.epoch())
    b.load_state_dict(state)
    assert torch.equal(nxt[0]["neg_items"], list(b.epoch())[0]["neg_items"])


@pytest.mark.parametrize("case, fragment", [
    ("missing_column", "missing column 'x_label'"),
    ("non_integer", "column 'itemID' row 3"),
    ("bad_label", "x_label must be 0 (train), 1 (valid) or 2 (test)"),
    ("feature_rows", "rows but the interaction file has"),
    ("nan_feature", "NaN or infinite"),
    ("duplicate", "duplicate (user, item) rows"),
    ("empty", "is empty: expected a header line"),
])
def test_bad_input_errors_name_file_and_problem(tmp_path, case, fragment):
    d = tmp_path / "toy"
    d.mkdir()
    rows = ["0\t0\t5\t1\t0", "0\t1\t5\t1\t1", "0\t2\t5\t1\t2", "1\t0\t5\t1\t0", "1\t1\t5\t1\t1", "1\t2\t5\t1\t2"]
    header = "userID\titemID\trating\ttimestamp\tx_label"
    v = np.ones((3, 4), np.float32)
    if case == "missing_column":
        header = "userID\titemID\trating\ttimestamp"
        rows = [r.rsplit("\t", 1)[0] for r in rows]
    elif case == "non_integer":
        rows[1] = "0\tabc\t5\t1\t1"
    elif case == "bad_label":
        rows[2] = "0\t2\t5\t1\t7"
    elif case == "feature_rows":
        v = np.ones((5, 4), np.float32)
    elif case == "nan_feature":
        v[1, 2] = np.nan
    elif case == "duplicate":
        rows.append("0\t0\t5\t2\t0")
    elif case == "empty":
        header, rows = "", []
    (d / "toy.inter").write_text(header + "\n" + "\n".join(rows) + "\n")
    np.save(d / "image_feat.npy", v)
    np.save(d / "text_feat.npy", np.ones((3, 2), np.float32))
    with pytest.raises(DataError) as err:
        RecDataset(_config(tmp_path))
    msg = str(err.value)
    assert fragment in msg
    assert str(d) in msg and "\n" not in msg


def test_missing_amazon_dataset_names_path_files_and_drive(tmp_path):
    cfg = load_config("BPR", "baby", {"data_path": str(tmp_path)})
    with pytest.raises(DataError) as err:
        RecDataset(cfg)
    msg = str(err.value)
    assert str(tmp_path / "baby") in msg and "baby.inter" in msg and "image_feat.npy" in msg
    assert "drive.google.com" in msg


def test_id_only_models_run_on_a_dataset_without_feature_files(tmp_path):
    """LightGCN and BPR declare uses_features = False: no feature file needed or loaded; a content model
    on the same folder still stops with the missing file named."""
    from mmrec.trainer import Trainer
    from models.lightgcn import LightGCN
    from tests.helpers import random_interactions, write_dataset

    users, items, labels = random_interactions(30, 20, seed=0)
    rng = np.random.default_rng(1)
    folder = write_dataset(tmp_path, "idonly", users, items, labels, rng.normal(size=(20, 4)),
                           rng.normal(size=(20, 4)))
    for f in ("image_feat.npy", "text_feat.npy"):
        (Path(folder) / f).unlink()
    sets = {"data_path": str(tmp_path), "cache_dir": str(tmp_path / "cache"), "epochs": 1, "num_threads": 1}
    config = load_config("LightGCN", "idonly", sets)
    dataset = RecDataset(config)
    assert dataset.features == {}
    fit = Trainer(config, LightGCN(config, dataset), dataset, None).fit()
    assert fit["epochs_run"] == 1 and "recall@20" in fit["valid"]
    with pytest.raises(DataError, match="image_feat.npy"):
        RecDataset(load_config("FREEDOM", "idonly", sets))


def test_an_unknown_dataset_name_lists_what_exists(tmp_path):
    for name in ("books", "toys"):
        (tmp_path / name).mkdir()
    with pytest.raises(DataError) as err:
        RecDataset(_config(tmp_path, dataset="bookz"))
    msg = str(err.value)
    assert "books, toys" in msg and "mini" in msg and "baby" in msg


def test_check_lists_every_problem_in_one_run(tmp_path):
    """`check` on corrupted copies of a generated dataset: each problem reported, all at once, exit 2."""
    import shutil

    from tests.helpers import run_cli

    def check(name):
        return run_cli("check", "-d", name, "--set", f"data_path={tmp_path}")

    ok = check("tiny")  # generated on first use
    assert ok.returncode == 0 and "OK: usable" in ok.stdout and "users 200" in ok.stdout, ok.stdout + ok.stderr
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "tiny", bad)
    (bad / "tiny.inter").rename(bad / "bad.inter")
    lines = (bad / "bad.inter").read_text().splitlines()
    header, rows = lines[0], [r.split("\t") for r in lines[1:]]
    train = [r for r in rows if r[4] == "0"]
    test = [r for r in rows if r[4] == "2"]
    rows[5][4] = "3"                                   # x_label 3
    rows.append(list(train[0]))                        # a duplicated training pair
    rows.append(train[1][:4] + ["2"])                  # the same pair in train and test
    (bad / "bad.inter").write_text("\n".join([header] + ["\t".join(r) for r in rows]) + "\n")
    image = np.load(bad / "image_feat.npy")
    np.save(bad / "image_feat.npy", image[:-1])        # one row short
    text = np.load(bad / "text_feat.npy")
    text[7, 3] = np.nan
    np.save(bad / "text_feat.npy", text)
    res = check("bad")
    out = res.stdout
    assert res.returncode == 2 and "5 problem(s)" in out, out
    for needle in ("outside 0/1/2", "duplicate (user, item) rows", "appear in both train and test",
                   "119 rows but the interaction file has 120 items", "NaN or infinite values, first row 7"):
        assert needle in out, needle
    assert len(test) > 0
    (bad / "bad.inter").write_text("user\titemID\trating\ttimestamp\tx_label\n0\t1\t5\t0\t0\n")
    res = check("bad")
    assert res.returncode == 2 and "missing column 'userID'" in res.stdout and "Traceback" not in res.stderr


def test_the_core_imports_no_utility_and_no_model_module():
    """Layering: nothing under mmrec/ imports utils/ or models/ (the registry finds models by name)."""
    import ast

    root = Path(__file__).resolve().parent.parent
    offenders = []
    for path in (root / "mmrec").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(root)}: {n}" for n in names
                          if n.split(".")[0] in ("utils", "models") and not (path.name == "registry.py" and n == "models")]
    assert offenders == []


def test_the_loader_only_loads_and_the_generator_is_called_before_it(tmp_path):
    """A synthetic preset that is not there: RecDataset says how to make it; ensure_generated makes it."""
    from mmrec.data.sources import ensure_generated

    config = load_config("BPR", "tiny", {"data_path": str(tmp_path), "cache_dir": str(tmp_path / "cache")})
    with pytest.raises(DataError, match=r"'tiny' is a synthetic preset: `python main.py prepare tiny`"):
        RecDataset(config)
    assert not (tmp_path / "tiny").exists()  # loading generated nothing
    assert ensure_generated(config) == tmp_path / "tiny"
    assert RecDataset(config).n_users == 200
    own = load_config("BPR", "toy", {"data_path": str(tmp_path)})
    assert ensure_generated(own) is None  # not a registered name: nothing to generate
