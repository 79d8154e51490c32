"""The results store of a comparison or a grid, and the tables read from it.

Every finished run is one record in ``<out>/results.lmdb`` under a key that hashes what the run computes:
model, dataset, the resolved configuration (without the keys that only say where and how fast it runs)
and the split / seed.  Each record is written in its own LMDB transaction, so ``kill -9`` at any moment
loses at most the runs still training and never leaves a half-written record; readers (``python main.py
results DIR``) see every committed run while the comparison or grid goes on.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable

#: keys that say where and how fast a run goes, never what it computes: left out of a run's key
VOLATILE_KEYS = ("num_threads", "use_gpu", "gpu_id", "device", "data_path", "cache_dir", "checkpoint",
                 "save_topk", "epochs_log", "hyper_parameters")
STORE_NAME = "results.lmdb"
TABLE_METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
_MAP_SIZE = 1 << 32
_OPEN: dict[str, Any] = {}


def config_hash(config: dict) -> str:
    """Digest of what a run computes (its resolved configuration minus VOLATILE_KEYS)."""
    kept = {k: v for k, v in sorted(config.items()) if k not in VOLATILE_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ResultStore:
    """Finished runs, one JSON record per key, in an LMDB environment inside the output folder."""

    def __init__(self, folder: Path, readonly: bool = False):
        import lmdb

        path = Path(folder) / STORE_NAME
        if readonly and not path.exists():
            raise FileNotFoundError(f"{folder} holds no {STORE_NAME}: not the folder of a compare or grid run")
        key = str(path.resolve())
        if key not in _OPEN:  # one handle per environment and process (LMDB's rule)
            path.mkdir(parents=True, exist_ok=True)
            _OPEN[key] = lmdb.open(key, map_size=_MAP_SIZE, subdir=True, max_dbs=0, sync=True, metasync=True,
                                   readahead=False)
        self.env = _OPEN[key]

    def put(self, key: str, record: dict) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(key.encode(), json.dumps(record, default=str).encode())

    def get(self, key: str) -> dict | None:
        with self.env.begin() as txn:
            raw = txn.get(key.encode())
        return json.loads(raw) if raw is not None else None

    def records(self) -> list[dict]:
        with self.env.begin() as txn:
            return [json.loads(v) for _, v in txn.cursor()]

    def __len__(self) -> int:
        return self.env.stat()["entries"]


def run_record(result: dict, key: str, label: dict) -> dict:
    """What the store keeps of one finished run: its label (kind, dataset, model, tag, seed, split, grid
    point), metrics, efficiency figures and where its folder is."""
    cfg = result.get("config", {})
    return {"key": key, **label, "config_hash": config_hash(cfg), "seed": cfg.get("seed"),
            "split": cfg.get("split"), "split_seed": cfg.get("split_seed") if cfg.get("split") == "random" else None,
            "valid": result.get("valid") or {}, "test": result.get("test") or {},
            "valid_metric": cfg.get("valid_metric"), "efficiency": result.get("efficiency", {}),
            "best_epoch": result.get("best_epoch"), "epochs_run": result.get("epochs_run"),
            "result_path": result.get("result_path")}


# -- tables ---------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_t_test(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of the paired t-test of a against b (None under 2 pairs or no spread)."""
    if len(a) != len(b) or len(a) < 2:
        return None
    diffs = [x - y for x, y in zip(a, b)]
    sd = statistics.stdev(diffs)
    if sd == 0:
        return None if statistics.fmean(diffs) == 0 else 0.0
    from scipy import stats

    t = statistics.fmean(diffs) / (sd / math.sqrt(len(diffs)))
    return float(2 * stats.t.sf(abs(t), df=len(diffs) - 1))


