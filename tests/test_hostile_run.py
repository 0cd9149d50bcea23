"""Issue 18, the run cases: what a careless user, a cluster or a failing disk does to a training run. Each
ends with a checkpoint and a known exit status or with one line naming the key, file or value: never a
traceback, never a silent exit 0.

Exit statuses: 2 bad input (config, run directory, checkpoint that is not this run's), 1 a failing disk,
130 Ctrl-C, 143 SIGTERM, 138 USR1 outside SLURM.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.processes import ctrl_c, start_train, wait_for_file
from tests.helpers.run import REPO, run_train

CKPT = Path("checkpoints") / "last.ckpt"
NEVER = "100000"
LONG = [f"trainer.max_steps={NEVER}", f"trainer.val_check_interval={NEVER}", "checkpoint.every_n_steps=20",
        "logger.images_every_n_steps=0"]
DDP = ["trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=32"]


def one_error_line(proc, status: int = 2) -> str:
    """The run ended with `status` and one `error:` line on stderr, no traceback; returns that line."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == status, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-4000:]
    return errors[0]


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def finish(proc, timeout: float = 120) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    return out


# ------------------------------------------------------------------------------ config values, one line each
@pytest.mark.parametrize("args, named", [
    (["seed=-1"], "'seed': -1"),
    (["trainer.devices=0"], "'trainer.devices': 0"),
    (["trainer.devices=-2"], "'trainer.devices': -2"),  # -1 is Lightning's "all devices": accepted
    (["data=[1,2]"], "'data'"),  # with data.root=... given too: OmegaConf's three-line message before
])
def test_bad_values_are_one_line_exit_2(args, named, tiny_overrides):
    proc = run_train(tiny_overrides + args, check=False)
    assert named in one_error_line(proc)


