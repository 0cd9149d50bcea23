"""objectives.py against closed forms, torch.distributions and Monte Carlo.

The IWAE tests use a linear-Gaussian model, where log p(x) is known exactly:
    z ~ N(0, I_D),  x = W z + b + s * noise  =>  p(x) = N(b, W W^T + s^2 I),
    posterior N(Sigma W^T (x - b) / s^2, Sigma),  Sigma = (I + W^T W / s^2)^-1.
W has orthogonal columns, so the exact posterior is diagonal (representable by the encoder).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, MultivariateNormal, Normal, kl_divergence

from pipeline.vae import objectives as O

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ---- KL and Gaussian log-densities ------------------------------------------------------------
def test_kl_per_dim_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu = 2 * torch.randn(16, 5, generator=g, dtype=F64)
    logvar = 3 * torch.randn(16, 5, generator=g, dtype=F64)
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), 1.0))
    got = O.kl_per_dim(mu, logvar)
    assert got.shape == (16, 5)
    torch.testing.assert_close(got, expected)


def test_kl_matches_monte_carlo_of_log_densities():
    torch.manual_seed(0)
    mu = torch.tensor([[0.5, -1.0, 2.0]], dtype=F64)
    logvar = torch.tensor([[0.0, -1.5, 0.7]], dtype=F64)
    n = 200_000
    z = O.reparameterize(mu.expand(n, 3), logvar.expand(n, 3))  # [n, 3]
    log_ratio = O.log_normal_diag(z, mu, logvar) - O.log_standard_normal(z)  # [n]
    exact = O.kl_per_dim(mu, logvar).sum().item()
    stderr = log_ratio.std().item() / math.sqrt(n)
    assert abs(log_ratio.mean().item() - exact) < 4 * stderr
    # and the sample moments are the requested ones
    torch.testing.assert_close(z.mean(0), mu[0], atol=0.02, rtol=0)
    torch.testing.assert_close(z.var(0), logvar[0].exp(), atol=0.03, rtol=0.01)


def test_log_normal_diag_supports_leading_sample_dims():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(7, 4, 3, generator=g, dtype=F64)  # [S, B, D]
    mu, logvar = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    expected = Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)
    torch.testing.assert_close(O.log_normal_diag(z, mu, logvar), expected)
    torch.testing.assert_close(O.log_standard_normal(z), Normal(0.0, 1.0).log_prob(z).sum(-1))
    assert O.log_normal_diag(z, mu, logvar).shape == (7, 4)


# ---- likelihoods ------------------------------------------------------------------------------
def _batch(shape=(3, 2, 5, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64) * 3


def test_bernoulli_log_likelihood_matches_torch():
    x, logits = _batch()
    xb = (x > 0.5).to(F64)
    expected = Bernoulli(logits=logits).log_prob(xb).sum((1, 2, 3))
    torch.testing.assert_close(O.log_likelihood(xb, logits, "bernoulli"), expected)
    # fractional targets: the continuous relaxation, x log p + (1 - x) log(1 - p)
    p = torch.sigmoid(logits)
    relaxed = (x * p.log() + (1 - x) * (1 - p).log()).sum((1, 2, 3))
    torch.testing.assert_close(O.log_likelihood(x, logits, "bernoulli"), relaxed)


def test_gaussian_log_likelihood_matches_torch():
    x, mean = _batch()
    expected = Normal(mean, 0.1).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(O.log_likelihood(x, mean, "gaussian", sigma=0.1), expected)


@pytest.mark.parametrize("per", ["pixel", "channel"])
def test_learned_gaussian_log_likelihood_matches_torch(per):
    x, mean = _batch()
    g = torch.Generator().manual_seed(3)
    shape = x.shape if per == "pixel" else (x.shape[0], x.shape[1], 1, 1)
    logvar = torch.randn(shape, generator=g, dtype=F64)
    expected = Normal(mean, (0.5 * logvar).exp().expand_as(x)).log_prob(x).sum((1, 2, 3))
    got = O.log_likelihood(x, (mean, logvar), "gaussian_learned")
    assert got.shape == (x.shape[0],)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian_learned"])
def test_log_likelihood_broadcasts_leading_sample_dims(likelihood):
    x, _ = _batch()
    g = torch.Generator().manual_seed(4)
    mean = torch.randn(6, *x.shape, generator=g, dtype=F64)  # [S, B, C, H, W]
    params = (mean, torch.randn(6, *x.shape[:2], 1, 1, generator=g, dtype=F64)) if likelihood == "gaussian_learned" else mean
    got = O.log_likelihood(x, params, likelihood, 0.2)
    assert got.shape == (6, x.shape[0])
    for s in range(6):
        ps = (params[0][s], params[1][s]) if isinstance(params, tuple) else params[s]
        torch.testing.assert_close(got[s], O.log_likelihood(x, ps, likelihood, 0.2))


def test_extreme_inputs_give_finite_values_and_gradients():
    x = torch.tensor([0.0, 1.0, 0.5, 1.0, 0.0, 0.5]).reshape(6, 1, 1, 1)
    huge = torch.tensor([1e4, -1e4, 1e4, 1e4, -1e4, -1e4]).reshape(6, 1, 1, 1)

    logits = huge.clone().requires_grad_()
    ll = O.log_likelihood(x, logits, "bernoulli")
    ll.sum().backward()
    assert torch.isfinite(ll).all() and torch.isfinite(logits.grad).all()
    assert ll[3] == 0 and ll[4] == 0  # confident and right: 0 nats
    assert ll[0] < -9e3 and ll[1] < -9e3  # confident and wrong: -1e4 nats, not -inf

    mean = huge.clone().requires_grad_()
    ll = O.log_likelihood(x, mean, "gaussian", 0.1)
    ll.sum().backward()
    assert torch.isfinite(ll).all() and torch.isfinite(mean.grad).all()

    for logvar_value in (1e4, -1e4):
        mean = huge.clone().requires_grad_()
        logvar = torch.full_like(huge, logvar_value).requires_grad_()
        ll = O.log_likelihood(x, (mean, logvar), "gaussian_learned")
        ll.sum().backward()
        assert torch.isfinite(ll).all() and torch.isfinite(mean.grad).all() and torch.isfinite(logvar.grad).all()

    mu = torch.tensor([[1e4, -1e4]], requires_grad=True)
    logvar = torch.tensor([[1e4, -1e4]], requires_grad=True)
    kl = O.kl_per_dim(mu, logvar)
    z = O.reparameterize(mu, logvar)
    (kl.sum() + z.sum() + O.log_normal_diag(z, mu, logvar).sum()).backward()
    assert torch.isfinite(kl).all() and torch.isfinite(z).all()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(logvar.grad).all()


def test_decoder_mean():
    _, logits = _batch()
    torch.testing.assert_close(O.decoder_mean(logits, "bernoulli"), torch.sigmoid(logits))
    assert O.decoder_mean(logits, "gaussian") is logits
    assert O.decoder_mean((logits, logits * 0), "gaussian_learned") is logits
    with pytest.raises(ValueError, match="poisson"):
        O.decoder_mean(logits, "poisson")


def test_elbo_terms_are_consistent():
    x, logits = _batch()
    g = torch.Generator().manual_seed(5)
    mu, logvar = torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64)
    t = O.elbo_terms(x, logits, mu, logvar, "bernoulli")
    assert t["recon"].shape == t["kl"].shape == t["elbo"].shape == (3,)
    assert t["kl_per_dim"].shape == (3, 4)
    torch.testing.assert_close(t["recon"], -O.log_likelihood(x, logits, "bernoulli"))
    torch.testing.assert_close(t["kl"], t["kl_per_dim"].sum(-1))
    torch.testing.assert_close(t["elbo"], -(t["recon"] + t["kl"]))
    assert (t["recon"] > 0).all()  # Bernoulli: a probability, so -log p > 0


def test_bits_per_dim():
    nats = torch.tensor([784 * math.log(2), 0.0])
    torch.testing.assert_close(O.bits_per_dim(nats, 784), torch.tensor([1.0, 0.0]))


# ---- the KL penalty ---------------------------------------------------------------------------
def test_kl_penalty_plain_is_weighted_batch_mean_of_summed_kl():
    kl = torch.rand(8, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(O.kl_penalty(kl, 0.3), 0.3 * kl.sum(1).mean())
    # only the batch-mean per-dim KL enters: the [1, D] mean gives the same penalty (exact epoch loss)
    for kwargs in ({}, {"free_bits": 0.5}, {"capacity_nats": 1.0, "gamma": 7.0}):
        torch.testing.assert_close(O.kl_penalty(kl, 0.3, **kwargs), O.kl_penalty(kl.mean(0, keepdim=True), 0.3, **kwargs))


def test_free_bits_zero_gradient_below_floor_nonzero_above():
    # batch-mean KL per dim: 0.1, 0.4 (below a 0.5 floor) and 1.0, 2.0 (above)
    kl = torch.tensor([[0.0, 0.3, 1.5, 2.5], [0.2, 0.5, 0.5, 1.5]], requires_grad=True)
    pen = O.kl_penalty(kl, weight=2.0, free_bits=0.5)
    torch.testing.assert_close(pen, torch.tensor(2.0 * (0.5 + 0.5 + 1.0 + 2.0)))
    pen.backward()
    assert (kl.grad[:, :2] == 0).all()
    torch.testing.assert_close(kl.grad[:, 2:], torch.full((2, 2), 2.0 / 2))  # weight / B
    # through the encoder: a dim whose KL is under the floor gets no gradient at all
    mu = torch.tensor([[0.1, 3.0]], requires_grad=True)
    O.kl_penalty(O.kl_per_dim(mu, torch.zeros_like(mu)), 1.0, free_bits=1.0).backward()
    assert mu.grad[0, 0] == 0 and mu.grad[0, 1] > 0


def test_capacity_penalty_and_gradient_sign():
    mu = torch.tensor([[1.0, -2.0]], requires_grad=True)
    logvar = torch.zeros(1, 2)
    kl_total = O.kl_per_dim(mu, logvar).sum().item()  # 2.5 nats
    for capacity, sign in ((1.0, +1), (4.0, -1)):  # C below the KL pulls KL down, above pushes it up
        mu.grad = None
        pen = O.kl_penalty(O.kl_per_dim(mu, logvar), weight=0.0, capacity_nats=capacity, gamma=10.0)
        torch.testing.assert_close(pen.item(), 10.0 * abs(kl_total - capacity))
        pen.backward()
        torch.testing.assert_close(mu.grad, sign * 10.0 * mu.detach())  # d/dmu of 0.5 mu^2 is mu
    # gamma=None falls back to weight (schedules.kl_weight returns gamma for capacity)
    torch.testing.assert_close(O.kl_penalty(O.kl_per_dim(mu, logvar), 10.0, capacity_nats=1.0),
                               torch.tensor(10.0 * 1.5))
    # free bits combine with capacity: the floor applies before the sum
    kl = torch.tensor([[0.1, 2.0]])
    torch.testing.assert_close(O.kl_penalty(kl, 1.0, capacity_nats=1.0, gamma=3.0, free_bits=0.5),
                               torch.tensor(3.0 * abs(0.5 + 2.0 - 1.0)))


# ---- IWAE on a linear-Gaussian model ----------------------------------------------------------
class LinearGaussian:
    """D=8 latents, x in [B, 1, 3, 4] (P=12), noise std s=0.5; exact log p(x) for B=256 points."""

    def __init__(self, batch=256, latent=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.D, self.P, self.s = latent, 12, 0.5
        q, _ = torch.linalg.qr(torch.randn(self.P, self.P, generator=g, dtype=F64))
        self.W = q[:, :latent] * torch.linspace(0.5, 2.0, latent, dtype=F64)  # orthogonal columns
        self.b = torch.randn(self.P, generator=g, dtype=F64)
        self.Sigma = torch.linalg.inv(torch.eye(latent, dtype=F64) + self.W.T @ self.W / self.s**2)
        assert torch.allclose(self.Sigma, torch.diag(self.Sigma.diag()))  # diagonal: exact q possible
        z = torch.randn(batch, latent, generator=g, dtype=F64)
        flat = z @ self.W.T + self.b + self.s * torch.randn(batch, self.P, generator=g, dtype=F64)
        cov = self.W @ self.W.T + self.s**2 * torch.eye(self.P, dtype=F64)
        self.log_px = MultivariateNormal(self.b, cov).log_prob(flat)  # [B], exact
        self.x = flat.reshape(batch, 1, 3, 4)

    def encoder(self, std_scale=1.0, shift=0.0):
        """The exact posterior (defaults), or a deliberately wider and shifted diagonal q."""
        sd = self.Sigma.diag().sqrt()

        def encode(x):
            mean = (x.reshape(-1, self.P) - self.b) @ self.W @ self.Sigma / self.s**2
            return mean + shift * sd, (2 * (std_scale * sd).log()).expand_as(mean)
        return encode

    def decode(self, z):
        return (z @ self.W.T + self.b).reshape(-1, 1, 3, 4)

    def elbo_closed_form(self, encode):
        """E_q[log p(x|z)] - KL(q || p(z)) in closed form, [B]."""
        mu, logvar = encode(self.x)
        resid = self.x.reshape(-1, self.P) - mu @ self.W.T - self.b
        expected_sq = resid.pow(2).sum(-1) + logvar.exp() @ self.W.pow(2).sum(0)  # + tr(W diag(v) W^T)
        ell = -0.5 * self.P * math.log(2 * math.pi * self.s**2) - expected_sq / (2 * self.s**2)
        return ell - O.kl_per_dim(mu, logvar).sum(-1)


@pytest.fixture(scope="module")
def lg():
    return LinearGaussian()


def test_iwae_with_exact_posterior_is_exact_for_every_sample(lg):
    torch.manual_seed(0)
    for k in (1, 7):
        bound = O.iwae_bound(lg.x, lg.encoder(), lg.decode, "gaussian", lg.s, k=k, chunk_size=3)
        torch.testing.assert_close(bound, lg.log_px, atol=1e-9, rtol=0)  # zero-variance weights


def test_elbo_terms_match_closed_form_elbo(lg):
    encode = lg.encoder(std_scale=2.0, shift=0.5)
    mu, logvar = encode(lg.x)
    torch.manual_seed(0)
    reps = 400
    z = O.reparameterize(mu.expand(reps, *mu.shape), logvar.expand(reps, *mu.shape))  # [reps, B, D]
    params = lg.decode(z.reshape(-1, lg.D)).reshape(reps, *lg.x.shape)
    terms = O.elbo_terms(lg.x, params, mu, logvar, "gaussian", lg.s)
    mc = terms["elbo"].mean(0)  # [B], 400-sample average of the single-sample estimate
    exact = lg.elbo_closed_form(encode)
    stderr = terms["elbo"].std(0).mean().item() / math.sqrt(reps * len(exact))
    assert abs((mc - exact).mean().item()) < 4 * stderr
    assert (exact < lg.log_px).all()


def test_iwae_bounds_order_and_tighten_with_k(lg):
    """ELBO <= IWAE(k) <= log p(x), the gap shrinks with k, and k=1000 is within 0.05 nats."""
    encode = lg.encoder(std_scale=2.0, shift=0.5)
    elbo = lg.elbo_closed_form(encode).mean().item()
    log_px = lg.log_px.mean().item()
    gaps = {}
    for k in (1, 10, 100, 1000):
        torch.manual_seed(k)
        bound = O.iwae_bound(lg.x, encode, lg.decode, "gaussian", lg.s, k=k, chunk_size=250)
        gaps[k] = log_px - bound.mean().item()
    assert log_px - elbo > 5.0  # q is deliberately poor: the k=1 bound is far from tight
    assert abs(gaps[1] - (log_px - elbo)) < 1.0  # IWAE(1) is an unbiased ELBO estimate (stderr ~0.4)
    # measured: gaps ~ 7.4, 1.6, 0.18, 0.001 nats; Monte Carlo stderr of each mean < 0.4, 0.12, 0.04, 0.013
    assert gaps[1] - gaps[10] > 3.0
    assert gaps[10] - gaps[100] > 0.8
    assert gaps[100] - gaps[1000] > 0.08
    assert -0.05 < gaps[1000] < 0.05, gaps


def test_iwae_chunked_equals_unchunked_and_respects_chunk_size(lg):
    encode = lg.encoder(std_scale=2.0, shift=0.5)
    seen = []

    def decode(z):
        seen.append(z.shape[0])
        return lg.decode(z)
    x = lg.x[:32]
    torch.manual_seed(0)
    whole = O.iwae_bound(x, encode, decode, "gaussian", lg.s, k=300, chunk_size=300)
    assert seen == [300 * 32]
    seen.clear()
    torch.manual_seed(0)
    chunked = O.iwae_bound(x, encode, decode, "gaussian", lg.s, k=300, chunk_size=37)
    assert max(seen) == 37 * 32 and sum(seen) == 300 * 32
    torch.testing.assert_close(chunked, whole, atol=1e-10, rtol=0)


def test_iwae_on_bernoulli_decoder_with_tuple_free_params_and_grad():
    """Shape and gradient plumbing with a [B, C, H, W] Bernoulli decoder (params reshaped per chunk)."""
    torch.manual_seed(0)
    x = (torch.rand(4, 1, 5, 5) > 0.5).float()
    lin = torch.nn.Linear(3, 25)
    encode = lambda x: (x.reshape(4, -1)[:, :3], torch.zeros(4, 3))  # noqa: E731
    decode = lambda z: lin(z).reshape(-1, 1, 5, 5)  # noqa: E731
    bound = O.iwae_bound(x, encode, decode, "bernoulli", k=10, chunk_size=4)
    assert bound.shape == (4,) and torch.isfinite(bound).all()
    bound.sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_iwae_draws_noise_in_blocks_whatever_the_chunk_size(lg, monkeypatch):
    """One randn per block of importance samples (k=2500 with blocks of 1024: 3 calls), not one per sample,
    and the same bound for any chunk_size (blocks straddle chunks)."""
    encode = lg.encoder(std_scale=2.0, shift=0.5)
    x = lg.x[:8]
    calls = []
    randn, randn_like = torch.randn, torch.randn_like
    monkeypatch.setattr(torch, "randn", lambda *a, **kw: calls.append(a[0]) or randn(*a, **kw))
    monkeypatch.setattr(torch, "randn_like", lambda *a, **kw: calls.append("like") or randn_like(*a, **kw))
    k = 2500
    assert O.noise_block_samples(k, 8, lg.D) == O.IWAE_NOISE_BLOCK == 1024
    bounds = {}
    for chunk in (2500, 300, 7):
        calls.clear()
        torch.manual_seed(0)
        bounds[chunk] = O.iwae_bound(x, encode, lg.decode, "gaussian", lg.s, k=k, chunk_size=chunk)
        assert [tuple(c) for c in calls] == [(1024, 8, lg.D), (1024, 8, lg.D), (452, 8, lg.D)], chunk
    for chunk in (300, 7):
        torch.testing.assert_close(bounds[chunk], bounds[2500], atol=1e-10, rtol=0)
    assert O.noise_block_samples(5000, 4096, 1024) == 4  # large batches x latents: blocks stay <= 2^24 values


def test_a_ranks_noise_rows_are_its_rows_of_the_global_draw():
    """Elastic resume: rank r of R draws the global batch's noise and keeps rows r*B .. (r+1)*B - 1, the numbers
    one process drawing for the whole batch gives those samples."""
    like = torch.zeros(4, 3)
    torch.manual_seed(7)
    whole = O.noise_rows(torch.randn, torch.zeros(12, 3), None)
    for rank in range(3):
        torch.manual_seed(7)
        assert torch.equal(O.noise_rows(torch.randn, like, (4 * rank, 12)), whole[4 * rank:4 * rank + 4])
    torch.manual_seed(7)
    mu = torch.zeros(4, 3)
    z = O.reparameterize(mu, torch.zeros(4, 3), (4, 12))
    assert torch.equal(z, whole[4:8])


def test_training_loss_trims_give_the_same_values_and_gradients():
    """#23: the Bernoulli recon negated after the sum, kl_penalty without its x 1.0, and uint8 / 255 in one kernel
    give bit-identical values and gradients to the per-pixel negation, the multiplication and the cast first."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (8, 1, 5, 5), dtype=torch.uint8)
    assert torch.equal(x / 255.0, x.float() / 255.0)
    xf = x.float() / 255.0
    logits = torch.randn(8, 1, 5, 5, requires_grad=True)
    recon = O.elbo_terms(xf, logits, torch.zeros(8, 2), torch.zeros(8, 2), "bernoulli")["recon"]
    before = -(-F.binary_cross_entropy_with_logits(logits, xf, reduction="none")).sum(dim=(-3, -2, -1))
    assert torch.equal(recon, before)
    g1, = torch.autograd.grad(recon.sum(), logits)
    g2, = torch.autograd.grad(before.sum(), logits)
    assert torch.equal(g1, g2)
    kl = torch.rand(8, 3, requires_grad=True)
    assert torch.equal(O.kl_penalty(kl, 1.0), 1.0 * kl.mean(0).sum())
