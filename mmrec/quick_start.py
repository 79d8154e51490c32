"""Runs: one setting, a grid, or a side-by-side comparison.  Used by main.py and from Python:

```python
import utils.synth  # registers the synthetic presets (mini, ...): generated on first use
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
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml

from mmrec.config import (RANGES, ROOT, Config, ConfigError, check_rule, grid_points, grid_size, load_config,
                          parse_set)
from mmrec.data import DataError, RecDataset
from mmrec.data.dataset import MODALITIES, check_available
from mmrec.data.sources import ensure_generated
from mmrec.registry import canonical_name, get_model
from mmrec.executor import Job, pending_jobs, run_jobs
from mmrec.results import (STORE_NAME, TABLE_METRICS, ResultStore, compare_table, config_hash, grid_ranking,
                           run_record, table_json, write_tables)
from mmrec.trainer import Trainer, init_seed, reset_peak_memory, reuse_freed_cpu_memory

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
    reuse_freed_cpu_memory(bool(config.get("cpu_malloc_reuse", True)))
    save_config(config, out_dir)
    model_cls = get_model(config["model"])
    reset_peak_memory()
    if dataset is None:
        ensure_generated(config)
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
              "steps_per_epoch": fit["steps_per_epoch"], "batches_per_epoch": fit["batches_per_epoch"],
              "build_seconds": round(build_seconds, 3), "n_parameters": n_params,
              "efficiency": fit["efficiency"], "model_info": model.extra_results(), "history": fit["history"]}
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
        if key in RANGES:
            check_rule(key, value, RANGES[key], "--set")
        config[key] = value
    return config


def check_model_config(model_cls: type, config: Config) -> None:
    """Everything about a model's configuration that is known before any data is loaded: its declared
    allowed values and cross-key rules (every grid point) and the feature files it needs."""
    model_cls.validate_config(config)
    if getattr(model_cls, "needs_both_modalities", False):
        for key in MODALITIES.values():
            if not config.get(key):
                raise ConfigError(f"{key}={config.get(key)!r}: {model_cls.__name__} needs both image and text "
                                  f"features; name the .npy file (the dataset yaml's or --set {key}=FILE)")


def resolve_config(model: str, dataset: str, overrides: dict | list | None = None, grid: bool = False,
                   extra_yamls: list[Path] | None = None) -> Config:
    """The checked configuration of one (model, dataset) pair: layered yamls, --set, types and ranges,
    then the model's own rules; every bad value is a ConfigError before any data is loaded."""
    name = canonical_name(model)
    model_yaml = ROOT / "configs" / "model" / f"{name}.yaml" if ":" in model else None
    config = load_config(model if ":" in model else name, dataset, overrides, grid=grid,
                         model_yaml=model_yaml, extra_yamls=extra_yamls)
    config["model"] = model if ":" in model else name
    check_model_config(get_model(model), config)
    return config


def run(model: str | None, dataset: str | None, overrides: dict | list | None = None,
        out_dir: Path | str | None = None, grid: bool = False, resume: bool = False, quiet: bool = False,
        overwrite: bool = False, extra_yamls: list[Path] | None = None, workers: int = 1, backend: str = "local",
        address: str | None = None) -> dict:
    """Train ``model`` on ``dataset`` (walking the grid when one is active); returns result.json's dict.
    ``resume``: continue the run in ``out_dir`` with its saved configuration (model and dataset may be
    None; only RESUME_KEYS may be overridden, e.g. more ``epochs`` to extend a finished run)."""
    if resume:
        out = Path(out_dir)
        config = resumed_config(out, model, dataset, overrides)
        model, dataset = str(config["model"]), str(config["dataset"])
    else:
        config = resolve_config(model, dataset, overrides, grid, extra_yamls)
        out = Path(out_dir) if out_dir else default_out_dir(canonical_name(model), dataset)
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
            result = run_grid(config, out, resume, workers, backend, address)
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


class RunsFailed(Exception):
    """Some runs of a comparison or grid failed; the others are in its results store."""


