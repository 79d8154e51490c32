"""Optional compiled kernels, built on first use with the machine's C compiler and loaded with ctypes.

Each kernel has a pure-torch equivalent: the caller falls back to it when no compiler is found, the build
fails, the tensors are not on the CPU, or ``MMREC_NATIVE=0`` is set; the tests check that both give the
same numbers.  Builds go to ``MMREC_NATIVE_DIR`` (default ``.cache/native`` in the repository), one file
per source, compiler and processor, so a shared folder never serves a build made for another CPU.

- ``topk_mix`` (``topk_mix.c``): MAGNET's Top-K softmax mixing of expert scores in full ranking, the
  compiled form of ``models.magnet.topk_softmax_mix``; ``relu_head_scores`` (same file): the concat-MLP
  expert heads' scores for a block of users x items without storing the hidden layer
  (``models.magnet.MAGNET.block_expert_scores``).
- ``csr_rows_mm`` / ``csr_rows_t_mm`` / ``rows_add`` (``csr_mm.c``): a CSR matrix times a dense one for graph propagation
  (all rows, or a batch's rows of A and the transpose of that row block, without slicing A).
- ``row_topk`` (``row_topk.c``): the top-k items of every row of a score block in evaluation, the compiled
  form of ``torch.topk(scores, k, dim=1).indices`` (~4x faster on one thread at 7,050 items, k = 20).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

log = logging.getLogger("mmrec.native")
_SOURCE = Path(__file__).with_name("topk_mix.c")
_ROW_TOPK_SOURCE = Path(__file__).with_name("row_topk.c")
_CSR_MM_SOURCE = Path(__file__).with_name("csr_mm.c")
_FLAG_SETS = (["-O3", "-march=native", "-fno-trapping-math", "-fopenmp"], ["-O3", "-fno-trapping-math", "-fopenmp"],
              ["-O3"])
_loaded: dict[str, object] = {}


def _cpu_signature() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as fh:
            lines = [ln for ln in fh.read().splitlines() if ln.startswith((b"model name", b"flags"))]
        return b"\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor().encode()


def _build(source: Path) -> Path | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        log.info("no C compiler found: %s runs its pure-torch path", source.stem)
        return None
    tag = hashlib.sha256(source.read_bytes() + compiler.encode() + platform.machine().encode()
                         + _cpu_signature()).hexdigest()[:16]
    folder = Path(os.environ.get("MMREC_NATIVE_DIR", Path(__file__).resolve().parents[2] / ".cache" / "native"))
    target = folder / f"{source.stem}-{tag}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    errors = ""
    for flags in _FLAG_SETS:
        done = subprocess.run([compiler, *flags, "-shared", "-fPIC", str(source), "-o", str(partial), "-lm"],
                              capture_output=True, text=True)
        if done.returncode == 0:
            os.replace(partial, target)  # atomic: concurrent runs never load a half-written file
            return target
        errors = done.stderr.strip()[-500:]
    log.warning("could not compile %s with %s: using the pure-torch path. Last error: %s", source.name, compiler,
                errors)
    return None


def _kernels(source: Path, signatures: dict[str, list]) -> tuple | None:
    """The functions ``signatures`` names from ``source``'s build (argument types each; every one returns
    an int status), loaded once per process; None when disabled (MMREC_NATIVE=0) or not buildable."""
    key = source.stem
    if key not in _loaded:
        fns = None
        if os.environ.get("MMREC_NATIVE", "1") != "0":
            path = _build(source)
            if path is not None:
                lib = ctypes.CDLL(str(path))
                fns = tuple(getattr(lib, name) for name in signatures)
                for fn, argtypes in zip(fns, signatures.values()):
                    fn.restype = ctypes.c_int
                    fn.argtypes = argtypes
        _loaded[key] = fns
    return _loaded[key]


_P, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
ROW_TOPK_MAX_K = 1024  # row_topk.c's MAX_K


_MAGNET_KERNELS = {"topk_mix": [_P] * 6 + [_I] * 5, "relu_head_scores": [_P] * 4 + [_I] * 5}  # topk_mix.c


def _magnet_kernel(name: str):
    """One of topk_mix.c's kernels by name, or None."""
    fns = _kernels(_SOURCE, _MAGNET_KERNELS)
    return fns and fns[list(_MAGNET_KERNELS).index(name)]


def _row_topk_function():
    fns = _kernels(_ROW_TOPK_SOURCE, {"row_topk": [_P, _I, _I, _I, _P, _I]})
    return fns and fns[0]


def _csr_functions():
    return _kernels(_CSR_MM_SOURCE, {"csr_rows_mm": [_P] * 4 + [_I, _P, _I, _P, _I],
                                     "csr_rows_t_mm": [_P] * 4 + [_I, _P, _I, _I, _D, _D, _P, _P, _I],
                                     "rows_add": [_P, _I, _P, _I, _P, _D, _P, _I]})


def row_topk(scores: torch.Tensor, k: int) -> torch.Tensor | None:
    """Indices [rows, k] of every row's k largest scores, best first (ties: the lower index first), or
    None when the kernel cannot run here (the caller then uses ``torch.topk``)."""
    fn = _row_topk_function()
    if fn is None or scores.device.type != "cpu" or scores.dim() != 2 or not 1 <= k <= min(scores.shape[1], ROW_TOPK_MAX_K):
        return None
    scores = scores.float().contiguous()
    out = torch.empty(scores.shape[0], k, dtype=torch.int64)
    rc = fn(scores.data_ptr(), scores.shape[0], scores.shape[1], int(k), out.data_ptr(), torch.get_num_threads())
    return out if rc == 0 else None


