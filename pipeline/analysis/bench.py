"""Throughput of the training pipeline as ratios against baselines measured in the same run.

    python -m pipeline.bench                                  # CPU: digits MLP, dSprites conv, Fashion-MNIST MLP
    python -m pipeline.bench --device cuda --out bench.json   # adds bf16-mixed (and --compile) on a GPU
    python -m pipeline.bench --presets digits --steps 50 --no-ddp   # a quick look
    python -m pipeline.bench --ablations                      # where the pipeline's time goes (see below)
    python -m pipeline.bench profile                          # ms per step: loop, callbacks, logging, optimizer, data
    python -m pipeline.bench loader --root data/dsprites --batches 300   # the training loader alone, samples/s
    python -m pipeline.bench images                           # loader on 64x64 JPEG shards vs PIL alone; formats

Per preset (the repo's configs/digits.yaml, configs/dsprites_beta.yaml and configs/fashion_mnist.yaml as they are:
model, batch size, optimizer, loader settings; fashion on generated images of Fashion-MNIST's shape), every
figure is a ratio of two measurements taken here, now:
  pipeline_vs_bare   images/s of the full pipeline (pipeline.training.train's Trainer, callbacks and CSV logger,
                     ShardDataModule over the WebDataset shards) against a bare PyTorch loop over the
                     same training images held in memory as one uint8 tensor: same model, batch size,
                     optimizer (AdamW), loss and device; the loop slices a random permutation per epoch.
  pipeline_vs_peer_loop  images/s of the same pipeline run against the loop the popular VAE libraries' trainers
                     write (measure_peer_loop: DataLoader(shuffle=True) over a float tensor, torch's default
                     AdamW, their per-batch loss), same model, initial weights and steps; digits and fashion
                     (the plain ELBO). Both runs' val ELBO after those steps is compared (val_elbo: equal within
                     1% or 0.5 nats, ELBO_TOLERANCE).
  lightning_floor_vs_bare  a minimal LightningModule doing the bare loop's work (no callbacks, logger,
                     checkpointing or progress bar) against the bare loop: Lightning's own per-step cost,
                     the ceiling for pipeline_vs_bare (fp32 only).
  loader_vs_raw      samples/s of the training loader alone (decode, shuffle blocks, batch in workers;
                     data.cache=none, so the shards are read as any split too large to hold is)
                     against reading the same shards' samples as raw bytes (tar parsing, no decoding),
                     in one process.
  loader_vs_bytes    the same loader samples/s against the physical limit: reading the shard files' bytes
                     (1 MiB reads, page cache warm, one process), as samples/s (file bytes per sample).
  cached_loader_vs_raw  the training loader as the preset configures it (data.cache=auto: held in memory
                     when the split is small) against the same raw read.
  ddp_2_vs_1         pipeline images/s (all ranks) with 2 DDP ranks against 1, CPU + gloo, each rank
                     with data.batch_size; run as subprocesses (Lightning relaunches this module).
  bf16_*             on a GPU (or with --bf16): the same with trainer.precision=bf16-mixed, the bare
                     loop under torch.autocast(bfloat16);
  compile_*          with --compile: also torch.compile of the VAE in both (bf16 where bf16 runs).
Timing excludes start-up: the clock starts after `--warmup` optimizer steps and stops after `--steps` more,
so it covers exactly `--steps` batches (loading included). Validation, checkpoints and image grids are
pushed outside the window; everything else runs as configured. Pipeline and bare runs alternate
`--repeats` times and the median is kept, since other processes on the machine shift both alike.

--ablations re-measures the pipeline with one setting changed at a time (data.cache=none, num_workers 0/1,
logging every 1000 steps, no progress bar, one intra-op thread in the training process) against the default.

Writes JSON (--out, default bench.json): settings, every measurement (images/s, samples/s, seconds)
and the ratios, flat under "ratios" ("digits/pipeline_vs_bare", ...).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.run.files import write_json_atomic

PRESETS: dict[str, dict[str, Any]] = {
    # name: the config file used as is, the recipe, the subset prepared for benchmarking, and default
    # timed / warm-up steps sized for ~3 minutes in all on 2 CPU cores (digits: ~3 ms per step;
    # dSprites conv: ~330 ms per step)
    "digits": {"config": "configs/digits.yaml", "dataset": "digits", "limit": None, "steps": 300, "warmup": 10},
    "dsprites": {"config": "configs/dsprites_beta.yaml", "dataset": "dsprites", "limit": 6000, "steps": 40,
                 "warmup": 5},
    # Fashion-MNIST's shape and split (1x28x28, 53,000 training images) and configs/fashion_mnist.yaml's MLP,
    # on generated images (generate_fashion_like): the real files are not needed to time it (~5 ms per step)
    "fashion": {"config": "configs/fashion_mnist.yaml", "dataset": "npz", "limit": None, "steps": 300,
                "warmup": 10, "generate": "fashion"},
}
PEER_PRESETS = ("digits", "fashion")  # the plain ELBO with a Bernoulli decoder: the peer-style loop's loss
# Equal val ELBO at equal steps: within 1% of the peer's or 0.5 nats, whichever is larger (both start from the
# same weights; data order and noise differ, which moves a 310-step ELBO by less than this)
ELBO_TOLERANCE, ELBO_TOLERANCE_NATS = 0.01, 0.5
FASHION_SAMPLES = 66_250  # 53,000 train after prepare's 10% val and 10% test
REPO = Path(__file__).resolve().parents[2]
# --clock: what the training loops' timing windows read. cpu: this process's CPU seconds, which other processes
# on a shared machine inflate far less than wall time (use one intra-op thread, OMP_NUM_THREADS=1: spinning
# OpenMP threads burn CPU while they wait)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_CLOCK = {"now": CLOCKS["wall"]}


def clock() -> float:
    return _CLOCK["now"]()
FAR = 10**9  # a step interval that never fires inside the timed window


# ------------------------------------------------------------------------------------------ set-up
def prepare_data(preset: str, data_dir: Path) -> Path:
    """The preset's shards under data_dir/<preset> (prepared once, reused)."""
    from pipeline.data.prepare import prepare
    from pipeline.data.shards import MANIFEST

    p = PRESETS[preset]
    root = data_dir / preset
    if not (root / MANIFEST).is_file():
        source = generate_fashion_like(data_dir / "fashion-like.npz") if p.get("generate") else None
        prepare(p["dataset"], root, source=None if source is None else str(source), limit=p["limit"],
                progress=False)
    return root


