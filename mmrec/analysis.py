"""Looking inside a trained run: routing statistics (MAGNET Sec. 4.9-4.11, 5.3) and figures for any run.

Statistics are plain numpy on a dense routing matrix pi [pairs, E] with expert names like ``Dom-B``
(family-group, optionally ``#replica``); figures need matplotlib (an optional extra).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

GROUPS = ("B", "A", "S")
FAMILIES = ("Dom", "Bal", "Com")


def _split_name(name: str) -> tuple[str, str]:
    family, _, rest = name.partition("-")
    return family, rest.split("#")[0]


def diversity(p: np.ndarray) -> dict[str, float]:
    """Eq. 34 on one distribution p over E experts: H, N_eff = exp(H), HHI = sum p^2, Div = H / log E."""
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum()
    nz = p[p > 0]
    h = float(-(nz * np.log(nz)).sum())
    return {"entropy": h, "n_eff": math.exp(h), "hhi": float((p ** 2).sum()),
            "div": h / math.log(len(p)) if len(p) > 1 else 0.0}


def group_family_mass(p: np.ndarray, names: list[str]) -> np.ndarray:
    """The 3x3 (group B/A/S x family Dom/Bal/Com) routing mass of p, normalised to sum to 1 (Sec. 5.3)."""
    grid = np.zeros((len(GROUPS), len(FAMILIES)))
    for value, name in zip(np.asarray(p, dtype=np.float64), names):
        family, group = _split_name(name)
        grid[GROUPS.index(group), FAMILIES.index(family)] += value
    total = grid.sum()
    return grid / total if total > 0 else grid


def routing_profile(pi: np.ndarray, names: list[str]) -> dict:
    """Dataset-level profile (Eqs. 33-34) of dense routing rows pi [pairs, E]: the mean routing vector,
    N_eff, HHI, Div, modality reliance (mass per group and A+S) and family composition."""
    pi_bar = np.asarray(pi, dtype=np.float64).mean(axis=0)
    grid = group_family_mass(pi_bar, names)
    groups = dict(zip(GROUPS, grid.sum(axis=1).tolist()))
    return {"pairs": int(len(pi)), "experts": list(names), "pi_bar": pi_bar.tolist(), **diversity(pi_bar),
            "modality_reliance": {**groups, "A+S": groups["A"] + groups["S"]},
            "family_composition": dict(zip(FAMILIES, grid.sum(axis=0).tolist()))}


def channel_share(pi_bar, blends) -> dict[str, float]:
    """What the routed experts read: sum_e pi_bar_e w_e over [B, A, S] (Eq. 10's blends). With learned
    templates an expert's blend drifts from the one its name states, so modality reliance (mass per named
    group) and this share can differ. ``blends`` [E, 3], or [E, 4] with behaviour split into z^UI, z^UIG."""
    w = np.asarray(blends, dtype=np.float64)
    if w.shape[1] == 4:
        w = np.column_stack([w[:, 0] + w[:, 1], w[:, 2], w[:, 3]])
    share = np.asarray(pi_bar, dtype=np.float64) @ w
    return dict(zip(GROUPS, (share / share.sum()).tolist()))


def pair_attribution(p: np.ndarray, names: list[str], top: int = 3) -> dict:
    """One recommendation's routing (Sec. 5.3): 3x3 mass, its marginals, top experts, N_eff and HHI."""
    grid = group_family_mass(p, names)
    order = np.argsort(-np.asarray(p))[:top]
    return {"mass": grid.tolist(), "modality_mass": dict(zip(GROUPS, grid.sum(axis=1).tolist())),
            "family_mass": dict(zip(FAMILIES, grid.sum(axis=0).tolist())),
            "top_experts": [(names[e], float(p[e])) for e in order], **diversity(p)}


def visibility(history: set[int], neighbours_a: np.ndarray, neighbours_s: np.ndarray, k: int) -> float:
    """Sec. 4.10: v(u, i) = (|I_u & N^A(i)| + |I_u & N^S(i)|) / (2k)."""
    return (len(history & set(neighbours_a.tolist())) + len(history & set(neighbours_s.tolist()))) / (2 * k)


def visibility_buckets(v: np.ndarray) -> np.ndarray:
    """Easy v >= .5, Medium 0 < v < .5, Hard v = 0 (Sec. 4.10), for an array of visibilities."""
    v = np.asarray(v)
    return np.where(v >= 0.5, "Easy", np.where(v > 0, "Medium", "Hard"))


def visibility_bucket(v: float) -> str:
    return str(visibility_buckets(np.array([v]))[0])


def pair_visibility(train, users: np.ndarray, items: np.ndarray, lists: dict[str, np.ndarray], k: int) -> np.ndarray:
    """Sec. 4.10's v(u, i) for every pair at once: (|I_u & N^A(i)| + |I_u & N^S(i)|) / (2k), membership
    looked up in the sorted keys of the training matrix."""
    coo = train.tocoo()
    n_items = train.shape[1]
    keys = np.sort(coo.row.astype(np.int64) * n_items + coo.col)
    hits = np.zeros(len(users))
    for idx in lists.values():  # [n_items, k] neighbour lists of one modality
        probe = users[:, None].astype(np.int64) * n_items + idx[items][:, :k]
        pos = np.searchsorted(keys, probe).clip(max=max(len(keys) - 1, 0))
        hits += (keys[pos] == probe).sum(1)
    return hits / (2 * k)


