"""Runs: one setting, a grid, or a side-by-side comparison.  Used by main.py and from Python:

```python
from mmrec.quick_start import run, compare
result = run("LightGCN", "mini", {"seed": 1})
table = compare(["BPR", "LightGCN"], "mini", seeds=[999, 1, 2])
```
Every run writes into its output folder: config.yaml, log.txt, best.pth / last.pth, topk_test.tsv and
result.json (the last line printed is result.json's path).
"""
from __future__ import annotations

import json
import logging
import shutil
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml

from mmrec.config import ROOT, Config, ConfigError, grid_points, grid_size, load_config, parse_set
from mmrec.data import RecDataset
from mmrec.data.dataset import MODALITIES
from mmrec.registry import canonical_name, get_model
from mmrec.trainer import Trainer, init_seed

log = logging.getLogger("mmrec")
PAPER_SPLIT_SEEDS = [9, 672, 5368, 12784, 2025]


def setup_logging(out_dir: Path | None, quiet: bool = False) -> None:
    logger = logging.getLogger("mmrec")
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    if not quiet:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(fmt)
        logger.addHandler(sh)
    if out_dir is not None:
        fh = logging.FileHandler(out_dir / "log.txt")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    logger.propagate = False


def resolve_device(config: Config) -> str:
    if config["use_gpu"] and torch.cuda.is_available():
        return f"cuda:{int(config['gpu_id'])}"
    if config["use_gpu"]:
        log.warning("use_gpu is set but CUDA is not available: running on CPU")
    return "cpu"


def default_out_dir(model: str, dataset: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]
    return ROOT / "saved" / f"{model}-{dataset}-{stamp}"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if torch.is_tensor(obj):
        return obj.tolist()
    return obj


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2))
    tmp.replace(path)


def save_config(config: Config, folder: Path) -> None:
    """``folder/config.yaml``: what ``--resume`` continues with."""
    (folder / "config.yaml").write_text(yaml.safe_dump(_jsonable(config.to_dict()), sort_keys=True))


def train_one(config: Config, out_dir: Path, dataset: RecDataset | None = None, resume: bool = False) -> dict:
    """Train and evaluate one configuration (no grid) into ``out_dir``; returns the result dict."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config["device"] = resolve_device(config)
    if int(config["num_threads"]) > 0:
        torch.set_num_threads(int(config["num_threads"]))
    save_config(config, out_dir)
    model_cls = get_model(config["model"])
    if getattr(model_cls, "needs_both_modalities", False):
        for key in MODALITIES.values():
            if not config.get(key):
                raise ConfigError(f"{key}={config.get(key)!r}: {model_cls.__name__} needs both image and text "
                                  f"features; name the .npy file (the dataset yaml's or --set {key}=FILE)")
    if dataset is None:
        dataset = RecDataset(config)
    log.info(dataset.summary())
    init_seed(int(config["seed"]))
    t_build = time.perf_counter()
    try:
        model = model_cls(config, dataset).to(config["device"])
    except ValueError as err:  # a model's own check of its keys: one line, exit 2
        raise ConfigError(f"{model_cls.__name__}: {err}") from err
    build_seconds = time.perf_counter() - t_build
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(f"{model_cls.__name__}: {n_params:,} trainable parameters, built in {build_seconds:.2f}s on "
             f"{config['device']}")
    trainer = Trainer(config, model, dataset, out_dir)
    if resume and (out_dir / "last.pth").exists():
        state = torch.load(out_dir / "last.pth", map_location=config["device"], weights_only=False)
        trainer.load_state_dict(state)
        log.info(f"resumed from {out_dir / 'last.pth'} at epoch {trainer.epoch}")
    fit = trainer.fit()
    result = {"model": model_cls.__name__, "dataset": config["dataset"], "config": config.to_dict(),
              "best_epoch": fit["best_epoch"], "epochs_run": fit["epochs_run"], "valid": fit["valid"],
              "test": fit["test"], "stopped_by": fit["stopped_by"], "diverged": fit["diverged"],
              "train_seconds": fit["train_seconds"], "seconds_per_epoch": fit["seconds_per_epoch"],
              "eval_seconds": fit["eval_seconds"], "eval_seconds_total": fit["eval_seconds_total"],
              "build_seconds": round(build_seconds, 3), "n_parameters": n_params,
              "model_info": model.extra_results(), "history": fit["history"]}
    write_json(out_dir / "result.json", result)
    shown = [k for k in ("recall@10", "recall@20", "ndcg@10", "ndcg@20")]
    if fit["valid"]:
        log.info(f"best epoch {fit['best_epoch']} of {fit['epochs_run']}:")
        log.info("  valid " + "  ".join(f"{k} {fit['valid'][k]:.4f}" for k in shown if k in fit["valid"]))
        log.info("  test  " + "  ".join(f"{k} {fit['test'][k]:.4f}" for k in shown if k in fit["test"]))
    return result


RUN_FILES = ("config.yaml", "log.txt", "last.pth", "best.pth", "result.json", "topk_test.tsv", "FAILED")


def _holds_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).exists() for f in RUN_FILES)


def claim_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder that holds another run (unless resuming it, or ``overwrite``: then its run
    files and the run folders inside it, e.g. grid points, are removed first)."""
    holds = _holds_run(out) or out.is_dir() and any(_holds_run(child) for child in out.iterdir())
    if resume or not holds:
        return
    if not overwrite:
        raise ConfigError(f"--out {out} holds another run; continue it with --resume {out}, replace it with "
                          f"--overwrite, or choose another folder")
    for child in out.iterdir():
        if child.is_dir() and _holds_run(child):
            shutil.rmtree(child)
        elif child.name in RUN_FILES or child.name in ("compare.json", "compare.md", "grid.json"):
            child.unlink()


