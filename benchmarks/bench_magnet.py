"""MAGNET cost on a Baby-sized dataset, against LightGCN measured in the same run.

    python benchmarks/bench_magnet.py                     # baby_synth (19,445 users, 7,050 items)
    python benchmarks/bench_magnet.py --dataset mini --train-batches 10 --eval-blocks 1

Prints, for MAGNET-DV and MAGNET-SV, seconds per epoch and per full evaluation (each timed on a fixed
number of training batches / evaluation user blocks and extrapolated to the whole epoch / user set),
each as a ratio to LightGCN; and the time and peak memory (the process's VmHWM increase, measured in a
child process) to build E+ with its kNN lists from an empty cache (cold) and to load it back (warm).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mmrec.config import load_config  # noqa: E402
from mmrec.data import RecDataset  # noqa: E402
from mmrec.data.sampler import TrainBatches  # noqa: E402
from mmrec.registry import get_model  # noqa: E402


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def build_child(dataset: str, cache_dir: str, data_path: str) -> dict:
    """Child process: load the dataset, reset the peak RSS, build (or load) E+, report time and peak."""
    from models.magnet_graph import cached_induced_edges

    cfg = load_config("MAGNET", dataset, {"cache_dir": cache_dir, "data_path": data_path})
    ds = RecDataset(cfg)
    ds.train_fingerprint, ds.feature_hash("v"), ds.feature_hash("t")  # hashing is not part of the build
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    base = _proc_kib("VmRSS")
    t0 = time.perf_counter()
    edges = cached_induced_edges(ds, int(cfg["knn_k"]), int(cfg["expansion_r"]), str(cfg["candidate_score"]))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mib": (_proc_kib("VmHWM") - base) / 1024, "edges": int(edges["users"].size),
            "cache_hits": ds.cache.hits, "cache_misses": ds.cache.misses}


def run_child(dataset: str, cache_dir: str, data_path: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", "--dataset", dataset, "--cache-dir", cache_dir,
                          "--data-path", data_path], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_model(model_name: str, dataset: str, sets: dict, train_batches: int, eval_blocks: int) -> dict:
    cfg = load_config(model_name, dataset, sets)
    ds = RecDataset(cfg)
    torch.manual_seed(0)
    model = get_model(model_name)(cfg, ds)
    opt = torch.optim.Adam(model.parameters(), lr=float(cfg["learning_rate"]), weight_decay=float(cfg["weight_decay"]))
    batches = TrainBatches(ds, int(cfg["train_batch_size"]), 0)
    model.train()
    model.pre_epoch_processing()
    times = []
    for b, batch in enumerate(batches.epoch()):
        if b > train_batches:
            break
        t0 = time.perf_counter()
        opt.zero_grad()
        out = model.calculate_loss(batch)
        loss = sum(out.values()) if isinstance(out, dict) else out
        loss.backward()
        opt.step()
        if b > 0:  # the first batch is warm-up
            times.append(time.perf_counter() - t0)
    epoch_s = float(np.mean(times)) * len(batches)
    model.eval()
    block = int(cfg["eval_batch_size"])
    users = torch.arange(ds.n_users)
    n_blocks = (ds.n_users + block - 1) // block
    with torch.no_grad():
        model.start_evaluation()
        t0 = time.perf_counter()
        timed = 0
        for s in range(0, min(eval_blocks, n_blocks) * block, block):
            model.full_sort_predict({"users": users[s:s + block]})
            timed += 1
        eval_s = (time.perf_counter() - t0) / timed * n_blocks  # includes the per-pass forward once
        model.end_evaluation()
    return {"epoch_s": epoch_s, "eval_s": eval_s, "batches_per_epoch": len(batches), "timed_batches": len(times),
            "eval_blocks": f"{timed}/{n_blocks}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="baby_synth")
    p.add_argument("--train-batches", type=int, default=20)
    p.add_argument("--eval-blocks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-path", default=str(ROOT / "data"))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.child:
        print(json.dumps(build_child(a.dataset, a.cache_dir, a.data_path)))
        return
    from utils.synth import PRESETS, ensure_dataset

    if a.dataset in PRESETS:
        ensure_dataset(Path(a.data_path), a.dataset)
    with tempfile.TemporaryDirectory(prefix="bench_magnet_") as cache:
        cold = run_child(a.dataset, cache, a.data_path)
        warm = run_child(a.dataset, cache, a.data_path)
        print(f"E+ on {a.dataset}: {cold['edges']:,} induced edges")
        print(f"  build (cold, kNN + E+): {cold['seconds']:8.2f} s   peak +{cold['peak_mib']:8.1f} MiB")
        print(f"  load  (warm, cache)   : {warm['seconds']:8.2f} s   peak +{warm['peak_mib']:8.1f} MiB  "
              f"(hits {warm['cache_hits']}, misses {warm['cache_misses']})")
        sets = {"cache_dir": cache, "data_path": a.data_path, "num_threads": a.threads}
        rows = {"LightGCN": time_model("LightGCN", a.dataset, sets, a.train_batches, a.eval_blocks)}
        for view in ("DV", "SV"):
            rows[f"MAGNET-{view}"] = time_model("MAGNET", a.dataset, {**sets, "view": view}, a.train_batches,
                                                a.eval_blocks)
    base = rows["LightGCN"]
    print(f"\n{'model':<11} {'s/epoch':>9} {'x LGCN':>7} {'s/eval':>9} {'x LGCN':>7}   (timed batches, eval blocks)")
    for name, r in rows.items():
        print(f"{name:<11} {r['epoch_s']:9.2f} {r['epoch_s'] / base['epoch_s']:7.2f} {r['eval_s']:9.2f} "
              f"{r['eval_s'] / base['eval_s']:7.2f}   ({r['timed_batches']} of {r['batches_per_epoch']}, "
              f"{r['eval_blocks']})")
    print(json.dumps({"dataset": a.dataset, "threads": a.threads, "cold": cold, "warm": warm, "timing": rows}))


if __name__ == "__main__":
    main()
