"""ITCoHD-MRec (our reconstruction): diffusion schedule, hyperedge memberships, pruning, loss value,
no leakage."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import build, held_out_variants
from models.itcohd import ITCoHDMRec, linear_var_schedule, timestep_embedding

SMALL = {"knn_k": 3, "denoiser_hidden": 16, "train_batch_size": 4}


def make(tiny, **overrides):
    return build(tiny, ITCoHDMRec, **{**SMALL, **overrides})


def test_diffusion_schedule_coefficients():
    s = {k: v.numpy() for k, v in linear_var_schedule(5, 0.1, 1e-4, 0.02).items()}
    v = 0.1 * np.array([1e-4, 0.0050750, 0.010050, 0.0150250, 0.02])
    np.testing.assert_allclose(s["abar"], 1.0 - v, rtol=1e-12)  # cumprod(1 - beta) recovers 1 - v_t
    assert s["beta"][0] == pytest.approx(1e-5)
    assert s["beta"][1] == pytest.approx(1 - (1 - v[1]) / (1 - v[0]))
    # c1_1 = 1, c2_1 = 0: the last denoising step returns the x_0 prediction
    assert s["c1"][0] == pytest.approx(1.0) and s["c2"][0] == pytest.approx(0.0)
    t = 3  # 1-based t = 4
    ab, abp, beta = 1 - v[t], 1 - v[t - 1], s["beta"][t]
    assert s["c1"][t] == pytest.approx(beta * np.sqrt(abp) / (1 - ab))
    assert s["c2"][t] == pytest.approx((1 - abp) * np.sqrt(1 - beta) / (1 - ab))
    # at this small noise scale each step nearly preserves scale (c1 + c2 ~ 1)
    assert np.all(np.abs(s["c1"] + s["c2"] - 1) < 1e-2)
    emb = timestep_embedding(torch.tensor([0, 2]), 10)
    assert emb.shape == (2, 10) and torch.allclose(emb[0], torch.tensor([1.0] * 5 + [0.0] * 5))
    assert float(emb[1, 0]) == pytest.approx(np.cos(2.0))


@torch.no_grad()
def test_hyperedge_memberships(tiny):
    model, dataset = make(tiny, hyper_num=3)
    model.eval()
    for m, feats in (("v", model.v_feat), ("t", model.t_feat)):
        h_u, h_i = model.memberships(m)
        logits_i = feats.double() @ model.hyper[m].detach().double()
        logits_u = torch.from_numpy(dataset.train_matrix.toarray()).double() @ logits_i  # sum over train items
        torch.testing.assert_close(h_i.detach().double(), torch.softmax(logits_i / 0.2, 1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h_u.detach().double(), torch.softmax(logits_u / 0.2, 1), rtol=1e-5, atol=1e-6)
        assert h_u.shape == (dataset.n_users, 3) and h_i.shape == (dataset.n_items, 3)
    model.train()
    torch.manual_seed(1)
    h_u, h_i = model.memberships("v")
    assert bool((h_i == 0).any())  # membership dropout in training
    kept_rows = (h_i > 0).any(1)
    assert float(h_i.sum(1)[kept_rows].max()) <= 2.0 + 1e-5  # survivors scaled by 1/keep_rate = 2
    c_i = torch.randn(dataset.n_items, 64)
    model.eval()
    g_u, g_i = model.hypergraph("v", c_i)
    h_u, h_i = model.memberships("v")
    lam = h_i.T @ c_i
    torch.testing.assert_close(g_i, h_i @ lam)
    torch.testing.assert_close(g_u, h_u @ lam)


def test_pruned_graph_is_a_subset_of_train(tiny):
    model, dataset = make(tiny, prune_ratio=0.5)
    torch.manual_seed(3)
    model.resample_pruned_graph()
    adj = model.pruned_adj.coalesce()
    rows, cols = adj.indices()
    nu = model.n_users
    ui = rows < nu
    assert int(ui.sum()) == int(dataset.n_train * 0.5)
    train = dataset.train_matrix.toarray()
    assert train[rows[ui].numpy(), (cols[ui] - nu).numpy()].all()
    mean = model.pruned_user_mean.to_dense()
    has = torch.bincount(rows[ui], minlength=nu) > 0
    torch.testing.assert_close(mean.sum(1)[has], torch.ones(int(has.sum())))
    model.eval()
    adj_eval, _ = model._graphs()
    assert adj_eval._nnz() == 2 * dataset.n_train  # the full graph at evaluation


def test_loss_value_by_hand(tiny):
    model, _ = make(tiny, reg_weight=0.1, mc_weight=0.5, diff_weight=0.7)
    model.train()
    model.pre_epoch_processing()
    b = {"users": torch.tensor([0, 1, 2]), "pos_items": torch.tensor([0, 4, 6]), "neg_items": torch.tensor([3, 5, 9])}
    state = torch.get_rng_state()
    parts = {k: float(v.detach()) for k, v in model.calculate_loss(b).items()}
    torch.set_rng_state(state)
    with torch.no_grad():
        out = model.forward()  # same Gumbel / dropout noise as inside calculate_loss
        u, p, n = out["z_u"][b["users"]], out["z_i"][b["pos_items"]], out["z_i"][b["neg_items"]]
        diff = ((u * p).sum(1) - (u * n).sum(1)).double()
        assert parts["bpr"] == pytest.approx(float(torch.log1p(torch.exp(-diff)).mean()), rel=1e-5)
        reg = 0.1 * 0.5 * float(u.pow(2).sum() + p.pow(2).sum() + n.pow(2).sum()) / 4
        assert parts["reg"] == pytest.approx(reg, rel=1e-5)

        def nce(a, c):
            a, c = F.normalize(a.double(), dim=1), F.normalize(c.double(), dim=1)
            logits = a @ c.T / 0.2
            return float((torch.logsumexp(logits, 1) - logits.diagonal()).mean())

        nu = model.n_users
        mc = (nce(out["x_v"][b["users"]], out["x_t"][b["users"]])
              + nce(out["x_v"][nu + b["pos_items"]], out["x_t"][nu + b["pos_items"]])
              + nce(out["gd_v"][b["users"]], out["gd_t"][b["users"]])
              + nce(out["gi_v"][b["pos_items"]], out["gi_t"][b["pos_items"]]))
        assert parts["mc"] == pytest.approx(0.5 * mc, rel=1e-5)
        diff_loss = 0.0
        for m in ("v", "t"):
            x0 = out[f"g0_{m}"][b["users"]]
            t = torch.randint(model.steps, (3,))
            abar = model.sched_abar[t].unsqueeze(1)
            xt = abar.sqrt() * x0 + (1 - abar).sqrt() * torch.randn_like(x0)
            diff_loss += float(((model.denoiser[m](xt, t) - x0) ** 2).mean())
        assert parts["diff"] == pytest.approx(0.7 * diff_loss, rel=1e-5)


def test_denoising_loop_and_prediction(tiny):
    model, dataset = make(tiny)
    model.eval()
    with torch.no_grad():
        x0 = F.normalize(torch.randn(4, 64), dim=1)
        x = x0
        for t in (4, 3, 2, 1, 0):
            f = model.denoiser["v"](x, torch.full((4,), t))
            x = model.sched_c1[t] * f + model.sched_c2[t] * x
        torch.testing.assert_close(model.denoise("v", x0), x)
        a = model.full_sort_predict({"users": torch.tensor([0, 5])})
        model.start_evaluation()
        b = model.full_sort_predict({"users": torch.tensor([0, 5])})
        model.end_evaluation()
    assert a.shape == (2, dataset.n_items)
    torch.testing.assert_close(a, b)  # deterministic at evaluation


def test_no_valid_test_leakage(tmp_path):
    scores = []
    for cfg, ds in held_out_variants(tmp_path, "ITCoHDMRec", SMALL, seed=5):
        torch.manual_seed(0)
        model = ITCoHDMRec(cfg, ds)
        torch.manual_seed(1)
        model.pre_epoch_processing()
        pruned = model.pruned_adj.coalesce()
        model.eval()
        with torch.no_grad():
            scores.append((model.full_sort_predict({"users": torch.arange(ds.n_users)}), pruned.indices(), pruned.values()))
    assert torch.equal(scores[0][0], scores[1][0])
    assert torch.equal(scores[0][1], scores[1][1]) and torch.equal(scores[0][2], scores[1][2])