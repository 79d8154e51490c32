"""One trainer for every model: fit, evaluate, early stopping, checkpoints and resume.

Per epoch (MMRec's order): pre-epoch hook, training batches, LR step, post-epoch hook, validation and
the early-stopping update.  The test split is scored once, after training, with the weights of the best
validation epoch (MMRec scores test at every improvement: the same numbers from one pass instead of one
per improvement).  Early stopping follows MMRec exactly: the first evaluation sets the best; the valid
metric, rounded to ``metric_decimals``, must strictly improve; training stops once the count of
non-improving evaluations exceeds ``stopping_step``, and not before ``stopping_start_epoch`` epochs have run
(0, MMRec: from the first; a model whose validation curve dips early and recovers sets it, so patience
cannot end the run in the dip; the best epoch is still chosen over every evaluation).

With ``weight_averaging: d`` (0 < d < 1) validation, the best-epoch weights and test use an exponential
moving average of the parameters, updated after every optimiser step with decay min(d, (1 + t) / (10 + t))
at step t (Polyak averaging with a warm-up); training itself continues on the raw weights.

``last.pth`` (model, optimiser, scheduler, sampler and RNG states, counters) is written atomically after
every epoch, so ``--resume DIR`` continues an interrupted run to the same result; ``best.pth`` holds
the weights of the best validation epoch.  A NaN or infinite loss stops the run and keeps the best.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mmrec.data.sampler import TrainBatches
from mmrec.evaluation import evaluate

log = logging.getLogger("mmrec")


def early_stopping(best: float, score: float, bad_evals: int, patience: int,
                   may_stop: bool = True) -> tuple[bool, int, bool]:
    """MMRec's rule: (improved, evaluations without improvement, stop).  A score must beat the best (a tie,
    after rounding to ``metric_decimals``, does not); training stops once more than ``patience``
    evaluations in a row have not improved, if ``may_stop`` (``stopping_start_epoch`` reached)."""
    if score > best:
        return True, 0, False
    return False, bad_evals + 1, may_stop and bad_evals + 1 > patience


def reset_peak_memory() -> None:
    """Start a run's peak-memory count: CUDA's allocator statistics, and Linux's VmHWM (clear_refs 5)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


_GLIBC_M_TRIM_THRESHOLD, _GLIBC_M_MMAP_THRESHOLD = -1, -3


def reuse_freed_cpu_memory(enabled: bool = True) -> bool:
    """``cpu_malloc_reuse``: have glibc keep freed buffers up to 32 MiB for reuse (mmap threshold 32 MiB,
    no trimming below 1 GiB) instead of handing each one back to the OS.  Under the defaults every
    activation or gradient of a few MiB is mapped afresh and pays a page fault per 4 KiB page when it is
    first written: at Baby size that was ~15% of a LightGCN training step (benchmarks/bench_models.py).
    The cost is that RSS stays at its peak instead of shrinking between steps.  No effect (False) where
    the C library is not glibc."""
    if not enabled or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_GLIBC_M_MMAP_THRESHOLD, 32 << 20)) and bool(
            libc.mallopt(_GLIBC_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


def peak_memory_mib(model) -> float | None:
    """CUDA max allocated when the model is on a GPU, else the peak RSS (VmHWM) of this process."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


class TrainingDiverged(RuntimeError):
    pass


def init_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def build_optimizer(config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The configured optimiser over the trainable parameters.  A model may list parameter-name prefixes
    in ``no_weight_decay`` (e.g. its ID embedding tables): those get weight decay 0; and it may map
    prefixes to learning-rate factors in ``lr_scale`` (e.g. ``{"user_embedding": 3.0}``): those train at
    factor x learning_rate (the scheduler scales every group alike)."""
    lr, wd = float(config["learning_rate"]), float(config["weight_decay"])
    exempt = tuple(model.no_weight_decay)
    scales = dict(model.lr_scale)
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decayed = not (exempt and name.startswith(exempt))
        scale = next((float(f) for prefix, f in scales.items() if name.startswith(prefix)), 1.0)
        groups.setdefault((decayed, scale), []).append(p)
    params = [{"params": ps, **({} if decayed else {"weight_decay": 0.0}), **({} if s == 1.0 else {"lr": lr * s})}
              for (decayed, s), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]
    learner = str(config["learner"]).lower()
    # optimizer_impl: fused = one kernel per parameter over its whole update (the step reads and writes each
    # tensor once; 4-5x faster on large tables such as trainable 4096-d features); foreach = torch's default
    # multi-tensor path (the exact arithmetic of runs made before fused became the default)
    impl = str(config.get("optimizer_impl", "fused"))
    kind = {"fused": True} if impl == "fused" else {"foreach": True}
    if learner == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, **kind)
    if learner == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, **kind)
    if learner == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd, foreach=True)
    raise ValueError(f"config 'learner' is {learner!r}: use adam, adamw or sgd")


