"""``analyse``, ``explain``, ``plot`` and ``paired``: what a trained run does, as JSON and figures, and whether
two runs differ by more than the evaluated users' sampling noise.

A model with a router exposes ``routing_probabilities(users, items) -> (pi [n, E], expert names)``
(MAGNET); ``analyse`` and ``explain`` need it, ``plot`` works for every model.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from mmrec import analysis
from mmrec.config import ConfigError

log = logging.getLogger("mmrec")


def _routed(model, run_dir: Path) -> None:
    if not hasattr(model, "routing_probabilities") or not getattr(model, "use_moe", True):
        raise ConfigError(f"{run_dir}: {type(model).__name__} has no router (routing_probabilities), so there is "
                          "nothing to analyse or explain; `plot` draws any run's learning curves")


def _pairs_pi(model, users: np.ndarray, items: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, list[str]]:
    """Dense routing rows for aligned pairs, in chunks, with one forward for the whole pass."""
    device = getattr(model, "device", torch.device("cpu"))
    rows, names = [], []
    model.start_evaluation()
    try:
        for lo in range(0, len(users), chunk):
            pi, names = model.routing_probabilities(torch.as_tensor(users[lo:lo + chunk], device=device),
                                                    torch.as_tensor(items[lo:lo + chunk], device=device))
            rows.append(pi.float().cpu().numpy())
    finally:
        model.end_evaluation()
    return (np.concatenate(rows) if rows else np.zeros((0, 0))), names


def _expert_blends(model, names: list[str]) -> np.ndarray | None:
    """Each routed expert's blend over the channels (MAGNET's ``expert_weights``; learned blends drift
    from the ones their names state), or None for a model without them."""
    if not hasattr(model, "expert_weights") or len(names) < 2:
        return None
    with torch.no_grad():
        return model.expert_weights().cpu().numpy()


def _scaled_series(rows: list[dict], keys, x_key: str, suffix: str = "") -> dict[str, tuple[list, list]]:
    """Each key's values against ``x_key``, scaled to [0, 1] (Figs. 7-8 draw them on one axis)."""
    series = {}
    for key in keys:
        pts = [(r[x_key], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
        ys = np.array([p[1] for p in pts])
        span = ys.max() - ys.min() if len(ys) else 0
        series[key + suffix] = ([p[0] for p in pts], ((ys - ys.min()) / span if span else ys * 0).tolist())
    return series


def analyse_run(run_dir: Path, out: Path | None = None) -> Path:
    """Routing profile on the test split's ground-truth pairs (Eqs. 33-34), modality reliance, family
    composition, the per-epoch routing dynamics with the stage switch, and validation NDCG@20 against
    cumulative training time with t95: ``analysis.json`` and PNGs in ``out`` (default RUN_DIR/analysis)."""
    from mmrec.quick_start import load_trained

    config, dataset, model = load_trained(run_dir)
    _routed(model, run_dir)
    out = Path(out) if out else Path(run_dir) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    test = dataset.test_matrix.tocoo()
    pi, names = _pairs_pi(model, test.row.astype(np.int64), test.col.astype(np.int64))
    profile = analysis.routing_profile(pi, names)
    blends = _expert_blends(model, names)
    if blends is not None:
        profile["channel_share"] = analysis.channel_share(profile["pi_bar"], blends)
    result = json.loads((Path(run_dir) / "result.json").read_text()) if (Path(run_dir) / "result.json").exists() else {}
    history = result.get("history") or []
    report = {"run": str(run_dir), "model": config["model"], "dataset": config["dataset"], "split": "test",
              "profile": profile}
    figures = [
        analysis.bar_figure(out / "expert_usage.png", names, profile["pi_bar"],
                            f"Expert usage (mean dense routing, test pairs; N_eff {profile['n_eff']:.2f}, "
                            f"HHI {profile['hhi']:.3f})", "mean routing probability", "expert"),
        analysis.bar_figure(out / "modality_reliance.png", list(profile["modality_reliance"]),
                            list(profile["modality_reliance"].values()),
                            "Modality reliance (routing mass per anchor group)", "routing mass", "group"),
        analysis.bar_figure(out / "family_composition.png", list(profile["family_composition"]),
                            list(profile["family_composition"].values()),
                            f"Family composition (Div {profile['div']:.3f})", "routing mass", "family")]
    dyn_keys = [k for k in ("H~", "N_eff", "top1_share", "max_load", "signal") if any(k in r for r in history)]
    if dyn_keys:
        series = _scaled_series(history, dyn_keys, "epoch", " (normalised)")
        switch = next((r["epoch"] for r in history if r.get("stage") == 2), None)
        figures.append(analysis.curves_figure(out / "routing_dynamics.png", series,
                                              "Routing dynamics per epoch (each curve scaled to [0, 1])", "epoch",
                                              "normalised value", {"stage 2": switch} if switch is not None else None))
        report["stage_switch_epoch"] = switch
    trace_path = Path(run_dir) / "trace.jsonl"
    if trace_path.exists():  # per-step statistics (MAGNET's routing_trace_every): Figs. 7-8
        rows = [json.loads(line) for line in trace_path.read_text().splitlines() if line.strip()]
        series = _scaled_series(rows, ("H~", "N_eff", "top1_share", "top3_mass", "max_load", "top1_top2_gap",
                                       "hhi_norm"), "step")
        switch = next((r["step"] for r in rows if r.get("stage") == 2), None)
        figures.append(analysis.curves_figure(out / "routing_trace.png", series,
                                              "Routing statistics per training step (each scaled to [0, 1])",
                                              "training step", "normalised value",
                                              {"stage 2": switch} if switch is not None else None))
        report["trace_rows"] = len(rows)
    metric = config.get("valid_metric", "ndcg@20")
    pts = [(r["elapsed_seconds"], r["valid"][metric]) for r in history if "elapsed_seconds" in r and r.get("valid")]
    if pts:
        t95 = (result.get("efficiency") or {}).get("t95_seconds")
        figures.append(analysis.curves_figure(out / "valid_vs_time.png", {f"valid {metric}": ([p[0] for p in pts],
                                                                                          [p[1] for p in pts])},
                                              f"Validation {metric} against training + evaluation time",
                                              "cumulative seconds", metric, {"t95": t95} if t95 else None))
    report["figures"] = [f.name for f in figures]
    (out / "analysis.json").write_text(json.dumps(report, indent=1) + "\n")
    return out / "analysis.json"


def explain_run(run_dir: Path, user: str, topk: int = 10, item: str | None = None) -> tuple[str, Path]:
    """The user's top-K items (or one given item) with each pair's 3x3 routing mass, marginals, top experts,
    N_eff and HHI (Sec. 5.3); a printed table and a heatmap PNG of the first pair."""
    from mmrec.evaluation import recommend
    from mmrec.quick_start import id_maps, internal_ids, load_trained

    if topk < 1:
        raise ConfigError(f"--topk {topk}: expected an integer >= 1")
    config, dataset, model = load_trained(run_dir)
    _routed(model, run_dir)
    users_map, items_map = id_maps(dataset)
    u = internal_ids([str(user)], users_map, dataset.n_users, f"--user {user}", "user")[0]
    if item is not None:
        items = np.asarray(internal_ids([str(item)], items_map, dataset.n_items, f"--item {item}", "item"))
        scores = None
    else:
        top_items, top_scores = recommend(model, dataset, np.array([u]), topk, 1)
        items, scores = top_items[0], top_scores[0]
    pi, names = _pairs_pi(model, np.full(len(items), u, dtype=np.int64), items.astype(np.int64))
    name_i = (lambda i: items_map.get(int(i), str(i))) if items_map else str
    blends = _expert_blends(model, names)
    share_cols = " ch B | ch A | ch S |" if blends is not None else ""
    lines = [f"user {user}: {'item ' + str(item) if item is not None else f'top {topk}'} "
             f"({config['model']} on {config['dataset']}; routing mass by expert name: B/A/S, Dom/Bal/Com"
             + ("; ch B/A/S: channel share, the mass times each expert's blend" if blends is not None else "") + ")",
             "| rank | item | score | B | A | S | Dom | Bal | Com |" + share_cols + " top experts | N_eff | HHI |",
             "|" + "---|" * (12 + (3 if blends is not None else 0))]
    explained = []
    for rank, (i, p) in enumerate(zip(items, pi), 1):
        att = analysis.pair_attribution(p, names)
        if blends is not None:
            att["channel_share"] = analysis.channel_share(p, blends)
        explained.append({"item": name_i(i), "score": None if scores is None else float(scores[rank - 1]), **att})
        mm, fm = att["modality_mass"], att["family_mass"]
        tops = ", ".join(f"{n} {w:.2f}" for n, w in att["top_experts"])
        score = "-" if scores is None else f"{scores[rank - 1]:.4f}"
        share = "".join(f" {att['channel_share'][c]:.2f} |" for c in ("B", "A", "S")) if blends is not None else ""
        lines.append(f"| {rank} | {name_i(i)} | {score} | {mm['B']:.2f} | {mm['A']:.2f} | {mm['S']:.2f} | "
                     f"{fm['Dom']:.2f} | {fm['Bal']:.2f} | {fm['Com']:.2f} |{share} {tops} | {att['n_eff']:.2f} | "
                     f"{att['hhi']:.3f} |")
    out = Path(run_dir) / "explain"
    out.mkdir(exist_ok=True)
    stem = f"user_{user}" + (f"_item_{item}" if item is not None else "")
    (out / f"{stem}.json").write_text(json.dumps({"user": str(user), "pairs": explained}, indent=1) + "\n")
    first = explained[0]
    figure = analysis.heatmap_figure(out / f"{stem}.png", np.asarray(first["mass"]),
                                     f"Routing mass, user {user} / item {first['item']}")
    return "\n".join(lines), figure


def selection_table(run_dirs: list[Path]) -> str:
    """Per finished run (comparison folders skipped): its validation metric at the chosen epoch against
    the evaluations around it (``results.selection_summary``), as a markdown table."""
    from mmrec.results import STORE_NAME, selection_summary

    lines = ["| run | valid metric | best epoch / evaluations | best | 5 either side | overshoot | roughness |",
             "|---|---|---|---|---|---|---|"]
    for d in run_dirs:
        path = Path(d) / "result.json"
        if (Path(d) / STORE_NAME).exists() or not path.exists():
            continue
        res = json.loads(path.read_text())
        metric = str((res.get("config") or {}).get("valid_metric", "ndcg@20")).lower()
        got = selection_summary(res.get("history") or [], metric, res.get("best_epoch"))
        if got:
            lines.append(f"| {res.get('model', '?')} ({Path(d).name}) | {metric} | {got['best_epoch']} / "
                         f"{got['evaluations']} | {got['best']:.4f} | {got['neighbours']:.4f} | "
                         f"{got['overshoot']:+.4f} | {got['roughness']:.4f} |")
    return "\n".join(lines) + ("\n\novershoot = best minus the mean of up to 5 evaluations either side; roughness = "
                              "standard deviation of the step-to-step change within 15 evaluations of the best"
                              if len(lines) > 2 else "")


def plot_runs(run_dirs: list[Path], out: Path | None = None) -> list[Path]:
    """Learning curves of any runs, overlaid (loss parts and validation metrics per epoch); a comparison
    folder (with a results store) is drawn as grouped bars of its table."""
    from mmrec.results import STORE_NAME, ResultStore, compare_table

    runs, bars = {}, []
    for d in run_dirs:
        if (Path(d) / STORE_NAME).exists():  # a comparison folder: its table as bars
            table = compare_table(ResultStore(Path(d), readonly=True).records())
            if table["models"]:
                target = Path(out) if out else Path(d)
                target.mkdir(parents=True, exist_ok=True)
                bars.append(analysis.compare_bars(table, target / "compare_bars.png"))
            continue
        path = Path(d) / "result.json"
        if not path.exists():
            raise ConfigError(f"{d}: no result.json (not a finished run folder)")
        res = json.loads(path.read_text())
        runs[f"{res.get('model', Path(d).name)} ({Path(d).name})"] = res
    if not runs:
        return bars
    target = Path(out) if out else Path(next(d for d in run_dirs if not (Path(d) / STORE_NAME).exists())) / "plots"
    return bars + analysis.learning_curves(runs, target)


@torch.no_grad()
def pair_ndcg(model, dataset, k: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, contribution) per test pair: 1/log2(rank + 1) when the item ranks within k of the
    user's masked full ranking, else 0, divided by the user's IDCG@k (MAGNET.md Sec. 11's decision).
    Summed over a user's pairs it is the user's NDCG@k; ranks come from one comparison per block."""
    from mmrec.evaluation import _masked_scores, _row_keys

    test = dataset.test_matrix.tocsr()
    train = dataset.train_matrix.tocsr()
    users = np.flatnonzero(np.diff(test.indptr) > 0)
    n_pos = np.diff(test.indptr)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    idcg = np.concatenate([[1.0], np.cumsum(discount)])  # idcg[m] for m relevant items (m <= k)
    device = getattr(model, "device", torch.device("cpu"))
    out_u, out_i, out_c = [], [], []
    model.eval()
    model.start_evaluation("test")
    try:
        for lo in range(0, len(users), 1024):
            block = users[lo:lo + 1024]
            scores = _masked_scores(model, block, train, device).cpu()
            rows, items = _row_keys(test, block, dataset.n_items)
            ranks = 1 + (scores[rows] > scores[rows, items].unsqueeze(1)).sum(1).numpy()
            u = block[rows.numpy()]
            gain = np.where(ranks <= k, 1.0 / np.log2(ranks + 1), 0.0)
            out_u.append(u)
            out_i.append(items.numpy())
            out_c.append(gain / idcg[np.minimum(n_pos[u], k)])
    finally:
        model.end_evaluation()
    return np.concatenate(out_u), np.concatenate(out_i), np.concatenate(out_c)


def dv_sv_gain(dv_dir: Path, sv_dir: Path, out: Path | None = None) -> Path:
    """Sec. 4.10: DV-over-SV relative NDCG@20 gain per visibility bucket (Easy / Medium / Hard, from
    v(u, i) on the DV run's kNN lists) and per user-activity tercile (Head / Mid / Tail), with sizes."""
    from mmrec import graph
    from mmrec.quick_start import load_trained

    cfg_dv, data_dv, model_dv = load_trained(dv_dir)
    cfg_sv, data_sv, model_sv = load_trained(sv_dir)
    if cfg_dv["dataset"] != cfg_sv["dataset"] or cfg_dv.get("split_seed") != cfg_sv.get("split_seed"):
        raise ConfigError(f"--dv {dv_dir} and --sv {sv_dir} must be runs on the same dataset and split")
    u, i, c_dv = pair_ndcg(model_dv, data_dv)
    u2, i2, c_sv = pair_ndcg(model_sv, data_sv)
    if not (np.array_equal(u, u2) and np.array_equal(i, i2)):
        raise ConfigError("the two runs have different test pairs")
    k = int(cfg_dv.get("knn_k", 10))
    lists = {m: graph.cached_knn(data_dv, m, k, include_self=False, **graph.similarity_settings(cfg_dv))[0]
             for m in ("v", "t")}
    train = data_dv.train_matrix.tocsr()
    buckets = analysis.visibility_buckets(analysis.pair_visibility(train, u, i, lists, k))
    activity = analysis.activity_terciles(np.diff(train.indptr))[u]
    report = {"dv": str(dv_dir), "sv": str(sv_dir), "dataset": cfg_dv["dataset"], "visibility": {}, "activity": {}}
    for name, labels, order in (("visibility", buckets, ("Easy", "Medium", "Hard")),
                                ("activity", activity, ("Head", "Mid", "Tail"))):
        for b in order:
            sel = labels == b
            n_dv, n_sv = (float(c_dv[sel].mean()), float(c_sv[sel].mean())) if sel.any() else (0.0, 0.0)
            report[name][b] = {"pairs": int(sel.sum()), "ndcg20_dv": n_dv, "ndcg20_sv": n_sv,
                               "gain": analysis.relative_gain(n_dv, n_sv)}
    out = Path(out) if out else Path(dv_dir) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("visibility", "activity"):
        rows = report[name]
        analysis.bar_figure(out / f"dv_sv_gain_{name}.png", [f"{b} (n={r['pairs']})" for b, r in rows.items()],
                            [100 * (r["gain"] or 0.0) for r in rows.values()],
                            f"DV over SV: relative NDCG@20 gain by {name}", "gain (%)", f"{name} bucket")
    (out / "dv_sv.json").write_text(json.dumps(report, indent=1) + "\n")
    return out / "dv_sv.json"


def paired_runs(a_dir: Path, b_dir: Path, split: str = "test", ks: tuple[int, ...] = (20,),
                resamples: int = 2000, seed: int = 0) -> str:
    """Two finished runs on the same dataset and split, each evaluated again from its best.pth: per metric
    the means, A - B and its bootstrap interval over the evaluated users (``results.paired_bootstrap``)."""
    from mmrec.evaluation import evaluate
    from mmrec.quick_start import load_trained
    from mmrec.results import paired_bootstrap

    cfg_a, data_a, model_a = load_trained(a_dir)
    cfg_b, data_b, model_b = load_trained(b_dir)
    for key in ("dataset", "split", "split_seed"):
        if cfg_a.get(key) != cfg_b.get(key):
            raise ConfigError(f"{a_dir}/config.yaml and {b_dir}/config.yaml differ in {key} ({cfg_a.get(key)!r} "
                              f"against {cfg_b.get(key)!r}): paired compares two runs on the same split")
    res_a = evaluate(model_a, data_a, split, list(ks), ["recall", "ndcg"], per_user=True)
    res_b = evaluate(model_b, data_b, split, list(ks), ["recall", "ndcg"], per_user=True)
    if not np.array_equal(res_a["users"], res_b["users"]):
        raise ConfigError(f"{a_dir} and {b_dir} evaluate different {split} users: not the same split")
    lines = [f"A = {a_dir} ({cfg_a['model']}), B = {b_dir} ({cfg_b['model']}); {cfg_a['dataset']} {split}, "
             f"{len(res_a['users'])} users, {resamples} bootstrap resamples of the users",
             "| metric | A | B | A - B | 95% interval | resamples with A ahead |", "|---|---|---|---|---|---|"]
    for name in res_a["per_user"]:
        stats = paired_bootstrap(res_a["per_user"][name] - res_b["per_user"][name], resamples, seed)
        lines.append(f"| {name} | {res_a['metrics'][name]:.4f} | {res_b['metrics'][name]:.4f} | {stats['diff']:+.4f} | "
                     f"[{stats['low']:+.4f}, {stats['high']:+.4f}] | {stats['a_ahead']:.2f} |")
    return "\n".join(lines)


def topk_per_user(run_dir: Path, metric: str, truth_cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(test users, one ``metric`` value each, e.g. ``ndcg@20``) of a finished run, from the top-K lists it
    saved (topk_test.tsv) and its split's test items: no model is loaded."""
    from mmrec.data import RecDataset
    from mmrec.evaluation import topk_metrics
    from mmrec.quick_start import load_run_config

    run_dir = Path(run_dir)
    path = run_dir / "topk_test.tsv"
    if not path.exists():
        raise ConfigError(f"{path}: missing; the paired column reads each run's saved top-K lists (the trainer "
                          f"writes them unless save_topk is 0: rerun that run with --set save_topk=20)")
    name, k = metric.split("@")
    k = int(k)
    config = load_run_config(run_dir)
    key = (config["dataset"], str(config.get("data_path")), config.get("split"), config.get("split_seed"))
    cache = truth_cache if truth_cache is not None else {}
    if key not in cache:
        truth = RecDataset(config).eval_matrix("test").tocsr()
        truth.sort_indices()
        cache[key] = truth
    truth = cache[key]
    users, ranked = [], []
    with open(path) as fh:
        next(fh)
        for line in fh:
            user, items = line.rstrip("\n").split("\t")
            row = [int(i) for i in items.split(",") if i][:k]
            if len(row) < k:
                raise ConfigError(f"{path}: user {user} has {len(row)} ranked items, fewer than {metric} needs "
                                  f"(rerun that run with --set save_topk={k})")
            users.append(int(user))
            ranked.append(row)
    users = np.asarray(users, dtype=np.int64)
    ranked = np.asarray(ranked, dtype=np.int64).reshape(len(users), k)
    hits = truth[users[:, None], ranked].toarray() != 0 if len(users) else np.zeros((0, k), dtype=bool)
    n_pos = torch.from_numpy(np.diff(truth.indptr)[users].astype(np.int64))
    values = topk_metrics(torch.from_numpy(hits.astype(np.float64)), n_pos, [k], [name])[metric]
    return users, values.numpy()


def paired_against_best(records: list[dict], metric: str = "ndcg@20", resamples: int = 2000,
                        seed: int = 0) -> dict[tuple[str, str], dict]:
    """For each dataset of a comparison, every model against the model with the best mean ``metric``: per
    test user the model's value minus the best model's, averaged over the runs they share (same seed or
    split tag), and the bootstrap interval of that mean over users (``results.paired_bootstrap``).  The
    user is the unit: on random splits a user's gap is averaged over the splits that test them."""
    from mmrec.results import paired_bootstrap

    records = [r for r in records if r.get("kind", "compare") == "compare" and metric in r.get("test", {})]
    cache: dict = {}
    values: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}

    def per_user(r):
        at = (r["dataset"], r["model"], r["tag"])
        if at not in values:
            if not r.get("result_path"):
                raise ConfigError(f"{r['model']} on {r['dataset']} {r['tag']}: its record names no run folder")
            values[at] = topk_per_user(Path(r["result_path"]).parent, metric, cache)
        return values[at]

    out: dict[tuple[str, str], dict] = {}
    for ds in dict.fromkeys(r["dataset"] for r in records):
        runs: dict[str, dict[str, dict]] = {}
        for r in records:
            if r["dataset"] == ds:
                runs.setdefault(r["model"], {})[r["tag"]] = r
        best = max(runs, key=lambda m: np.mean([r["test"][metric] for r in runs[m].values()]))
        for model in runs:
            shared = sorted(set(runs[model]) & set(runs[best]))
            if model == best or not shared:
                continue
            users, gaps = [], []
            for tag in shared:
                users_m, vals_m = per_user(runs[model][tag])
                users_b, vals_b = per_user(runs[best][tag])
                if not np.array_equal(users_m, users_b):
                    raise ConfigError(f"{model} and {best} on {ds} {tag} ranked different test users: not one split")
                users.append(users_m)
                gaps.append(vals_m - vals_b)
            users, gaps = np.concatenate(users), np.concatenate(gaps)
            count = np.bincount(users)
            seen = count > 0
            d = np.bincount(users, weights=gaps)[seen] / count[seen]  # each user's gap averaged over its runs
            out[(ds, model)] = {"best": best, "runs": len(shared), "users": int(d.size),
                                **paired_bootstrap(d, resamples, seed)}
    return out
