"""W&B's own records of a resumed run, read back with `wandb leet inspect --json` (tests/helpers/wandb_records.py):
one run id, one history whose `_step` keeps increasing across the offline segments of a stopped, Ctrl-C'd or
extended run, and every metrics.csv value and image grid in it. (The SLURM requeue: tests/test_slurm.py.)
Real training processes in offline mode, as on a compute node without internet."""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

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


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def stop_mid_run(args, run_dir, send, after: int = 0) -> tuple:
    """Start the run, wait for a periodic checkpoint past step `after` (under way), `send` it a signal."""
    proc = start_train(args)
    last = run_dir / "checkpoints" / "last.ckpt"
    wait_for_file(proc, last)
    deadline = time.monotonic() + 120
    while step_of(last) <= after:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-6000:]
        time.sleep(0.05)
    send(proc)
    out, _ = proc.communicate(timeout=180)
    return proc.returncode, out


def test_ctrl_c_then_a_stop_signal_each_resumed_continue_one_history(offline, tmp_path):
    """Ctrl-C, resumed by the same command; then USR1 outside SLURM (a scheduler's stop signal: checkpointed at
    the batch end, exit 138, nothing requeues it), resumed again: one W&B run, one history of three segments."""
    run_dir = tmp_path / "run"
    code, out = stop_mid_run(offline + LONG, run_dir, ctrl_c)
    assert code == 130, out[-6000:]
    first = int(re.search(r"# interrupted at step (\d+)", out).group(1))

    code, out = stop_mid_run(offline + LONG, run_dir, lambda p: os.kill(p.pid, signal.SIGUSR1), after=first)
    assert code == 138, out[-6000:]
    assert f"(step {first})" in out, out[-6000:]  # the same command continued the Ctrl-C'd run
    assert "requeue at the end" not in out and "# done" not in out and "Traceback" not in out, out[-6000:]
    stop = re.search(r"# SIGUSR1 at step (\d+): checkpoint saved to (\S+); stopped \(outside SLURM nothing "
                     r"requeues the run\)", out)
    assert stop and step_of(Path(stop.group(2))) == int(stop.group(1)), out[-6000:]
    second = int(stop.group(1))
    assert first < second < 200, out[-3000:]

    resumed = run_train(offline + LONG + [f"trainer.max_steps={second + 30}"])
    assert f"(step {second})" in resumed.stdout, resumed.stdout[-3000:]
    check_history(run_dir, n_segments=3)
