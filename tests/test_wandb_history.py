"""W&B's own records of a resumed run, read back with `wandb leet inspect --json` (tests/helpers/wandb_records.py):
one run id, one history whose `_step` keeps increasing across the offline segments of a stopped, Ctrl-C'd or
extended run, and every metrics.csv value and image grid in it. (The SLURM requeue: tests/test_slurm.py.)
Real training processes in offline mode, as on a compute node without internet."""
from __future__ import annotations

import os
import re
import signal

import pytest
import torch

from tests.helpers.processes import ctrl_c, start_train, wait_for_file
from tests.helpers.run import run_train
from tests.helpers.wandb_records import check_history

pytestmark = pytest.mark.slow


@pytest.fixture
def offline(tiny_overrides):
    return [a for a in tiny_overrides if not a.startswith("logger.wandb.mode=")] + ["logger.wandb.mode=offline"]


# The extended run (max_steps=20, then the same run extended to 40): tests/test_secrets.py::
# test_a_resumed_offline_run_keeps_one_wandb_history_and_writes_the_key_nowhere checks its history on the runs it makes anyway.


def test_checkpoints_as_artifacts_when_asked(offline, tmp_path):
    """logger.wandb.log_checkpoints=all: the best and the last checkpoint, as versions of model-<run id>,
    recorded offline (uploaded by `wandb sync`)."""
    run_train(offline + ["trainer.max_steps=20", "logger.wandb.log_checkpoints=all"])
    (seg,) = check_history(tmp_path / "run", n_segments=1)
    arts = {a["manifest"]["contents"][0]["path"]: a for a in seg["artifacts"]}
    assert set(arts) == {"last.ckpt", "best-step0000020.ckpt"}, arts.keys()
    assert all(a["name"] == f"model-{seg['run_id']}" and a["type"] == "model" for a in arts.values())
    assert set(arts["last.ckpt"]["aliases"]) == {"latest", "step-20"}
    assert {"best", "step-20"} <= set(arts["best-step0000020.ckpt"]["aliases"])  # W&B adds "latest" to each new version
    size = (tmp_path / "run" / "checkpoints" / "last.ckpt").stat().st_size
    assert int(arts["last.ckpt"]["manifest"]["contents"][0]["size"]) == size


# A run long enough for a signal to land mid-run; the resume runs a few validations more.
LONG = ["trainer.max_steps=200", "trainer.val_check_interval=20", "logger.images_every_n_steps=20",
        "checkpoint.every_n_steps=20"]


def stop_mid_run(args, run_dir, send) -> tuple:
    proc = start_train(args)
    wait_for_file(proc, run_dir / "checkpoints" / "last.ckpt")  # under way: the first periodic checkpoint
    send(proc)
    out, _ = proc.communicate(timeout=180)
    return proc.returncode, out


def test_ctrl_c_and_resume_continue_one_history(offline, tmp_path):
    run_dir = tmp_path / "run"
    code, out = stop_mid_run(offline + LONG, run_dir, ctrl_c)
    assert code == 130, out[-6000:]
    step = int(re.search(r"# interrupted at step (\d+)", out).group(1))
    run_train(offline + LONG + [f"trainer.max_steps={step + 30}"])
    check_history(run_dir, n_segments=2)


def test_stop_signal_and_resume_continue_one_history(offline, tmp_path):
    """USR1 outside SLURM (a scheduler's stop signal): hpc_ckpt_1.ckpt at the batch end, then a resume."""
    run_dir = tmp_path / "run"
    code, out = stop_mid_run(offline + LONG, run_dir, lambda p: os.kill(p.pid, signal.SIGUSR1))
    assert code == 138, out[-6000:]  # stopped, checkpointed, nothing requeues it outside SLURM
    step = torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=False)["global_step"]
    assert 20 <= step < 200, out[-3000:]
    run_train(offline + LONG + [f"trainer.max_steps={step + 30}"])
    check_history(run_dir, n_segments=2)