def generate_fashion_like(path: Path, n: int = FASHION_SAMPLES, seed: int = 0) -> Path:
    """An .npz of n uint8 1x28x28 images with labels, Fashion-MNIST's shape: ten smooth random templates
    (one per class), each image one of them shifted, scaled in brightness and with pixel noise, so a VAE has
    structure to learn and a val ELBO that moves with training. Written once."""
    import numpy as np

    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    coarse = rng.random((10, 7, 7))
    templates = np.clip(coarse.repeat(4, 1).repeat(4, 2) * 1.6 - 0.4, 0, 1)  # blocky garments on black
    labels = rng.integers(0, 10, n)
    shift = rng.integers(-2, 3, (n, 2))
    images = np.empty((n, 1, 28, 28), np.uint8)
    for c in range(10):  # vectorised per class: rolls by one of 25 shifts
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                i = np.flatnonzero((labels == c) & (shift[:, 0] == dy) & (shift[:, 1] == dx))
                base = np.roll(templates[c], (dy, dx), (0, 1))
                pix = base[None] * rng.uniform(0.6, 1.0, (len(i), 1, 1)) + rng.normal(0, 0.08, (len(i), 28, 28))
                images[i, 0] = np.rint(np.clip(pix, 0, 1) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images, labels=labels.astype(np.int64))
    return path


def bench_config(preset: str, root: Path, run_dir: Path, device: str, steps: int, warmup: int,
                 extra: Sequence[str] = ()):
    """The preset's config with only what benchmarking needs changed: data location, device, length,
    no W&B, and validation / checkpoints / images outside the timed window."""
    from pipeline.config import load_config

    overrides = [f"data.root={root}", f"run.dir={run_dir}", f"trainer.accelerator={device}", "trainer.devices=1",
                 f"trainer.max_steps={warmup + steps}", "logger.wandb.mode=disabled",
                 f"trainer.val_check_interval={FAR}", f"checkpoint.every_n_steps={FAR}",
                 "checkpoint.save_best=false", "logger.images_every_n_steps=0", *extra]
    return load_config([REPO / PRESETS[preset]["config"]], overrides)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------ measurements
def make_timer(warmup: int, device: str):
    """A Callback timing the optimizer steps after `warmup`: from the end of step `warmup` to the end of
    the last step (trainer.max_steps), counting the images of the batches in between (all ranks: x world
    size). The device is synchronised at the window's two ends only, as in `measure_bare`: a sync after
    every step would keep the host from queueing ahead on a GPU and bias the ratio against the pipeline."""
    from lightning.pytorch import Callback

    class StepTimer(Callback):
        def __init__(self):
            self.start: float | None = None
            self.end: float | None = None
            self.images = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.start is not None:
                self.images += int(batch["image"].shape[0]) * trainer.world_size
            step = trainer.global_step
            if (self.start is None and step >= warmup) or (self.start is not None and step >= trainer.max_steps):
                _sync(device)
                now = clock()
                if self.start is None:
                    self.start = now
                else:
                    self.end = now

        def result(self) -> dict[str, float]:
            if self.start is None or self.end is None:
                raise RuntimeError("the timed window never closed: increase --steps")
            seconds = self.end - self.start
            return {"images": self.images, "seconds": seconds, "images_per_s": self.images / seconds}

    return StepTimer()


def build_pipeline(cfg, extra_callbacks: Sequence = ()):
    """(trainer, module, datamodule) as pipeline.training.train builds them (its callbacks and CSV logger, the
    ShardDataModule), with `extra_callbacks` after its own."""
    import lightning.pytorch as pl

    from pipeline import config as C
    from pipeline.data.datamodule import ShardDataModule
    from pipeline.run.rundir import RunDir
    from pipeline.training.module import VAEModule
    from pipeline.training.train import build_callbacks, build_loggers, build_trainer

    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = ShardDataModule(cfg.data)
    module = VAEModule(C.to_object(cfg.model), C.to_object(cfg.objective), C.to_object(cfg.optim),
                       input_shape=tuple(dm.input_shape), max_steps=cfg.trainer.max_steps, binarize=cfg.data.binarize)
    loggers, _ = build_loggers(cfg, RunDir(run_dir))
    trainer = build_trainer(cfg, run_dir, loggers, build_callbacks(cfg, run_dir) + list(extra_callbacks))
    return trainer, module, dm


def measure_pipeline(cfg, warmup: int, device: str, compile_model: bool = False,
                     torch_threads: int | None = None, val_images=None) -> dict[str, float]:
    """Images/s of pipeline.training.train's Trainer (its callbacks and CSV logger) over the ShardDataModule
    (and with val_images, the val ELBO after the run: val_elbo). torch_threads: intra-op threads of this process
    for the run (an ablation); None leaves them."""
    import torch

    timer = make_timer(warmup, device)
    trainer, module, dm = build_pipeline(cfg, [timer])
    if compile_model:
        module.vae.compile()
    threads = torch.get_num_threads()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    try:
        trainer.fit(module, datamodule=dm)
    finally:
        torch.set_num_threads(threads)
    return _with_val_elbo(timer.result(), module.vae, val_images, cfg)


def load_train_images(root: Path, split: str = "train"):
    """Every image of a prepared dataset's split as one uint8 tensor [N, C, H, W] (raw shard read)."""
    import numpy as np
    import torch

    from pipeline.data import shards

    manifest = shards.load_manifest(root / shards.MANIFEST)
    images = []
    for s in manifest["splits"][split]["shards"]:
        with open(root / s["name"], "rb") as f:
            images += [shards.decode_sample(raw)[0] for raw in shards.iter_tar_samples(f, s["name"])]
    return torch.from_numpy(np.stack(images))


def pipeline_adamw(cfg, params, device_type: str, precision: str):
    """AdamW as the pipeline makes it for this device (fused where accel.fused_adamw says so): the bare loop and
    the minimal LightningModule use the same optimizer, so their ratios measure the loop, not the optimizer."""
    import torch

    from pipeline.training import accel

    o = cfg.optim
    fused = accel.fused_adamw({device_type}, precision, cfg.optim.grad_clip_norm, o.grad_skip_norm is not None)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, fused=fused or None)


def measure_bare(cfg, images, warmup: int, steps: int, device: str, precision: str = "32-true",
                 compile_model: bool = False) -> dict[str, float]:
    """Images/s of a plain PyTorch loop: the same VAE, AdamW (fused as the pipeline's: pipeline_adamw), batch size
    and loss (recon mean + KL weight
    x KL from pipeline.vae.objectives / schedules), batches sliced from an in-memory uint8 tensor [N, C, H, W]
    by a fresh permutation each epoch, moved to the device and scaled there."""
    import torch

    from pipeline.training.module import set_grads_to_none
    from pipeline.vae import objectives, schedules
    from pipeline.vae.model import VAE

    torch.manual_seed(cfg.seed)
    dev = torch.device(device)
    vae = VAE(cfg.model, tuple(images.shape[1:])).to(dev)
    if compile_model:
        vae.compile()
    opt = pipeline_adamw(cfg, vae.parameters(), dev.type, precision)
    B, n = cfg.data.batch_size, len(images)
    per_epoch = n // B
    amp = precision.startswith("bf16")
    perm, start = None, None
    for step in range(warmup + steps):
        if step % per_epoch == 0:
            perm = torch.randperm(n)
        idx = perm[(step % per_epoch) * B:(step % per_epoch + 1) * B]
        x = images[idx].to(dev, non_blocking=True) / 255.0  # float32, one kernel, as the pipeline's to_float
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            params, mu, logvar, _ = vae(x)
            terms = objectives.elbo_terms(x, params, mu, logvar, cfg.model.likelihood, cfg.model.gaussian_sigma)
            weight = schedules.kl_weight(step, cfg.objective, cfg.trainer.max_steps)
            loss = terms["recon"].mean() + objectives.kl_penalty(terms["kl_per_dim"], weight)
        set_grads_to_none(opt)  # as the pipeline's step does
        loss.backward()
        opt.step()
        if step == warmup - 1:
            _sync(device)
            start = clock()
    _sync(device)
    seconds = clock() - start
    return {"images": steps * B, "seconds": seconds, "images_per_s": steps * B / seconds}


def measure_peer_loop(cfg, images, warmup: int, steps: int, device: str, val_images=None) -> dict[str, float]:
    """Images/s (and with val_images, the val ELBO after the run: val_elbo) of the loop the popular VAE libraries'
    trainers write: a DataLoader with shuffle=True over the training images as one float tensor in [0, 1], torch's
    default AdamW (not fused),
    zero_grad / backward / step, and their loss: BCE with logits summed per image plus the analytic KL, the
    mean over the batch. The same VAE (pipeline.vae.model, same initial weights: seeded alike), batch size and
    learning rate; the Bernoulli likelihood and plain ELBO of the PEER_PRESETS."""
    import torch
    import torch.nn.functional as F

    from pipeline.vae.model import VAE

    torch.manual_seed(cfg.seed)
    dev = torch.device(device)
    vae = VAE(cfg.model, tuple(images.shape[1:])).to(dev)
    o = cfg.optim
    opt = torch.optim.AdamW(vae.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    data = torch.utils.data.TensorDataset(images.float() / 255.0)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.data.batch_size, shuffle=True)
    step, seen, start = 0, 0, None
    while step < warmup + steps:
        for (x,) in loader:
            x = x.to(dev, non_blocking=True)
            logits, mu, logvar, _ = vae(x)
            recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
            kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
            loss = (recon + kl).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == warmup:
                _sync(device)
                start = clock()
            elif step > warmup:
                seen += x.shape[0]
            if step == warmup + steps:
                break
    _sync(device)
    seconds = clock() - start
    return _with_val_elbo({"images": seen, "seconds": seconds, "images_per_s": seen / seconds}, vae, val_images, cfg)


def val_elbo(vae, images, cfg, draws: int = 8, batch: int = 1000) -> float:
    """Mean single-sample ELBO (nats per image) of `vae` on uint8 images [N, C, H, W], averaged over `draws` noise
    draws per image (a small val split's single draw varies by ~1%), with torch's RNG seeded from cfg.seed first:
    two VAEs compared on the same images draw the same noise."""
    import torch

    from pipeline.vae import objectives

    torch.manual_seed(cfg.seed)
    dev = next(vae.parameters()).device
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i:i + batch].to(dev).float() / 255.0
            for _ in range(draws):
                params, mu, logvar, _ = vae(x)
                terms = objectives.elbo_terms(x, params, mu, logvar, cfg.model.likelihood, cfg.model.gaussian_sigma)
                total += float(terms["elbo"].sum())
    return total / (len(images) * draws)


def _with_val_elbo(result: dict[str, float], vae, val_images, cfg) -> dict[str, float]:
    return result if val_images is None else {**result, "val_elbo": val_elbo(vae, val_images, cfg)}


