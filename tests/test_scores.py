"""DCI, FactorVAE score and SAP (pipeline/vae/scores.py) against answers the construction fixes: codes
equal to the factors score (near) 1, a random rotation of them scores low, and codes missing one factor lose
that factor's share. (disentanglement_lib, the reference, needs TensorFlow 1 and is not on this machine.)"""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.vae.scores import dci, factor_vae_score, sap

SIZES = (3, 6, 10, 8, 8)  # a dSprites-like grid, shrunk: shape, scale, orientation, x, y
N = 3000


def grid_factors(rng: np.random.Generator, n: int = N) -> np.ndarray:
    """[n, 6]: five independent uniform discrete factors in [0, 1] and a constant colour column."""
    cols = [rng.integers(0, s, n) / (s - 1) for s in SIZES]
    return np.stack(cols + [np.ones(n)], axis=1)


def codes_of(factors: np.ndarray, rng: np.random.Generator, drop: int | None = None, spare: int = 3) -> np.ndarray:
    """Factors 0..4 as the first five code dims (+ small noise), then `spare` pure-noise dims; `drop`: that
    factor's dim replaced by noise."""
    codes = np.concatenate([factors[:, :5] + 0.01 * rng.normal(size=(len(factors), 5)),
                            rng.normal(size=(len(factors), spare))], axis=1)
    if drop is not None:
        codes[:, drop] = rng.normal(size=len(factors))
    return codes


def rotated(codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(codes.shape[1],) * 2))
    z = (codes - codes.mean(0)) / codes.std(0)
    return z @ q


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    factors = grid_factors(rng)
    # missing: no spare dims, so nothing but the lost factor's own (now noise) dim is free to stand for it
    return (factors, codes_of(factors, rng), rotated(codes_of(factors, rng), rng),
            codes_of(factors, rng, drop=2, spare=0))


def test_factor_vae_score(data):
    factors, good, mixed, missing = data
    kw = dict(train_votes=1000, eval_votes=500)
    assert factor_vae_score(good, factors, **kw)["score"] > 0.99
    # a rotation keeps one low-variance direction per fixed factor, so this score falls least of the three
    # (a known weakness: Kim & Mnih's axis-aligned argmin still finds a dim for most factors): 0.78 here
    assert factor_vae_score(mixed, factors, **kw)["score"] < 0.85
    # without factor 2 its votes fall on any of the 5 dims (all of variance 1) and only the one no other
    # factor claims counts for it: 4/5 + 1/5 * 1/5 = 0.84 expected
    assert 0.78 < factor_vae_score(missing, factors, **kw)["score"] < 0.9


def test_sap(data):
    factors, good, mixed, missing = data
    result = sap(good, factors)
    assert result["score"] > 0.98 and len(result["per_factor"]) == 5  # the constant column is skipped
    assert sap(mixed, factors)["score"] < 0.3
    lost = sap(missing, factors)
    assert lost["per_factor"][2] < 0.02 and lost["score"] == pytest.approx(result["score"] * 4 / 5, abs=0.02)


@pytest.mark.slow  # 3 x 5 gradient-boosted classifiers (~20 s)
def test_dci(data):
    factors, good, mixed, missing = data
    n = 800  # measured margins at 800 as at 1500: D, C ~1.0 vs 0.11 rotated; lost factor 0.10, the rest 1.0
    best = dci(good[:n], factors[:n])
    assert best["disentanglement"] > 0.9 and best["completeness"] > 0.9 and best["informativeness"] > 0.95
    worse = dci(mixed[:n], factors[:n])
    assert worse["disentanglement"] < best["disentanglement"] - 0.3 and worse["completeness"] < 0.6
    lost = dci(missing[:n], factors[:n])
    acc = lost["accuracy_per_factor"]
    assert acc[2] < 0.3 and min(acc[:2] + acc[3:]) > 0.95  # factor 2 (10 values) near chance, the rest kept
    assert lost["informativeness"] == pytest.approx(np.mean(acc))


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="same N"):
        sap(np.zeros((5, 2)), np.zeros((4, 1)))
    with pytest.raises(ValueError, match="every factor is constant"):
        factor_vae_score(np.random.default_rng(0).normal(size=(10, 2)), np.ones((10, 2)))
