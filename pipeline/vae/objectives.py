"""VAE objectives: pure torch math, no Lightning, no state.

Units: every quantity returned here is in **nats per example**, summed over data dimensions
(C*H*W) and over latent dimensions (D); nothing is averaged over pixels. Batch reductions (the mean
over examples in the training loss) are the caller's, except in `kl_penalty`, which returns the
scalar KL part of the training loss.

Shapes: x is float in [0, 1], [B, C, H, W]; mu / logvar / z are [B, D]. Functions documented as
supporting leading sample dims take [S, B, ...] and broadcast x over S (IWAE).

    terms = elbo_terms(x, params, mu, logvar, "bernoulli")
    loss = terms["recon"].mean() + kl_penalty(terms["kl_per_dim"], weight=beta)
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from pipeline.config import Likelihood, choices

Tensor = torch.Tensor
Params = Union[Tensor, Tuple[Tensor, Tensor]]  # logits | mean | (mean, logvar)

LIKELIHOODS = choices(Likelihood)
_LOG_2PI = math.log(2.0 * math.pi)
# Last-resort guard on every log-variance so exp() can neither overflow nor underflow to 0 in
# float32. The model applies the configured (much tighter) clamp; this one only bites on absurd
# inputs, where it keeps values and gradients finite.
LOGVAR_GUARD = 30.0


def _guard(logvar: Tensor) -> Tensor:
    return logvar.clamp(-LOGVAR_GUARD, LOGVAR_GUARD)


def _upcast(t: Tensor) -> Tensor:
    # Sums over thousands of pixels in bf16/fp16 lose whole nats; float64 stays float64.
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def reparameterize(mu: Tensor, logvar: Tensor, rows: tuple[int, int] | None = None) -> Tensor:
    """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I) from the global torch RNG. [..., D] -> [..., D].
    eps and z are at least fp32 (bf16 / fp16 mu and logvar are widened first): the same draws as
    randn_like(mu) for fp32 and fp64. `rows` = (offset, total): eps is drawn for `total` rows and rows
    offset .. offset + B-1 are used (a rank's share of the global batch's noise)."""
    mu, logvar = _upcast(mu), _upcast(logvar)
    return mu + torch.exp(0.5 * _guard(logvar)) * noise_rows(torch.randn, mu, rows)


def noise_rows(draw: Callable, like: Tensor, rows: tuple[int, int] | None) -> Tensor:
    """`draw(shape)` (torch.randn, torch.rand) shaped like `like`, or rows offset .. offset + B-1 of a draw
    for `total` rows: the same numbers a single process drawing for the whole global batch gets."""
    if rows is None or rows == (0, like.shape[0]):
        return draw(like.shape, dtype=like.dtype, device=like.device)
    offset, total = rows
    return draw((total, *like.shape[1:]), dtype=like.dtype, device=like.device)[offset:offset + like.shape[0]]


def kl_per_dim(mu: Tensor, logvar: Tensor) -> Tensor:
    """Analytic KL(N(mu, diag exp(logvar)) || N(0, I)) per latent dim, in nats. [B, D] -> [B, D]."""
    mu, logvar = _upcast(mu), _guard(_upcast(logvar))
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def log_normal_diag(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, diag exp(logvar)) summed over the last dim, in nats. [..., D] -> [...]."""
    logvar = _guard(logvar)
    return -0.5 * (_LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def log_standard_normal(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dim, in nats. [..., D] -> [...]."""
    return -0.5 * (_LOG_2PI + z.pow(2)).sum(-1)


def log_likelihood(x: Tensor, params: Params, likelihood: str, sigma: float = 0.1) -> Tensor:
    """log p(x | z) summed over the last three (C, H, W) dims, in nats per example.

    x: float in [0, 1], [B, C, H, W] (or [..., C, H, W]); params has leading dims that broadcast
    with x, e.g. [S, B, C, H, W] against x [B, C, H, W] gives [S, B].
      bernoulli         params = logits; x may be fractional (the usual continuous relaxation).
      gaussian          params = mean; fixed std `sigma`.
      gaussian_learned  params = (mean, logvar); logvar [.., C, H, W] (per pixel) or [.., C, 1, 1]
                        (per channel), guarded against overflow.
    Returns broadcast(x, params).shape[:-3], e.g. [B].
    """
    x = _upcast(x)
    if likelihood == "bernoulli":
        return -_bernoulli_nll(x, params)
    if likelihood == "gaussian":
        mean = _upcast(params)
        ll = -0.5 * ((x - mean) / sigma).pow(2) - math.log(sigma) - 0.5 * _LOG_2PI
    elif likelihood == "gaussian_learned":
        mean, logvar = params
        mean, logvar = _upcast(mean), _guard(_upcast(logvar))
        # A per-channel [.., C, 1, 1] logvar broadcasts, so its log-normaliser counts once per pixel.
        ll = -0.5 * (_LOG_2PI + logvar + (x - mean).pow(2) * torch.exp(-logvar))
    else:
        raise ValueError(f"unknown likelihood {likelihood!r}; expected one of {LIKELIHOODS}")
    return ll.sum(dim=(-3, -2, -1))


def _bernoulli_nll(x: Tensor, logits: Tensor) -> Tensor:
    """-log p(x | logits) summed over (C, H, W), [...]. BCE-with-logits is the stable log-sigmoid form: finite for
    logits of +-1e4. Negated after the sum, not per pixel: the same values (negation is exact), two fewer
    [B, C, H, W] kernels per step (forward and backward)."""
    logits = _upcast(logits)
    if logits.shape != x.shape:
        logits, x = torch.broadcast_tensors(logits, x)
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=(-3, -2, -1))


def neg_log_likelihood(x: Tensor, params: Params, likelihood: str, sigma: float = 0.1) -> Tensor:
    """-log_likelihood (recon, nats per example), without negating a Bernoulli likelihood twice."""
    if likelihood == "bernoulli":
        return _bernoulli_nll(_upcast(x), params)
    return -log_likelihood(x, params, likelihood, sigma)


def decoder_mean(params: Params, likelihood: str) -> Tensor:
    """Image-space mean E[x | z], [B, C, H, W]: sigmoid(logits) or the Gaussian mean (not clamped;
    clamp to [0, 1] for display)."""
    if likelihood == "bernoulli":
        return torch.sigmoid(params)
    if likelihood == "gaussian":
        return params
    if likelihood == "gaussian_learned":
        return params[0]
    raise ValueError(f"unknown likelihood {likelihood!r}; expected one of {LIKELIHOODS}")


def elbo_terms(
    x: Tensor, params: Params, mu: Tensor, logvar: Tensor, likelihood: str, sigma: float = 0.1
) -> Dict[str, Tensor]:
    """The per-example ELBO pieces, in nats per example, from one sample z ~ q(z|x) (params = decode(z)).

    Returns recon [B] = -log p(x|z), kl [B] = KL(q(z|x) || p(z)), kl_per_dim [B, D], and
    elbo [B] = -(recon + kl): always the true (beta = 1) single-sample ELBO estimate, whatever the
    training weight on the KL.
    """
    recon = neg_log_likelihood(x, params, likelihood, sigma)
    kpd = kl_per_dim(mu, logvar)
    kl = kpd.sum(-1)
    return {"recon": recon, "kl": kl, "kl_per_dim": kpd, "elbo": -(recon + kl)}


def kl_penalty(
    kl_per_dim: Tensor,
    weight: float,
    capacity_nats: Optional[float] = None,
    gamma: Optional[float] = None,
    free_bits: float = 0.0,
) -> Tensor:
    """The KL part of the training loss (a scalar, nats per example); loss = mean_b(recon) + this.

    kl_per_dim: [B, D] nats. With m_d = mean_b kl[b, d], the KL term is
      KLterm = sum_d m_d                       if free_bits == 0
      KLterm = sum_d max(m_d, free_bits)       otherwise (Kingma et al. 2016: a floor of
               `free_bits` nats per latent dim on the batch-mean KL; dims under it get zero gradient)
    and the penalty is
      weight * KLterm                          if capacity_nats is None
      gamma * |KLterm - capacity_nats|         otherwise (Burgess et al. 2018); gamma=None uses
                                               `weight` (schedules.kl_weight returns gamma then).
    Only the batch-mean per-dim KL enters, so calling this with the [1, D] mean over a whole data
    set gives that data set's exact penalty.
    """
    mean_kl = kl_per_dim.mean(0)  # [D]
    if free_bits > 0:
        mean_kl = mean_kl.clamp(min=free_bits)
    term = mean_kl.sum()
    if capacity_nats is None:
        return term if weight == 1.0 else weight * term  # x * 1.0 is x: one kernel less each way
    return (weight if gamma is None else gamma) * (term - capacity_nats).abs()


def iwae_bound(
    x: Tensor,
    encode: Callable[[Tensor], Tuple[Tensor, Tensor]],
    decode: Callable[[Tensor], Params],
    likelihood: str,
    sigma: float = 0.1,
    k: int = 5000,
    chunk_size: int = 100,
) -> Tensor:
    """Importance-weighted bound (Burda et al. 2016), nats per example, [B]:

        log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x),   z_i ~ q(z|x)

    k=1 is a single-sample ELBO estimate; the bound rises to log p(x) as k grows. Samples are
    decoded `chunk_size` at a time (decode sees [chunk*B, D]) and a running logsumexp is kept, so
    k=5000 fits in memory. The noise is drawn in blocks of `noise_block_samples(k, B, D)` samples, one
    randn([n, B, D]) each (in order, from the global RNG, fp32 or wider), whatever chunk_size: the result
    does not depend on it, and k=5000 is a handful of kernels, not one per sample. Wrap in
    torch.no_grad() for evaluation; gradients flow otherwise.
    """
    if k < 1 or chunk_size < 1:
        raise ValueError(f"iwae_bound needs k >= 1 and chunk_size >= 1, got k={k}, chunk_size={chunk_size}")
    mu, logvar = encode(x)
    mu, logvar = _upcast(mu), _upcast(logvar)
    std = torch.exp(0.5 * _guard(logvar))
    batch = mu.shape[0]
    total = torch.full((batch,), -math.inf, dtype=mu.dtype, device=mu.device)
    noise = _noise_blocks(k, mu)
    for start in range(0, k, chunk_size):
        n = min(chunk_size, k - start)
        eps = noise(n)  # [n, B, D]
        z = mu + std * eps
        params = decode(z.reshape(n * batch, -1))
        if isinstance(params, tuple):
            params = tuple(p.reshape(n, batch, *p.shape[1:]) for p in params)
        else:
            params = params.reshape(n, batch, *params.shape[1:])
        log_w = (
            log_likelihood(x, params, likelihood, sigma)
            + log_standard_normal(_upcast(z))
            - log_normal_diag(_upcast(z), _upcast(mu), _upcast(logvar))
        )  # [n, B]
        total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
    return total - math.log(k)


IWAE_NOISE_BLOCK = 1024  # importance samples per randn call, at most
IWAE_NOISE_ELEMENTS = 2**24  # and at most this many noise values (64 MB of fp32) per block


def noise_block_samples(k: int, batch: int, dim: int) -> int:
    """Importance samples drawn per randn call in iwae_bound: at most IWAE_NOISE_BLOCK, at most
    IWAE_NOISE_ELEMENTS values, at least one."""
    return max(1, min(k, IWAE_NOISE_BLOCK, IWAE_NOISE_ELEMENTS // max(1, batch * dim)))


def _noise_blocks(k: int, like: Tensor) -> Callable[[int], Tensor]:
    """next(n) -> the next n of k noise draws [n, *like.shape], served from blocks of noise_block_samples
    draws (one randn each), so the draws depend on k and the shape only, not on how they are taken."""
    block = noise_block_samples(k, like.shape[0], like[0].numel())
    held: list = [like.new_empty((0, *like.shape)), 0]  # current block, draws made so far

    def take(n: int) -> Tensor:
        parts = []
        while n > 0:
            if len(held[0]) == 0:
                size = min(block, k - held[1])
                held[0] = torch.randn((size, *like.shape), dtype=like.dtype, device=like.device)
                held[1] += size
            part, held[0] = held[0][:n], held[0][n:]
            parts.append(part)
            n -= len(part)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    return take


def bits_per_dim(nats: Tensor, num_dims: int) -> Tensor:
    """nats per example [B] -> bits per data dim [B]: nats / (num_dims * ln 2).

    For Gaussian likelihoods on [0, 1]-scaled data this is a continuous density; add 8 (bits of the
    1/256 bin width) per dim to compare with discrete 8-bit results.
    """
    return nats / (num_dims * math.log(2.0))
