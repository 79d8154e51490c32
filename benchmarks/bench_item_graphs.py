"""Memory and time of building every item-item graph that LATTICE, FREEDOM, MGCN and SMORE use, at
Electronics' catalogue size (63,001 items, 4096-d image and 384-d text features by default).

Each model's graphs are built through the same calls the models make (``mmrec.graph.knn_graph`` with
the dataset's LMDB cache, then the model's own combination: FREEDOM's 0.1/0.9 KNN-BIN mix, SMORE's
max-union fusion graph).  The cosine top-k lists are cached per (features, k), so the first model to
need a list pays for it and later ones read it back: both costs are printed.  LATTICE's learned dense
graph is refused at this size (``max_dense_items``); with ``--lattice-sparse`` the benchmark also
times one rebuild of our sparse learned graph (a labelled extension beyond the reference).

    python benchmarks/bench_item_graphs.py                       # Electronics size, ~10-15 CPU-min
    python benchmarks/bench_item_graphs.py --n-items 8000 --image-dim 1024   # a quick look

Peak memory is the peak resident set size above the level before each stage (sampled every 5 ms by
a thread; the features themselves are allocated before the first stage and not counted).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mmrec import graph  # noqa: E402
from mmrec.cache import ArtifactCache  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


class PeakRSS:
    """Context manager: peak RSS increase over the entry level, sampled by a background thread."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.c0  # all threads of this process
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.extra_gb = (self.peak - self.base) / 2**30


class SyntheticCatalogue:
    """The slice of RecDataset that the item-graph builders read: features, feature hashes, cache."""

    def __init__(self, features: dict[str, np.ndarray], cache_dir: str):
        self.features = features
        self.n_items = next(iter(features.values())).shape[0]
        self.n_users = 1
        self.train_matrix = sp.csr_matrix((1, self.n_items), dtype=np.float32)
        self.cache = ArtifactCache(cache_dir)

    def feature_hash(self, modality: str) -> str:
        x = self.features[modality]
        return hashlib.sha256(x[:: max(1, x.shape[0] // 1000)].tobytes() + str(x.shape).encode()).hexdigest()


def model_graphs(ds: SyntheticCatalogue, smore_k: int) -> dict:
    """name -> builder of the item graphs each model holds (as in the model files)."""
    from models.smore import max_union

    def freedom():
        v = graph.knn_graph(ds, "v", 10, "bin", True, graph.DEGREE_EPS)
        t = graph.knn_graph(ds, "t", 10, "bin", True, graph.DEGREE_EPS)
        return [0.1 * v + 0.9 * t]

    def mgcn():
        return [graph.knn_graph(ds, "v", 10, "sim"), graph.knn_graph(ds, "t", 10, "sim")]

    def smore():
        v = graph.knn_graph(ds, "v", smore_k, "sim")
        t = graph.knn_graph(ds, "t", smore_k, "sim")
        return [v, t, max_union(v, t)]

    def lattice_original():
        return [graph.knn_graph(ds, "v", 10, "sim"), graph.knn_graph(ds, "t", 10, "sim")]

    return {"MGCN (KNN-SIM k=10, v+t)": mgcn, "FREEDOM (KNN-BIN k=10, 0.1 v + 0.9 t)": freedom,
            f"SMORE (KNN-SIM k={smore_k}, v+t+max-union)": smore,
            "LATTICE original graphs (KNN-SIM k=10, v+t)": lattice_original}


def lattice_refusal(ds: SyntheticCatalogue) -> str:
    from mmrec.config import load_config
    from models.lattice import LATTICE

    config = load_config("LATTICE", "elec_synth", {"cache_dir": str(ds.cache.root)})
    try:
        LATTICE(config, ds)
    except ValueError as err:
        return str(err)
    return "(not refused)"


def lattice_sparse_rebuild(ds: SyntheticCatalogue) -> tuple[float, float, float]:
    from mmrec.config import load_config
    from models.lattice import LATTICE

    config = load_config("LATTICE", "elec_synth", {"cache_dir": str(ds.cache.root), "max_dense_items": None})
    model = LATTICE(config, ds)
    with PeakRSS() as mem:
        rows, cols, vals = model.build_item_graph()
        vals.sum().backward()  # the first batch of an epoch: graph with gradient
    return mem.seconds, mem.cpu_seconds, mem.extra_gb


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-items", type=int, default=63001)
    ap.add_argument("--image-dim", type=int, default=4096)
    ap.add_argument("--text-dim", type=int, default=384)
    ap.add_argument("--smore-k", type=int, default=10, help="SMORE's kNN k (its grid goes up to 40)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lattice-sparse", action="store_true", help="also time our sparse learned-graph rebuild")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    feats = {"v": rng.standard_normal((args.n_items, args.image_dim), dtype=np.float32),
             "t": rng.standard_normal((args.n_items, args.text_dim), dtype=np.float32)}
    print(f"features: {args.n_items:,} items, image {args.image_dim}-d, text {args.text_dim}-d "
          f"({sum(f.nbytes for f in feats.values()) / 2**30:.2f} GB, generated in {time.perf_counter() - t0:.1f}s); "
          f"torch threads {args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        ds = SyntheticCatalogue(feats, tmp)
        print(f"{'model item graphs':48s} {'wall s':>9s} {'CPU s':>9s} {'peak extra RSS':>15s} {'nnz':>12s}  cache")
        for name, build in model_graphs(ds, args.smore_k).items():
            misses = ds.cache.misses
            with PeakRSS() as mem:
                graphs = build()
            nnz = sum(g.nnz for g in graphs)
            cold = ds.cache.misses - misses
            print(f"{name:48s} {mem.seconds:9.1f} {mem.cpu_seconds:9.1f} {mem.extra_gb:12.2f} GB {nnz:12,d}  "
                  f"{'built ' + str(cold) + ' top-k list(s)' if cold else 'all lists from cache'}", flush=True)
            del graphs
        print(f"LATTICE learned graph: refused -> {lattice_refusal(ds)}")
        if args.lattice_sparse:
            seconds, cpu, gb = lattice_sparse_rebuild(ds)
            print(f"LATTICE sparse learned-graph rebuild with gradient (extension): {seconds:.1f}s wall, "
                  f"{cpu:.1f}s CPU, peak extra RSS {gb:.2f} GB")


if __name__ == "__main__":
    main()
