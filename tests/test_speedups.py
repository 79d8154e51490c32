"""Exact speed-ups (issue: MAGNET fast enough to study): each leaves scores, losses and gradients unchanged
on a tiny input.  Batch-restricted propagation and cues, the expert-plane full ranking, the per-epoch
neighbour sampler, and the trainer's single test pass from the best weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mmrec import graph
from models.magnet import MAGNET, topk_gates, topk_softmax_mix
from models.magnet_graph import sample_fanout
from tests.helpers import model_factory, tiny_setup

SMALL = {"knn_k": 3, "expansion_r": 4, "embedding_size": 8, "num_threads": 1, "dropout": 0.0, "fanout": 0}


def _sym_adj(n_users=12, n_items=9, density=0.3, seed=0) -> torch.Tensor:
    train = sp.random(n_users, n_items, density=density, format="csr", random_state=seed, dtype=np.float32)
    train.data[:] = 1.0
    return graph.to_torch_sparse(graph.norm_adjacency(train, "sym"))


@pytest.mark.parametrize("use_scipy", [True, False])
def test_row_block_is_the_rows_and_their_transpose(use_scipy):
    adj = _sym_adj()
    rows = torch.tensor([5, 0, 17, 3])
    sub, sub_t = graph.row_block(adj, rows, use_scipy)
    dense = adj.to_dense()
    torch.testing.assert_close(sub.to_dense(), dense[rows])
    torch.testing.assert_close(sub_t.to_dense(), dense[rows].T)


@pytest.mark.parametrize("rows", [[2, 19, 7], list(range(0, 21, 2))])  # few rows: sliced; most: full product
def test_propagate_rows_equals_full_propagation_in_value_and_gradient(rows):
    adj = _sym_adj()
    rows = torch.tensor(rows)
    weight = torch.randn(len(rows), 4)
    grads = []
    for restrict in (True, False):
        ego = torch.randn(21, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
        out = graph.propagate(adj, ego, 2, rows=rows) if restrict else graph.propagate(adj, ego, 2)[rows]
        (out * weight).sum().backward()
        grads.append((out.detach(), ego.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=1e-5)
    dense = adj.to_dense()
    ego = torch.randn(21, 4)
    torch.testing.assert_close(graph.propagate([adj, adj], ego, 2, "last", rows=rows), (dense @ dense @ ego)[rows])


@pytest.fixture
def make(tmp_path):
    return model_factory(tmp_path, MAGNET, SMALL, n_users=40, n_items=30)


@pytest.mark.parametrize("n_items", [5, 25])  # few items: batch cues; most items: project all, pick rows
@pytest.mark.parametrize("centred", [False, True])
def test_batch_encode_equals_the_full_tables_restricted(make, n_items, centred):
    m = make(cue_centering=centred)
    users = torch.tensor([3, 0, 17, 39])
    items = torch.arange(30)[torch.randperm(30, generator=torch.Generator().manual_seed(0))[:n_items]].sort().values
    full, part = m.encode(), m.encode(users, items)
    nodes = torch.cat([users, items + m.n_users])
    for key in ("z_ui", "z_uig", "z", "z_router"):
        torch.testing.assert_close(part[key], full[key][nodes], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(part["r_user"], full["r_user"][users], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(part["r_item"], full["r_item"][items], atol=1e-6, rtol=1e-5)


def _reference_loss(m, batch):
    """calculate_loss as written before the speed-up: full tables, global ids (dropout 0)."""
    from mmrec.losses import bpr_loss
    from models.magnet import view_contrastive
    users, pos, neg = batch["users"], batch["pos_items"], batch["neg_items"]
    t = m.encode()
    xu = m.expert_inputs(m.expert_weights(), t["r_user"][users])
    y_pos, pi, gates = m.score_pairs(t, users, pos, xu)
    y_neg, _, _ = m.score_pairs(t, users, neg, xu)
    bu, bi = torch.unique(users), torch.unique(pos) + m.n_users
    ctr = m.lambda_ctr * view_contrastive(t["z_ui"][bu], t["z_uig"][bu], t["z_ui"][bi], t["z_uig"][bi], m.tau)
    return bpr_loss(y_pos, y_neg, "mean") + ctr, pi


def test_calculate_loss_equals_the_full_table_reference(make):
    m = make(routing_schedule="none", lambda_ctr=0.5)
    m.train()
    batch = {"users": torch.tensor([0, 5, 5, 9, 33]), "pos_items": torch.tensor([1, 2, 3, 4, 1]),
             "neg_items": torch.tensor([7, 8, 9, 1, 29])}
    grads = []
    for fn in (lambda: sum(m.calculate_loss(batch).values()), lambda: _reference_loss(m, batch)[0]):
        m.zero_grad()
        loss = fn()
        loss.backward()
        grads.append((float(loss), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert grads[0][1].keys() == grads[1][1].keys()
    for name in grads[1][1]:
        torch.testing.assert_close(grads[0][1][name], grads[1][1][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("compiled", [True, False])
def test_topk_softmax_mix_equals_softmax_topk_renormalise(compiled):
    g = torch.Generator().manual_seed(3)
    e, u, i, k = 9, 5, 7, 4
    a, b, y = torch.randn(e, u, generator=g) * 3, torch.randn(e, i, generator=g) * 3, torch.randn(e, u, i, generator=g)
    logits = (a.unsqueeze(2) + b.unsqueeze(1)).permute(1, 2, 0)  # [U, I, E]
    gates = topk_gates(torch.softmax(logits, -1), k)  # Eqs. 17-19
    expected = (gates * y.permute(1, 2, 0)).sum(-1)  # Eq. 20-21
    torch.testing.assert_close(topk_softmax_mix(y, a, b, k, compiled), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(topk_softmax_mix(y, a, b, e, compiled),
                               (torch.softmax(logits, -1) * y.permute(1, 2, 0)).sum(-1))
    # user and item maxima on different experts, far apart: the shifted exps underflow; taken directly
    a2, b2 = torch.zeros(e, 1), torch.zeros(e, 1)
    a2[0], b2[1] = 300.0, 300.0
    y2 = torch.arange(e, dtype=torch.float32).view(e, 1, 1)
    out = topk_softmax_mix(y2, a2, b2, 2, compiled)
    assert torch.isfinite(out).all() and float(out) == pytest.approx(0.5)  # experts 0 and 1, equal weight


def test_fanout_sampler_caps_rescales_and_draws_without_replacement():
    dense = np.zeros((3, 10), dtype=np.float32)
    dense[0, :] = 0.5
    dense[1, :2] = 1.0  # light row: kept whole
    adj = sp.csr_matrix(dense)
    s1 = sample_fanout(adj, 3, np.random.default_rng(0))
    assert s1.getnnz(axis=1).tolist() == [3, 2, 0]
    np.testing.assert_allclose(np.asarray(s1.sum(axis=1)).ravel(), dense.sum(1), rtol=1e-6)  # deg / kept scaling
    assert len(set(s1[0].indices.tolist())) == 3
    assert (sample_fanout(adj, 3, np.random.default_rng(0)) != s1).nnz == 0  # same seed, same sample
    counts = np.zeros(10)
    rng = np.random.default_rng(1)
    for _ in range(3000):
        counts[sample_fanout(adj, 3, rng)[0].indices] += 1
    np.testing.assert_allclose(counts / 3000, 0.3, atol=0.035)  # each neighbour kept with probability F / deg


def test_fanout_views_resampled_per_epoch_and_reproducible(make):
    m = make(fanout=2, fanout_resample_steps=0)
    m.train()
    m.pre_epoch_processing()
    first = [v.to_dense() for v in m.views()["uig"]]
    assert len(first) == m.n_layers and not torch.equal(first[0], first[1])  # one draw per layer
    assert (first[0] != 0).sum(1).max() <= 2
    m.encode()
    assert torch.equal(m.views()["uig"][0].to_dense(), first[0])  # same within the epoch
    m.pre_epoch_processing()
    assert not torch.equal(m.views()["uig"][0].to_dense(), first[0])  # redrawn next epoch
    again = make(fanout=2, fanout_resample_steps=0)
    again.train()
    again.pre_epoch_processing()
    assert torch.equal(again.views()["uig"][0].to_dense(), first[0])  # (seed, epoch) decide the draw
    m.eval()
    assert m.views()["uig"] is m.adj_uig  # evaluation propagates on the full graph
    steps = make(fanout=2, fanout_resample_steps=2)
    steps.train()
    steps.pre_epoch_processing()
    draws = []
    for _ in range(5):  # what each training step propagates on
        steps.encode()
        draws.append(steps._sampled_views["ui"][0].to_dense())
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[2], draws[3])
    assert not torch.equal(draws[1], draws[2]) and not torch.equal(draws[3], draws[4])


def test_test_split_scored_once_with_the_best_weights(tmp_path, monkeypatch):
    from mmrec import trainer as trainer_mod
    from mmrec.evaluation import evaluate
    from mmrec.registry import get_model
    from mmrec.trainer import Trainer, init_seed

    config, dataset = tiny_setup(tmp_path, "LightGCN", overrides={"epochs": 6, "checkpoint": True,
                                                                   "learning_rate": 0.05})
    splits = []
    monkeypatch.setattr(trainer_mod, "evaluate", lambda model, ds, split, *a, **kw: (
        splits.append(split), evaluate(model, ds, split, *a, **kw))[1])
    init_seed(0)
    model = get_model("LightGCN")(config, dataset)
    out = tmp_path / "run"
    out.mkdir()
    fit = Trainer(config, model, dataset, out).fit()
    assert splits.count("test") == 1 and splits.count("valid") == fit["epochs_run"]
    fresh = get_model("LightGCN")(config, dataset)
    fresh.load_state_dict(torch.load(out / "best.pth", weights_only=True)["model"])
    expected = evaluate(fresh, dataset, "test", [10, 20], ["recall", "ndcg"])["metrics"]
    assert {k: fit["test"][k] for k in expected} == expected
    assert [r["epoch"] for r in fit["history"] if "test" in r] == [fit["best_epoch"]]
    json.dumps(fit["history"])


def test_info_nce_both_ways_equals_two_calls():
    from mmrec.losses import info_nce, info_nce_both_ways
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    expected = info_nce(a, b, 0.3) + info_nce(b, a, 0.3)
    assert float(info_nce_both_ways(a, b, 0.3)) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.skipif(not __import__("mmrec.native").native.available(), reason="no C compiler on this machine")
@pytest.mark.parametrize("k", [1, 4, 9])
def test_compiled_topk_mix_equals_the_torch_path(k):
    g = torch.Generator().manual_seed(5)
    e, u, i = 9, 6, 300  # more items than one tile of the kernel
    a, b, y = torch.randn(e, u, generator=g) * 2, torch.randn(e, i, generator=g) * 2, torch.randn(e, u, i, generator=g)
    torch.testing.assert_close(topk_softmax_mix(y, a, b, k), topk_softmax_mix(y, a, b, k, compiled=False),
                               atol=1e-6, rtol=1e-5)
    a[0, 0], b[1, :] = 300.0, 300.0  # user 0's shifted exps underflow on every item: the kernel's fallback
    torch.testing.assert_close(topk_softmax_mix(y, a, b, k), topk_softmax_mix(y, a, b, k, compiled=False),
                               atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not __import__("mmrec.native").native.available(), reason="no C compiler on this machine")
def test_compiled_relu_head_scores_equal_the_hidden_layer_by_hand():
    from mmrec import native

    g = torch.Generator().manual_seed(7)
    e, u, i, h = 3, 5, 300, 16  # more items than one tile of the kernel
    hu, hi_t, w = torch.randn(e, u, h, generator=g), torch.randn(e, h, i, generator=g), torch.randn(e, h, generator=g)
    expected = torch.einsum("euih,eh->eui", torch.relu(hu.unsqueeze(2) + hi_t.permute(0, 2, 1).unsqueeze(1)), w)
    torch.testing.assert_close(native.relu_head_scores(hu, hi_t, w), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not __import__("mmrec.native").native.available(), reason="no C compiler on this machine")
def test_compiled_topk_mix_keeps_exactly_k_experts_at_a_tie_lower_index_first():
    e = 9
    logit = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # experts 1-3 tie at the 2nd place
    a, b = torch.zeros(e, 1), logit.view(e, 1).repeat(1, 200)  # 200 items: ties in every lane of a tile
    y = torch.arange(e, dtype=torch.float32).view(e, 1, 1).repeat(1, 1, 200)
    w = torch.softmax(torch.tensor([3.0, 2.0]), 0)
    torch.testing.assert_close(topk_softmax_mix(y, a, b, 2), torch.full((1, 200), float(w[1])))  # 0 and 1 kept
    w3 = torch.softmax(torch.tensor([3.0, 2.0, 2.0]), 0)
    torch.testing.assert_close(topk_softmax_mix(y, a, b, 3), torch.full((1, 200), float(w3[1] + 2 * w3[2])))


def test_resume_after_early_stopping_only_scores_test(tmp_path):
    """Killed between the stopping epoch's checkpoint and the final test pass: resuming trains nothing
    more and reports the same result."""
    from mmrec.registry import get_model
    from mmrec.trainer import Trainer, init_seed

    config, dataset = tiny_setup(tmp_path, "LightGCN", overrides={"epochs": 40, "stopping_step": 1,
                                                                   "learning_rate": 0.05})
    out = tmp_path / "run"
    out.mkdir()
    init_seed(0)
    fit = Trainer(config, get_model("LightGCN")(config, dataset), dataset, out).fit()
    assert fit["stopped_by"] == "early_stopping"
    resumed = Trainer(config, get_model("LightGCN")(config, dataset), dataset, out)
    resumed.load_state_dict(torch.load(out / "last.pth", weights_only=False))
    again = resumed.fit()
    assert again["epochs_run"] == fit["epochs_run"] and again["test"] == fit["test"]


def test_lightgcn_batch_rows_loss_and_gradients_equal_the_full_forward(tiny):
    """LightGCN's training step propagates the batch's rows only in the last layer: same loss, same grads."""
    from mmrec.losses import dot_bpr, emb_loss
    from models.lightgcn import LightGCN
    from tests.helpers import build

    model, _ = build(tiny, LightGCN)
    b = {"users": torch.tensor([0, 5, 5, 7]), "pos_items": torch.tensor([1, 2, 3, 1]),
         "neg_items": torch.tensor([4, 4, 9, 0])}
    fast = sum(model.calculate_loss(b).values())
    fast.backward()
    grads = [p.grad.clone() for p in (model.user_embedding.weight, model.item_embedding.weight)]
    model.zero_grad()
    zu, zi = model.forward()  # the full propagation, then the batch's rows
    u, p, n = zu[b["users"]], zi[b["pos_items"]], zi[b["neg_items"]]
    ids = (model.user_embedding(b["users"]), model.item_embedding(b["pos_items"]), model.item_embedding(b["neg_items"]))
    full = dot_bpr(u, p, n, "eps") + model.reg_weight * emb_loss(*ids)
    full.backward()
    torch.testing.assert_close(fast, full)
    for got, param in zip(grads, (model.user_embedding.weight, model.item_embedding.weight)):
        torch.testing.assert_close(got, param.grad)


def test_emb_loss_rows_equals_emb_loss_of_the_gathered_rows():
    """Value and gradient against MMRec's EmbLoss on gathered rows (rows repeating), and no NaN gradient
    when every selected row is zero."""
    from mmrec.losses import emb_loss, emb_loss_rows
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(9, 4, generator=gen)
    groups = [torch.tensor([0, 3, 3, 5]), torch.tensor([6, 6, 6, 1]), torch.tensor([2, 8, 7, 0])]
    ref_t, got_t = table.clone().requires_grad_(), table.clone().requires_grad_()
    ref = emb_loss(*(ref_t[idx] for idx in groups))
    got = emb_loss_rows(got_t, *groups)
    ref.backward()
    got.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got_t.grad, ref_t.grad)
    zero = torch.zeros(9, 4, requires_grad=True)
    emb_loss_rows(zero, *groups).backward()
    assert torch.isfinite(zero.grad).all()
