"""W&B live sync for offline nodes: the requests a training writes and `python -m pipeline.sync watch`,
against a stand-in `wandb` on PATH that records each call (no W&B server here); the training side from a real run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.run.sync import Watcher, write_request
from tests.helpers.run import REPO, run_train

STAND_IN = """#!/bin/sh
# records its arguments; fails while $STUB_FAIL exists; runs $STUB_DURING (if set) while "syncing"
echo "$*" >> "$STUB_CALLS"
if [ -n "$STUB_DURING" ]; then sh -c "$STUB_DURING"; fi
if [ -e "$STUB_FAIL" ]; then echo "wandb: Network error (stand-in)" >&2; exit 1; fi
exit 0
"""


@pytest.fixture
def stub(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "wandb").write_text(STAND_IN)
    (bin_dir / "wandb").chmod(0o755)
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STUB_CALLS", str(calls))
    monkeypatch.setenv("STUB_FAIL", str(tmp_path / "fail"))
    monkeypatch.delenv("STUB_DURING", raising=False)
    return calls


def synced(calls: Path) -> list[str]:
    """The segment directory names the stand-in was asked to sync, in call order."""
    if not calls.exists():
        return []
    lines = calls.read_text().splitlines()
    assert all(line.startswith("sync --include-synced ") for line in lines), lines
    return [Path(line.split()[-1]).name for line in lines]


def watch_once(sync_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.sync", "watch", str(sync_dir), "--once"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env=dict(os.environ))


def request(sync_dir, run_id, stamp, seq, tmp_path):
    seg = tmp_path / "runs" / run_id / "wandb" / f"offline-run-{stamp}-{run_id}"
    seg.mkdir(parents=True, exist_ok=True)
    return write_request(sync_dir, seg.parents[1], run_id, seg, seq)


def test_watch_once_syncs_each_run_in_segment_order_one_line_each(stub, tmp_path):
    sync_dir = tmp_path / "requests"
    # a requeued run: the second segment's request is written first (file order must not matter)
    request(sync_dir, "abc", "20260101_120500", 1, tmp_path)
    request(sync_dir, "abc", "20260101_120000", 7, tmp_path)
    request(sync_dir, "xyz", "20260101_110000", 3, tmp_path)
    r = watch_once(sync_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = synced(stub)
    assert sorted(calls) == sorted(["offline-run-20260101_120000-abc", "offline-run-20260101_120500-abc",
                                    "offline-run-20260101_110000-xyz"])
    assert calls.index("offline-run-20260101_120000-abc") < calls.index("offline-run-20260101_120500-abc")
    assert r.stdout.count("synced run ") == 3, r.stdout
    assert not [p for p in sync_dir.iterdir() if not p.name.startswith(".")]  # every request done
    assert watch_once(sync_dir).returncode == 0 and len(synced(stub)) == 3  # nothing synced twice


def test_failed_sync_keeps_its_request_holds_back_later_segments_and_backs_off(stub, tmp_path):
    sync_dir = tmp_path / "requests"
    request(sync_dir, "abc", "20260101_120000", 1, tmp_path)
    request(sync_dir, "abc", "20260101_120500", 1, tmp_path)
    (tmp_path / "fail").touch()
    r = watch_once(sync_dir)
    assert r.returncode == 1 and "sync failed for run abc segment offline-run-20260101_120000-abc" in r.stdout, r.stdout
    assert "Network error (stand-in)" in r.stdout and "retry in" in r.stdout
    assert synced(stub) == ["offline-run-20260101_120000-abc"]  # the second segment waited
    assert (sync_dir / "offline-run-20260101_120000-abc.json").is_file()

    # in a long-running watcher the run backs off (doubling) before it is tried again
    stub.unlink()
    w = Watcher(sync_dir, retry_s=0.4, max_retry_s=10)
    assert w.pass_once() == 1 and w.failures["abc"] == 1
    assert w.pass_once() == 0 and len(synced(stub)) == 1  # backing off: no call
    time.sleep(0.5)
    assert w.pass_once() == 1 and w.failures["abc"] == 2 and len(synced(stub)) == 2
    assert w.not_before["abc"] - time.monotonic() > 0.5  # 0.8 s now
    (tmp_path / "fail").unlink()
    time.sleep(0.9)
    assert w.pass_once() == 0
    assert synced(stub)[-2:] == ["offline-run-20260101_120000-abc", "offline-run-20260101_120500-abc"]
    assert not list(sync_dir.glob("*.json*"))


def test_request_written_during_a_sync_is_synced_again(stub, tmp_path, monkeypatch):
    sync_dir = tmp_path / "requests"
    first = request(sync_dir, "abc", "20260101_120000", 1, tmp_path)
    body = json.loads(first.read_text())
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(dict(body, seq=2)))
    # while the first sync runs, the still-training run asks again (atomically, as write_request does)
    monkeypatch.setenv("STUB_DURING", f"cp {newer} {sync_dir}/.t && mv {sync_dir}/.t {first}")
    r = watch_once(sync_dir)
    assert r.returncode == 0 and "(request 1)" in r.stdout, r.stdout
    assert first.is_file() and json.loads(first.read_text())["seq"] == 2  # kept for the next pass
    monkeypatch.delenv("STUB_DURING")
    r = watch_once(sync_dir)
    assert "(request 2)" in r.stdout and synced(stub) == ["offline-run-20260101_120000-abc"] * 2, r.stdout
    assert not first.exists()


def test_request_left_claimed_by_a_killed_watcher_is_synced_and_kept_on_failure(stub, tmp_path):
    sync_dir = tmp_path / "requests"
    req = request(sync_dir, "abc", "20260101_120000", 1, tmp_path)
    claimed = req.rename(req.with_name(req.name + ".claimed"))  # the watcher was killed during its sync
    (tmp_path / "fail").touch()
    assert watch_once(sync_dir).returncode == 1
    assert not claimed.exists() and json.loads(req.read_text())["seq"] == 1  # pending again, not lost
    (tmp_path / "fail").unlink()
    assert watch_once(sync_dir).returncode == 0 and not req.exists()
    assert synced(stub) == ["offline-run-20260101_120000-abc"] * 2


def test_second_watcher_on_a_directory_exits(stub, tmp_path):
    import fcntl

    sync_dir = tmp_path / "requests"
    sync_dir.mkdir()
    with open(sync_dir / ".watch.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        r = watch_once(sync_dir)
    assert r.returncode == 0 and "another watcher holds" in r.stdout, r.stdout


@pytest.mark.slow
def test_training_writes_requests_the_watcher_syncs_in_segment_order(stub, tiny_overrides, tmp_path):
    """A real offline run with logger.wandb.sync_dir, extended once (two segments): rank zero asks after
    each checkpoint and validation, and at the end; the watcher syncs both segments in order."""
    sync_dir = tmp_path / "requests"
    args = [a for a in tiny_overrides if not a.startswith("logger.wandb.mode=")] + [
        "logger.wandb.mode=offline", f"logger.wandb.sync_dir={sync_dir}", "trainer.max_steps=20"]
    run_train(args)
    (req,) = sync_dir.glob("offline-run-*.json")
    body = json.loads(req.read_text())
    # checkpoints at 10 and 20, validations at 10 and 20, and the end of the process
    assert body["seq"] >= 5 and body["run_dir"] == str((tmp_path / "run").resolve()), body
    assert Path(body["segment"]).parent == (tmp_path / "run" / "wandb").resolve()
    run_train(args[:-1] + ["trainer.max_steps=40"])
    assert len(list(sync_dir.glob("offline-run-*.json"))) == 2
    r = watch_once(sync_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    segments = sorted(p.name for p in (tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert synced(stub) == segments and len(segments) == 2
