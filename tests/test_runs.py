"""Comparisons and grids: the results store, kills and reruns, parallel workers, Ray, the tables."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mmrec.results import (ResultStore, compare_table, paired_bootstrap, paired_t_test, selection_summary, to_latex,
                           to_markdown)
from tests.helpers import ROOT, run_cli



def _main(*args):
    """The command in this process (see tests/helpers.run_cli)."""
    return run_cli(*args)


def _spawn(*args) -> subprocess.Popen:
    """The command as its own process, for the tests that kill it mid-way."""
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _data(tmp_path):
    return ["--set", f"data_path={tmp_path / 'data'}", "--set", f"cache_dir={tmp_path / 'cache'}",
            "--set", "num_threads=1"]


def _stored(folder: Path) -> list[dict]:
    if not (folder / "results.lmdb").exists():
        return []
    return ResultStore(folder, readonly=True).records()


def _kill_when(proc, path_glob: str, folder: Path, timeout: float = 240, kill: bool = True) -> None:
    """SIGKILL the run as soon as a file matching ``path_glob`` appears under ``folder`` (a later job has
    begun training), i.e. mid-way through the comparison or grid."""
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if any(folder.glob(path_glob)):
            if kill:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            return
        time.sleep(0.05)
    raise AssertionError(f"{path_glob} never appeared before the run ended: {proc.stderr.read() if proc.stderr else ''}")


def test_compare_killed_and_rerun_holds_every_run_once_and_writes_every_format(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "-m", "BPR,LightGCN", "-d", "tiny", "--splits", "2", "--set", "epochs=60",
            "--set", "stopping_step=60", *_data(tmp_path), "--out", str(out)]
    proc = _spawn(*args)
    _kill_when(proc, "tiny/BPR-split672/last.pth", out, kill=False)  # the first run is stored
    live = _main("results", str(out))  # read while the comparison goes on
    assert live.returncode == 0 and "| BPR |" in live.stdout, live.stderr
    assert proc.poll() is None, "the comparison ended before it could be killed: give its runs more epochs"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = _stored(out)
    assert len(first) < 4
    done = _main(*args)
    assert done.returncode == 0, done.stderr
    records = _stored(out)
    assert len(records) == 4 and len({r["key"] for r in records}) == 4
    assert {(r["model"], r["split_seed"]) for r in records} == {(m, s) for m in ("BPR", "LightGCN") for s in (9, 672)}
    for r in first:  # a run stored before the kill was not trained again
        again = next(x for x in records if x["key"] == r["key"])
        assert again["test"] == r["test"]
    log = (out / "log.txt").read_text()
    assert f"{len(first)} already in the results store, {4 - len(first)} to run" in log.split("compare: 4 runs")[-1]
    for ext in ("md", "csv", "tex", "json"):
        assert (out / f"compare.{ext}").stat().st_size > 0
    table = json.loads((out / "compare.json").read_text())
    assert len(table["runs"]) == 4 and all(len(r["config_hash"]) == 16 for r in table["runs"])
    assert "Test metrics at the best validation epoch" in (out / "compare.md").read_text()
    assert r"\textbf{" in (out / "compare.tex").read_text()
    shown = _main("results", str(out))
    assert shown.returncode == 0 and "LightGCN" in shown.stdout and "s/epoch" in shown.stdout
    _check_paired_column(out, records)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    bars = _main("plot", str(out))
    assert bars.returncode == 0 and (out / "compare_bars.png").stat().st_size > 5000, bars.stderr


def _check_paired_column(out: Path, records: list[dict]) -> None:
    """``results --paired``: each model against the best per test user, read from the saved top-K lists.
    Every tiny user has test items in both splits, so the mean of the users' gaps (each averaged over the
    two splits) is the mean of the two test gaps the evaluator reported."""
    from mmrec.diagnostics import paired_against_best

    mean = {m: np.mean([r["test"]["ndcg@20"] for r in records if r["model"] == m]) for m in ("BPR", "LightGCN")}
    best, other = sorted(mean, key=mean.get, reverse=True)
    got = paired_against_best(records)[("tiny", other)]
    users = {r["tag"]: {line.split("\t")[0] for line in
                        (Path(r["result_path"]).parent / "topk_test.tsv").read_text().splitlines()[1:]}
             for r in records}
    assert users["split9"] == users["split672"]
    by = {(r["model"], r["tag"]): r["test"]["ndcg@20"] for r in records}
    want = np.mean([by[(other, t)] - by[(best, t)] for t in users])
    assert got["best"] == best and got["runs"] == 2 and got["users"] == len(users["split9"])
    assert got["diff"] == pytest.approx(want, abs=1e-9) and got["low"] <= got["diff"] <= got["high"]
    shown = _main("results", str(out), "--paired")
    assert shown.returncode == 0, shown.stderr
    assert "tiny ndcg@20 vs best" in shown.stdout and f"| {got['diff']:+.4f} [" in shown.stdout
    assert "bootstrap interval over the test users" in shown.stdout
    (Path(records[0]["result_path"]).parent / "topk_test.tsv").unlink()
    missing = _main("results", str(out), "--paired")
    assert missing.returncode == 2 and "topk_test.tsv: missing" in missing.stderr and "save_topk" in missing.stderr


def test_grid_killed_and_resumed_matches_an_uninterrupted_grid(tmp_path):
    args = ["grid", "-m", "LightGCN", "-d", "tiny", "--set", "n_layers=[1, 2, 3]", "--set", "learning_rate=0.001",
            "--set", "reg_weight=0.0001", "--set", "epochs=30", "--set", "stopping_step=30", *_data(tmp_path)]
    whole = _main(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    cut = tmp_path / "cut"
    proc = _spawn(*args, "--out", str(cut))
    _kill_when(proc, "grid/001-*/last.pth", cut)  # the second point is training: it resumes from last.pth
    assert len(_stored(cut)) < 3
    resumed = _main("grid", "--resume", str(cut))
    assert resumed.returncode == 0, resumed.stderr
    a = {json.dumps(r["point"]): r for r in _stored(tmp_path / "whole")}
    b = {json.dumps(r["point"]): r for r in _stored(cut)}
    assert len(b) == 3 and set(a) == set(b)
    for point in a:
        assert b[point]["test"] == a[point]["test"] and b[point]["valid"] == a[point]["valid"], point


def test_two_workers_lose_and_duplicate_nothing(tmp_path):
    base = ["compare", "-m", "BPR,LightGCN", "-d", "tiny", "--seeds", "1,2", "--set", "epochs=2", *_data(tmp_path)]
    serial = _main(*base, "--out", str(tmp_path / "serial"))
    parallel = _main(*base, "--workers", "2", "--out", str(tmp_path / "parallel"))
    assert serial.returncode == 0 and parallel.returncode == 0, parallel.stderr
    a, b = _stored(tmp_path / "serial"), _stored(tmp_path / "parallel")
    assert len(b) == 4 and {r["key"] for r in a} == {r["key"] for r in b}
    by_key = {r["key"]: r for r in a}
    for r in b:
        for m, v in r["test"].items():
            assert v == pytest.approx(by_key[r["key"]]["test"][m], abs=2e-3)


def test_ray_backend_gives_the_local_table(tmp_path):
    pytest.importorskip("ray")
    base = ["compare", "-m", "BPR", "-d", "tiny", "--seeds", "1,2", "--set", "epochs=2", *_data(tmp_path)]
    local = _main(*base, "--out", str(tmp_path / "local"))
    # Ray starts a local cluster in the calling process: run it as its own command, as a user would
    remote = subprocess.run([sys.executable, str(ROOT / "main.py"), *base, "--backend", "ray", "--workers", "2",
                             "--out", str(tmp_path / "ray")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    a = {r["key"]: r["test"] for r in _stored(tmp_path / "local")}
    b = {r["key"]: r["test"] for r in _stored(tmp_path / "ray")}
    assert set(a) == set(b) and len(b) == 2
    for key in a:
        assert b[key] == pytest.approx(a[key], abs=2e-3)


def test_bad_requests_fail_fast_with_one_line(tmp_path):
    cases = [(["compare", "-m", "BPR,LightGNC", "-d", "tiny"], "did you mean 'LightGCN'"),
             (["compare", "-m", "BPR", "-d", "tiny,minii"], "Did you mean 'mini'?"),
             (["compare", "-m", "BPR", "-d", "tiny", "--splits", "0"], "--splits 0: expected 1..5"),
             (["compare", "-m", "BPR", "-d", "tiny", "--workers", "0"], "--workers 0: expected an integer >= 1"),
             (["grid", "-m", "LightGCN", "-d", "tiny", "--set", "n_layer=[1, 2]"], "did you mean 'n_layers'")]
    for args, message in cases:
        res = _main(*args, "--set", f"data_path={tmp_path / 'data'}", "--out", str(tmp_path / "x"))
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def _rec(model, ds, tag, n20, r20=0.1):
    return {"kind": "compare", "model": model, "dataset": ds, "tag": tag,
            "test": {"recall@20": r20, "ndcg@20": n20}, "efficiency": {"seconds_per_epoch": 1.0}}


def test_table_marks_best_and_second_and_runs_the_paired_test():
    recs = [_rec("A", "d", f"s{i}", 0.30 + 0.01 * i) for i in range(3)]
    recs += [_rec("B", "d", f"s{i}", 0.20 + 0.012 * i) for i in range(3)]
    recs += [_rec("C", "d", f"s{i}", 0.10) for i in range(3)]
    table = compare_table(recs, metrics=("recall@20", "ndcg@20"))
    assert table["ranks"][("d", "ndcg@20")] == ["A", "B"]
    cell = table["cells"][("d", "A")]
    assert cell["runs"] == 3 and cell["ndcg@20"][0] == pytest.approx(0.31)
    test = table["tests"]["d"]
    assert test["best"] == "A" and test["runner_up"] == "B" and test["pairs"] == 3
    # differences 0.10, 0.098, 0.096: mean 0.098, sd 0.002 -> t = 84.87 on 2 df
    assert test["p_value"] == pytest.approx(1.388e-4, rel=1e-2)
    md = to_markdown(table)
    assert "**0.3100 ± 0.0100†**" in md and "<u>0.2120 ± 0.0120</u>" in md
    assert r"\underline{0.2120 $\pm$ 0.0120}" in to_latex(table)
    assert paired_t_test([1.0], [0.5]) is None


def test_paired_bootstrap_interval_over_users():
    same = paired_bootstrap([0.02] * 50)  # every user 0.02 ahead: no spread, A ahead in every resample
    assert same == {"diff": pytest.approx(0.02), "low": pytest.approx(0.02), "high": pytest.approx(0.02),
                    "a_ahead": 1.0}
    rng = np.random.default_rng(1)
    d = rng.normal(0.0, 1.0, 4000)
    got = paired_bootstrap(d, resamples=1000)
    half = 1.96 * d.std(ddof=1) / np.sqrt(d.size)  # the normal interval of a mean, for a large sample
    assert got["diff"] == pytest.approx(d.mean())
    assert got["high"] - got["low"] == pytest.approx(2 * half, rel=0.15)
    assert got["low"] < got["diff"] < got["high"]
    with pytest.raises(ValueError, match="one difference per user"):
        paired_bootstrap([])


def test_selection_summary_measures_the_chosen_value_against_its_curve(tmp_path):
    values = [0.1, 0.3, 0.2, 0.5, 0.4, 0.4, 0.1]
    history = [{"epoch": e, "valid": {"ndcg@20": v}} for e, v in enumerate(values)] + [{"epoch": 7}]
    got = selection_summary(history, "ndcg@20", best_epoch=3, side=2, span=10)
    steps = np.diff(values)
    assert got["best_epoch"] == 3 and got["best"] == 0.5 and got["evaluations"] == 7
    assert got["neighbours"] == pytest.approx((0.3 + 0.2 + 0.4 + 0.4) / 4)
    assert got["overshoot"] == pytest.approx(0.5 - 0.325) and got["roughness"] == pytest.approx(steps.std())
    tie = selection_summary([{"epoch": e, "valid": {"m@1": v}} for e, v in enumerate([0.2, 0.5, 0.5])], "m@1")
    assert tie["best_epoch"] == 1 and tie["neighbours"] == pytest.approx(0.35)  # the first maximum
    assert selection_summary(history, "recall@20") is None
    from mmrec.diagnostics import selection_table

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text(json.dumps(
        {"model": "M", "best_epoch": 3, "config": {"valid_metric": "ndcg@20"}, "history": history}))
    assert "| M (run) | ndcg@20 | 3 / 7 | 0.5000 |" in selection_table([tmp_path / "run"])


def test_store_survives_reopen_and_keeps_one_record_per_key(tmp_path):
    store = ResultStore(tmp_path)
    store.put("k1", {"a": 1})
    store.put("k1", {"a": 2})
    store.put("k2", {"a": 3})
    assert len(store) == 2 and store.get("k1") == {"a": 2}
    with pytest.raises(FileNotFoundError, match="holds no results.lmdb"):
        ResultStore(tmp_path / "nothing", readonly=True)


def test_recommend_writes_top_k_with_original_ids_and_no_training_items(tmp_path):
    import numpy as np

    run = tmp_path / "run"
    res = _main("-m", "BPR", "-d", "tiny", "--set", "epochs=2", *_data(tmp_path), "--out", str(run))
    assert res.returncode == 0, res.stderr
    folder = tmp_path / "data" / "tiny"
    inter = np.loadtxt(folder / "tiny.inter", skiprows=1, dtype=np.int64)
    n_users, n_items = inter[:, 0].max() + 1, inter[:, 1].max() + 1
    (folder / "u_id_mapping.csv").write_text("user_id\tuserID\n" + "".join(f"U{u}\t{u}\n" for u in range(n_users)))
    (folder / "i_id_mapping.csv").write_text("asin\titemID\n" + "".join(f"B{i}\t{i}\n" for i in range(n_items)))
    (tmp_path / "users.txt").write_text("U3\nU7\n")
    res = _main("recommend", str(run), "--k", "5", "--users", str(tmp_path / "users.txt"))
    assert res.returncode == 0, res.stderr
    rows = [line.split("\t") for line in (run / "recommendations_top5.tsv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == ["U3"] * 5 + ["U7"] * 5 and [r[1] for r in rows[:5]] == list("12345")
    train = {(int(u), int(i)) for u, i, *_, label in inter if label == 0}
    for user, _, item, _ in rows:
        assert item.startswith("B") and (int(user[1:]), int(item[1:])) not in train
    scores = [float(r[3]) for r in rows[:5]]
    assert scores == sorted(scores, reverse=True)
    (tmp_path / "bad.txt").write_text("U3\nnobody\n")
    bad = _main("recommend", str(run), "--users", str(tmp_path / "bad.txt"))
    assert bad.returncode == 2 and "'nobody'" in bad.stderr and "u_id_mapping.csv" in bad.stderr