def measure_lightning_floor(cfg, images, warmup: int, steps: int, device: str) -> dict[str, float]:
    """Images/s of the least a Lightning run costs: a minimal LightningModule with the bare loop's work (same
    VAE, loss, AdamW, in-memory batches sliced from a permutation per epoch) and a Trainer with no callbacks,
    logger, checkpointing or progress bar. What Lightning's own loop leaves of the bare loop's rate on this
    machine; the pipeline cannot go above it."""
    import lightning.pytorch as pl
    import torch

    from pipeline.vae import objectives, schedules
    from pipeline.vae.model import VAE

    B, n = cfg.data.batch_size, len(images)
    per_epoch = n // B

    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            perm = torch.randperm(n)
            for i in range(per_epoch):
                yield {"image": images[perm[i * B:(i + 1) * B]]}

    class Minimal(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.vae = VAE(cfg.model, tuple(images.shape[1:]))

        def training_step(self, batch, batch_idx):
            x = batch["image"].float() / 255.0
            params, mu, logvar, _ = self.vae(x)
            terms = objectives.elbo_terms(x, params, mu, logvar, cfg.model.likelihood, cfg.model.gaussian_sigma)
            weight = schedules.kl_weight(self.global_step, cfg.objective, cfg.trainer.max_steps)
            return terms["recon"].mean() + objectives.kl_penalty(terms["kl_per_dim"], weight)

        def configure_optimizers(self):
            return pipeline_adamw(cfg, self.parameters(), self.device.type, "32-true")

    torch.manual_seed(cfg.seed)
    timer = make_timer(warmup, device)
    trainer = pl.Trainer(max_steps=warmup + steps, max_epochs=-1, accelerator=device, devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer])
    trainer.fit(Minimal(), torch.utils.data.DataLoader(Batches(), batch_size=None))
    return timer.result()


def loader_throughput(cfg, split: str = "train", batches: int = 200, warmup: int = 5) -> dict:
    """Samples/s of one rank's loader for `cfg` (a DataConfig): times `batches` batches after `warmup`
    (worker start-up excluded), re-iterating epochs as needed. Single process, world size 1."""
    from pipeline.data.datamodule import ShardDataModule

    dm = ShardDataModule(cfg)
    dm.setup("fit")
    loader = dm.train_dataloader() if split == "train" else dm.loader(split, train=False)
    seen = samples = 0
    start = None
    while seen < warmup + batches:
        for batch in loader:
            seen += 1
            if seen == warmup:
                start = time.perf_counter()
            elif seen > warmup:
                samples += len(batch["key"])
            if seen >= warmup + batches:
                break
    elapsed = time.perf_counter() - start
    return {"split": split, "batches": batches, "samples": samples, "seconds": elapsed,
            "samples_per_s": samples / elapsed, "batch_size": cfg.batch_size, "num_workers": cfg.num_workers,
            "shuffle_buffer": cfg.shuffle_buffer, "cached": loader.dataset.cache is not None}


def checksum_cost(cfg, repeats: int = 3) -> dict[str, Any]:
    """Samples/s of the training loader's first epoch with data.verify_checksums on and off (cfg: a
    DataConfig), alternating `repeats` times in this run; medians. The first epoch is where the hashing
    happens (each worker verifies a shard once, then reads it unhashed); worker start-up is timed on both
    sides alike. cost = off / on - 1 (0.05: verification makes the first epoch 5% slower). The split is
    streamed through the loader workers (data.cache=none)."""
    import dataclasses

    from pipeline.data.datamodule import ShardDataModule
    from pipeline.training.lightning_compat import shutdown_loader_workers

    runs: dict[bool, list[float]] = {True: [], False: []}
    load_before = os.getloadavg()[0]
    for _ in range(repeats):
        for verify in (True, False):
            dm = ShardDataModule(dataclasses.replace(cfg, verify_checksums=verify, cache="none"))
            dm.setup("fit")
            loader = dm.train_dataloader()
            start = time.perf_counter()
            samples = sum(len(batch["key"]) for batch in loader)
            runs[verify].append(samples / (time.perf_counter() - start))
            shutdown_loader_workers(loader)
    on, off = statistics.median(runs[True]), statistics.median(runs[False])
    return {"verify_on_samples_per_s": on, "verify_off_samples_per_s": off, "cost": off / on - 1,
            "runs_on": [round(v) for v in runs[True]], "runs_off": [round(v) for v in runs[False]],
            "samples": samples, "load_average_before": load_before, "load_average_after": os.getloadavg()[0]}


def measure_loader(cfg, batches: int, warmup: int, cache: str | None = "none") -> dict[str, float]:
    """Samples/s of the training loader alone (loader_throughput), with data.cache set to `cache` (None: as
    configured)."""
    data = cfg.data.copy()
    if cache is not None:
        data.cache = cache
    r = loader_throughput(data, split="train", batches=batches, warmup=warmup)
    return {"samples": r["samples"], "seconds": r["seconds"], "samples_per_s": r["samples_per_s"],
            "cache": data.cache, "cached": r["cached"]}


def measure_file_read(root: Path, min_bytes: int, min_seconds: float = 0.3) -> dict[str, float]:
    """The shard files' raw byte rate: the training shards read whole in 1 MiB reads (after one untimed pass,
    so from the page cache as the loader reads them), over and over until `min_bytes` and `min_seconds`; as
    bytes/s and as samples/s at the files' bytes per sample."""
    from pipeline.data import shards

    manifest = shards.load_manifest(root / shards.MANIFEST)
    entries = manifest["splits"]["train"]["shards"]
    paths = [root / s["name"] for s in entries]
    file_bytes = sum(p.stat().st_size for p in paths)
    per_sample = file_bytes / sum(s["samples"] for s in entries)

    def read_all() -> int:
        n = 0
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                while block := f.read(1 << 20):
                    n += len(block)
        return n

    read_all()
    nbytes, start = 0, time.perf_counter()
    while nbytes < min_bytes or time.perf_counter() - start < min_seconds:
        nbytes += read_all()
    seconds = time.perf_counter() - start
    return {"bytes": nbytes, "seconds": seconds, "bytes_per_s": nbytes / seconds,
            "bytes_per_sample": per_sample, "samples_per_s": nbytes / seconds / per_sample}