def _progress(out: Path, jobs: list, what: str):
    """``on_done`` for run_jobs: store the record, log which job ended and how many remain."""
    store = ResultStore(out)
    state = {"left": len(jobs), "failed": []}

    def on_done(job: Job, result: dict | None, error: str | None) -> None:
        setup_logging(out)  # a job run in this process took the log over
        state["left"] -= 1
        name = job.label.get("name", job.key)
        if error:
            state["failed"].append(f"{name}: {error}")
            log.error(f"{what} {name} failed ({error}); {state['left']} left, rerun the command to retry it")
            return
        store.put(job.key, run_record(result, job.key, job.label))
        log.info(f"{what} {name} done: test " + "  ".join(f"{k} {v:.4f}" for k, v in result["test"].items()
                                                       if k in TABLE_METRICS) + f"; {state['left']} left")
    on_done.state = state
    return on_done


def _start_log(jobs: list, stored: set, what: str) -> list:
    todo = pending_jobs(jobs, stored)
    log.info(f"{what}: {len(jobs)} runs, {len(jobs) - len(todo)} already in the results store, {len(todo)} to run")
    for i, job in enumerate(todo, 1):
        log.info(f"  queued {i}/{len(todo)}: {job.label.get('name', job.key)}")
    return todo


def run_grid(config: Config, out: Path, resume: bool = False, workers: int = 1, backend: str = "local",
             address: str | None = None) -> dict:
    """Walk the grid; pick the best setting by the validation metric (never by test).  Every finished
    point is in the results store; a rerun (or ``--resume``) runs only the points not in it."""
    metric = str(config["valid_metric"]).lower()
    points = list(grid_points(config))
    log.info(f"grid over {config['hyper_parameters']}: {len(points)} settings, selected by valid {metric}")
    jobs = []
    for idx, (point, cfg) in enumerate(points):
        tag = f"{idx:03d}-" + "-".join(f"{k}={v}" for k, v in point.items())
        key = f"{cfg['model']}|{cfg['dataset']}|{config_hash(cfg.to_dict())}"
        jobs.append(Job(cfg.to_dict(), str(out / "grid" / tag.replace("/", "_")), key,
                        {"kind": "grid", "model": cfg["model"], "dataset": cfg["dataset"], "point": point,
                         "tag": tag, "name": f"[{idx + 1}/{len(points)}] {point}"}))
    store = ResultStore(out)
    todo = _start_log(jobs, {r["key"] for r in store.records()}, "grid")
    on_done = _progress(out, jobs, "grid point")
    run_jobs(todo, on_done, workers, backend, address)
    by_key = {r["key"]: r for r in store.records()}
    rows = [{**by_key[j.key], "dir": j.out} for j in jobs if j.key in by_key]
    if on_done.state["failed"]:
        raise RunsFailed(f"{len(on_done.state['failed'])} grid point(s) failed (the others are stored; rerun "
                           f"to retry): " + "; ".join(on_done.state["failed"]))
    scored = [r for r in rows if r["valid"]]
    if not scored:
        raise RuntimeError("no grid setting produced a validation result")
    best = max(scored, key=lambda r: r["valid"][metric])  # first wins ties
    by_test = max(scored, key=lambda r: r["test"][metric])
    log.info(f"grid done: best by valid {metric}: {best['point']}")
    log.info("\n" + grid_ranking(rows))
    if by_test is not best:
        log.info(f"  (selecting by test would have picked {by_test['point']}: MMRec's flaw, not used)")
    best_result = json.loads((Path(best["dir"]) / "result.json").read_text())
    grid_rows = [{k: r[k] for k in ("point", "valid", "test", "best_epoch", "epochs_run", "efficiency", "dir")}
                 for r in rows]
    result = {**best_result, "grid": grid_rows, "best_point": best["point"], "selected_by": f"valid {metric}",
              "config": config.to_dict()}
    result.pop("history", None)
    write_json(out / "result.json", result)
    return result