#: keys a resumed run may change: how long it trains and where it runs, never what it computes
RESUME_KEYS = ("epochs", "num_threads", "use_gpu", "gpu_id")


def resumed_config(out: Path, model: str | None = None, dataset: str | None = None,
                   overrides: dict | list | None = None) -> Config:
    """The saved configuration of the run (or grid) in ``out``, with the RESUME_KEYS of ``overrides``;
    ``model``/``dataset``, when given, must name the saved run's."""
    saved = out / "config.yaml"
    if not saved.exists():
        raise ConfigError(f"--resume {out}: no config.yaml there, so it is not a run folder of this toolkit")
    config = Config(yaml.safe_load(saved.read_text()))
    for given, key in ((model, "model"), (dataset, "dataset")):
        if given is not None and canonical_name(str(given)) != canonical_name(str(config[key])):
            raise ConfigError(f"--resume {out} holds a {config['model']} run on {config['dataset']}; "
                              f"the given {key} {given!r} contradicts it (leave -m/-d out when resuming)")
    items = overrides.items() if isinstance(overrides, dict) else (parse_set(s) for s in overrides or [])
    for key, value in items:
        if key not in RESUME_KEYS:
            raise ConfigError(f"--resume {out}: a resumed run keeps its saved configuration; --set {key}=... "
                              f"cannot change it (allowed: {', '.join(RESUME_KEYS)}; start a new run otherwise)")
        config[key] = value
    return config


def run(model: str | None, dataset: str | None, overrides: dict | list | None = None,
        out_dir: Path | str | None = None, grid: bool = False, resume: bool = False, quiet: bool = False,
        overwrite: bool = False, extra_yamls: list[Path] | None = None) -> dict:
    """Train ``model`` on ``dataset`` (walking the grid when one is active); returns result.json's dict.
    ``resume``: continue the run in ``out_dir`` with its saved configuration (model and dataset may be
    None; only RESUME_KEYS may be overridden, e.g. more ``epochs`` to extend a finished run)."""
    if resume:
        out = Path(out_dir)
        config = resumed_config(out, model, dataset, overrides)
        model, dataset = str(config["model"]), str(config["dataset"])
    else:
        name = canonical_name(model)
        model_yaml = None
        if ":" in model:
            model_yaml = ROOT / "configs" / "model" / f"{name}.yaml"
        config = load_config(model if ":" in model else name, dataset, overrides, grid=grid,
                             model_yaml=model_yaml, extra_yamls=extra_yamls)
        config["model"] = model if ":" in model else name
        out = Path(out_dir) if out_dir else default_out_dir(name, dataset)
        claim_out_dir(out, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out, quiet)
    if grid_size(config) > 1:  # the grid's own configuration, for --resume
        save_config(config, out)
    try:
        if grid_size(config) == 1:
            for _, cfg in grid_points(config):
                result = train_one(cfg, out, resume=resume)
        else:
            result = run_grid(config, out, resume)
    except Exception as err:  # marked, so a half-finished folder is never read as a result
        (out / "FAILED").write_text(f"{type(err).__name__}: {err}\n")
        raise
    except KeyboardInterrupt:
        command = "grid " if grid_size(config) > 1 else ""
        raise Interrupted(f"interrupted: every finished epoch is kept in {out} (last.pth); continue with\n"
                          f"  python main.py {command}--resume {out}") from None
    (out / "FAILED").unlink(missing_ok=True)
    result["result_path"] = str(out / "result.json")
    return result


class Interrupted(Exception):
    """Ctrl-C during training; the message says where the run is kept and how to resume it."""


