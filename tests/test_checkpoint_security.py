"""No checkpoint runs code: a pickle payload (`__reduce__` -> a shell command that creates a file) planted
on every path that reads a checkpoint must leave no file behind and be refused in one line naming it.

Paths: the loaders themselves, `resume=<path>`, `resume=auto` (a planted last.ckpt), `pipeline.launch.sweep run`
(its finished-point check), `pipeline.evaluate` and `pipeline.report` (the traversal grids). The bench
reads no checkpoint (it trains from scratch in its own temporary run directories)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.run.checkpointing import (
    AtomicCheckpointIO,
    CheckpointError,
    checkpoint_step,
    load_verified,
    safe_load,
    with_checksum,
)
from tests.helpers.run import run_train


class Payload:
    """What an attacker puts in a checkpoint: unpickling it calls os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(dst: Path, marker: Path, base: Path | None = None) -> Path:
    """A checkpoint at `dst` carrying the payload: `base`'s real contents (with a valid checksum, as an
    attacker can compute one) or a bare dict."""
    ckpt = safe_load(base) if base is not None else {"state_dict": {"w": torch.ones(2)}}
    ckpt["extra"] = Payload(marker)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(with_checksum(ckpt), dst)
    return dst


@pytest.fixture
def marker(tmp_path) -> Path:
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "the checkpoint ran code"


def test_every_loader_refuses_a_payload_in_one_line(tmp_path, marker):
    path = plant(tmp_path / "down.ckpt", marker)
    torch.load(path, weights_only=False)  # the payload is real: the old unpickling runs it
    assert marker.exists()
    marker.unlink()
    loaders = [safe_load, load_verified, checkpoint_step,
               lambda p: AtomicCheckpointIO().load_checkpoint(p, weights_only=False)]  # what Lightning asks for
    for load in loaders:
        with pytest.raises(CheckpointError) as e:
            load(path)
        text = str(e.value)
        assert "\n" not in text and str(path) in text and "refused" in text and "posix.system" in text, text


def test_plain_data_and_numpy_still_load(tmp_path):
    """What checkpoints legitimately hold (loader and callback state may keep numpy values) loads."""
    state = {"w": torch.arange(3.0), "a": np.arange(4), "f": np.float32(1.5), "i": np.int64(7), "s": {"k": [1, "x"]}}
    torch.save(with_checksum(state), tmp_path / "ok.ckpt")
    back = load_verified(tmp_path / "ok.ckpt")
    assert np.array_equal(back["a"], state["a"]) and back["f"] == np.float32(1.5) and back["i"] == 7
    assert torch.equal(back["w"], state["w"]) and back["s"] == {"k": [1, "x"]}


@pytest.fixture
def finished_run(trained_run) -> Path:
    """A real 20-step run (last.ckpt and best-step0000020.ckpt): the session's, read only (copied to change)."""
    return trained_run


@pytest.mark.slow  # two tiny trainings
def test_training_refuses_a_downloaded_checkpoint_and_a_planted_last(finished_run, tmp_path, digits_root, marker):
    from tests.helpers.run import TINY

    base = finished_run / "checkpoints" / "last.ckpt"
    down = plant(tmp_path / "downloaded.ckpt", marker, base)
    proc = run_train(TINY + [f"data.root={digits_root}", f"run.dir={tmp_path / 'other'}", f"resume={down}"],
                     check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and str(down) in err[0] and "refused" in err[0], proc.stderr

    # resume=auto with a planted last.ckpt: refused with a warning, the best checkpoint continues the run
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    plant(run / "checkpoints" / "last.ckpt", marker, base)
    proc = run_train(TINY + [f"data.root={digits_root}", f"run.dir={run}", "trainer.max_steps=30"])
    assert f"not resuming from {run / 'checkpoints' / 'last.ckpt'}" in proc.stdout and "refused" in proc.stdout
    assert "resuming from" in proc.stdout and "(step 20)" in proc.stdout
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 30


@pytest.mark.slow  # trains both points of a two-point sweep
def test_sweep_neither_runs_a_planted_checkpoint_nor_stops_at_a_corrupt_one(finished_run, tmp_path, digits_root,
                                                                           marker, capfd):
    from pipeline.launch.sweep import main
    from tests.helpers.run import TINY

    f = tmp_path / "s.yaml"
    f.write_text("name: sec\nmethod: grid\nparameters:\n  objective.beta: {values: [1, 2]}\n"
                 "command: ['${env}', '${interpreter}', '-m', 'pipeline.train', '${args_no_hyphens}']\n")
    out = tmp_path / "sweep"
    shutil.copytree(finished_run, out / "objective.beta=1")  # point 1 finished; then its last.ckpt replaced
    (out / "objective.beta=1" / "config.yaml").unlink()  # (its config is another beta's: the point writes its own)
    last = plant(out / "objective.beta=1" / "checkpoints" / "last.ckpt", marker,
                 finished_run / "checkpoints" / "last.ckpt")
    overrides = [o for o in TINY if not o.startswith("run.dir=")] + [f"data.root={digits_root}",
                                                                      "trainer.max_steps=20"]
    assert main(["run", str(f), "--out", str(out), *overrides]) == 0
    text = capfd.readouterr().out
    assert f"# warning: {last} refused" in text, text
    assert checkpoint_step(last) == 20 and checkpoint_step(out / "objective.beta=2" / "checkpoints" / "last.ckpt") == 20


@pytest.mark.slow  # trains a tiny run (once per module)
def test_evaluate_and_report_refuse(finished_run, tmp_path, marker, capsys):
    from pipeline.analysis.evaluate import main as evaluate_main
    from pipeline.analysis.report import report

    down = plant(tmp_path / "down.ckpt", marker, finished_run / "checkpoints" / "last.ckpt")
    assert evaluate_main([str(down)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(down) in err and "refused" in err, err

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    plant(run / "checkpoints" / "last.ckpt", marker, finished_run / "checkpoints" / "last.ckpt")
    result = report([run], out=tmp_path / "report", traversals=True, wandb_log=False)
    assert "traversals" not in result["files"]
    assert "refused" in result["files"]["markdown"].read_text()
