"""What the data layer and the analysis share on disk: the split names and atomic JSON files.

    from pipeline.run.files import SPLITS, write_json_atomic
    write_json_atomic(path, {"elbo": -80.1})          # all or nothing: never a half-written file

A file is written under a temporary name in its own directory (`.tmp-<pid>-<name>`, so a directory
can be swept of what a killed writer left: glob TMP_PREFIX + "*"), flushed to disk and renamed over
the final name; the directory is then synced so the rename survives a crash too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

SPLITS = ("train", "val", "test")
TMP_PREFIX = ".tmp-"


def tmp_path(final: Path) -> Path:
    """The temporary name `final` is written under before the rename (same directory, this process)."""
    return final.with_name(f"{TMP_PREFIX}{os.getpid()}-{final.name}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: dict, indent: int = 2) -> None:
    """obj as JSON (sorted keys, `indent`, trailing newline) at path, replacing it atomically."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