def compare(models: list[str], datasets: list[str] | str, seeds: list[int] | None = None, splits: int | None = None,
            overrides: list | None = None, out_dir: Path | None = None, overwrite: bool = False,
            extra_yamls: list[Path] | None = None, workers: int = 1, backend: str = "local",
            address: str | None = None, efficiency: bool = False, paired: bool = False) -> dict:
    """Train each model on each dataset under identical splits and seeds (Table 4's layout).  Every run
    goes into the results store of ``out_dir``; the same command again reuses the finished runs, so a
    killed comparison continues where it stopped.  Writes compare.md / .csv / .tex / .json.  ``paired``
    adds each model against the best one per test user (``diagnostics.paired_against_best``)."""
    datasets = [datasets] if isinstance(datasets, str) else list(datasets)
    if splits is not None and splits < 1:
        raise ConfigError(f"--splits {splits}: expected 1..{len(PAPER_SPLIT_SEEDS)} random 8:1:1 splits (leave it out "
                          "for the dataset's fixed x_label split)")
    if splits is not None and splits > len(PAPER_SPLIT_SEEDS):
        raise ConfigError(f"--splits {splits}: at most {len(PAPER_SPLIT_SEEDS)} (the paper's split seeds "
                          f"{PAPER_SPLIT_SEEDS})")
    if workers < 1:
        raise ConfigError(f"--workers {workers}: expected an integer >= 1")
    if backend not in ("local", "ray"):
        raise ConfigError(f"--backend {backend!r}: expected local or ray")
    if splits:
        plan = [({"split": "random", "split_seed": s}, f"split{s}") for s in PAPER_SPLIT_SEEDS[:splits]]
    else:
        plan = [({"seed": s}, f"seed{s}") for s in (seeds or [999])]
    jobs = []  # every configuration is resolved and checked before anything trains
    for ds in datasets:
        for model in models:
            for extra, tag in plan:
                config = resolve_config(model, ds, list(overrides or []) + [f"{k}={v}" for k, v in extra.items()],
                                        extra_yamls=extra_yamls)
                if grid_size(config) > 1:
                    raise ConfigError(f"compare runs one setting per model; {model} has grid keys "
                                      f"{config['hyper_parameters']}: fix them with --set KEY=VALUE")
                check_available(config)
                name = canonical_name(model)
                key = f"{name}|{ds}|{config_hash(config.to_dict())}"
                jobs.append((config, key, {"kind": "compare", "model": name, "dataset": ds, "tag": tag,
                                           "name": f"{name} on {ds} {tag}"}))
    out = Path(out_dir) if out_dir else default_out_dir("compare", "-".join(datasets))
    if not (out / STORE_NAME).exists():
        claim_out_dir(out, False, overwrite)
    elif overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out)
    jobs = [Job(cfg.to_dict(), str(out / label["dataset"] / f"{label['model']}-{label['tag']}"), key, label)
            for cfg, key, label in jobs]
    store = ResultStore(out)
    todo = _start_log(jobs, {r["key"] for r in store.records()}, "compare")
    on_done = _progress(out, jobs, "run")
    run_jobs(todo, on_done, workers, backend, address)
    keys = {j.key for j in jobs}
    records = [r for r in store.records() if r["key"] in keys]
    against = None
    if paired:
        from mmrec.diagnostics import paired_against_best

        against = paired_against_best(records)
    table = compare_table(records, efficiency=efficiency, paired=against)
    md = write_tables(out, table, records)
    print(md)
    if on_done.state["failed"]:
        raise RunsFailed(f"{len(on_done.state['failed'])} run(s) failed (the table holds the others; rerun the "
                           f"same command to retry): " + "; ".join(on_done.state["failed"]))
    result = table_json(table, records)
    result["result_path"] = str(out / "compare.json")
    return result


def _id_mapping(folder: Path, file_name: str, internal: str) -> dict[int, str] | None:
    """MMRec's ``u_id_mapping.csv`` / ``i_id_mapping.csv`` (header: the original id column and the internal
    one, tab or comma separated) as internal id -> original id, or None when the dataset has none."""
    import csv

    path = folder / file_name
    if not path.exists():
        return None
    with path.open(newline="") as fh:
        head = fh.readline()
        fh.seek(0)
        reader = csv.DictReader(fh, delimiter="\t" if "\t" in head else ",")
        fields = reader.fieldnames or []
        if internal not in fields or len(fields) < 2:
            raise DataError(f"{path}: expected a header with {internal!r} and the original id column, got {fields}")
        original = next(f for f in fields if f != internal)
        return {int(row[internal]): row[original] for row in reader}


