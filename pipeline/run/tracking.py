"""Experiment tracking: W&B mode and run-id persistence, and the always-on CSV metrics file.

The W&B key is never read from or written to the repo or the run directory: wandb reads
`WANDB_API_KEY` or ~/.netrc itself; here we only ask whether one exists to pick a default mode.
"""
from __future__ import annotations

import csv
import io
import netrc
import os
import uuid
from pathlib import Path
from typing import Mapping, Optional

from pipeline.run.files import atomic_write

WANDB_ID_FILE = "wandb_run_id.txt"
_MODE_ALIASES = {"dryrun": "offline", "run": "online", "online": "online", "offline": "offline",
                 "disabled": "disabled", "disable": "disabled"}


def _has_wandb_credentials(env: Mapping[str, str]) -> bool:
    if env.get("WANDB_API_KEY"):
        return True
    host = env.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
    try:
        return netrc.netrc(env.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_secrets(env: Mapping[str, str] = os.environ) -> list:
    """The W&B API keys this process could use (WANDB_API_KEY, the netrc password for the W&B host): values that
    must never appear in a config (config.refuse_secret_values). Read only to compare, never stored."""
    found = [env["WANDB_API_KEY"]] if env.get("WANDB_API_KEY") else []
    host = env.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
    try:
        entry = netrc.netrc(env.get("NETRC")).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        entry = None
    if entry and entry[2]:
        found.append(entry[2])
    return found


def resolve_wandb_mode(mode: Optional[str], env: Mapping[str, str] = os.environ) -> str:
    """`logger.wandb.mode` if set; else WANDB_MODE / WANDB_DISABLED; else online when credentials
    exist, offline otherwise (compute nodes without internet sync later with `wandb sync`)."""
    if mode:
        return mode
    if env.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    if env.get("WANDB_MODE"):
        return _MODE_ALIASES.get(env["WANDB_MODE"].lower(), "offline")
    return "online" if _has_wandb_credentials(env) else "offline"


class RunIdError(ValueError):
    """RUN_DIR/wandb_run_id.txt belongs to another run directory (copied, or the directory moved)."""


def _owner(run_dir: Path) -> str:
    return str(Path(run_dir).resolve())


def _id_file_text(run_id: str, run_dir: Path) -> str:
    return f"{run_id}\nowner: {_owner(run_dir)}\n"


def read_wandb_run_id(run_dir: Path) -> Optional[str]:
    """The W&B run id kept in RUN_DIR/wandb_run_id.txt, or None without one. RunIdError when the file names
    another run directory as its owner: a copied file would log this run into another run's W&B history. A
    file written before owners were recorded (the id alone) is taken as this directory's and given its owner."""
    path = Path(run_dir) / WANDB_ID_FILE
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    run_id = lines[0].strip() if lines else ""
    owner = next((line.split(":", 1)[1].strip() for line in lines[1:] if line.startswith("owner:")), None)
    if not run_id:
        raise RunIdError(f"{path} holds no W&B run id: delete it to start a new W&B run")
    if owner is None:
        atomic_write(path, _id_file_text(run_id, run_dir))
    elif owner != _owner(run_dir):
        raise RunIdError(f"{path} holds W&B run {run_id} of {owner}, not of this directory: copied, or the directory "
                         f"moved. A new run: delete the file (a new W&B run starts); the same run, moved: set its "
                         f"owner line to {_owner(run_dir)}")
    return run_id


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory, created once and reused by every restart, so a resumed
    or requeued job continues the same W&B run instead of starting a new one. The file records the
    directory it belongs to (read_wandb_run_id refuses another directory's id)."""
    found = read_wandb_run_id(run_dir)
    if found is not None:
        return found
    path = Path(run_dir) / WANDB_ID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    # create-if-absent: of concurrent writers one id wins, never two ids
    atomic_write(path, _id_file_text(uuid.uuid4().hex[:12], run_dir), exclusive=True)
    return read_wandb_run_id(run_dir)


def truncate_metrics_csv(path: Path, global_step: int) -> int:
    """Drop rows logged after a checkpoint taken at `global_step` (work lost in a crash), so the resumed
    run's rows follow on without duplicates. Returns the number of rows dropped.

    Lightning logs the k-th optimizer step under `step = k - 1`, and the validation that follows a
    checkpoint at step s (which a resumed run does not repeat) under s - 1: rows with step < s stay."""
    path = Path(path)
    if not path.is_file():
        return 0
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        rows = list(reader)
    keep = [r for r in rows if not r.get("step") or int(float(r["step"])) < global_step]
    if len(keep) == len(rows):
        return 0
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(keep)
    atomic_write(path, text.getvalue())
    return len(rows) - len(keep)
