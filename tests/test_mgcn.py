"""MGCN: shapes, the loss against an independent dense float64 computation, the shared layers, caching of
the evaluation forward, and that its graphs come from the training split only."""
from __future__ import annotations

import numpy as np
import torch

from models.mgcn import MGCN
from mmrec.layers import BehaviourPurifier, ScalarAttentionFuser, item_graph_view

BATCH = {"users": torch.tensor([0, 3, 5, 7, 3]), "pos_items": torch.tensor([1, 2, 4, 8, 0]),
         "neg_items": torch.tensor([5, 6, 9, 11, 13])}


# ---- independent dense float64 helpers (also used by test_smore) --------------------------------
def dense_sym_adjacency(train: np.ndarray) -> np.ndarray:
    """D^-1/2 A D^-1/2 of A = [[0, Y], [Y^T, 0]], 1/0 -> 0."""
    n_users, n_items = train.shape
    a = np.zeros((n_users + n_items,) * 2)
    a[:n_users, n_users:] = train
    a[n_users:, :n_users] = train.T
    deg = a.sum(1)
    inv = np.where(deg > 0, 1.0 / np.sqrt(np.where(deg > 0, deg, 1.0)), 0.0)
    return inv[:, None] * a * inv[None, :]


def dense_knn_sim(features: np.ndarray, k: int) -> np.ndarray:
    """Brute-force top-k cosine (self included), values / sqrt(r_i r_j) with row sums r."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    sim = unit @ unit.T
    keep = np.zeros_like(sim)
    for i in range(sim.shape[0]):
        top = np.argsort(-sim[i])[:k]
        keep[i, top] = sim[i, top]
    r = keep.sum(1)
    return keep / np.sqrt(np.outer(r, r)) * (keep != 0)


def lightgcn_mean(adj: np.ndarray, ego: torch.Tensor, layers: int) -> torch.Tensor:
    a = torch.from_numpy(adj)
    out, h = [ego], ego
    for _ in range(layers):
        h = a @ h
        out.append(h)
    return sum(out) / len(out)


def info_nce_ref(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    sim = torch.exp(a @ b.T / t)
    return (-torch.log(sim.diagonal() / sim.sum(1))).mean()


def bpr_half_sq_ref(zu, zi, batch, reg_weight, batch_size):
    u, p, n = zu[batch["users"]], zi[batch["pos_items"]], zi[batch["neg_items"]]
    x = (u * p).sum(1) - (u * n).sum(1)
    bpr = torch.log1p(torch.exp(-x)).mean()
    reg = 0.5 * (u.pow(2).sum() + p.pow(2).sum() + n.pow(2).sum()) / batch_size
    return bpr + reg_weight * reg


def params64(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().double() for k, v in model.state_dict().items()}


def lin(p, name, x):
    return x @ p[f"{name}.weight"].T + (p[f"{name}.bias"] if f"{name}.bias" in p else 0.0)


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
    config, ds = tiny("MGCN", overrides={"cl_loss": 0.1, "reg_weight": 0.5})
    torch.manual_seed(0)
    model = MGCN(config, ds)
    got = sum(model.calculate_loss(BATCH).values()).item()

    p = params64(model)
    nu = ds.n_users
    adj = dense_sym_adjacency(ds.train_matrix.toarray())
    R = torch.from_numpy(adj[:nu, nu:])
    s_v = torch.from_numpy(dense_knn_sim(ds.features["v"].astype(np.float64), 10))
    s_t = torch.from_numpy(dense_knn_sim(ds.features["t"].astype(np.float64), 10))
    ids = p["item_id_embedding.weight"]
    x_v = lin(p, "image_trs", p["image_embedding.weight"])
    x_t = lin(p, "text_trs", p["text_embedding.weight"])
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
    expected = bpr_half_sq_ref(z[:nu], z[nu:], BATCH, 0.5, 2048)
    expected = expected + 0.1 * (info_nce_ref(side[nu:][BATCH["pos_items"]], content[nu:][BATCH["pos_items"]], 0.2)
                                 + info_nce_ref(side[:nu][BATCH["users"]], content[:nu][BATCH["users"]], 0.2))
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