def measure_raw_read(root: Path, samples: int) -> dict[str, float]:
    """Samples/s of reading the training shards' samples as raw bytes (tar members grouped by key, no
    decoding), cycling over the shards until `samples` are read, one process."""
    from pipeline.data import shards

    manifest = shards.load_manifest(root / shards.MANIFEST)
    names = [s["name"] for s in manifest["splits"]["train"]["shards"]]
    count, nbytes = 0, 0
    start = time.perf_counter()
    while count < samples:
        for name in names:
            with open(root / name, "rb") as f:
                for raw in shards.iter_tar_samples(f, name):
                    nbytes += sum(len(v) for k, v in raw.items() if not k.startswith("__"))
                    count += 1
                    if count >= samples:
                        break
            if count >= samples:
                break
    seconds = time.perf_counter() - start
    return {"samples": count, "bytes": nbytes, "seconds": seconds, "samples_per_s": count / seconds}


def image_loader_vs_pil(work: Path, samples: int = 4096, size: int = 64, batch_size: int = 128, workers: int = 2,
                        batches: int = 64) -> dict[str, Any]:
    """JPEG shards as img2dataset writes them (KEY.jpg + KEY.cls, `size` x `size`, 8 shards, crops of
    scikit-learn's two bundled photos): samples/s of the training loader over them after `prepare index`
    (data.image_size=size, data.channels=3, `workers` loader workers) against PIL decoding the same JPEG
    bytes to uint8 arrays in this one process; and per shard format (npy, png, jpg at 95) the bytes and
    the decode time per sample (pipeline.data.decode, one process)."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from pipeline.config import DataConfig
    from pipeline.data import decode, index, shards

    rng = np.random.default_rng(0)
    photos = load_sample_images().images  # china.jpg and flower.jpg, 427 x 640 RGB, bundled: no download
    distinct = []
    for _ in range(min(samples, 512)):  # 512 distinct crops, cycled
        p, s = photos[rng.integers(2)], int(rng.integers(96, 427))
        y, x = int(rng.integers(0, p.shape[0] - s + 1)), int(rng.integers(0, p.shape[1] - s + 1))
        im = Image.fromarray(p[y:y + s, x:x + s]).resize((size, size), Image.BICUBIC)
        distinct.append(np.asarray(im).transpose(2, 0, 1).copy())
    spec, formats = decode.ImageSpec(), {}
    for fmt in ("npy", "png", "jpg"):
        blobs = [shards.npy_bytes(a) if fmt == "npy" else shards.encode_image(a, fmt, 95) for a in distinct]
        start = time.perf_counter()
        for b in blobs:
            spec.decode({"__key__": "k", fmt: b})
        seconds = time.perf_counter() - start
        formats[fmt] = {"bytes_per_sample": sum(map(len, blobs)) / len(blobs),
                        "decode_us_per_sample": 1e6 * seconds / len(blobs)}
    jpgs = [shards.encode_image(distinct[i % len(distinct)], "jpg", 95) for i in range(samples)]
    urls = []
    for s in range(8):
        urls.append(str(work / f"{s:05d}.tar"))
        with tarfile.open(urls[-1], "w") as tar:
            for i in range(s, samples, 8):
                for suffix, data in (("jpg", jpgs[i]), ("cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    index.index_shards(urls, work, workers=workers, progress=False, log=lambda m: None)
    start = time.perf_counter()
    for b in jpgs:
        np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
    pil = samples / (time.perf_counter() - start)
    cfg = DataConfig(train=str(work / shards.MANIFEST), image_size=size, channels=3, batch_size=batch_size,
                     num_workers=workers, seed=0, pin_memory=False)
    loader = loader_throughput(cfg, batches=batches)
    return {"samples": samples, "size": size, "batch_size": batch_size, "num_workers": workers,
            "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
            "pil_decode_samples_per_s": pil, "loader_samples_per_s": loader["samples_per_s"],
            "loader_vs_pil": loader["samples_per_s"] / pil, "formats": formats}


def jpeg_draft(samples: int = 512, stored: int = 256, size: int = 64) -> dict[str, Any]:
    """JPEGs stored at `stored` x `stored` (quality 95, crops of scikit-learn's two bundled photos) read at
    data.image_size=`size`: samples/s of the loader's decode (decode.load_pil, libjpeg's draft mode: DCT
    scaling to the smallest 1/2, 1/4 or 1/8 that covers `size`) against a full decode and the same resize, in
    this one process, and how far the pixels of the two differ (uint8 levels)."""
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from pipeline.data import decode, shards

    rng = np.random.default_rng(0)
    photos = load_sample_images().images
    blobs = []
    for _ in range(samples):
        p, s = photos[rng.integers(2)], int(rng.integers(stored, 427))
        y, x = int(rng.integers(0, p.shape[0] - s + 1)), int(rng.integers(0, p.shape[1] - s + 1))
        im = Image.fromarray(p[y:y + s, x:x + s]).resize((stored, stored), Image.BICUBIC)
        blobs.append(shards.encode_image(np.asarray(im).transpose(2, 0, 1), "jpg", 95))
    out, arrays = {}, {}
    for name, draft in (("full", False), ("draft", True)):
        start = time.perf_counter()
        arrays[name] = [decode.load_pil(io.BytesIO(b), 3, size, "center_crop", draft=draft) for b in blobs]
        out[f"{name}_samples_per_s"] = samples / (time.perf_counter() - start)
    diff = np.abs(np.stack(arrays["draft"]).astype(np.int16) - np.stack(arrays["full"]).astype(np.int16))
    return {"samples": samples, "stored": stored, "size": size, "load_average_1min": os.getloadavg()[0],
            **out, "draft_speedup": out["draft_samples_per_s"] / out["full_samples_per_s"],
            "mean_abs_diff": float(diff.mean()), "p99_abs_diff": float(np.percentile(diff, 99)),
            "max_abs_diff": int(diff.max())}


def measure_ddp(preset: str, root: Path, devices: int, steps: int, warmup: int, work: Path) -> dict[str, float]:
    """Pipeline images/s (all ranks) with `devices` CPU ranks (ddp, gloo), in a fresh process tree."""
    out = work / f"ddp{devices}.json"
    cmd = [sys.executable, "-m", "pipeline.analysis.bench", "--_worker", str(out), "--presets", preset,
           "--data-dir", str(root.parent), "--steps", str(steps), "--warmup", str(warmup),
           "--_devices", str(devices), "--_run-dir", str(work / f"run-ddp{devices}")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE",
                                                                    "MASTER_", "SLURM_"))}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stdout[-1500:] + proc.stderr[-3000:]).strip()
        raise RuntimeError(f"DDP bench with {devices} ranks failed ({proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


def _worker(args) -> int:
    """Subprocess entry for measure_ddp: every rank runs this; rank zero writes the result."""
    preset = args.presets[0]
    root = Path(args.data_dir) / preset
    cfg = bench_config(preset, root, Path(args._run_dir), "cpu", args.steps, args.warmup,
                       [f"trainer.devices={args._devices}", "trainer.strategy=ddp" if args._devices > 1 else
                        "trainer.strategy=auto", "trainer.enable_progress_bar=false"])
    result = measure_pipeline(cfg, args.warmup, "cpu")
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        write_json_atomic(Path(args._worker), {**result, "devices": args._devices})  # whole, or not there
    return 0


# ------------------------------------------------------------------------------------------ driver
def _median(runs: list[dict[str, float]], key: str) -> dict[str, Any]:
    vals = [r[key] for r in runs]
    return {key: statistics.median(vals), "runs": [round(v, 1) for v in vals]}


def compare_elbo(pipeline: list[float], peer: list[float], tolerance: float = ELBO_TOLERANCE,
                 nats: float = ELBO_TOLERANCE_NATS) -> dict[str, Any]:
    """The val ELBO after equal steps, pipeline against the peer-style loop (medians of the repeats): equal when
    they differ by at most `tolerance` of the peer's |ELBO| or `nats`, whichever is larger."""
    a, b = statistics.median(pipeline), statistics.median(peer)
    allowed = max(tolerance * abs(b), nats)
    return {"pipeline": round(a, 3), "peer_loop": round(b, 3), "difference": round(a - b, 3),
            "tolerance": round(allowed, 3), "equal": abs(a - b) <= allowed,
            "runs": {"pipeline": [round(v, 3) for v in pipeline], "peer_loop": [round(v, 3) for v in peer]}}


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else math.nan


