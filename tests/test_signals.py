"""Signals a cluster or a terminal really sends, against a real training process with the default loader workers.

SLURM's `--signal=USR1@90` and `scancel -s USR1` signal every process of the job step, loader workers
included. A worker must leave the signal to its training process: it neither dies of it nor runs the
trainer's handler (which would checkpoint from inside the worker and block in a collective). A terminal's
Ctrl-C sends SIGINT to the whole foreground process group: the run checkpoints at the end of the batch and
exits 130; a second Ctrl-C stops at once.
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.processes import (
    SLURM_ONE_TASK,
    STREAMED,
    ctrl_c,
    ended,
    rank_process,
    start_train,
    wait_for_file,
    wait_for_workers,
    wait_idle,
)
from tests.helpers.run import EMA_CLIP_SKIP, EXACT, assert_same_run, run_train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("launch", ["local", "slurm"])
def test_usr1_to_loader_workers_neither_kills_them_nor_stops_the_run(launch, tiny_overrides, tmp_path):
    """`kill -USR1 <worker>` (what SLURM does to every process of the step): the run goes on to the end."""
    steps = 100
    proc = start_train(tiny_overrides + [f"trainer.max_steps={steps}", "trainer.val_check_interval=100",
                                         "checkpoint.every_n_steps=100", *STREAMED],
                       SLURM_ONE_TASK if launch == "slurm" else None)
    workers = wait_for_workers(proc, 2)  # the training loader's default 2 workers, forked before step 0
    for _ in range(3):  # more than once: a handler that ran once could be gone
        for w in workers:
            try:
                os.kill(w, signal.SIGUSR1)
            except ProcessLookupError:  # the signal killed it (the bug): the run's exit shows it
                pass
        time.sleep(0.2)
    running = proc.poll() is None  # the signals reached a run that was still under way (not after its end)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-6000:]
    assert f"# done: step {steps}" in out, out[-6000:]
    assert "killed by signal" not in out, out[-6000:]
    assert running, f"the run ended before the signals were sent: nothing was tested\n{out[-6000:]}"
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == steps
    assert not list((tmp_path / "run").glob("hpc_ckpt_*.ckpt")), "a worker acted on the signal"


def test_ctrl_c_checkpoints_at_the_batch_end_and_the_same_command_resumes_exactly(tiny_overrides, tmp_path):
    steps = 80  # Ctrl-C right after the first checkpoint (step 20); validation at 50 in the resumed part
    args = tiny_overrides + EXACT + [f"trainer.max_steps={steps}", "trainer.val_check_interval=50",
                                     "checkpoint.every_n_steps=20"]
    run_dir = tmp_path / "run"
    proc = start_train(args)
    wait_for_file(proc, run_dir / "checkpoints" / "last.ckpt")  # under way: the first periodic checkpoint
    ctrl_c(proc)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-6000:]
    assert "Ctrl-C: saving a checkpoint at the end of this batch" in out, out[-6000:]
    stop = re.search(r"# interrupted at step (\d+): checkpoint saved to (\S+)", out)
    assert stop and Path(stop.group(2)) == run_dir / "checkpoints" / "last.ckpt", out[-6000:]
    step = int(stop.group(1))
    assert 20 <= step < steps
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step
    assert f"# continue with the same command: python -m pipeline.train {shlex.join(args)}" in out, out[-3000:]
    assert "Traceback" not in out, out[-6000:]

    resumed = run_train(args)  # the same command
    assert f"(step {step})" in resumed.stdout, resumed.stdout[-3000:]
    run_train(args + [f"run.dir={tmp_path / 'ref'}"])  # uninterrupted
    assert_same_run(tmp_path / "ref", run_dir, first_step=step, last_step=steps)


def test_sigterm_with_ema_and_skipping_checkpoints_at_a_batch_end_and_resumes_exactly(tiny_overrides, tmp_path):
    """The EMA is updated before DeferredSignals saves at that batch end: the checkpoint holds the step's EMA,
    trained weights and skip count, and the resumed run continues them as if never stopped."""
    steps = 80
    args = tiny_overrides + EXACT + EMA_CLIP_SKIP + [f"trainer.max_steps={steps}", "trainer.val_check_interval=50",
                                                     "checkpoint.every_n_steps=20"]
    run_dir = tmp_path / "run"
    proc = start_train(args)
    wait_for_file(proc, run_dir / "checkpoints" / "last.ckpt")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-6000:]
    assert "Traceback" not in out and "# done" not in out, out[-6000:]
    stop = re.search(r"# SIGTERM at step (\d+): checkpoint saved to (\S+); stopped", out)
    assert stop and Path(stop.group(2)) == run_dir / "checkpoints" / "last.ckpt", out[-6000:]
    step = int(stop.group(1))
    assert 20 <= step < steps, step
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == step and int(saved["averaging_state"]["n_averaged"]) == step
    run_train(args)
    run_train(args + [f"run.dir={tmp_path / 'ref'}"])
    assert_same_run(tmp_path / "ref", run_dir, first_step=step, last_step=steps)


def test_second_ctrl_c_stops_at_once(tiny_overrides, tmp_path):
    """A batch that never ends (its loader workers stopped): the first Ctrl-C waits for it, the second
    stops the run at once, with no checkpoint beyond the last one."""
    never = "100000"
    run_dir = tmp_path / "run"
    proc = start_train(tiny_overrides + [f"trainer.max_steps={never}", f"trainer.val_check_interval={never}",
                                         f"checkpoint.every_n_steps={never}", "logger.images_every_n_steps=0",
                                         *STREAMED])
    workers = wait_for_workers(proc, 2)
    time.sleep(0.5)  # training under way
    try:
        for w in workers:
            os.kill(w, signal.SIGSTOP)
        wait_idle(proc.pid)  # the batches already loaded are used up: the training process waits for the next
        ctrl_c(proc)
        time.sleep(2.0)
        assert proc.poll() is None, proc.stdout.read()[-6000:]  # the first Ctrl-C waits for the batch end
        ctrl_c(proc)
        time.sleep(0.5)
    finally:
        for w in workers:  # a stuck worker that recovers must not let the run go on to a checkpoint
            try:
                os.kill(w, signal.SIGCONT)
            except ProcessLookupError:
                pass
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-6000:]
    assert "Ctrl-C: saving a checkpoint at the end of this batch" in out, out[-6000:]  # the first one waited
    assert "# stopped at once (Ctrl-C); no checkpoint yet" in out, out[-6000:]
    assert "# continue with the same command: python -m pipeline.train" in out, out[-6000:]
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_sigterm_to_one_ddp_rank_stops_every_rank(rank, tiny_overrides, tmp_path):
    """`kill <pid>` of one rank of a 2-rank DDP run: the ranks agree on it at their next agreement step
    (trainer.signal_every_n_steps; Lightning's own per-step SIGTERM broadcast is off) and stop there together,
    with no hang and no step half-done: one checkpoint at the step the run reports, exit 143."""
    never = "100000"
    run_dir = tmp_path / "run"
    proc = start_train(tiny_overrides + ["trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=32",
                                         f"trainer.max_steps={never}", f"trainer.val_check_interval={never}",
                                         "checkpoint.every_n_steps=20", "logger.images_every_n_steps=0"])
    other = rank_process(proc, 1)
    wait_for_file(proc, run_dir / "checkpoints" / "last.ckpt")  # under way
    os.kill(proc.pid if rank == 0 else other, signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # the hang this guards against (Lightning's broadcast in the handler)
        for kill, pid in ((os.killpg, proc.pid), (os.kill, other)):
            with contextlib.suppress(ProcessLookupError):
                kill(pid, signal.SIGKILL)
        raise
    assert proc.returncode == 143, out[-6000:]
    assert "received SIGTERM: stopping on every rank" in out, out[-6000:]
    assert "Traceback" not in out and "# done" not in out, out[-6000:]
    assert ended(other), "rank 1 still runs"
    stop = re.search(r"# SIGTERM at step (\d+): checkpoint saved to", out)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert stop and 20 <= ckpt["global_step"] == int(stop.group(1)) < int(never), out[-6000:]
