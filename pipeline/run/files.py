"""Files written whole or not at all: the one atomic writer, and the split names the data layer shares.

    from pipeline.run.files import SPLITS, atomic_write, write_json_atomic
    atomic_write(path, "text")                          # str, bytes, or a callable writing to a binary file
    atomic_write(path, lambda f: torch.save(obj, f))
    atomic_write(path, text, exclusive=True)            # create if absent: False (nothing replaced) if present
    write_json_atomic(path, {"elbo": -80.1})

Every file goes to a temporary name beside its final one, `.<name>.<pid>-<8 hex>.tmp` (the same directory:
the rename is atomic), at most 0644 whatever the umask, is flushed and fsynced, optionally checked, then
renamed over the final name (or, with `exclusive`, hard-linked to it only if it does not exist yet), and the
directory is fsynced so the rename survives a crash too. A reader or a crash sees the old file or the
complete new one. A writer that fails removes its temporary file; one that was killed leaves it, and
`remove_temp_files(dir)` (run by whoever holds the directory's lock: no live writer owns one) sweeps them.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, List, Optional, Union

SPLITS = ("train", "val", "test")
FILE_MODE = 0o644  # at most: written files are never group- or world-writable, whatever the umask
TEMP_SUFFIX = ".tmp"
_TEMP = re.compile(r"^\..+\.\d+-[0-9a-f]{8}\.tmp$")

Data = Union[bytes, str, Callable[[BinaryIO], object]]


def temp_path(final: str | os.PathLike) -> Path:
    """A new temporary name for `final`, beside it: `.<name>.<pid>-<8 hex>.tmp` (unique per writer, threads too)."""
    final = Path(final)
    return final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")


def is_temp(name: str) -> bool:
    """Whether a file name is one `temp_path` makes: what a killed writer leaves."""
    return bool(_TEMP.match(name))


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(path: str | os.PathLike, data: Data, *, mode: int = FILE_MODE,
               check: Optional[Callable[[Path], None]] = None) -> Path:
    """Write `data` to a new temporary file beside `path`, on disk (fsynced), and pass it to `check` (which
    raises if it is not what it should be); returns the temporary file, which `commit` puts in place. On any
    failure the temporary file is removed and the error raised."""
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & FILE_MODE)  # umask can only lower it
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before any name points at it
        if check is not None:
            check(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def commit(tmp: str | os.PathLike, path: str | os.PathLike, *, exclusive: bool = False) -> bool:
    """Put the temporary file from `write_temp` at `path`, durably: renamed over it, or with `exclusive` linked
    there only if nothing is (atomic create-if-absent: of two writers, one wins, and the other's file is never
    seen). Returns False when `exclusive` found `path` present (it is left as it is). The temporary file is
    gone afterwards either way."""
    tmp, path = Path(tmp), Path(path)
    try:
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)  # the new name survives a power loss
        return True
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: Data, *, exclusive: bool = False, mode: int = FILE_MODE,
                 check: Optional[Callable[[Path], None]] = None) -> bool:
    """`data` (bytes; str as UTF-8; or a callable that writes to a binary file object, e.g.
    `lambda f: torch.save(obj, f)`) at `path`, whole or not at all (see the module's docstring). Returns
    False only when `exclusive` found `path` already present."""
    return commit(write_temp(path, data, mode=mode, check=check), path, exclusive=exclusive)


def write_json_atomic(path: str | os.PathLike, obj: dict, indent: int = 2) -> None:
    """obj as JSON (sorted keys, `indent`, trailing newline) at path, replacing it atomically."""
    atomic_write(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def remove_temp_files(*directories: str | os.PathLike) -> List[Path]:
    """Delete the temporary files writers killed mid-write left in `directories` (only while holding the
    directory's lock: no live writer can own them). Returns what was removed."""
    removed = []
    for d in map(Path, directories):
        if d.is_dir():
            for p in d.iterdir():
                if is_temp(p.name) and p.is_file():
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed
