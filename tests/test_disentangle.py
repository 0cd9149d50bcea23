"""MIG (pipeline/vae/disentangle.py): the estimator's extremes, invariances and its plug-in MI against sklearn."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score

from pipeline.vae.disentangle import discretize, entropy, mig, mutual_info


def dsprites_like_factors(n: int, rng: np.random.Generator, sizes=(3, 6, 20, 16, 16)) -> np.ndarray:
    """[n, F+1] independent uniform discrete factors plus a constant colour column (as in dSprites)."""
    cols = [rng.integers(0, s, n) / max(s - 1, 1) for s in sizes]
    return np.stack(cols + [np.ones(n)], axis=1)


def test_codes_equal_to_factors_score_one():
    rng = np.random.default_rng(0)
    factors = dsprites_like_factors(5000, rng)
    codes = np.concatenate([factors[:, :5], rng.normal(size=(5000, 3))], axis=1)  # 5 exact + 3 noise dims
    result = mig(codes, factors)
    assert result["mig"] > 0.97
    assert all(p > 0.95 for p in result["per_factor"][:5])
    assert math.isnan(result["per_factor"][5])  # the constant column: no entropy, left out of the mean


def test_full_dsprites_grid_needs_enough_bins():
    rng = np.random.default_rng(1)
    factors = dsprites_like_factors(20000, rng, sizes=(3, 6, 40, 32, 32))
    codes = factors[:, :5] + 0.0
    coarse, fine = mig(codes, factors, bins=20), mig(codes, factors, bins=40)
    # 40 orientations in 20 bins keep log(20) of log(40) nats; with 40 bins every factor is exact.
    assert coarse["per_factor"][2] == pytest.approx(math.log(20) / math.log(40), abs=0.02)
    assert fine["mig"] > 0.97


def test_random_codes_score_near_zero():
    rng = np.random.default_rng(2)
    factors = dsprites_like_factors(10000, rng)
    assert mig(rng.normal(size=(10000, 10)), factors)["mig"] < 0.02


def test_entangled_codes_score_low():
    # Every factor spread equally over two code dims: top-two MI equal, so the gap (and MIG) is ~0,
    # even though the codes carry all the information.
    rng = np.random.default_rng(3)
    factors = dsprites_like_factors(10000, rng, sizes=(8, 8))
    a, b = factors[:, 0], factors[:, 1]
    codes = np.stack([a + b, a - b, a + b + 1e-9], axis=1)
    assert mig(codes, factors)["mig"] < 0.1


def test_permutation_invariance():
    rng = np.random.default_rng(4)
    factors = dsprites_like_factors(4000, rng)
    codes = np.concatenate([factors[:, :3] + 0.3 * rng.normal(size=(4000, 3)), rng.normal(size=(4000, 4))], axis=1)
    base = mig(codes, factors)["mig"]
    assert 0.05 < base < 0.95  # a middling score, so invariance is not trivially at an extreme
    assert mig(codes[:, rng.permutation(7)], factors)["mig"] == pytest.approx(base, abs=1e-12)
    rows = rng.permutation(4000)
    assert mig(codes[rows], factors[rows])["mig"] == pytest.approx(base, abs=1e-12)
    assert mig(codes * 3.0 - 7.0, factors)["mig"] == pytest.approx(base, abs=1e-9)  # affine per dim: same bins


def test_plug_in_estimates_match_sklearn():
    rng = np.random.default_rng(5)
    a = discretize(rng.normal(size=(3000, 1)))[:, 0]
    b = (a // 3 + rng.integers(0, 2, 3000)).astype(np.int64)
    assert mutual_info(a, b) == pytest.approx(mutual_info_score(a, b), abs=1e-10)
    assert entropy(np.repeat(np.arange(4), 10)) == pytest.approx(math.log(4))
    assert discretize(np.array([[0.0], [0.5], [1.0]]), bins=2)[:, 0].tolist() == [0, 1, 1]


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="same N"):
        mig(np.zeros((5, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least 2"):
        mig(np.zeros((5, 1)), np.zeros((5, 2)))
