"""Shared graph primitives: bipartite adjacency flavours, LightGCN propagation, cosine kNN, kNN
normalisations and degree-sensitive edge pruning.  Every model calls these; none re-implements them.

Flavours (BASELINES.md section 1):
- adjacency: ``sym`` (D^-1/2 A D^-1/2, exact degrees, 1/0 -> 0: MGCN, SMORE, MAGNET),
  ``sym_eps`` (degrees + 1e-7: MMRec LightGCN, FREEDOM), ``rw_self_loop`` (D~^-1 (A + I): LATTICE).
- kNN normalisation: ``raw`` (kept cosine values, MAGNET), ``bin`` (binary, row-degree sym-norm:
  FREEDOM, MENTOR), ``sim`` (cosine values / sqrt(r_i r_j) with row sums: MGCN, SMORE, GUME, CMDL,
  LATTICE), ``sim_soil`` (``sim`` clamped to >= 1e-7: SOIL).
"""
from __future__ import annotations

import warnings
from typing import Literal, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch

from mmrec import native

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
DEGREE_EPS = 1e-7
# spmm(rows=...) / propagate(rows=...) slice A[rows] (and its transpose for the backward) only while those
# rows hold at most this share of A's non-zeros; above it one full product and a row pick cost less.
# Measured on baby_synth, one thread: on CPU (scipy slices) a LightGCN batch's rows hold ~35% of A, and
# slicing + both row-block products took 10 ms against 18 ms for two full products; the torch slicing used
# on other devices sorts, so it keeps the earlier, lower bound.
ROW_BLOCK_MAX_SHARE = {"cpu": 0.7, "other": 0.3}
AdjFlavour = Literal["sym", "sym_eps", "rw_self_loop"]
KnnFlavour = Literal["raw", "bin", "sim", "sim_soil"]


# ----------------------------------------------------------------------------------------------
# conversions
def to_torch_sparse(matrix: sp.spmatrix, device: torch.device | str = "cpu") -> torch.Tensor:
    """scipy sparse -> coalesced float32 torch COO tensor on `device`."""
    coo = sp.coo_matrix(matrix)
    indices = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    values = torch.from_numpy(coo.data.astype(np.float32))
    return torch.sparse_coo_tensor(indices, values, coo.shape, device=device, check_invariants=False).coalesce()


def sparse_from_edges(rows, cols, values, shape, device="cpu") -> torch.Tensor:
    """Build a coalesced COO tensor from index/value tensors (duplicates are summed)."""
    rows = torch.as_tensor(rows, dtype=torch.long, device=device)
    cols = torch.as_tensor(cols, dtype=torch.long, device=device)
    values = torch.as_tensor(values, dtype=torch.float32, device=device)
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, shape, device=device,
                                   check_invariants=False).coalesce()


# ----------------------------------------------------------------------------------------------
# user-item adjacency
def bipartite_adjacency(train: sp.spmatrix, item_item: sp.spmatrix | None = None) -> sp.csr_matrix:
    """A = [[0, Y], [Y^T, S]] of size (U+I) x (U+I); S (item-item block) defaults to 0."""
    train = sp.csr_matrix(train, dtype=np.float32)
    n_users, n_items = train.shape
    item_block = item_item if item_item is not None else sp.csr_matrix((n_items, n_items), dtype=np.float32)
    return sp.bmat([[sp.csr_matrix((n_users, n_users), dtype=np.float32), train],
                    [train.T, item_block]], format="csr", dtype=np.float32)


