"""Shared fixtures: the real config, shrunk to CPU-sized runs; digits shards prepared once per session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

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


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny tensors: on 2 cores shared with other jobs, intra-op threads spin-wait for each other and
    cost 5-10x wall time (measured) while saving nothing. Restored after the module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """Digits shards, prepared once for the whole session (the recipe is the built-in default)."""
    from pipeline.config import load_config
    from pipeline.data.prepare import ensure_prepared

    root = tmp_path_factory.mktemp("data") / "digits"
    ensure_prepared(load_config([], [f"data.root={root}", "data.dataset=digits"]).data)
    return root


@pytest.fixture
def tiny_overrides(digits_root, tmp_path) -> list:
    return TINY + [f"data.root={digits_root}", f"run.dir={tmp_path / 'run'}"]


def run_train(args, env_extra=None, timeout=300, check=True) -> subprocess.CompletedProcess:
    """`python -m pipeline.train ARGS` in a real subprocess (as a user or SLURM would run it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # no user W&B leaks in
    env.update({"PYTHONUNBUFFERED": "1", **(env_extra or {})})
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def pytest_collection_modifyitems(config, items):
    """A test on the real SLURM cluster is slow too (it installs and starts one): `-m "not slow"` skips it."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)
