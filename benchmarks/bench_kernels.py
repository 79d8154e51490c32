"""Graph products of a training step: the compiled CPU kernels (``mmrec.native``) against torch's own CSR
product, on a dataset's normalised user-item adjacency (Baby-sized ``baby_synth`` by default).

Three products, each as LightGCN's training step uses them (rows = the users and items of a batch of
``--batch`` random training pairs, ~5,000 of Baby's 26,495 nodes at 2,048):

- full:         A X                 (every layer but the last, forward and backward)
- rows:         A[rows] X           (the last layer, forward; torch: a pre-sliced row block, slicing not timed)
- rows_t:       A[rows]^T G         (the last layer, backward; torch: the pre-sliced block's transpose)

    python benchmarks/bench_kernels.py                    # one thread, d = 64
    python benchmarks/bench_kernels.py --threads 2 --dim 128

Each figure is the best of ``--repeats`` timings of ``--iters`` products (milliseconds per product); the
ratio is torch's time over the kernel's, both measured in this run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import utils.synth  # noqa: E402,F401  (registers the synthetic presets)
from mmrec import graph, native  # noqa: E402
from mmrec.config import load_config  # noqa: E402
from mmrec.data import RecDataset  # noqa: E402
from mmrec.data.sources import ensure_generated  # noqa: E402


def best_ms(fn, iters: int, repeats: int) -> float:
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best * 1e3


def torch_product(csr: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(csr.shape[0], x.shape[1])
    return torch.addmm(out, csr, x, beta=0, out=out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="baby_synth")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2048, help="training pairs whose users and items are the rows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not native.available():
        sys.exit("bench_kernels: the compiled kernels are not available here (no C compiler, or MMREC_NATIVE=0)")

    cfg = load_config("LightGCN", args.dataset, {})
    ensure_generated(cfg)
    dataset = RecDataset(cfg)
    train = dataset.train_matrix.tocoo()
    n_users, n_items = dataset.n_users, dataset.n_items
    csr = graph.csr_operator(graph.norm_adjacency(dataset.train_matrix, "sym_eps"))  # LightGCN's adjacency

    gen = torch.Generator().manual_seed(0)
    pick = torch.randint(0, train.nnz, (args.batch,), generator=gen)
    users = torch.from_numpy(train.row)[pick]
    items = torch.cat([torch.from_numpy(train.col)[pick], torch.randint(0, n_items, (args.batch,), generator=gen)])
    rows = graph.batch_rows(users, items[: args.batch], items[args.batch:]).node_rows(n_users)
    x = torch.randn(csr.shape[1], args.dim, generator=gen)
    g = torch.randn(rows.numel(), args.dim, generator=gen)
    block, block_t = graph.row_block(csr, rows)  # what torch's path slices for a batch
    in_place = graph.rows_product(csr, rows, x)

    cases = [("full", lambda: native.csr_rows_mm(csr, x), lambda: torch_product(csr, x)),
             ("rows", lambda: in_place.times(x), lambda: torch_product(block, x)),
             ("rows_t", lambda: in_place.transpose_times(g), lambda: torch_product(block_t, g))]
    for name, ours, theirs in cases:  # same values first
        torch.testing.assert_close(ours(), theirs(), rtol=1e-4, atol=1e-5)
    print(f"# bench_kernels: {args.dataset} ({n_users:,} users, {n_items:,} items, {csr._nnz():,} entries in A), "
          f"{rows.numel():,} batch rows, d = {args.dim}, {args.threads} thread(s)")
    print("| product | compiled kernel, ms | torch CSR, ms | torch / kernel |")
    print("|---|---|---|---|")
    for name, ours, theirs in cases:
        a, b = best_ms(ours, args.iters, args.repeats), best_ms(theirs, args.iters, args.repeats)
        print(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