def inverse_sqrt_degree(degree: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """(d + eps)^-1/2 with the inverse of a zero degree set to 0."""
    degree = np.asarray(degree, dtype=np.float64).ravel() + eps
    with np.errstate(divide="ignore"):
        inv = np.power(degree, -0.5)
    inv[~np.isfinite(inv)] = 0.0
    return inv


def sym_normalize(adj: sp.spmatrix, degree_eps: float = 0.0) -> sp.csr_matrix:
    """D^-1/2 A D^-1/2 with D the row sums of A (LightGCN's normalisation, Eq. 4 of MAGNET)."""
    adj = sp.csr_matrix(adj)
    d = inverse_sqrt_degree(adj.sum(axis=1), degree_eps)
    return sp.csr_matrix(sp.diags(d) @ adj @ sp.diags(d), dtype=np.float32)


def rw_normalize_self_loops(adj: sp.spmatrix) -> sp.csr_matrix:
    """D~^-1 (A + I), D~ the row sums of A + I (LATTICE's UI graph; not symmetric)."""
    adj = sp.csr_matrix(adj) + sp.identity(adj.shape[0], dtype=np.float32, format="csr")
    deg = np.asarray(adj.sum(axis=1), dtype=np.float64).ravel()
    with np.errstate(divide="ignore"):
        inv = 1.0 / deg
    inv[~np.isfinite(inv)] = 0.0
    return sp.csr_matrix(sp.diags(inv) @ adj, dtype=np.float32)


def norm_adjacency(train: sp.spmatrix, flavour: AdjFlavour = "sym",
                   item_item: sp.spmatrix | None = None) -> sp.csr_matrix:
    """Normalised (U+I) x (U+I) adjacency of the training interactions in one of the named flavours."""
    adj = bipartite_adjacency(train, item_item)
    if flavour == "sym":
        return sym_normalize(adj)
    if flavour == "sym_eps":
        binary = adj.copy()
        binary.data[:] = 1.0  # MMRec LightGCN / FREEDOM count (A > 0) for degrees
        d = inverse_sqrt_degree(binary.sum(axis=1), DEGREE_EPS)
        return sp.csr_matrix(sp.diags(d) @ adj @ sp.diags(d), dtype=np.float32)
    if flavour == "rw_self_loop":
        return rw_normalize_self_loops(adj)
    raise ValueError(f"unknown adjacency flavour {flavour!r}; use one of sym, sym_eps, rw_self_loop")


def user_item_block(norm_adj: sp.spmatrix, n_users: int) -> sp.csr_matrix:
    """R = the user-item block of a normalised (U+I) adjacency (R[u, i] = 1/sqrt(d_u d_i) for sym)."""
    return sp.csr_matrix(norm_adj)[:n_users, n_users:]


# ----------------------------------------------------------------------------------------------
# sparse x dense products
def csr_mm(csr: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A CSR matrix times a dense one, written once into a fresh output: the compiled kernel on CPU
    (``mmrec.native.csr_rows_mm``) where it builds, else ``addmm`` with beta=0 (``torch.sparse.mm``
    zero-fills an output and copies it before the product: two extra passes over a [rows, d] tensor, a
    third of a LightGCN training step at Baby size; beta=0 ignores the input, NaN included)."""
    out = native.csr_rows_mm(csr, x)
    if out is not None:
        return out
    if csr.device.type != "cpu":  # (the zero-fill argument above is measured on CPU only)
        return torch.sparse.mm(csr, x)
    out = x.new_empty(csr.shape[0], x.shape[1])
    return torch.addmm(out, csr, x, beta=0, out=out)


class _Product(NamedTuple):
    """A fixed sparse operator M as CSR tensors: ``times(x)`` = M x, ``transpose_times(g)`` = M^T g."""
    mat: torch.Tensor
    mat_t: torch.Tensor

    def times(self, x: torch.Tensor) -> torch.Tensor:
        return csr_mm(self.mat, x)

    def transpose_times(self, g: torch.Tensor) -> torch.Tensor:
        return csr_mm(self.mat_t, g)


class _RowsProduct(NamedTuple):
    """M = A[rows], read in place from A's CSR by the compiled kernels: ``times(x)`` = A[rows] x gathers,
    ``transpose_times(g)`` = A[rows]^T g scatters the same entries.  No slice or transpose of the row block
    is built."""
    csr: torch.Tensor
    rows: torch.Tensor

    def times(self, x: torch.Tensor) -> torch.Tensor:
        return native.csr_rows_mm(self.csr, x, self.rows)

    def transpose_times(self, g: torch.Tensor, alpha: float = 1.0, diag: float = 0.0,
                        extra: torch.Tensor | None = None) -> torch.Tensor:
        """alpha A[rows]^T g, plus diag g[i] + extra[i] at row rows[i] (a readout share, in the same pass)."""
        return native.csr_rows_t_mm(self.csr, g, self.rows, alpha, diag, extra)


class _CsrMatmul(torch.autograd.Function):
    """y = M x with M fixed (a ``_Product`` or ``_RowsProduct``): forward and backward (M^T g) both run as
    CSR kernels, which on CPU are several times faster than torch's COO sparse.mm and its backward."""

    @staticmethod
    def forward(ctx, x, product):
        ctx.product = product
        return product.times(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.product.transpose_times(grad.contiguous()), None


def _csr_pair(adj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pair = getattr(adj, "_mmrec_csr", None)
    if pair is None:
        coo = adj.coalesce() if adj.layout == torch.sparse_coo else adj.to_sparse_coo().coalesce()
        pair = (coo.to_sparse_csr(), coo.t().coalesce().to_sparse_csr())
        adj._mmrec_csr = pair  # converted once per matrix object, reused by every later product
    return pair


def _csr_tensor(matrix: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    return torch.sparse_csr_tensor(torch.from_numpy(matrix.indptr.astype(np.int64)),
                                   torch.from_numpy(matrix.indices.astype(np.int64)),
                                   torch.from_numpy(np.asarray(matrix.data, dtype=np.float32)),
                                   matrix.shape, device=device, check_invariants=False)


def scipy_csr(adj: torch.Tensor) -> sp.csr_matrix:
    """A CPU sparse tensor as a scipy CSR sharing its memory (built once per matrix object)."""
    mat = getattr(adj, "_mmrec_scipy", None)
    if mat is None:
        csr, _ = _csr_pair(adj)
        mat = sp.csr_matrix((csr.values().numpy(), csr.col_indices().numpy(), csr.crow_indices().numpy()),
                            shape=tuple(csr.shape))
        adj._mmrec_scipy = mat
    return mat


def csr_operator(matrix: sp.spmatrix, device: torch.device | str = "cpu") -> torch.Tensor:
    """A fixed sparse matrix ready for ``spmm`` / ``propagate``: a CSR tensor with its transpose built
    by scipy (no sort), for matrices made often, like a neighbour sample drawn every epoch."""
    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    device = torch.device(device)
    csr = _csr_tensor(matrix, device)
    csr._mmrec_csr = (csr, _csr_tensor(matrix.T.tocsr(), device))
    if device.type == "cpu":
        csr._mmrec_scipy = matrix
    return csr


def row_block(adj: torch.Tensor, rows: torch.Tensor,
              use_scipy: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A[rows], A[rows]^T) as CSR tensors: the rows of a fixed sparse A that a batch needs, and the
    transpose its backward multiplies by.  Costs O(nnz of those rows), never a pass over all of A.
    On CPU scipy slices and transposes (compiled, no sort); elsewhere torch ops on the device."""
    csr, _ = _csr_pair(adj)
    if use_scipy is None:
        use_scipy = csr.device.type == "cpu"
    if use_scipy:
        sub = scipy_csr(adj)[rows.numpy()]
        return _csr_tensor(sub, csr.device), _csr_tensor(sub.T.tocsr(), csr.device)
    crow, col, val = csr.crow_indices(), csr.col_indices(), csr.values()
    start = crow[rows]
    count = crow[rows + 1] - start
    ptr = torch.zeros(rows.numel() + 1, dtype=torch.long, device=csr.device)
    ptr[1:] = torch.cumsum(count, 0)
    pos = torch.repeat_interleave(start - ptr[:-1], count) + torch.arange(int(ptr[-1]), device=csr.device)
    local = torch.repeat_interleave(torch.arange(rows.numel(), device=csr.device), count)
    sub = torch.sparse_csr_tensor(ptr, col[pos], val[pos], (rows.numel(), csr.shape[1]), check_invariants=False)
    sub_t = torch.sparse_coo_tensor(torch.stack([col[pos], local]), val[pos], (csr.shape[1], rows.numel()),
                                    check_invariants=False).coalesce().to_sparse_csr()
    return sub, sub_t


def _row_share(adj: torch.Tensor, rows: torch.Tensor) -> float:
    """Share of A's non-zeros that lie in ``rows``."""
    crow = _csr_pair(adj)[0].crow_indices()
    return float((crow[rows + 1] - crow[rows]).sum()) / max(int(crow[-1]), 1)


def _slice_rows(adj: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether A[rows] is worth slicing rather than one full product (``ROW_BLOCK_MAX_SHARE``)."""
    bound = ROW_BLOCK_MAX_SHARE["cpu" if adj.device.type == "cpu" else "other"]
    return _row_share(adj, rows) <= bound


def rows_product(adj: torch.Tensor, rows: torch.Tensor, x: torch.Tensor) -> _Product | _RowsProduct | None:
    """How to multiply by A[rows] (x: what it will multiply): read in place by the compiled kernels (CPU,
    float32; rows may repeat), else a sliced row block while it holds at most ``ROW_BLOCK_MAX_SHARE`` of A,
    else None (one full product, rows picked, costs less)."""
    csr = _csr_pair(adj)[0]
    if native.csr_ready(csr, x):
        return _RowsProduct(csr, rows)
    return _Product(*row_block(adj, rows)) if _slice_rows(adj, rows) else None


def spmm(adj: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse (fixed) matrix times dense matrix, differentiable in ``x``.  Use this (or ``propagate``)
    instead of ``torch.sparse.mm``; a sparse matrix whose values carry gradients falls back to it.
    ``rows`` (a LongTensor) returns only those rows of A x, at the cost of those rows of A."""
    if not adj.is_sparse and adj.layout != torch.sparse_csr:
        return adj @ x if rows is None else adj[rows] @ x
    if adj.requires_grad:
        out = torch.sparse.mm(adj, x)
        return out if rows is None else out[rows]
    product = _Product(*_csr_pair(adj)) if rows is None else rows_product(adj, rows, x)
    if product is None:
        return spmm(adj, x)[rows]  # the rows hold most of A: one full product is cheaper than slicing
    if x.requires_grad:
        return _CsrMatmul.apply(x, product)
    return product.times(x)


# ----------------------------------------------------------------------------------------------
# propagation
class BatchRows(NamedTuple):
    """A training batch's own users and items (sorted, unique) and each pair's position among them."""
    users: torch.Tensor
    items: torch.Tensor
    user_at: torch.Tensor
    pos_at: torch.Tensor
    neg_at: torch.Tensor

    def node_rows(self, n_users: int) -> torch.Tensor:
        """The batch's rows of a (U+I)-node table: its users, then its items (offset by n_users)."""
        return torch.cat([self.users, self.items + n_users])

    def pair_rows(self) -> torch.Tensor:
        """Positions in ``node_rows`` of every pair's user, then every positive, then every negative: one
        ``index_select`` gathers all three (its backward is one ``index_add``, where indexing with
        ``t[idx]`` three times sorts the indices in each backward)."""
        n = self.users.numel()
        return torch.cat([self.user_at, self.pos_at + n, self.neg_at + n])


def batch_rows(users: torch.Tensor, pos_items: torch.Tensor, neg_items: torch.Tensor) -> BatchRows:
    """The rows a batch needs, for ``propagate(..., rows=...)`` (the last layer for those rows only)."""
    batch_users, user_at = torch.unique(users, return_inverse=True)
    batch_items, item_at = torch.unique(torch.cat([pos_items, neg_items]), return_inverse=True)
    return BatchRows(batch_users, batch_items, user_at, item_at[: pos_items.numel()], item_at[pos_items.numel():])


READOUT_WEIGHTS = {"mean": lambda n_layers: [1.0 / (n_layers + 1)] * (n_layers + 1),
                   "sum": lambda n_layers: [1.0] * (n_layers + 1),
                   "last": lambda n_layers: [0.0] * n_layers + [1.0]}


class _LinearPropagation(torch.autograd.Function):
    """out = sum_l w_l H_l[rows] with H_0 = ego, H_l = A_l H_{l-1}: the whole propagation as one autograd node.

    The readout is linear in ego, so nothing is saved for the backward but the matrices, and the backward
    runs the same chain the other way, G_{l-1} = A_l^T G_l + w_{l-1} g (into one buffer per layer, the
    readout's share added in place).  The same values and gradients as layer-by-layer autograd, without
    the stacked layers, the per-layer zero-filled scatter buffers and the copies autograd makes of them:
    at LightGCN's size these were a third of a training step.  ``rows`` None means every row; otherwise
    the last layer is A_L[rows] H_{L-1} (``last``: a ``rows_product``, or None when the rows hold most of
    A: then the full product, sliced)."""

    @staticmethod
    def forward(ctx, ego, rows, weights, last, *pairs):
        ctx.rows, ctx.weights, ctx.last, ctx.pairs = rows, weights, last, pairs
        ctx.set_materialize_grads(False)
        ego_rows = ego if rows is None else ego.index_select(0, rows)
        out = ego_rows * weights[0]
        h = ego
        for layer, (csr, _) in enumerate(pairs):
            if layer == len(pairs) - 1 and last is not None:
                h_rows = last.times(h)
            else:
                h = csr_mm(csr, h)
                h_rows = h if rows is None else h.index_select(0, rows)
            if weights[layer + 1]:
                out.add_(h_rows, alpha=weights[layer + 1])
        # second output: ego[rows] (a regulariser on the batch's layer-0 rows), its gradient joins the
        # readout's in the backward instead of a separate full-size scatter
        return out, (ego_rows if rows is not None else ego.new_empty(0, ego.shape[1]))

    @staticmethod
    def backward(ctx, g, g_ego_rows):
        rows, weights, last, pairs = ctx.rows, ctx.weights, ctx.last, ctx.pairs
        n_nodes = pairs[0][0].shape[1]
        if g is None:
            g = torch.zeros(n_nodes if rows is None else rows.numel(), g_ego_rows.shape[1],
                            dtype=g_ego_rows.dtype, device=g_ego_rows.device)
        g = g.contiguous()

        def readout_share(buffer, w, extra=None):  # buffer[rows] += w g (+ extra)
            if not w and extra is None:
                return buffer
            if rows is not None and native.rows_add(buffer, rows, g, w, extra) is not None:
                return buffer
            add = g * w if extra is None else (extra if not w else torch.add(extra, g, alpha=w))
            return buffer.add_(add) if rows is None else buffer.index_add_(0, rows, add)

        n_layers, shared = len(pairs), False  # shared: the next readout share is already in grad
        if isinstance(last, _RowsProduct):  # A_L[rows]^T (w_L g) with H_{L-1}'s share at the same rows, one pass
            grad = last.transpose_times(g, weights[-1], weights[-2], g_ego_rows if n_layers == 1 else None)
            shared = True
        elif last is not None:
            grad = last.transpose_times(g * weights[-1])  # A_L[rows]^T (w_L g): [nodes, d]
        else:
            grad = readout_share(torch.zeros(n_nodes, g.shape[1], dtype=g.dtype, device=g.device), weights[-1])
            grad = csr_mm(pairs[-1][1], grad)
        for layer in range(n_layers - 2, -1, -1):  # layer's output H_{layer+1}: add its readout share, go back
            grad = csr_mm(pairs[layer][1], grad if shared else readout_share(grad, weights[layer + 1]))
            shared = False
        grad = grad if shared else readout_share(grad, weights[0], g_ego_rows)
        return (grad, None, None, None) + (None,) * n_layers


def propagate(adj: torch.Tensor | list[torch.Tensor], ego: torch.Tensor, n_layers: int, readout: str = "mean",
              rows: torch.Tensor | None = None, return_ego_rows: bool = False):
    """LightGCN propagation H_{l+1} = A H_l; readout ``mean`` over layers 0..L (Eq. 5), ``sum``,
    or ``last``.  ``adj`` may be one matrix or one per layer (neighbour sampling draws each layer's own).

    ``rows``: return only those rows of the readout.  The last layer is then computed for those rows
    alone (A[rows] H_{L-1}), which also spares its backward a full product: a training step that
    scores a batch needs L-1 full products forward and L-1 backward instead of L and L.
    ``return_ego_rows`` (with ``rows``): also return ego[rows], for a regulariser on the batch's layer-0
    embeddings, at no extra full-size pass in the backward.
    Fixed matrices run as one autograd node (``_LinearPropagation``); a matrix whose values carry
    gradients runs layer by layer."""
    mats = list(adj) if isinstance(adj, (list, tuple)) else [adj] * n_layers
    if len(mats) != n_layers:
        raise ValueError(f"propagate: {len(mats)} adjacency matrices for {n_layers} layers")
    if readout not in READOUT_WEIGHTS:
        raise ValueError(f"unknown readout {readout!r}")
    if return_ego_rows and rows is None:
        raise ValueError("propagate: return_ego_rows needs rows")
    weights = READOUT_WEIGHTS[readout](n_layers)
    fixed_sparse = all((m.is_sparse or m.layout == torch.sparse_csr) and not m.requires_grad for m in mats)
    if fixed_sparse and n_layers > 0:
        # the last layer for the rows alone (None: they hold most of A, so a full product, rows picked)
        last = None if rows is None else rows_product(mats[-1], rows, ego)
        out, ego_rows = _LinearPropagation.apply(ego, rows, weights, last, *[_csr_pair(m) for m in mats])
        return (out, ego_rows) if return_ego_rows else out
    pick = (lambda t: t) if rows is None else (lambda t: t[rows])
    out = pick(ego) * weights[0]
    h = ego
    for layer, mat in enumerate(mats):
        h = spmm(mat, h, rows if layer == n_layers - 1 else None)
        out = out + (h if layer == n_layers - 1 else pick(h)) * weights[layer + 1]
    return (out, ego[rows]) if return_ego_rows else out


# ----------------------------------------------------------------------------------------------
# kNN
def l2_normalize_rows(x: torch.Tensor) -> torch.Tensor:
    norm = x.norm(dim=1, keepdim=True)
    return x / norm.clamp_min(1e-12)


@torch.no_grad()
def cosine_topk(features: np.ndarray | torch.Tensor, k: int, include_self: bool = True,
                block_size: int = 2048, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine neighbours of every row, computed in row blocks (never a dense n x n matrix).

    Returns (indices int64 [n, k], values float32 [n, k]), each row sorted by decreasing similarity.
    With ``include_self`` the row itself (similarity 1) competes like any other item (MMRec);
    otherwise it is excluded and every row gets k real neighbours (MAGNET).
    """
    x = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features,
                        dtype=torch.float32, device=device)
    n = x.shape[0]
    k_eff = min(k, n if include_self else n - 1)
    if k_eff < 1:
        raise ValueError(f"kNN needs k >= 1 neighbours, got k={k} for {n} rows")
    x = l2_normalize_rows(x)
    out_idx = np.empty((n, k_eff), dtype=np.int64)
    out_val = np.empty((n, k_eff), dtype=np.float32)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        sim = x[start:stop] @ x.T  # [b, n]
        if not include_self:
            rows = torch.arange(stop - start, device=x.device)
            sim[rows, rows + start] = -float("inf")
        val, idx = torch.topk(sim, k_eff, dim=1)
        out_idx[start:stop] = idx.cpu().numpy()
        out_val[start:stop] = val.cpu().numpy()
    return out_idx, out_val


def normalize_edges(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n: int,
                    flavour: KnnFlavour = "sim", degree_eps: float = 0.0) -> sp.csr_matrix:
    """Normalise an item-item edge list into a sparse n x n matrix in one of the named flavours.

    ``bin`` uses row degrees on both sides (every value 1/(k + degree_eps) for k-NN rows); ``sim``
    divides each value by sqrt(r_i r_j), r the row sums of the kept values (not symmetrised; a
    non-positive row sum gives inverse degree 0); ``sim_soil`` clamps the result to at least 1e-7;
    ``raw`` keeps the values.
    """
    vals = np.asarray(values, dtype=np.float64)
    if flavour == "raw":
        out = vals
    elif flavour == "bin":
        deg = np.bincount(rows, minlength=n).astype(np.float64)
        d = inverse_sqrt_degree(deg, degree_eps)
        out = d[rows] * d[cols]
    elif flavour in ("sim", "sim_soil"):
        deg = np.bincount(rows, weights=vals, minlength=n)
        d = inverse_sqrt_degree(deg, degree_eps)
        out = vals * d[rows] * d[cols]
        if flavour == "sim_soil":
            out = np.maximum(out, 1e-7)
    else:
        raise ValueError(f"unknown kNN flavour {flavour!r}; use one of raw, bin, sim, sim_soil")
    return sp.csr_matrix((out.astype(np.float32), (rows, cols)), shape=(n, n))


def knn_matrix(indices: np.ndarray, values: np.ndarray, n: int, flavour: KnnFlavour = "sim",
               degree_eps: float = 0.0) -> sp.csr_matrix:
    """Row-wise kNN lists [n, k] -> normalised sparse n x n matrix (``normalize_edges``)."""
    rows = np.repeat(np.arange(n), indices.shape[1])
    return normalize_edges(rows, indices.ravel(), values.ravel(), n, flavour, degree_eps)


@torch.no_grad()
def whiten_rows(features: np.ndarray | torch.Tensor, dim: int, block_size: int = 8192) -> np.ndarray:
    """Whitened item features: rows L2-normalised and centred, then their coordinates on the top-``dim``
    principal directions, each divided by its standard deviation (every kept direction has unit variance).

    Raw cosine on pre-extracted features is dominated by a few high-variance directions shared by most items
    (a background, boilerplate text, the encoder's anisotropy); whitening weighs every kept direction alike
    and drops the low-variance rest (BERT-whitening, Su et al. 2021). Deterministic: an eigendecomposition of
    the feature covariance, accumulated in row blocks (never an n x n matrix)."""
    x = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features, dtype=torch.float32)
    n, n_dims = x.shape
    dim = min(int(dim), n_dims, n - 1)
    if dim < 1:
        raise ValueError(f"whitening needs dim >= 1 and at least 2 rows, got dim={dim} for features {tuple(x.shape)}")
    mean = torch.zeros(n_dims, dtype=torch.float64)
    for start in range(0, n, block_size):
        mean += l2_normalize_rows(x[start:start + block_size]).double().sum(0)
    mean /= n
    cov = torch.zeros(n_dims, n_dims, dtype=torch.float64)
    for start in range(0, n, block_size):
        block = l2_normalize_rows(x[start:start + block_size]).double() - mean
        cov += block.T @ block
    eigval, eigvec = torch.linalg.eigh(cov / (n - 1))  # ascending
    top = torch.arange(n_dims - 1, n_dims - 1 - dim, -1)
    eigvec = eigvec[:, top]
    eigvec = eigvec * torch.sign(eigvec[eigvec.abs().argmax(0), torch.arange(dim)])  # a fixed sign per direction
    scale = eigval[top].clamp_min(1e-12).rsqrt()
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, block_size):
        block = l2_normalize_rows(x[start:start + block_size]).double() - mean
        out[start:start + block_size] = ((block @ eigvec) * scale).float().numpy()
    return out


def neighbourhood_mean(features: np.ndarray | torch.Tensor, neighbours: np.ndarray) -> torch.Tensor:
    """x~_i = the mean of x_i and the rows of its neighbours ``neighbours[i]`` ([n, k] indices): one step of
    smoothing over a kNN graph (a denoised feature row)."""
    x = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features, dtype=torch.float32)
    n, k = neighbours.shape
    rows = np.repeat(np.arange(n), k + 1)
    cols = np.concatenate([np.arange(n)[:, None], neighbours], axis=1).ravel()
    mean = sparse_from_edges(rows, cols, np.full(rows.size, 1.0 / (k + 1), np.float32), (n, n), x.device)
    return spmm(mean, x)


def similarity_settings(config) -> dict[str, int]:
    """A run's ``similarity_whitening`` / ``similarity_smoothing`` (0 = raw features) as the keyword arguments of
    ``similarity_features``, ``cached_knn`` and ``knn_graph``: every item-item kNN graph of a run is built on
    the same features."""
    return {"whitening_dim": int(config.get("similarity_whitening", 0) or 0),
            "smoothing_k": int(config.get("similarity_smoothing", 0) or 0)}


def similarity_features(dataset, modality: str, whitening_dim: int = 0, smoothing_k: int = 0) -> np.ndarray:
    """The features item similarity is computed on: raw (both 0), whitened (``whiten_rows``) and/or smoothed
    (each row averaged with its ``smoothing_k`` cosine neighbours in the whitened space, rows L2-normalised
    first). Cached on disk when transformed, keyed by the feature hash and both settings."""
    feats = dataset.features[modality]
    if not whitening_dim and not smoothing_k:
        return feats
    key = {"features": dataset.feature_hash(modality), "whitening_dim": int(whitening_dim),
           "smoothing_k": int(smoothing_k)}

    def build() -> dict[str, np.ndarray]:
        x = whiten_rows(feats, whitening_dim) if whitening_dim else np.asarray(feats, dtype=np.float32)
        if smoothing_k:
            idx, _ = cosine_topk(x, smoothing_k, include_self=False)
            x = neighbourhood_mean(l2_normalize_rows(torch.as_tensor(x)), idx).numpy()
        return {"features": x}

    return dataset.cache.get_or_build("similarity_features", key, build)["features"]


def cached_knn(dataset, modality: str, k: int, include_self: bool = True, block_size: int = 2048,
               device: torch.device | str = "cpu", whitening_dim: int = 0,
               smoothing_k: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k lists of one modality's features (raw, or as ``similarity_features`` transforms them),
    cached on disk keyed by the feature hash (computed on ``device``: a GPU builds Electronics' lists in
    seconds)."""
    feats = similarity_features(dataset, modality, whitening_dim, smoothing_k)
    key = {"features": dataset.feature_hash(modality), "k": int(k), "include_self": bool(include_self)}
    if whitening_dim or smoothing_k:  # (absent when raw, so existing caches keep their keys)
        key.update(whitening_dim=int(whitening_dim), smoothing_k=int(smoothing_k))
    arrays = dataset.cache.get_or_build(
        "cosine_knn", key,
        lambda: dict(zip(("indices", "values"), cosine_topk(feats, k, include_self, block_size, device))))
    return arrays["indices"], arrays["values"]


def knn_graph(dataset, modality: str, k: int, flavour: KnnFlavour, include_self: bool = True,
              degree_eps: float = 0.0, device: torch.device | str = "cpu", whitening_dim: int = 0,
              smoothing_k: int = 0) -> sp.csr_matrix:
    """Normalised item-item kNN graph of one modality (cached lists on ``similarity_features``, then the named
    normalisation)."""
    idx, val = cached_knn(dataset, modality, k, include_self, device=device, whitening_dim=whitening_dim,
                          smoothing_k=smoothing_k)
    return knn_matrix(idx, val, dataset.n_items, flavour, degree_eps)


# ----------------------------------------------------------------------------------------------
# degree-sensitive edge pruning (FREEDOM; reused by the ITCoHD-MRec reconstruction)
def bipartite_sym_weights(users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int,
                          degree_eps: float = DEGREE_EPS) -> torch.Tensor:
    """1/sqrt(d_u d_i) for each (u, i) edge, degrees counted over the given edges (+ eps)."""
    du = torch.bincount(users, minlength=n_users).float() + degree_eps
    di = torch.bincount(items, minlength=n_items).float() + degree_eps
    return du.pow(-0.5)[users] * di.pow(-0.5)[items]


def degree_sensitive_keep(users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int,
                          drop_ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """FREEDOM's edge sample: the positions of int(|E| (1 - drop_ratio)) edges drawn without replacement
    with probability proportional to 1/sqrt(d_u d_i) (so edges between popular nodes are dropped most)."""
    weights = bipartite_sym_weights(users, items, n_users, n_items)
    n_keep = int(users.numel() * (1.0 - drop_ratio))  # IEEE double truncation, as the reference
    return torch.multinomial(weights, n_keep, replacement=False, generator=generator)


def degree_sensitive_prune(users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int,
                           drop_ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """FREEDOM's pruned graph: the edges of ``degree_sensitive_keep``, re-normalised with their own
    degrees (+1e-7) and mirrored into a (U+I) x (U+I) sparse tensor."""
    keep = degree_sensitive_keep(users, items, n_users, n_items, drop_ratio, generator)
    ku, ki = users[keep], items[keep]
    kv = bipartite_sym_weights(ku, ki, n_users, n_items)
    n = n_users + n_items
    rows = torch.cat([ku, ki + n_users])
    cols = torch.cat([ki + n_users, ku])
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.cat([kv, kv]), (n, n),
                                   check_invariants=False).coalesce()