def bench_preset(preset: str, args, work: Path, log) -> dict[str, Any]:
    import torch

    load_before = os.getloadavg()[0]  # other work on the machine skews both sides; recorded, not hidden
    root = prepare_data(preset, Path(args.data_dir))
    steps = args.steps or PRESETS[preset]["steps"]
    warmup = args.warmup or PRESETS[preset]["warmup"]
    cfg = bench_config(preset, root, work / f"run-{preset}", args.device, steps, warmup)
    images = load_train_images(root)
    peer = preset in PEER_PRESETS
    val_images = load_train_images(root, "val") if peer else None
    res: dict[str, Any] = {"config": PRESETS[preset]["config"], "batch_size": cfg.data.batch_size,
                           "arch": cfg.model.arch, "input_shape": list(images.shape[1:]),
                           "train_images": len(images), "num_workers": cfg.data.num_workers,
                           "steps": steps, "warmup": warmup}
    ratios: dict[str, float] = {}

    variants = [("", "32-true", False)]
    bf16 = args.bf16 or args.device.startswith("cuda")
    if bf16:
        variants.append(("bf16_", "bf16-mixed", False))
    if args.compile:
        variants.append(("compile_", "bf16-mixed" if bf16 else "32-true", True))
    for prefix, precision, comp in variants:
        pipe, bare, floor, peers = [], [], [], []
        for r in range(args.repeats):
            c = bench_config(preset, root, work / f"run-{preset}-{prefix}{r}", args.device, steps, warmup,
                             [f"trainer.precision={precision}"])
            log(f"[{preset}] {prefix or 'fp32_'}pipeline run {r + 1}/{args.repeats} ...")
            pipe.append(measure_pipeline(c, warmup, args.device, compile_model=comp,
                                         val_images=None if prefix else val_images))
            log(f"[{preset}] {prefix or 'fp32_'}pipeline {pipe[-1]['images_per_s']:.0f} img/s; bare loop ...")
            bare.append(measure_bare(c, images, warmup, steps, args.device, precision, comp))
            log(f"[{preset}] {prefix or 'fp32_'}bare {bare[-1]['images_per_s']:.0f} img/s")
            if not prefix:  # fp32 only: where Lightning itself leaves the bare loop
                floor.append(measure_lightning_floor(c, images, warmup, steps, args.device))
                log(f"[{preset}] minimal LightningModule {floor[-1]['images_per_s']:.0f} img/s")
            if not prefix and peer:  # fp32, the loop as the peers write it
                peers.append(measure_peer_loop(c, images, warmup, steps, args.device, val_images))
                log(f"[{preset}] peer-style loop {peers[-1]['images_per_s']:.0f} img/s")
        p, b = _median(pipe, "images_per_s"), _median(bare, "images_per_s")
        res[f"{prefix}pipeline"], res[f"{prefix}bare"] = p, b
        ratios[f"{prefix}pipeline_vs_bare"] = _ratio(p["images_per_s"], b["images_per_s"])
        if floor:
            res["lightning_floor"] = f = _median(floor, "images_per_s")
            ratios["lightning_floor_vs_bare"] = _ratio(f["images_per_s"], b["images_per_s"])
        if peers:
            res["peer_loop"] = q = _median(peers, "images_per_s")
            ratios["pipeline_vs_peer_loop"] = _ratio(p["images_per_s"], q["images_per_s"])
            res["val_elbo"] = compare_elbo([r["val_elbo"] for r in pipe], [r["val_elbo"] for r in peers])

    log(f"[{preset}] loader alone vs raw shard bytes ...")
    loader = measure_loader(cfg, batches=max(steps, 50), warmup=warmup)
    raw = measure_raw_read(root, samples=int(loader["samples"]))
    file_read = measure_file_read(root, min_bytes=int(loader["samples"] * 4096))
    cached = measure_loader(cfg, batches=max(steps, 50), warmup=warmup, cache=None)
    res["loader"], res["raw_read"], res["file_read"], res["loader_as_configured"] = loader, raw, file_read, cached
    ratios["loader_vs_raw"] = _ratio(loader["samples_per_s"], raw["samples_per_s"])
    ratios["loader_vs_bytes"] = _ratio(loader["samples_per_s"], file_read["samples_per_s"])
    ratios["cached_loader_vs_raw"] = _ratio(cached["samples_per_s"], raw["samples_per_s"])
    log(f"[{preset}] loader {loader['samples_per_s']:.0f} samples/s, raw {raw['samples_per_s']:.0f} samples/s, "
        f"file bytes {file_read['samples_per_s']:.0f} samples/s, as configured (data.cache={cached['cache']}) "
        f"{cached['samples_per_s']:.0f} samples/s")

    if args.ddp:
        log(f"[{preset}] DDP (CPU, gloo) 1 rank, then 2 ranks ...")
        one = measure_ddp(preset, root, 1, steps, warmup, work)
        two = measure_ddp(preset, root, 2, steps, warmup, work)
        res["ddp_1"], res["ddp_2"] = one, two
        ratios["ddp_2_vs_1"] = _ratio(two["images_per_s"], one["images_per_s"])
        log(f"[{preset}] DDP 1 rank {one['images_per_s']:.0f} img/s, 2 ranks {two['images_per_s']:.0f} img/s")

    if args.ablations:
        base = res["pipeline"]["images_per_s"]
        abl = {}
        for name, extra, threads in (("data.cache=none", ["data.cache=none"], None),
                                     ("num_workers=0", ["data.num_workers=0"], None),
                                     ("num_workers=1", ["data.num_workers=1"], None),
                                     ("log_every_n_steps=1000", ["trainer.log_every_n_steps=1000"], None),
                                     ("no_progress_bar", ["trainer.enable_progress_bar=false"], None),
                                     ("torch_threads=1", [], 1)):
            c = bench_config(preset, root, work / f"run-{preset}-abl-{len(abl)}", args.device, steps, warmup, extra)
            r = measure_pipeline(c, warmup, args.device, torch_threads=threads)
            abl[name] = {"images_per_s": r["images_per_s"], "vs_default": _ratio(r["images_per_s"], base)}
            log(f"[{preset}] ablation {name}: {r['images_per_s']:.0f} img/s ({abl[name]['vs_default']:.2f}x default)")
        res["ablations"] = abl
    res["ratios"] = ratios
    res["torch_threads"] = torch.get_num_threads()
    res["load_average_before"], res["load_average_after"] = load_before, os.getloadavg()[0]
    return res


