"""What does each part of a trained MAGNET score contribute?

    python -m utils.magnet_parts RUN_DIR [--k 20] [--popularity | --routing | --induced] [--split test]

RUN_DIR is the output folder of a MAGNET run (config.yaml and best.pth). The best epoch's weights are
ranked on the validation and test splits (training items masked, as the trainer does) by:
  full           the model's score (Eqs. 16-21: routed mixture of the template experts)
  full, no cues  the same with h^A = h^S = 0 (f_m zeroed): what the cue channels add to the mixture
  z dot          <z_u, z_i> of the fused backbone (Eq. 6) alone, as LightGCN would score
  z^UI dot       the same on the interaction view only (Eq. 5 on G_UI)
  cue similarity <h^A_u, h^A_i> + <h^S_u, h^S_i>: the modality cues alone (Eqs. 7-8)
and the RMS row norm of r^B, r^A, r^S (Eq. 9) is printed, which says how much weight a template's
share of each channel really carries.

``--routing``: what the router adds, per pair or per item.  The full score is ranked again with each
pair's Top-K gates g_ui replaced by their mean over the user's items (one mixture per user), by their mean
over the users (one mixture per item: routing as an item-level scorer), and by uniform gates; and per
item-popularity bucket the mean gates and the mean behaviour gain sum_e g_e (w^B_e)^2 (the factor the
routing puts on the <z_u, z_i> part of the score) are printed.

``--popularity``: for each score, the hit rate @K of the split's (user, item) pairs by the target item's
number of training interactions (buckets POPULARITY_EDGES), and the mean training popularity of the
top-K lists: where in the catalogue a score finds its hits.  RUN_DIR may then be any model's run (its own
score only), so a baseline's buckets can be read beside MAGNET's.

``--induced``: how well the content-induced edges E+ of the run's config (Eqs. 1-3, built from the training
split) anticipate the split's held-out pairs: the share of induced edges that are held-out pairs
(precision), the share of held-out pairs that are induced edges (recall), the share of E+ taken by the 10%
of items with the most induced edges (hubs) and the items with none, and the mean training popularity of
the induced items against the catalogue's.  Reads config.yaml only (no weights needed).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

import utils.synth  # noqa: F401  (registers the synthetic presets)
from mmrec.config import load_config, yaml_load
from mmrec.data import RecDataset
from mmrec.data.sources import ensure_generated
from mmrec.evaluation import evaluate
from mmrec.registry import get_model


class _Scorer(torch.nn.Module):
    """Presents one scoring rule to ``evaluate`` with the model's evaluation cache."""

    def __init__(self, model, score):
        super().__init__()
        self.model, self.score = model, score

    def start_evaluation(self, split=None):
        self.model.start_evaluation(split)

    def end_evaluation(self):
        self.model.end_evaluation()

    def full_sort_predict(self, interaction):
        return self.score(interaction["users"])


def score_parts(model) -> dict:
    """Scoring rules {name: users -> [users, items] scores} of a MAGNET in eval mode."""
    tables = model.encode()
    n_u = model.n_users
    z, z_ui, r_u, r_i = tables["z"], tables["z_ui"], tables["r_user"], tables["r_item"]
    return {
        "full": lambda users: model.full_sort_predict({"users": users}),
        "full, no cues": lambda users: _without_cues(model, users),
        "z dot": lambda users: z[users] @ z[n_u:].T,
        "z^UI dot": lambda users: z_ui[users] @ z_ui[n_u:].T,
        # the cue channels are the last two (view_fusion per_expert puts z^UI and z^UIG before them)
        "cue similarity": lambda users: r_u[users, -2] @ r_i[:, -2].T + r_u[users, -1] @ r_i[:, -1].T,
    }


@contextlib.contextmanager
def _cues_zeroed(model):
    """f_A and f_S output 0 inside the block (their parameters are restored afterwards)."""
    saved = [(p, p.detach().clone()) for proj in (model.image_proj, model.text_proj) for p in proj.parameters()]
    try:
        for p, _ in saved:
            p.data.zero_()
        yield
    finally:
        for p, value in saved:
            p.data.copy_(value)


def _without_cues(model, users):
    """The full score with h^A = h^S = 0: the tables are recomputed, not read from the pass's cache."""
    with _cues_zeroed(model):
        model.end_evaluation()
        return model.full_sort_predict({"users": users})


POPULARITY_EDGES = (0, 3, 6, 11, 21, 41)  # bucket lower edges: [0, 3), [3, 6), ..., [41, inf)
USER_BLOCK = 256  # users per pass of --routing's gate averages


