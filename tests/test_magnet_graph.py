"""MAGNET graph side: templates (Eqs. 12-15), candidate scores and E+ (Eqs. 1-3) against brute force,
no leakage from valid/test, the cache, the augmented view's normalisation and fanout sampling."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from mmrec import graph
from mmrec.config import load_config
from mmrec.data import RecDataset
from models.magnet_graph import (augmented_matrix, build_induced_edges, cached_induced_edges,
                                 config_induced_edges, group_order, template_pool)
from tests.helpers import random_interactions, write_dataset

PINNED = np.array([  # MAGNET.md section 4, (alpha, beta, delta, eps) = (.6, .2, .5, .05), global
    [.8, .1, .1], [.1, .8, .1], [.1, .1, .8],
    [.3667, .3167, .3167], [.3167, .3667, .3167], [.3167, .3167, .3667],
    [.05, .475, .475], [.475, .05, .475], [.475, .475, .05]])


def test_template_pool_pinned_matrix():
    w, names = template_pool(0.6, 0.2, 0.5, 0.05)
    assert names == ["Dom-B", "Dom-A", "Dom-S", "Bal-B", "Bal-A", "Bal-S", "Com-B", "Com-A", "Com-S"]
    np.testing.assert_allclose(w, PINNED, atol=5e-5)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)


@pytest.mark.parametrize("aux_order", ["global", "cyclic"])
def test_templates_sum_to_one_and_anchor(aux_order):
    alpha, beta, delta, eps = 0.7, 0.3, 0.8, 0.05
    w, _ = template_pool(alpha, beta, delta, eps, aux_order)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
    for g, group in enumerate("BAS"):
        order = group_order(group, aux_order)
        anchor, aux1, aux2 = ("BAS".index(m) for m in order)
        dom, bal, com = w[g], w[3 + g], w[6 + g]
        assert dom[anchor] == pytest.approx((1 - alpha) / 2 + alpha)           # Eq. 12
        assert bal[anchor] == pytest.approx(1 / 3 + beta / 6)                   # Eq. 13
        assert com[anchor] == pytest.approx(eps)                                # Eq. 14
        assert com[aux1] == pytest.approx((1 - eps) * delta)                    # delta -> aux1
        assert com[aux2] == pytest.approx((1 - eps) * (1 - delta))
    assert group_order("A", "cyclic") == ["A", "S", "B"] and group_order("S", "cyclic") == ["S", "B", "A"]
    assert group_order("A", "global") == ["A", "B", "S"]


def test_families_and_replicas():
    w, names = template_pool(0.6, 0.2, 0.5, 0.05, families=["bal"], replicas=2)
    assert w.shape == (6, 3) and names[:2] == ["Bal-B#0", "Bal-B#1"]
    np.testing.assert_array_equal(w[0], w[1])


# ----------------------------------------------------------------------------------------------
def _cos(x):
    n = x / np.linalg.norm(x, axis=1, keepdims=True)
    return n @ n.T


def _knn(x, k):
    c = _cos(x)
    np.fill_diagonal(c, -np.inf)
    idx = np.argsort(-c, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(c, idx, 1).astype(np.float32)


def _brute_force(train, feats, k, r, mode, gamma=0.0):
    """Eq. 2 / Eq. 3 by explicit loops over users, history items and candidates (gamma: candidates ranked by
    c(u, j) / (1 + deg(j))^gamma, the kept edges carrying c(u, j))."""
    deg = np.asarray(train.sum(axis=0)).ravel()
    cos = [_cos(f) for f in feats]
    lists = [_knn(f, k)[0] for f in feats]
    out = {}
    for u in range(train.shape[0]):
        hist = set(train[u].indices.tolist())
        pool = set()
        for i in hist:
            for idx in lists:
                pool |= set(idx[i].tolist())
        pool -= hist
        scores = {}
        for j in pool:
            c = 0.0
            for i in hist:
                for m in range(len(feats)):
                    if mode == "pool_dense" or j in lists[m][i]:
                        c += cos[m][i, j] / 2
            scores[j] = c
        best = sorted(scores, key=lambda j: (-scores[j] / (1 + deg[j]) ** gamma, j))[:r]
        out[u] = {j: scores[j] for j in best}
    return out


@pytest.mark.parametrize("mode,gamma", [("pool_dense", 0.0), ("topk_sparse", 0.0), ("pool_dense", 1.0)])
def test_induced_edges_match_brute_force(mode, gamma):
    rng = np.random.default_rng(3)
    n_users, n_items, k, r = 9, 14, 3, 5
    dense = (rng.random((n_users, n_items)) < 0.2).astype(np.float32)
    dense[:, 0] = 0
    dense[np.arange(n_users), rng.integers(1, n_items, n_users)] = 1
    dense[8] = 0  # a user without training history gets no induced edge
    train = sp.csr_matrix(dense)
    feats = [rng.normal(size=(n_items, 6)), rng.normal(size=(n_items, 4))]
    lists = [_knn(f, k) for f in feats]
    got = build_induced_edges(train, [a for a, _ in lists], [b for _, b in lists], feats, r, mode, block_users=4,
                              popularity_discount=gamma)
    want = _brute_force(train, feats, k, r, mode, gamma)
    for u in range(n_users):
        sel = got["users"] == u
        got_u = dict(zip(got["items"][sel].tolist(), got["scores"][sel].tolist()))
        assert set(got_u) == set(want[u]), u
        for j, c in want[u].items():
            assert got_u[j] == pytest.approx(c, abs=1e-5)
        assert not (set(got_u) & set(train[u].indices.tolist()))  # never a training positive
    assert got["pool_sizes"][8] == 0
    assert (got["pool_sizes"] >= np.bincount(got["users"], minlength=n_users)).all()


def test_topk_sparse_is_the_sparse_product():
    rng = np.random.default_rng(5)
    train = sp.csr_matrix((rng.random((6, 12)) < 0.3).astype(np.float32))
    feats = [rng.normal(size=(12, 5)), rng.normal(size=(12, 3))]
    lists = [_knn(f, 4) for f in feats]
    got = build_induced_edges(train, [a for a, _ in lists], [b for _, b in lists], feats, 100, "topk_sparse")
    s_avg = sum(graph.knn_matrix(i, v, 12, "raw") for i, v in lists) / 2
    c = (train @ s_avg).toarray()
    np.testing.assert_allclose(got["scores"], c[got["users"], got["items"]], atol=1e-5)


def _dataset(tmp_path, name, labels_seed):
    users, items, labels = random_interactions(25, 18, per_user=6, seed=0)
    rng = np.random.default_rng(labels_seed)
    test_items = labels == 2  # re-draw the valid / test items only
    for pos in np.flatnonzero(labels > 0):
        taken = set(items[(users == users[pos])].tolist())
        choices = [j for j in range(18) if j not in taken]
        items[pos] = rng.choice(choices)
    assert test_items.any()
    feat_rng = np.random.default_rng(1)
    write_dataset(tmp_path, name, users, items, labels, feat_rng.normal(size=(18, 8)), feat_rng.normal(size=(18, 5)))
    cfg = load_config("MAGNET", name, {"data_path": str(tmp_path), "cache_dir": str(tmp_path / f"cache_{name}")})
    return RecDataset(cfg)


def test_induced_edges_ignore_valid_and_test(tmp_path):
    a = _dataset(tmp_path, "toy_a", 11)
    b = _dataset(tmp_path, "toy_b", 12)
    assert (a.test_matrix != b.test_matrix).nnz > 0 and (a.train_matrix != b.train_matrix).nnz == 0
    ea, eb = cached_induced_edges(a, 3, 6, "pool_dense"), cached_induced_edges(b, 3, 6, "pool_dense")
    for key in ("users", "items", "scores"):
        np.testing.assert_array_equal(ea[key], eb[key])


def test_cache_reused_and_keyed(tmp_path):
    ds = _dataset(tmp_path, "toy_c", 11)
    first = cached_induced_edges(ds, 3, 6, "pool_dense")
    misses = ds.cache.misses
    again = cached_induced_edges(ds, 3, 6, "pool_dense")
    assert ds.cache.misses == misses and ds.cache.hits >= 1
    np.testing.assert_array_equal(first["items"], again["items"])
    cached_induced_edges(ds, 3, 4, "pool_dense")  # another r is another entry
    assert ds.cache.misses == misses + 1


def test_induced_edges_on_similarity_features(tmp_path):
    """similarity_whitening / similarity_smoothing: E+ is Eqs. 1-3 on the transformed features (lists and
    candidate scores alike), cached apart from the raw one; config_induced_edges reads both keys."""
    ds = _dataset(tmp_path, "toy_w", 11)
    got = cached_induced_edges(ds, 3, 6, "pool_dense", whitening_dim=4, smoothing_k=2)
    feats = [graph.similarity_features(ds, m, 4, 2) for m in ("v", "t")]
    lists = [graph.cosine_topk(f, 3, include_self=False) for f in feats]
    want = build_induced_edges(ds.train_matrix, [a for a, _ in lists], [b for _, b in lists], feats, 6)
    for key in ("users", "items", "scores"):
        np.testing.assert_array_equal(got[key], want[key])
    raw = cached_induced_edges(ds, 3, 6, "pool_dense")
    assert not np.array_equal(raw["items"], got["items"])
    cfg = {"knn_k": 3, "expansion_r": 6, "candidate_score": "pool_dense", "similarity_whitening": 4,
           "similarity_smoothing": 2}
    np.testing.assert_array_equal(config_induced_edges(ds, cfg)["items"], got["items"])


def test_augmented_view_normalisation():
    train = sp.csr_matrix(np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32))
    induced = {"users": np.array([0, 1]), "items": np.array([2, 2]), "scores": np.array([2.0, 1.0])}
    adj = graph.norm_adjacency(augmented_matrix(train, induced, "binary"), "sym").toarray()
    # user 0: items {0, 2} (degree 2); item 2: users {0, 1} (degree 2)
    assert adj[0, 2 + 2] == pytest.approx(1 / np.sqrt(2 * 2))
    assert adj[0, 2 + 0] == pytest.approx(1 / np.sqrt(2 * 1))
    scored = augmented_matrix(train, induced, "score").toarray()
    np.testing.assert_allclose(scored, [[1, 0, 1], [0, 1, 1]])
    # induced_edge_scale: induced edges weigh 0.25, observed ones stay 1
    light = augmented_matrix(train, induced, "binary", scale=0.25)
    np.testing.assert_allclose(light.toarray(), [[1, 0, 0.25], [0, 1, 0.25]])
    adj = graph.norm_adjacency(light, "sym").toarray()  # user 0 degree 1.25, item 2 degree 0.5
    assert adj[0, 2 + 2] == pytest.approx(0.25 / np.sqrt(1.25 * 0.5))
