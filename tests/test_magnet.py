"""MAGNET model: routing (Eqs. 16-21), the stage controller and weights (Eqs. 22-26, 31), the losses
(Eqs. 27-30) against hand computations, the backbone and cues (Eqs. 5-10), checkpointing of the
controller, and full ranking equal to pairwise scoring."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmrec import graph
from mmrec.config import load_config
from models.magnet import (MAGNET, confidence_loss, coverage_loss, entropy, stage_weight_factors, topk_gates,
                           view_contrastive)
from tests.helpers import model_factory

SMALL = {"knn_k": 3, "expansion_r": 4, "embedding_size": 8, "num_threads": 1, "fanout": 0,
         "stage1_min_steps": 0, "switch_signal": "dense", "entropy_smoothing": "none"}  # literal Eq. 26


@pytest.fixture
def make(tmp_path):
    """``make(**overrides)`` -> a MAGNET on one tiny dataset."""
    return model_factory(tmp_path, MAGNET, SMALL)


# -- pure functions -----------------------------------------------------------------------------
def test_topk_gates_renormalise():
    pi = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.05, 0.45]])
    g = topk_gates(pi, 2)
    torch.testing.assert_close(g[0], torch.tensor([0.0, 4 / 7, 0.0, 3 / 7]))
    torch.testing.assert_close(g[1, 3], torch.tensor(0.45 / 0.70))
    torch.testing.assert_close(g.sum(1), torch.ones(2))
    assert (g > 0).sum(1).tolist() == [2, 2]


def test_entropy_coverage_confidence_by_hand():
    pi = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    pi_bar = pi.mean(0)  # Eq. 22: [0.4, 0.4, 0.2]
    h = -(0.4 * math.log(0.4) * 2 + 0.2 * math.log(0.2))
    assert float(entropy(pi_bar)) == pytest.approx(h)  # Eq. 23
    assert math.exp(h) == pytest.approx(float(entropy(pi_bar).exp()))  # Eq. 25
    assert float(coverage_loss(pi_bar)) == pytest.approx(2 * (0.4 - 1 / 3) ** 2 + (0.2 - 1 / 3) ** 2)  # Eq. 29
    h1 = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    h2 = -(0.1 * math.log(0.1) + 0.6 * math.log(0.6) + 0.3 * math.log(0.3))
    assert float(confidence_loss(pi)) == pytest.approx((h1 + h2) / 2)  # Eq. 30
    assert float(entropy(torch.tensor([1.0, 0.0]))) == 0.0  # clamped log, no NaN


def test_stage_weight_forms():
    h = 0.8
    assert stage_weight_factors(h, "lin_ent") == pytest.approx((0.2, 0.8))
    assert stage_weight_factors(h, "quad_ent") == pytest.approx((0.04, 0.64))
    assert stage_weight_factors(h, "const") == (1.0, 1.0)
    assert stage_weight_factors(h, "rev_ent") == pytest.approx((0.8, 0.2))
    with pytest.raises(ValueError):
        stage_weight_factors(h, "cubic")


def test_view_contrastive_by_hand():
    torch.manual_seed(1)
    a_u, b_u, a_i, b_i = (torch.randn(3, 4) for _ in range(4))
    tau = 0.5

    def one_way(x, y):  # Eq. 28b by loops
        total = 0.0
        for r in range(x.shape[0]):
            sims = [float(F.cosine_similarity(x[r], y[c], dim=0)) / tau for c in range(y.shape[0])]
            total += -sims[r] + math.log(sum(math.exp(s) for s in sims))
        return total / x.shape[0]

    want = 0.5 * (one_way(a_u, b_u) + one_way(a_i, b_i) + one_way(b_u, a_u) + one_way(b_i, a_i))
    assert float(view_contrastive(a_u, b_u, a_i, b_i, tau)) == pytest.approx(want, rel=1e-5)


# -- the stage controller (Eq. 26) --------------------------------------------------------------
def test_controller_switch_after_w_consecutive_steps(make):
    m = make(entropy_threshold=0.9, trigger_window=3)
    m.train()
    stages = [m.controller.advance(h) for h in (0.95, 0.95, 0.5, 0.95, 0.91)]
    assert stages == [1, 1, 1, 1, 1] and int(m.controller.counter) == 2  # reset by the 0.5
    assert m.controller.advance(0.9) == 2  # third consecutive step at H* switches on this step
    assert int(m.controller.switch_step) == 6
    m.controller.advance(0.1)
    assert int(m.controller.stage) == 2 and int(m.controller.switch_step) == 6  # once and for good
    for _ in range(5):
        m.controller.advance(0.99)
    assert int(m.controller.switch_step) == 6


def test_controller_variants(make):
    m = make(trigger_window=2, stage1_min_steps=4)
    m.train()
    assert [m.controller.advance(1.0) for _ in range(6)] == [1, 1, 1, 1, 2, 2]  # stage-1 length >= 4
    m = make(trigger_window=2, entropy_smoothing="window", smoothing_steps=3)
    m.train()
    # window means: 1.0, 0.9, (1+.8+.2)/3=.667, (.8+.2+1)/3=.667, (.2+1+1)/3=.733, 1.0, 1.0
    assert [m.controller.advance(h) for h in (1.0, 0.8, 0.2, 1.0, 1.0, 1.0, 1.0)] == [1, 2, 2, 2, 2, 2, 2]
    m = make(trigger_window=2, entropy_smoothing="window", smoothing_steps=3)
    m.train()
    assert [m.controller.advance(h) for h in (0.5, 1.0, 1.0, 1.0, 1.0)] == [1, 1, 1, 1, 2]
    m = make(trigger_window=1, switch_unit="epoch")
    m.train()
    m.pre_epoch_processing()
    for h in (0.5, 0.6):
        m.controller.advance(h)
    m.pre_epoch_processing()  # epoch mean 0.55 < 0.9
    assert int(m.controller.stage) == 1 and int(m.controller.epoch) == 1
    for h in (0.95, 0.99):
        m.controller.advance(h)
    m.pre_epoch_processing()
    assert int(m.controller.stage) == 2 and int(m.controller.switch_epoch) == 2
    m = make(routing_schedule="fixed_step", fixed_switch_epoch=1)
    m.train()
    m.controller.advance(1.0)
    m.pre_epoch_processing()
    assert m.controller.advance(0.0) == 2 and int(m.controller.switch_epoch) == 1
    assert int(make(routing_schedule="confidence_only").controller.stage) == 2
    m = make(routing_schedule="coverage_only")
    m.train()
    assert max(m.controller.advance(1.0) for _ in range(10)) == 1


def test_routing_weights_gated_by_stage(make):
    m = make(lambda_r=0.3)
    assert m.controller.loss_weights(0.8, 1) == pytest.approx((0.3 * 0.2, 0.0))  # Eq. 31, stage 1
    assert m.controller.loss_weights(0.8, 2) == pytest.approx((0.0, 0.3 * 0.8))
    assert make(routing_schedule="none").controller.loss_weights(0.8, 1) == (0.0, 0.0)


def test_controller_survives_state_dict(make):
    m = make(trigger_window=2)
    m.train()
    for h in (0.95, 0.95, 0.95):
        m.controller.advance(h)
    state = m.state_dict()
    assert {"controller.stage", "controller.counter", "controller.step", "controller.switch_step"} <= set(state)
    fresh = make(trigger_window=2)
    assert int(fresh.controller.stage) == 1
    fresh.load_state_dict(state)
    assert (int(fresh.controller.stage), int(fresh.controller.step), int(fresh.controller.switch_step), int(fresh.controller.counter)) == (2, 3, 2, 3)


def test_controller_frozen_in_eval(make):
    m = make()
    m.eval()
    batch = {"users": torch.tensor([0, 1, 2]), "pos_items": torch.tensor([1, 2, 3]), "neg_items": torch.tensor([4, 5, 6])}
    with torch.no_grad():
        m.calculate_loss(batch)
    assert int(m.controller.step) == 0


# -- forward pieces -----------------------------------------------------------------------------
def test_backbone_and_cues(make):
    m = make(view_fusion="mean")  # the paper's channels: r = [z, h^A, h^S] (Eq. 9)
    t = m.encode()
    torch.testing.assert_close(t["z"], 0.5 * (t["z_ui"] + t["z_uig"]))  # Eq. 6
    ego = torch.cat([m.user_embedding.weight, m.item_embedding.weight])
    a = m.adj_ui.to_dense()
    torch.testing.assert_close(t["z_ui"], (ego + a @ ego + a @ a @ ego) / 3, atol=1e-5, rtol=1e-5)  # Eq. 5
    h_items = m.image_proj(m.v_feat)
    hist = m.train_matrix[4].indices
    torch.testing.assert_close(t["r_user"][4, 1], h_items[hist].mean(0), atol=1e-5, rtol=1e-5)  # Eq. 8
    torch.testing.assert_close(t["r_item"][:, 0], t["z"][m.n_users:])  # Eq. 9
    w = m.expert_weights()
    x = m.expert_inputs(w, t["r_user"][:2])  # Eq. 10
    torch.testing.assert_close(x[1, 4], w[4, 0] * t["r_user"][1, 0] + w[4, 1] * t["r_user"][1, 1]
                               + w[4, 2] * t["r_user"][1, 2])


def test_learned_templates_start_at_the_paper_templates_and_move(make):
    fixed, learned, free = make(view_fusion="mean", templates="fixed"), make(view_fusion="mean", templates="learned"), \
        make(view_fusion="mean", templates="free")
    torch.testing.assert_close(learned.expert_weights(), fixed.template_weights)  # Eqs. 12-15 at the start
    torch.testing.assert_close(free.expert_weights(), torch.full((fixed.n_experts, 3), 1 / 3))  # "w/o Templates"
    assert not fixed.template_weights.requires_grad and learned.template_logits.requires_grad
    users, items = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    y, _, _ = learned.score_pairs(learned.encode(), users, items)
    y.sum().backward()
    assert learned.template_logits.grad.abs().sum() > 0  # the mixtures train with the model


def test_template_prior_is_the_kl_to_the_templates_per_interaction(make):
    from models.magnet import template_divergence
    centre, logits = torch.tensor([[0.8, 0.1, 0.1]]), torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    by_hand = 0.8 * math.log(0.8 / 0.5) + 2 * 0.1 * math.log(0.1 / 0.25)
    assert float(template_divergence(centre, logits)) == pytest.approx(by_hand, rel=1e-5)
    m = make(templates="learned", template_prior=50.0)
    assert m.template_prior == pytest.approx(50.0 / m.train_matrix.nnz)  # lambda_t / |R|
    m.train()
    m.pre_epoch_processing()
    batch = {"users": torch.tensor([0, 1, 2]), "pos_items": torch.tensor([1, 2, 3]),
             "neg_items": torch.tensor([5, 6, 7])}
    assert float(m.calculate_loss(batch)["template_prior"].detach()) == pytest.approx(0.0, abs=1e-6)  # at the templates
    with torch.no_grad():
        m.template_logits[0] = torch.tensor([0.0, 1.0, 2.0])
    out = m.calculate_loss(batch)
    m.zero_grad()
    out["template_prior"].backward()
    moved = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), -1)
    torch.testing.assert_close(m.template_logits.grad[0], m.template_prior * (moved - m.template_centre[0]))
    assert "template_prior" not in make(templates="learned").calculate_loss(batch)  # 0 = off
    fixed = make(templates="fixed", template_prior=50.0)  # a prior on learned blends only
    assert fixed.template_prior == 0.0 and "template_prior" not in fixed.calculate_loss(batch)
    assert "template_prior" not in make(moe=False, template_prior=50.0).calculate_loss(batch)


def test_expert_heads_by_hand(make):
    m = make(expert_head="hadamard_concat")
    xu, xi = torch.randn(2, m.n_experts, 8), torch.randn(2, m.n_experts, 8)
    s = m.heads.pair(xu, xi)
    h = m.heads
    e, b = 3, 1
    had = (h.w_had[e] @ xu[b, e]) * xi[b, e]
    mlp = h.w2[e].T @ torch.relu(h.w1_user[e].T @ xu[b, e] + h.w1_item[e].T @ xi[b, e] + h.b1[e]) + h.b2[e]
    torch.testing.assert_close(s[b, e], had + mlp, atol=1e-5, rtol=1e-5)


def test_loss_parts_and_routing_stats(make):
    m = make(lambda_r=0.3, trigger_window=100)
    m.train()
    m.pre_epoch_processing()
    batch = {"users": torch.tensor([0, 1, 2, 3]), "pos_items": torch.tensor([1, 2, 3, 4]),
             "neg_items": torch.tensor([5, 6, 7, 8])}
    out = m.calculate_loss(batch)
    assert set(out) == {"bpr", "ctr", "cov", "conf"}
    m.eval()
    tables = m.encode()
    _, pi, _ = m.score_pairs(tables, batch["users"], batch["pos_items"])
    pi_bar = pi.mean(0)
    h_norm = float(entropy(pi_bar.detach())) / math.log(9)
    assert m.epoch_stats()["H~"] == pytest.approx(h_norm, abs=1e-5)
    assert float(out["cov"]) == pytest.approx(0.3 * (1 - h_norm) * float(coverage_loss(pi_bar)), rel=1e-4)
    assert float(out["conf"]) == 0.0 and int(m.controller.step) == 1
    out["bpr"].backward()
    assert m.router.first.weight.grad is not None


def test_sv_and_no_moe(make):
    m = make(view="SV")
    assert m.adj_uig is None
    batch = {"users": torch.tensor([0, 1]), "pos_items": torch.tensor([1, 2]), "neg_items": torch.tensor([3, 4])}
    m.train()
    assert float(m.calculate_loss(batch)["ctr"]) == 0.0
    m = make(moe=False)
    out = m.calculate_loss(batch)
    assert float(out["cov"]) == 0.0 and m.router is None and m.epoch_stats() == {}


def test_k_larger_than_e_is_an_error(make):
    with pytest.raises(ValueError, match="K=4 must lie in 1..E.*E=3"):
        make(families=["bal"])
    assert make(families=["bal"], K=2).n_experts == 3


@pytest.mark.parametrize("variant", [{}, {"expert_head": "concat_mlp", "router": "mlp"}, {"expert_head": "concat_mlp"},
                                     {"view_fusion": "mean"},
                                     {"expert_head": "hadamard_concat", "templates": "free"},
                                     {"moe": False}, {"view": "SV", "expert_replicas": 2, "K": 6}])
def test_full_sort_equals_pairwise(make, variant):
    m = make(**variant)
    m.eval()
    m.score_block_budget = 7 * m.n_experts * 8  # force several item blocks
    m.RANKING_USERS, m.RANKING_ITEMS = 3, 5  # and several user x item tiles
    users = torch.tensor([0, 3, 7, 29])
    with torch.no_grad():
        m.start_evaluation()
        full = m.full_sort_predict({"users": users})
        m.end_evaluation()
        tables = m.encode()
        uu = users.repeat_interleave(m.n_items)
        ii = torch.arange(m.n_items).repeat(users.numel())
        pair, _, _ = m.score_pairs(tables, uu, ii)
    torch.testing.assert_close(full, pair.view(users.numel(), m.n_items), atol=1e-5, rtol=1e-5)


def test_identity_expert_init(make):
    heads = make(expert_init="identity").heads
    eye = torch.eye(8).expand_as(heads.w_had)
    assert (heads.w_had - eye).abs().max() <= 0.1 / math.sqrt(8) + 1e-6
    assert not torch.equal(heads.w_had[0], heads.w_had[1])  # experts still differ (Theta_e)
    assert (make(expert_init="default").heads.w_had.abs() <= 1 / math.sqrt(8)).all()
    both = make(expert_init="identity", expert_head="hadamard_concat", dropout=0.0)  # the MLP part starts at 0
    assert not both.heads.w2.any() and not both.heads.b2.any() and both.heads.w1_user.any()
    plain = make(expert_init="identity", expert_head="hadamard", dropout=0.0)
    plain.load_state_dict({k: v for k, v in both.state_dict().items() if not k.startswith(("heads.w1", "heads.w2",
                                                                                             "heads.b"))})
    users, items = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    both.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(both.score_pairs(both.encode(), users, items)[0],
                                   plain.score_pairs(plain.encode(), users, items)[0])


def test_view_fusion_degree_gate_mixes_the_views_by_node_degree(make):
    """view_fusion degree_gate (extension of Eq. 6): z = z^UI + a (z^UIG - z^UI), a = sigmoid(w_s log(1 + deg) + b_s)
    per side; it starts as Eq. 6's mean (a = 0.5), and a batch's rows equal the full encode's."""
    import numpy as np

    m = make(dropout=0.0, view_fusion="degree_gate")
    m.eval()
    with torch.no_grad():
        t = m.encode()
        torch.testing.assert_close(t["z"], 0.5 * (t["z_ui"] + t["z_uig"]))  # a = 0.5 at the start
        m.fusion_slope.copy_(torch.tensor([0.7, -1.3]))
        m.fusion_bias.copy_(torch.tensor([0.2, 0.4]))
        t = m.encode()
        deg = np.concatenate([np.asarray(m.train_matrix.sum(axis=1)).ravel(), np.asarray(m.train_matrix.sum(axis=0)).ravel()])
        side = torch.cat([torch.zeros(m.n_users), torch.ones(m.n_items)]).long()
        slope, bias = torch.tensor([0.7, -1.3])[side], torch.tensor([0.2, 0.4])[side]
        a = torch.sigmoid(slope * torch.log1p(torch.as_tensor(deg, dtype=torch.float32)) + bias)
        torch.testing.assert_close(t["z"], t["z_ui"] + a.unsqueeze(1) * (t["z_uig"] - t["z_ui"]))
        users, items = torch.tensor([0, 2]), torch.tensor([1, 4, 6])
        rows = m.encode(users, items)
        torch.testing.assert_close(rows["z"], t["z"][torch.cat([users, items + m.n_users])], atol=1e-5, rtol=1e-5)
    assert not hasattr(make(view_fusion="degree_gate", view="SV"), "fusion_slope")  # one view: nothing to mix


