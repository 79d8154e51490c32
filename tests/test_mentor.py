"""MENTOR: shapes, loss parts by hand, blocked all-node InfoNCE, the stale-prediction quirk, graphs."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from tests.helpers import assert_graphs_from_training_only, info_nce_ref, tiny_setup
from models.mentor import MENTOR

BATCH = {"users": torch.tensor([0, 1, 4, 4]), "pos_items": torch.tensor([2, 3, 4, 9]),
         "neg_items": torch.tensor([5, 6, 0, 1])}


def _align(x, y):
    var = lambda t: ((t - t.mean()) ** 2).sum() / (t.numel() - 1)  # noqa: E731
    return (var(x) - var(y)).abs() + (x.mean() - y.mean()).abs()


def test_loss_parts_by_hand(tmp_path):
    config, dataset = tiny_setup(tmp_path, "MENTOR", overrides={"mask_weight_g": 0.5, "temp": 0.4,
                                                                "nce_block_size": 7})
    model = MENTOR(config, dataset)
    torch.manual_seed(11)
    parts = model.calculate_loss(BATCH)
    assert set(parts) == {"bpr", "reg", "align", "mask_g", "mask_f"}
    assert not parts["mask_f"].requires_grad  # the reference computes it under no-grad
    torch.manual_seed(11)
    with torch.no_grad():
        out = model.forward()
        nu = dataset.n_users
        z = out["fused"]
        u, p, n = z[BATCH["users"]], z[nu + BATCH["pos_items"]], z[nu + BATCH["neg_items"]]
        bpr = -torch.log2(torch.sigmoid((u * p).sum(1) - (u * n).sum(1))).mean()
        reg = 1e-3 * (model.v_gcn.preference[BATCH["users"]].pow(2).mean()
                      + model.t_gcn.preference[BATCH["users"]].pow(2).mean() + model.weight_u.pow(2).mean())
        g, r, v, t = out["guide"], out["fused"], out["visual"], out["text"]
        align = 0.1 * (_align(g, r) + _align(g, v) + _align(g, t) + _align(r, v) + _align(r, t) + _align(v, t))
        n1, n2 = out["noisy1"], out["noisy2"]
        mask_g = 0.5 * (info_nce_ref(n1[:nu], n2[:nu], 0.4) + info_nce_ref(n1[nu:], n2[nu:], 0.4))
        mask_f = 0
        for part in (z[:nu], z[nu:]):
            mask_f = mask_f + 1 - F.cosine_similarity(F.dropout(part, 0.5), model.mask_mlp(part)).mean()
        mask_f = 1.5 * mask_f
    for name, value in {"bpr": bpr, "reg": reg, "align": align, "mask_g": mask_g, "mask_f": mask_f}.items():
        assert math.isclose(float(parts[name].detach()), float(value), rel_tol=1e-4), name


def test_fused_representation_by_hand(tmp_path):
    config, dataset = tiny_setup(tmp_path, "MENTOR")
    model = MENTOR(config, dataset)
    nu, ni = dataset.n_users, dataset.n_items
    y = dataset.train_matrix.toarray()
    a = np.zeros((nu + ni, nu + ni))
    a[:nu, nu:], a[nu:, :nu] = y, y.T
    deg = a.sum(1)
    inv = np.where(deg > 0, 1 / np.sqrt(np.maximum(deg, 1)), 0)
    a_hat = torch.tensor(inv[:, None] * a * inv[None, :], dtype=torch.float32)
    s = model.mm_adj.to_dense()
    np.testing.assert_allclose(s.sum(1).numpy(), np.full(ni, 10 / (10 + 1e-7)), rtol=1e-5)  # KNN-BIN rows
    with torch.no_grad():
        def module(gcn, feats):
            items = gcn.mlp_out(F.leaky_relu(gcn.mlp_in(feats), 0.01))
            x = F.normalize(torch.cat([gcn.preference, items]), dim=1)
            return x + a_hat @ x + a_hat @ (a_hat @ x)

        hv, ht = module(model.v_gcn, model.v_feat), module(model.t_gcn, model.t_feat)
        w = model.weight_u
        users = torch.cat([w[:, :1] * hv[:nu], w[:, 1:] * ht[:nu]], 1)
        items = torch.cat([hv[nu:], ht[nu:]], 1)
        expect = torch.cat([users, items + s @ items])
        torch.testing.assert_close(model.fused_forward(), expect, rtol=1e-4, atol=1e-5)
    assert torch.allclose(model.weight_u.sum(1), torch.ones(nu))  # softmax initialisation


def test_prediction_uses_last_training_batch(tmp_path):
    config, dataset = tiny_setup(tmp_path, "MENTOR", overrides={"learning_rate": 0.05})
    model = MENTOR(config, dataset)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    users = {"users": torch.tensor([0, 3])}
    model.eval()
    fresh_before = model.full_sort_predict(users)  # no training batch yet: a fresh forward
    model.train()
    loss = sum(model.calculate_loss(BATCH).values())
    with torch.no_grad():
        batch_fused = model.fused_forward()  # the embeddings of that batch (before the step)
    loss.backward()
    opt.step()
    model.eval()
    stale = model.full_sort_predict(users)
    torch.testing.assert_close(stale, batch_fused[users["users"]] @ batch_fused[dataset.n_users:].T)
    torch.testing.assert_close(fresh_before, stale)  # nothing changed between the two forwards
    model.predict_fresh_forward = True
    fresh = model.full_sort_predict(users)
    assert fresh.shape == (2, dataset.n_items)
    assert not torch.allclose(fresh, stale)  # the step moved the parameters


def test_graphs_use_training_split_only(tmp_path):
    assert_graphs_from_training_only(tmp_path, MENTOR, ("adj", "mm_adj"))

def test_blocked_infonce_equals_the_plain_form_under_a_logit_budget(monkeypatch):
    """MENTOR's all-node InfoNCE in blocks: capped by rows and by logits per block (the Electronics-scale
    memory fix), the same value and gradient as the unblocked form."""
    import torch.utils.checkpoint as ckpt

    from mmrec.losses import info_nce, info_nce_blocked

    blocks = []
    plain_checkpoint = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda fn, a, *rest, **kw: blocks.append(a.shape[0])
                        or plain_checkpoint(fn, a, *rest, **kw))

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 6, generator=g), torch.randn(37, 6, generator=g)
    ref_a = a.clone().requires_grad_()
    info_nce(ref_a, b, 0.2).backward()
    for block_size, budget in ((8, 1 << 26), (4096, 37 * 5)):  # 8 rows; then 5 rows from the budget
        got_a = a.clone().requires_grad_()
        loss = info_nce_blocked(got_a, b, 0.2, block_size, budget)
        loss.backward()
        assert math.isclose(float(loss), float(info_nce(a, b, 0.2)), rel_tol=1e-5)
        torch.testing.assert_close(got_a.grad, ref_a.grad, atol=1e-6, rtol=1e-5)
        assert max(blocks) == min(block_size, budget // 37) and sum(blocks) == 37
        blocks.clear()


def test_start_warns_when_the_all_node_infonce_is_large_on_cpu(tmp_path, monkeypatch, caplog):
    """The U^2 + I^2 logits of the graph-level InfoNCE are announced at the start above the threshold (a
    tiny threshold here stands in for Electronics' 4e10), with the users and items; not when the term is off."""
    import logging

    import models.mentor as mentor
    monkeypatch.setattr(mentor, "CPU_NCE_WARN_LOGITS", 10)
    monkeypatch.setattr(logging.getLogger("mmrec"), "propagate", True)  # a run's log setup (quick_start) stops it
    config, dataset = tiny_setup(tmp_path, "MENTOR")
    with caplog.at_level(logging.WARNING, logger="mmrec.models.mentor"):
        model = MENTOR(config, dataset)
    expected = float(model.n_users) ** 2 + float(model.n_items) ** 2
    # (distinct messages: where a handler is also attached to the mmrec logger, caplog sees a record twice)
    messages = sorted({r.getMessage() for r in caplog.records if "logits per training step" in r.getMessage()})
    assert len(messages) == 1 and f"{expected:.2g} logits" in messages[0] and f"{model.n_users} users" in messages[0]
    caplog.clear()
    config, dataset = tiny_setup(tmp_path / "off", "MENTOR", overrides={"mask_weight_g": 0.0})
    with caplog.at_level(logging.WARNING, logger="mmrec.models.mentor"):
        MENTOR(config, dataset)
    assert not [r for r in caplog.records if "logits per training step" in r.getMessage()]