def load_trained(run_dir: Path):
    """(config, dataset, model with best.pth's weights) of a finished run folder."""
    run_dir = Path(run_dir)
    if not (run_dir / "best.pth").exists():
        raise ConfigError(f"{run_dir}: expected a finished run folder with config.yaml and best.pth")
    config = load_run_config(run_dir)
    dataset = RecDataset(config)
    model = get_model(config["model"])(config, dataset).to(config["device"])
    state = torch.load(run_dir / "best.pth", map_location=config["device"], weights_only=False)
    model.load_state_dict(state["model"])
    model.eval()
    return config, dataset, model


def load_run_config(run_dir: Path) -> Config:
    """A run folder's saved config.yaml, ready to rebuild its dataset (the device resolved here)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"{run_dir}: expected a finished run folder with config.yaml and best.pth")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    # a run saved before a key existed: that key takes today's default (keys added as "off" reproduce the
    # build that trained it), and the log names what was filled in
    try:
        current = load_config(saved["model"], saved["dataset"], {}).to_dict()
    except (ConfigError, OSError):  # a model or dataset this checkout no longer resolves: the saved keys only
        current = {}
    missing = sorted(set(current) - set(saved))
    if missing:
        log.warning("%s/config.yaml predates %s: using today's defaults for %s", run_dir,
                    "these keys" if len(missing) > 1 else "this key", ", ".join(f"{k}={current[k]!r}" for k in missing))
    config = Config({**{k: current[k] for k in missing}, **saved})
    config["device"] = resolve_device(config)
    ensure_generated(config)
    return config


def id_maps(dataset) -> tuple[dict[int, str] | None, dict[int, str] | None]:
    """(users, items) internal id -> original id from MMRec's mapping files, or None where absent."""
    cfg = dataset.config
    return (_id_mapping(dataset.folder, "u_id_mapping.csv", cfg["USER_ID_FIELD"]),
            _id_mapping(dataset.folder, "i_id_mapping.csv", cfg["ITEM_ID_FIELD"]))


def internal_ids(wanted: list[str], mapping: dict[int, str] | None, n: int, where: str, kind: str) -> list[int]:
    """Original ids (through ``mapping``) or internal ones (without) -> internal ids; unknown ones named."""
    lookup = {v: u for u, v in mapping.items()} if mapping else None
    found, unknown = [], []
    for w in wanted:
        u = lookup.get(w) if lookup else (int(w) if w.isdigit() else None)
        if u is None or not 0 <= u < n:
            unknown.append(w)
        else:
            found.append(u)
    if unknown:
        source = f"original ids from {kind[0]}_id_mapping.csv" if lookup else f"internal ids 0..{n - 1}"
        raise DataError(f"{where}: {len(unknown)} {kind} id(s) not in the dataset, e.g. {unknown[0]!r} ({source})")
    return found


def recommend_from_run(run_dir: Path, k: int = 50, users_file: Path | None = None, out_file: Path | None = None) -> Path:
    """Top-``k`` lists with scores from a run's best.pth, training items excluded, for every user or the
    users listed in ``users_file`` (one id per line, the dataset's original ids when it has MMRec's id
    mapping files, else the internal ones).  Written as TSV: user, rank, item, score."""
    from mmrec.evaluation import recommend

    if k < 1:
        raise ConfigError(f"--k {k}: expected an integer >= 1")
    config, dataset, model = load_trained(run_dir)
    run_dir = Path(run_dir)
    users_map, items_map = id_maps(dataset)
    if users_file is None:
        users = np.arange(dataset.n_users)
    else:
        wanted = [line.strip() for line in Path(users_file).read_text().splitlines() if line.strip()]
        users = np.asarray(internal_ids(wanted, users_map, dataset.n_users, f"{users_file}", "user"), dtype=np.int64)
    items, scores = recommend(model, dataset, users, k, int(config["eval_batch_size"]))
    out = Path(out_file) if out_file else run_dir / f"recommendations_top{k}.tsv"
    name_u = (lambda u: users_map.get(int(u), str(u))) if users_map else str
    name_i = (lambda i: items_map.get(int(i), str(i))) if items_map else str
    tmp = out.with_name(out.name + ".part")
    with tmp.open("w") as fh:
        fh.write("user\trank\titem\tscore\n")
        for u, row_items, row_scores in zip(users, items, scores):
            for rank, (i, s) in enumerate(zip(row_items, row_scores), 1):
                fh.write(f"{name_u(u)}\t{rank}\t{name_i(i)}\t{s:.6g}\n")
    tmp.replace(out)
    return out
