"""MAGNET cost on a Baby-sized dataset, against LightGCN measured in the same run, with a per-phase profile.

    python benchmarks/bench_magnet.py                     # baby_synth (19,445 users, 7,050 items), all threads
    python benchmarks/bench_magnet.py --dataset mini --train-batches 5 --threads 1

On baby_synth, E+ is built with Baby's Table 3 graph values (k = 20, r = 150), the cost a ``-d baby`` run
pays, unless ``--knn-k`` / ``--expansion-r`` say otherwise (0: the dataset's config, the top level's k = 10,
r = 30, which baby_synth trains with); on other datasets with the dataset's config.

Prints Markdown tables: for LightGCN, MAGNET-DV with neighbour sampling (the defaults: F = 10, a new
draw every step, timed inside each step), MAGNET-DV with full-graph propagation (``fanout: 0``) and
MAGNET-SV (full graph), seconds per training epoch (mean step time over a fixed number of steps times the
steps per epoch, plus the per-epoch neighbour sample when draws are per epoch) and per full evaluation pass (``evaluate`` on the
validation split, as the trainer runs it), each as a ratio to LightGCN; then the training step split
into phases (batch sampling, propagation per view, cues, head/router/losses, optimiser step) and the
full ranking split into phases (forward once per pass; per 2,048-user block: expert scores, Top-K gates,
masking and top-K).  Before that, the time and peak memory (the process's VmHWM increase, measured in a
child process) to build E+ with its kNN lists from an empty cache (cold) and to load it back (warm).
"""
from __future__ import annotations

import argparse
import json
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
from mmrec.data.sources import ensure_generated  # noqa: E402
from mmrec.data.sampler import TrainBatches  # noqa: E402
from mmrec.registry import get_model  # noqa: E402


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def graph_sets(knn_k: int, expansion_r: int) -> dict:
    """The E+ settings the benchmark measures (0 = the dataset's config value)."""
    return {key: value for key, value in (("knn_k", knn_k), ("expansion_r", expansion_r)) if value > 0}


def build_child(dataset: str, cache_dir: str, data_path: str, graph: dict) -> dict:
    """Child process: load the dataset, reset the peak RSS, build (or load) E+, report time and peak."""
    from models.magnet_graph import config_induced_edges

    cfg = load_config("MAGNET", dataset, {"cache_dir": cache_dir, "data_path": data_path, **graph})
    ensure_generated(cfg)
    ds = RecDataset(cfg)
    ds.train_fingerprint, ds.feature_hash("v"), ds.feature_hash("t")  # hashing is not part of the build
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    base = _proc_kib("VmRSS")
    t0 = time.perf_counter()
    edges = config_induced_edges(ds, cfg)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mib": (_proc_kib("VmHWM") - base) / 1024, "edges": int(edges["users"].size),
            "cache_hits": ds.cache.hits, "cache_misses": ds.cache.misses}


def run_child(dataset: str, cache_dir: str, data_path: str, threads: int, knn_k: int, expansion_r: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", "--dataset", dataset, "--cache-dir", cache_dir,
                          "--data-path", data_path, "--threads", str(threads), "--knn-k", str(knn_k),
                          "--expansion-r", str(expansion_r)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _timed(fn, repeat: int = 1) -> tuple[float, object]:
    """(mean seconds of ``repeat`` calls after one warm-up call, last result)."""
    out = fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - t0) / repeat, out


def _backward_of(out: torch.Tensor) -> None:
    (out * torch.ones_like(out)).sum().backward()


def magnet_phases(model, batch: dict) -> dict:
    """Seconds of each training phase of one MAGNET step (forward + backward), measured in isolation on
    the batch's own rows, as ``calculate_loss`` computes them."""
    from mmrec import graph

    users, items = torch.unique(batch["users"]), torch.unique(torch.cat([batch["pos_items"], batch["neg_items"]]))
    rows = torch.cat([users, items + model.n_users])
    views = model.views()
    out = {}
    for name in ("ui", "uig"):
        if views[name] is None:
            continue

        def prop(view=views[name]):
            ego = torch.cat([model.user_embedding.weight, model.item_embedding.weight]).detach().requires_grad_()
            _backward_of(graph.propagate(view, ego, model.n_layers, rows=rows))
        out[f"propagation G_{name.upper()}"] = _timed(prop, 3)[0]

    def cues():
        model.zero_grad()
        for proj, feats, modality in ((model.image_proj, model.v_feat, "v"), (model.text_proj, model.t_feat, "t")):
            h_items, h_users = model._cues(proj, feats, users, items, modality)
            _backward_of(torch.cat([h_items, h_users]))
    out["cues f_A, f_S (Eqs. 7-8)"] = _timed(cues, 3)[0]
    return out


