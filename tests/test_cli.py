"""The command line: clear one-line errors before any training starts."""
from tests.helpers import run_cli as _main


def test_missing_amazon_data_exits_nonzero_with_instructions(tmp_path):
    res = _main("-m", "BPR", "-d", "baby", "--set", f"data_path={tmp_path}", "--out", str(tmp_path / "run"))
    assert res.returncode != 0
    assert str(tmp_path / "baby") in res.stderr and "baby.inter" in res.stderr
    assert "drive.google.com" in res.stderr
    assert "Traceback" not in res.stderr


def test_unknown_key_and_model_suggest_a_fix():
    res = _main("-m", "LightGCN", "-d", "mini", "--set", "n_layer=3")
    assert res.returncode == 2 and "did you mean 'n_layers'" in res.stderr
    res = _main("-m", "LightGNC", "-d", "mini")
    assert res.returncode == 2 and "did you mean 'LightGCN'" in res.stderr


def test_show_prints_resolved_config():
    res = _main("show", "-m", "LightGCN", "-d", "mini", "--set", "n_layers=3")
    assert res.returncode == 0 and "n_layers: 3" in res.stdout


def test_ctrl_c_keeps_the_run_and_prints_the_resume_command(tmp_path, monkeypatch, capsys):
    """Ctrl-C during training: exit 130, no traceback, the folder and the exact --resume command."""
    import main as cli
    from mmrec import quick_start

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(quick_start, "train_one", interrupted)
    out = tmp_path / "run"
    rc = cli.main(["-m", "BPR", "-d", "mini", "--out", str(out), "--set", "num_threads=1"])
    err = capsys.readouterr().err
    assert rc == 130
    assert f"python main.py --resume {out}" in err and "last.pth" in err
    assert "Traceback" not in err


def test_out_refuses_another_run_unless_overwrite_and_failed_runs_are_marked(tmp_path, monkeypatch, capsys):
    import main as cli
    from mmrec import quick_start

    out = tmp_path / "run"
    out.mkdir()
    (out / "result.json").write_text("{}")
    rc = cli.main(["-m", "BPR", "-d", "mini", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and f"--resume {out}" in err and "--overwrite" in err
    assert (out / "result.json").read_text() == "{}"  # untouched

    def broken_fit(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(quick_start.Trainer, "fit", broken_fit)
    try:
        cli.main(["-m", "BPR", "-d", "mini", "--out", str(out), "--overwrite", "--set", "num_threads=1"])
    except RuntimeError:
        pass
    assert not (out / "result.json").exists()  # the old result is gone, the new run is marked failed
    assert (out / "FAILED").read_text().startswith("RuntimeError: boom")


def test_resume_alone_continues_and_extends_a_run_and_rejects_contradictions(tmp_path):
    """`--resume DIR` needs no -m/-d, takes more epochs with --set epochs=N, and refuses -m/-d or keys
    that contradict the saved run."""
    import json

    out = tmp_path / "bpr"
    common = ["--set", "num_threads=1", "--set", f"cache_dir={tmp_path / 'cache'}"]
    first = _main("-m", "BPR", "-d", "mini", "--set", "epochs=1", "--out", str(out), *common)
    assert first.returncode == 0, first.stderr
    assert json.loads((out / "result.json").read_text())["epochs_run"] == 1
    extended = _main("--resume", str(out), "--set", "epochs=2", "--set", "num_threads=1")
    assert extended.returncode == 0, extended.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["epochs_run"] == 2 and result["model"] == "BPR"
    wrong_model = _main("-m", "LightGCN", "--resume", str(out))
    assert wrong_model.returncode == 2 and "contradicts" in wrong_model.stderr
    changed = _main("--resume", str(out), "--set", "learning_rate=0.1")
    assert changed.returncode == 2 and "learning_rate" in changed.stderr and "Traceback" not in changed.stderr
    missing = _main("-m", "BPR")
    assert missing.returncode == 2 and "--resume DIR" in missing.stderr


def test_a_models_own_key_check_is_one_line_with_exit_2_before_loading(tmp_path):
    """A model's declared values and cross-key rules are checked before any data is read: the dataset
    here does not exist, so a check that ran after loading would report the missing data instead."""
    absent = ["-d", "no_such_data", "--set", f"data_path={tmp_path}", "--out", str(tmp_path / "run")]
    cases = {("K=20",): "K=20 must lie in 1..E, but the expert pool has E=9",
             ("K=0",): "K=0 (--set): expected an integer >= 1",
             ("view=XX",): "view='XX' (--set): expected one of DV, SV",
             ("families=[bal]",): "K=4 must lie in 1..E, but the expert pool has E=3",
             ("families=[]",): "families=[] (--set): expected a non-empty list drawn from dom, bal, com",
             ("dropout=1.5",): "dropout=1.5 (--set): expected a number in [0, 0.99]"}
    for sets, message in cases.items():
        res = _main("-m", "MAGNET", *absent, *(x for s in sets for x in ("--set", s)))
        assert res.returncode == 2 and message in res.stderr, (sets, res.stderr)
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing was created either
    grid = _main("grid", "-m", "MAGNET", *absent, "--set", "K=[2, 20]", "--set", "lambda_r=0.3")
    assert grid.returncode == 2 and "K=20 must lie in 1..E" in grid.stderr and "grid point {'K': 20}" in grid.stderr


def test_own_model_from_a_file_with_its_own_config_yaml(tmp_path):
    """docs/models.md's example: a model outside models/, its own keys in a --config yaml."""
    import json

    out = tmp_path / "toy"
    res = _main("-m", "docs/examples/toy_mf.py:ToyMF", "-d", "mini", "--config", "docs/examples/toy_mf.yaml",
                "--set", "epochs=1", "--set", "num_threads=1", "--set", f"cache_dir={tmp_path / 'cache'}",
                "--out", str(out))
    assert res.returncode == 0, res.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["model"] == "ToyMF" and result["config"]["toy_reg"] == 1e-4
    assert result["config"]["stopping_step"] == 10 and result["config"]["embedding_size"] == 32
    assert "user_norm" in result["history"][0]
    negative = _main("-m", "docs/examples/toy_mf.py:ToyMF", "-d", "mini", "--config", "docs/examples/toy_mf.yaml",
                     "--set", "toy_reg=-1", "--out", str(tmp_path / "neg"))
    assert negative.returncode == 2 and "toy_reg=-1.0 (--set): expected a number >= 0" in negative.stderr
    missing = _main("-m", "nosuchpkg.mod:Model", "-d", "mini")
    assert missing.returncode == 2 and "PYTHONPATH" in missing.stderr and "Traceback" not in missing.stderr


def test_a_content_model_without_a_feature_file_stops_before_loading(tmp_path):
    res = _main("-m", "MAGNET", "-d", "mini", "--set", "vision_feature_file=null", "--out", str(tmp_path / "run"))
    assert res.returncode == 2 and "vision_feature_file=None: MAGNET needs both" in res.stderr
    assert "Traceback" not in res.stderr and "users" not in res.stderr  # nothing was loaded


def test_a_model_file_is_imported_once():
    """The trainer and the dataset both look the model up: they must get the same class."""
    from mmrec.registry import get_model

    first = get_model("docs/examples/toy_mf.py:ToyMF")
    assert get_model("docs/examples/toy_mf.py:ToyMF") is first
