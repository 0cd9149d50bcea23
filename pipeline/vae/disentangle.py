"""Mutual Information Gap (Chen et al. 2018, "Isolating Sources of Disentanglement in VAEs"): pure numpy.

    from pipeline.vae.disentangle import mig
    result = mig(codes, factors)          # codes [N, D] mean codes E_q[z|x]; factors [N, F] ground truth
    result["mig"], result["per_factor"]   # mean over factors; one gap per factor (NaN for a constant one)

Estimator (the histogram estimator of disentanglement_lib, Locatello et al. 2019):
  1. Each latent dimension of the mean codes is discretised into `bins` (default 20) equal-width bins
     between its minimum and maximum over the N examples.
  2. Each factor is used as-is when it takes at most `max_factor_values` (default 64) distinct values
     (dSprites: 3 shapes, 6 scales, 40 orientations, 32 x and 32 y positions); a continuous factor is
     discretised like a code dimension.
  3. I(z_j; v_k) is the plug-in discrete mutual information of the joint histogram, in nats, and
     H(v_k) the plug-in entropy of the factor.
  4. MIG_k = (I_(1) - I_(2)) / H(v_k), the gap between the two latent dims most informative about
     factor k, normalised to [0, 1]. MIG is the mean over factors with H(v_k) > 0: a constant factor
     (dSprites' colour column) carries no information and is reported as NaN and left out of the mean.

Codes equal to the factors score ~1 when no factor has more distinct values than `bins`; a factor
with more (dSprites' 40 orientations, 32 positions) loses information in the code histogram, so even
perfect codes score about log(bins) / H(v_k) on it (0.81 for orientation at 20 bins). We keep the
usual 20 bins so that numbers compare with the literature. Codes independent of the factors score ~0 (plus the plug-in
estimator's small positive bias, ~ (bins - 1)(values - 1) / 2N nats per pair). The score does not
depend on the order of the latent dims or of the examples. Needs D >= 2.
"""
from __future__ import annotations

import numpy as np


def discretize(values: np.ndarray, bins: int = 20) -> np.ndarray:
    """[N, D] reals -> [N, D] int64 bin indices in [0, bins): equal-width bins per column between its min
    and max. A constant column maps to bin 0."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"discretize expects [N, D], got shape {values.shape}")
    lo, hi = values.min(0), values.max(0)
    width = np.where(hi > lo, hi - lo, 1.0)
    # Scale to [0, bins] and clip so the maximum falls in the last bin rather than its own.
    idx = np.floor((values - lo) / width * bins).astype(np.int64)
    return np.clip(idx, 0, bins - 1)


def factor_labels(factors: np.ndarray, bins: int = 20, max_factor_values: int = 64) -> np.ndarray:
    """[N, F] ground-truth factors -> [N, F] int64 labels: a factor's distinct values when there are at
    most `max_factor_values` of them (exact for dSprites' discrete grid), else `discretize` bins."""
    factors = np.asarray(factors, dtype=np.float64)
    if factors.ndim != 2:
        raise ValueError(f"factors must be [N, F], got shape {factors.shape}")
    out = np.empty(factors.shape, dtype=np.int64)
    for k in range(factors.shape[1]):
        uniq, inverse = np.unique(factors[:, k], return_inverse=True)
        out[:, k] = inverse if len(uniq) <= max_factor_values else discretize(factors[:, k:k + 1], bins)[:, 0]
    return out


def entropy(labels: np.ndarray) -> float:
    """Plug-in entropy in nats of one column of integer labels [N]."""
    p = np.bincount(np.asarray(labels)) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def mutual_info(a: np.ndarray, b: np.ndarray) -> float:
    """Plug-in mutual information in nats between two columns of non-negative integer labels [N]."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    na, nb = int(a.max()) + 1, int(b.max()) + 1
    joint = np.bincount(a * nb + b, minlength=na * nb).reshape(na, nb) / len(a)
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum())


def mutual_info_matrix(code_labels: np.ndarray, factor_labels_: np.ndarray) -> np.ndarray:
    """[N, D] and [N, F] integer labels -> [D, F] mutual information in nats."""
    d, f = code_labels.shape[1], factor_labels_.shape[1]
    return np.array([[mutual_info(code_labels[:, j], factor_labels_[:, k]) for k in range(f)] for j in range(d)])


def mig(codes: np.ndarray, factors: np.ndarray, bins: int = 20, max_factor_values: int = 64) -> dict[str, object]:
    """Mutual Information Gap of mean codes [N, D] against ground-truth factors [N, F] (see module doc).

    Returns {"mig": float (mean over non-constant factors), "per_factor": [F] floats (NaN when constant),
    "mi": [D, F] nats, "factor_entropy": [F] nats, "bins": bins, "num_examples": N}.
    """
    codes, factors = np.asarray(codes), np.asarray(factors)
    if codes.ndim != 2 or factors.ndim != 2 or len(codes) != len(factors):
        raise ValueError(f"mig needs codes [N, D] and factors [N, F] with the same N; got {codes.shape}, {factors.shape}")
    if codes.shape[1] < 2:
        raise ValueError("mig needs at least 2 latent dimensions (it is a gap between the top two)")
    labels = factor_labels(factors, bins, max_factor_values)
    mi = mutual_info_matrix(discretize(codes, bins), labels)  # [D, F]
    h = np.array([entropy(labels[:, k]) for k in range(labels.shape[1])])
    top2 = -np.sort(-mi, axis=0)[:2]  # [2, F]: largest and second largest MI per factor
    with np.errstate(invalid="ignore", divide="ignore"):
        per_factor = np.where(h > 0, (top2[0] - top2[1]) / h, np.nan)
    valid = per_factor[~np.isnan(per_factor)]
    return {
        "mig": float(valid.mean()) if valid.size else float("nan"),
        "per_factor": per_factor.tolist(),
        "mi": mi.tolist(),
        "factor_entropy": h.tolist(),
        "bins": bins,
        "num_examples": len(codes),
    }
