"""SMORE: shapes, the spectral filters against numpy's FFT, the max-union fusion graph, gate dropout only
in training, the loss against an independent dense float64 computation, per-dataset settings."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from mmrec.config import load_config
from models.smore import SMORE, max_union
from tests.helpers import (dense_knn_sim, dense_user_item, lightgcn_mean, lin, loss_and_params64,
                           mgcn_objective_ref)


def test_max_union_keeps_the_larger_weight_and_one_sided_edges():
    a = sp.csr_matrix(np.array([[0.5, 0.0, -0.2], [0.0, 0.3, 0.0], [0.1, 0.0, 0.0]]))
    b = sp.csr_matrix(np.array([[0.4, 0.7, 0.0], [0.0, 0.6, 0.0], [0.0, 0.0, 0.0]]))
    got = max_union(a, b).toarray()
    np.testing.assert_allclose(got, [[0.5, 0.7, -0.2], [0.0, 0.6, 0.0], [0.1, 0.0, 0.0]])


def test_spectrum_convolution_matches_numpy_fft(tiny):
    config, ds = tiny("SMORE")
    model = SMORE(config, ds)
    x_v, x_t = torch.randn(5, 64), torch.randn(5, 64)
    with torch.no_grad():
        c_v, c_t, c_f = model.spectrum_convolution(x_v, x_t)
    w = {k: (lambda a: a[..., 0] + 1j * a[..., 1])(getattr(model, k).detach().numpy().astype(np.float64))
         for k in ("image_filter", "text_filter", "fusion_filter")}
    f_v = np.fft.rfft(x_v.double().numpy(), axis=1, norm="ortho")
    f_t = np.fft.rfft(x_t.double().numpy(), axis=1, norm="ortho")
    np.testing.assert_allclose(c_v.numpy(), np.fft.irfft(f_v * w["image_filter"], n=64, axis=1, norm="ortho"), atol=1e-4)
    np.testing.assert_allclose(c_t.numpy(), np.fft.irfft(f_t * w["text_filter"], n=64, axis=1, norm="ortho"), atol=1e-4)
    np.testing.assert_allclose(c_f.numpy(), np.fft.irfft(f_v * f_t * w["fusion_filter"], n=64, axis=1, norm="ortho"),
                               atol=1e-4)


def test_smore_shapes_dropout_and_cached_eval(tiny):
    config, ds = tiny("SMORE", overrides={"dropout_rate": 0.5})
    model = SMORE(config, ds)
    zu, zi, side, content = model.forward()
    assert zu.shape == (ds.n_users, 64) and zi.shape == (ds.n_items, 64) and side.shape == content.shape
    assert not torch.allclose(model.forward()[0], zu)  # gate dropout is active in training
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward()[0], model.forward()[0])
        model.start_evaluation()
        s = model.full_sort_predict({"users": torch.tensor([0, 1])})
        assert s.shape == (2, ds.n_items)
        assert model.cached("forward", lambda: None) is not None  # this pass's forward is cached
        model.end_evaluation()


def test_smore_loss_matches_dense_float64(tiny):
    ds, got, p = loss_and_params64(tiny, SMORE, 1, dropout_rate=0.0, image_knn_k=5, text_knn_k=7, n_ui_layers=3,
                                   reg_weight=0.3, cl_loss=0.2)
    nu = ds.n_users
    adj, R = dense_user_item(ds)
    s_v = dense_knn_sim(ds.features["v"].astype(np.float64), 5)
    s_t = dense_knn_sim(ds.features["t"].astype(np.float64), 7)
    s_f = np.where((s_v != 0) & (s_t != 0), np.maximum(s_v, s_t), s_v + s_t)
    s_v, s_t, s_f = (torch.from_numpy(s) for s in (s_v, s_t, s_f))
    ids = p["item_embedding.weight"]
    x_v = lin(p, "image_proj", p["image_embedding.weight"])
    x_t = lin(p, "text_proj", p["text_embedding.weight"])

    def filt(x, name):
        w = torch.complex(p[name][..., 0], p[name][..., 1])
        return torch.fft.irfft(x * w, n=64, dim=1, norm="ortho")

    f_v, f_t = torch.fft.rfft(x_v, dim=1, norm="ortho"), torch.fft.rfft(x_t, dim=1, norm="ortho")
    c_v, c_t, c_f = filt(f_v, "image_filter"), filt(f_t, "text_filter"), filt(f_v * f_t, "fusion_filter")
    e = {m: ids * torch.sigmoid(lin(p, f"purifier_{m}.gate.linear", c)) for m, c in (("v", c_v), ("t", c_t), ("f", c_f))}
    content = lightgcn_mean(adj, torch.cat([p["user_embedding.weight"], ids]), 3)
    views = {}
    for m, s in (("v", s_v), ("t", s_t), ("f", s_f)):
        i = s @ e[m]
        views[m] = torch.cat([R @ i, i])

    def pref(name, x):
        return torch.softmax(torch.tanh(lin(p, f"{name}.query.0", x)) @ p[f"{name}.query.2.weight"].T, dim=1)

    xv = pref("pref_v", views["f"]) * views["v"]
    xt = pref("pref_t", views["f"]) * views["t"]
    g = {m: torch.sigmoid(lin(p, f"prefer_{m}.linear", content)) for m in "vtf"}
    side = (g["v"] * xv + g["t"] * xt + g["f"] * views["f"]) / 3
    z = content + side
    expected = mgcn_objective_ref(z, side, content, nu, reg_weight=0.3, cl_weight=0.2)
    assert abs(got - expected.item()) <= 1e-5 * abs(expected.item())


def test_smore_dataset_overrides():
    baby = load_config("SMORE", "baby")
    assert (baby["n_ui_layers"], baby["image_knn_k"], baby["text_knn_k"], baby["reg_weight"],
            baby["dropout_rate"]) == (4, 40, 15, 1e-4, 0.1)
    sports = load_config("SMORE", "sports")
    assert sports["cl_loss"] == 0.03 and sports["image_knn_k"] == 10
    grid = load_config("SMORE", "mini", grid=True)
    assert grid["hyper_parameters"] == ["n_ui_layers", "image_knn_k", "text_knn_k", "reg_weight", "dropout_rate"]
