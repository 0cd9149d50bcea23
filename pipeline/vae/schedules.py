"""Schedules as pure functions of the global optimizer step (plain Python floats, no torch).

Nothing here counts its own calls: the value at step t depends only on t and the config, so a
resumed run continues exactly and gradient accumulation (several batches per optimizer step) sees
one value per step. Pass `LightningModule.global_step`.

    w = kl_weight(step, cfg.objective, total_steps=cfg.trainer.max_steps)   # multiplies the KL term
    C = capacity_nats(step, cfg.objective)                                  # None unless capacity
"""
from __future__ import annotations

import math
from typing import Optional

from pipeline.config import KLSchedule, Ramp, choices

KL_SCHEDULES = choices(KLSchedule)
RAMPS = choices(Ramp)
SIGMOID_STEEPNESS = 10.0  # logistic slope in units of the ramp length; see `ramp`


def ramp(t: float, shape: str) -> float:
    """A rise from 0 at t <= 0 to 1 at t >= 1, monotone in between.

    linear   t
    cosine   0.5 * (1 - cos(pi * t))
    sigmoid  the logistic s(u) = 1 / (1 + exp(-k (u - 1/2))), k = SIGMOID_STEEPNESS, rescaled to hit
             the end points exactly: (s(t) - s(0)) / (s(1) - s(0)); 0.5 at t = 1/2.
    """
    t = min(max(float(t), 0.0), 1.0)
    if shape == "linear":
        return t
    if shape == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * t))
    if shape == "sigmoid":
        def s(u: float) -> float:
            return 1.0 / (1.0 + math.exp(-SIGMOID_STEEPNESS * (u - 0.5)))
        lo, hi = s(0.0), s(1.0)
        return min(max((s(t) - lo) / (hi - lo), 0.0), 1.0)
    raise ValueError(f"unknown ramp shape {shape!r}; expected one of {RAMPS}")


def anneal_factor(step: int, cfg, total_steps: Optional[int] = None) -> float:
    """KL annealing factor in [0, 1] at optimizer step `step` (cfg: ObjectiveConfig).

    constant, capacity   1
    linear | sigmoid | cosine
                         ramp(step / warmup_steps) (Bowman et al. 2016 for linear); 1 from step 0
                         when warmup_steps == 0
    cyclical             Fu et al. 2019: `cycles` cycles of length P = total_steps / cycles; within a
                         cycle, tau = (step mod P) / P, the factor is ramp(tau / cycle_ratio,
                         cycle_ramp) while tau < cycle_ratio, then 1. Periodic beyond total_steps.
    """
    kind = cfg.kl_schedule
    step = max(int(step), 0)
    if kind in ("constant", "capacity"):
        return 1.0
    if kind in RAMPS:  # a warm-up with that ramp's shape
        if cfg.warmup_steps <= 0:
            return 1.0
        return ramp(step / cfg.warmup_steps, kind)
    if kind == "cyclical":
        if not total_steps or total_steps <= 0:
            raise ValueError("the cyclical KL schedule needs total_steps > 0 (trainer.max_steps)")
        period = total_steps / cfg.cycles
        tau = math.fmod(step, period) / period
        if tau >= cfg.cycle_ratio:
            return 1.0
        return ramp(tau / cfg.cycle_ratio, cfg.cycle_ramp)
    raise ValueError(f"unknown objective.kl_schedule {kind!r}; expected one of {KL_SCHEDULES}")


def kl_weight(step: int, cfg, total_steps: Optional[int] = None) -> float:
    """The effective multiplier of the KL term at `step`: beta * anneal_factor, or for `capacity`
    the gamma that multiplies |KL - C| (see objectives.kl_penalty)."""
    if cfg.kl_schedule == "capacity":
        return float(cfg.gamma)
    return float(cfg.beta) * anneal_factor(step, cfg, total_steps)


def capacity_nats(step: int, cfg) -> Optional[float]:
    """Target KL C(step) in nats per example for `capacity` (Burgess et al. 2018): rises linearly
    from 0 at step 0 to capacity_max_nats at capacity_steps, then stays; None for other schedules."""
    if cfg.kl_schedule != "capacity":
        return None
    if cfg.capacity_steps <= 0:
        return float(cfg.capacity_max_nats)
    return float(cfg.capacity_max_nats) * min(max(int(step), 0) / cfg.capacity_steps, 1.0)


def lr_factor(step: int, cfg, max_steps: int) -> float:
    """Multiplier of optim.lr at optimizer step `step` (cfg: OptimConfig), for a LambdaLR.

    Linear warm-up (step + 1) / (lr_warmup_steps + 1) over the first lr_warmup_steps steps (never 0,
    so step 0 trains); then 1 for `constant`, or for `cosine`
    min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + cos(pi * p)), p = (step - warmup) / (max_steps -
    warmup) clipped to [0, 1]: min_lr_ratio at max_steps.
    """
    step = max(int(step), 0)
    warmup = cfg.lr_warmup_steps
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "cosine":
        span = max(max_steps - warmup, 1)
        p = min((step - warmup) / span, 1.0)
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"unknown optim.lr_schedule {cfg.lr_schedule!r}; expected constant or cosine")
