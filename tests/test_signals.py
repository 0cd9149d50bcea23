"""Signals a cluster really sends, against a real training process with the default loader workers.

SLURM's `--signal=USR1@90` and `scancel -s USR1` signal every process of the job step, loader workers
included. A worker must leave the signal to its training process: it neither dies of it nor runs the
trainer's handler (which would checkpoint from inside the worker and block in a collective).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def children(pid: int) -> list[int]:
    """Direct children of `pid` (the loader workers of a training process; W&B is disabled here)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return out


# A one-task SLURM job as Lightning sees it: it installs its requeue handler for USR1, which forked
# workers inherit (the hang on a real cluster: each worker checkpoints and waits in a barrier).
SLURM_ONE_TASK = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_JOB_ID": "4242",
                  "SLURM_JOB_NAME": "signals", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                  "SLURM_NODELIST": "localhost", "SLURM_STEP_ID": "0"}


def start_train(args, env_extra=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SLURM_"))}
    env.update(PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "pipeline.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_workers(proc: subprocess.Popen, n: int, timeout: float = 120) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-6000:]
        kids = children(proc.pid)
        if len(kids) >= n:
            return kids
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no {n} loader workers after {timeout}s:\n{proc.stdout.read()[-6000:]}")


@pytest.mark.parametrize("launch", ["local", "slurm"])
def test_usr1_to_loader_workers_neither_kills_them_nor_stops_the_run(launch, tiny_overrides, tmp_path):
    """`kill -USR1 <worker>` (what SLURM does to every process of the step): the run goes on to the end."""
    steps = 300
    proc = start_train(tiny_overrides + [f"trainer.max_steps={steps}", "trainer.val_check_interval=100",
                                         "checkpoint.every_n_steps=100"],
                       SLURM_ONE_TASK if launch == "slurm" else None)
    workers = wait_for_workers(proc, 2)  # the training loader's default 2 workers, forked before step 0
    for _ in range(3):  # more than once: a handler that ran once could be gone
        for w in workers:
            try:
                os.kill(w, signal.SIGUSR1)
            except ProcessLookupError:  # the signal killed it (the bug): the run's exit shows it
                pass
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-6000:]
    assert f"# done: step {steps}" in out, out[-6000:]
    assert "killed by signal" not in out, out[-6000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == steps
    assert not list((tmp_path / "run").glob("hpc_ckpt_*.ckpt")), "a worker acted on the signal"