def test_view_fusion_per_expert_gives_each_expert_its_own_view_share(make):
    """view_fusion per_expert (extension of Eq. 6): expert e reads z^UI + a_e (z^UIG - z^UI) in its behaviour
    share, a_e = sigmoid(t_e) from logit(view_share); at the start each expert input equals Eq. 10 on the
    fused z, and a changed a_e changes only that expert's input."""
    fused = make(dropout=0.0, view_fusion="mean")
    m = make(dropout=0.0, view_fusion="per_expert")
    m.load_state_dict(fused.state_dict(), strict=False)
    m.eval(), fused.eval()
    users = torch.tensor([0, 2, 5])
    with torch.no_grad():
        t, tf = m.encode(), fused.encode()
        x = m.expert_inputs(m.expert_weights(), t["r_user"][users])
        torch.testing.assert_close(x, fused.expert_inputs(fused.expert_weights(), tf["r_user"][users]))
        m.expert_view_logit[1] = math.log(0.2 / 0.8)  # expert 1: a = 0.2
        w = m.expert_weights()
        base = fused.expert_weights()
        torch.testing.assert_close(w[1], torch.stack([0.8 * base[1, 0], 0.2 * base[1, 0], base[1, 1], base[1, 2]]))
        x2 = m.expert_inputs(w, t["r_user"][users])
        z_ui, z_uig = t["z_ui"][users], t["z_uig"][users]
        h = t["r_user"][users][:, 2:]
        want = base[1, 0] * (z_ui + 0.2 * (z_uig - z_ui)) + base[1, 1] * h[:, 0] + base[1, 2] * h[:, 1]
        torch.testing.assert_close(x2[:, 1], want)
        torch.testing.assert_close(x2[:, 0], x[:, 0])
    with pytest.raises(ValueError, match="per_expert"):
        make(view_fusion="per_expert", modality_scale="rms")


