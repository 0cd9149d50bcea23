"""Every precision the config accepts trains (CPU here), and bf16-mixed computes the objective's inputs in fp32.

Under autocast the layers whose outputs enter the ELBO directly (the mu/logvar head, the decoder's final layer,
the per-channel log-variance head) run in fp32 with autocast off, and the reparameterisation noise is fp32: a
decoder mean rounded to bf16 biases a Gaussian log-likelihood and no later upcast can undo it.
"""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.config import ModelConfig, Precision, choices
from pipeline.training.callbacks import ImageLogger
from pipeline.training.module import VAEModule
from pipeline.vae import objectives as O
from pipeline.vae.model import VAE

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SHAPE = (1, 8, 8)
WEIGHT_DTYPE = {"32-true": torch.float32, "bf16-mixed": torch.float32, "16-mixed": torch.float32,
                "bf16-true": torch.bfloat16, "64-true": torch.float64}


def batches(n=64, shape=SHAPE):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(n, *shape, generator=g) * 255).round().to(torch.uint8)
    return DataLoader([{"image": im} for im in images], batch_size=16)


class Seen(pl.Callback):
    def __init__(self):
        self.losses, self.dtypes = [], set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.dtypes.add(pl_module.vae.to_mu_logvar.weight.dtype)


def test_the_table_covers_every_configurable_precision():
    assert set(WEIGHT_DTYPE) == set(choices(Precision))


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("precision", choices(Precision))
def test_every_precision_trains_validates_and_draws_image_grids(precision, arch, tmp_path: Path):
    torch.manual_seed(0)
    model = {"arch": arch, "latent_dim": 3, "hidden_dims": [32, 16], "conv_channels": [8, 16]}
    module = VAEModule(model, {}, {"lr": 1e-2}, SHAPE, max_steps=8)
    seen = Seen()
    images = ImageLogger(tmp_path / "images", every_n_steps=4, num_images=4)
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=8, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, val_check_interval=4, log_every_n_steps=1,
                         callbacks=[seen, images])
    trainer.fit(module, train_dataloaders=batches(), val_dataloaders=batches(32))
    assert len(seen.losses) == 8 and all(torch.isfinite(torch.tensor(seen.losses)))
    assert seen.dtypes == {WEIGHT_DTYPE[precision]}
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["val/elbo"])))
    assert len(list((tmp_path / "images").glob("reconstructions_step*.png"))) == 2


def _elbo(vae, x, likelihood, autocast: bool, sigma=0.1):
    torch.manual_seed(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        params, mu, logvar, _ = vae(x)
        terms = O.elbo_terms(x, params, mu, logvar, likelihood, sigma)
    return terms["elbo"].double().mean().item()


# Measured (conv 3x64x64, latent 10, 16 images of uniform pixels, default init, seeds as below):
#   gaussian sigma 0.1: bf16-mixed - fp32 = 7.17 nats per example before, 0.59 after (ELBO ~ -1.9e5)
#   bernoulli:          0.0063 before, 0.00037 after (rounded logits are not biased the way a Gaussian mean is)
@pytest.mark.parametrize("likelihood,tolerance", [("gaussian", 1.5), ("bernoulli", 0.002)])
def test_bf16_mixed_elbo_matches_fp32(likelihood, tolerance):
    torch.manual_seed(0)
    vae = VAE(ModelConfig(arch="conv", latent_dim=10, likelihood=likelihood, gaussian_sigma=0.1), (3, 64, 64))
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(16, 3, 64, 64, generator=g) * 255).round() / 255
    gap = _elbo(vae, x, likelihood, autocast=True) - _elbo(vae, x, likelihood, autocast=False)
    assert abs(gap) < tolerance, gap


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("likelihood,variance", [("gaussian", "pixel"), ("gaussian_learned", "pixel"),
                                                 ("gaussian_learned", "channel")])
def test_heads_final_layer_and_noise_are_fp32_under_autocast(arch, likelihood, variance):
    cfg = ModelConfig(arch=arch, latent_dim=4, likelihood=likelihood, learned_variance=variance,
                      hidden_dims=[32], conv_channels=[8, 16])
    vae = VAE(cfg, (1, 16, 16))
    keys = set(vae.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        params, mu, logvar, z = vae(torch.rand(2, 1, 16, 16))
        inner = vae.encoder(torch.rand(2, 1, 16, 16))
    assert inner.dtype == torch.bfloat16  # autocast is on for the body
    outputs = [mu, logvar, z] + (list(params) if isinstance(params, tuple) else [params])
    assert [t.dtype for t in outputs] == [torch.float32] * len(outputs)
    assert set(VAE(cfg, (1, 16, 16)).state_dict()) == keys  # old checkpoints load


def test_noise_is_drawn_in_fp32_for_bf16_codes_and_unchanged_for_fp32():
    mu, logvar = torch.zeros(3, 5), torch.zeros(3, 5)
    torch.manual_seed(4)
    z32 = O.reparameterize(mu, logvar)
    torch.manual_seed(4)
    assert torch.equal(z32, torch.randn_like(mu))  # the same draws as before for fp32
    torch.manual_seed(4)
    z16 = O.reparameterize(mu.bfloat16(), logvar.bfloat16())
    assert z16.dtype == torch.float32 and torch.equal(z16, z32)
