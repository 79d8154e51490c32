"""Early stopping (MMRec's rule), resume equal to an uninterrupted run, NaN handling, outputs."""
import json
import math

import pytest
import torch

from mmrec.quick_start import run, train_one
from mmrec.trainer import Trainer
from tests.helpers import tiny_setup


@pytest.mark.parametrize("weight_averaging", [0.0, 0.9])
def test_resume_reaches_the_same_result_as_an_uninterrupted_run(tmp_path, weight_averaging):
    sets = {"epochs": 6, "stopping_step": 100, "train_batch_size": 32, "weight_averaging": weight_averaging}
    cfg, ds = tiny_setup(tmp_path / "a", "LightGCN", overrides=sets)
    full = train_one(cfg, tmp_path / "full", ds)
    # interrupted after 3 epochs, then resumed to 6
    cfg2, ds2 = tiny_setup(tmp_path / "b", "LightGCN", overrides={**sets, "epochs": 3})
    train_one(cfg2, tmp_path / "part", ds2)
    cfg2["epochs"] = 6
    resumed = train_one(cfg2, tmp_path / "part", ds2, resume=True)
    assert resumed["epochs_run"] == 6
    assert resumed["best_epoch"] == full["best_epoch"]
    assert resumed["valid"] == full["valid"] and resumed["test"] == full["test"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]


class _Scripted(torch.nn.Module):
    """Stands in for a model: validation scores follow a script (for the stopping rule)."""


def test_early_stopping_follows_mmrec_rule(tmp_path, monkeypatch):
    cfg, ds = tiny_setup(tmp_path, "BPR", overrides={"epochs": 50, "stopping_step": 2, "checkpoint": False})
    from models.bpr import BPR

    trainer = Trainer(cfg, BPR(cfg, ds), ds, None)
    # rounded valid recall@20 per epoch: best at epoch 1; 0.30004 rounds to 0.3 (a tie, not better)
    script = iter([0.2, 0.3, 0.30004, 0.25, 0.29, 0.5])
    calls = []

    def fake_eval(split, keep_topk=0):
        if split == "valid":
            value = next(script)
            calls.append(value)
            return {"metrics": {k: value for k in _keys(cfg)}}
        return {"metrics": {k: -1.0 for k in _keys(cfg)}}

    monkeypatch.setattr(trainer, "_evaluate", fake_eval)
    res = trainer.fit()
    # epochs 2, 3, 4 do not improve; stopping_step 2 -> stop once 3 > 2 non-improving evaluations
    assert res["best_epoch"] == 1 and res["epochs_run"] == 5 and res["stopped_by"] == "early_stopping"
    assert calls == [0.2, 0.3, 0.30004, 0.25, 0.29]


def _keys(cfg):
    return [f"{m}@{k}" for m in cfg["metrics"] for k in cfg["topk"]]


def test_nan_loss_stops_with_message_and_keeps_best(tmp_path, monkeypatch):
    cfg, ds = tiny_setup(tmp_path, "BPR", overrides={"epochs": 5, "stopping_step": 10})
    from models.bpr import BPR

    model = BPR(cfg, ds)
    trainer = Trainer(cfg, model, ds, tmp_path)
    real = model.calculate_loss
    state = {"n": 0}

    def loss(batch):
        state["n"] += 1
        out = real(batch)
        if state["n"] > 2:  # the first epoch (a single batch here) finishes; then NaN
            out["bpr"] = out["bpr"] * math.nan
        return out

    monkeypatch.setattr(model, "calculate_loss", loss)
    res = trainer.fit()
    assert res["stopped_by"] == "diverged" and "loss is nan" in res["diverged"]
    assert res["best_epoch"] >= 0 and (tmp_path / "best.pth").exists()


def test_run_writes_outputs_and_custom_model_path(tmp_path):
    cfg_sets = {"epochs": 2, "train_batch_size": 64}
    # a researcher's model from anywhere: package.module:ClassName
    res = run("models.bpr:BPR", "mini", {**cfg_sets, "reg_weight": 1e-4}, tmp_path / "out", quiet=True)
    out = tmp_path / "out"
    data = json.loads((out / "result.json").read_text())
    for key in ("model", "dataset", "config", "best_epoch", "epochs_run", "valid", "test", "train_seconds",
                "seconds_per_epoch", "eval_seconds"):
        assert key in data
    assert "recall@20" in data["test"] and "ndcg@20" in data["test"]
    assert (out / "config.yaml").exists() and (out / "log.txt").exists() and (out / "best.pth").exists()
    lines = (out / "topk_test.tsv").read_text().splitlines()
    assert len(lines[1].split("\t")[1].split(",")) == 20
    assert res["result_path"].endswith("result.json")


