"""GUME: intersection graph vs brute force, augmented adjacency, loss parts by hand, no leakage."""
from __future__ import annotations

import math

import numpy as np
import torch

from tests.helpers import assert_graphs_from_training_only, info_nce_ref, tiny_setup
from models.gume import GUME, knn_intersection_edges


def _reference_walk(image_idx: np.ndarray, text_idx: np.ndarray, group: int = 10) -> set[tuple[int, int]]:
    """The reference's loop, restated: walk the flattened lists, intersect every `group` entries."""
    n, k = image_idx.shape
    flat_rows = np.repeat(np.arange(n), k)
    inter: dict[int, list[int]] = {}
    img, txt = [], []
    for j in range(n * k):
        img.append(int(image_idx.reshape(-1)[j]))
        txt.append(int(text_idx.reshape(-1)[j]))
        if len(img) == group:
            item = int(flat_rows[j])
            inter[item] = [v for v in set(img) & set(txt) if v != item]
            img, txt = [], []
    return {(i, v) for i, vs in inter.items() for v in vs}


def _lists(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pool = min(n, 2 * k)  # small pool: many overlaps
    img = np.stack([np.r_[i, rng.choice(np.setdiff1d(np.arange(pool), [i]), k - 1, replace=False)] for i in range(n)])
    txt = np.stack([np.r_[i, rng.choice(np.setdiff1d(np.arange(pool), [i]), k - 1, replace=False)] for i in range(n)])
    return img, txt


def test_intersection_per_row_matches_brute_force():
    img, txt = _lists(40, 10, seed=1)
    rows, cols = knn_intersection_edges(img, txt, group=0)
    brute = {(i, v) for i in range(40) for v in set(img[i]) & set(txt[i]) if v != i}
    assert set(zip(rows.tolist(), cols.tolist())) == brute
    assert len(brute) > 40  # the example is not trivial
    # with k = 10 the reference's groups of 10 are exactly the rows
    rows10, cols10 = knn_intersection_edges(img, txt, group=10)
    assert set(zip(rows10.tolist(), cols10.tolist())) == brute == _reference_walk(img, txt)


def test_intersection_reference_walk_when_k_is_not_10():
    for k in (5, 7, 20):
        img, txt = _lists(23, k, seed=k)
        rows, cols = knn_intersection_edges(img, txt, group=10)
        assert set(zip(rows.tolist(), cols.tolist())) == _reference_walk(img, txt), k


def test_augmented_adjacency_matches_dense():
    rng = np.random.default_rng(0)
    y = (rng.random((6, 5)) < 0.4).astype(np.float32)
    y[0, 0] = 1.0
    rows, cols = np.array([0, 0, 3]), np.array([1, 2, 0])  # directed item -> item edges
    adj = GUME.augmented_adjacency(y, rows, cols, 5).toarray()
    a = np.zeros((11, 11))
    a[:6, 6:], a[6:, :6] = y, y.T
    a[6 + rows, 6 + cols] = 1.0
    deg = a.sum(1)
    inv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-30)), 0.0)
    np.testing.assert_allclose(adj, inv[:, None] * a * inv[None, :], rtol=1e-6)


