"""Schedules at their key steps against closed forms; purity (resume / accumulation safety)."""
import math

import pytest
import torch

from pipeline.config import ObjectiveConfig, OptimConfig
from pipeline.vae import objectives as O
from pipeline.vae import schedules as S


def obj(**kw) -> ObjectiveConfig:
    return ObjectiveConfig(**kw)


def test_constant_is_beta_from_step_zero():
    cfg = obj(kl_schedule="constant", beta=4.0)
    assert [S.kl_weight(t, cfg, 100) for t in (0, 1, 50, 10**6)] == [4.0] * 4
    assert S.capacity_nats(10, cfg) is None


def test_linear_ramp():
    cfg = obj(kl_schedule="linear", beta=2.0, warmup_steps=100)
    assert S.anneal_factor(0, cfg) == 0.0
    assert S.anneal_factor(25, cfg) == 0.25
    assert S.anneal_factor(50, cfg) == 0.5
    assert S.anneal_factor(100, cfg) == 1.0
    assert S.anneal_factor(5000, cfg) == 1.0
    assert S.kl_weight(50, cfg) == 1.0  # beta * 0.5


def test_sigmoid_ramp_is_normalised_logistic():
    cfg = obj(kl_schedule="sigmoid", warmup_steps=200)
    k = S.SIGMOID_STEEPNESS
    s = lambda u: 1 / (1 + math.exp(-k * (u - 0.5)))  # noqa: E731
    assert S.anneal_factor(0, cfg) == 0.0
    assert S.anneal_factor(100, cfg) == pytest.approx(0.5, abs=1e-12)
    assert S.anneal_factor(50, cfg) == pytest.approx((s(0.25) - s(0)) / (s(1) - s(0)), abs=1e-12)
    assert S.anneal_factor(50, cfg) < 0.25  # slow start, unlike linear
    assert S.anneal_factor(200, cfg) == 1.0
    assert S.anneal_factor(300, cfg) == 1.0
    values = [S.anneal_factor(t, cfg) for t in range(0, 201)]
    assert all(b > a for a, b in zip(values, values[1:]))  # strictly increasing over the ramp


def test_cosine_ramp():
    cfg = obj(kl_schedule="cosine", warmup_steps=100)
    assert S.anneal_factor(0, cfg) == 0.0
    assert S.anneal_factor(25, cfg) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))
    assert S.anneal_factor(50, cfg) == pytest.approx(0.5)
    assert S.anneal_factor(100, cfg) == 1.0
    assert S.anneal_factor(101, cfg) == 1.0


@pytest.mark.parametrize("kind", ["linear", "sigmoid", "cosine"])
def test_zero_warmup_means_full_weight_from_step_zero(kind):
    cfg = obj(kl_schedule=kind, warmup_steps=0, beta=3.0)
    assert S.kl_weight(0, cfg) == 3.0


def test_cyclical_key_steps_and_periodicity():
    # 1000 steps, 4 cycles: period 250, ramp over the first 125 steps of each cycle, then hold at 1
    cfg = obj(kl_schedule="cyclical", cycles=4, cycle_ratio=0.5, cycle_ramp="linear", beta=2.0)
    w = lambda t: S.anneal_factor(t, cfg, total_steps=1000)  # noqa: E731
    assert w(0) == 0.0
    assert w(50) == pytest.approx(50 / 125)
    assert w(124) == pytest.approx(124 / 125)
    assert w(125) == 1.0 and w(249) == 1.0
    assert w(250) == 0.0 and w(300) == pytest.approx(50 / 125)
    assert w(999) == 1.0
    for t in range(0, 1000, 7):
        assert w(t) == w(t + 250)
    assert S.kl_weight(50, cfg, 1000) == pytest.approx(2.0 * 50 / 125)