def test_view_share_weights_the_two_views(make):
    """view_share a (extension of Eq. 6): z = (1 - a) z^UI + a z^UIG; a = 0.5 is Eq. 6's mean, to the last bit."""
    with torch.no_grad():
        for a in (0.5, 0.3, 1.0):
            m = make(dropout=0.0, view_share=a)
            m.eval()
            t = m.encode()
            expected = 0.5 * (t["z_ui"] + t["z_uig"]) if a == 0.5 else (1 - a) * t["z_ui"] + a * t["z_uig"]
            assert torch.equal(t["z"], expected) if a == 0.5 else torch.allclose(t["z"], expected, atol=1e-6)
    with pytest.raises(ValueError, match="view_share"):
        make(view_share=1.5)


def test_router_input_l2_routes_on_directions_only(make):
    """router_input l2: the router reads q = [z_u / |z_u|; z_i / |z_i|] (Eq. 16 on row-normalised z; raw: z
    itself), so an item's gates do not depend on its norm; full ranking still equals pairwise scoring."""
    for mode in ("raw", "l2", "user", "product"):
        m = make(router_input=mode, dropout=0.0)
        m.eval()
        with torch.no_grad():
            t = m.encode()
        n_u = m.n_users
        expected = {"raw": t["z"], "product": t["z"], "l2": F.normalize(t["z"], dim=-1),
                    "user": torch.cat([t["z"][:n_u], torch.zeros_like(t["z"][n_u:])])}[mode]
        torch.testing.assert_close(t["z_router"], expected)
        if mode == "user":  # one mixture per user: the same gates for every item
            with torch.no_grad():
                _, pi, _ = m.score_pairs(t, torch.tensor([4, 4, 4]), torch.tensor([0, 3, 7]))
            torch.testing.assert_close(pi, pi[:1].expand_as(pi))
        if mode == "product":  # Eq. 16 on q = z_u * z_i: logits W (z_u * z_i) + b, no additive item term
            users, items = torch.tensor([4, 1]), torch.tensor([0, 7])
            with torch.no_grad():
                _, pi, _ = m.score_pairs(t, users, items)
                zu, zi = t["z"][users], t["z"][n_u + items]
                expected_pi = torch.softmax((zu * zi) @ m.router.first.weight.T + m.router.first.bias, -1)
            torch.testing.assert_close(pi, expected_pi)
    users = torch.tensor([0, 1, 2])
    for mode, router in (("l2", "linear"), ("product", "linear"), ("product", "mlp")):
        m = make(router_input=mode, router=router, dropout=0.0)
        m.eval()
        with torch.no_grad():
            m.start_evaluation()
            full = m.full_sort_predict({"users": users})
            m.end_evaluation()
            t = m.encode()
            pair, _, _ = m.score_pairs(t, users.repeat_interleave(m.n_items), torch.arange(m.n_items).repeat(3))
        torch.testing.assert_close(full, pair.view(3, m.n_items), atol=1e-5, rtol=1e-5)


