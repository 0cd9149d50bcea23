"""Checkpoint files you can trust: atomic writes, a checksum of the contents, and resume from the newest
checkpoint that loads and verifies.

- `AtomicCheckpointIO` (a Lightning CheckpointIO plugin) writes every checkpoint Lightning saves (last.ckpt,
  best-*.ckpt, SLURM's hpc_ckpt_N.ckpt) to a temporary file in the destination directory, fsyncs it,
  checks that it reads back as a checkpoint archive, renames it over the old one and fsyncs the directory.
  A kill at any moment leaves either the old or the new checkpoint, whatever TMPDIR is (Lightning's
  default goes through a temporary file in TMPDIR, and a cross-filesystem move is a copy: a kill
  mid-copy left a truncated checkpoint). A write that fails raises CheckpointWriteError naming the file
  (Lightning's default swallows a PermissionError and the run ends without a checkpoint).
- Each checkpoint carries `CHECKSUM_KEY`: a sha256 over its contents (every tensor's bytes, dtype and
  shape, and every other value), so a checkpoint whose bytes changed after writing is refused
  (`load_verified` on resume, `checksum_problem` in evaluate) instead of loading wrong weights.
  Checkpoints written before this existed carry none and are accepted unverified.
- `safe_load` is the only way a checkpoint is read: the weights-only unpickler, so a file that names a
  function or class (a pickle payload) is refused before anything in it runs.
- `choose_resume` picks what `resume=auto` continues from: the first of `resume_candidates` that loads
  and verifies, saying which ones before it did not and why.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import zipfile
from enum import Enum
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from pipeline.run import files
from pipeline.run.files import remove_temp_files as remove_temp_files  # temporary files: files.temp_path

CHECKSUM_KEY = "pipeline_checksum"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written; the message names the file."""


# ------------------------------------------------------------------------------------- checksum
def _feed(h, obj: Any) -> None:
    """Hash `obj` canonically: the same value after a torch.save / torch.load round trip in any process
    (dict order is kept by pickle; sets are sorted, their order depends on the string hash seed)."""
    if torch.is_tensor(obj):
        t = obj.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        # One host copy per tensor; torch.save makes the same copy to write it.
        h.update(memoryview(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{type(obj).__name__}{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, (set, frozenset)):
        h.update(f"S{len(obj)}".encode())
        for r in sorted(repr(v) for v in obj):
            h.update(r.encode())
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes, Enum)):
        h.update(f"V{type(obj).__name__}:{obj!r}".encode())
    elif hasattr(obj, "__dict__"):
        h.update(f"O{type(obj).__qualname__}".encode())
        _feed(h, vars(obj))
    else:  # numpy scalars and arrays and the like: pickled bytes are deterministic for them
        try:
            h.update(b"P" + pickle.dumps(obj, protocol=4))
        except Exception:  # unpicklable: torch.save could not have written it either
            h.update(f"U{type(obj).__qualname__}".encode())


def content_checksum(checkpoint: dict) -> str:
    """sha256 hex digest of a checkpoint dict's contents, excluding its own CHECKSUM_KEY."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in checkpoint.items() if k != CHECKSUM_KEY})
    return h.hexdigest()


def with_checksum(checkpoint: dict) -> dict:
    """A shallow copy of `checkpoint` carrying the checksum of its contents."""
    return {**checkpoint, CHECKSUM_KEY: {"sha256": content_checksum(checkpoint)}}


def checksum_problem(checkpoint: Any) -> Optional[str]:
    """None when the checkpoint's contents match its checksum (or it carries none: written before
    checksums existed); otherwise what is wrong, in a few words."""
    if not isinstance(checkpoint, dict):
        return f"not a checkpoint dict ({type(checkpoint).__name__})"
    stored = checkpoint.get(CHECKSUM_KEY)
    if stored is None:
        return None
    expected = stored.get("sha256") if isinstance(stored, dict) else None
    if expected != content_checksum(checkpoint):
        return "its contents do not match the checksum written with it (the file changed after it was saved)"
    return None


def _numpy_globals() -> list:
    """The numpy classes a checkpoint may hold (arrays and scalars in loader or callback state): data,
    not code. torch's weights_only unpickler refuses them unless allowed."""
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 / 1
    kinds = [np.dtype(t) for t in set(np.sctypeDict.values()) if t is not object]
    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype,
            *{type(d) for d in kinds}, *{d.type for d in kinds}]


