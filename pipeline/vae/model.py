"""Encoder / decoder / VAE. Takes `ModelConfig` (the `model` section) and the input shape only.

    vae = VAE(cfg.model, input_shape=(1, 28, 28))
    params, mu, logvar, z = vae(x)          # x: float in [0, 1], [B, C, H, W]

`params` is what `objectives.log_likelihood` expects for cfg.likelihood: logits [B, C, H, W]
(bernoulli), the mean [B, C, H, W] (gaussian), or (mean [B, C, H, W], logvar [B, C, H, W] or
[B, C, 1, 1]) (gaussian_learned, per pixel / per channel). No devices or distributed code here.

Precision: inputs of any float dtype are cast to the weights' dtype (bf16-true, 64-true). Under autocast
(bf16-mixed, 16-mixed) the layers whose outputs enter the objective directly run in the weights' dtype
(fp32) with autocast off: the encoder's mu/logvar head, the decoder's final layer and the per-channel
log-variance head (`full_precision`). A decoder mean rounded to bf16 (a step of 2^-8 near 1.0) biases a
Gaussian log-likelihood by ~ulp^2/(24 sigma^2) per pixel, and the rounding cannot be undone by upcasting
later. The modules and state_dict keys are the same as without this.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from torch import nn

from pipeline.config import Arch, Likelihood, choices
from pipeline.vae import objectives

ARCHS = choices(Arch)


def _mlp(widths: Sequence[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def full_precision(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) in the layer's own parameter dtype, with autocast off (fp32 under bf16-mixed / 16-mixed;
    bf16 under bf16-true, where there is nothing wider to run in)."""
    x = x.to(layer.weight.dtype)
    if _autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return layer(x)
    return layer(x)


def num_conv_stages(height: int, width: int, requested: int) -> int:
    """How many stride-2 stages (each ceil-halving H and W) to use: at most `requested`, and none
    once the smaller side has reached 1, so every feature map stays at least 1x1."""
    n = 0
    while n < requested and min(height, width) > 1:
        height, width = math.ceil(height / 2), math.ceil(width / 2)
        n += 1
    return n