def test_router_grad_detach_keeps_routing_gradient_out_of_z(make):
    """router_grad=detach: a loss on the routing alone trains the router but leaves the ID tables alone."""
    users, items = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    for mode, reaches_z in (("full", True), ("detach", False)):
        m = make(router_grad=mode, dropout=0.0)
        _, pi, _ = m.score_pairs(m.encode(), users, items)
        confidence_loss(pi).backward()
        assert m.router.first.weight.grad is not None
        grad = m.user_embedding.weight.grad
        assert (grad is not None and float(grad.abs().sum()) > 0) == reaches_z


def test_user_cue_target_exclude_is_the_leave_one_out_mean(make):
    m = make(user_cue_target="exclude", view_fusion="mean")
    t = m.encode()
    deg = m.train_matrix.getnnz(axis=1)
    u = int(next(i for i in range(m.n_users) if deg[i] >= 2))
    u1 = int(next(i for i in range(m.n_users) if deg[i] == 1)) if (deg == 1).any() else None
    hist = m.train_matrix[u].indices
    users = torch.tensor([u] + ([u1] if u1 is not None else []))
    pos = torch.tensor([int(hist[0])] + ([int(m.train_matrix[u1].indices[0])] if u1 is not None else []))
    reps = m._cues_without_target(t["r_user"][users], t["r_item"][pos], users)
    h_items = m.image_proj(m.v_feat)
    torch.testing.assert_close(reps[0, 1], h_items[hist[1:]].mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reps[0, 0], t["r_user"][u, 0])  # z untouched
    if u1 is not None:
        assert float(reps[1, 1:].abs().sum()) == 0.0  # no other history: empty mean -> 0


def test_lr_scale_groups(make):
    from mmrec.trainer import build_optimizer
    m = make(embedding_lr_scale=3.0, head_lr_scale=0.5, weight_decay_on="non_embedding", weight_decay=1e-4)
    groups = build_optimizer(m.config, m).param_groups
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(m.user_embedding.weight)]["lr"] == pytest.approx(3e-3)
    assert by_param[id(m.user_embedding.weight)]["weight_decay"] == 0.0
    assert by_param[id(m.heads.w_had)]["lr"] == pytest.approx(5e-4)
    assert by_param[id(m.score_vector)]["lr"] == pytest.approx(5e-4)
    assert by_param[id(m.router.first.weight)]["lr"] == pytest.approx(1e-3)
    assert by_param[id(m.router.first.weight)]["weight_decay"] == pytest.approx(1e-4)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in m.parameters() if p.requires_grad)
    slow_router = make(router_lr_scale=0.1)
    by_param = {id(p): g for g in build_optimizer(slow_router.config, slow_router).param_groups for p in g["params"]}
    assert by_param[id(slow_router.router.first.weight)]["lr"] == pytest.approx(1e-4)
    assert by_param[id(slow_router.router.first.bias)]["lr"] == pytest.approx(1e-4)
    slow_blends = make(templates="learned", template_lr_scale=0.3)
    by_param = {id(p): g for g in build_optimizer(slow_blends.config, slow_blends).param_groups for p in g["params"]}
    assert by_param[id(slow_blends.template_logits)]["lr"] == pytest.approx(3e-4)


def test_cue_centering_centres_the_item_cues_and_keeps_eq_8(make):
    m = make(cue_centering=True, view_fusion="mean")
    assert m.image_proj.bias is None and m.text_proj.bias is None
    t = m.encode()
    for group in (1, 2):  # h^A, h^S: zero mean over the catalogue (no shared component from f_m)
        assert float(t["r_item"][:, group].mean(0).abs().max()) < 1e-5
    hist = m.train_matrix[4].indices
    torch.testing.assert_close(t["r_user"][4, 1], t["r_item"][hist, 1].mean(0), atol=1e-5, rtol=1e-5)  # Eq. 8


def test_default_cues_are_not_one_shared_vector(tmp_path):
    """Issue #11: with the shipped defaults, after one epoch on `mini` the cues that feed the experts vary
    across users more than they share one common vector: for h^A and h^S the root-mean-square spread around
    the user mean is at least twice the norm of that mean (uncentred f_m gives ~0.3-0.5 here)."""
    from mmrec.data import RecDataset
    from mmrec.data.sources import ensure_generated
    from mmrec.trainer import Trainer, init_seed

    config = load_config("MAGNET", "mini", {"epochs": 1, "seed": 1, "num_threads": 1,
                                             "cache_dir": str(tmp_path / "cache")})
    ensure_generated(config)
    dataset = RecDataset(config)
    init_seed(1)
    model = MAGNET(config, dataset)
    Trainer(config, model, dataset, None).fit()
    model.eval()
    with torch.no_grad():
        cues = model.encode()["r_user"]
    for group in (1, 2):
        mean = cues[:, group].mean(0)
        spread = (cues[:, group] - mean).pow(2).sum(1).mean().sqrt()
        assert float(spread) >= 2.0 * float(mean.norm()), (group, float(spread), float(mean.norm()))