def paired_bootstrap(diffs, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Per-user paired differences (A - B, one value per evaluated user) -> their mean, the percentile
    bootstrap interval of that mean over users resampled with replacement, and the share of resamples in
    which A is ahead.  It answers how far two runs' difference could move from the evaluated users alone
    (the test set's sampling noise), not from the training seed (the paired t-test over seeds does that)."""
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError("paired_bootstrap needs one difference per user (a non-empty 1-d array)")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 256):  # 256 resamples at a time: bounded memory on large test sets
        n = min(256, resamples - start)
        means[start:start + n] = d[rng.integers(0, d.size, size=(n, d.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return {"diff": float(d.mean()), "low": float(lo), "high": float(hi), "a_ahead": float((means > 0).mean())}


def selection_summary(history: list[dict], metric: str, best_epoch: int | None = None, side: int = 5,
                      span: int = 15) -> dict | None:
    """How far a run's chosen validation value stands above its own curve: the chosen evaluation
    (``best_epoch``, the run's own choice, which compares rounded values; else the first maximum), the
    mean of up to ``side`` evaluations either side of it, the difference (overshoot: what the maximum of a
    noisy curve adds to the model's level), and the curve's roughness, the standard deviation of its
    step-to-step changes within ``span`` evaluations of the best.  None when no evaluation has ``metric``."""
    pts = [(r["epoch"], r["valid"][metric]) for r in history if metric in (r.get("valid") or {})]
    if not pts:
        return None
    values = [v for _, v in pts]
    epochs = [e for e, _ in pts]
    b = epochs.index(best_epoch) if best_epoch in epochs else values.index(max(values))
    around = values[max(0, b - side):b] + values[b + 1:b + 1 + side]
    window = values[max(0, b - span):b + span + 1]
    steps = [y - x for x, y in zip(window, window[1:])]
    level = statistics.fmean(around) if around else values[b]
    return {"metric": metric, "best_epoch": pts[b][0], "best": values[b], "evaluations": len(values),
            "neighbours": level, "overshoot": values[b] - level,
            "roughness": statistics.pstdev(steps) if len(steps) > 1 else 0.0}


def compare_table(records: Iterable[dict], metrics: tuple[str, ...] = TABLE_METRICS, primary: str = "ndcg@20",
                  efficiency: bool = False, paired: dict | None = None) -> dict:
    """Table 4's layout from compare records: rows models, per dataset the test metrics as mean and std
    over runs, the best and second best per column, and per dataset a paired t-test of the best model
    against the runner-up on ``primary`` over the runs they share (same split / seed tag).  ``paired``
    (``diagnostics.paired_against_best`` on ``primary``) adds a column per dataset: each model against the
    best one, with the bootstrap interval over test users."""
    records = [r for r in records if r.get("kind", "compare") == "compare"]
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    models = list(dict.fromkeys(r["model"] for r in records))
    cells: dict[tuple[str, str], dict] = {}
    for ds in datasets:
        for model in models:
            rs = sorted((r for r in records if r["dataset"] == ds and r["model"] == model), key=lambda r: r["tag"])
            if not rs:
                continue
            cell = {"runs": len(rs), "tags": [r["tag"] for r in rs]}
            for m in metrics:
                vals = [r["test"][m] for r in rs if m in r["test"]]
                if vals:
                    cell[m] = _mean_std(vals)
            eff = [r.get("efficiency") or {} for r in rs]
            for k in ("seconds_per_epoch", "eval_seconds", "peak_memory_mib", "best_epoch", "t95_seconds"):
                vals = [e[k] for e in eff if e.get(k) is not None]
                if vals:
                    cell[k] = statistics.median(vals)
            cells[(ds, model)] = cell
    ranks: dict[tuple[str, str], list[str]] = {}
    tests: dict[str, dict] = {}
    for ds in datasets:
        for m in metrics:
            order = sorted((mod for mod in models if m in cells.get((ds, mod), {})),
                           key=lambda mod: -cells[(ds, mod)][m][0])
            ranks[(ds, m)] = order[:2]
        order = ranks.get((ds, primary), [])
        if len(order) == 2:
            best, second = order
            by_tag = {mod: {r["tag"]: r["test"].get(primary) for r in records
                            if r["dataset"] == ds and r["model"] == mod} for mod in order}
            shared = sorted(set(by_tag[best]) & set(by_tag[second]))
            p = paired_t_test([by_tag[best][t] for t in shared], [by_tag[second][t] for t in shared])
            tests[ds] = {"metric": primary, "best": best, "runner_up": second, "pairs": len(shared), "p_value": p}
    return {"datasets": datasets, "models": models, "metrics": list(metrics), "cells": cells, "ranks": ranks,
            "tests": tests, "efficiency": efficiency, "primary": primary, "paired": paired or {}}


def _fmt(cell: dict, m: str) -> str:
    mean, std = cell[m]
    return f"{mean:.4f} ± {std:.4f}" if cell["runs"] > 1 else f"{mean:.4f}"


def _runs_note(table: dict) -> str:
    counts = sorted({c["runs"] for c in table["cells"].values()})
    runs = "/".join(map(str, counts))
    return (f"Test metrics at the best validation epoch, mean ± sample std over {runs} run(s) per cell "
            f"(seeds or splits); best bold, second underlined; † = best differs from the runner-up on "
            f"{next(iter(table['tests'].values()))['metric'] if table['tests'] else 'ndcg@20'} by a paired t-test, p < 0.05.")


def _paired_note(table: dict) -> str:
    if not table.get("paired"):
        return ""
    return (f"\n\nvs best: the model's {table['primary']} minus the best model's, per test user averaged over the "
            f"runs they share, with its 95% bootstrap interval over the test users (how far the test set's "
            f"sampling noise alone could move the gap; the t-test above is over seeds).")


def _paired_cell(table: dict, ds: str, model: str) -> str:
    stats = table["paired"].get((ds, model))
    if stats is None:
        order = table["ranks"].get((ds, table["primary"]), [])
        return "best" if order and order[0] == model else "-"
    return f"{stats['diff']:+.4f} [{stats['low']:+.4f}, {stats['high']:+.4f}]"


def _eff_columns(table: dict) -> list[str]:
    return ["s/epoch", "s/eval", "peak MiB", "t95 s"] if table["efficiency"] else []


def _eff_cells(cell: dict) -> list[str]:
    def g(k, f):
        return f.format(cell[k]) if k in cell else "-"
    return [g("seconds_per_epoch", "{:.2f}"), g("eval_seconds", "{:.2f}"), g("peak_memory_mib", "{:.0f}"),
            g("t95_seconds", "{:.0f}")]


def _marked(table: dict, ds: str, model: str, m: str, bold: tuple[str, str], under: tuple[str, str]) -> str:
    cell = table["cells"].get((ds, model))
    if not cell or m not in cell:
        return "-"
    text = _fmt(cell, m)
    test = table["tests"].get(ds)
    if test and m == test["metric"] and model == test["best"] and test["p_value"] is not None and test["p_value"] < 0.05:
        text += "†"
    order = table["ranks"].get((ds, m), [])
    if order and model == order[0]:
        return f"{bold[0]}{text}{bold[1]}"
    if len(order) > 1 and model == order[1]:
        return f"{under[0]}{text}{under[1]}"
    return text


def to_markdown(table: dict) -> str:
    head = ["model"] + [f"{ds} {m}" for ds in table["datasets"] for m in table["metrics"]]
    paired = bool(table.get("paired"))
    head += [f"{ds} {table['primary']} vs best" for ds in table["datasets"]] if paired else []
    head += [f"{ds} {c}" for ds in table["datasets"] for c in _eff_columns(table)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for model in table["models"]:
        row = [model] + [_marked(table, ds, model, m, ("**", "**"), ("<u>", "</u>"))
                         for ds in table["datasets"] for m in table["metrics"]]
        if paired:
            row += [_paired_cell(table, ds, model) for ds in table["datasets"]]
        if table["efficiency"]:
            row += [v for ds in table["datasets"] for v in _eff_cells(table["cells"].get((ds, model), {}))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n\n" + _runs_note(table) + _paired_note(table)


def to_latex(table: dict) -> str:
    n = len(table["metrics"])
    cols = "l" + ("c" * n) * len(table["datasets"])
    short = {"recall": "R", "ndcg": "N", "precision": "P", "map": "MAP"}
    names = [f"{short.get(m.split('@')[0], m)}@{m.split('@')[1]}" for m in table["metrics"]]
    lines = [r"\begin{tabular}{" + cols + "}", r"\toprule",
             "Model & " + " & ".join(rf"\multicolumn{{{n}}}{{c}}{{{ds}}}" for ds in table["datasets"]) + r" \\",
             " & " + " & ".join(names * len(table["datasets"])) + r" \\", r"\midrule"]
    for model in table["models"]:
        row = [_marked(table, ds, model, m, (r"\textbf{", "}"), (r"\underline{", "}")).replace("±", r"$\pm$")
               .replace("†", r"$^\dagger$") for ds in table["datasets"] for m in table["metrics"]]
        lines.append(model.replace("_", r"\_") + " & " + " & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def to_csv(table: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["dataset", "model", "runs", *[f"{m}_{s}" for m in table["metrics"] for s in ("mean", "std")],
                     "seconds_per_epoch", "eval_seconds", "peak_memory_mib", "t95_seconds"])
    for (ds, model), cell in table["cells"].items():
        writer.writerow([ds, model, cell["runs"],
                         *[f"{v:.6f}" for m in table["metrics"] for v in cell.get(m, (float("nan"),) * 2)],
                         *[round(cell[k], 4) if k in cell else "" for k in ("seconds_per_epoch", "eval_seconds",
                                                                            "peak_memory_mib", "t95_seconds")]])
    return buf.getvalue()


def table_json(table: dict, records: list[dict]) -> dict:
    return {"note": _runs_note(table), "datasets": table["datasets"], "models": table["models"],
            "cells": [{"dataset": ds, "model": model, **{k: list(v) if isinstance(v, tuple) else v
                                                          for k, v in cell.items()}}
                      for (ds, model), cell in table["cells"].items()],
            "paired_tests": table["tests"],
            "paired_against_best": [{"dataset": ds, "model": model, "metric": table.get("primary"), **stats}
                                    for (ds, model), stats in (table.get("paired") or {}).items()],
            "runs": records}


def grid_ranking(records: Iterable[dict]) -> str:
    """Grid records ranked by their validation metric (test shown, never used to choose)."""
    rs = [r for r in records if r.get("kind") == "grid"]
    if not rs:
        return ""
    metric = rs[0].get("valid_metric") or "ndcg@20"
    rs.sort(key=lambda r: -(r["valid"].get(metric) or -1))
    lines = [f"| rank | setting | valid {metric} | test {metric} | best epoch |", "|---|---|---|---|---|"]
    for i, r in enumerate(rs, 1):
        point = ", ".join(f"{k}={v}" for k, v in (r.get("point") or {}).items())
        lines.append(f"| {i} | {point} | {r['valid'].get(metric, float('nan')):.4f} | "
                     f"{r['test'].get(metric, float('nan')):.4f} | {r.get('best_epoch')} |")
    return "\n".join(lines)


def write_tables(out: Path, table: dict, records: list[dict]) -> str:
    """compare.md / .csv / .tex / .json in ``out``; returns the Markdown."""
    md = to_markdown(table)
    (out / "compare.md").write_text(md + "\n")
    (out / "compare.csv").write_text(to_csv(table))
    (out / "compare.tex").write_text(to_latex(table) + "\n")
    (out / "compare.json").write_text(json.dumps(table_json(table, records), indent=1, default=str) + "\n")
    return md


def show_results(folder: Path, paired: bool = False) -> str:
    """The tables of a comparison or a grid folder from its results store (also while it runs); ``paired``
    adds the column of each model against the best over test users (reads every run's top-K lists)."""
    records = ResultStore(folder, readonly=True).records()
    parts = []
    if any(r.get("kind") == "compare" for r in records):
        against = None
        if paired:
            from mmrec.diagnostics import paired_against_best

            against = paired_against_best(records)
        parts.append(to_markdown(compare_table(records, efficiency=True, paired=against)))
    ranking = grid_ranking(records)
    if ranking:
        parts.append(ranking)
    return "\n\n".join(parts) if parts else f"{folder}: no finished runs yet"
