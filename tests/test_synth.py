import json

import numpy as np
import pytest

from utils import synth

N_USERS, N_ITEMS = 200, 120
KW = dict(image_dim=64, text_dim=32)


def _gen(root, seed=0, name="tiny"):
    return synth.generate(root, name, N_USERS, N_ITEMS, seed=seed, **KW)


def _inter(folder, name="tiny"):
    path = folder / f"{name}.inter"
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
    raw = np.loadtxt(path, dtype=np.int64, delimiter="\t", skiprows=1)
    return header, raw


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _gen(tmp_path_factory.mktemp("synth"))


def test_files_and_yaml(tiny):
    for f in ["tiny.inter", "image_feat.npy", "text_feat.npy", "tiny.yaml", "meta.json"]:
        assert (tiny / f).exists(), f
    y = (tiny / "tiny.yaml").read_text()
    for line in ["USER_ID_FIELD: userID", "ITEM_ID_FIELD: itemID", "inter_file_name: 'tiny.inter'",
                 "vision_feature_file: 'image_feat.npy'", "text_feature_file: 'text_feat.npy'",
                 "inter_splitting_label: x_label", 'field_separator: "\\t"']:
        assert line in y
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load(y)
    assert cfg["field_separator"] == "\t" and cfg["load_cols"] == ["userID", "itemID"]
    meta = json.loads((tiny / "meta.json").read_text())
    assert meta["version"] == synth.GENERATOR_VERSION and meta["seed"] == 0


def test_inter_format(tiny):
    header, raw = _inter(tiny)
    assert header == ["userID", "itemID", "rating", "timestamp", "x_label"]
    u, i, r, t, lab = raw.T
    assert u.min() == 0 and u.max() == N_USERS - 1 and len(np.unique(u)) == N_USERS
    assert i.min() >= 0 and i.max() < N_ITEMS
    assert (r == 5).all() and (t > 0).all() and set(np.unique(lab)) <= {0, 1, 2}
    # no duplicate pairs
    assert len(np.unique(u * N_ITEMS + i)) == len(u)
    # every user >= 5 interactions, every item occurs (in train)
    assert np.bincount(u).min() >= 5
    assert (np.bincount(i, minlength=N_ITEMS) > 0).all()
    assert (np.bincount(i[lab == 0], minlength=N_ITEMS) > 0).all()


def test_split_rule(tiny):
    _, raw = _inter(tiny)
    u, lab = raw[:, 0], raw[:, 4]
    n = np.bincount(u, minlength=N_USERS)
    nv = np.bincount(u[lab == 1], minlength=N_USERS)
    nt = np.bincount(u[lab == 2], minlength=N_USERS)
    n_vt = np.where(n < 10, 2, np.floor(0.2 * n).astype(int))
    assert (nv == n_vt // 2).all()
    assert (nt == n_vt - n_vt // 2).all()
    assert (nv >= 1).all() and (nt >= 1).all()
    assert (n >= 10).any()      # heavy-tailed activity: both branches of the rule are exercised


def test_split_labels_function():
    rng = np.random.default_rng(0)
    user = np.repeat(np.arange(4), [5, 9, 10, 23])
    lab = synth.split_labels(user, rng)
    counts = [np.bincount(lab[user == k], minlength=3).tolist() for k in range(4)]
    assert counts == [[3, 1, 1], [7, 1, 1], [8, 1, 1], [19, 2, 2]]


def test_features(tiny):
    img = np.load(tiny / "image_feat.npy")
    txt = np.load(tiny / "text_feat.npy")
    assert img.shape == (N_ITEMS, 64) and txt.shape == (N_ITEMS, 32)
    assert img.dtype == np.float32 and txt.dtype == np.float32
    assert np.isfinite(img).all() and np.isfinite(txt).all()
    assert (img >= 0).all()                                   # VGG-like, non-negative
    assert np.allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-4)


def test_determinism(tmp_path, tiny):
    a = _gen(tmp_path / "a")
    b = _gen(tmp_path / "b", seed=1)
    for f in ["tiny.inter", "image_feat.npy", "text_feat.npy"]:
        assert (a / f).read_bytes() == (tiny / f).read_bytes(), f
        assert (b / f).read_bytes() != (tiny / f).read_bytes(), f


def test_unknown_knob(tmp_path):
    with pytest.raises(TypeError):
        synth.generate(tmp_path, "x", 50, 40, not_a_knob=1)


def test_ensure_dataset_regenerates_only_on_change(tmp_path):
    folder = synth.ensure_dataset(tmp_path, "tiny")
    assert folder == tmp_path / "tiny"
    marker = folder / "marker"
    marker.write_text("x")
    assert synth.ensure_dataset(tmp_path, "tiny") == folder
    assert marker.exists()                                    # up to date: untouched
    meta = json.loads((folder / "meta.json").read_text())
    meta["version"] = -1
    (folder / "meta.json").write_text(json.dumps(meta))
    synth.ensure_dataset(tmp_path, "tiny")
    assert not marker.exists()                                # stale meta: regenerated
    assert json.loads((folder / "meta.json").read_text())["version"] == synth.GENERATOR_VERSION
    marker.write_text("x")
    (folder / "text_feat.npy").unlink()                       # missing file: regenerated
    synth.ensure_dataset(tmp_path, "tiny")
    assert not marker.exists() and (folder / "text_feat.npy").exists()
    with pytest.raises(KeyError):
        synth.ensure_dataset(tmp_path, "no_such_preset")


def test_a_preset_can_name_its_own_generator_seed(tmp_path, monkeypatch):
    """mid_synth and mid_synth_b (the confirmation sets) are drawn with seeds no other preset uses; --seed
    still overrides."""
    for confirm in ("mid_synth", "mid_synth_b"):
        assert synth.PRESETS[confirm]["seed"] not in {p.get("seed", 0) for n, p in synth.PRESETS.items()
                                                      if n != confirm}
    monkeypatch.setitem(synth.PRESETS, "tiny_seeded", dict(synth.PRESETS["tiny"], seed=7))
    folder = synth.ensure_dataset(tmp_path, "tiny_seeded")
    assert json.loads((folder / "meta.json").read_text())["seed"] == 7
    synth.main(["tiny_seeded", "--out", str(tmp_path / "cli"), "--seed", "3"])
    assert json.loads((tmp_path / "cli" / "tiny_seeded" / "meta.json").read_text())["seed"] == 3
    plain = synth.ensure_dataset(tmp_path / "plain", "tiny")
    assert json.loads((plain / "meta.json").read_text())["seed"] == 0
