"""torchrun, the launcher where there is no SLURM: two agents on localhost stand for two nodes
(`torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d`), each rank with the default loader workers."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.processes import pids_with_environment
from tests.helpers.run import REPO, TINY

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_agents(tmp_path: Path, args: list, rdzv_id: str, restarts: int = 0) -> list:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SLURM_"))}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    if restarts:  # what the README says to set with --max-restarts (the run refuses to start without it)
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    port = free_port()
    agents = []
    for node in range(2):
        log = open(tmp_path / f"node{node}.log", "w")
        agents.append(subprocess.Popen(
            [*TORCHRUN, "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
             f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv_id}", f"--max-restarts={restarts}",
             "-m", "pipeline.train", *args], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return agents


def wait_all(agents, tmp_path: Path, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    try:
        for a in agents:
            a.wait(max(1.0, deadline - time.monotonic()))
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    logs = "\n".join(f"--- node{n} ---\n" + (tmp_path / f"node{n}.log").read_text()[-6000:] for n in range(2))
    assert [a.returncode for a in agents] == [0, 0], logs
    return logs


def trained_steps(run_dir: Path) -> list:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    key = next(k for k in rows[0] if k.startswith("train/loss"))
    return sorted(int(float(r["step"])) for r in rows if r.get(key))


def args_for(digits_root: Path, steps: int) -> list:
    return [*TINY, f"data.root={digits_root}", f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1"]


@pytest.mark.slow  # two torchrun agents, 2 ranks
def test_two_torchrun_nodes_train_with_layout_and_name_from_torchrun(digits_root, tmp_path):
    logs = wait_all(start_agents(tmp_path, args_for(digits_root, 30), "job1"), tmp_path)
    run_dir = tmp_path / "runs" / "torchrun-job1"  # the same directory on every node (and after a restart)
    assert " x 2 nodes" in logs and "# done: step 30" in logs, logs
    assert "It is recommended to use `self.log(" not in logs  # no sync_dist notice per validation key
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 30
    assert trained_steps(run_dir) == list(range(30))



def rank_process(rank: int) -> int:
    """The pid of the training process torchrun started as global rank `rank`: its loader workers inherit
    RANK too, so the one whose parent is a torchrun agent."""
    for pid in pids_with_environment(f"RANK={rank}"):
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            parent_cmd = Path(f"/proc/{parent}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
        if b"torch.distributed.run" in parent_cmd:
            return pid
    raise AssertionError(f"no training process of rank {rank}")


@pytest.mark.slow  # two torchrun agents, a group restart
def test_a_killed_rank_makes_torchrun_restart_the_group_which_resumes_from_its_checkpoint(digits_root, tmp_path):
    steps = 60
    agents = start_agents(tmp_path, [*args_for(digits_root, steps), "checkpoint.every_n_steps=20",
                                     "trainer.val_check_interval=20"], "job2", restarts=1)
    run_dir = tmp_path / "runs" / "torchrun-job2"
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(rank_process(1), 9)  # a node's worker lost
    logs = wait_all(agents, tmp_path)
    assert "(step 20)" in logs or "(step 40)" in logs, logs  # the restarted group resumed from a checkpoint
    assert "# done: step 60" in logs, logs
    assert "Traceback" not in logs, logs  # the surviving rank says one line, not gloo's traceback
    assert trained_steps(run_dir) == list(range(steps))  # each step once in metrics.csv