def time_model(model_name: str, dataset: str, sets: dict, train_batches: int, eval_passes: int) -> dict:
    """Training epoch (mean step x steps, plus the per-epoch neighbour sample), one full evaluation pass
    (``evaluate`` on the validation split: forward, scoring, masking, top-K, metrics) and, for MAGNET,
    the per-phase split of both."""
    from mmrec.evaluation import evaluate
    from mmrec.trainer import build_optimizer

    cfg = load_config(model_name, dataset, sets)
    ensure_generated(cfg)
    ds = RecDataset(cfg)
    torch.manual_seed(0)
    model = get_model(model_name)(cfg, ds)
    opt = build_optimizer(cfg, model)
    batches = TrainBatches(ds, int(cfg["train_batch_size"]), 0)
    is_magnet = model_name == "MAGNET"
    model.train()
    t0 = time.perf_counter()
    model.pre_epoch_processing()
    if is_magnet:
        model.views()  # the epoch's neighbour sample (fanout > 0)
    per_epoch = time.perf_counter() - t0
    phases = {"batch sampling": [], "step (forward + backward)": [], "optimiser step": []}
    it = batches.epoch()
    batch = None
    for b in range(train_batches + 1):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        opt.zero_grad()
        out = model.calculate_loss(batch)
        loss = sum(out.values()) if isinstance(out, dict) else out
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if b > 0:  # the first batch is warm-up
            for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                phases[name].append(dt)
    step = {name: float(np.mean(v)) for name, v in phases.items()}
    epoch_s = sum(step.values()) * len(batches) + per_epoch
    res = {"epoch_s": epoch_s, "batches_per_epoch": len(batches), "timed_batches": train_batches,
           "train_phases_ms": {k: 1000 * v for k, v in step.items()}}
    if is_magnet:
        parts = magnet_phases(model, batch)
        res["train_phases_ms"].update({k: 1000 * v for k, v in parts.items()})
        res["train_phases_ms"]["head, router, losses (rest of the step)"] = 1000 * (
            step["step (forward + backward)"] - sum(parts.values()))
        res["train_phases_ms"]["fanout sample (per epoch)"] = 1000 * per_epoch
    if eval_passes == 0:  # training-only variant (neighbour sampling does not change evaluation)
        return res
    model.eval()
    ks = sorted(int(k) for k in cfg["topk"])
    block = int(cfg["eval_batch_size"])
    res["eval_s"] = _timed(lambda: evaluate(model, ds, "valid", ks, list(cfg["metrics"]), block), eval_passes)[0]
    if is_magnet:
        res["eval_phases_ms"] = magnet_eval_phases(model, ds, block)
    return res