def test_modality_scale_rms_matches_each_cue_to_the_behaviour_channel(make):
    """``modality_scale: rms``: r^A and r^S are rescaled so that their RMS row norm over the encoded rows
    (users and items together) equals r^B's; directions are untouched, and a batch uses its own rows."""
    plain, scaled = make(modality_scale="none", view_fusion="mean"), make(modality_scale="rms", view_fusion="mean")
    scaled.load_state_dict(plain.state_dict())
    a, b = plain.encode(), scaled.encode()
    rows_a = torch.cat([a["r_user"], a["r_item"]])
    rows_b = torch.cat([b["r_user"], b["r_item"]])
    rms = rows_b.pow(2).sum(-1).mean(0).sqrt()
    torch.testing.assert_close(rms, rms[0].expand(3), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows_b[:, 0], rows_a[:, 0])  # the behaviour channel keeps its scale
    factor = rms[1] / rows_a[:, 1].pow(2).sum(-1).mean().sqrt()
    assert float(factor.detach()) != pytest.approx(1.0, abs=1e-3)  # the test input is actually rescaled
    torch.testing.assert_close(rows_b[:, 1], factor * rows_a[:, 1], rtol=1e-5, atol=1e-6)
    users, items = torch.tensor([0, 3]), torch.tensor([1, 2, 5])
    batch = scaled.encode(users, items)
    rows = torch.cat([batch["r_user"], batch["r_item"]])
    rms_batch = rows.pow(2).sum(-1).mean(0).sqrt()
    torch.testing.assert_close(rms_batch, rms_batch[0].expand(3), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="modality_scale"):
        make(modality_scale="layer")


def test_modality_scale_learned_is_a_trainable_gain_per_cue_channel(make):
    """``modality_scale: learned``: r^A, r^S times exp(s_A), exp(s_S); s = 0 at the start (= none), and the
    gains receive gradient from the loss."""
    plain, learned = make(modality_scale="none", view_fusion="mean"), make(modality_scale="learned", view_fusion="mean")
    learned.load_state_dict(plain.state_dict(), strict=False)
    torch.testing.assert_close(learned.encode()["r_item"], plain.encode()["r_item"])
    with torch.no_grad():
        learned.cue_log_gain.copy_(torch.tensor([math.log(2.0), math.log(0.5)]))
    a, b = plain.encode(), learned.encode()
    torch.testing.assert_close(b["r_user"][:, 0], a["r_user"][:, 0])
    torch.testing.assert_close(b["r_user"][:, 1], 2.0 * a["r_user"][:, 1])
    torch.testing.assert_close(b["r_item"][:, 2], 0.5 * a["r_item"][:, 2])
    batch = {"users": torch.tensor([0, 1]), "pos_items": torch.tensor([2, 3]), "neg_items": torch.tensor([4, 5])}
    learned.train()
    sum(learned.calculate_loss(batch).values()).backward()
    assert learned.cue_log_gain.grad is not None and float(learned.cue_log_gain.grad.abs().sum()) > 0


def test_effective_routing_weights_are_reported(make):
    """The per-epoch log carries the effective weights of L_cov and L_conf in Eq. 32 (lambda_r times
    Eq. 31's factor in the current stage): stage 1 -> lambda_r (1 - H~) on coverage, 0 on confidence."""
    m = make(lambda_r=0.3, switch_signal="dense", entropy_threshold=1.1)  # never switches
    m.train()
    users = torch.tensor([0, 1, 2, 3])
    batch = {"users": users, "pos_items": torch.tensor([0, 1, 2, 3]), "neg_items": torch.tensor([4, 5, 6, 7])}
    m.calculate_loss(batch)
    stats = m.epoch_stats()
    assert stats["stage"] == 1 and stats["w_conf"] == 0.0
    assert stats["w_cov"] == pytest.approx(0.3 * (1.0 - stats["H~"]), rel=1e-6)


def test_amazon_blocks_hold_table_3_only():
    """Acceptance 2 of issue #11: -d baby/sports/clothing/elec run the top level's training decisions; their
    blocks hold Table 3's values (MAGNET.md section 8) and the paper's patience, nothing else."""
    table3 = {  # k, r, d, alpha, beta, delta, H*, W, lambda_r, lr, weight decay, dropout, tau, lambda_ctr
        "baby": (20, 150, 64, .6, .2, .5, .90, 3, .30, 1e-3, 2e-5, .10, .5, .01),
        "sports": (20, 200, 64, .6, .2, .4, .87, 4, .30, 1.5e-3, 2e-5, .20, 1.5, .01),
        "clothing": (30, 200, 48, .6, .1, .8, .90, 5, .40, 1e-3, 4e-5, .20, .2, .01),
        "elec": (30, 200, 48, .6, .2, .6, .87, 5, .30, 1e-3, 2e-4, .15, .2, .01)}
    keys = ("knn_k", "expansion_r", "embedding_size", "alpha", "beta", "delta", "entropy_threshold",
            "trigger_window", "lambda_r", "learning_rate", "weight_decay", "dropout", "tau", "lambda_ctr")
    import yaml
    from pathlib import Path

    blocks = yaml.safe_load((Path(__file__).parents[1] / "configs/model/MAGNET.yaml").read_text())["dataset_overrides"]
    top = load_config("MAGNET", "mini").to_dict()
    for name, values in table3.items():
        assert set(blocks[name]) == set(keys) | {"stopping_step"}, name
        cfg = load_config("MAGNET", name).to_dict()
        assert tuple(cfg[k] for k in keys) == pytest.approx(values), name
        assert cfg["stopping_step"] == 5 and cfg["n_layers"] == 2 and cfg["K"] == 4
        decisions = set(top) - set(keys) - {"stopping_step", "dataset", "inter_file_name"}
        differing = {k for k in decisions if cfg.get(k) != top[k]}
        assert not differing, (name, differing)


def test_datasets_without_an_amazon_block_train_with_the_top_level():
    """One recipe: the synthetic sets (baby_synth included, though it has Baby's size) get no per-dataset
    MAGNET values; only the four Amazon blocks exist, and every model key of mid_synth and baby_synth equals
    mini's."""
    import yaml
    from pathlib import Path

    shipped = yaml.safe_load((Path(__file__).parents[1] / "configs/model/MAGNET.yaml").read_text())
    assert set(shipped["dataset_overrides"]) == {"baby", "sports", "clothing", "elec"}
    top = load_config("MAGNET", "mini").to_dict()
    model_keys = set(shipped) - {"dataset_overrides", "grid"}
    for name in ("mid_synth", "mid_synth_b", "baby_synth"):
        cfg = load_config("MAGNET", name).to_dict()
        assert {k: cfg[k] for k in model_keys} == {k: top[k] for k in model_keys}, name
    assert (top["knn_k"], top["expansion_r"]) == (10, 30)


def test_embedding_reg_is_half_the_squared_norm_of_the_batch_id_rows(make):
    """Eq. 32's lambda ||Theta||^2 on the ID rows of the batch: 0.5 (|e_u|^2 + |e_i|^2 + |e_j|^2), batch mean."""
    batch = {"users": torch.tensor([0, 1, 1]), "pos_items": torch.tensor([2, 3, 4]), "neg_items": torch.tensor([5, 5, 6])}
    assert "reg" not in make(embedding_reg=0.0).calculate_loss(batch)  # off by default
    m = make(embedding_reg=0.2)
    out = m.calculate_loss(batch)
    eu, ei = m.user_embedding.weight, m.item_embedding.weight
    rows = [(u, i, j) for u, i, j in zip([0, 1, 1], [2, 3, 4], [5, 5, 6])]
    by_hand = sum(eu[u].pow(2).sum() + ei[i].pow(2).sum() + ei[j].pow(2).sum() for u, i, j in rows) * 0.5 / 3
    torch.testing.assert_close(out["reg"], 0.2 * by_hand)
    out["reg"].backward()
    torch.testing.assert_close(eu.grad[1], 0.2 * 2 * eu[1].detach() / 3)  # user 1 appears twice


