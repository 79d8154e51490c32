"""The shared kNN primitives of mmrec/graph.py: every normalisation flavour on a 5-item example against a
hand computation, blocked top-k against one-shot and brute force, caching, and no leakage of
valid/test interactions into the user-item graphs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from mmrec import graph
from tests.helpers import held_out_variants, random_interactions, tiny_setup, write_dataset

# five items in the plane at these angles (degrees); cosine(i, j) = cos(angle_i - angle_j)
ANGLES = np.array([0.0, 50.0, 90.0, 200.0, 300.0])
FEATS = np.stack([np.cos(np.radians(ANGLES)), np.sin(np.radians(ANGLES))], axis=1) * \
    np.array([[1.0], [2.0], [0.5], [3.0], [1.5]])  # lengths differ: cosine must not depend on them
K = 2


def cos_deg(a: float) -> float:
    return math.cos(math.radians(a))


# top-2 lists (self included) worked out by hand from the angles:
#   0: 1 (cos 50 = 0.643) beats 4 (cos 60 = 0.5);   1: 2 (cos 40);   2: 1 (cos 40);
#   3: 4 (cos 100 = -0.174) beats 2 (cos 110), 1 (cos 150), 0 (cos 200);   4: 0 (cos 60 = 0.5)
HAND_NEIGHBOUR = {0: (1, cos_deg(50)), 1: (2, cos_deg(40)), 2: (1, cos_deg(40)), 3: (4, cos_deg(100)),
                  4: (0, cos_deg(60))}


def hand_dense(flavour: str, eps: float = 0.0) -> np.ndarray:
    """The 5 x 5 normalised kNN matrix written out from HAND_NEIGHBOUR."""
    raw = np.zeros((5, 5))
    for i, (j, c) in HAND_NEIGHBOUR.items():
        raw[i, i] = 1.0
        raw[i, j] = c
    if flavour == "raw":
        return raw
    if flavour == "bin":
        return (raw != 0) / (K + eps)  # row degree k on both sides
    r = raw.sum(axis=1)  # row sums of kept similarities
    out = raw / np.sqrt(np.outer(r, r)) * (raw != 0)
    if flavour == "sim_soil":
        out = np.where(raw != 0, np.maximum(out, 1e-7), 0.0)
    return out


def test_cosine_topk_matches_hand_lists():
    idx, val = graph.cosine_topk(FEATS, K, include_self=True)
    assert idx[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert idx[:, 1].tolist() == [HAND_NEIGHBOUR[i][0] for i in range(5)]
    np.testing.assert_allclose(val[:, 1], [HAND_NEIGHBOUR[i][1] for i in range(5)], atol=1e-6)
    idx_ns, _ = graph.cosine_topk(FEATS, K, include_self=False)
    assert all(i not in row for i, row in enumerate(idx_ns))
    assert idx_ns[:, 0].tolist() == [HAND_NEIGHBOUR[i][0] for i in range(5)]


@pytest.mark.parametrize("flavour", ["raw", "bin", "sim", "sim_soil"])
def test_knn_matrix_flavours_match_hand_computation(flavour):
    idx, val = graph.cosine_topk(FEATS, K, include_self=True)
    got = graph.knn_matrix(idx, val, 5, flavour).toarray()
    np.testing.assert_allclose(got, hand_dense(flavour), atol=1e-6)


def test_knn_bin_with_degree_eps_and_sim_example_entry():
    idx, val = graph.cosine_topk(FEATS, K, include_self=True)
    got = graph.knn_matrix(idx, val, 5, "bin", degree_eps=1e-7).toarray()
    np.testing.assert_allclose(got[got != 0], 1.0 / (2 + 1e-7), rtol=1e-7)
    # one entry in full: S[0, 1] = cos50 / sqrt((1 + cos50) (1 + cos40)); not symmetric
    sim = graph.knn_matrix(idx, val, 5, "sim").toarray()
    assert sim[0, 1] == pytest.approx(cos_deg(50) / math.sqrt((1 + cos_deg(50)) * (1 + cos_deg(40))), rel=1e-6)
    assert sim[1, 0] == 0.0
    # sim_soil clamps the negative entry of row 3 to 1e-7
    soil = graph.knn_matrix(idx, val, 5, "sim_soil").toarray()
    assert soil[3, 4] == pytest.approx(1e-7)


@pytest.mark.parametrize("include_self", [True, False])
def test_blocked_topk_equals_one_shot_and_brute_force(include_self):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(53, 7)).astype(np.float32)
    k = 6
    idx_block, val_block = graph.cosine_topk(x, k, include_self, block_size=5)
    idx_one, val_one = graph.cosine_topk(x, k, include_self, block_size=10_000)
    np.testing.assert_array_equal(idx_block, idx_one)
    np.testing.assert_allclose(val_block, val_one, atol=1e-6)
    # brute force in float64
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = unit.astype(np.float64) @ unit.T.astype(np.float64)
    if not include_self:
        np.fill_diagonal(sim, -np.inf)
    brute = np.argsort(-sim, axis=1)[:, :k]
    np.testing.assert_array_equal(np.sort(idx_block, axis=1), np.sort(brute, axis=1))
    np.testing.assert_allclose(val_block, np.take_along_axis(sim, idx_block, axis=1), atol=1e-5)


def test_knn_graph_uses_dataset_features_and_cache(tmp_path):
    config, ds = tiny_setup(tmp_path, "MGCN")
    idx, val = graph.cosine_topk(ds.features["v"], 4, include_self=True)
    expected = graph.knn_matrix(idx, val, ds.n_items, "sim").toarray()
    first = graph.knn_graph(ds, "v", 4, "sim").toarray()
    again = graph.knn_graph(ds, "v", 4, "sim").toarray()  # from the cache
    np.testing.assert_allclose(first, expected, atol=1e-6)
    np.testing.assert_array_equal(first, again)
    # other features in the same cache folder -> another feature hash -> another graph
    users, items, labels = random_interactions(30, 20, seed=0)
    rng = np.random.default_rng(99)
    write_dataset(tmp_path, "toy", users, items, labels, rng.normal(size=(20, 16)), rng.normal(size=(20, 8)))
    from mmrec.data import RecDataset
    ds2 = RecDataset(config)
    ds2.cache = ds.cache  # one LMDB environment per path and process (lmdb refuses a second open)
    other = graph.knn_graph(ds2, "v", 4, "sim").toarray()
    idx2, val2 = graph.cosine_topk(ds2.features["v"], 4, include_self=True)
    np.testing.assert_allclose(other, graph.knn_matrix(idx2, val2, 20, "sim").toarray(), atol=1e-6)
    assert not np.allclose(other, first)


def datasets_differing_in_held_out(tmp_path, model: str):
    """(config, ds_a, ds_b): identical train rows and features, other valid/test items."""
    (config, ds_a), (_, ds_b) = held_out_variants(tmp_path, model, n_users=30, n_items=20)
    return config, ds_a, ds_b


@pytest.mark.parametrize("flavour", ["sym", "sym_eps", "rw_self_loop"])
def test_adjacency_ignores_valid_and_test(tmp_path, flavour):
    """Changing only the valid/test interactions leaves every train-built graph unchanged."""
    _, ds_a, ds_b = datasets_differing_in_held_out(tmp_path, "MGCN")
    a = graph.norm_adjacency(ds_a.train_matrix, flavour)
    b = graph.norm_adjacency(ds_b.train_matrix, flavour)
    assert (a != b).nnz == 0
    assert sp.csr_matrix(graph.user_item_block(a, 30) - graph.user_item_block(b, 30)).nnz == 0


@pytest.mark.parametrize("model_name", ["LATTICE", "FREEDOM", "MGCN", "SMORE"])
def test_models_ignore_valid_and_test(tmp_path, model_name):
    """Same seed, same train split, other valid/test items: identical losses and scores."""
    import torch

    from mmrec.registry import get_model

    config, ds_a, ds_b = datasets_differing_in_held_out(tmp_path, model_name)
    batch = {"users": torch.tensor([0, 1, 2]), "pos_items": torch.tensor([3, 4, 5]),
             "neg_items": torch.tensor([6, 7, 8])}
    out = []
    for ds in (ds_a, ds_b):
        torch.manual_seed(0)
        model = get_model(model_name)(config, ds)
        model.pre_epoch_processing()
        loss = sum(model.calculate_loss(batch).values()).item()
        model.eval()
        with torch.no_grad():
            out.append((loss, model.full_sort_predict({"users": torch.arange(ds.n_users)})))
    assert out[0][0] == out[1][0]
    torch.testing.assert_close(out[0][1], out[1][1], rtol=0, atol=0)


def _clusters_under_a_nuisance(seed: int = 0):
    """40 items in 4 clusters (weak centroids) plus a strong 3-d factor shared across clusters: raw cosine
    mostly pairs items by the shared factor, not by cluster."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), 10)
    centroids, nuisance = rng.normal(size=(4, 30)), rng.normal(size=(3, 30))
    x = 0.5 * centroids[labels] + 2.0 * rng.normal(size=(40, 3)) @ nuisance + 0.1 * rng.normal(size=(40, 30))
    return x, labels


