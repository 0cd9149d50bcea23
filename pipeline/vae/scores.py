"""DCI, the FactorVAE score and SAP beside MIG (disentangle.py): pure functions of mean codes [N, D] and
ground-truth factors [N, F], each following disentanglement_lib's definition (Locatello et al. 2019,
google-research/disentanglement_lib, `evaluation/metrics/*.py`) with the estimator settings below.

    from pipeline.vae.scores import dci, factor_vae_score, sap
    dci(codes, factors)["disentanglement"], factor_vae_score(codes, factors)["score"], sap(codes, factors)["score"]

Every function skips constant factors (dSprites' colour column: nothing to predict), splits the examples
into a train and a test part with a fixed seed, and returns its score in [0, 1] (1 = each factor captured by
one code dimension that captures nothing else), per-factor detail and its settings.

- **DCI** (Eastwood & Williams 2018, "A Framework for the Quantitative Evaluation of Disentangled
  Representations"): one gradient-boosted tree classifier per factor (scikit-learn's
  GradientBoostingClassifier, its defaults as in disentanglement_lib) predicts the factor's labels from all
  code dims; the feature importances form R [D, F]. Disentanglement = sum_j rho_j (1 - H_F(R_j. / sum R_j.)),
  rho_j = sum R_j. / sum R; completeness = mean_k (1 - H_D(R_.k / sum R_.k)); entropies in base F and D.
  Informativeness = the classifiers' mean test accuracy.
- **FactorVAE score** (Kim & Mnih 2018, "Disentangling by Factorising"): codes divided by their standard
  deviation over all examples; dims with none dropped. Each vote picks a factor k and one of its values, takes
  `batch_size` examples sharing that value (drawn from the N given: for a dataset whose factors are
  independent, as dSprites' full grid, this is the paper's sampling with the factor fixed) and votes
  (argmin_j Var(z_j), k) (a continuous factor is binned as MIG bins it). A majority-vote classifier (each
  dim predicts its most frequent factor) is fitted on `train_votes` votes; the score is its accuracy on `eval_votes` fresh votes.
- **SAP** (Kumar et al. 2018, "Variational Inference of Disentangled Latent Concepts from Unlabeled
  Observations"), disentanglement_lib's continuous-factor form: S_jk = R^2 of factor k on code dim j alone
  (the squared correlation, on the test part), score = mean_k of the gap between the two largest S_jk. dSprites'
  factors are ordinal grid values (the shape index too), so a linear fit is the natural single-dim predictor.
"""
from __future__ import annotations

import numpy as np

from pipeline.vae.disentangle import discretize, factor_labels