def test_hits_by_popularity_by_hand():
    """utils.magnet_parts --popularity: the hit rate of held-out pairs per training-popularity bucket."""
    import numpy as np
    import scipy.sparse as sp

    from utils.magnet_parts import hits_by_popularity

    train = sp.csr_matrix(np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]))  # popularity 3, 2, 1, 0, 0
    truth = sp.csr_matrix(np.array([[0, 0, 0, 1, 1], [0, 0, 1, 1, 0], [0, 1, 0, 0, 0]]))
    top = np.array([[3, 1], [2, 4], [0, 1]])  # users 0, 1, 2: hits (0, 3), (1, 2), (2, 1)
    out = hits_by_popularity(top, np.array([0, 1, 2]), truth, train, edges=(0, 1, 3))
    # [0,1): items 3, 4 -> pairs (0,3) hit, (0,4) miss, (1,3) miss; [1,3): items 1, 2 -> (1,2) hit, (2,1) hit
    assert out == [("[0,1)", 3, pytest.approx(1 / 3)), ("[1,3)", 2, 1.0), ("[3,inf)", 0, pytest.approx(float("nan"), nan_ok=True))]


def test_induced_edge_quality_by_hand():
    """utils.magnet_parts --induced: E+ against held-out pairs (precision, recall, hub share, popularity)."""
    import numpy as np
    import scipy.sparse as sp

    from utils.magnet_parts import induced_edge_quality

    train = sp.csr_matrix(np.array([[1, 1, 0, 0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]]))  # pop 2, 1, 0...
    truth = sp.csr_matrix(np.array([[0, 0, 1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]]))
    users, items = np.array([0, 0, 1, 1]), np.array([2, 4, 2, 1])  # hits (0, 2), (1, 2); (0, 3) not induced
    q = induced_edge_quality(users, items, truth, train)
    assert q["edges"] == 4 and q["precision"] == 0.5 and q["recall"] == pytest.approx(2 / 3)
    assert q["top10_share"] == 0.5  # the 10% most-induced items = item 2, with 2 of the 4 edges
    assert q["items_without"] == 0.7  # 7 of 10 items have no induced edge
    assert q["induced_popularity"] == pytest.approx(1 / 4) and q["catalogue_popularity"] == pytest.approx(0.3)


def test_score_parts_rank_by_the_parts_they_name(make):
    """utils.magnet_parts: 'full' is the model's ranking score, 'z dot' the fused backbone's dot product,
    'cue similarity' the two cue dot products (what the tool's table attributes to each part)."""
    from utils.magnet_parts import score_parts

    m = make()
    m.eval()
    users = torch.tensor([0, 2, 5])
    with torch.no_grad():
        parts = score_parts(m)
        t = m.encode()
        full = m.full_sort_predict({"users": users})
    z = t["z"]
    torch.testing.assert_close(parts["full"](users), full)
    torch.testing.assert_close(parts["z dot"](users), z[users] @ z[m.n_users:].T)
    u, i = t["r_user"][users], t["r_item"]
    a_, s_ = (2, 3) if m.per_expert_view else (1, 2)  # per_expert: [z^UI, z^UIG, h^A, h^S]; mean: [z, h^A, h^S]
    torch.testing.assert_close(parts["cue similarity"](users), u[:, a_] @ i[:, a_].T + u[:, s_] @ i[:, s_].T)
    assert m.per_expert_view  # the default
    assert parts["z^UI dot"](users).shape == (3, m.n_items)
    before = m.image_proj.weight.detach().clone()
    with torch.no_grad():
        no_cues = parts["full, no cues"](users)
        torch.testing.assert_close(m.image_proj.weight, before)  # restored after scoring
        for proj in (m.image_proj, m.text_proj):
            for p in proj.parameters():
                p.zero_()
        torch.testing.assert_close(no_cues, m.full_sort_predict({"users": users}))
    assert not torch.allclose(no_cues, full)


