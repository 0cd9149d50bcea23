"""pipeline/run/checkpointing.py: atomic checksummed writes, verification, resume candidates; and the checkpoint
failures a run meets: an unwritable directory (as a non-root user), bytes changed on disk (evaluate, resume),
a damaged newest checkpoint."""
from __future__ import annotations

import functools
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.run import checkpointing as ck
from tests.helpers.run import REPO, TINY, run_train


def sample_checkpoint(scale: float = 1.0) -> dict:
    """What a Lightning checkpoint holds: tensors of several dtypes, nested containers, numbers, strings,
    a set (its iteration order depends on the string hash seed), a numpy scalar."""
    g = torch.Generator().manual_seed(0)
    return {
        "global_step": 7,
        "state_dict": {"w": torch.randn(64, 32, generator=g) * scale, "b": torch.zeros(32, dtype=torch.bfloat16),
                       "n": torch.tensor(3)},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(7.0)}},
                              "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999)}]}],
        "callbacks": {"ModelCheckpoint{'monitor': 'val/elbo'}": {"best_model_path": "x/best.ckpt",
                                                                  "best_model_score": torch.tensor(-40.5)}},
        "loops": {"seen": {"alpha", "beta", "gamma", "delta"}, "ratio": float("nan"), "count": np.int64(5)},
    }