class WeightAverage:
    """An exponential moving average of a model's parameters (buffers are left as they are).

    ``update()`` after each optimiser step; ``swapped()`` is a context in which the model holds the average
    (validation, best-state capture) and after which it holds its raw training weights again."""

    def __init__(self, model: torch.nn.Module, decay: float):
        """``decay`` in (0, 1): the config's range check (``weight_averaging``) is the one place that enforces it."""
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.decay = decay
        self.steps = 0
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def _swap(self) -> None:
        for p, a in zip(self.params, self.average):
            raw = p.detach().clone()
            p.copy_(a)
            a.copy_(raw)

    @contextlib.contextmanager
    def swapped(self):
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def state_dict(self) -> dict:
        return {"steps": self.steps, "average": [a.detach().to("cpu", copy=True) for a in self.average]}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        for a, saved in zip(self.average, state["average"]):
            a.copy_(saved)


class Trainer:
    def __init__(self, config, model, dataset, out_dir: Path | None = None):
        self.config = config
        self.model = model
        self.dataset = dataset
        self.out_dir = Path(out_dir) if out_dir else None
        self.device = model.device
        self.ks = sorted(int(k) for k in config["topk"])
        self.metrics = [m.lower() for m in config["metrics"]]
        self.valid_metric = str(config["valid_metric"]).lower()
        if self.valid_metric not in {f"{m}@{k}" for m in self.metrics for k in self.ks}:
            raise ValueError(f"valid_metric {self.valid_metric!r} is not among the computed metrics "
                             f"({self.metrics} at {self.ks})")
        self.decimals = int(config["metric_decimals"])
        self.batches = TrainBatches(dataset, int(config["train_batch_size"]), int(config["seed"]))
        self.optimizer = build_optimizer(config, model)
        self.scheduler = self._build_scheduler()
        self.set_to_none = str(config["optimizer_empty_grad"]).lower() == "skip"
        self.clip = config.get("clip_grad_norm")
        # state carried across epochs (and checkpoints)
        self.epoch = 0
        self.best_score = -1.0
        self.best_epoch = -1
        self.best_valid: dict = {}
        self.best_test: dict = {}
        self.bad_evals = 0
        self.history: list[dict] = []
        self.stopped_by = "epochs"
        self.train_times: list[float] = []
        self.steps_per_epoch: int | None = None  # batches trained in the last epoch (max_steps_per_epoch)
        self.loop_seconds = 0.0  # time of the last epoch's batches alone
        self.eval_times: list[float] = []
        self._best_state: dict | None = None  # weights of the best validation epoch (CPU copy)
        decay = float(config.get("weight_averaging", 0) or 0)
        self.weight_average = WeightAverage(model, decay) if decay else None

    def _build_scheduler(self):
        """MMRec's LambdaLR: epoch e trains at lr * a^(e/b), never below ``learning_rate_floor``."""
        a, b = self.config["learning_rate_scheduler"]
        lr = float(self.config["learning_rate"])
        floor = float(self.config.get("learning_rate_floor") or 0.0) / lr
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda e: max(a ** (e / b), floor))

    def _fresh_optimizer(self) -> None:
        """For models that set ``reset_optimizer_each_epoch`` (CMDL's reference rebuilds its optimisers
        every epoch): new optimiser state, same learning-rate schedule position."""
        epoch = self.scheduler.last_epoch
        self.optimizer = build_optimizer(self.config, self.model)
        self.scheduler = self._build_scheduler()
        for _ in range(epoch):
            self.scheduler.step()

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "sampler": self.batches.state_dict(),
                "rng": rng_state(), "best_score": self.best_score, "best_epoch": self.best_epoch,
                "best_valid": self.best_valid, "best_test": self.best_test, "bad_evals": self.bad_evals,
                "history": self.history, "train_times": self.train_times, "eval_times": self.eval_times,
                "stopped_by": self.stopped_by,
                "weight_average": self.weight_average.state_dict() if self.weight_average else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        for key in ("epoch", "best_score", "best_epoch", "best_valid", "best_test", "bad_evals", "history",
                    "train_times", "eval_times"):
            setattr(self, key, state[key])
        self.stopped_by = state.get("stopped_by", "epochs")  # a run interrupted in its final test pass
        if self.weight_average is not None:
            if state.get("weight_average") is None:
                raise ValueError("--resume: the checkpoint was written without weight_averaging; resume with "
                                 "the same weight_averaging as the interrupted run")
            self.weight_average.load_state_dict(state["weight_average"])

    # ------------------------------------------------------------------------------------------
    def _train_epoch(self) -> dict[str, float]:
        model = self.model
        model.train()
        if model.reset_optimizer_each_epoch and self.epoch > 0:
            self._fresh_optimizer()
        model.pre_epoch_processing()
        parts: dict[str, float] = {}
        total = 0.0
        n_batches = len(self.batches)
        max_steps = int(self.config.get("max_steps_per_epoch", 0) or 0)
        if 0 < max_steps < n_batches:  # a partial epoch (the sampler's stream still advances a full epoch)
            n_batches = max_steps
        iterator = itertools.islice(self.batches.epoch(), n_batches)
        loop_start = time.perf_counter()
        if sys.stderr.isatty() and self.config.get("progress", True):
            from tqdm import tqdm

            iterator = tqdm(iterator, total=n_batches, leave=False, desc=f"epoch {self.epoch}", file=sys.stderr)
        for batch in iterator:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            self.optimizer.zero_grad(set_to_none=self.set_to_none)
            out = model.calculate_loss(batch)
            if isinstance(out, dict):
                loss = sum(out.values())
                named = out
            elif isinstance(out, (tuple, list)):
                loss = sum(out)
                named = {f"loss_{i}": v for i, v in enumerate(out)}
            else:
                loss, named = out, {}
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingDiverged(f"loss is {value} at epoch {self.epoch}; stopping and keeping the best "
                                       f"checkpoint (epoch {self.best_epoch}). Lower learning_rate or check "
                                       "the model's regularisers.")
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(self.clip))
            self.optimizer.step()
            if self.weight_average is not None:
                self.weight_average.update()
            total += value
            for k, v in named.items():
                parts[k] = parts.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
        self.steps_per_epoch = n_batches
        self.loop_seconds = time.perf_counter() - loop_start  # the batches alone (no per-epoch work)
        out = {"loss": total / n_batches}
        out.update({k: v / n_batches for k, v in parts.items()})
        return out

    def _averaged(self):
        """The model holds the averaged weights inside this context when ``weight_averaging`` is on."""
        return self.weight_average.swapped() if self.weight_average is not None else contextlib.nullcontext()

    def _evaluate(self, split: str, keep_topk: int = 0) -> dict:
        return evaluate(self.model, self.dataset, split, self.ks, self.metrics,
                        int(self.config["eval_batch_size"]), keep_topk=keep_topk)

    def fit(self) -> dict:
        cfg = self.config
        epochs, eval_step, stopping_step = int(cfg["epochs"]), int(cfg["eval_step"]), int(cfg["stopping_step"])
        stopping_start = int(cfg.get("stopping_start_epoch", 0) or 0)
        save_topk = int(cfg.get("save_topk", 0) or 0)
        diverged = None
        while self.epoch < epochs and self.stopped_by != "early_stopping":
            t0 = time.perf_counter()
            try:
                losses = self._train_epoch()
            except TrainingDiverged as err:
                diverged = str(err)
                self.stopped_by = "diverged"
                log.error(diverged)
                break
            self.scheduler.step()
            note = self.model.post_epoch_processing()
            stats = self.model.epoch_stats()
            self._append_trace(self.model.drain_trace())
            train_time = time.perf_counter() - t0
            self.train_times.append(train_time)
            elapsed = (self.history[-1].get("elapsed_seconds", 0.0) if self.history else 0.0) + train_time
            record = {"epoch": self.epoch, "train_seconds": round(train_time, 4),
                      "batch_seconds": round(self.loop_seconds, 4), **losses, **stats}
            msg = f"epoch {self.epoch:3d}  train {train_time:6.2f}s  " + "  ".join(
                f"{k} {v:.4f}" for k, v in losses.items())
            if stats:
                msg += "  | " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in stats.items())
            if note:
                msg += f"  | {note}"
            log.info(msg)
            stop = False
            if (self.epoch + 1) % eval_step == 0:
                t1 = time.perf_counter()
                with self._averaged():  # validation and the kept best state use the averaged weights
                    valid = self._evaluate("valid")["metrics"]
                    score = round(valid[self.valid_metric], self.decimals)
                    improved, self.bad_evals, stop = early_stopping(self.best_score, score, self.bad_evals,
                                                                    stopping_step, self.epoch + 1 >= stopping_start)
                    if improved:
                        self._best_state = {k: v.detach().to("cpu", copy=True)
                                            for k, v in self.model.state_dict().items()}
                self.eval_times.append(time.perf_counter() - t1)
                elapsed += self.eval_times[-1]
                record["valid"] = valid
                line = (f"          valid {self.valid_metric} {valid[self.valid_metric]:.4f}  "
                        + "  ".join(f"{k} {valid[k]:.4f}" for k in self._shown(valid))
                        + f"  eval {self.eval_times[-1]:.2f}s")
                if improved:
                    self.best_score, self.best_epoch = score, self.epoch
                    self.best_valid = valid
                    line += "  * best"
                    if self.out_dir is not None and cfg["checkpoint"]:
                        atomic_save({"epoch": self.epoch, "model": self._best_state}, self.out_dir / "best.pth")
                log.info(line)
            record["elapsed_seconds"] = round(elapsed, 3)  # training and evaluation time so far (t95)
            self.history.append(record)
            self.epoch += 1
            if stop:
                self.stopped_by = "early_stopping"
                log.info(f"early stopping: {self.bad_evals} evaluations without improvement "
                         f"(stopping_step {stopping_step}); best epoch {self.best_epoch}")
            if self.out_dir is not None and cfg["checkpoint"]:
                atomic_save(self.state_dict(), self.out_dir / "last.pth")
            if stop:
                break
        self._test_best(save_topk)
        return {"best_epoch": self.best_epoch, "epochs_run": self.epoch, "valid": self.best_valid,
                "test": self.best_test, "stopped_by": self.stopped_by, "diverged": diverged,
                "train_seconds": round(sum(self.train_times), 3),
                "seconds_per_epoch": round(statistics.median(self.train_times), 4) if self.train_times else None,
                "eval_seconds": round(statistics.median(self.eval_times), 4) if self.eval_times else None,
                "eval_seconds_total": round(sum(self.eval_times), 3), "history": self.history,
                "steps_per_epoch": self.steps_per_epoch, "batches_per_epoch": len(self.batches),
                "efficiency": self.efficiency()}

    def _append_trace(self, rows: list[dict]) -> None:
        """A model's per-step rows (``drain_trace``), appended to trace.jsonl in the run folder each epoch."""
        if rows and self.out_dir is not None:
            with open(self.out_dir / "trace.jsonl", "a") as fh:
                for row in rows:
                    fh.write(json.dumps({"epoch": self.epoch, **row}) + "\n")

    def efficiency(self) -> dict:
        """Table 7's figures: median training epoch after the first (warm-up), median evaluation pass, peak
        memory of this run (CUDA max allocated on a GPU, else the process's peak RSS since the run began),
        best epoch, epochs run and t95 = training + evaluation seconds until the validation score first
        reached 95% of its best."""
        warm = self.train_times[1:] or self.train_times
        scored = [(r["elapsed_seconds"], r["valid"][self.valid_metric]) for r in self.history if "valid" in r]
        best = max((v for _, v in scored), default=None)
        t95 = next((t for t, v in scored if best is not None and v >= 0.95 * best), None)
        return {"seconds_per_epoch": round(statistics.median(warm), 4) if warm else None,
                "eval_seconds": round(statistics.median(self.eval_times), 4) if self.eval_times else None,
                "peak_memory_mib": peak_memory_mib(self.model), "best_epoch": self.best_epoch,
                "epochs_run": self.epoch, "t95_seconds": round(t95, 2) if t95 is not None else None}

    def _test_best(self, save_topk: int) -> None:
        """Score the test split once with the best validation epoch's weights (left in the model)."""
        if self.best_epoch < 0:
            return
        state = self._best_state
        best_path = self.out_dir / "best.pth" if self.out_dir is not None else None
        if state is None and best_path is not None and best_path.exists():  # resumed after an interruption
            state = torch.load(best_path, map_location="cpu", weights_only=True)["model"]
        if state is None:
            log.warning("no weights of the best epoch %d kept (checkpoint off and resumed?): test not scored",
                        self.best_epoch)
            return
        self.model.load_state_dict(state)
        t0 = time.perf_counter()
        test_res = self._evaluate("test", keep_topk=save_topk)
        self.best_test = test_res["metrics"]
        for record in self.history:
            if record["epoch"] == self.best_epoch:
                record["test"] = self.best_test
        log.info(f"test at the best validation epoch {self.best_epoch}: "
                 + "  ".join(f"{k} {self.best_test[k]:.4f}" for k in self._shown(self.best_test))
                 + f"  eval {time.perf_counter() - t0:.2f}s")
        if self.out_dir is not None and save_topk:
            self._write_topk(test_res)

    def _shown(self, metrics: dict) -> list[str]:
        return [k for k in ("recall@10", "recall@20", "ndcg@10", "ndcg@20") if k in metrics]

    def _write_topk(self, test_res: dict) -> None:
        path = self.out_dir / "topk_test.tsv"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            fh.write("userID\titems\n")
            for u, row in zip(test_res["users"], test_res["topk"]):
                fh.write(f"{u}\t{','.join(map(str, row))}\n")
        os.replace(tmp, path)
