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
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_train
from tests.test_train import EMA_CLIP_SKIP, EXACT, assert_same_run

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


# Digits fits the default data.cache (the training process holds the split: no training-loader workers);
# the tests of what reaches loader workers stream it through them, as every split too large to hold is.
STREAMED = ["data.cache=none"]


def start_train(args, env_extra=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SLURM_"))}
    env.update(PYTHONUNBUFFERED="1", **(env_extra or {}))
    # its own process group, as a command started from a terminal: Ctrl-C signals the whole group
    return subprocess.Popen([sys.executable, "-m", "pipeline.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def ctrl_c(proc: subprocess.Popen) -> None:
    """What a terminal does on Ctrl-C: SIGINT to every process of the foreground group (workers too)."""
    os.killpg(proc.pid, signal.SIGINT)


def wait_for_file(proc: subprocess.Popen, path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-6000:]
        time.sleep(0.02)


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


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def runnable_threads(pid: int) -> int:
    """Threads of `pid` running or waiting for a CPU (state R): a starved process uses no CPU but is not idle."""
    count = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            count += (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return count


def wait_idle(pid: int, quiet: float = 1.0, timeout: float = 60) -> None:
    """Until `pid` has used no CPU and had no runnable thread for `quiet` seconds (blocked, e.g. waiting for a
    batch): on a busy machine the batches a loader had buffered can take a while to use up, and a process
    waiting for a CPU uses none (CPU time alone said idle under a loaded full suite)."""
    deadline = time.monotonic() + timeout
    last, since = cpu_seconds(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = cpu_seconds(pid)
        if now != last or runnable_threads(pid):
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
    raise AssertionError(f"process {pid} still busy after {timeout}s")


@pytest.mark.parametrize("launch", ["local", "slurm"])
def test_usr1_to_loader_workers_neither_kills_them_nor_stops_the_run(launch, tiny_overrides, tmp_path):
    """`kill -USR1 <worker>` (what SLURM does to every process of the step): the run goes on to the end."""
    steps = 300
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
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-6000:]
    assert f"# done: step {steps}" in out, out[-6000:]
    assert "killed by signal" not in out, out[-6000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == steps
    assert not list((tmp_path / "run").glob("hpc_ckpt_*.ckpt")), "a worker acted on the signal"


def test_ctrl_c_checkpoints_at_the_batch_end_and_the_same_command_resumes_exactly(tiny_overrides, tmp_path):
    steps = 200
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
    steps = 120
    args = tiny_overrides + EXACT + EMA_CLIP_SKIP + [f"trainer.max_steps={steps}", "trainer.val_check_interval=50",
                                                     "checkpoint.every_n_steps=20"]
    run_dir = tmp_path / "run"
    proc = start_train(args)
    wait_for_file(proc, run_dir / "checkpoints" / "last.ckpt")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-6000:]
    stop = re.search(r"# SIGTERM at step (\d+): checkpoint saved", out)
    assert stop, out[-6000:]
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


def rank_process(proc: subprocess.Popen, rank: int, timeout: float = 120) -> int:
    """The pid of DDP rank `rank` (> 0) that Lightning launched from the training process `proc`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-6000:]
        for pid in children(proc.pid):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            if f"LOCAL_RANK={rank}".encode() in env:
                return pid
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no rank {rank} after {timeout}s:\n{proc.stdout.read()[-6000:]}")


def ended(pid: int, timeout: float = 30) -> bool:
    """Whether `pid` exits (or is a zombie: exited, not yet reaped) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("rank", [0, 1])
def test_sigterm_to_one_ddp_rank_stops_every_rank(rank, tiny_overrides, tmp_path):
    """`kill <pid>` of one rank of a 2-rank DDP run: the ranks agree on it at their next agreement step
    (trainer.signal_every_n_steps; Lightning's own per-step SIGTERM broadcast is off) and stop there together,
    with no hang and no step half-done."""
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
    assert "received SIGTERM: stopping on every rank" in out, out[-6000:]
    assert "Traceback" not in out and "# done" not in out, out[-6000:]
    assert ended(other), "rank 1 still runs"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert 20 <= ckpt["global_step"] < int(never)
