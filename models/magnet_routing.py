"""MAGNET's entropy-triggered progressive routing (Sec. 3.4, Algorithm 2): the routing losses and the
stage controller, apart from the model so that each can be tested on its own.

The controller holds its state in buffers (saved with the model, so a resumed run continues the schedule
exactly): the stage (1 coverage, 2 confidence), the counter n of Eq. 26, training steps and epochs, the
switch step and epoch, and the smoothing state of the switch signal.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("mmrec.models.magnet")

ENTROPY_EPS = 1e-12
SCHEDULES = ("entropy", "fixed_step", "coverage_only", "confidence_only", "none")
STAGE_WEIGHTS = ("lin_ent", "quad_ent", "const", "rev_ent")


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats (Eq. 23), p clamped at a tiny epsilon inside the log."""
    return -(p * p.clamp_min(ENTROPY_EPS).log()).sum(dim)


def coverage_loss(pi_bar: torch.Tensor) -> torch.Tensor:
    """Eq. 29: sum_e (pi_bar_e - 1/E)^2."""
    return (pi_bar - 1.0 / pi_bar.numel()).pow(2).sum()


def confidence_loss(pi: torch.Tensor) -> torch.Tensor:
    """Eq. 30: mean over pairs of H(pi_ui)."""
    return entropy(pi).mean()


def stage_weight_factors(h_norm: float, form: str) -> tuple[float, float]:
    """(stage-1 factor, stage-2 factor) of lambda_r (Eq. 31 and Table 6's alternatives)."""
    if form == "lin_ent":
        return 1.0 - h_norm, h_norm
    if form == "quad_ent":
        return (1.0 - h_norm) ** 2, h_norm ** 2
    if form == "const":
        return 1.0, 1.0
    if form == "rev_ent":
        return h_norm, 1.0 - h_norm
    raise ValueError(f"unknown stage_weights {form!r}; use one of {', '.join(STAGE_WEIGHTS)}")


class StageController(nn.Module):
    """Algorithm 2's stage controller.  ``advance(signal)`` once per training step (lines 14-20) returns the
    stage; ``close_epoch()`` at the start of each later epoch; ``loss_weights(h_norm, stage)`` gives
    (lambda_cov, lambda_conf) of Eq. 31.  Schedules: ``entropy`` (Eq. 26 on the smoothed signal, per step
    or per epoch), ``fixed_step`` (switch at ``fixed_switch_epoch``), ``coverage_only`` (never switches),
    ``confidence_only`` (starts in stage 2), ``none`` (no routing losses)."""

    def __init__(self, schedule: str, h_star: float, trigger_window: int, smoothing: str, smoothing_steps: int,
                 switch_unit: str, stage1_min_steps: int, fixed_switch_epoch: int, stage_weights: str,
                 lambda_r: float):
        super().__init__()
        self.schedule, self.h_star, self.trigger_window = schedule, h_star, trigger_window
        self.smoothing, self.smoothing_steps, self.switch_unit = smoothing, smoothing_steps, switch_unit
        self.stage1_min_steps, self.fixed_switch_epoch = stage1_min_steps, fixed_switch_epoch
        self.stage_weights, self.lambda_r = stage_weights, lambda_r
        long = dict(dtype=torch.long)
        first_stage = 2 if schedule == "confidence_only" else 1
        self.register_buffer("stage", torch.tensor(first_stage, **long))
        self.register_buffer("counter", torch.tensor(0, **long))
        self.register_buffer("step", torch.tensor(0, **long))
        self.register_buffer("epoch", torch.tensor(0, **long))
        self.register_buffer("epoch_steps", torch.tensor(0, **long))
        self.register_buffer("switch_step", torch.tensor(0 if first_stage == 2 else -1, **long))
        self.register_buffer("switch_epoch", torch.tensor(0 if first_stage == 2 else -1, **long))
        self.register_buffer("window", torch.zeros(smoothing_steps, dtype=torch.float64))
        self.register_buffer("window_count", torch.tensor(0, **long))
        self.register_buffer("ema", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("epoch_signal", torch.tensor(0.0, dtype=torch.float64))

    def smooth(self, value: float) -> float:
        """The switch signal after ``entropy_smoothing`` (none | window mean | EMA over smoothing_steps)."""
        count = int(self.window_count)
        self.window_count += 1
        if self.smoothing == "window":
            self.window[count % self.smoothing_steps] = value
            return float(self.window[: min(count + 1, self.smoothing_steps)].mean())
        if self.smoothing == "ema":
            rate = 1.0 / self.smoothing_steps
            self.ema.fill_(value if count == 0 else (1 - rate) * float(self.ema) + rate * value)
            return float(self.ema)
        return value

    def enter_stage2(self, first_step: int | None = None) -> None:
        """Enter stage 2; the switch step is the first step trained with stage-2 weights."""
        self.stage.fill_(2)
        self.switch_step.fill_(int(self.step) if first_step is None else first_step)
        self.switch_epoch.copy_(self.epoch)
        log.info("MAGNET stage switch 1 -> 2 at step %d (epoch %d)", int(self.step), int(self.epoch))

    def count(self, signal: float, first_step: int) -> None:
        """Eq. 26: n <- n + 1 if signal >= H* else 0; stage 1 -> 2 once when n >= W (after the minimum
        stage-1 length); ``first_step`` is the step that would be the first in stage 2."""
        if signal >= self.h_star:
            self.counter += 1
        else:
            self.counter.zero_()
        stage1_len = first_step - 1
        if int(self.stage) == 1 and int(self.counter) >= self.trigger_window and stage1_len >= self.stage1_min_steps:
            self.enter_stage2(first_step)

    @torch.no_grad()
    def advance(self, signal_value: float) -> int:
        """One training step (Alg. 2, lines 14-20); returns the stage the step trains with."""
        self.step += 1
        self.epoch_steps += 1
        if self.schedule == "entropy":
            smoothed = self.smooth(signal_value)
            if self.switch_unit == "step":
                self.count(smoothed, int(self.step))
            else:
                self.epoch_signal += smoothed
        elif self.schedule == "fixed_step":
            if int(self.stage) == 1 and int(self.epoch) >= self.fixed_switch_epoch:
                self.enter_stage2()
        return int(self.stage)

    @torch.no_grad()
    def close_epoch(self) -> None:
        """Count a finished epoch (nothing when no step ran); with ``switch_unit: epoch`` the epoch-mean
        signal drives the counter (W then counts epochs)."""
        if int(self.epoch_steps) == 0:
            return
        mean_signal = float(self.epoch_signal) / int(self.epoch_steps)
        self.epoch += 1
        if self.schedule == "entropy" and self.switch_unit == "epoch":
            self.count(mean_signal, int(self.step) + 1)
        self.epoch_steps.zero_()
        self.epoch_signal.zero_()

    def loss_weights(self, h_norm: float, stage: int) -> tuple[float, float]:
        """(lambda_cov, lambda_conf) of Eq. 31 (or the chosen stage_weights form), H~ detached."""
        if self.schedule == "none":
            return 0.0, 0.0
        a, b = stage_weight_factors(h_norm, self.stage_weights)
        return self.lambda_r * a * (stage == 1), self.lambda_r * b * (stage == 2)
