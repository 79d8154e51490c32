"""MIG-GT: graph, APPNP propagation, global attention, loss, evaluation protocol options, no leakage."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from tests.helpers import batch, build, held_out_variants
from mmrec import graph
from models.miggt import MIGGT, SampledGlobalAttention, appnp_gamma, appnp_propagate, self_loop_sym_adjacency

FAST = {"feat_hidden": 16}


def make(tiny, **overrides):
    return build(tiny, MIGGT, **{**FAST, **overrides})


def test_self_loop_graph_matches_dense():
    y = np.array([[1, 0, 1], [0, 1, 0]], dtype=np.float32)
    a = np.zeros((5, 5), dtype=np.float64)
    a[:2, 2:] = y
    a[2:, :2] = y.T
    a += np.eye(5)
    d = a.sum(1) ** -0.5
    expected = d[:, None] * a * d[None, :]
    got = self_loop_sym_adjacency(sp.csr_matrix(y)).toarray()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[0, 0] == pytest.approx(1 / 3)  # user 0: 2 items + self-loop


def test_appnp_matches_dense_iteration():
    rng = np.random.default_rng(0)
    y = (rng.random((4, 5)) < 0.5).astype(np.float32)
    a_hat = self_loop_sym_adjacency(sp.csr_matrix(y))
    adj = graph.to_torch_sparse(a_hat)
    h0 = rng.normal(size=(9, 3))
    dense = a_hat.toarray().astype(np.float64)
    for k, alpha, beta in ((3, 0.1, 0.9), (2, 0.3, 0.5), (0, 0.1, 0.9)):
        h = h0.copy()
        for _ in range(k):
            h = beta * dense @ h + alpha * h0
        gamma = beta ** k + alpha * sum(beta ** j for j in range(k))
        got = appnp_propagate(adj, torch.tensor(h0, dtype=torch.float32), k, alpha, beta, edge_drop=0.5,
                              training=False)
        np.testing.assert_allclose(got.numpy(), h / gamma, rtol=1e-5, atol=1e-6)
    assert appnp_gamma(0.1, 0.9, 4) == pytest.approx(1.0)  # the reference's alpha + beta = 1 keeps gamma 1


def test_global_attention_matches_hand_computation():
    torch.manual_seed(1)
    att = SampledGlobalAttention(3, 2)
    tokens = torch.randn(2, 4, 3)
    with torch.no_grad():
        out = att(tokens)
    for n in range(2):
        x = tokens[n].double()
        q = x @ att.q.weight.detach().double().T + att.q.bias.detach().double()
        k = x @ att.k.weight.detach().double().T + att.k.bias.detach().double()
        w = torch.softmax(q @ k.T / np.sqrt(2), dim=-1)
        np.testing.assert_allclose(out[n].detach().numpy(), (0.9 * x + 0.1 * w @ x).numpy(), rtol=1e-5, atol=1e-6)


def test_shapes_and_loss_value(tiny):
    model, _ = make(tiny)
    model.eval()  # no dropout: the loss is a function of one forward with fixed samples
    b = batch([0, 1, 2, 1], [0, 3, 5, 7], [4, 4, 9, 11])
    torch.manual_seed(5)
    parts = model.calculate_loss(b)
    assert set(parts) == {"mf", "l2", "unsmooth"} and all(v.dim() == 0 for v in parts.values())
    torch.manual_seed(5)
    z, tokens = model.forward()
    z, tokens = z.detach().double().numpy(), tokens.detach().double().numpy()
    nu = model.n_users
    assert z.shape == (nu + model.n_items, 64) and tokens.shape == (nu + model.n_items, 11, 64)
    mf = l2 = uns = 0.0
    for u, i, j in zip(*(b[k].tolist() for k in ("users", "pos_items", "neg_items"))):
        sp_, sn = z[u] @ z[nu + i], z[u] @ z[nu + j]
        mf += np.log1p(np.exp(sn - sp_))            # 2-way softmax CE with the positive first
        logits = tokens[nu + i] @ z[u]
        uns += np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[0]
    l2 = 1e-5 * 0.5 * (z ** 2).sum()
    parts = {k: float(v.detach()) for k, v in parts.items()}
    assert parts["mf"] == pytest.approx(mf, rel=1e-4)
    assert parts["l2"] == pytest.approx(l2, rel=1e-4)
    assert parts["unsmooth"] == pytest.approx(uns, rel=1e-4)
    scores = model.full_sort_predict({"users": torch.tensor([0, 2])})
    assert scores.shape == (2, model.n_items)


def test_own_negatives_ignore_the_harness_negatives(tiny):
    model, _ = make(tiny, own_negatives=True)
    model.eval()
    losses = []
    for neg in ([1, 2, 3], [7, 8, 9]):
        torch.manual_seed(3)
        losses.append(float(model.calculate_loss(batch([0, 1, 2], [0, 1, 2], neg))["mf"].detach()))
    assert losses[0] == losses[1]


@torch.no_grad()
def test_evaluation_is_reproducible_and_block_independent(tiny):
    model, _ = make(tiny)
    model.eval()
    users = torch.arange(6)
    model.start_evaluation()
    whole = model.full_sort_predict({"users": users})
    model.end_evaluation()
    model.start_evaluation()
    parts = torch.cat([model.full_sort_predict({"users": users[:2]}), model.full_sort_predict({"users": users[2:]})])
    model.end_evaluation()
    torch.testing.assert_close(whole, parts, rtol=1e-6, atol=1e-6)  # same samples; BLAS order may differ


@torch.no_grad()
def test_extra_masking_flag(tiny):
    for flag in (False, True):
        model, dataset = make(tiny, eval_mask_other_split=flag)
        model.eval()
        users = np.arange(dataset.n_users)
        for split, other in (("valid", dataset.test_matrix), ("test", dataset.valid_matrix)):
            model.start_evaluation(split)
            scores = model.full_sort_predict({"users": torch.from_numpy(users)})
            model.end_evaluation()
            r, c = other.nonzero()
            masked = torch.isneginf(scores[r, c])
            assert bool(masked.all()) if flag else not bool(masked.any())
            assert int(torch.isneginf(scores).sum()) == (len(r) if flag else 0)


@torch.no_grad()
def test_no_valid_test_leakage(tmp_path):
    scores = []
    for cfg, ds in held_out_variants(tmp_path, "MIGGT", FAST):
        torch.manual_seed(0)
        model = MIGGT(cfg, ds).eval()
        model.start_evaluation()
        scores.append(model.full_sort_predict({"users": torch.arange(ds.n_users)}))
        model.end_evaluation()
    assert torch.equal(scores[0], scores[1])


def test_edge_dropout_one_mask_for_all_hops(monkeypatch):
    import models.miggt as miggt

    calls = []
    real = miggt.F.dropout

    def counting(x, p, training=True, **kw):
        calls.append(x.shape)
        return real(x, p, training=training, **kw)

    monkeypatch.setattr(miggt.F, "dropout", counting)
    a_hat = self_loop_sym_adjacency(sp.csr_matrix(np.eye(3, 4, dtype=np.float32)))
    adj = graph.to_torch_sparse(a_hat)
    torch.manual_seed(0)
    h = appnp_propagate(adj, torch.randn(7, 2), 3, 0.1, 0.9, edge_drop=0.5, training=True)
    assert calls == [adj.values().shape] and h.shape == (7, 2)


@torch.no_grad()
def test_zero_hop_branch_is_kept_and_negative_removes_it(tiny):
    outs = {}
    for k_v in (-1, 0):
        model, _ = make(tiny, k_v=k_v)
        model.eval()
        outs[k_v] = model.propagate_branches()
    diff = outs[0] - outs[-1]  # = the visual branch input: users zero, items the encoded features
    assert float(diff[: model.n_users].abs().max()) == 0.0 and float(diff[model.n_users:].abs().max()) > 0
