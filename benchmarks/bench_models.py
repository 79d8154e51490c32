"""Every registered model on one dataset: seconds per training epoch, per full evaluation pass and peak memory.

    python benchmarks/bench_models.py                                   # every model, Baby-sized, CPU
    python benchmarks/bench_models.py --models LightGCN,MAGNET --sizes baby_synth,elec_synth
    python benchmarks/bench_models.py --device cuda --epochs 5          # on a GPU
    python benchmarks/bench_models.py --models LightGCN,BPR --mmrec-python PY --mmrec-runner RUNNER

With ``--mmrec-python`` / ``--mmrec-runner`` (or $MMREC_PYTHON / $MMREC_RUNNER: MMRec's virtual
environment and a runner that calls its ``quick_start``, set up outside this repository as
docs/parity.md describes), the models MMRec has (BPR, LightGCN, LATTICE, FREEDOM, MGCN, SMORE) are also
trained by MMRec's own code on the same data with the same epochs and threads, right after ours, and a
second table gives the speed-ups per training epoch and per evaluation pass.

Each model trains ``--epochs`` epochs with the trainer (evaluation on the validation split after every
epoch, as in a real run) in its own child process, so one model's memory never counts against another's
and a crash or a refusal is recorded, not fatal.  Per model: the median training epoch (the first epoch
runs warm-up work, so with 3 epochs the median is a warm epoch), the median full evaluation pass, the
peak resident memory of the child (VmHWM; CUDA max allocated on a GPU), each also as a ratio to LightGCN
measured in the same run.  Synthetic presets are generated once (cached under ``data/``); the kNN lists
and graphs a model builds are cached as in any run, so build time is not in the epoch figures.
A Markdown table is printed last.

At Electronics scale a full epoch of the heavier models takes hours on a laptop CPU: ``--steps N`` trains N
batches per epoch (``max_steps_per_epoch``) and reports seconds per epoch as the epoch's own work
(sampling, hooks) plus the mean seconds per batch times the batches of a full epoch (marked "from N
steps"); the evaluation pass is always complete.
``--mem-limit-gb G`` caps each child's data memory (RLIMIT_DATA), so a model that would need more fails
with a memory error that is recorded instead of exhausting the machine.
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


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(args) -> None:
    """One model, in this process: train, then print one JSON line with the figures."""
    import torch

    import utils.synth  # noqa: F401  (registers the synthetic presets: generated on first use)
    from mmrec import quick_start

    if args.mem_limit_gb:
        import resource

        limit = int(args.mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    sets = [f"epochs={args.epochs}", f"stopping_step={args.epochs + 1}", f"num_threads={args.threads}",
            "save_topk=0", "eval_step=1", f"max_steps_per_epoch={args.steps}"] + list(args.set or [])
    # (eval_step=1: every epoch evaluated; MIG-GT's own default evaluates every 20)
    if args.device == "cuda":
        sets.append("use_gpu=true")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = quick_start.run(args.worker, args.dataset, sets, Path(tmp) / "run", quiet=True)
        wall = time.perf_counter() - t0
    per_epoch = res["seconds_per_epoch"]
    if per_epoch and res.get("steps_per_epoch") and res["steps_per_epoch"] < res["batches_per_epoch"]:
        # a partial epoch: its per-epoch work as measured, plus the batches' mean time x a full epoch's batches
        warm = res["history"][len(res["history"]) // 2]  # the median epoch (warm when 3 or more)
        fixed = warm["train_seconds"] - warm["batch_seconds"]
        per_epoch = fixed + warm["batch_seconds"] * res["batches_per_epoch"] / res["steps_per_epoch"]
    out = {"model": res["model"], "seconds_per_epoch": per_epoch, "eval_seconds": res["eval_seconds"],
           "steps": res.get("steps_per_epoch"), "batches_per_epoch": res.get("batches_per_epoch"),
           "build_seconds": res["build_seconds"], "wall_seconds": round(wall, 1), "peak_rss_mib": round(_peak_rss_mib()),
           "test_recall@20": (res.get("test") or {}).get("recall@20")}
    if args.device == "cuda":
        out["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    print("BENCH " + json.dumps(out), flush=True)


def run_one(model: str, dataset: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", model, "--dataset", dataset,
           "--epochs", str(args.epochs), "--threads", str(args.threads), "--device", args.device,
           "--steps", str(args.steps), "--mem-limit-gb", str(args.mem_limit_gb)]
    for s in args.set or []:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"model": model, "error": f"over the {args.timeout} s limit"}
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
    return {"model": model, "error": (lines[-1] if lines else f"exit {proc.returncode}")[:300],
            "wall_seconds": round(time.perf_counter() - t0, 1)}


MMREC_MODELS = ("BPR", "LightGCN", "LATTICE", "FREEDOM", "MGCN", "SMORE")


def _num(value, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _ratio(value, base) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


def table(rows: list[dict], dataset: str, device: str) -> str:
    base = next((r for r in rows if r["model"] == "LightGCN" and "error" not in r), {})
    mem_key = "cuda_max_allocated_mib" if device == "cuda" else "peak_rss_mib"
    lines = [f"### {dataset} on {device}", "",
             f"| model | s/epoch | x LightGCN | s/eval pass | x LightGCN | peak {'CUDA' if device == 'cuda' else 'RSS'} MiB"
             f" | x LightGCN | build s | test R@20 after the epochs |", "|---" * 9 + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['error']} |" + " |" * 7)
            continue
        partial = r.get("steps") and r.get("batches_per_epoch") and r["steps"] < r["batches_per_epoch"]
        per_epoch = _num(r["seconds_per_epoch"]) + (f" (from {r['steps']} steps)" if partial else "")
        lines.append(f"| {r['model']} | {per_epoch} | {_ratio(r['seconds_per_epoch'], base.get('seconds_per_epoch'))}"
                     f" | {_num(r['eval_seconds'])} | {_ratio(r['eval_seconds'], base.get('eval_seconds'))}"
                     f" | {r[mem_key]} | {_ratio(r[mem_key], base.get(mem_key))} | {_num(r['build_seconds'], '{:.1f}')}"
                     f" | {_num(r['test_recall@20'], '{:.4f}')} |")
    return "\n".join(lines)


def mmrec_table(rows: list[dict], dataset: str) -> str:
    lines = [f"### {dataset}: ours against MMRec's code (same data, epochs and threads, one run)", "",
             "| model | ours s/epoch | MMRec s/epoch | speed-up | ours s/eval pass | MMRec s/eval pass | speed-up |",
             "|---" * 7 + "|"]
    for r in rows:
        ref = r.get("mmrec")
        if not ref or "error" in r or "error" in ref:
            continue
        lines.append(f"| {r['model']} | {_num(r['seconds_per_epoch'])} | {_num(ref['sec_per_epoch'])} | "
                     f"{_ratio(ref['sec_per_epoch'], r['seconds_per_epoch'])} | {_num(r['eval_seconds'])} | "
                     f"{_num(ref['sec_per_eval'])} | {_ratio(ref['sec_per_eval'], r['eval_seconds'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="all", help="comma-separated names, or all (every registered model)")
    ap.add_argument("--sizes", default="baby_synth", help="comma-separated datasets (synthetic presets or real)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs per model (median reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--steps", type=int, default=0,
                    help="batches per epoch (0 = the whole epoch); s/epoch is then scaled from the batches run")
    ap.add_argument("--mem-limit-gb", type=float, default=0, help="cap each model's data memory (0 = no cap)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per model before it is recorded as over")
    ap.add_argument("--set", action="append", help="KEY=VALUE for every model (e.g. eval_batch_size=4096)")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    ap.add_argument("--mmrec-python", default=os.environ.get("MMREC_PYTHON", ""),
                    help="MMRec's Python: also time MMRec's code for the models it has")
    ap.add_argument("--mmrec-runner", default=os.environ.get("MMREC_RUNNER", ""), help="MMRec runner script")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--dataset", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    from mmrec.registry import available_models

    names = sorted(available_models()) if args.models == "all" else [m.strip() for m in args.models.split(",")]
    if args.models == "all" or "LightGCN" in names:
        names = ["LightGCN"] + [n for n in names if n != "LightGCN"]  # the reference first
    report, results = [], {}
    print(f"# bench_models: {len(names)} models, {args.epochs} epochs each, device {args.device}, "
          f"threads {args.threads or os.cpu_count()}", flush=True)
    for dataset in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        rows = []
        for model in names:
            r = run_one(model, dataset, args)
            if args.mmrec_python and args.mmrec_runner and model in MMREC_MODELS and "error" not in r:
                from bench_harness import mmrec

                r["mmrec"] = mmrec(model, dataset, args.epochs, args.mmrec_python, args.mmrec_runner,
                                   str(ROOT / "data"), args.threads) or {"error": "MMRec run failed"}
                if "error" not in r["mmrec"]:
                    print(f"{dataset} {model} (MMRec): {_num(r['mmrec']['sec_per_epoch'])} s/epoch, "
                          f"{_num(r['mmrec']['sec_per_eval'])} s/eval", flush=True)
            rows.append(r)
            print(f"{dataset} {model}: " + (r["error"] if "error" in r else
                  f"{_num(r['seconds_per_epoch'])} s/epoch, {_num(r['eval_seconds'])} s/eval, "
                  f"{r.get('cuda_max_allocated_mib', r['peak_rss_mib'])} MiB"), flush=True)
        results[dataset] = rows
        report.append(table(rows, dataset, args.device))
        if any("mmrec" in r for r in rows):
            report.append(mmrec_table(rows, dataset))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print("\n" + "\n\n".join(report))


if __name__ == "__main__":
    main()