@torch.no_grad()
def magnet_eval_phases(model, ds, block: int) -> dict:
    """Milliseconds of each full-ranking phase for one block of ``block`` users (the default path: expert
    planes, ``topk_softmax_mix``), and the forward that runs once per pass."""
    from models.magnet import topk_softmax_mix

    model.start_evaluation()
    try:
        forward = _timed(model.encode)[0]
        users = torch.arange(min(block, ds.n_users))
        parts = model.plane_ranking_inputs(users)
        heads = gates = 0.0
        scores = torch.empty(users.numel(), model.n_items)
        for rows, at, item_parts in model.ranking_blocks(parts):
            item_logits = item_parts["item_logits"]
            t0 = time.perf_counter()
            y = model.block_expert_scores(parts, rows, item_parts)
            t1 = time.perf_counter()
            scores[rows, at:at + item_logits.shape[1]] = topk_softmax_mix(y, parts["user_logits"][:, rows], item_logits,
                                                                          model.top_k)
            heads, gates = heads + t1 - t0, gates + time.perf_counter() - t1
        train = ds.train_matrix.tocsr()[users.numpy()].tocoo()

        def rank():
            s = scores.clone()
            s[torch.from_numpy(train.row).long(), torch.from_numpy(train.col).long()] = -torch.inf
            return torch.topk(s, 20, dim=1)
        topk = _timed(rank)[0]
    finally:
        model.end_evaluation()
    return {"forward (once per pass)": 1000 * forward, "expert scores y_e (bmm), per block": 1000 * heads,
            "router Top-K gates + mix, per block": 1000 * gates, "mask + top-K, per block": 1000 * topk}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="baby_synth")
    p.add_argument("--train-batches", type=int, default=10, help="timed training steps per model")
    p.add_argument("--eval-passes", type=int, default=1, help="timed full evaluation passes per model")
    p.add_argument("--fanout", type=int, default=10, help="F of the sampled MAGNET-DV row (0: no such row)")
    p.add_argument("--resample-steps", type=int, default=1,
                   help="fanout_resample_steps of the sampled row (1: a new draw every step, the default; 0: per epoch)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default, all cores)")
    p.add_argument("--knn-k", type=int, default=None,
                   help="k of E+'s kNN lists (default: 20, Baby's Table 3 value, on baby_synth; the dataset's config "
                        "elsewhere; 0: the config's)")
    p.add_argument("--expansion-r", type=int, default=None,
                   help="r of E+ (default: 150, Baby's Table 3 value, on baby_synth; the dataset's config elsewhere; "
                        "0: the config's, 30 on the synthetic sets)")
    p.add_argument("--data-path", default=str(ROOT / "data"))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    # baby_synth is measured with Baby's graph (its Table 3 block in MAGNET.yaml), the cost a `-d baby` run pays
    baby = load_config("MAGNET", "baby") if a.dataset == "baby_synth" else {"knn_k": 0, "expansion_r": 0}
    a.knn_k = int(baby["knn_k"]) if a.knn_k is None else a.knn_k
    a.expansion_r = int(baby["expansion_r"]) if a.expansion_r is None else a.expansion_r
    magnet_graph = graph_sets(a.knn_k, a.expansion_r)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if a.child:
        print(json.dumps(build_child(a.dataset, a.cache_dir, a.data_path, magnet_graph)))
        return
    from utils.synth import PRESETS, ensure_dataset

    if a.dataset in PRESETS:
        ensure_dataset(Path(a.data_path), a.dataset)
    with tempfile.TemporaryDirectory(prefix="bench_magnet_") as cache:
        cold = run_child(a.dataset, cache, a.data_path, a.threads, a.knn_k, a.expansion_r)
        warm = run_child(a.dataset, cache, a.data_path, a.threads, a.knn_k, a.expansion_r)
        graph_note = ", ".join(f"{k} {v}" for k, v in magnet_graph.items()) or "config k, r"
        print(f"E+ on {a.dataset} ({graph_note}): {cold['edges']:,} induced edges")
        print(f"  build (cold, kNN + E+): {cold['seconds']:8.2f} s   peak +{cold['peak_mib']:8.1f} MiB")
        print(f"  load  (warm, cache)   : {warm['seconds']:8.2f} s   peak +{warm['peak_mib']:8.1f} MiB  "
              f"(hits {warm['cache_hits']}, misses {warm['cache_misses']})", flush=True)
        sets = {"cache_dir": cache, "data_path": a.data_path, "num_threads": a.threads}
        variants = [("LightGCN", "LightGCN", {}), ("MAGNET-DV", "MAGNET", {"view": "DV", "fanout": 0})]
        if a.fanout > 0:
            every = {0: "per epoch", 1: "every step"}.get(a.resample_steps, f"every {a.resample_steps} steps")
            variants.append((f"MAGNET-DV F={a.fanout} {every}", "MAGNET",
                             {"view": "DV", "fanout": a.fanout, "fanout_resample_steps": a.resample_steps}))
        variants.append(("MAGNET-SV", "MAGNET", {"view": "SV", "fanout": 0}))
        rows = {}
        for label, model, extra in variants:
            sampled = extra.get("fanout", 0) > 0
            graph_extra = magnet_graph if model == "MAGNET" else {}
            rows[label] = time_model(model, a.dataset, {**sets, **graph_extra, **extra}, a.train_batches,
                                     0 if sampled else a.eval_passes)
            if sampled:  # evaluation propagates on the full graph: the same pass as MAGNET-DV's
                rows[label]["eval_s"] = rows["MAGNET-DV"]["eval_s"]
            print(f"  timed {label}", flush=True)
    base = rows["LightGCN"]
    print(f"\n{a.dataset}, {torch.get_num_threads()} CPU thread(s); epoch = mean of {a.train_batches} steps x steps "
          f"per epoch (+ the per-epoch sample); eval = one full `evaluate` pass on the validation split\n")
    print("| model | batch | s/epoch | x LightGCN | s/eval pass | x LightGCN |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        batch = 2048 if name == "LightGCN" else 1024
        print(f"| {name} | {r['batches_per_epoch']} x {batch} | {r['epoch_s']:.2f} "
              f"| {r['epoch_s'] / base['epoch_s']:.2f} "
              f"| {r['eval_s']:.2f} | {r['eval_s'] / base['eval_s']:.2f} |")
    names = [n for n in rows if n != "LightGCN"]
    print("\nTraining step, ms (forward + backward unless noted)\n")
    print("| phase | LightGCN | " + " | ".join(names) + " |\n|---|" + "---|" * (len(names) + 1))
    keys = list(dict.fromkeys(k for r in rows.values() for k in r["train_phases_ms"]))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{rows[n]['train_phases_ms'][k]:.1f}" if k in rows[n]["train_phases_ms"]
                                      else "" for n in rows) + " |")
    print("\nFull ranking, ms\n")
    ev = [n for n in names if "F=" not in n]  # fanout changes training only
    print("| phase | " + " | ".join(ev) + " |\n|---|" + "---|" * len(ev))
    for k in rows[ev[0]]["eval_phases_ms"]:
        print(f"| {k} | " + " | ".join(f"{rows[n]['eval_phases_ms'][k]:.1f}" for n in ev) + " |")
    print(json.dumps({"dataset": a.dataset, "threads": torch.get_num_threads(), "cold": cold, "warm": warm,
                      "timing": rows}))


if __name__ == "__main__":
    main()
