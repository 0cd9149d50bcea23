"""Training processes under test: start one, signal it (Ctrl-C, SIGTERM, USR1), find its ranks and loader
workers, wait until it is idle or has ended."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.run import REPO


def children(pid: int) -> list[int]:
    """Direct children of `pid` (the loader workers of a training process; W&B is disabled here)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return out


def pids_with_environment(*entries: str) -> list[int]:
    """Every process whose environment holds all of `entries` ("NAME=value"), as /proc shows them now; processes
    that end or cannot be read meanwhile are left out."""
    wanted = [e.encode() for e in entries]
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = set((d / "environ").read_bytes().split(b"\0"))
        except OSError:  # ended meanwhile, or not ours to read
            continue
        if all(w in env for w in wanted):
            pids.append(int(d.name))
    return pids


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