def run(args) -> dict[str, Any]:
    import lightning
    import torch

    log = (lambda m: print(m, file=sys.stderr, flush=True)) if not args.quiet else (lambda m: None)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no model summaries per run
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible")
    work = Path(tempfile.mkdtemp(prefix="vae-bench-"))
    started = time.time()
    try:
        presets = {p: bench_preset(p, args, work, log) for p in args.presets}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "device": args.device,
        "device_name": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                        else platform.processor() or platform.machine()),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "lightning": lightning.__version__,
        "python": platform.python_version(), "repeats": args.repeats, "seconds": round(time.time() - started, 1),
        "clock": getattr(args, "clock", "wall"),
        "load_average_1min": os.getloadavg()[0],
        # how idle OpenMP threads wait (GNU OpenMP: spin, then sleep; PASSIVE: sleep at once) decides how much
        # other processes on the machine slow both sides: recorded with every result
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: spin)"),
        "presets": presets,
        "ratios": {f"{p}/{k}": v for p, r in presets.items() for k, v in r["ratios"].items()},
    }
    return result


def format_summary(result: dict[str, Any]) -> str:
    lines = [(f"# bench on {result['device']} ({result['cpu_count']} cpus, torch {result['torch']}), "
              f"{result['seconds']} s, {result.get('clock', 'wall')} clock, load avg {result['load_average_1min']:.1f}, "
              f"OMP_WAIT_POLICY {result.get('omp_wait_policy', '?')}")]
    for name, r in result["presets"].items():
        lines.append(f"{name} ({r['arch']}, batch {r['batch_size']}, {r['num_workers']} workers, "
                     f"{r['torch_threads']} intra-op threads; load avg {r['load_average_before']:.1f} before):")
        if r["load_average_before"] > (result["cpu_count"] or 1):  # 1-min average: lags our own last run
            lines.append("  WARNING: the machine was busy when this preset started: other processes skew both "
                         "sides (intra-op threads spin-wait), so these ratios are unreliable")
        for prefix in ("", "bf16_", "compile_"):
            if f"{prefix}pipeline" in r:
                p, b = r[f"{prefix}pipeline"]["images_per_s"], r[f"{prefix}bare"]["images_per_s"]
                lines.append(f"  {prefix}pipeline {p:9.0f} img/s  vs bare loop {b:9.0f} img/s  ratio "
                             f"{r['ratios'][prefix + 'pipeline_vs_bare']:.3f}")
        if "peer_loop" in r:
            e = r["val_elbo"]
            lines.append(f"  pipeline {r['pipeline']['images_per_s']:9.0f} img/s  vs peer-style loop "
                         f"{r['peer_loop']['images_per_s']:9.0f} img/s  ratio {r['ratios']['pipeline_vs_peer_loop']:.3f}"
                         f"; val ELBO {e['pipeline']:.2f} vs {e['peer_loop']:.2f} nats "
                         f"({'equal' if e['equal'] else 'NOT equal'} within {e['tolerance']:.2f})")
        if "lightning_floor" in r:
            lines.append(f"  minimal LightningModule {r['lightning_floor']['images_per_s']:9.0f} img/s  vs bare loop  "
                         f"ratio {r['ratios']['lightning_floor_vs_bare']:.3f} (Lightning's own cost: the ceiling)")
        lines.append(f"  loader   {r['loader']['samples_per_s']:9.0f} samples/s vs raw read {r['raw_read']['samples_per_s']:9.0f}"
                     f" samples/s  ratio {r['ratios']['loader_vs_raw']:.3f}")
        fr = r["file_read"]
        lines.append(f"  loader   {r['loader']['samples_per_s']:9.0f} samples/s vs file bytes "
                     f"{fr['samples_per_s']:9.0f} samples/s ({fr['bytes_per_s'] / 2**20:.0f} MiB/s)  ratio "
                     f"{r['ratios']['loader_vs_bytes']:.3f}")
        held = "held in memory" if r["loader_as_configured"]["cached"] else "streamed"
        lines.append(f"  loader as configured (data.cache={r['loader_as_configured']['cache']}: {held}) "
                     f"{r['loader_as_configured']['samples_per_s']:9.0f} samples/s  vs raw read ratio "
                     f"{r['ratios']['cached_loader_vs_raw']:.3f}")
        if "ddp_2" in r:
            lines.append(f"  ddp 2 ranks {r['ddp_2']['images_per_s']:6.0f} img/s vs 1 rank {r['ddp_1']['images_per_s']:6.0f}"
                         f" img/s  ratio {r['ratios']['ddp_2_vs_1']:.3f}")
        for k, v in r.get("ablations", {}).items():
            lines.append(f"  ablation {k:<24} {v['images_per_s']:9.0f} img/s  ({v['vs_default']:.3f}x default)")
    return "\n".join(lines)


