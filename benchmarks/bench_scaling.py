"""How training time grows with the data: LightGCN and MAGNET at 0.25x .. 4x Baby-sized interactions.

    python benchmarks/bench_scaling.py                                    # factors 0.25,0.5,1,2,4
    python benchmarks/bench_scaling.py --models LightGCN --factors 0.5,1,2 --threads 2

For each factor f a synthetic dataset ``baby_x<f>`` is generated once (under ``data/``) with f times Baby's
users, items and interactions (so interactions per user and per item stay Baby's; 4096-d image and 384-d
text features), and each model trains (no evaluation passes) in its own child process (``bench_models``' worker): seconds per
training epoch, from ``--steps`` batches scaled to the full epoch when --steps > 0 (per-batch cost is what
grows with the graph; the number of batches grows with the interactions), and peak RSS.  Last: the
log-log slope of epoch time against training interactions (least squares), 1 = linear.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BABY = dict(n_users=19445, n_items=7050, n_interactions=160792)


def dataset_name(factor: float) -> str:
    return f"baby_x{factor:g}".replace(".", "p")


def generate(factor: float, data_path: Path) -> str:
    """data/baby_x<f> with f x Baby's users, items and interactions (generated once; the synth CLI)."""
    name = dataset_name(factor)
    sizes = {k: max(1, round(v * factor)) for k, v in BABY.items()}
    subprocess.run([sys.executable, "-m", "utils.synth", name, "--users", str(sizes["n_users"]),
                    "--items", str(sizes["n_items"]), "--interactions", str(sizes["n_interactions"]),
                    "--image-dim", "4096", "--text-dim", "384", "--out", str(data_path)],
                   check=True, cwd=ROOT, capture_output=True)
    return name


def train_interactions(data_path: Path, name: str) -> int:
    with open(data_path / name / f"{name}.inter") as fh:
        next(fh)
        return sum(1 for line in fh if line.rstrip().endswith("\t0"))


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) on log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="LightGCN,MAGNET")
    ap.add_argument("--factors", default="0.25,0.5,1,2,4")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run (the median is reported)")
    ap.add_argument("--steps", type=int, default=20, help="batches per epoch (0 = whole epochs)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=5400)
    ap.add_argument("--data-path", type=Path, default=ROOT / "data")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE for every run (e.g. fanout=20)")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_models import run_one

    factors = [float(f) for f in args.factors.split(",")]
    # training time only: no evaluation pass (eval_step beyond the last epoch), so the large sizes stay cheap
    runs = argparse.Namespace(epochs=args.epochs, threads=args.threads, device="cpu", steps=args.steps, mem_limit_gb=0,
                              set=[f"data_path={args.data_path}", f"eval_step={args.epochs + 1}", *args.set],
                              timeout=args.timeout)
    rows = []
    for factor in factors:
        name = generate(factor, args.data_path)
        n_train = train_interactions(args.data_path, name)
        for model in args.models.split(","):
            r = run_one(model, name, runs)
            r.update(factor=factor, dataset=name, train_interactions=n_train)
            rows.append(r)
            print(f"{name} ({n_train:,} train interactions) {model}: "
                  + (r["error"] if "error" in r else f"{r['seconds_per_epoch']:.2f} s/epoch, "
                     f"{r['peak_rss_mib']} MiB"), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    lines = ["| model | " + " | ".join(f"{f:g}x" for f in factors) + " | slope |", "|---" * (len(factors) + 2) + "|"]
    for model in args.models.split(","):
        ok = [r for r in rows if r["model"] == model and "error" not in r]
        cells = [next((f"{r['seconds_per_epoch']:.2f}" for r in ok if r["factor"] == f), "-") for f in factors]
        fit = f"{slope([r['train_interactions'] for r in ok], [r['seconds_per_epoch'] for r in ok]):.2f}" \
            if len(ok) >= 2 else "-"
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {fit} |")
    print("\nseconds per training epoch" + (f" (from {args.steps} batches)" if args.steps else "") + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