def _check(codes: np.ndarray, factors: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes float64 [N, D], factors float64 [N, F], indices of the non-constant factors)."""
    codes, factors = np.asarray(codes, dtype=np.float64), np.asarray(factors, dtype=np.float64)
    if codes.ndim != 2 or factors.ndim != 2 or len(codes) != len(factors):
        raise ValueError(f"{name} needs codes [N, D] and factors [N, F] with the same N; got "
                         f"{codes.shape}, {factors.shape}")
    varying = np.flatnonzero(factors.max(0) > factors.min(0))
    if varying.size == 0:
        raise ValueError(f"{name}: every factor is constant")
    return codes, factors, varying


def _split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    return order[n_test:], order[:n_test]


def _normalized_entropy(p: np.ndarray, axis: int) -> np.ndarray:
    """Entropy of the distributions along `axis` (rows summing to 1), in base = their length: [0, 1]."""
    k = p.shape[axis]
    if k < 2:
        return np.zeros(p.shape[1 - axis])
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis) / np.log(k)


def dci(codes: np.ndarray, factors: np.ndarray, test_fraction: float = 0.2, seed: int = 0,
        max_factor_values: int = 64) -> dict[str, object]:
    """Disentanglement, completeness and informativeness (see module doc). Importances R are [D, F']
    over the F' non-constant factors; rows of dims no classifier uses count for nothing (rho_j = 0)."""
    from sklearn.ensemble import GradientBoostingClassifier

    codes, factors, varying = _check(codes, factors, "dci")
    labels = factor_labels(factors[:, varying], max_factor_values=max_factor_values)
    train, test = _split(len(codes), test_fraction, seed)
    importance = np.zeros((codes.shape[1], len(varying)))
    accuracy = []
    for k in range(len(varying)):
        model = GradientBoostingClassifier(random_state=seed).fit(codes[train], labels[train, k])
        importance[:, k] = np.abs(model.feature_importances_)
        accuracy.append(float(model.score(codes[test], labels[test, k])))
    total = importance.sum()
    per_dim = importance.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rows = np.where(per_dim[:, None] > 0, importance / per_dim[:, None], 0.0)
        cols = importance / np.where(importance.sum(0) > 0, importance.sum(0), 1.0)
    d_per_dim = 1.0 - _normalized_entropy(rows, axis=1)
    rho = per_dim / total if total > 0 else np.zeros_like(per_dim)
    c_per_factor = 1.0 - _normalized_entropy(cols, axis=0)
    return {"disentanglement": float((rho * d_per_dim).sum()), "completeness": float(c_per_factor.mean()),
            "informativeness": float(np.mean(accuracy)), "importance": importance.tolist(),
            "completeness_per_factor": c_per_factor.tolist(), "accuracy_per_factor": accuracy,
            "factors": varying.tolist(), "estimator": "GradientBoostingClassifier (scikit-learn defaults)",
            "test_fraction": test_fraction, "num_examples": len(codes)}


def factor_vae_score(codes: np.ndarray, factors: np.ndarray, batch_size: int = 64, train_votes: int = 10000,
                     eval_votes: int = 5000, seed: int = 0) -> dict[str, object]:
    """The FactorVAE score (see module doc): majority-vote accuracy on `eval_votes` votes."""
    codes, factors, varying = _check(codes, factors, "factor_vae_score")
    scale = codes.std(0)
    active = np.flatnonzero(scale > 0)
    if active.size == 0:
        return {"score": 0.0, "train_accuracy": 0.0, "active_dims": 0, "votes": [], "factors": varying.tolist()}
    z = codes[:, active] / scale[active]
    # per factor: arrays of example indices sharing one value (a continuous factor, whose values no two
    # examples share, in MIG's 20 bins); a value held by a single example cannot be "fixed" and is left out
    labels = factor_labels(factors[:, varying])
    groups = []
    for k in range(len(varying)):
        for column in (labels[:, k], discretize(factors[:, varying[k]:varying[k] + 1])[:, 0]):  # values, or bins
            order = np.argsort(column, kind="stable")
            found = [g for g in np.split(order, np.flatnonzero(np.diff(column[order])) + 1) if len(g) >= 2]
            if found:
                break
        groups.append(found)
    rng = np.random.default_rng(seed)

    def votes(n: int) -> np.ndarray:
        out = np.zeros((active.size, len(varying)), dtype=np.int64)
        for _ in range(n):
            k = int(rng.integers(len(varying)))
            group = groups[k][int(rng.integers(len(groups[k])))]
            batch = rng.choice(group, size=batch_size, replace=len(group) < batch_size)
            out[int(np.argmin(z[batch].var(0))), k] += 1
        return out

    train, test = votes(train_votes), votes(eval_votes)
    predict = train.argmax(1)  # each active dim votes for its most frequent factor
    correct = lambda v: float(v[np.arange(active.size), predict].sum() / max(v.sum(), 1))  # noqa: E731
    return {"score": correct(test), "train_accuracy": correct(train), "active_dims": int(active.size),
            "votes": test.tolist(), "factors": varying.tolist(), "batch_size": batch_size,
            "train_votes": train_votes, "eval_votes": eval_votes}


def sap(codes: np.ndarray, factors: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> dict[str, object]:
    """SAP (see module doc): mean over factors of the gap between the two best single-dim R^2."""
    codes, factors, varying = _check(codes, factors, "sap")
    if codes.shape[1] < 2:
        raise ValueError("sap needs at least 2 latent dimensions (it is a gap between the top two)")
    _, test = _split(len(codes), test_fraction, seed)
    z, v = codes[test], factors[test][:, varying]
    zc, vc = z - z.mean(0), v - v.mean(0)
    cov = zc.T @ vc / len(z)  # [D, F']
    var_z, var_v = zc.var(0), vc.var(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where((var_z[:, None] > 0) & (var_v[None, :] > 0), cov ** 2 / (var_z[:, None] * var_v[None, :]), 0.0)
    top2 = -np.sort(-r2, axis=0)[:2]
    gaps = top2[0] - top2[1]
    return {"score": float(gaps.mean()), "per_factor": gaps.tolist(), "r2": r2.tolist(), "factors": varying.tolist(),
            "test_fraction": test_fraction, "num_examples": len(codes)}
