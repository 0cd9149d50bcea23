"""Exact evaluation sums and active units: what validation logs and `pipeline.evaluate` reports, in one
place (pure torch and torchmetrics, no Lightning).

    sums = ExactSums(latent_dim)                   # one per stage; keep_codes=True also keeps mean codes (MIG)
    sums.update(terms, iwae, factors)              # per batch: no communication
    mean = sums.means()                            # the epoch's exact means (one sync across ranks)
    active_units(mean["mu_variance"])
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Optional

import torch
import torchmetrics
from torchmetrics.utilities import dim_zero_cat

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016: Var_x(E_q[z_d]) above this counts as active


def active_units(mu_variance: torch.Tensor) -> int:
    """Latent dims in use: Var_x(E_q[z_d|x]) [D] above ACTIVE_UNIT_THRESHOLD (Burda et al. 2016)."""
    return int((mu_variance > ACTIVE_UNIT_THRESHOLD).sum())


class ExactSums(torchmetrics.Metric):
    """Per-example sums over a whole evaluation epoch, summed across ranks at compute().

    States are float64 sums and a count, reduced with `sum`, so the epoch means are exact over all
    examples on all ranks however batches are split (no mean of per-rank or per-batch means).
    update() never communicates; compute() does one gather. keep_codes: also collect the mean codes
    (float32 [N, D]) and ground-truth factors [N, F] of the batches that carry factors, for MIG
    (pipeline.evaluate; concatenated across ranks).
    """

    full_state_update = False
    KEPT = ("codes", "factors")  # with keep_codes: rows, not sums

    def __init__(self, latent_dim: int, keep_codes: bool = False):
        super().__init__()
        f64 = torch.float64
        for name in ("count", "recon", "kl", "elbo", "iwae"):
            self.add_state(name, default=torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        for name in ("kl_dim", "mu", "mu_sq"):  # per latent dim: KL, and sums of mu and mu^2
            self.add_state(name, default=torch.zeros(latent_dim, dtype=f64), dist_reduce_fx="sum")
        self.keep_codes = keep_codes
        if keep_codes:
            for name in self.KEPT:
                self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, terms: Dict[str, torch.Tensor], iwae: Optional[torch.Tensor] = None,
               factors: Optional[torch.Tensor] = None) -> None:
        mu = terms["mu"].double()
        if self.keep_codes and factors is not None:
            self.codes.append(terms["mu"].detach().float())
            self.factors.append(factors.detach().to(mu.device))
        batch = {
            "count": mu.shape[0],  # a Python number: added as a kernel argument, no host-to-device copy
            "recon": terms["recon"].double().sum(),
            "kl": terms["kl"].double().sum(),
            "elbo": terms["elbo"].double().sum(),
            "kl_dim": terms["kl_per_dim"].double().sum(0),
            "mu": mu.sum(0),
            "mu_sq": mu.pow(2).sum(0),
        }
        if iwae is not None:
            batch["iwae"] = iwae.double().sum()
        for name, value in batch.items():
            # Out of place on purpose: the default states can live in memory shared between
            # processes (CPU ddp_spawn pickles them into shared memory), where += would add up
            # every rank's batches before the sync adds them again.
            setattr(self, name, getattr(self, name) + value)

    def compute(self) -> Dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._defaults}

    def means(self) -> Optional[Dict[str, Any]]:
        """The epoch's per-example means (float64 tensors) of every sum, from compute() (the one
        sync), plus `count` (int), `mu_variance` [D] (population variance over examples of each mean
        code dim, Var_x(E_q[z_d|x]), from the exact sums) and, when kept, `codes` and `factors` (all
        rows, in batch order). None when no rank saw an example."""
        with warnings.catch_warnings():  # a rank with no batches still joins the sync
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            sums = self.compute()
        n = sums["count"].item()
        if n == 0:
            return None
        out: Dict[str, Any] = {name: value / n for name, value in sums.items() if name not in ("count", *self.KEPT)}
        out["count"] = int(n)
        out["mu_variance"] = out["mu_sq"] - out["mu"].pow(2)
        for name in self.KEPT:
            if len(sums.get(name, ())):
                out[name] = dim_zero_cat(sums[name])
        return out
