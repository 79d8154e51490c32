"""Routing statistics against hand computation, and the analyse / explain / plot commands."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from mmrec.analysis import (activity_terciles, channel_share, diversity, group_family_mass, pair_attribution,
                            routing_profile, visibility, visibility_bucket)
from tests.helpers import run_cli as _main

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["Dom-B", "Dom-A", "Dom-S", "Bal-B", "Bal-A", "Bal-S", "Com-B", "Com-A", "Com-S"]


def test_eq_34_statistics_by_hand():
    stats = diversity(np.array([0.5, 0.25, 0.25]))
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # 1.0397
    assert stats["entropy"] == pytest.approx(h)
    assert stats["n_eff"] == pytest.approx(math.exp(h)) and stats["n_eff"] == pytest.approx(2 * math.sqrt(2))
    assert stats["hhi"] == pytest.approx(0.375) and stats["div"] == pytest.approx(h / math.log(3))
    uniform = diversity(np.full(9, 1 / 9))
    assert uniform["n_eff"] == pytest.approx(9) and uniform["div"] == pytest.approx(1) and uniform["hhi"] == pytest.approx(1 / 9)


def test_profile_group_and_family_masses_by_hand():
    pi = np.zeros((2, 9))
    pi[0, 0], pi[0, 4], pi[0, 8] = 0.6, 0.3, 0.1          # Dom-B, Bal-A, Com-S
    pi[1, 0], pi[1, 7] = 0.2, 0.8                          # Dom-B, Com-A
    prof = routing_profile(pi, NAMES)
    assert prof["pi_bar"][0] == pytest.approx(0.4) and prof["pi_bar"][7] == pytest.approx(0.4)
    assert prof["modality_reliance"] == pytest.approx({"B": 0.4, "A": 0.55, "S": 0.05, "A+S": 0.6})
    assert prof["family_composition"] == pytest.approx({"Dom": 0.4, "Bal": 0.15, "Com": 0.45})
    assert prof["hhi"] == pytest.approx(0.4 ** 2 + 0.15 ** 2 + 0.4 ** 2 + 0.05 ** 2)
    grid = group_family_mass(pi[0], NAMES)
    assert grid.sum() == pytest.approx(1.0) and grid[0, 0] == pytest.approx(0.6) and grid[1, 1] == pytest.approx(0.3)
    att = pair_attribution(pi[1], NAMES, top=2)
    assert att["top_experts"] == [("Com-A", 0.8), ("Dom-B", 0.2)]
    assert att["modality_mass"] == pytest.approx({"B": 0.2, "A": 0.8, "S": 0.0})
    # replicas share their template's cell
    assert group_family_mass(np.array([0.5, 0.5]), ["Dom-B#0", "Dom-B#1"])[0, 0] == pytest.approx(1.0)


def test_channel_share_weights_the_blends_by_routing_mass():
    blends = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    share = channel_share([0.5, 0.5, 0.0], blends)
    assert share == pytest.approx({"B": 0.45, "A": 0.45, "S": 0.1})
    split = np.array([[0.3, 0.5, 0.1, 0.1], [0.05, 0.05, 0.8, 0.1], [0.1, 0.0, 0.1, 0.8]])  # [z^UI, z^UIG, A, S]
    assert channel_share([1.0, 0.0, 0.0], split) == pytest.approx({"B": 0.8, "A": 0.1, "S": 0.1})


def test_visibility_buckets_and_activity_terciles_by_hand():
    v = visibility({1, 2, 3}, np.array([2, 5]), np.array([3, 1]), k=2)
    assert v == pytest.approx(0.75) and visibility_bucket(v) == "Easy"
    assert visibility_bucket(visibility({1}, np.array([2, 5]), np.array([1, 7]), k=2)) == "Medium"  # 1/4
    assert visibility_bucket(visibility({9}, np.array([2, 5]), np.array([1, 7]), k=2)) == "Hard"
    assert visibility_bucket(0.5) == "Easy"
    labels = activity_terciles(np.array([5, 1, 9, 3, 7, 2]))
    assert labels.tolist() == ["Mid", "Tail", "Head", "Mid", "Head", "Tail"]


def test_analyse_explain_plot_on_a_magnet_run(tmp_path):
    pytest.importorskip("matplotlib")
    data = ["--set", f"data_path={tmp_path / 'data'}", "--set", f"cache_dir={tmp_path / 'cache'}",
            "--set", "num_threads=1", "--set", "epochs=2"]
    run = tmp_path / "magnet"
    res = _main("-m", "MAGNET", "-d", "tiny", *data, "--set", "knn_k=5", "--set", "expansion_r=10",
                "--set", "routing_trace_every=1", "--out", str(run))
    assert res.returncode == 0, res.stderr
    res = _main("analyse", str(run))
    assert res.returncode == 0, res.stderr
    report = json.loads((run / "analysis" / "analysis.json").read_text())
    prof = report["profile"]
    assert sum(prof["pi_bar"]) == pytest.approx(1.0, abs=1e-5) and 1.0 <= prof["n_eff"] <= 9.0
    assert sum(prof["family_composition"].values()) == pytest.approx(1.0, abs=1e-5)
    assert sum(prof["channel_share"].values()) == pytest.approx(1.0, abs=1e-5)  # the learned blends, routed
    trace = [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]
    assert [r["step"] for r in trace] == list(range(1, len(trace) + 1)) and {"top3_mass", "top1_top2_gap", "hhi_norm", "stage"} <= set(trace[0])
    assert all(0 <= r["hhi_norm"] <= 1 and r["top1_top2_gap"] >= 0 for r in trace)
    for name in ("expert_usage", "modality_reliance", "family_composition", "routing_dynamics", "valid_vs_time",
                 "routing_trace"):
        assert (run / "analysis" / f"{name}.png").stat().st_size > 5000, name
    res = _main("explain", str(run), "--user", "3", "--topk", "4")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("\n| ") == 5 and (run / "explain" / "user_3.png").exists()
    pairs = json.loads((run / "explain" / "user_3.json").read_text())["pairs"]
    assert len(pairs) == 4 and all(sum(map(sum, p["mass"])) == pytest.approx(1.0, abs=1e-5) for p in pairs)
    assert all(sum(p["channel_share"].values()) == pytest.approx(1.0, abs=1e-5) for p in pairs)
    header = next(line for line in res.stdout.splitlines() if line.startswith("| rank |")).split("|")
    first = next(line for line in res.stdout.splitlines() if line.startswith("| 1 |")).split("|")
    for c in ("B", "A", "S"):  # the printed channel share is the JSON's
        assert float(first[header.index(f" ch {c} ")]) == pytest.approx(pairs[0]["channel_share"][c], abs=0.006)
    unknown = _main("explain", str(run), "--user", "100000")
    assert unknown.returncode == 2 and "'100000'" in unknown.stderr and len(unknown.stderr.strip().splitlines()) == 1
    bpr = tmp_path / "bpr"
    assert _main("-m", "BPR", "-d", "tiny", *data, "--out", str(bpr)).returncode == 0
    no_router = _main("explain", str(bpr), "--user", "3")
    assert no_router.returncode == 2 and "has no router" in no_router.stderr
    plots = _main("plot", str(run), str(bpr), "--out", str(tmp_path / "plots"))
    assert plots.returncode == 0 and (tmp_path / "plots" / "valid_metrics.png").exists()


def test_pair_visibility_matches_the_definition():
    import scipy.sparse as sp

    from mmrec.analysis import pair_visibility

    rng = np.random.default_rng(0)
    train = sp.csr_matrix((np.ones(40), (rng.integers(0, 6, 40), rng.integers(0, 12, 40))), shape=(6, 12))
    train.data[:] = 1.0
    lists = {m: np.stack([rng.choice(np.delete(np.arange(12), i), 3, replace=False) for i in range(12)])
             for m in ("v", "t")}
    users, items = rng.integers(0, 6, 30), rng.integers(0, 12, 30)
    got = pair_visibility(train, users, items, lists, 3)
    want = [visibility(set(train[u].indices.tolist()), lists["v"][i], lists["t"][i], 3) for u, i in zip(users, items)]
    np.testing.assert_allclose(got, want)


def test_pair_ndcg_sums_to_the_evaluators_ndcg_and_dv_sv_buckets_cover_every_pair(tmp_path):
    pytest.importorskip("matplotlib")
    import utils.synth  # noqa: F401
    from mmrec.diagnostics import pair_ndcg
    from mmrec.evaluation import evaluate
    from mmrec.quick_start import load_trained

    data = ["--set", f"data_path={tmp_path / 'data'}", "--set", f"cache_dir={tmp_path / 'cache'}",
            "--set", "num_threads=1", "--set", "epochs=1", "--set", "knn_k=5", "--set", "expansion_r=10"]
    for view in ("DV", "SV"):
        assert _main("-m", "MAGNET", "-d", "tiny", *data, "--set", f"view={view}",
                     "--out", str(tmp_path / view)).returncode == 0
    _, dataset, model = load_trained(tmp_path / "DV")
    users, _, contrib = pair_ndcg(model, dataset)
    per_user = np.bincount(users, weights=contrib)[np.unique(users)]
    want = evaluate(model, dataset, "test", [20], ["ndcg"])["metrics"]["ndcg@20"]
    assert per_user.mean() == pytest.approx(want, rel=1e-5)
    sv_metrics = evaluate(load_trained(tmp_path / "SV")[2], dataset, "test", [20], ["recall", "ndcg"])["metrics"]
    res = _main("paired", str(tmp_path / "DV"), str(tmp_path / "SV"), "--resamples", "200")
    assert res.returncode == 0, res.stderr
    row = next(line for line in res.stdout.splitlines() if line.startswith("| ndcg@20 |")).split("|")
    assert float(row[2]) == pytest.approx(want, abs=1e-4)
    assert float(row[3]) == pytest.approx(sv_metrics["ndcg@20"], abs=1e-4)
    assert float(row[4]) == pytest.approx(want - sv_metrics["ndcg@20"], abs=2e-4)
    low, high = (float(x) for x in row[5].strip(" []").split(","))
    assert low <= float(row[4]) <= high
    saved = tmp_path / "SV" / "config.yaml"  # a run saved before a key existed still loads, at today's default
    saved.write_text("".join(line for line in saved.read_text().splitlines(keepends=True)
                             if not line.startswith("template_prior:")))
    assert load_trained(tmp_path / "SV")[0]["template_prior"] == 0.0
    res = _main("analyse", "--dv", str(tmp_path / "DV"), "--sv", str(tmp_path / "SV"))
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "DV" / "analysis" / "dv_sv.json").read_text())
    n_test = dataset.test_matrix.nnz
    assert sum(b["pairs"] for b in report["visibility"].values()) == n_test
    assert sum(b["pairs"] for b in report["activity"].values()) == n_test