@pytest.mark.parametrize("ramp", ["sigmoid", "cosine"])
def test_cyclical_ramp_shapes(ramp):
    cfg = obj(kl_schedule="cyclical", cycles=2, cycle_ratio=0.8, cycle_ramp=ramp)
    w = lambda t: S.anneal_factor(t, cfg, total_steps=1000)  # noqa: E731
    # period 500, ramp 400 steps
    assert w(0) == 0.0 and w(500) == 0.0
    assert w(200) == pytest.approx(0.5) and w(700) == pytest.approx(0.5)
    assert w(100) == pytest.approx(S.ramp(0.25, ramp)) and w(100) < 0.25
    assert w(400) == 1.0 and w(499) == 1.0
    with pytest.raises(ValueError, match="total_steps"):
        S.anneal_factor(10, cfg, total_steps=None)


def test_capacity_schedule():
    cfg = obj(kl_schedule="capacity", capacity_max_nats=25.0, capacity_steps=1000, gamma=500.0, beta=4.0)
    assert [S.capacity_nats(t, cfg) for t in (0, 250, 1000, 5000)] == [0.0, 6.25, 25.0, 25.0]
    assert S.kl_weight(123, cfg) == 500.0  # gamma multiplies |KL - C|; beta is unused
    assert S.anneal_factor(0, cfg) == 1.0
    assert S.capacity_nats(0, obj(kl_schedule="capacity", capacity_steps=0, capacity_max_nats=5.0)) == 5.0


def test_capacity_loss_gradient_flips_sign_as_kl_crosses_the_target():
    """With the scheduled C(step): below C the loss pushes the KL up, above C it pulls it down."""
    cfg = obj(kl_schedule="capacity", capacity_max_nats=10.0, capacity_steps=100, gamma=1000.0)
    mu = torch.tensor([[1.0, 2.0]], requires_grad=True)  # KL = 0.5 * (1 + 4) = 2.5 nats
    signs = {}
    for step in (10, 40):  # C = 1.0 (< KL) then 4.0 (> KL)
        mu.grad = None
        kl = O.kl_per_dim(mu, torch.zeros_like(mu))
        pen = O.kl_penalty(kl, S.kl_weight(step, cfg), S.capacity_nats(step, cfg), gamma=cfg.gamma)
        pen.backward()
        assert pen.item() == pytest.approx(1000.0 * abs(2.5 - S.capacity_nats(step, cfg)))
        signs[step] = torch.sign(mu.grad * mu.detach())  # + : descent shrinks |mu|, i.e. lowers KL
    assert (signs[10] == 1).all() and (signs[40] == -1).all()


def test_schedules_are_pure_functions_of_step():
    """Same value whatever was asked before (resume) and however often (gradient accumulation)."""
    cfg = obj(kl_schedule="cyclical", cycles=3, cycle_ratio=0.7, cycle_ramp="sigmoid")
    fresh = [S.kl_weight(t, cfg, 900) for t in range(900)]
    for t in (899, 0, 450, 450, 450, 3):
        S.kl_weight(t, cfg, 900)
    assert [S.kl_weight(t, cfg, 900) for t in range(900)] == fresh
    assert all(0.0 <= v <= 1.0 for v in fresh)


def test_unknown_schedule_raises_naming_it():
    with pytest.raises(ValueError, match="warmup_linear"):
        S.kl_weight(0, obj(kl_schedule="warmup_linear"))


def test_lr_factor_warmup_and_cosine():
    cfg = OptimConfig(lr_schedule="cosine", lr_warmup_steps=9, min_lr_ratio=0.1)
    assert S.lr_factor(0, cfg, 109) == pytest.approx(0.1)  # (0 + 1) / (9 + 1): step 0 still trains
    assert S.lr_factor(8, cfg, 109) == pytest.approx(0.9)
    assert S.lr_factor(9, cfg, 109) == pytest.approx(1.0)
    assert S.lr_factor(59, cfg, 109) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert S.lr_factor(109, cfg, 109) == pytest.approx(0.1)
    assert S.lr_factor(500, cfg, 109) == pytest.approx(0.1)
    const = OptimConfig(lr_schedule="constant", lr_warmup_steps=0)
    assert S.lr_factor(0, const, 10) == 1.0 and S.lr_factor(10**6, const, 10) == 1.0
