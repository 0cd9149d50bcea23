"""Live W&B dashboards for compute nodes without internet: sync requests and the login-node watcher.

A training with `logger.wandb.sync_dir=<dir on a shared filesystem>` (and W&B offline) has global rank zero
drop a small request file there after each checkpoint and validation, and once more when the process ends.
A watcher on a login node, which has internet, runs `wandb sync` for each request:

    python -m pipeline.sync watch /shared/wandb-requests            # keeps watching (every --interval s)
    python -m pipeline.sync watch /shared/wandb-requests --once     # one pass, for cron

A request is one JSON file per offline segment of a run (`<segment dir name>.json`: run dir, run id, segment
dir, a counter), replaced atomically by each newer request for that segment. The watcher claims a request
(renames it) before it syncs, so a request written while a sync runs stays and is synced at the next pass:
a segment still being written is synced again, from its start (`--include-synced`), whenever it asks.
Per run, requests are synced one at a time in segment order (a requeued run's first segment before its
second); a failed sync keeps its request, holds back that run's later segments, and is retried after a
back-off that doubles from --retry up to --max-retry seconds. One log line per sync. One watcher per
directory (a lock): a second one, e.g. cron overlapping a long pass, says so and exits.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from pipeline.exit_codes import INTERRUPTED_EXIT
from pipeline.run.files import atomic_write

log = logging.getLogger("pipeline.sync")
REQUEST_SUFFIX = ".json"
CLAIMED = ".claimed"
LOCK_NAME = ".watch.lock"


# ----------------------------------------------------------------------------- the training side
def write_request(sync_dir: Path, run_dir: Path, run_id: str, segment: Path, seq: int) -> Path:
    """Ask the watcher to sync `segment` (RUN_DIR/wandb/offline-run-*): atomically (a temporary file in the
    same directory, renamed over the previous request of this segment: files.atomic_write)."""
    sync_dir = Path(sync_dir)
    sync_dir.mkdir(parents=True, exist_ok=True)
    path = sync_dir / f"{Path(segment).name}{REQUEST_SUFFIX}"
    body = {"run_dir": str(Path(run_dir).resolve()), "run_id": run_id, "segment": str(Path(segment).resolve()),
            "seq": int(seq), "written": time.time()}
    atomic_write(path, json.dumps(body) + "\n")
    return path


class SyncRequests:
    """What train.py keeps for one process: the segment (known once W&B started) and the request counter."""

    def __init__(self, sync_dir: Path, run_dir: Path, run_id: str):
        self.sync_dir, self.run_dir, self.run_id = Path(sync_dir), Path(run_dir), run_id
        self.segment: Optional[Path] = None
        self.seq = 0

    def request(self, segment: Optional[Path] = None) -> Optional[Path]:
        if segment is not None:
            self.segment = Path(segment)
        if self.segment is None:  # W&B has not started (nothing logged yet): nothing to sync
            return None
        self.seq += 1
        try:
            return write_request(self.sync_dir, self.run_dir, self.run_id, self.segment, self.seq)
        except OSError as e:  # a full or unmounted shared directory must not stop a training
            log.warning("warning: could not write a W&B sync request to %s: %s", self.sync_dir, e.strerror or e)
            return None


# ----------------------------------------------------------------------------- the watcher
@dataclass
class Request:
    path: Path
    run_id: str
    segment: Path
    seq: int

    @property
    def order(self) -> tuple:  # segment dirs are named offline-run-YYYYMMDD_HHMMSS-<id>: start order
        return (self.segment.name, self.seq)


def read_requests(sync_dir: Path) -> Dict[str, List[Request]]:
    """Pending requests (claimed ones a killed watcher left included), per run id, in segment order."""
    runs: Dict[str, List[Request]] = {}
    for path in sorted(Path(sync_dir).iterdir()):
        name = path.name
        if name.startswith(".") or not (name.endswith(REQUEST_SUFFIX) or name.endswith(REQUEST_SUFFIX + CLAIMED)):
            continue
        try:
            body = json.loads(path.read_text())
            req = Request(path, str(body["run_id"]), Path(body["segment"]), int(body["seq"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s skipped: not a sync request (%s)", path, e)
            continue
        runs.setdefault(req.run_id, []).append(req)
    for reqs in runs.values():
        reqs.sort(key=lambda r: r.order)
    return runs


@dataclass
class Watcher:
    sync_dir: Path
    command: Sequence[str] = ("wandb", "sync", "--include-synced")
    retry_s: float = 30.0
    max_retry_s: float = 900.0
    timeout_s: float = 3600.0
    failures: Dict[str, int] = field(default_factory=dict)
    not_before: Dict[str, float] = field(default_factory=dict)

    def _claim(self, req: Request) -> Optional[Path]:
        if req.path.name.endswith(CLAIMED):
            return req.path
        claimed = req.path.with_name(req.path.name + CLAIMED)
        try:
            os.replace(req.path, claimed)  # a request written from now on is a new file: synced next pass
        except FileNotFoundError:
            return None
        return claimed

    def sync_one(self, req: Request) -> bool:
        claimed = self._claim(req)
        if claimed is None:
            return True
        argv = [*self.command, str(req.segment)]
        started = time.monotonic()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s)
            code, why = proc.returncode, (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        except (OSError, subprocess.TimeoutExpired) as e:
            code, why = -1, [str(e)]
        took = time.monotonic() - started
        if code == 0:
            claimed.unlink(missing_ok=True)
            self.failures.pop(req.run_id, None)
            self.not_before.pop(req.run_id, None)
            log.info("synced run %s segment %s (request %d) in %.1fs", req.run_id, req.segment.name, req.seq, took)
            return True
        n = self.failures[req.run_id] = self.failures.get(req.run_id, 0) + 1
        delay = min(self.retry_s * 2 ** (n - 1), self.max_retry_s)
        self.not_before[req.run_id] = time.monotonic() + delay
        pending = claimed.with_name(claimed.name[: -len(CLAIMED)])
        if pending.exists():  # a newer request arrived meanwhile: it supersedes this one
            claimed.unlink(missing_ok=True)
        else:
            os.replace(claimed, pending)
        log.warning("sync failed for run %s segment %s (request %d, exit %s: %s); retry in %.3gs: %s",
                    req.run_id, req.segment.name, req.seq, code, why[0][:200], delay, shlex.join(argv))
        return False

    def pass_once(self) -> int:
        """Sync every pending request whose run is not backing off; returns the number of failures."""
        failed = 0
        now = time.monotonic()
        for run_id, reqs in read_requests(self.sync_dir).items():
            if self.not_before.get(run_id, 0) > now:
                continue
            for req in reqs:  # a request a killed watcher left claimed comes before a newer one of its segment
                if not self.sync_one(req):
                    failed += 1
                    break  # the later segments of this run wait for this one
        return failed

    def watch(self, interval_s: float, once: bool) -> int:
        while True:
            failed = self.pass_once()
            if once:
                return 1 if failed else 0
            time.sleep(interval_s)


def _lock(sync_dir: Path):
    f = open(Path(sync_dir) / LOCK_NAME, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sync", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("watch", help="run `wandb sync` for each request in SYNC_DIR (logger.wandb.sync_dir)")
    w.add_argument("sync_dir", type=Path)
    w.add_argument("--once", action="store_true", help="one pass, then exit (cron); exit 1 if a sync failed")
    w.add_argument("--interval", type=float, default=30.0, help="seconds between passes (default 30)")
    w.add_argument("--retry", type=float, default=30.0, help="first back-off after a failed sync, doubling")
    w.add_argument("--max-retry", type=float, default=900.0, help="longest back-off (default 900 s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    if not args.sync_dir.is_dir():
        print(f"error: {args.sync_dir} is not a directory (logger.wandb.sync_dir of the runs)", file=sys.stderr)
        return 2
    lock = _lock(args.sync_dir)
    if lock is None:
        print(f"# another watcher holds {args.sync_dir / LOCK_NAME}; exiting", flush=True)
        return 0
    try:
        return Watcher(args.sync_dir, retry_s=args.retry, max_retry_s=args.max_retry).watch(args.interval, args.once)
    except KeyboardInterrupt:
        return INTERRUPTED_EXIT
    finally:
        lock.close()


if __name__ == "__main__":
    sys.exit(main())