class VAE(nn.Module):
    """Gaussian-encoder VAE with an MLP or a strided-conv encoder/decoder.

    cfg: ModelConfig (arch, latent_dim, hidden_dims, conv_channels, likelihood, learned_variance,
    logvar_min, logvar_max). input_shape: (C, H, W) of the data.
    """

    def __init__(self, cfg, input_shape: Sequence[int]):
        super().__init__()
        if cfg.arch not in ARCHS:
            raise ValueError(f"unknown model.arch {cfg.arch!r}; expected one of {ARCHS}")
        if cfg.likelihood not in choices(Likelihood):
            raise ValueError(f"unknown model.likelihood {cfg.likelihood!r}; expected one of {choices(Likelihood)}")
        self.input_shape = tuple(int(s) for s in input_shape)
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {input_shape}")
        self.arch = cfg.arch
        self.latent_dim = int(cfg.latent_dim)
        self.likelihood = cfg.likelihood
        self.learned_variance = cfg.learned_variance
        self.logvar_min, self.logvar_max = float(cfg.logvar_min), float(cfg.logvar_max)
        c, h, w = self.input_shape
        per_pixel_logvar = self.likelihood == "gaussian_learned" and self.learned_variance == "pixel"
        out_channels = 2 * c if per_pixel_logvar else c  # the decoder's image channels

        if self.arch == "mlp":
            hidden = [int(d) for d in cfg.hidden_dims]
            if hidden:
                self.encoder = nn.Sequential(nn.Flatten(), _mlp([c * h * w, *hidden]), nn.SiLU())
            else:  # no hidden layers: linear encoder and decoder
                self.encoder = nn.Flatten()
            enc_features = hidden[-1] if hidden else c * h * w
            self.decoder = nn.Sequential(
                _mlp([self.latent_dim, *reversed(hidden), out_channels * h * w]),
                nn.Unflatten(1, (out_channels, h, w)),
            )
        else:
            chans = [int(ch) for ch in cfg.conv_channels]
            n = num_conv_stages(h, w, len(chans))
            enc: List[nn.Module] = []
            prev = c
            for ch in chans[:n]:
                # k=3, s=2, p=1 gives ceil(H/2): odd sizes (7, 28 -> 14 -> 7 -> 4) never lose a row.
                enc += [nn.Conv2d(prev, ch, 3, stride=2, padding=1), nn.SiLU()]
                prev = ch
            self.encoder = nn.Sequential(*enc, nn.Flatten())
            with torch.no_grad():  # the feature-map size for any input, without arithmetic by hand
                feat_shape = nn.Sequential(*enc)(torch.zeros(1, c, h, w)).shape[1:]
            enc_features = int(math.prod(feat_shape))
            dec_chans = list(reversed(chans[:n])) or chans[:1] or [c]  # n == 0 for 1-pixel-high inputs
            dec: List[nn.Module] = [nn.Linear(self.latent_dim, dec_chans[0] * feat_shape[1] * feat_shape[2]),
                                    nn.SiLU(), nn.Unflatten(1, (dec_chans[0], feat_shape[1], feat_shape[2]))]
            for i in range(n):
                nxt = dec_chans[min(i + 1, n - 1)]
                # k=4, s=2, p=1 doubles exactly; ceil-halving means 2^n * feat >= H, so crop after.
                dec += [nn.ConvTranspose2d(dec_chans[i], nxt, 4, stride=2, padding=1), nn.SiLU()]
            self.decoder = nn.Sequential(*dec)
            self.decoder_out = nn.Conv2d(dec_chans[-1], out_channels, 3, padding=1)
        self.to_mu_logvar = nn.Linear(enc_features, 2 * self.latent_dim)
        # Per-channel observation noise depends on z, as a [B, C, 1, 1] head.
        self.logvar_head = (
            nn.Linear(self.latent_dim, c)
            if self.likelihood == "gaussian_learned" and self.learned_variance == "channel" else None
        )

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: float in [0, 1], [B, C, H, W] -> (mu, logvar), each [B, D]; logvar clamped to
        [logvar_min, logvar_max]."""
        x = x.to(self.to_mu_logvar.weight.dtype)  # the weights' dtype: bf16-true, 64-true
        h = self.encoder(2.0 * x - 1.0)  # centred input conditions the first layer better
        mu, logvar = full_precision(self.to_mu_logvar, h).chunk(2, dim=-1)
        return mu, logvar.clamp(self.logvar_min, self.logvar_max)

    def decode(self, z: torch.Tensor) -> objectives.Params:
        """z: [N, D] (any leading dims, flattened and restored) -> likelihood params, see module doc."""
        lead = z.shape[:-1]
        z = z.reshape(-1, self.latent_dim).to(self.to_mu_logvar.weight.dtype)  # fp32 noise, bf16-true weights
        c, h, w = self.input_shape
        if self.arch == "conv":
            out = full_precision(self.decoder_out, self.decoder(z)[:, :, :h, :w])
        else:  # the MLP's last Linear outside autocast; the same modules (and state_dict keys) as before
            mlp, unflatten = self.decoder
            *body, last = mlp
            out = z
            for layer in body:
                out = layer(out)
            out = unflatten(full_precision(last, out))
        if self.likelihood == "gaussian_learned":
            if self.logvar_head is not None:
                mean, logvar = out, full_precision(self.logvar_head, z)[:, :, None, None]
            else:
                mean, logvar = out[:, :c], out[:, c:]
            logvar = logvar.clamp(self.logvar_min, self.logvar_max)
            return mean.reshape(*lead, *mean.shape[1:]), logvar.reshape(*lead, *logvar.shape[1:])
        return out.reshape(*lead, *out.shape[1:])

    def forward(self, x: torch.Tensor, noise_rows: tuple[int, int] | None = None):
        """x: [B, C, H, W] in [0, 1] -> (params, mu [B, D], logvar [B, D], z [B, D]), z ~ q(z|x); noise_rows:
        see objectives.reparameterize."""
        mu, logvar = self.encode(x)
        z = objectives.reparameterize(mu, logvar, noise_rows)
        return self.decode(z), mu, logvar, z