def largest_tensor_record(path: Path) -> tuple[int, int]:
    """(offset, size) of the raw bytes of the largest tensor stored in a torch checkpoint archive."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def flip_bytes(src: Path, dst: Path, n: int = 32) -> None:
    """Copy `src` to `dst` with n bytes inside a stored tensor inverted: the archive still loads (tensor
    records carry no CRC check on load), the weights are different."""
    data = bytearray(src.read_bytes())
    offset, size = largest_tensor_record(src)
    for i in range(offset + size // 2, offset + size // 2 + n):
        data[i] ^= 0xFF
    dst.write_bytes(bytes(data))


# ---- writing and verifying --------------------------------------------------------------------------------
@pytest.mark.slow  # a real training run (or several processes)
def test_checksum_verifies_after_a_round_trip_in_another_process(tmp_path):
    path = tmp_path / "a.ckpt"
    ck.atomic_save(sample_checkpoint(), path)
    loaded = ck.load_verified(path)
    assert ck.CHECKSUM_KEY in loaded and ck.checksum_problem(loaded) is None
    # Another process with another string hash seed (ours is random) computes the same checksum.
    code = f"from pipeline.run.checkpointing import load_verified; load_verified({str(path)!r}); print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONHASHSEED": "1"})
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_changed_contents_are_refused_naming_the_file(tmp_path):
    good, bad = tmp_path / "good.ckpt", tmp_path / "bad.ckpt"
    ck.atomic_save(sample_checkpoint(), good)
    flip_bytes(good, bad)
    torch.load(bad, weights_only=False)  # loads fine: only the checksum can tell
    with pytest.raises(ck.CheckpointError, match=rf"^{bad}: .*do not match the checksum"):
        ck.load_verified(bad)
    edited = ck.load_verified(good)
    edited["global_step"] = 8
    assert "checksum" in ck.checksum_problem(edited)
    del edited[ck.CHECKSUM_KEY]
    assert ck.checksum_problem(edited) is None  # written before checksums existed: accepted unverified


def test_a_failed_write_keeps_the_previous_checkpoint_and_names_the_file(tmp_path):
    path = tmp_path / "ckpts" / "last.ckpt"
    ck.atomic_save(sample_checkpoint(1.0), path)

    def dies_half_way(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    def writes_garbage(obj, f):  # "succeeds" but leaves no checkpoint archive
        f.write(b"\0" * 100)

    for broken in (dies_half_way, writes_garbage):
        with pytest.raises(ck.CheckpointWriteError, match=rf"^cannot write checkpoint {path}: "):
            ck.atomic_save(sample_checkpoint(2.0), path, save=broken)
        assert torch.equal(ck.load_verified(path)["state_dict"]["w"], sample_checkpoint(1.0)["state_dict"]["w"])
        assert os.listdir(path.parent) == ["last.ckpt"]  # no temporary file left behind


def test_the_temporary_file_is_beside_the_checkpoint_whatever_tmpdir(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    monkeypatch.setattr(tempfile, "tempdir", None)
    renames, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((Path(a), Path(b))), replace(a, b))[1])
    path = tmp_path / "ckpts" / "last.ckpt"
    ck.atomic_save(sample_checkpoint(), path)
    assert renames and all(src.parent == dst.parent == path.parent for src, dst in renames)  # atomic rename
    assert not list(elsewhere.iterdir())


def test_remove_temp_files_only_removes_writers_leftovers(tmp_path):
    keep = [tmp_path / n for n in ("last.ckpt", "notes.tmp", ".hidden")]
    gone = [tmp_path / ".last.ckpt.123-0a1b2c3d.tmp", tmp_path / ".write-test.9-ffffffff.tmp"]
    for p in keep + gone:
        p.write_bytes(b"x")
    assert sorted(ck.remove_temp_files(tmp_path)) == sorted(gone)
    assert sorted(tmp_path.iterdir()) == sorted(keep)


# ---- choosing what to resume from -------------------------------------------------------------------------
def test_resume_auto_takes_the_newest_checkpoint_that_loads_and_verifies(tmp_path):
    run = tmp_path / "run"
    paths = {"last": run / "checkpoints" / "last.ckpt", "hpc": run / "hpc_ckpt_1.ckpt",
             "best": run / "checkpoints" / "best-step0000010.ckpt"}
    for age, (name, p) in enumerate(paths.items()):  # last oldest, best newest
        ck.atomic_save({**sample_checkpoint(), "global_step": name}, p)
        os.utime(p, ns=(10**18 + age * 10**9,) * 2)
    notes = []
    # The newest save point; a best checkpoint only as a fallback (it may be older than last.ckpt's step).
    assert ck.choose_resume("auto", run, notes.append)[1]["global_step"] == "hpc" and not notes

    paths["hpc"].write_bytes(paths["hpc"].read_bytes()[:1000])  # a kill mid-copy: truncated
    assert ck.choose_resume("auto", run, notes.append)[1]["global_step"] == "last"
    assert len(notes) == 1 and notes[0].startswith(f"# warning: not resuming from {paths['hpc']}: ")
    assert "cannot be loaded" in notes[0]

    flip_bytes(paths["last"], paths["last"])
    notes.clear()
    path, state = ck.choose_resume("auto", run, notes.append)
    assert path == str(paths["best"]) and state["global_step"] == "best"
    assert any(str(paths["last"]) in n and "checksum" in n for n in notes) and len(notes) == 2

    paths["best"].write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match="no checkpoint in .* can be resumed from .*resume=never"):
        ck.choose_resume("auto", run, notes.append)
    with pytest.raises(ck.CheckpointError, match=str(paths["last"])):
        ck.choose_resume(str(paths["last"]), run)  # a named checkpoint is never swapped for another
    assert ck.choose_resume("never", run) is None
    assert ck.choose_resume("auto", tmp_path / "fresh") is None


# ---- real runs ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_evaluate_and_resume_refuse_a_checkpoint_whose_bytes_changed(digits_root, trained_run, tmp_path, capsys):
    from pipeline.analysis.evaluate import main as evaluate_main

    run = tmp_path / "trained"
    shutil.copytree(trained_run, run)  # the shared run stays as it is
    flipped = run / "checkpoints" / "flipped.ckpt"  # in the run, so evaluate finds its config.yaml
    flip_bytes(run / "checkpoints" / "last.ckpt", flipped)
    assert evaluate_main([str(flipped), "--iwae-samples", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: corrupt checkpoint {flipped}: ") and len(err.splitlines()) == 1, err
    proc = run_train(TINY + [f"data.root={digits_root}", f"run.dir={tmp_path / 'run'}", f"resume={flipped}"],
                     check=False)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith(f"error: {flipped}: ")


@pytest.mark.slow
def test_resume_survives_a_truncated_newest_checkpoint(digits_root, trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # what a kill mid-copy left
    proc = run_train(TINY + [f"data.root={digits_root}", f"run.dir={run_dir}", "trainer.max_steps=40"])
    best = run_dir / "checkpoints" / "best-step0000020.ckpt"
    assert f"not resuming from {last}: {last} cannot be loaded" in proc.stdout
    assert f"{last} replaced by a copy of {best}" in proc.stdout  # Lightning may then delete this best
    assert f"resuming from {last} (step 20)" in proc.stdout
    assert "# done: step 40" in proc.stdout
    assert ck.load_verified(last)["global_step"] == 40


# ---- permissions (as a non-root user: root ignores them) ----------------------------------------------------
def _drop_to_nobody(nobody):
    def drop():
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
    return drop


def _drop_file_capabilities():
    # Root without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH obeys permission bits like any user. Dropped
    # from the bounding set (prctl PR_CAPBSET_DROP) before exec, so the new program never regains them.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@functools.cache
def as_user():
    """(preexec_fn, uid, gid) that run a child without root's right to ignore file permissions (tests run
    as root on CI): as `nobody` where nobody can run this interpreter, else as root without the file
    permission capabilities (an interpreter under /root, mode 0700). As ourselves when not root."""
    if os.geteuid() != 0:
        return None, os.getuid(), os.getgid()
    nobody = pwd.getpwnam("nobody")
    try:
        if subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_drop_to_nobody(nobody)).returncode == 0:
            return _drop_to_nobody(nobody), nobody.pw_uid, nobody.pw_gid
    except OSError:  # exec refused: the interpreter is not reachable by nobody
        pass
    try:
        subprocess.run(["true"], preexec_fn=_drop_file_capabilities, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot drop root's file permission rights here ({e})")
    return _drop_file_capabilities, 0, 0


@pytest.fixture
def shared(digits_root):
    """A directory outside pytest's private tmp (mode 0700 on its root) that `nobody` can reach, with a
    readable copy of the data and a home."""
    root = Path(tempfile.mkdtemp(prefix="vae-perm-"))
    try:
        _, uid, gid = as_user()
        root.chmod(0o755)
        shutil.copytree(digits_root, root / "digits")
        for p in [root / "digits", *(root / "digits").rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        (root / "home").mkdir()
        (root / "run" / "checkpoints").mkdir(parents=True)
        for p in (root / "home", root / "run", root / "run" / "checkpoints"):
            os.chown(p, uid, gid)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def start_as_user(shared: Path, *extra: str) -> subprocess.Popen:
    drop, _, _ = as_user()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONUNBUFFERED="1", HOME=str(shared / "home"))
    args = TINY + [f"data.root={shared / 'digits'}", f"run.dir={shared / 'run'}", *extra]
    return subprocess.Popen([sys.executable, "-m", "pipeline.train", *args], cwd=REPO, env=env, preexec_fn=drop,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_an_unwritable_checkpoints_directory_stops_the_run_at_start(shared):
    ckpt_dir = shared / "run" / "checkpoints"
    ckpt_dir.chmod(0o555)  # the run directory is the user's; its checkpoints/ is not writable
    proc = start_as_user(shared)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "# done" not in out, out[-3000:]
    assert err.strip().splitlines()[-1] == f"error: cannot write checkpoints to {ckpt_dir}: Permission denied"


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_mid_run_stops_the_run_naming_it(shared):
    ckpt_dir = shared / "run" / "checkpoints"
    proc = start_as_user(shared, "trainer.max_steps=300")
    deadline = time.monotonic() + 120
    while not (ckpt_dir / "last.ckpt").is_file():  # the step-10 checkpoint is written ...
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    ckpt_dir.chmod(0o555)  # ... then the directory stops accepting files (quota, permissions, read-only mount)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "# done" not in out, out[-3000:]
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"error: cannot write checkpoint {ckpt_dir}/") and message.endswith(
        ".ckpt: Permission denied"), message
    assert ck.load_verified(ckpt_dir / "last.ckpt")["global_step"] == 10  # the previous one is intact