def test_shapes_and_gradients(tmp_path):
    config, dataset = tiny_setup(tmp_path, "GUME")
    model = GUME(config, dataset)
    batch = {"users": torch.tensor([0, 1, 2, 2]), "pos_items": torch.tensor([3, 4, 5, 6]),
             "neg_items": torch.tensor([7, 8, 9, 1])}
    parts = model.calculate_loss(batch)
    assert set(parts) == {"bpr", "reg", "vt", "bm", "um"}
    total = sum(parts.values())
    assert torch.isfinite(total)
    total.backward()
    for p in (model.user_embedding.weight, model.extended_image_user.weight, model.image_features,
              model.separate_coarse.query[0].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    model.eval()
    model.start_evaluation()
    scores = model.full_sort_predict({"users": torch.tensor([0, 5])})
    model.end_evaluation()
    assert scores.shape == (2, dataset.n_items)


def test_loss_parts_by_hand(tmp_path):
    config, dataset = tiny_setup(tmp_path, "GUME", overrides={"vt_loss": 0.3, "um_loss": 0.2, "bm_loss": 0.1})
    model = GUME(config, dataset)
    users, pos, neg = torch.tensor([0, 1, 4]), torch.tensor([2, 3, 4]), torch.tensor([5, 6, 0])
    torch.manual_seed(7)
    parts = model.calculate_loss({"users": users, "pos_items": pos, "neg_items": neg})
    with torch.no_grad():
        out = model.forward()
        nu, b = dataset.n_users, 2048
        z = out["final"]
        u, p, n = z[users], z[nu + pos], z[nu + neg]
        bpr = torch.log(1 + torch.exp(-((u * p).sum(1) - (u * n).sum(1)))).mean()
        reg = 1e-5 * 0.5 * (u.pow(2).sum() + p.pow(2).sum() + n.pow(2).sum()) / b
        reg += 0.1 * 0.5 * out["extended_modal"][nu + pos].pow(2).sum() / b
        x, y = out["explicit_image"].flatten(), out["explicit_text"].flatten()
        var = lambda t: ((t - t.mean()) ** 2).sum() / (t.numel() - 1)  # noqa: E731
        vt = 0.3 * ((var(x) - var(y)).abs() + (x.mean() - y.mean()).abs())
        integ, cid, modal = out["integration"], out["extended_id"], out["extended_modal"]
        bm = 0.1 * (info_nce_ref(integ[users], cid[users], 0.4) + info_nce_ref(integ[nu + pos], cid[nu + pos], 0.4))

        torch.manual_seed(7)  # the same four noise draws, in the reference's order

        def perturb(e):
            noise = torch.rand_like(e)
            return e + torch.sign(e) * noise / noise.norm(dim=1, keepdim=True) * 0.1

        iu, mu = integ[:nu], modal[:nu]
        i1, i2 = perturb(iu), perturb(iu)
        m1, m2 = perturb(mu), perturb(mu)
        um = 0.2 * (info_nce_ref(mu[users], iu[users], 0.1) + info_nce_ref(i1[users], i2[users], 0.1) + info_nce_ref(m1[users], m2[users], 0.1))
    for name, value in {"bpr": bpr, "reg": reg, "vt": vt, "bm": bm, "um": um}.items():
        assert math.isclose(float(parts[name].detach()), float(value), rel_tol=1e-4, abs_tol=1e-9), name


def test_graphs_use_training_split_only(tmp_path):
    assert_graphs_from_training_only(tmp_path, GUME, ("norm_adj_aug", "R", "image_graph", "text_graph"))

def test_intersection_follows_the_runs_similarity_features(tmp_path):
    """The cached S_int is keyed by the similarity features: a whitened run after a raw one (same cache)
    intersects its own whitened lists, not the raw run's."""
    def edges(overrides):
        cfg, ds = tiny_setup(tmp_path, "GUME", n_items=40, overrides={"knn_k": 5, **overrides})
        model = GUME(cfg, ds)
        image_idx, _ = model.item_knn_lists("v", 5)
        text_idx, _ = model.item_knn_lists("t", 5)
        want = knn_intersection_edges(image_idx, text_idx, model.intersection_group)
        got = model.intersection_edges(image_idx, text_idx)
        return {tuple(e) for e in np.stack(want, 1)}, {tuple(e) for e in np.stack(got, 1)}

    raw_want, raw_got = edges({})
    white_want, white_got = edges({"similarity_whitening": 4, "similarity_smoothing": 2})
    assert raw_got == raw_want and white_got == white_want
    assert white_want != raw_want  # the settings change the lists, so a shared key would be stale
