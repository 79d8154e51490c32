#!/usr/bin/env python3
"""Harness speed: seconds per training epoch and per full evaluation pass, ours against MMRec's own
code measured in the same run on the same data (ratios, since this machine is shared and noisy).

    python benchmarks/bench_harness.py --dataset baby_synth --models BPR,LightGCN --epochs 3 \
        [--mmrec-python PYTHON --mmrec-runner RUNNER]

The MMRec side is optional (it needs the reference set up outside the repo, see docs/parity.md); without
it the script prints our figures only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import utils.synth  # noqa: E402,F401  (registers the synthetic presets: generated on first use)


def ours(model: str, dataset: str, epochs: int, threads: int) -> dict:
    from mmrec.quick_start import run

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        res = run(model, dataset, {"epochs": epochs, "stopping_step": 1000, "num_threads": threads,
                                   "checkpoint": False, "save_topk": 0}, Path(out), quiet=True)
        wall = time.perf_counter() - t0
    evals = [h for h in res["history"]]
    return {"sec_per_epoch": statistics.median(h["train_seconds"] for h in evals),
            "sec_per_eval": res["eval_seconds"], "wall": wall, "valid_recall@20": res["valid"]["recall@20"]}


def mmrec(model: str, dataset: str, epochs: int, python: str, runner: str, data_path: str,
          threads: int = 0) -> dict | None:
    """MMRec's own code on the same data (its runner times every epoch and evaluation pass)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [python, runner, "-m", model, "-d", dataset, "--data-path", data_path, "--epochs", str(epochs),
               "--seed", "999", "--json", str(out)]
        t0 = time.perf_counter()
        env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None  # the same threads as ours
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not out.exists():
            print(f"MMRec {model} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return None
        r = json.loads(out.read_text())
    return {"sec_per_epoch": r["sec_per_epoch"], "sec_per_eval": r["sec_per_eval"], "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="baby_synth")
    ap.add_argument("--models", default="BPR,LightGCN")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--mmrec-python", default=os.environ.get("MMREC_PYTHON", ""),
                    help="the Python of MMRec's virtual environment (or $MMREC_PYTHON)")
    ap.add_argument("--mmrec-runner", default=os.environ.get("MMREC_RUNNER", ""),
                    help="the reference runner script that calls MMRec's quick_start (or $MMREC_RUNNER)")
    ap.add_argument("--data-path", default=str(ROOT / "data"))
    args = ap.parse_args()
    from mmrec.config import load_config
    from mmrec.data import RecDataset
    from mmrec.data.sources import ensure_generated

    config = load_config("BPR", args.dataset)
    ensure_generated(config)  # a synthetic preset is generated if needed
    print(RecDataset(config).summary())
    have_ref = bool(args.mmrec_python and args.mmrec_runner) and Path(args.mmrec_python).exists() \
        and Path(args.mmrec_runner).exists()
    print(f"{'model':10s} {'ours s/epoch':>13s} {'MMRec s/epoch':>14s} {'speed-up':>9s} "
          f"{'ours s/eval':>12s} {'MMRec s/eval':>13s} {'speed-up':>9s}")
    for model in args.models.split(","):
        a = ours(model, args.dataset, args.epochs, args.threads)
        b = mmrec(model, args.dataset, args.epochs, args.mmrec_python, args.mmrec_runner, args.data_path,
                  args.threads) \
            if have_ref else None
        if b:
            print(f"{model:10s} {a['sec_per_epoch']:13.3f} {b['sec_per_epoch']:14.3f} "
                  f"{b['sec_per_epoch'] / a['sec_per_epoch']:8.1f}x {a['sec_per_eval']:12.3f} "
                  f"{b['sec_per_eval']:13.3f} {b['sec_per_eval'] / a['sec_per_eval']:8.1f}x")
        else:
            print(f"{model:10s} {a['sec_per_epoch']:13.3f} {'-':>14s} {'-':>9s} {a['sec_per_eval']:12.3f}")


if __name__ == "__main__":
    main()