def run_grid(config: Config, out: Path, resume: bool = False) -> dict:
    """Walk the grid; pick the best setting by the validation metric (never by test)."""
    metric = str(config["valid_metric"]).lower()
    points = list(grid_points(config))
    log.info(f"grid over {config['hyper_parameters']}: {len(points)} settings, selected by valid {metric}")
    dataset = None
    rows = []
    for idx, (point, cfg) in enumerate(points):
        tag = f"{idx:03d}-" + "-".join(f"{k}={v}" for k, v in point.items())
        sub = out / "grid" / tag.replace("/", "_")
        done = sub / "result.json"
        if resume and done.exists():
            res = json.loads(done.read_text())
            log.info(f"[{idx + 1}/{len(points)}] {point}: already done")
        else:
            log.info(f"[{idx + 1}/{len(points)}] {point}")
            if dataset is None:
                dataset = RecDataset(cfg)
            res = train_one(cfg, sub, dataset, resume=resume)
        rows.append({"point": point, "valid": res["valid"], "test": res["test"], "best_epoch": res["best_epoch"],
                     "epochs_run": res["epochs_run"], "seconds_per_epoch": res["seconds_per_epoch"],
                     "dir": str(sub)})
    scored = [r for r in rows if r["valid"]]
    if not scored:
        raise RuntimeError("no grid setting produced a validation result")
    best = max(scored, key=lambda r: r["valid"][metric])  # first wins ties
    by_test = max(scored, key=lambda r: r["test"][metric])
    log.info(f"grid done: best by valid {metric}: {best['point']}")
    for r in rows:
        flag = " <- best (valid)" if r is best else ""
        log.info(f"  {r['point']}  valid {r['valid'].get(metric, float('nan')):.4f}  "
                 f"test {r['test'].get(metric, float('nan')):.4f}{flag}")
    if by_test is not best:
        log.info(f"  (selecting by test would have picked {by_test['point']}: MMRec's flaw, not used)")
    best_result = json.loads((Path(best["dir"]) / "result.json").read_text())
    result = {**best_result, "grid": rows, "best_point": best["point"], "selected_by": f"valid {metric}",
              "config": config.to_dict()}
    result.pop("history", None)
    write_json(out / "result.json", result)
    return result


def compare(models: list[str], dataset: str, seeds: list[int] | None = None, splits: int = 0,
            overrides: list | None = None, out_dir: Path | None = None, overwrite: bool = False,
            extra_yamls: list[Path] | None = None) -> dict:
    """Train each model under identical splits and seeds; mean and spread of the test metrics, and a
    paired comparison per user is possible from the saved per-run results."""
    out = Path(out_dir) if out_dir else default_out_dir("compare", dataset)
    claim_out_dir(out, False, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out)
    runs = []
    if splits:
        plan = [({"split": "random", "split_seed": s}, f"split{s}") for s in PAPER_SPLIT_SEEDS[:splits]]
    else:
        plan = [({"seed": s}, f"seed{s}") for s in (seeds or [999])]
    for model in models:
        for extra, tag in plan:
            sets = list(overrides or []) + [f"{k}={v}" for k, v in extra.items()]
            sub = out / f"{canonical_name(model)}-{tag}"
            res = run(model, dataset, sets, sub, extra_yamls=extra_yamls)
            setup_logging(out)
            runs.append({"model": canonical_name(model), "tag": tag, "valid": res["valid"], "test": res["test"],
                         "best_epoch": res["best_epoch"], "seconds_per_epoch": res["seconds_per_epoch"]})
    keys = ["recall@10", "recall@20", "ndcg@10", "ndcg@20"]
    table = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        rs = [r for r in runs if r["model"] == model]
        table[model] = {}
        for k in keys:
            vals = [r["test"][k] for r in rs if k in r["test"]]
            table[model][k] = {"mean": statistics.fmean(vals) if vals else None,
                               "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
        spe = [r["seconds_per_epoch"] for r in rs if r["seconds_per_epoch"]]
        table[model]["seconds_per_epoch"] = statistics.median(spe) if spe else None
    lines = [f"| model | {' | '.join(keys)} | s/epoch |", "|---" * (len(keys) + 2) + "|"]
    for model, row in table.items():
        cells = [f"{row[k]['mean']:.4f} ± {row[k]['std']:.4f}" for k in keys]
        lines.append(f"| {model} | {' | '.join(cells)} | {row['seconds_per_epoch']:.3f} |")
    md = "\n".join(lines)
    (out / "compare.md").write_text(md + "\n")
    result = {"dataset": dataset, "plan": [t for _, t in plan], "runs": runs, "table": table}
    write_json(out / "compare.json", result)
    print(md)
    result["result_path"] = str(out / "compare.json")
    return result
