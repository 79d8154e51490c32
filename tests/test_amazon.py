"""prepare amazon: raw Amazon 2014 files (written here in their exact formats) to an MMRec-format dataset."""
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_cli
from utils.amazon import hashing_encoder, item_text, k_core, prepare_amazon, read_meta

ROOT = Path(__file__).resolve().parent.parent
DIM = 4096


def _pairs():
    """(user, asin, time) in file order.  With k = 2: D and item t go first, then E and s lose their second
    interaction; A, B, C, G, H and items p, q, r, x1..x12 remain (the hand-computed 2-core)."""
    rows = [("A", "p", 1), ("A", "q", 2), ("A", "r", 3), ("B", "p", 1), ("B", "q", 2), ("C", "q", 1), ("C", "r", 2),
            ("C", "s", 3), ("D", "s", 1), ("E", "t", 1), ("E", "p", 2), ("A", "p", 9)]  # last: a duplicate
    for user in ("G", "H"):  # 15 interactions each: MMRec's rule gives 1 valid, 2 test, 12 train
        rows += [(user, a, 10 + j) for j, a in enumerate(["p", "q", "r"] + [f"x{k}" for k in range(1, 13)])]
    return rows


def _write_raw(folder: Path, image_asins=("p", "q", "s", "x1")):
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "reviews.json.gz", "wt") as fh:
        for user, asin, ts in _pairs():
            fh.write(json.dumps({"reviewerID": user, "asin": asin, "overall": 4.0, "unixReviewTime": ts,
                                 "reviewText": "fine"}) + "\n")
    metas = {"p": {"asin": "p", "title": "Soft blanket", "brand": "Acme", "categories": [["Baby", "Bedding"]],
                   "description": "warm"},
             "q": {"asin": "q", "title": "Bottle", "categories": [["Baby"]], "price": 3.5},
             "r": {"asin": "r", "title": "Rattle", "description": "It's loud"},
             "s": {"asin": "s", "title": "Not kept"}}
    with gzip.open(folder / "meta.json.gz", "wt") as fh:
        for rec in metas.values():
            fh.write(repr(rec) + "\n")  # Python dict literals, not JSON (single quotes)
    vectors = {}
    with open(folder / "images.b", "wb") as fh:
        for j, asin in enumerate(image_asins):
            vec = np.arange(DIM, dtype="<f4") * (j + 1)
            vectors[asin] = vec
            fh.write(asin.ljust(10).encode("ascii"))
            fh.write(vec.tobytes())
    return vectors


def test_k_core_reaches_the_fixed_point():
    u = np.array([0, 0, 1, 1, 2, 3, 3])
    i = np.array([0, 1, 0, 1, 1, 2, 0])
    # k=2: user 2 (one interaction) and item 2 (one) go; then user 3 keeps one interaction and goes too
    assert k_core(u, i, 2).tolist() == [True, True, True, True, False, False, False]


