"""CMDL: critics vs the reference's tiled form, combination weights, loss value, two-step training,
no leakage."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import batch, build, held_out_variants
from models.cmdl import CMDL, PairCritic, club_learning_loss, club_upper_bound, infonce_critic_loss

SMALL = {"embedding_size": 8, "knn_k": 3, "train_batch_size": 4}


def make(tiny, **overrides):
    return build(tiny, CMDL, **{**SMALL, **overrides})


def tiled_scores(critic: PairCritic, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The reference's materialised grid T[i, j] = f([first_tile[i, j], second_tile[i, j]]) where
    first varies along j and second along i (x.unsqueeze(0).repeat / y.unsqueeze(1).repeat)."""
    n = first.shape[0]
    a = first.unsqueeze(0).repeat(n, 1, 1)
    b = second.unsqueeze(1).repeat(1, n, 1)
    f = torch.nn.Sequential(critic.first, torch.nn.ReLU(), critic.second)
    return f(torch.cat([a, b], dim=-1)).squeeze(-1)


def test_critics_match_the_tiled_reference_form():
    torch.manual_seed(2)
    x, y = torch.randn(5, 3), torch.randn(5, 4)
    f_seq = lambda c: torch.nn.Sequential(c.first, torch.nn.ReLU(), c.second)  # noqa: E731
    for hidden in (1, 3):
        # InfoNCE critic on pairs [x, y]: T0 = f([x_i, y_i]); T1[i, j] = f([x_j, y_i])
        nce = PairCritic(3, 4, hidden)
        t0 = f_seq(nce)(torch.cat([x, y], 1)).squeeze(-1)
        t1 = tiled_scores(nce, x, y)
        expected = -(t0.mean() - (torch.logsumexp(t1, 1).mean() - math.log(5)))
        torch.testing.assert_close(infonce_critic_loss(nce, x, y), expected)
        # CLUB critic on pairs [y, x]: T0 = f([y_i, x_i]); T1[i, j] = f([y_i, x_j])
        club = PairCritic(4, 3, hidden)
        t0 = f_seq(club)(torch.cat([y, x], 1)).squeeze(-1)
        n = 5
        t1 = f_seq(club)(torch.cat([y.unsqueeze(1).repeat(1, n, 1), x.unsqueeze(0).repeat(n, 1, 1)], -1)).squeeze(-1)
        torch.testing.assert_close(club_upper_bound(club, x, y), t0.mean() - t1.mean())
        torch.testing.assert_close(club_learning_loss(club, x, y),
                                   -(t0.mean() - (torch.logsumexp(t1, 1).mean() - math.log(n))))


def test_combination_weights_are_global_and_detached(tiny):
    model, _ = make(tiny)
    out = model.forward()
    fc = model.fc(out["content"])
    expected = torch.softmax(torch.stack([fc[:, k].max() for k in range(3)]), 0)
    torch.testing.assert_close(out["weights"], expected)
    assert float(out["weights"].sum()) == pytest.approx(1.0)
    side = (expected[0] * model.v_prefer(out["content"]) * out["spec_v"]
            + expected[1] * model.t_prefer(out["content"]) * out["spec_t"]
            + expected[2] * model.s_prefer(out["content"]) * out["shared"])
    torch.testing.assert_close(out["side"], side)
    torch.testing.assert_close(out["spec_v"] + out["shared"], out["x_v"])
    model.train()
    sum(model.calculate_loss(batch([0, 1], [0, 1], [2, 3])).values()).backward()
    assert all(p.grad is None for p in model.fc.parameters())  # the reference detaches the weights