def test_learning_rate_schedule_and_floor(tmp_path):
    cfg, ds = tiny_setup(tmp_path, "BPR", overrides={"learning_rate": 0.01, "learning_rate_scheduler": [0.5, 1],
                                                     "learning_rate_floor": 0.002})
    from models.bpr import BPR

    trainer = Trainer(cfg, BPR(cfg, ds), ds, None)
    lrs = []
    for _ in range(4):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.scheduler.step()
    assert lrs == pytest.approx([0.01, 0.005, 0.0025, 0.002])


def test_no_weight_decay_prefixes_get_zero_decay(tmp_path):
    from mmrec.trainer import build_optimizer
    from models.bpr import BPR

    cfg, ds = tiny_setup(tmp_path, "BPR", overrides={"weight_decay": 0.1})
    model = BPR(cfg, ds)
    assert [g["weight_decay"] for g in build_optimizer(cfg, model).param_groups] == [0.1]
    model.no_weight_decay = ("user_embedding",)
    groups = build_optimizer(cfg, model).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert groups[1]["params"][0] is model.user_embedding.weight


def test_reset_optimizer_each_epoch_restarts_adam_state(tmp_path):
    from models.bpr import BPR

    cfg, ds = tiny_setup(tmp_path, "BPR", overrides={"epochs": 2, "stopping_step": 10, "train_batch_size": 32,
                                                     "learning_rate_scheduler": [0.5, 1]})
    model = BPR(cfg, ds)
    model.reset_optimizer_each_epoch = True
    trainer = Trainer(cfg, model, ds, None)
    trainer.fit()
    steps = trainer.optimizer.state[model.user_embedding.weight]["step"]
    assert int(steps) == len(trainer.batches)  # only the second epoch's steps: state was rebuilt
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(cfg["learning_rate"] * 0.25)


def test_early_stopping_rule_is_a_pure_function():
    from mmrec.trainer import early_stopping

    assert early_stopping(0.2, 0.3, 4, 2) == (True, 0, False)     # better: counter resets
    assert early_stopping(0.3, 0.3, 0, 2) == (False, 1, False)    # a tie does not improve
    assert early_stopping(0.3, 0.25, 1, 2) == (False, 2, False)   # 2 evaluations without improvement
    assert early_stopping(0.3, 0.29, 2, 2) == (False, 3, True)    # the third: more than stopping_step
    assert early_stopping(0.3, 0.1, 0, 0) == (False, 1, True)     # patience 0 stops at the first miss


def test_max_steps_per_epoch_trains_that_many_batches(tmp_path, monkeypatch):
    """A partial epoch (smoke tests, benchmarks at Electronics scale): N calculate_loss calls per epoch."""
    from models.bpr import BPR

    cfg, ds = tiny_setup(tmp_path, "BPR", overrides={"epochs": 2, "train_batch_size": 16, "checkpoint": False,
                                                     "max_steps_per_epoch": 3})
    model = BPR(cfg, ds)
    calls = []
    original = model.calculate_loss
    monkeypatch.setattr(model, "calculate_loss", lambda batch: calls.append(1) or original(batch))
    trainer = Trainer(cfg, model, ds, None)
    result = trainer.fit()
    assert len(calls) == 6 and result["steps_per_epoch"] == 3
    assert result["batches_per_epoch"] == len(trainer.batches) > 3  # the full epoch would be longer
    assert all(0 < h["batch_seconds"] <= h["train_seconds"] for h in result["history"])  # batches within the epoch


@pytest.mark.parametrize("learner", ["adam", "adamw"])
def test_fused_optimizer_matches_the_foreach_path(tmp_path, learner):
    """optimizer_impl: fused (the default) takes the same steps as torch's foreach path, to float rounding."""
    from mmrec.trainer import build_optimizer
    from models.mgcn import MGCN
    from tests.helpers import BATCH

    params = []
    for impl in ("fused", "foreach"):
        cfg, ds = tiny_setup(tmp_path / impl, "MGCN", overrides={"learner": learner, "weight_decay": 0.01,
                                                                  "optimizer_impl": impl})
        torch.manual_seed(0)
        model = MGCN(cfg, ds)
        opt = build_optimizer(cfg, model)
        assert opt.defaults.get("fused") is (True if impl == "fused" else None)
        for _ in range(3):
            opt.zero_grad()
            sum(model.calculate_loss(BATCH).values()).backward()
            opt.step()
        params.append([p.detach().clone() for p in model.parameters()])
    for fused, foreach in zip(*params):
        torch.testing.assert_close(fused, foreach, rtol=1e-5, atol=1e-6)


