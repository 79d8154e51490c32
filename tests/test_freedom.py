"""FREEDOM: shapes, the degree-sensitive pruned graph (kept count, values, train edges only, global RNG),
the frozen KNN-BIN item graph, and the loss against an independent dense float64 computation."""
from __future__ import annotations

import numpy as np
import torch

from models.freedom import FREEDOM
from tests.helpers import BATCH, lightgcn_mean, lin, loss_and_params64

EPS = 1e-7


def dense_knn_bin(features: np.ndarray, k: int) -> np.ndarray:
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    sim = unit @ unit.T
    out = np.zeros_like(sim)
    for i in range(sim.shape[0]):
        out[i, np.argsort(-sim[i])[:k]] = 1.0 / (k + EPS)
    return out


def test_pruned_graph(tiny):
    config, ds = tiny("FREEDOM", overrides={"dropout": 0.8})
    model = FREEDOM(config, ds)
    torch.manual_seed(5)
    model.pre_epoch_processing()
    adj = model.train_adj.coalesce().to_dense()
    nu, n_edges = ds.n_users, ds.train_matrix.nnz
    kept = adj[:nu, nu:] != 0
    assert int(kept.sum()) == int(n_edges * (1.0 - 0.8))
    torch.testing.assert_close(adj, adj.T)  # mirrored into the (U+I) matrix
    train = torch.from_numpy(ds.train_matrix.toarray()) > 0
    assert bool((kept & ~train).sum() == 0)  # only training edges
    du = kept.sum(1).double() + EPS
    di = kept.sum(0).double() + EPS
    expected = (du[:, None] * di[None, :]).rsqrt() * kept
    torch.testing.assert_close(adj[:nu, nu:].double(), expected, rtol=1e-6, atol=0)
    torch.manual_seed(5)  # the global torch RNG decides the sample
    model.pre_epoch_processing()
    torch.testing.assert_close(model.train_adj.coalesce().to_dense(), adj)


def test_item_graph_and_eval_graph(tiny):
    config, ds = tiny("FREEDOM")
    model = FREEDOM(config, ds)
    expected = 0.1 * dense_knn_bin(ds.features["v"].astype(np.float64), 10) + \
        0.9 * dense_knn_bin(ds.features["t"].astype(np.float64), 10)
    np.testing.assert_allclose(model.mm_adj.to_dense().numpy(), expected, rtol=1e-6)
    model.pre_epoch_processing()
    model.eval()
    model.start_evaluation()
    with torch.no_grad():
        scores = model.full_sort_predict({"users": torch.tensor([0, 4])})
        zu, zi = model.forward(model.full_adj)  # evaluation uses the full graph, not the pruned one
    torch.testing.assert_close(scores, zu[[0, 4]] @ zi.T)
    assert scores.shape == (2, ds.n_items)


def test_loss_matches_dense_float64(tiny):
    ds, got, p = loss_and_params64(tiny, FREEDOM, 2, dropout=0.0, reg_weight=0.7)
    nu = ds.n_users
    y = ds.train_matrix.toarray()
    a = np.zeros((nu + ds.n_items,) * 2)
    a[:nu, nu:], a[nu:, :nu] = y, y.T
    inv = (a.sum(1) + EPS) ** -0.5
    adj = inv[:, None] * a * inv[None, :]
    s = torch.from_numpy(0.1 * dense_knn_bin(ds.features["v"].astype(np.float64), 10)
                         + 0.9 * dense_knn_bin(ds.features["t"].astype(np.float64), 10))
    ids = p["item_embedding.weight"]
    c = lightgcn_mean(adj, torch.cat([p["user_embedding.weight"], ids]), 2)
    zu, zi = c[:nu], c[nu:] + s @ ids

    def bpr(u, pos, neg):
        return torch.log1p(torch.exp(-((u * pos).sum(1) - (u * neg).sum(1)))).mean()

    u = zu[BATCH["users"]]
    t_proj = lin(p, "text_proj", p["text_embedding.weight"])
    v_proj = lin(p, "image_proj", p["image_embedding.weight"])
    pos, neg = BATCH["pos_items"], BATCH["neg_items"]
    expected = bpr(u, zi[pos], zi[neg]) + 0.7 * (bpr(u, t_proj[pos], t_proj[neg]) + bpr(u, v_proj[pos], v_proj[neg]))
    assert abs(got - expected.item()) <= 1e-5 * abs(expected.item())


def test_reg_weight_zero_skips_the_modality_branch(tiny):
    config, ds = tiny("FREEDOM", overrides={"reg_weight": 0.0})
    model = FREEDOM(config, ds)
    parts = model.calculate_loss(BATCH)
    assert set(parts) == {"bpr"}
    sum(parts.values()).backward()
    assert model.image_proj.weight.grad is None and model.user_embedding.weight.grad is not None