_REFUSED_GLOBAL = re.compile(r"(?:Unsupported global: |unsupported )GLOBAL ([\w.]+)")


def safe_load(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """torch.load with the weights-only unpickler: tensors, containers, numbers, strings and numpy data
    load; anything that would import and call code (a pickle `__reduce__` payload, a class of ours) is
    refused before it runs. CheckpointError naming the file either way: refused, or unreadable.

    This is the only way a checkpoint is read: the checksum inside a file cannot be checked before the
    file is unpickled, and an attacker who can write the file can write a matching checksum, so the
    unpickler is the security barrier and the checksum guards against corruption."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        text = " ".join(str(e).split())
        m = _REFUSED_GLOBAL.search(text)
        what = m.group(1) if m else "a non-data object"
        raise CheckpointError(f"{path} refused: loading it would run code ({what}); only tensors and plain "
                              "data are loaded from a checkpoint. Not loaded") from None
    except Exception as e:  # truncated, empty, not a zip, OS errors: each raises its own type
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path} cannot be loaded ({type(e).__name__}: {first})") from None


def load_verified(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """`safe_load` + checksum check; CheckpointError naming the file when either fails."""
    checkpoint = safe_load(path, map_location=map_location, mmap=mmap)
    problem = checksum_problem(checkpoint)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    return checkpoint


# ------------------------------------------------------------------------------------- writing
def _check_archive(path: Path) -> None:
    """Raise unless `path` is a complete torch checkpoint archive (its zip directory, at the end of the
    file, lists the pickled object): cheap, and fails on a truncated or empty file."""
    with zipfile.ZipFile(path) as z:
        if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist()):
            raise zipfile.BadZipFile("no data.pkl record")


def _write_error(path: Path, e: BaseException) -> CheckpointWriteError:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return CheckpointWriteError(f"cannot write checkpoint {path}: {reason}")


class _Writes:
    """A file object for torch.save that keeps the OSError of a failed write: torch reports it only as
    `unexpected pos N vs M` (a full disk, a quota), so the error would not say what happened."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def write_temp(checkpoint: dict, path: str | os.PathLike, save: Callable = torch.save) -> Path:
    """Write `checkpoint` (with its checksum) to a new temporary file beside `path` (files.write_temp), on disk
    and checked to read back as a checkpoint archive; `commit_temp` then puts it in place.
    CheckpointWriteError naming `path` on any failure (the temporary file is removed)."""
    path = Path(path)

    def write(f) -> None:
        writes = _Writes(f)
        try:
            save(with_checksum(checkpoint), writes)
        except RuntimeError:
            if writes.error is not None:
                raise writes.error from None
            raise

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return files.write_temp(path, write, check=_check_archive)
    except (OSError, zipfile.BadZipFile, RuntimeError) as e:
        raise _write_error(path, e) from None


def commit_temp(tmp: Path, path: str | os.PathLike) -> None:
    """Atomically replace `path` with the temporary file from `write_temp`, durably."""
    path = Path(path)
    try:
        files.commit(tmp, path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing right after it was written")
    except OSError as e:
        raise _write_error(path, e) from None


def atomic_save(checkpoint: dict, path: str | os.PathLike, save: Callable = torch.save) -> None:
    """Write `checkpoint` (with its checksum) to `path` so that a reader or a crash sees the old file or
    the complete new one, never a partial one. CheckpointWriteError naming `path` on any failure."""
    commit_temp(write_temp(checkpoint, path, save), path)


def ensure_writable(directory: str | os.PathLike) -> None:
    """Create `directory` and a file in it now, so that a run whose checkpoints cannot be written stops at
    start (CheckpointWriteError naming the directory), not hours later at its first save."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        files.write_temp(directory / "write-test", b"").unlink()
    except OSError as e:
        raise CheckpointWriteError(f"cannot write checkpoints to {directory}: {e.strerror or e}") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO: `atomic_save` for every save; loads verify the checksum.

    Inside `staged()`, a save is written (write_temp) but put in place only by the next `commit()`: a
    checkpoint taken before Lightning has logged its step's metrics is committed once they are on disk,
    so a kill in between leaves the previous checkpoint, never one whose last row is lost (LastCheckpoint).
    `preloaded` = (path, checkpoint) already loaded and verified by `choose_resume`: Lightning's resume
    load of that path returns it instead of reading the file a second time.
    """

    def __init__(self, preloaded: Optional[Tuple[str, dict]] = None):
        super().__init__()
        self._preloaded = preloaded
        self._staging = False
        self._staged: Optional[Tuple[Path, Path]] = None

    @contextlib.contextmanager
    def staged(self):
        self._staging = True
        try:
            yield
        finally:
            self._staging = False

    def commit(self) -> None:
        if self._staged is not None:
            (tmp, path), self._staged = self._staged, None
            commit_temp(tmp, path)

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        if self._staging:
            self.commit()  # an earlier staged save first: saves land in order
            self._staged = write_temp(checkpoint, path), Path(path)
        else:
            atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict:
        if self._preloaded is not None and os.path.abspath(path) == os.path.abspath(self._preloaded[0]):
            checkpoint, self._preloaded = self._preloaded[1], None  # hand it over once; free it after restore
            return checkpoint
        # weights_only is ignored: every checkpoint is read with the weights-only unpickler (safe_load)
        return load_verified(path, map_location=map_location or "cpu")


# ------------------------------------------------------------------------------------- resuming
def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step of a checkpoint that loads and verifies (mmap: tensors are read for the checksum,
    not copied); CheckpointError naming the file otherwise."""
    return int(load_verified(path, mmap=True).get("global_step", 0))


_BEST = re.compile(r"^best-step(\d+)\.ckpt$")


def resume_candidates(run_dir: str | os.PathLike) -> List[Path]:
    """Every checkpoint `resume=auto` may continue from, in the order tried: checkpoints/last.ckpt and
    SLURM's RUN_DIR/hpc_ckpt_N.ckpt, newest first (a tie goes to hpc); then, only as a fallback when none
    of those loads, checkpoints/best-step*.ckpt (full training states too), highest step first."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    saves = [p for p in [ckpt_dir / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    saves.sort(key=lambda p: (p.stat().st_mtime_ns, p.name.startswith("hpc")), reverse=True)
    best = [p for p in ckpt_dir.glob("best-step*.ckpt") if _BEST.match(p.name) and p.is_file()]
    best.sort(key=lambda p: int(_BEST.match(p.name).group(1)), reverse=True)
    return saves + best


def choose_resume(resume: str, run_dir: str | os.PathLike,
                  say: Callable[[str], None] = print) -> Optional[Tuple[str, dict]]:
    """(path, loaded and verified checkpoint) to resume from, or None for a fresh start.

    `never` -> None. A path -> that checkpoint, or CheckpointError if it does not load or verify.
    `auto` -> the first of `resume_candidates` that loads and verifies; each one before it that does not
    is reported through `say`, naming the file; CheckpointError if candidates exist but none loads
    (starting over would silently discard the run)."""
    if resume == "never":
        return None
    if resume != "auto":
        return resume, load_verified(resume)
    problems = []
    for path in resume_candidates(run_dir):
        try:
            checkpoint = load_verified(path)
        except CheckpointError as e:
            problems.append(str(e))
            say(f"# warning: not resuming from {path}: {e}")
            continue
        return str(path), checkpoint
    if problems:
        raise CheckpointError(f"no checkpoint in {run_dir} can be resumed from ({'; '.join(problems)}); "
                              "give resume=<a good checkpoint>, or resume=never to start over")
    return None


def remove_later_best(run_dir: str | os.PathLike, step: int) -> List[Path]:
    """Delete best-step*.ckpt files saved after `step` (by work lost in a crash, which the resumed run
    redoes): otherwise they stay beside the resumed run's own best, which no longer knows of them."""
    removed = []
    for p in (Path(run_dir) / "checkpoints").glob("best-step*.ckpt"):
        m = _BEST.match(p.name)
        if m and int(m.group(1)) > step:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