def loader_main(argv: Sequence[str]) -> int:
    """`python -m pipeline.bench loader ...`: samples/s of the training loader of a prepared dataset."""
    from pipeline.config import Cache, DataConfig, choices

    d = DataConfig()
    p = argparse.ArgumentParser(prog="python -m pipeline.bench loader", description="loader samples/s",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--root", default=d.root, help="prepared dataset directory (manifest.json)")
    p.add_argument("--dataset", default=d.dataset, help="recipe prepared into --root if it is missing")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--workers", type=int, default=d.num_workers)
    p.add_argument("--shuffle-buffer", type=int, default=d.shuffle_buffer)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--split", default="train")
    p.add_argument("--cache", default="none", choices=choices(Cache), help="data.cache (none: through the workers)")
    p.add_argument("--checksums", action="store_true", help="instead: first-epoch samples/s with "
                   "data.verify_checksums on and off (3 alternating runs each)")
    args = p.parse_args(argv)
    cfg = DataConfig(dataset=args.dataset, root=args.root, batch_size=args.batch_size, cache=args.cache,
                     num_workers=args.workers, shuffle_buffer=args.shuffle_buffer, seed=0)
    if args.checksums:
        c = checksum_cost(cfg)
        print(f"{args.root} train, first epoch ({c['samples']} samples): verify_checksums on "
              f"{c['verify_on_samples_per_s']:.0f} samples/s, off {c['verify_off_samples_per_s']:.0f} samples/s "
              f"(cost {100 * c['cost']:+.1f}%; runs on {c['runs_on']}, off {c['runs_off']}; "
              f"load avg {c['load_average_before']:.1f} -> {c['load_average_after']:.1f} on {os.cpu_count()} cpus)")
        return 0
    r = loader_throughput(cfg, split=args.split, batches=args.batches)
    print(f"{args.root} {args.split}: {r['samples_per_s']:.0f} samples/s ({r['samples']} samples in "
          f"{r['seconds']:.2f} s; batch {r['batch_size']}, {r['num_workers']} workers)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["loader"]:
        return loader_main(argv[1:])
    if argv[:1] == ["images"]:  # python -m pipeline.bench images [--samples N] [--workers W]
        q = argparse.ArgumentParser(prog="python -m pipeline.bench images", description=image_loader_vs_pil.__doc__)
        q.add_argument("--samples", type=int, default=4096)
        q.add_argument("--workers", type=int, default=2, help="loader workers (data.num_workers)")
        a = q.parse_args(argv[1:])
        with tempfile.TemporaryDirectory(prefix="vae-bench-images-") as work:
            print(json.dumps(image_loader_vs_pil(Path(work), samples=a.samples, workers=a.workers), indent=2))
        return 0
    if argv[:1] == ["jpeg-draft"]:  # python -m pipeline.bench jpeg-draft [--stored 256] [--size 64]
        q = argparse.ArgumentParser(prog="python -m pipeline.bench jpeg-draft", description=jpeg_draft.__doc__)
        q.add_argument("--samples", type=int, default=512)
        q.add_argument("--stored", type=int, default=256, help="stored JPEG side")
        q.add_argument("--size", type=int, default=64, help="data.image_size")
        a = q.parse_args(argv[1:])
        print(json.dumps(jpeg_draft(a.samples, a.stored, a.size), indent=2))
        return 0
    p = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--out", type=Path, default=Path("bench.json"), help="result JSON (default bench.json)")
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--steps", type=int, default=None, help="timed steps (default per preset: digits 300, dsprites 40)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: digits 10, dsprites 5)")
    p.add_argument("--repeats", type=int, default=1, help="alternate pipeline / bare runs; median kept")
    p.add_argument("--no-ddp", dest="ddp", action="store_false", help="skip the 2-vs-1 rank DDP runs")
    p.add_argument("--bf16", action="store_true", help="also bf16-mixed (the default on cuda)")
    p.add_argument("--compile", action="store_true", help="also torch.compile of the VAE (with bf16 when that runs)")
    p.add_argument("--ablations", action="store_true", help="re-measure with one setting changed at a time")
    p.add_argument("--data-dir", default="data/bench", help="prepared bench datasets (reused)")
    p.add_argument("--clock", default="wall", choices=list(CLOCKS), help="time the training loops by wall time, or "
                   "by this process's CPU time (a shared machine; with OMP_NUM_THREADS=1; DDP stays wall time)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--_run-dir", dest="_run_dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if (args.steps is not None and args.steps < 2) or (args.warmup is not None and args.warmup < 1) or args.repeats < 1:
        p.error("--steps must be >= 2, --warmup and --repeats >= 1")
    if args._worker:
        return _worker(args)
    _CLOCK["now"] = CLOCKS[args.clock]
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    print(format_summary(result))
    print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