def test_whiten_rows_has_unit_uncorrelated_directions_and_is_deterministic():
    x, _ = _clusters_under_a_nuisance()
    w = graph.whiten_rows(x, 6)
    assert w.shape == (40, 6)
    np.testing.assert_allclose(w.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.cov(w.T), np.eye(6), atol=1e-4)
    np.testing.assert_array_equal(w, graph.whiten_rows(x, 6))
    # the directions are the principal ones of the L2-normalised, centred rows, in order of variance
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    xc = xn - xn.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    expected = xc @ vt[:6].T / (s[:6] / np.sqrt(39))
    np.testing.assert_allclose(np.abs(w), np.abs(expected), atol=1e-4)  # up to each direction's sign
    assert graph.whiten_rows(x, 100).shape == (40, 30)  # dim is capped by the feature dimension
    with pytest.raises(ValueError, match="whitening needs"):
        graph.whiten_rows(x[:1], 4)


def test_whitening_finds_the_neighbours_a_shared_factor_hides():
    x, labels = _clusters_under_a_nuisance()

    def same_cluster_share(features):
        idx, _ = graph.cosine_topk(features, 1, include_self=False)
        return float((labels[idx[:, 0]] == labels).mean())

    assert same_cluster_share(x) < 0.5
    assert same_cluster_share(graph.whiten_rows(x, 6)) >= 0.9


