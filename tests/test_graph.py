"""Shared propagation primitives: adjacency flavours, LightGCN readout, degree-sensitive pruning."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mmrec import graph, native


def _train():
    # 2 users x 3 items: u0-{i0,i1}, u1-{i1}
    return sp.csr_matrix((np.ones(3, np.float32), ([0, 0, 1], [0, 1, 1])), shape=(2, 3))


def test_sym_adjacency_by_hand():
    a = graph.norm_adjacency(_train(), "sym").toarray()
    # degrees: u0 2, u1 1, i0 1, i1 2, i2 0
    assert a[0, 2] == pytest.approx(1 / np.sqrt(2 * 1))
    assert a[0, 3] == pytest.approx(1 / np.sqrt(2 * 2))
    assert a[1, 3] == pytest.approx(1 / np.sqrt(1 * 2))
    assert np.allclose(a, a.T) and a[4].sum() == 0  # isolated item: zero row, no NaN
    eps = graph.norm_adjacency(_train(), "sym_eps").toarray()
    assert np.allclose(eps, a, rtol=1e-6)


def test_rw_self_loop_adjacency_rows_sum_to_one():
    a = graph.norm_adjacency(_train(), "rw_self_loop").toarray()
    assert np.allclose(a.sum(axis=1), 1.0)
    assert a[0, 0] == pytest.approx(1 / 3) and a[0, 2] == pytest.approx(1 / 3)  # degree 2 + self loop
    assert a[4, 4] == pytest.approx(1.0)


def test_propagate_mean_readout_matches_dense():
    adj = graph.norm_adjacency(_train(), "sym")
    ego = torch.randn(5, 4)
    out = graph.propagate(graph.to_torch_sparse(adj), ego, 2)
    dense = torch.from_numpy(adj.toarray())
    expected = (ego + dense @ ego + dense @ dense @ ego) / 3
    assert torch.allclose(out, expected, atol=1e-6)


def test_degree_sensitive_prune_keeps_count_and_renormalises():
    users = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    items = torch.tensor([0, 1, 1, 2, 0, 2, 3, 3])
    g = torch.Generator().manual_seed(0)
    adj = graph.degree_sensitive_prune(users, items, 4, 4, drop_ratio=0.5, generator=g).to_dense()
    assert int((adj[:4, 4:] > 0).sum()) == int(8 * 0.5)
    assert torch.allclose(adj, adj.T)
    ku, ki = (adj[:4, 4:] > 0).nonzero(as_tuple=True)
    du = torch.bincount(ku, minlength=4).float()
    di = torch.bincount(ki, minlength=4).float()
    expected = (du[ku] + 1e-7).pow(-0.5) * (di[ki] + 1e-7).pow(-0.5)
    assert torch.allclose(adj[ku, ki + 4], expected)


def test_spmm_matches_dense_in_value_and_gradient():
    rng = np.random.default_rng(0)
    m = sp.random(7, 5, density=0.4, format="csr", dtype=np.float32, random_state=1)  # not square
    a = graph.to_torch_sparse(m)
    x = torch.randn(5, 3, requires_grad=True)
    y = graph.spmm(a, x)
    dense = torch.from_numpy(m.toarray())
    assert torch.allclose(y, dense @ x, atol=1e-6)
    w = torch.from_numpy(rng.normal(size=(7, 3)).astype(np.float32))
    (y * w).sum().backward()
    assert torch.allclose(x.grad, dense.T @ w, atol=1e-6)


@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("compiled,dim", [(True, 5), (True, 70), (False, 5)])  # compiled kernels (d < and > their
@pytest.mark.parametrize("readout", ["mean", "sum", "last"])                 # 64-float chunk), or torch's
@pytest.mark.parametrize("rows", [None, [2, 9, 4], [2, 9, 2, 4], list(range(0, 12, 1))])  # all; few; a repeat; all listed
def test_propagate_matches_dense_autograd_in_value_and_gradient(readout, rows, compiled, dim, n_layers, monkeypatch):
    """The one-node propagation against plain dense autograd, with a different non-symmetric matrix per
    layer (so a missing transpose or a layer out of order shows), and with rows a regulariser on the returned
    ego rows (its gradient joins the readout's)."""
    if compiled and not native.csr_ready(torch.zeros(1, 1).to_sparse_csr(), torch.zeros(1, 1)):
        pytest.skip("no C compiler on this machine")
    if not compiled:
        monkeypatch.setattr(native, "csr_ready", lambda csr, x: False)
    gen = torch.Generator().manual_seed(0)
    dense = [torch.rand(12, 12, generator=gen) * (torch.rand(12, 12, generator=gen) < 0.3) for _ in range(n_layers)]
    rows = None if rows is None else torch.tensor(rows)
    weight = torch.randn(12 if rows is None else len(rows), dim, generator=gen)
    reg_weight = torch.randn(weight.shape, generator=gen)
    ego = torch.randn(12, dim, generator=gen)
    ref_ego = ego.clone().requires_grad_()
    layers, h = [ref_ego], ref_ego
    for a in dense:
        h = a @ h
        layers.append(h)
    ref = {"mean": sum(layers) / (n_layers + 1), "sum": sum(layers), "last": layers[-1]}[readout]
    ref = ref if rows is None else ref[rows]
    ((ref * weight).sum() + (0 if rows is None else (ref_ego[rows] * reg_weight).sum())).backward()
    got_ego = ego.clone().requires_grad_()
    mats = [a.to_sparse() for a in dense]
    if rows is None:
        got = graph.propagate(mats, got_ego, n_layers, readout)
        (got * weight).sum().backward()
    else:
        got, ego_rows = graph.propagate(mats, got_ego, n_layers, readout, rows=rows, return_ego_rows=True)
        ((got * weight).sum() + (ego_rows * reg_weight).sum()).backward()
    torch.testing.assert_close(got, ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_ego.grad, ref_ego.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("dim", [5, 33, 70, 130])  # below, across and above the 16-float thread slices / 64-float chunks
def test_compiled_row_block_products_match_dense(threads, dim):
    """A[rows] x (gather) and A[rows]^T g (scatter into A's columns), rows repeating and unsorted, against
    dense products, at thread counts that split the columns differently."""
    if not native.csr_ready(torch.zeros(1, 1).to_sparse_csr(), torch.zeros(1, 1)):
        pytest.skip("no C compiler on this machine")
    gen = torch.Generator().manual_seed(1)
    dense = torch.rand(9, 14, generator=gen) * (torch.rand(9, 14, generator=gen) < 0.4)  # not square
    csr = dense.to_sparse_csr()
    rows = torch.tensor([7, 0, 3, 7, 8])
    x, g = torch.randn(14, dim, generator=gen), torch.randn(rows.numel(), dim, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gathered, scattered = native.csr_rows_mm(csr, x, rows), native.csr_rows_t_mm(csr, g, rows)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(gathered, dense[rows] @ x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scattered, dense[rows].T @ g, atol=1e-5, rtol=1e-5)