def csr_ready(csr: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the compiled CSR kernels can multiply ``csr`` by ``x`` here (CPU, float32, int64 indices)."""
    return (csr.layout == torch.sparse_csr and csr.device.type == "cpu" and x.device.type == "cpu"
            and csr.values().dtype == torch.float32 and x.dtype == torch.float32 and x.dim() == 2
            and csr.crow_indices().dtype == torch.int64 and _csr_functions() is not None)


def csr_rows_mm(csr: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor | None:
    """``csr @ x`` (or ``(csr @ x)[rows]``, reading only those rows of the matrix), or None when the kernel
    cannot run here (the caller then takes the torch path)."""
    if not csr_ready(csr, x):
        return None
    x = x.contiguous()
    rows = None if rows is None else rows.to(torch.int64).contiguous()
    n_out = csr.shape[0] if rows is None else rows.numel()
    out = torch.empty(n_out, x.shape[1])
    crow, col, val = csr.crow_indices(), csr.col_indices(), csr.values()
    _csr_functions()[0](crow.data_ptr(), col.data_ptr(), val.data_ptr(), x.data_ptr(), x.shape[1],
                        None if rows is None else rows.data_ptr(), n_out, out.data_ptr(), torch.get_num_threads())
    return out


def csr_rows_t_mm(csr: torch.Tensor, g: torch.Tensor, rows: torch.Tensor, alpha: float = 1.0, diag: float = 0.0,
                  extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """``alpha A[rows]^T g``, plus ``diag g[i] + extra[i]`` added at output row ``rows[i]`` ([A's columns, d]),
    read from A's own CSR (only the listed rows' entries; rows may repeat), or None when the kernel cannot
    run here."""
    if not csr_ready(csr, g):
        return None
    g, rows = g.contiguous(), rows.to(torch.int64).contiguous()
    extra = None if extra is None else extra.float().contiguous()
    out = torch.empty(csr.shape[1], g.shape[1])
    crow, col, val = csr.crow_indices(), csr.col_indices(), csr.values()
    _csr_functions()[1](crow.data_ptr(), col.data_ptr(), val.data_ptr(), g.data_ptr(), g.shape[1], rows.data_ptr(),
                        rows.numel(), csr.shape[1], float(alpha), float(diag),
                        None if extra is None else extra.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out


def rows_add(out: torch.Tensor, rows: torch.Tensor, g: torch.Tensor, diag: float,
             extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """``out[rows[i]] += diag g[i] + extra[i]`` in place (rows may repeat); returns out, or None when the
    kernel cannot run here (out untouched)."""
    if not (out.device.type == "cpu" and out.dtype == g.dtype == torch.float32 and out.is_contiguous()
            and out.dim() == 2 and _csr_functions() is not None):
        return None
    g, rows = g.contiguous(), rows.to(torch.int64).contiguous()
    extra = None if extra is None else extra.float().contiguous()
    _csr_functions()[2](out.data_ptr(), out.shape[1], rows.data_ptr(), rows.numel(), g.data_ptr(), float(diag),
                        None if extra is None else extra.data_ptr(), torch.get_num_threads())
    return out


def available() -> bool:
    """Whether the compiled kernels can be used in this process."""
    return _magnet_kernel("topk_mix") is not None


def relu_head_scores(hu: torch.Tensor, hi_t: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """y[e, u, i] = sum_h w[e, h] relu(hu[e, u, h] + hi_t[e, h, i]): hu [E, U, H], hi_t [E, H, I], w [E, H] ->
    [E, U, I], or None when the kernel cannot run here."""
    fn = _magnet_kernel("relu_head_scores")
    if fn is None or hu.device.type != "cpu":
        return None
    hu, hi_t, w = hu.float().contiguous(), hi_t.float().contiguous(), w.float().contiguous()
    n_exp, n_users, n_hidden = hu.shape
    out = torch.empty(n_exp, n_users, hi_t.shape[2])
    rc = fn(hu.data_ptr(), hi_t.data_ptr(), w.data_ptr(), out.data_ptr(), n_exp, n_users, hi_t.shape[2], n_hidden,
            torch.get_num_threads())
    return out if rc == 0 else None


def topk_mix(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor | None:
    """``models.magnet.topk_softmax_mix`` compiled: y [E, U, I], a [E, U], b [E, I] -> [U, I], or None when
    the kernel cannot run here (the caller then takes the torch path)."""
    fn = _magnet_kernel("topk_mix")
    if fn is None or y.device.type != "cpu" or y.shape[0] > 32:
        return None
    y, a, b = y.float().contiguous(), a.float().contiguous(), b.float().contiguous()
    ea = (a - a.amax(0)).exp().contiguous()
    eb = (b - b.amax(0)).exp().contiguous()
    n_exp, n_users, n_items = y.shape
    out = torch.empty(n_users, n_items)
    rc = fn(y.data_ptr(), a.data_ptr(), b.data_ptr(), ea.data_ptr(), eb.data_ptr(), out.data_ptr(),
            n_users, n_items, n_exp, int(k), torch.get_num_threads())
    return out if rc == 0 else None