def test_routing_parts_average_the_gates_they_name(make):
    """utils.magnet_parts --routing: the full score re-mixed with each pair's Top-K gates averaged over the user's
    items, over the item's users, or uniform; and per popularity bucket the mean gates and sum_e g_e (w^B_e)^2."""
    import numpy as np

    from models.magnet import topk_gates
    from utils.magnet_parts import gates_by_popularity, routing_parts

    m = make(dropout=0.0)
    m.eval()
    with torch.no_grad():
        parts, item_gates = routing_parts(m)
        t = m.encode()
        users = torch.arange(m.n_users).repeat_interleave(m.n_items)
        items = torch.arange(m.n_items).repeat(m.n_users)
        x = m.expert_inputs(m.expert_weights(), t["r_user"])[users], m.expert_inputs(m.expert_weights(), t["r_item"])[items]
        y = (m.heads.pair(*x) @ m.score_vector).view(m.n_users, m.n_items, -1)  # v^T s^(e) per pair
        z = t["z_router"]
        g = topk_gates(torch.softmax(m.router.pair(z[users], z[m.n_users + items]), -1), m.top_k).view_as(y)
        some = torch.tensor([0, 3])
        torch.testing.assert_close(parts["full"](some), (g * y).sum(-1)[some], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(parts["user-mean gates"](some), (g.mean(1, keepdim=True) * y).sum(-1)[some],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(parts["item-mean gates"](some), (g.mean(0, keepdim=True) * y).sum(-1)[some],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(parts["uniform gates"](some), y.mean(-1)[some], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(item_gates, g.mean(0))
    gates = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])  # 3 items, 2 experts with w^B 0.8 and 0.2
    out = gates_by_popularity(gates, torch.tensor([0.8, 0.2]), np.array([0, 5, 7]), edges=(0, 3))
    assert [(b, n) for b, n, _, _ in out] == [("[0,3)", 1), ("[3,inf)", 2)]
    assert out[0][2] == pytest.approx(0.64) and out[1][2] == pytest.approx((0.5 * 0.68 + 0.04) / 2)
    assert out[1][3] == pytest.approx([0.25, 0.75])
    with pytest.raises(ValueError, match="moe: false"):
        routing_parts(make(moe=False))


def test_cue_init_pca_projects_on_the_principal_directions(make):
    """``cue_init: pca``: f_m's rows are orthonormal top principal directions of its (centred) input, so
    the item cues keep as much feature variance as any d-dim linear map can."""
    m = make(cue_init="pca", cue_centering=True)
    w = m.text_proj.weight.detach()
    torch.testing.assert_close(w @ w.T, torch.eye(w.shape[0]), atol=1e-4, rtol=1e-4)
    feats = m.t_feat
    captured = (feats @ w.T).pow(2).sum()
    sv = torch.linalg.svdvals(feats)
    torch.testing.assert_close(captured, sv[: w.shape[0]].pow(2).sum(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cue_init"):
        make(cue_init="orthogonal")


def test_principal_projection_on_a_large_catalogue_uses_the_randomised_svd():
    from models.magnet import principal_projection_

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(5000, 6, generator=g) @ torch.randn(6, 40, generator=g) + 0.01 * torch.randn(5000, 40, generator=g)
    proj = torch.nn.Linear(40, 4)
    torch.manual_seed(0)
    principal_projection_(proj, feats)
    captured = (feats @ proj.weight.detach().T).pow(2).sum()
    torch.testing.assert_close(captured, torch.linalg.svdvals(feats)[:4].pow(2).sum(), rtol=1e-3, atol=1e-3)
    assert float(proj.bias.abs().max()) == 0.0


def test_stage_controller_on_its_own():
    """models/magnet_routing.py's controller without a model: Eq. 26 with W = 2, the epoch unit, Eq. 31."""
    from models.magnet_routing import StageController

    c = StageController("entropy", 0.9, 2, "none", 1, "step", 0, 20, "lin_ent", 0.3)
    assert [c.advance(h) for h in (0.95, 0.5, 0.92, 0.91, 0.1)] == [1, 1, 1, 2, 2]
    assert int(c.switch_step) == 4 and int(c.step) == 5
    per_epoch = StageController("entropy", 0.9, 1, "none", 1, "epoch", 0, 20, "lin_ent", 0.3)
    for h in (0.95, 0.95):
        per_epoch.advance(h)
    assert int(per_epoch.stage) == 1
    per_epoch.close_epoch()  # epoch mean 0.95 >= H*: W = 1 epoch -> stage 2 from the next step
    assert int(per_epoch.stage) == 2 and int(per_epoch.switch_step) == 3 and int(per_epoch.epoch) == 1
    assert c.loss_weights(0.25, 2) == pytest.approx((0.0, 0.075))


def test_checkpoints_from_before_the_controller_module_still_load(make):
    m = make()
    m.train()
    for h in (0.95, 0.95):
        m.controller.advance(h)
    old = {(k.replace("controller.", "ctl_", 1) if k.startswith("controller.") else k): v
           for k, v in m.state_dict().items()}
    fresh = make()
    fresh.load_state_dict(old)
    assert int(fresh.controller.step) == 2 and int(fresh.controller.counter) == 2


@pytest.mark.parametrize("mode", ["cue", "behaviour"])
def test_cue_bpr_term_by_hand(make, mode):
    """cue_bpr: BPR per modality on <h^m_u, h^m_i> (cue) or <z_u detached, h^m_i> (behaviour)."""
    m = make(cue_bpr=mode, cue_bpr_weight=0.5, dropout=0.0, view_fusion="mean")
    users, pos, neg = torch.tensor([0, 3, 3]), torch.tensor([1, 2, 5]), torch.tensor([4, 0, 7])
    parts = m.calculate_loss({"users": users, "pos_items": pos, "neg_items": neg})
    m.eval()
    with torch.no_grad():
        t = m.encode()
        ru, rp, rn = t["r_user"][users], t["r_item"][pos], t["r_item"][neg]
    want = 0.0
    for ch in (1, 2):  # A, S
        anchor = ru[:, ch] if mode == "cue" else ru[:, 0]
        x = (anchor * rp[:, ch]).sum(-1) - (anchor * rn[:, ch]).sum(-1)
        want += torch.log1p(torch.exp(-x)).mean()
    assert float(parts["cue_bpr"]) == pytest.approx(0.5 * float(want), rel=1e-4)
    m.train()
    m.zero_grad()
    parts = m.calculate_loss({"users": users, "pos_items": pos, "neg_items": neg})
    parts["cue_bpr"].backward()
    assert m.image_proj.weight.grad.abs().sum() > 0
    grad = m.user_embedding.weight.grad
    assert grad is None or float(grad.abs().sum()) == 0.0  # only f_m learns from it (behaviour: z_u detached)


def test_item_graph_layers_adds_the_knn_smoothed_item_ids(make):
    """item_graph_layers L (extension): the items' behaviour representation is z_i + S^L e_i with
    S = w S_v + (1 - w) S_t (KNN-BIN, k = knn_k); users unchanged; a batch's rows equal the full encode's."""
    from mmrec import graph

    off, on = make(dropout=0.0), make(dropout=0.0, item_graph_layers=2, item_graph_image_weight=0.3)
    on.load_state_dict(off.state_dict())
    off.eval(), on.eval()
    with torch.no_grad():
        t_off, t_on = off.encode(), on.encode()
        knn = {m: torch.from_numpy(graph.knn_graph(on.dataset, m, 3, "bin", True, graph.DEGREE_EPS,
                                                   **graph.similarity_settings(on.config)).toarray())
               for m in ("v", "t")}
        s = (0.3 * knn["v"] + 0.7 * knn["t"]).float()
        e = on.item_embedding.weight
        n_u = on.n_users
        torch.testing.assert_close(t_on["z"][n_u:], t_off["z"][n_u:] + s @ (s @ e), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t_on["z"][:n_u], t_off["z"][:n_u])
        users, items = torch.tensor([0, 2]), torch.tensor([1, 4, 6])
        rows = on.encode(users, items)
        torch.testing.assert_close(rows["z"][2:], t_on["z"][n_u + items], atol=1e-5, rtol=1e-5)
        unit = make(dropout=0.0, item_graph_layers=2, item_graph_image_weight=0.3, item_graph_norm="l2")
        unit.load_state_dict(off.state_dict())
        unit.eval()
        smoothed = s @ (s @ e)  # item_graph_norm l2: z_i + S^L e_i / |S^L e_i|
        torch.testing.assert_close(unit.encode()["z"][n_u:], t_off["z"][n_u:] + smoothed / smoothed.norm(dim=1, keepdim=True),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(unit.encode(users, items)["z"][2:], unit.encode()["z"][n_u + items], atol=1e-5, rtol=1e-5)


def test_cue_form_purified_knn_smooths_content_gated_item_ids(make):
    """cue_form purified_knn (f_m's form): h^m_i = sum_j S^m_ij (e_j * sigmoid(f_m(x^m_j))) over the modality's
    KNN-SIM graph (k = knn_k, self included), users by Eq. 8's history mean; a batch's rows equal the full
    encode's, and full ranking equals pairwise scoring."""
    from mmrec import graph

    m = make(dropout=0.0, cue_form="purified_knn", view_fusion="mean")
    m.eval()
    with torch.no_grad():
        t = m.encode()
        s_v = torch.from_numpy(graph.knn_graph(m.dataset, "v", 3, "sim", True, **graph.similarity_settings(m.config)).toarray()).float()
        gated = m.item_embedding.weight * torch.sigmoid(m.v_feat @ m.image_proj.weight.T)
        h_items = s_v @ gated
        torch.testing.assert_close(t["r_item"][:, 1], h_items, atol=1e-5, rtol=1e-5)
        hist = m.train_matrix[4].indices
        torch.testing.assert_close(t["r_user"][4, 1], h_items[hist].mean(0), atol=1e-5, rtol=1e-5)
        users, items = torch.tensor([0, 2]), torch.tensor([1, 4, 6])
        rows = m.encode(users, items)
        torch.testing.assert_close(rows["r_item"], t["r_item"][items], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rows["r_user"], t["r_user"][users], atol=1e-5, rtol=1e-5)
        m.start_evaluation()
        full = m.full_sort_predict({"users": users})
        m.end_evaluation()
        pair, _, _ = m.score_pairs(t, users.repeat_interleave(m.n_items), torch.arange(m.n_items).repeat(2))
    torch.testing.assert_close(full, pair.view(2, m.n_items), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cue_form"):
        make(cue_form="mlp")


@pytest.mark.parametrize("head", ["hadamard", "concat_mlp"])  # the expert-plane ranking and the general path
def test_behaviour_residual_adds_the_graph_dot_product(make, head):
    """behaviour_residual beta (extension): y_ui = Eq. 21 + beta <z_u, z_i>, in training pairs and full ranking."""
    off = make(dropout=0.0, expert_head=head)
    on = make(dropout=0.0, expert_head=head, behaviour_residual=0.5)
    on.load_state_dict(off.state_dict())
    off.eval(), on.eval()
    users = torch.tensor([0, 3, 5])
    with torch.no_grad():
        z = on.encode()["z"]
        dots = z[users] @ z[on.n_users:].T
        torch.testing.assert_close(on.full_sort_predict({"users": users}),
                                   off.full_sort_predict({"users": users}) + 0.5 * dots, atol=1e-5, rtol=1e-5)
        t = on.encode()
        items = torch.tensor([1, 2, 7])
        y_on = on.score_pairs(t, users, items)[0]
        y_off = off.score_pairs(off.encode(), users, items)[0]
        torch.testing.assert_close(y_on, y_off + 0.5 * (z[users] * z[on.n_users + items]).sum(-1), atol=1e-5, rtol=1e-5)


def test_edge_dropout_propagates_over_a_pruned_sample_of_the_observed_edges(make):
    """edge_dropout p (extension): in training, G_UI and G_UIG are rebuilt each epoch from int(|E| (1 - p))
    observed edges (degree-sensitive, seeded by (seed, epoch)), each sym-normalised over its kept edges, with
    E+ kept whole in G_UIG; evaluation propagates over the full graphs."""
    m = make(edge_dropout=0.5, fanout_resample_steps=0)
    n_obs = m.train_matrix.nnz
    m.train()
    m.pre_epoch_processing()
    views = m.views()
    ui = graph.scipy_csr(views["ui"])
    assert ui.nnz == 2 * int(n_obs * 0.5)  # kept edges, mirrored
    kept = ui[:m.n_users, m.n_users:]
    assert set(zip(*kept.nonzero())) <= set(zip(*m.train_matrix.nonzero()))
    deg = np.asarray((kept != 0).sum(1)).ravel()
    u, i = kept.nonzero()
    deg_i = np.asarray((kept != 0).sum(0)).ravel()
    np.testing.assert_allclose(np.asarray(kept[u, i]).ravel(), 1 / np.sqrt(deg[u] * deg_i[i]), rtol=1e-5)
    full_uig = graph.scipy_csr(m.adj_uig)[:m.n_users, m.n_users:]
    observed = set(zip(*m.train_matrix.nonzero()))
    induced = {e for e in zip(*full_uig.nonzero()) if e not in observed}
    pruned_uig = set(zip(*graph.scipy_csr(views["uig"])[:m.n_users, m.n_users:].nonzero()))
    assert induced and induced <= pruned_uig and pruned_uig == induced | set(zip(u, i))
    assert m.views()["ui"] is views["ui"]  # one sample per epoch
    again = make(edge_dropout=0.5, fanout_resample_steps=0)
    again.train()
    again.pre_epoch_processing()
    assert (graph.scipy_csr(again.views()["ui"]) != ui).nnz == 0  # (seed, epoch) decide the sample
    m.pre_epoch_processing()
    assert (graph.scipy_csr(m.views()["ui"]) != ui).nnz > 0  # redrawn next epoch
    m.eval()
    assert m.views()["ui"] is m.adj_ui and m.views()["uig"] is m.adj_uig
    with pytest.raises(ValueError, match="edge_dropout"):
        make(edge_dropout=0.2, fanout=5)


@pytest.mark.parametrize("fanout", [0, 2])
def test_target_edges_drop_takes_the_batch_positives_out_of_both_graphs(make, fanout):
    """target_edges: drop (extension): in training, each batch's positive (user, item) edges leave G_UI and G_UIG
    in both directions, on the full graphs or on the step's neighbour sample; every other entry is unchanged,
    and evaluation propagates over the full graphs."""
    m = make(target_edges="drop", fanout=fanout)
    m.train()
    m.pre_epoch_processing()
    users, items = m.train_matrix.nonzero()
    users, items = torch.from_numpy(users[:3].astype(np.int64)), torch.from_numpy(items[:3].astype(np.int64))
    cut = {name: [graph.scipy_csr(a) for a in layers] for name, layers in m.views(held_out=(users, items)).items()}
    whole = m._sampled_views["layers"]  # the step's graphs before the cut: the full ones, or the sample
    if fanout == 0:
        assert abs(whole["ui"][0] - graph.scipy_csr(m.adj_ui)).max() == 0
    else:
        assert graph.scipy_csr(m.views()["ui"][0]).nnz == whole["ui"][0].nnz < m.adj_ui._nnz()
    pairs = {(int(u), m.n_users + int(i)) for u, i in zip(users, items)}
    pairs |= {(b, a) for a, b in pairs}
    for name in ("ui", "uig"):
        for before, after in zip(whole[name], cut[name]):
            gone = set(zip(*before.nonzero())) - set(zip(*after.nonzero()))
            assert gone == pairs & set(zip(*before.nonzero())) and gone  # only the positives' entries go
            keep = before.tolil()
            for a, b in pairs:
                keep[a, b] = 0
            keep = keep.tocsr()
            keep.eliminate_zeros()
            assert abs(keep - after).max() == 0  # the rest keeps its weights
    loss = m.calculate_loss({"users": users, "pos_items": items, "neg_items": (items + 1) % m.n_items})
    assert torch.isfinite(sum(loss.values()))
    m.eval()
    assert m.views()["ui"] is m.adj_ui and m.views()["uig"] is m.adj_uig
    with pytest.raises(ValueError, match="target_edges"):
        make(target_edges="drop", edge_dropout=0.2)


def test_head_mlp_lr_scale_slows_the_mlp_part_of_a_head_only(make):
    from mmrec.trainer import build_optimizer
    m = make(expert_head="hadamard_concat", head_lr_scale=0.5, head_mlp_lr_scale=0.1)
    by_param = {id(p): g for g in build_optimizer(m.config, m).param_groups for p in g["params"]}
    assert by_param[id(m.heads.w_had)]["lr"] == pytest.approx(5e-4)  # the bilinear part: head_lr_scale
    for p in (m.heads.w1_user, m.heads.w1_item, m.heads.b1, m.heads.w2, m.heads.b2):
        assert by_param[id(p)]["lr"] == pytest.approx(5e-5)  # 0.1 x 0.5 x 1e-3
    assert by_param[id(m.score_vector)]["lr"] == pytest.approx(5e-4)
