"""Run integrity end to end, each against real training processes with the default loader workers: one writer
per run directory, a resume continues the same run or stops, an extended run keeps its step labels, a kill
during validation or during checkpoint writes loses nothing, and an exploding loss is reported and can stop."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from tests.helpers.run import REPO, TINY, assert_same_run, read_metrics, run_train

pytestmark = pytest.mark.slow

REF = TINY + ["trainer.log_every_n_steps=1"]  # every step's row, so comparisons see every step


def args_for(digits_root: Path, run_dir: Path, *extra: str) -> list:
    return REF + [f"data.root={digits_root}", f"run.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def reference(digits_root, tmp_path_factory) -> Path:
    """An uninterrupted 30-step run: what every interrupted run below must end up identical to."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_train(args_for(digits_root, run_dir))
    return run_dir


# `python -c` running PRELUDE (test instrumentation: a kill at an exact point, a pause) then the real
# entry point, as `python -m pipeline.train ARGS` would.
RUNNER = "import sys\n{prelude}\nfrom pipeline.training.train import main\nsys.exit(main(sys.argv[1:]))\n"


def start(args, prelude: str = "", env_extra=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-c", RUNNER.format(prelude=prelude), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # never leave a training behind
        raise
    return proc.returncode, out, err


# ---- one writer per run directory -----------------------------------------------------------------------
HOLD = """
import os, time
from pipeline.training.module import VAEModule
def _hold(self):  # training says it is running, then waits until the test lets it go
    open(os.environ["HOLDING"], "w").close()
    while not os.path.exists(os.environ["HOLD_UNTIL"]):
        time.sleep(0.05)
VAEModule.on_train_start = _hold
"""


def test_a_second_training_on_a_held_run_directory_stops_naming_the_holder(digits_root, tmp_path):
    run_dir, holding, go = tmp_path / "run", tmp_path / "holding", tmp_path / "go"
    first = start(args_for(digits_root, run_dir), HOLD, {"HOLDING": str(holding), "HOLD_UNTIL": str(go)})
    try:
        deadline = time.monotonic() + 120
        while not holding.exists():  # the first training is running
            assert first.poll() is None and time.monotonic() < deadline, "the first training did not start"
            time.sleep(0.05)
        started = time.monotonic()
        second = run_train(args_for(digits_root, run_dir), check=False)
        took = time.monotonic() - started
    finally:
        go.touch()
    rc, out, err = finish(first)
    assert rc == 0, err[-4000:]

    assert second.returncode != 0, second.stdout[-3000:]
    message = second.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: run directory {run_dir} is in use by pid {first.pid} on host "), message
    assert "# resolved config" not in second.stdout  # stopped before touching the run: no config, no rows
    assert took < 60, f"the refusal took {took:.0f}s"
    steps = [int(r["step"]) for r in read_metrics(run_dir) if r.get("train/loss")]
    assert steps == list(range(30))  # the holder's rows, each once
    assert not (run_dir / "run.lock").read_text()  # released at the end: no stale holder described


# ---- a resume continues the same run ---------------------------------------------------------------------
def test_extending_a_finished_run_keeps_every_step_label(digits_root, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)  # a finished 30-step run
    before = read_metrics(run_dir)
    proc = run_train(args_for(digits_root, run_dir, "trainer.max_steps=40"))
    assert "(step 30)" in proc.stdout
    rows = read_metrics(run_dir)
    assert rows[: len(before)] == before
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == list(range(40))  # each step once
    assert [int(r["step"]) for r in rows if r.get("val/elbo")] == [9, 19, 29, 39]  # not 40: no shift by one
    # The same labels as an uninterrupted run's, whose k-th step Lightning logs as step k - 1.
    assert [int(r["step"]) for r in before if r.get("val/elbo")] == [9, 19, 29]


def test_resume_with_a_setting_the_checkpoint_would_override_is_refused(digits_root, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    saved = (run_dir / "config.yaml").read_text()
    proc = run_train(args_for(digits_root, run_dir, "trainer.max_steps=40", "optim.lr=0.01", "seed=3"), check=False)
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: cannot resume {run_dir} with a different config (")
    assert "optim.lr: 0.001 -> 0.01" in message and "seed: 0 -> 3" in message  # each key, both values
    assert "trainer.max_steps" not in message and "run.dir" not in message  # allowed to differ
    assert "run.name=" in message and "resume=never" in message  # the two ways out
    assert (run_dir / "config.yaml").read_text() == saved  # nothing recorded that was not applied

    proc = run_train(args_for(digits_root, run_dir, "optim.lr=0.01", "resume=never", "trainer.max_steps=10"))
    assert "starting over" in proc.stdout and "resuming" not in proc.stdout  # way out 2
    assert load_config([run_dir / "config.yaml"]).optim.lr == 0.01
    rows = [r for r in read_metrics(run_dir) if r.get("lr-AdamW")]
    assert [int(r["step"]) for r in rows] == list(range(10))  # the old run's rows are gone
    assert {float(r["lr-AdamW"]) for r in rows} == {0.01}  # and the new lr is the one applied


# ---- kills ------------------------------------------------------------------------------------------------
KILL_DURING_VALIDATION = """
import os, signal
from pipeline.training.module import VAEModule
_validation_step = VAEModule.validation_step
def _kill_at_20(self, batch, batch_idx):
    if self.global_step == 20:
        os.kill(os.getpid(), signal.SIGKILL)
    return _validation_step(self, batch, batch_idx)
VAEModule.validation_step = _kill_at_20
"""
KILL_AFTER_BEST_CHECKPOINT = """
import os, signal
import lightning.pytorch as pl
_save = pl.Trainer.save_checkpoint
def _kill_after_best_20(self, filepath, *args, **kwargs):
    _save(self, filepath, *args, **kwargs)
    if os.path.basename(str(filepath)) == "best-step0000020.ckpt":
        os.kill(os.getpid(), signal.SIGKILL)
pl.Trainer.save_checkpoint = _kill_after_best_20
"""


def test_kills_in_the_validation_after_a_checkpoint_lose_nothing(digits_root, reference, tmp_path):
    """Killed during the validation at step 20 (right after the step-20 checkpoint was due), then, resumed,
    killed again just after that validation saved its best checkpoint: the finished run is the reference."""
    run_dir = tmp_path / "run"
    for prelude in (KILL_DURING_VALIDATION, KILL_AFTER_BEST_CHECKPOINT):
        rc, out, err = finish(start(args_for(digits_root, run_dir), prelude))
        assert rc == -signal.SIGKILL, f"no validation at step 20 ran (exit {rc}):\n{err[-3000:]}"
    run_train(args_for(digits_root, run_dir))
    assert_same_run(reference, run_dir, first_step=0, last_step=30)  # val/* at step 20 (row 19) included
    assert (run_dir / "images" / "reconstructions_step0000020.png").is_file()
    best = sorted(p.name for p in (run_dir / "checkpoints").glob("best-*.ckpt"))
    assert best == sorted(p.name for p in (reference / "checkpoints").glob("best-*.ckpt"))  # no stale best


def other_filesystem_dir(near: Path) -> Path:
    """A TMPDIR on another filesystem than `near` where there is one (/dev/shm), else another tree."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != near.stat().st_dev:
        return Path(tempfile.mkdtemp(prefix="vae-tmpdir-", dir=shm))
    path = near / "elsewhere" / "tmp"
    path.mkdir(parents=True)
    return path


def test_sigkill_during_checkpoint_writes_never_breaks_resume(digits_root, reference, tmp_path):
    """Checkpoint every step; SIGKILL the training at random moments, mostly while a checkpoint is being
    written (a temporary file is seen), with TMPDIR on another filesystem. Every restart must resume, and
    the run must end identical to the uninterrupted one."""
    run_dir, rng = tmp_path / "run", random.Random(0)
    args = args_for(digits_root, run_dir, "checkpoint.every_n_steps=1")
    tmpdir = other_filesystem_dir(tmp_path)
    watched = [run_dir / "checkpoints", tmpdir]
    kills, mid_write, deadline = 0, 0, time.monotonic() + 30  # each restart costs a few seconds
    try:
        while kills < 5 and time.monotonic() < deadline:
            proc = start(args, env_extra={"TMPDIR": str(tmpdir)})
            seen, target, killed = set(), rng.randint(1, 6), False
            while proc.poll() is None:
                for d in watched:  # temporary files: ours beside the checkpoint, or anything in TMPDIR
                    if d.is_dir():
                        seen |= {p for p in os.listdir(d) if p.endswith(".tmp") or d == tmpdir}
                if len(seen) >= target:
                    time.sleep(rng.uniform(0, 0.01))  # somewhere in the write, fsync, rename, or just after
                    proc.kill()
                    killed = True
                    break
                time.sleep(0.0005)
            rc, out, err = finish(proc)
            if not killed:  # it finished before the target: the run is complete
                assert rc == 0, err[-4000:]
                break
            assert rc == -signal.SIGKILL, f"the training failed on its own ({rc}):\n{err[-4000:]}"
            kills += 1
            ckpt_dir = run_dir / "checkpoints"
            mid_write += ckpt_dir.is_dir() and any(p.name.endswith(".tmp") for p in ckpt_dir.iterdir())
        proc = run_train(args, env_extra={"TMPDIR": str(tmpdir)})
        assert "# done: step 30" in proc.stdout
        leftovers = [p for p in tmpdir.rglob("*") if p.is_file()] + list((run_dir / "checkpoints").glob(".*"))
    finally:
        if tmpdir.parent == Path("/dev/shm"):
            shutil.rmtree(tmpdir, ignore_errors=True)
    print(f"{kills} kills, {mid_write} while a checkpoint was being written")
    assert kills >= 2
    assert not leftovers, f"orphaned temporary files: {leftovers}"
    assert_same_run(reference, run_dir, first_step=0, last_step=30)
    best = sorted(p.name for p in (run_dir / "checkpoints").glob("best-*.ckpt"))
    assert best == sorted(p.name for p in (reference / "checkpoints").glob("best-*.ckpt"))


# ---- values -----------------------------------------------------------------------------------------------
def test_an_exploding_loss_is_reported_and_max_loss_stops_it(digits_root, tmp_path):
    proc = run_train(args_for(digits_root, tmp_path / "warned", "optim.lr=1e3", "trainer.max_steps=10"))
    assert "# done: step 10" in proc.stdout  # finite but exploded: it runs to the end
    assert "training is diverging" in proc.stderr and "trainer.max_loss" in proc.stderr

    run_dir = tmp_path / "stopped"
    proc = run_train(args_for(digits_root, run_dir, "optim.lr=1e3", "trainer.max_loss=1e4"), check=False)
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: training loss ") and "exceeds trainer.max_loss=10000" in message, message
    assert f"last good checkpoint is kept in {run_dir / 'checkpoints'}" in message
    assert "# done" not in proc.stdout
    assert max(int(r["step"]) for r in read_metrics(run_dir)) < 5  # stopped at the first bound check