def activity_terciles(degrees: np.ndarray) -> np.ndarray:
    """Head / Mid / Tail label per user: equal-size terciles by training degree (most active first)."""
    order = np.argsort(-degrees, kind="stable")
    labels = np.empty(len(degrees), dtype=object)
    for j, part in enumerate(np.array_split(order, 3)):
        labels[part] = ("Head", "Mid", "Tail")[j]
    return labels


def relative_gain(dv: float, sv: float) -> float | None:
    return (dv - sv) / sv if sv > 0 else None


# -- figures --------------------------------------------------------------------------------------
def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("figures need matplotlib, an optional extra: pip install matplotlib") from None
    return plt


def _label(ax, title: str, xlabel: str, ylabel: str, legend: bool = True) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if legend:
        ax.legend(fontsize=8)


def _finish(fig, ax, path: Path, title: str, xlabel: str, ylabel: str, legend: bool = True) -> Path:
    """Title, axis labels and legend on ``ax``; ``fig`` saved to ``path`` and closed."""
    _label(ax, title, xlabel, ylabel, legend)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def bar_figure(path: Path, labels: list[str], values: list[float], title: str, ylabel: str, xlabel: str) -> Path:
    fig, ax = pyplot().subplots(figsize=(max(6.0, 0.6 * len(labels) + 2), 3.6))
    ax.bar(labels, values, color="#4C72B0", label=ylabel)
    ax.tick_params(axis="x", rotation=45 if len(labels) > 4 else 0)
    return _finish(fig, ax, path, title, xlabel, ylabel)


def heatmap_figure(path: Path, grid: np.ndarray, title: str) -> Path:
    fig, ax = pyplot().subplots(figsize=(4.6, 3.8))
    im = ax.imshow(grid, cmap="Blues", vmin=0)
    ax.set_xticks(range(len(FAMILIES)), FAMILIES)
    ax.set_yticks(range(len(GROUPS)), GROUPS)
    for (r, c), value in np.ndenumerate(grid):
        ax.text(c, r, f"{value:.2f}", ha="center", va="center",
                color="white" if value > 0.6 * grid.max() else "black")
    fig.colorbar(im, ax=ax, label="routing mass")
    return _finish(fig, ax, path, title, "family", "anchor group (B = graph, A = image, S = text)", legend=False)


def curves_figure(path: Path, series: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str,
                  ylabel: str, marks: dict[str, float] | None = None) -> Path:
    """Lines (label -> (x, y)); ``marks`` draws labelled vertical lines (e.g. the stage switch, t95)."""
    fig, ax = pyplot().subplots(figsize=(6.4, 3.8))
    for label, (x, y) in series.items():
        ax.plot(x, y, label=label)
    for label, x in (marks or {}).items():
        ax.axvline(x, linestyle="--", color="grey")
        ax.text(x, ax.get_ylim()[1], f" {label}", va="top", fontsize=8)
    return _finish(fig, ax, path, title, xlabel, ylabel)


def learning_curves(runs: dict[str, dict], out: Path) -> list[Path]:
    """``plot``: per run (label -> result.json) the loss parts and the validation metrics per epoch,
    overlaid across runs, one figure each."""
    out.mkdir(parents=True, exist_ok=True)
    losses: dict[str, tuple[list, list]] = {}
    valid: dict[str, tuple[list, list]] = {}
    for label, res in runs.items():
        hist = res.get("history") or []
        for key in sorted({k for r in hist for k in r if k in ("loss", "bpr", "reg", "ctr", "cov", "conf", "cl")}):
            pts = [(r["epoch"], r[key]) for r in hist if isinstance(r.get(key), (int, float))]
            if pts:
                losses[f"{label} {key}"] = ([p[0] for p in pts], [p[1] for p in pts])
        for metric in ("recall@20", "ndcg@20"):
            pts = [(r["epoch"], r["valid"][metric]) for r in hist if metric in (r.get("valid") or {})]
            if pts:
                valid[f"{label} valid {metric}"] = ([p[0] for p in pts], [p[1] for p in pts])
    paths = []
    if losses:
        paths.append(curves_figure(out / "loss.png", losses, "Training loss per epoch", "epoch", "loss"))
    if valid:
        paths.append(curves_figure(out / "valid_metrics.png", valid, "Validation metrics per epoch", "epoch",
                                   "metric"))
    return paths


def compare_bars(table: dict, path: Path, metrics: tuple[str, ...] = ("recall@20", "ndcg@20")) -> Path:
    """A comparison's table as grouped bars: one panel per metric, datasets on the axis, one bar per
    model (mean over runs, sample std as the error bar)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.8), squeeze=False)
    models, datasets = table["models"], table["datasets"]
    width = 0.8 / max(len(models), 1)
    for ax, metric in zip(axes[0], metrics):
        for j, model in enumerate(models):
            cells = [table["cells"].get((ds, model), {}).get(metric, (np.nan, 0.0)) for ds in datasets]
            ax.bar(np.arange(len(datasets)) + j * width, [c[0] for c in cells], width, yerr=[c[1] for c in cells],
                   label=model, capsize=2)
        ax.set_xticks(np.arange(len(datasets)) + width * (len(models) - 1) / 2, datasets)
        _label(ax, f"test {metric} (mean ± std over runs)", "dataset", metric)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
