"""LATTICE: refusal above max_dense_items, the sparse learned graph against a dense float64 autograd
computation of the reference formula (loss value and gradients), the once-per-epoch graph gradient,
the random-walk UI graph, and shapes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.lattice import LATTICE
from tests.helpers import BATCH, dense_knn_sim, lightgcn_mean


def dense_rw_adjacency(train: np.ndarray) -> np.ndarray:
    nu, ni = train.shape
    a = np.eye(nu + ni)
    a[:nu, nu:] += train
    a[nu:, :nu] += train.T
    return a / a.sum(1, keepdims=True)


def dense_reference_loss(model, ds, reg_weight):
    """The reference formula with dense I x I matrices, float64, differentiable in the model's copies."""
    p = {n: q.detach().double().requires_grad_(True) for n, q in model.named_parameters()}
    nu, k = ds.n_users, 10
    w = torch.softmax(p["modal_weight"], 0)

    def learned(m):
        x = p[f"feature_tables.{m}.weight"] @ p[f"projections.{m}.weight"].T + p[f"projections.{m}.bias"]
        unit = x / x.norm(dim=1, keepdim=True)
        sim = unit @ unit.T
        val, idx = torch.topk(sim, k, dim=-1)
        return torch.zeros_like(sim).scatter(-1, idx, val)

    mix = w[0] * learned("v") + w[1] * learned("t")
    d = mix.sum(-1).pow(-0.5)
    learned_norm = d[:, None] * mix * d[None, :]
    original = w[0] * torch.from_numpy(dense_knn_sim(ds.features["v"].astype(np.float64), k)) + \
        w[1] * torch.from_numpy(dense_knn_sim(ds.features["t"].astype(np.float64), k))
    item_adj = 0.1 * learned_norm + 0.9 * original
    h = item_adj @ p["item_embedding.weight"]
    c = lightgcn_mean(dense_rw_adjacency(ds.train_matrix.toarray()),
                      torch.cat([p["user_embedding.weight"], p["item_embedding.weight"]]), 2)
    zu, zi = c[:nu], c[nu:] + h / h.norm(dim=1, keepdim=True)
    u, pos, neg = zu[BATCH["users"]], zi[BATCH["pos_items"]], zi[BATCH["neg_items"]]
    bpr = torch.log1p(torch.exp(-((u * pos).sum(1) - (u * neg).sum(1)))).mean()
    loss = bpr + reg_weight * 0.5 * (u.pow(2).sum() + pos.pow(2).sum() + neg.pow(2).sum()) / 2048
    loss.backward()
    return loss.item(), {n: q.grad for n, q in p.items()}


def test_refuses_large_catalogues(tiny):
    config, ds = tiny("LATTICE", overrides={"max_dense_items": 10})
    gib = ds.n_items ** 2 * 4 / 2 ** 30  # one dense items x items float32 graph
    with pytest.raises(ValueError, match=rf"max_dense_items.*\({gib:.1f} GiB each.*--set max_dense_items=null"):
        LATTICE(config, ds)
    config, ds = tiny("LATTICE", overrides={"max_dense_items": None})
    LATTICE(config, ds)  # the labelled extension runs


def test_loss_and_gradients_match_dense_reference(tiny):
    config, ds = tiny("LATTICE", overrides={"reg_weight": 0.5})
    torch.manual_seed(3)
    model = LATTICE(config, ds)
    with torch.no_grad():
        model.modal_weight.copy_(torch.tensor([0.2, 0.9]))  # unequal weights exercise the mixing
    model.pre_epoch_processing()
    loss = sum(model.calculate_loss(BATCH).values())
    loss.backward()
    expected, grads = dense_reference_loss(model, ds, 0.5)
    assert abs(loss.item() - expected) <= 1e-5 * abs(expected)
    for name, q in model.named_parameters():
        torch.testing.assert_close(q.grad.double(), grads[name], rtol=1e-3, atol=1e-7, msg=name)


def test_graph_gradient_only_on_first_batch_of_epoch(tiny):
    config, ds = tiny("LATTICE")
    model = LATTICE(config, ds)
    graph_params = ["modal_weight", "projections.v.weight", "feature_tables.t.weight"]
    for epoch in range(2):
        model.pre_epoch_processing()
        for batch in range(2):
            model.zero_grad(set_to_none=True)
            sum(model.calculate_loss(BATCH).values()).backward()
            params = dict(model.named_parameters())
            has_grad = [params[n].grad is not None for n in graph_params]
            assert has_grad == [batch == 0] * 3, (epoch, batch)
            assert params["user_embedding.weight"].grad is not None


def test_every_batch_variant_and_shapes(tiny):
    config, ds = tiny("LATTICE", overrides={"rebuild_graph_every_batch": True})
    model = LATTICE(config, ds)
    model.pre_epoch_processing()
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        sum(model.calculate_loss(BATCH).values()).backward()
        assert model.modal_weight.grad is not None
    model.eval()
    model.start_evaluation()
    with torch.no_grad():
        s = model.full_sort_predict({"users": torch.tensor([0, 1, 2])})
    assert s.shape == (3, ds.n_items) and torch.isfinite(s).all()
    assert set(model.epoch_stats()) == {"w_image", "w_text"}
