"""MGCN: shapes, the loss against an independent dense float64 computation, the shared layers, caching of
the evaluation forward, and that its graphs come from the training split only."""
from __future__ import annotations

import numpy as np
import torch

from models.mgcn import MGCN
from mmrec.layers import BehaviourPurifier, ScalarAttentionFuser, item_graph_view
from tests.helpers import (BATCH, dense_knn_sim, dense_user_item, lightgcn_mean, lin, loss_and_params64,
                           mgcn_objective_ref)

# -------------------------------------------------------------------------------------------------
def test_mgcn_shapes_and_cached_eval(tiny):
    config, ds = tiny("MGCN")
    model = MGCN(config, ds)
    zu, zi, side, content = model.forward()
    assert zu.shape == (ds.n_users, 64) and zi.shape == (ds.n_items, 64)
    assert side.shape == content.shape == (ds.n_users + ds.n_items, 64)
    model.eval()
    model.start_evaluation()
    calls = []
    original = model.forward
    model.forward = lambda: calls.append(1) or original()
    with torch.no_grad():
        s1 = model.full_sort_predict({"users": torch.tensor([0, 1, 2])})
        s2 = model.full_sort_predict({"users": torch.tensor([3])})
    model.end_evaluation()
    assert s1.shape == (3, ds.n_items) and s2.shape == (1, ds.n_items)
    assert len(calls) == 1  # one full forward per evaluation pass


def test_mgcn_loss_matches_dense_float64(tiny):
    ds, got, p = loss_and_params64(tiny, MGCN, 0, cl_loss=0.1, reg_weight=0.5)
    nu = ds.n_users
    adj, R = dense_user_item(ds)
    s_v = torch.from_numpy(dense_knn_sim(ds.features["v"].astype(np.float64), 10))
    s_t = torch.from_numpy(dense_knn_sim(ds.features["t"].astype(np.float64), 10))
    ids = p["item_embedding.weight"]
    x_v = lin(p, "image_proj", p["image_embedding.weight"])
    x_t = lin(p, "text_proj", p["text_embedding.weight"])
    e_v = ids * torch.sigmoid(lin(p, "purifier_v.gate.linear", x_v))
    e_t = ids * torch.sigmoid(lin(p, "purifier_t.gate.linear", x_t))
    content = lightgcn_mean(adj, torch.cat([p["user_embedding.weight"], ids]), 2)
    i_v, i_t = s_v @ e_v, s_t @ e_t
    m_v, m_t = torch.cat([R @ i_v, i_v]), torch.cat([R @ i_t, i_t])

    def score(x):
        return torch.tanh(lin(p, "fuser.query.0", x)) @ p["fuser.query.2.weight"].T

    a = torch.softmax(torch.cat([score(m_v), score(m_t)], 1), 1)
    common = a[:, :1] * m_v + a[:, 1:] * m_t
    side = (torch.sigmoid(lin(p, "prefer_v.linear", content)) * (m_v - common)
            + torch.sigmoid(lin(p, "prefer_t.linear", content)) * (m_t - common) + common) / 3
    z = content + side
    expected = mgcn_objective_ref(z, side, content, nu, reg_weight=0.5, cl_weight=0.1)
    assert abs(got - expected.item()) <= 1e-5 * abs(expected.item())


def test_layers_by_hand():
    torch.manual_seed(0)
    fuser = ScalarAttentionFuser(4)
    x1, x2 = torch.randn(3, 4), torch.randn(3, 4)
    common, w = fuser([x1, x2])
    s1, s2 = fuser.query(x1), fuser.query(x2)
    a1 = torch.exp(s1) / (torch.exp(s1) + torch.exp(s2))
    torch.testing.assert_close(common, a1 * x1 + (1 - a1) * x2)
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    purifier = BehaviourPurifier(4, feature_dim=6)
    ids, feats = torch.randn(3, 4), torch.randn(3, 6)
    lin_ = purifier.gate.linear
    torch.testing.assert_close(purifier(ids, feats), ids / (1 + torch.exp(-(feats @ lin_.weight.T + lin_.bias))))
    s = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.0, 0.8]])
    r = torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    e = torch.randn(3, 4)
    view = item_graph_view(s.to_sparse(), r.to_sparse(), e, 1)
    torch.testing.assert_close(view, torch.cat([r @ (s @ e), s @ e]))


def test_mgcn_trains_every_parameter(tiny):
    config, ds = tiny("MGCN")
    model = MGCN(config, ds)
    sum(model.calculate_loss(BATCH).values()).backward()
    missing = [n for n, q in model.named_parameters() if q.grad is None or not torch.isfinite(q.grad).all()]
    assert missing == []