def routing_parts(model) -> tuple[dict, torch.Tensor]:
    """({name: users -> scores} with the Top-K gates averaged per user, per item or uniform; the per-item
    mean gates [I, E]) of a MAGNET in eval mode with a router (``--routing``)."""
    if not model.use_moe:
        raise ValueError("this run has moe: false, so there is no router to decompose")
    user_mean, item_mean = torch.zeros(model.n_users, model.n_experts), torch.zeros(model.n_items, model.n_experts)
    model.start_evaluation()  # one encode for the whole pass
    try:
        for users in torch.arange(model.n_users).split(USER_BLOCK):
            for items, _, gates in model.expert_blocks(users):  # gates [users, items, E]
                user_mean[users] += gates.sum(1) / model.n_items
                item_mean[items] += gates.sum(0) / model.n_users
    finally:
        model.end_evaluation()

    def mixed(users, gates_of):
        out = torch.empty(users.numel(), model.n_items)
        for items, y, _ in model.expert_blocks(users):
            out[:, items] = (gates_of(users, items) * y).sum(-1)
        return out

    uniform = torch.full((1, 1, model.n_experts), 1.0 / model.n_experts)
    return {"full": lambda users: model.full_sort_predict({"users": users}),
            "user-mean gates": lambda users: mixed(users, lambda u, i: user_mean[u].unsqueeze(1)),
            "item-mean gates": lambda users: mixed(users, lambda u, i: item_mean[i].unsqueeze(0)),
            "uniform gates": lambda users: mixed(users, lambda u, i: uniform)}, item_mean


def popularity_buckets(popularity: np.ndarray, edges=POPULARITY_EDGES):
    """Yield (bucket name "[lo,hi)", boolean mask of the entries whose popularity falls in it) per bucket."""
    bucket = np.searchsorted(np.asarray(edges), popularity, side="right") - 1
    for b, lo in enumerate(edges):
        yield (f"[{lo},{edges[b + 1]})" if b + 1 < len(edges) else f"[{lo},inf)"), bucket == b


def gates_by_popularity(item_gates: torch.Tensor, behaviour_weight: torch.Tensor, popularity: np.ndarray,
                        edges=POPULARITY_EDGES) -> list[tuple[str, int, float, list[float]]]:
    """(bucket, items, mean behaviour gain sum_e g_e (w^B_e)^2, mean gate per expert) per training-popularity
    bucket of the items, from each item's gates averaged over the users [I, E]."""
    gain = (item_gates * behaviour_weight.pow(2)).sum(-1)
    return [(name, int(mask.sum()), float(gain[mask].mean()), item_gates[mask].mean(0).tolist())
            for name, mask in ((n, torch.as_tensor(m)) for n, m in popularity_buckets(popularity, edges)) if mask.any()]


def hits_by_popularity(top: np.ndarray, users: np.ndarray, truth: sp.csr_matrix, train: sp.csr_matrix,
                       edges=POPULARITY_EDGES) -> list[tuple[str, int, float]]:
    """(bucket, pairs, hit rate) per training-popularity bucket of the target items: a pair (u, i) of
    ``truth`` is a hit when i is in u's row of ``top`` (users[r] -> top[r])."""
    popularity = np.asarray(train.sum(axis=0)).ravel()
    held_out = sp.csr_matrix(truth)[np.asarray(users)].tocoo()  # row r = users[r]
    listed = sp.csr_matrix((np.ones(top.size, dtype=np.int8), (np.repeat(np.arange(len(users)), top.shape[1]),
                                                                top.ravel())), shape=held_out.shape)
    hit = np.asarray(listed[held_out.row, held_out.col]).ravel() > 0
    return [(name, int(mask.sum()), float(hit[mask].mean()) if mask.any() else float("nan"))
            for name, mask in popularity_buckets(popularity[held_out.col], edges)]


