"""Running the real entry point as users do: the shrunk config (TINY), `python -m pipeline.train` in a
subprocess, and what a finished run holds (metrics rows, weights, the exact-resume comparison)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


# The one shrunk run configuration of the suite (the real config, shrunk): CPU, a small model, few
# steps, frequent validation/checkpoints/images so each of them happens. Only sizes and step counts
# change; the machinery stays the users' default (2 loader workers, pinned-memory setting, image
# logging, checkpoints). Tests append what they check, e.g. `trainer.log_every_n_steps=1`.
TINY = [
    "trainer.accelerator=cpu", "trainer.max_steps=30", "trainer.val_check_interval=10",
    "trainer.log_every_n_steps=5", "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=10",
    "data.batch_size=64", "model.hidden_dims=[64,32]", "model.latent_dim=4",
    "logger.wandb.mode=disabled", "logger.images_every_n_steps=10",
]


def run_train(args, env_extra=None, timeout=300, check=True) -> subprocess.CompletedProcess:
    """`python -m pipeline.train ARGS` in a real subprocess (as a user or SLURM would run it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # no user W&B leaks in
    env.update({"PYTHONUNBUFFERED": "1", **(env_extra or {})})
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    with (Path(run_dir) / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def weights(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


# Exactness: schedules that depend on the step (linear KL warm-up, LR warm-up) across the cut, a cut
# mid-epoch, 2 loader workers, val on both sides of it, every step logged.
EXACT = [
    "objective.kl_schedule=linear", "objective.warmup_steps=25", "optim.lr_warmup_steps=8",
    "trainer.log_every_n_steps=1", "data.num_workers=2", "logger.images_every_n_steps=0",
    "checkpoint.every_n_steps=5",
]


def assert_same_run(ref_dir: Path, run_dir: Path, first_step: int, last_step: int):
    ref_ckpt, got_ckpt = (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
                          for d in (ref_dir, run_dir))
    # state_dict: the weights (their EMA with optim.ema_decay, the trained ones then in current_model_state)
    for part in ("state_dict", "current_model_state", "averaging_state"):
        assert (part in ref_ckpt) == (part in got_ckpt), part
        ref, got = ref_ckpt.get(part, {}), got_ckpt.get(part, {})
        assert ref.keys() == got.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=0, msg=f"{part} differs at {k}")
    assert ref_ckpt.get("skipped_steps") == got_ckpt.get("skipped_steps")

    def by_step(rows):
        return {(int(r["step"]), key): float(v) for r in rows for key, v in r.items()
                if v not in ("", None) and key not in ("step", "epoch") and first_step <= int(r["step"]) < last_step}

    ref_m, got_m = by_step(read_metrics(ref_dir)), by_step(read_metrics(run_dir))
    assert ref_m.keys() == got_m.keys()
    assert any(k == "val/elbo" for _, k in ref_m) and any(k == "train/kl_weight" for _, k in ref_m)
    for key in ref_m:
        assert got_m[key] == pytest.approx(ref_m[key], abs=1e-5, rel=1e-5), key


# EMA of the weights, clipping and skipping on (optim.*): the exact-resume tests run with and without them
EMA_CLIP_SKIP = ["optim.ema_decay=0.8", "optim.grad_clip_norm=3.5", "optim.grad_skip_norm=4.5"]