def test_a_partial_epoch_is_recorded_in_result_json(tmp_path):
    """run(): result.json says how many batches each epoch trained and how many a full epoch has."""
    cfg, ds = tiny_setup(tmp_path, "BPR", overrides={"epochs": 1, "max_steps_per_epoch": 2, "train_batch_size": 16,
                                                     "checkpoint": False})
    res = train_one(cfg, tmp_path / "run", ds)
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert res["steps_per_epoch"] == saved["steps_per_epoch"] == 2
    assert saved["batches_per_epoch"] > 2 and saved["history"][0]["batch_seconds"] > 0


def test_cpu_malloc_reuse_applies_on_glibc_and_can_be_switched_off():
    import platform
    import sys

    from mmrec.trainer import reuse_freed_cpu_memory

    assert reuse_freed_cpu_memory(False) is False
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert reuse_freed_cpu_memory(True) is glibc


def test_weight_average_follows_the_warmed_up_decay_and_swaps_back():
    from mmrec.trainer import WeightAverage

    layer = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    average = WeightAverage(layer, 0.5)
    expected = 1.0
    for step, raw in enumerate([3.0, 5.0, 7.0], start=1):
        with torch.no_grad():
            layer.weight.fill_(raw)
        average.update()
        decay = min(0.5, (1 + step) / (10 + step))  # 2/11, 3/12, then capped at 0.5
        expected = decay * expected + (1 - decay) * raw
    assert float(average.average[0]) == pytest.approx(expected)
    with average.swapped():
        assert float(layer.weight.detach()) == pytest.approx(expected)
    assert float(layer.weight.detach()) == 7.0  # training goes on from the raw weights


def test_weight_averaging_validates_keeps_and_tests_the_averaged_weights(tmp_path):
    from models.bpr import BPR

    cfg, ds = tiny_setup(tmp_path, "BPR", overrides={"epochs": 3, "stopping_step": 10, "train_batch_size": 32,
                                                     "weight_averaging": 0.9, "checkpoint": True})
    trainer = Trainer(cfg, BPR(cfg, ds), ds, tmp_path / "out")
    (tmp_path / "out").mkdir()
    seen = []
    real_evaluate = trainer._evaluate

    def spy(split, keep_topk=0):
        seen.append((split, trainer.model.user_embedding.weight.detach().clone()))
        return real_evaluate(split, keep_topk)

    trainer._evaluate = spy
    res = trainer.fit()
    averaged = trainer.weight_average.average[0]  # user embedding: BPR's first parameter
    raw = trainer.model.user_embedding.weight.detach()
    assert not torch.allclose(averaged, raw)
    assert torch.equal(seen[2][1], averaged)  # the last validation saw the average, not the raw weights
    best = torch.load(tmp_path / "out" / "best.pth")["model"]["user_embedding.weight"]
    valid_weights = dict(enumerate(w for split, w in seen if split == "valid"))
    assert torch.equal(best, valid_weights[res["best_epoch"]])
    assert torch.equal(seen[-1][1], best) and seen[-1][0] == "test"


def test_weight_averaging_out_of_range_is_a_config_error(tmp_path):
    from mmrec.config import ConfigError

    with pytest.raises(ConfigError, match="weight_averaging"):
        tiny_setup(tmp_path, "BPR", overrides={"weight_averaging": 1.0})


def test_stopping_start_epoch_lets_a_run_recover_from_an_early_dip(tmp_path, monkeypatch):
    """Patience alone would stop in the dip (epoch 4, best epoch 1); with stopping_start_epoch 7 the run goes on,
    passes the early peak at epoch 6, and then stops by the usual rule, keeping the later best."""
    cfg, ds = tiny_setup(tmp_path, "BPR", overrides={"epochs": 50, "stopping_step": 2, "checkpoint": False,
                                                     "stopping_start_epoch": 7})
    from models.bpr import BPR

    trainer = Trainer(cfg, BPR(cfg, ds), ds, None)
    script = iter([0.2, 0.3, 0.25, 0.24, 0.26, 0.28, 0.31, 0.30, 0.29, 0.30, 0.9])

    def fake_eval(split, keep_topk=0):
        value = next(script) if split == "valid" else -1.0
        return {"metrics": {k: value for k in _keys(cfg)}}

    monkeypatch.setattr(trainer, "_evaluate", fake_eval)
    res = trainer.fit()
    assert res["best_epoch"] == 6 and res["epochs_run"] == 10 and res["stopped_by"] == "early_stopping"


def test_stopping_start_epoch_stops_at_once_when_patience_ran_out_before_it():
    from mmrec.trainer import early_stopping

    assert early_stopping(0.3, 0.2, 7, 2, may_stop=False) == (False, 8, False)  # before stopping_start_epoch
    assert early_stopping(0.3, 0.2, 8, 2, may_stop=True) == (False, 9, True)    # the first epoch it may stop