def induced_edge_quality(users: np.ndarray, items: np.ndarray, truth: sp.csr_matrix, train: sp.csr_matrix) -> dict:
    """E+ (``users[e]``, ``items[e]``) against the held-out pairs ``truth``: precision, recall, the share of E+ on
    the 10% most-induced items, the share of items with no induced edge, mean training popularity of the induced
    items and of the catalogue."""
    n_items = train.shape[1]
    truth = sp.csr_matrix(truth)
    hit = np.asarray(truth[users, items]).ravel() > 0
    induced_per_item = np.sort(np.bincount(items, minlength=n_items))[::-1]  # most-induced first
    popularity = np.asarray(train.sum(axis=0)).ravel()
    return {"edges": int(users.size), "precision": float(hit.mean()) if hit.size else 0.0,
            "recall": float(hit.sum() / max(truth.nnz, 1)),
            "top10_share": float(induced_per_item[: max(n_items // 10, 1)].sum() / max(induced_per_item.sum(), 1)),
            "items_without": float(np.mean(induced_per_item == 0)),
            "induced_popularity": float(popularity[items].mean()) if items.size else 0.0,
            "catalogue_popularity": float(popularity.mean())}


def _popularity_report(name: str, scorer, dataset, split: str, k: int) -> tuple[str, list]:
    res = evaluate(scorer, dataset, split, [k], keep_topk=k)
    top = np.asarray(res["topk"])
    train = dataset.train_matrix.tocsr()
    mean_pop = float(np.asarray(train.sum(axis=0)).ravel()[top].mean())
    buckets = hits_by_popularity(top, res["users"], dataset.eval_matrix(split).tocsr(), train)
    cells = "  ".join(f"{b} {rate:.3f}" for b, _, rate in buckets)
    return f"{name:16s} N@{k} {res['metrics'][f'ndcg@{k}']:.4f}  top-{k} mean pop {mean_pop:5.1f}  | {cells}", buckets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--k", type=int, default=20)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--popularity", action="store_true",
                   help="hit rate @K by the target item's training popularity (any model's run)")
    mode.add_argument("--routing", action="store_true",
                   help="rank with the gates averaged per user / per item / uniform; gates by item popularity")
    mode.add_argument("--induced", action="store_true",
                   help="precision / recall of the config's induced edges E+ against the split's held-out pairs")
    p.add_argument("--split", default="test", choices=("valid", "test"),
                   help="the split of --popularity, --routing and --induced")
    a = p.parse_args(argv)
    cfg_path, weights = a.run_dir / "config.yaml", a.run_dir / "best.pth"
    for path in (cfg_path,) if a.induced else (cfg_path, weights):
        if not path.exists():
            p.error(f"{path} is missing: give the output folder of a finished run")
    saved = yaml_load(cfg_path.read_text())
    if saved.get("model") != "MAGNET" and (a.routing or not a.popularity):
        p.error(f"{cfg_path}: model is {saved.get('model')!r}; the parts, the routing and E+ are MAGNET's "
                "(--popularity reads any run)")
    skip = ("model", "dataset", "hyper_parameters", "device")
    config = load_config(saved["model"], saved["dataset"], {k: v for k, v in saved.items() if k not in skip})
    ensure_generated(config)
    dataset = RecDataset(config)
    if a.induced:
        from models.magnet_graph import config_induced_edges
        induced = config_induced_edges(dataset, config)
        q = induced_edge_quality(induced["users"], induced["items"], dataset.eval_matrix(a.split), dataset.train_matrix)
        print(f"{a.run_dir}: E+ of knn_k {config['knn_k']}, expansion_r {config['expansion_r']} against the "
              f"{a.split} pairs: {q['edges']} edges, precision {q['precision']:.4f}, recall {q['recall']:.4f}; "
              f"10% most-induced items hold {q['top10_share']:.3f} of E+, {q['items_without']:.3f} of the items "
              f"none; mean training popularity {q['induced_popularity']:.1f} (catalogue {q['catalogue_popularity']:.1f})")
        return 0
    model = get_model(saved["model"])(config, dataset)
    state = torch.load(weights, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    model.eval()
    with torch.no_grad():
        if a.popularity:
            parts = (score_parts(model) if saved["model"] == "MAGNET"
                     else {"full": lambda users: model.full_sort_predict({"users": users})})
            for n, name in enumerate(("full", "z dot", "z^UI dot") if saved["model"] == "MAGNET" else ("full",)):
                line, buckets = _popularity_report(name, _Scorer(model, parts[name]), dataset, a.split, a.k)
                if n == 0:
                    counts = ", ".join(f"{b} {pairs}" for b, pairs, _ in buckets)
                    print(f"{a.run_dir}: {saved['model']}, best epoch {state.get('epoch')}; {a.split} hit rate @{a.k} by "
                          f"the target item's training interactions (pairs per bucket: {counts})")
                print(line)
            return 0
        if a.routing:
            parts, item_gates = routing_parts(model)
            print(f"{a.run_dir}: best epoch {state.get('epoch')}; {a.split} split")
            for name, score in parts.items():
                print(_popularity_report(name, _Scorer(model, score), dataset, a.split, a.k)[0])
            popularity = np.asarray(dataset.train_matrix.sum(axis=0)).ravel()
            print(f"mean gates per item-popularity bucket ({', '.join(model.expert_names)}) and the behaviour gain "
                  "sum_e g_e (w^B_e)^2:")
            for name, items, gain, gates in gates_by_popularity(item_gates, model.expert_weights()[:, :-2].sum(1), popularity):
                print(f"{name:10s} {items:6d} items  gain {gain:.3f}  gates " + " ".join(f"{g:.3f}" for g in gates))
            return 0
        tables = model.encode()
        rows = torch.cat([tables["r_user"], tables["r_item"]])
        rms = rows.pow(2).sum(-1).mean(0).sqrt().tolist()
        channels = (["r^B"] if len(rms) == 3 else ["r^B(z^UI)", "r^B(z^UIG)"]) + ["r^A", "r^S"]
        print(f"{a.run_dir}: best epoch {state.get('epoch')}; RMS row norm "
              + "  ".join(f"{name} {value:.3f}" for name, value in zip(channels, rms)))
        print(f"{'score':16s} valid R@{a.k}  valid N@{a.k}  test R@{a.k}  test N@{a.k}")
        for name, score in score_parts(model).items():
            res = {s: evaluate(_Scorer(model, score), dataset, s, [a.k])["metrics"] for s in ("valid", "test")}
            print(f"{name:16s} {res['valid'][f'recall@{a.k}']:10.4f} {res['valid'][f'ndcg@{a.k}']:12.4f} "
                  f"{res['test'][f'recall@{a.k}']:11.4f} {res['test'][f'ndcg@{a.k}']:11.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