@pytest.mark.parametrize("text, named", [("- 1\n- 2\n", "must be a mapping"), ("data: [1, 2]\n", "'data': [1, 2]")])
def test_a_yaml_file_that_is_not_a_mapping_is_one_line(text, named, tiny_overrides, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    line = one_error_line(run_train([str(bad)] + tiny_overrides, check=False))
    assert str(bad) in line and named in line


# ------------------------------------------------------------------------------ the run directory
@pytest.mark.slow  # a real training run (or several processes)
def test_run_files_are_at_most_0644_whatever_the_umask(tiny_overrides, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        ["sh", "-c", 'umask 000 && exec "$0" -m pipeline.train "$@"', sys.executable,
         *tiny_overrides, "trainer.max_steps=10"],
        cwd=REPO, env={k: v for k, v in os.environ.items() if not k.startswith("WANDB_")},
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"last.ckpt", "config.yaml", "metrics.csv", "run.lock"} <= {p.name for p in files}
    loose = {str(p.relative_to(run_dir)): oct(stat.S_IMODE(p.stat().st_mode)) for p in [run_dir, *run_dir.rglob("*")]
             if stat.S_IMODE(p.stat().st_mode) & 0o022}
    assert not loose, loose


@pytest.mark.slow  # a real training run (or several processes)
@pytest.mark.parametrize("name", ["config.yaml", "metrics.csv"])
def test_a_run_file_that_is_a_directory_is_one_line(name, tiny_overrides, tmp_path):
    (tmp_path / "run" / name).mkdir(parents=True)
    line = one_error_line(run_train(tiny_overrides, check=False))
    assert str(tmp_path / "run" / name) in line and "directory" in line


@pytest.mark.slow
def test_a_metrics_csv_that_is_not_text_is_one_line(tiny_overrides, tmp_path):
    run_train(tiny_overrides + ["trainer.max_steps=10"])
    metrics = tmp_path / "run" / "metrics.csv"
    metrics.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\xff\xfe")
    line = one_error_line(run_train(tiny_overrides + ["trainer.max_steps=20"], check=False))
    assert str(metrics) in line and "not a CSV text file" in line


@pytest.mark.slow  # a real training run (or several processes)
def test_a_run_dir_that_is_a_file_is_exit_2(tiny_overrides, tmp_path):
    (tmp_path / "run").write_text("not a directory\n")
    assert str(tmp_path / "run") in one_error_line(run_train(tiny_overrides, check=False))


@pytest.mark.slow
def test_lowering_max_steps_below_a_finished_run_leaves_it_as_it_is(tiny_overrides, tmp_path):
    run_dir = tmp_path / "run"
    run_train(tiny_overrides + ["trainer.max_steps=20"])
    before = {p.name: p.read_bytes() for p in (run_dir / "config.yaml", run_dir / "metrics.csv")}
    line = one_error_line(run_train(tiny_overrides + ["trainer.max_steps=10"], check=False))
    assert "already past trainer.max_steps=10" in line and "step 20" in line, line
    assert {p.name: p.read_bytes() for p in (run_dir / "config.yaml", run_dir / "metrics.csv")} == before
    assert step_of(run_dir / CKPT) == 20


# ------------------------------------------------------------------------------ resume=<path>, model.init_from
@pytest.fixture(scope="module")
def beta4_run(digits_root, tmp_path_factory):
    """A finished run under objective.beta=4 and model.latent_dim=4 (the shrunk default)."""
    from tests.helpers.run import TINY

    run_dir = tmp_path_factory.mktemp("beta4") / "run"
    run_train(TINY + [f"data.root={digits_root}", f"run.dir={run_dir}", "trainer.max_steps=10",
                      "objective.beta=4"])
    return run_dir


@pytest.mark.slow
def test_resume_from_another_runs_checkpoint_is_refused(beta4_run, tiny_overrides, tmp_path):
    """The issue's case: this run (beta 1) exists, so its config.yaml matches; the checkpoint is beta 4's."""
    run_dir, ckpt = tmp_path / "run", beta4_run / CKPT
    run_train(tiny_overrides + ["trainer.max_steps=10"])
    before = {p: p.read_bytes() for p in (run_dir / "config.yaml", run_dir / "metrics.csv", run_dir / CKPT)}
    line = one_error_line(run_train(tiny_overrides + [f"resume={ckpt}", "trainer.max_steps=20"], check=False))
    assert "objective.beta: 4.0 -> 1.0" in line and f"model.init_from={ckpt}" in line, line
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.slow  # a real training run (or several processes)
def test_resume_from_a_checkpoint_with_another_latent_dim_is_one_line(beta4_run, tiny_overrides, tmp_path):
    line = one_error_line(run_train(tiny_overrides + [f"resume={beta4_run / CKPT}", "objective.beta=4",
                                                      "model.latent_dim=6"], check=False))
    assert "model.latent_dim: 4 -> 6" in line, line


@pytest.mark.slow  # a real training run (or several processes)
def test_init_from_warm_starts_the_weights_at_step_0(beta4_run, tiny_overrides, tmp_path):
    src = torch.load(beta4_run / CKPT, map_location="cpu", weights_only=False)
    proc = run_train(tiny_overrides + [f"model.init_from={beta4_run / CKPT}", "trainer.max_steps=1",
                                       "checkpoint.every_n_steps=1"])
    assert f"model weights from {beta4_run / CKPT}" in proc.stdout, proc.stdout[-3000:]
    ckpt = torch.load(tmp_path / "run" / CKPT, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 1  # step 0 + one step, not 10 + 1
    assert ckpt["optimizer_states"][0]["state"][0]["step"] == 1  # a new optimizer
    # one AdamW step of lr 1e-3 from the warm start's weights, not from a fresh init
    diff = max((ckpt["state_dict"][k] - v).abs().max().item() for k, v in src["state_dict"].items() if k.startswith("vae."))
    assert diff < 5e-3, diff


@pytest.mark.slow  # a real training run (or several processes)
def test_init_from_with_another_latent_dim_is_one_line(beta4_run, tiny_overrides):
    line = one_error_line(run_train(tiny_overrides + [f"model.init_from={beta4_run / CKPT}", "model.latent_dim=6"],
                                    check=False))
    assert "model.latent_dim: 4 -> 6" in line, line


# ------------------------------------------------------------------------------ signals
# SIGTERM on one device and to one DDP rank: tests/test_signals.py (exit 143, the checkpoint at the step reported);
# USR1 outside SLURM (exit 138, nothing requeues it) and its resume: tests/test_wandb_history.py.


@pytest.mark.slow
def test_ctrl_c_during_set_up_exits_130(tiny_overrides, tmp_path):
    """Ctrl-C while Lightning sets up (the loaders' and the datamodule's set-up run before training):
    status 130 as the README says, not Lightning's 1."""
    proc = start_train(tiny_overrides + LONG)
    for line in proc.stdout:  # the summary's last line: fit() begins right after it
        if line.startswith("# changed"):
            break
    ctrl_c(proc)
    out = finish(proc)
    assert proc.returncode == 130, out[-4000:]
    assert "Traceback" not in out, out[-4000:]


# ------------------------------------------------------------------------------ failing disks
def _full_after(limit: int):
    """os.fdopen whose files fill the disk after `limit` bytes (ENOSPC), as a small filesystem does."""
    real = os.fdopen

    class Full:
        def __init__(self, fd, mode="rb", *a, **kw):
            self.f, self.n = real(fd, mode, *a, **kw), 0

        def write(self, data):
            self.n += len(data)
            if self.n > limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    return Full


def test_disk_full_during_a_checkpoint_says_so_naming_the_file(monkeypatch, tmp_path):
    from pipeline.run.checkpointing import CheckpointWriteError, atomic_save

    path = tmp_path / "checkpoints" / "last.ckpt"
    monkeypatch.setattr(os, "fdopen", _full_after(50_000))
    with pytest.raises(CheckpointWriteError) as e:
        atomic_save({"state_dict": {"w": torch.zeros(100_000)}}, path)
    assert str(e.value) == f"cannot write checkpoint {path}: No space left on device"
    assert not list(path.parent.iterdir())  # no temporary file left behind


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                          capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -rm` to mount a small tmpfs")
def test_a_real_full_disk_mid_run_is_one_line(tiny_overrides, tmp_path):
    """A run directory on a 1 MiB tmpfs (a private mount namespace): the checkpoints fill it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=1m tmpfs "{run_dir}" && exec "$0" -m pipeline.train "$@"',
         sys.executable, *tiny_overrides, "trainer.max_steps=200", "model.hidden_dims=[256,128]",
         "checkpoint.every_n_steps=5", "logger.images_every_n_steps=0"],
        cwd=REPO, env={k: v for k, v in os.environ.items() if not k.startswith("WANDB_")},
        capture_output=True, text=True, timeout=300)
    line = one_error_line(proc, status=1)
    assert "No space left on device" in line and str(run_dir) in line, line


ROFS = textwrap.dedent("""
    # Test fault injection: once the trigger file exists, writes into the run directory fail with EROFS,
    # as they do when its filesystem is remounted read-only.
    import builtins, errno, os
    _open, _trigger, _run = builtins.open, os.environ["ROFS_TRIGGER"], os.environ["ROFS_RUN_DIR"]

    def _ro_open(file, mode="r", *a, **kw):
        if any(c in mode for c in "wax+") and str(file).startswith(_run) and os.path.exists(_trigger):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return _open(file, mode, *a, **kw)

    builtins.open = _ro_open
""")


@pytest.mark.slow
def test_a_read_only_run_dir_mid_run_is_one_line(tiny_overrides, tmp_path):
    run_dir, trigger, inject = tmp_path / "run", tmp_path / "read-only-now", tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(ROFS)
    proc = start_train(tiny_overrides + LONG + ["trainer.log_every_n_steps=1"],
                       {"PYTHONPATH": os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", str(REPO))]),
                        "ROFS_TRIGGER": str(trigger), "ROFS_RUN_DIR": str(run_dir)})
    wait_for_file(proc, run_dir / CKPT)
    trigger.touch()
    out = finish(proc)
    assert proc.returncode == 1, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert re.search(rf"error: cannot write {re.escape(str(run_dir))}/\S+: Read-only file system", out), out[-4000:]


# ------------------------------------------------------------------------------ DDP: a bad sample on one rank
@pytest.mark.slow
def test_a_bad_sample_in_one_ddp_ranks_range_is_one_line_and_a_quiet_peer(tmp_path):
    from pipeline.data import shards
    from tests.helpers.data import write_dataset
    from tests.helpers.run import TINY

    root = tmp_path / "data"
    write_dataset(root, {"train": (256, 256), "val": (64,)}, shape=(1, 8, 8))
    # one sample's image member replaced by bytes that are no image (the manifest's sha256 follows it)
    manifest = json.loads((root / shards.MANIFEST).read_text())
    entry = manifest["splits"]["train"]["shards"][1]
    samples = []
    for i in range(entry["samples"]):
        members = shards.encode_sample(f"trainx1x{i}", np.full((1, 8, 8), i % 256, np.uint8), i % 10)
        if i == 100:
            members[0] = (members[0][0], b"not an npy image")
        samples.append(members)
    entry["samples"], entry["sha256"] = shards.write_shard(root / entry["name"], samples)
    (root / shards.MANIFEST).write_text(json.dumps(manifest))

    proc = run_train(TINY + DDP + [f"data.root={root}", f"run.dir={tmp_path / 'run'}", "trainer.max_steps=40",
                                   "data.cache=none", "model.latent_dim=2"], check=False, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-5000:]
    assert "Traceback" not in out and "Connection closed by peer" not in out, out[-5000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train-000001.tar" in errors[0], proc.stderr[-4000:]
