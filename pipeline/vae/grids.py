"""Image grids of a VAE: reconstructions, prior samples and latent traversals, as uint8 arrays ready for a PNG
or W&B. Pure torch and numpy: training's ImageLogger and `pipeline.report` draw the same grids with them.

    grids = draw_grids(module, images)          # {"reconstructions", "samples", "traversals"} -> [H, W, 3] uint8
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from pipeline.vae.objectives import decoder_mean

GRID_MIN_SIDE = 64  # px: an 8x8 digit drawn 8x8 is a speck in a viewer or on W&B


def image_grid(images: torch.Tensor, nrow: int, pad: int = 1) -> np.ndarray:
    """[N, C, H, W] floats in [0, 1] -> one [rows*(h+pad)+pad, nrow*(w+pad)+pad, 3] uint8 image, where each
    image is upscaled by an integer factor (nearest neighbour: pixels stay sharp squares) to h, w with
    min(h, w) >= GRID_MIN_SIDE; images that large already keep their size."""
    x = images.detach().float().clamp(0, 1).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    scale = -(-GRID_MIN_SIDE // min(x.shape[-2:]))  # ceil
    if scale > 1:
        x = x.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    n, c, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.ones(3, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def draw_grids(module, images: torch.Tensor, num_images: int = 16, traversal_range: float = 3.0,
               traversal_steps: int = 9, max_traversal_dims: int = 10) -> Dict[str, np.ndarray]:
    """The grids of a VAEModule (its `reconstruct`, `traverse`, `vae.decode`, `model_cfg`) from `images` (uint8
    [N, C, H, W], the first `num_images` used): (input, reconstruction) pairs, 64 decoder means of a fixed prior
    draw (the same z's at every step and for every run compared), and traversals of the first image's mean code,
    one row per latent dim (at most `max_traversal_dims`) from -range to +range in `traversal_steps`. The module
    is put in eval mode meanwhile; the global RNG is left alone."""
    was_training = module.training
    module.eval()
    try:
        # fp32 input (the model casts it to its weights' dtype); fp32 output before the grids (bf16-true)
        x = images[:num_images].to(module.device).float() / 255.0
        recon = module.reconstruct(x).float()
        pairs = torch.stack([x, recon], dim=1).flatten(0, 1)  # input, reconstruction, input, ...
        latent_dim, likelihood = module.model_cfg.latent_dim, module.model_cfg.likelihood
        gen = torch.Generator().manual_seed(0)  # fixed draw; leaves the global RNG alone
        z = torch.randn(64, latent_dim, generator=gen).to(module.device)
        samples = decoder_mean(module.vae.decode(z), likelihood).float()
        dims = list(range(min(latent_dim, max_traversal_dims)))
        values = torch.linspace(-traversal_range, traversal_range, traversal_steps)
        trav = module.traverse(x[:1], dims, values)  # [len(dims) * steps, C, H, W]
    finally:
        module.train(was_training)
    return {
        "reconstructions": image_grid(pairs, nrow=min(2 * x.shape[0], 16)),
        "samples": image_grid(samples, nrow=8),
        "traversals": image_grid(trav, nrow=traversal_steps),
    }