def test_prepare_amazon_matches_the_hand_computed_dataset(tmp_path):
    vectors = _write_raw(tmp_path / "raw")
    encoder_calls = []

    def stand_in(texts):
        encoder_calls.append(list(texts))
        return np.array([[len(t), len(t.split())] for t in texts], dtype=np.float32)

    out = tmp_path / "data" / "amz"
    report = prepare_amazon(tmp_path / "raw" / "reviews.json.gz", tmp_path / "raw" / "meta.json.gz",
                            tmp_path / "raw" / "images.b", out, stand_in, k=2, split_seed=7)
    users = [line.split("\t")[0] for line in (out / "u_id_mapping.csv").read_text().splitlines()[1:]]
    items = [line.split("\t")[0] for line in (out / "i_id_mapping.csv").read_text().splitlines()[1:]]
    assert users == ["A", "B", "C", "G", "H"]                       # first appearance among the kept
    assert items == ["p", "q", "r"] + [f"x{k}" for k in range(1, 13)]
    assert report["duplicate_pairs_dropped"] == 1 and report["interactions"] == 7 + 30
    inter = np.loadtxt(out / "amz.inter", skiprows=1, dtype=np.int64)
    per_user = {u: inter[inter[:, 0] == u] for u in range(5)}
    assert sorted(per_user[0][:, 1].tolist()) == [0, 1, 2] and per_user[0][per_user[0][:, 1] == 0][0, 3] == 1
    for u, (n_valid, n_test) in {0: (1, 1), 1: (1, 1), 2: (1, 1), 3: (1, 2), 4: (1, 2)}.items():
        labels = per_user[u][:, 4]
        assert (labels == 1).sum() == n_valid and (labels == 2).sum() == n_test, u
    image = np.load(out / "image_feat.npy")
    assert image.shape == (15, DIM) and report["items_without_image"] == 12
    np.testing.assert_array_equal(image[0], vectors["p"])
    np.testing.assert_array_equal(image[13 - 10], vectors["x1"])
    np.testing.assert_allclose(image[2], (vectors["p"] + vectors["q"] + vectors["x1"]) / 3)  # r: the mean
    texts = encoder_calls[0]
    assert texts[0] == "Soft blanket Acme Baby Bedding warm" and texts[2] == "Rattle It's loud" and texts[4] == ""
    assert report["items_without_meta"] == 12
    np.testing.assert_array_equal(np.load(out / "text_feat.npy")[1], [len("Bottle Baby"), 2])
    assert "text_feature_file: text_feat.npy" in (out / "amz.yaml").read_text()
    none = prepare_amazon(tmp_path / "raw" / "reviews.json.gz", None, None, tmp_path / "data" / "amz2", None, k=2)
    assert "text_feature_file: null" in (tmp_path / "data" / "amz2" / "amz2.yaml").read_text()
    assert not (tmp_path / "data" / "amz2" / "text_feat.npy").exists() and none["users"] == 5


def test_meta_lines_are_parsed_without_eval(tmp_path):
    path = tmp_path / "meta.json.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(repr({"asin": "a", "title": "ok"}) + "\n")
        fh.write("__import__('os').system('echo pwned')\n")
    with pytest.raises(ValueError, match="line 2: neither a Python dict literal nor JSON"):
        list(read_meta(path, {"a"}))
    assert item_text({"title": "T", "categories": [["A", "B"], ["C"]]}) == "T A B C"


def test_prepare_amazon_command_ends_with_a_passing_check(tmp_path):
    _write_raw(tmp_path / "raw")
    raw = tmp_path / "raw"
    res = run_cli("prepare", "amazon", "--reviews", raw / "reviews.json.gz", "--meta", raw / "meta.json.gz",
                  "--image-features", raw / "images.b", "--out", tmp_path / "data" / "amz_cli", "--k-core", "2",
                  "--text-model", "hash:8")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "users=5" in res.stdout and "OK: usable" in res.stdout
    assert not (ROOT / "configs" / "dataset" / "amz_cli.yaml").exists()  # default file names: nothing written
    assert np.load(tmp_path / "data" / "amz_cli" / "text_feat.npy").shape == (15, 8)
    vec = hashing_encoder(8)(["a b", ""])
    assert vec[0].sum() > 0 and np.linalg.norm(vec[0]) == pytest.approx(1.0) and not vec[1].any()


def test_minilm_text_features_from_a_local_model_folder(tmp_path):
    """The offline MiniLM package (MMRec's 384-d text encoder): a local folder, so no network is tried."""
    minilm = pytest.importorskip("all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    from utils.amazon import text_encoder

    folder = minilm.extract_model(str(tmp_path))
    vecs = text_encoder(str(folder))(["baby bottle with a soft nipple", "feeding bottle for infants",
                                      "steel hammer for nails"])
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    assert unit[0] @ unit[1] > unit[0] @ unit[2] + 0.2