def test_neighbourhood_mean_by_hand():
    x = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    out = graph.neighbourhood_mean(x, np.array([[1], [2], [0]])).numpy()
    np.testing.assert_allclose(out, [[0.5, 1.0], [1.5, 2.5], [2.0, 1.5]])


def test_similarity_features_raw_whitened_smoothed_and_cached(tmp_path):
    _, ds = tiny_setup(tmp_path, "MGCN")
    assert graph.similarity_features(ds, "v") is ds.features["v"]  # both 0: the raw features
    white = graph.similarity_features(ds, "v", whitening_dim=8)
    np.testing.assert_allclose(white, graph.whiten_rows(ds.features["v"], 8), atol=1e-6)
    smooth = graph.similarity_features(ds, "v", whitening_dim=8, smoothing_k=3)
    idx, _ = graph.cosine_topk(white, 3, include_self=False)
    unit = white / np.linalg.norm(white, axis=1, keepdims=True)
    np.testing.assert_allclose(smooth, (unit + unit[idx].sum(1)) / 4, atol=1e-5)
    hits = ds.cache.hits
    np.testing.assert_array_equal(graph.similarity_features(ds, "v", whitening_dim=8, smoothing_k=3), smooth)
    assert ds.cache.hits == hits + 1
    # kNN lists on the transformed features, cached under their own key
    idx_w, _ = graph.cached_knn(ds, "v", 4, include_self=False, whitening_dim=8, smoothing_k=3)
    np.testing.assert_array_equal(idx_w, graph.cosine_topk(smooth, 4, include_self=False)[0])
    idx_raw, _ = graph.cached_knn(ds, "v", 4, include_self=False)
    np.testing.assert_array_equal(idx_raw, graph.cosine_topk(ds.features["v"], 4, include_self=False)[0])


@pytest.mark.parametrize("model", ["MGCN", "SMORE", "FREEDOM"])
def test_baselines_build_their_knn_graphs_on_the_runs_similarity_features(tmp_path, model):
    """similarity_whitening / similarity_smoothing are harness keys (raw features by default): a baseline's
    item-item graph follows them, through ``item_knn`` (MGCN) or its own call (SMORE, FREEDOM)."""
    from mmrec.registry import get_model

    graphs = {}
    for sets in ({}, {"similarity_whitening": 6, "similarity_smoothing": 2}):
        config, ds = tiny_setup(tmp_path / str(len(graphs)), model, overrides=sets)
        net = get_model(model)(config, ds)
        attr = "mm_adj" if model == "FREEDOM" else "image_graph"
        graphs[bool(sets)] = (getattr(net, attr).to_dense().numpy(), config, ds)
        assert graph.similarity_settings(config) == {"whitening_dim": sets.get("similarity_whitening", 0),
                                                     "smoothing_k": sets.get("similarity_smoothing", 0)}
    (raw, _, ds), (white, config, ds_w) = graphs[False], graphs[True]
    assert not np.allclose(raw, white)
    if model == "MGCN":
        k = int(config["knn_k"])
        idx, val = graph.cosine_topk(graph.similarity_features(ds_w, "v", 6, 2), k, include_self=True)
        np.testing.assert_allclose(white, graph.knn_matrix(idx, val, ds_w.n_items, "sim").toarray(), atol=1e-5)