def test_loss_value_by_hand(tiny):
    model, _ = make(tiny, cl_loss=0.5, mi_loss=0.3, reg_weight=0.1, mi_index_quirk=False)
    model.train()
    b = batch([0, 1, 2], [0, 4, 6], [3, 5, 9])
    parts = {k: float(v.detach()) for k, v in model.calculate_loss(b).items()}
    with torch.no_grad():
        out = model.forward()
        z = out["z"].double()
        nu = model.n_users
        u, p, n = z[b["users"]], z[nu + b["pos_items"]], z[nu + b["neg_items"]]
        diff = (u * p).sum(1) - (u * n).sum(1)
        bpr = float(torch.log1p(torch.exp(-diff)).mean())
        reg = 0.1 * 0.5 * float(u.pow(2).sum() + p.pow(2).sum() + n.pow(2).sum()) / 4  # / train_batch_size

        def nce(a, c, tau):
            a, c = F.normalize(a, dim=1), F.normalize(c, dim=1)
            pos = torch.exp((a * c).sum(1) / tau)
            return float((-torch.log(pos / torch.exp(a @ c.T / tau).sum(1))).mean())

        side, content = out["side"].double(), out["content"].double()
        cl = nce(side[nu + b["pos_items"]], content[nu + b["pos_items"]], 0.2) + nce(side[b["users"]],
                                                                                   content[b["users"]], 0.2)
        mi = 0.0
        for rows in (nu + b["pos_items"], nu + b["neg_items"]):  # item rows (mi_index_quirk off)
            s, xv, xt = out["shared"][rows], out["x_v"][rows], out["x_t"][rows]
            mi += float(club_upper_bound(model.club_t_s, out["spec_t"][rows], s)
                        + club_upper_bound(model.club_v_s, out["spec_v"][rows], s)
                        + infonce_critic_loss(model.nce_t_s, xt, s) + infonce_critic_loss(model.nce_v_s, xv, s)
                        + club_upper_bound(model.club_t_sv, torch.cat([s, xv], 1), xt)
                        + club_upper_bound(model.club_v_st, torch.cat([s, xt], 1), xv))
    assert parts["bpr"] == pytest.approx(bpr, rel=1e-5)
    assert parts["reg"] == pytest.approx(reg, rel=1e-5)
    assert parts["cl"] == pytest.approx(0.5 * cl, rel=1e-5)
    assert parts["mi"] == pytest.approx(0.3 * mi, rel=1e-4, abs=1e-7)
    assert model.full_sort_predict({"users": torch.tensor([0, 3])}).shape == (2, model.n_items)


def test_mi_index_quirk_uses_raw_item_ids(tiny):
    model, _ = make(tiny)
    assert torch.equal(model._mi_rows(torch.tensor([0, 4])), torch.tensor([0, 4]))
    model.mi_index_quirk = False
    assert torch.equal(model._mi_rows(torch.tensor([0, 4])), torch.tensor([0, 4]) + model.n_users)


def test_two_step_training_keeps_club_critics_out_of_the_main_step(tiny):
    from mmrec.trainer import build_optimizer

    model, _ = make(tiny)
    optimised = {id(p) for g in build_optimizer(model.config, model).param_groups for p in g["params"]}
    club_ids = {id(p) for c in model.club_critics for p in c.parameters()}
    frozen_ids = {id(p) for m in (model.v_purifier, model.t_purifier, model.fuser) for p in m.parameters()}
    assert not optimised & club_ids and not optimised & frozen_ids
    assert {id(p) for p in model.nce_t_s.parameters()} <= optimised  # InfoNCE critics learn with encoders
    model.train()
    model.pre_epoch_processing()
    b = batch([0, 1, 2], [0, 4, 6], [3, 5, 9])
    before = [p.clone() for c in model.club_critics for p in c.parameters()]
    sum(model.calculate_loss(b).values()).backward()
    assert all(p.grad is None for c in model.club_critics for p in c.parameters())
    unchanged = [torch.equal(a, p) for a, p in zip(before, (p for c in model.club_critics for p in c.parameters()))]
    assert all(unchanged)  # the critic step of a batch runs only after that batch's main update
    model.post_epoch_processing()  # runs the pending critic step
    after = [p for c in model.club_critics for p in c.parameters()]
    assert not all(torch.equal(a, p) for a, p in zip(before, after))
    assert all(p.grad is None for p in after) and not any(p.requires_grad for p in after)


def test_no_valid_test_leakage(tmp_path):
    scores = []
    for cfg, ds in held_out_variants(tmp_path, "CMDL", SMALL, seed=4):
        torch.manual_seed(0)
        model = CMDL(cfg, ds).eval()
        with torch.no_grad():
            scores.append(model.full_sort_predict({"users": torch.arange(ds.n_users)}))
    assert torch.equal(scores[0], scores[1])