"""The run directory and its one owner, `RunDir`: everything a training does to RUN_DIR goes through it.

    run = RunDir(cfg.run.dir, rank_zero)
    run.create()
    with run.locked():                  # one writer at a time: RUN_DIR/run.lock (global rank zero only)
        run.clean(cfg)                  # run files sound, checkpoints writable, temporary files swept, resume=never
        resume = run.resume_from(cfg)   # the checkpoint that continues this run (or None), checked to be this run
        run.save_config(cfg)            # config.yaml: what the run is (atomically, files.atomic_write)
        said = run.roll_back_to(resume) # metric rows and best checkpoints of work lost after it dropped
        run.wandb_run_id()              # the W&B run id every restart continues

Its two rules: one writer at a time (`RunLock`), and one run per directory (`check_same_run`: a resume
continues the run that config.yaml describes, or stops). Every file it writes goes through
pipeline/run/files.py (`atomic_write`), so `remove_temp_files` knows what a killed writer leaves.

The lock is `flock` on RUN_DIR/run.lock, so it dies with its process: a job restarted after a crash,
a kill or a SLURM preemption takes it again at once. Only global rank zero takes it (train.py): on shared
storage every node sees the same file, so a lock per node would fail against itself; if rank zero is
refused, the other ranks never start (Lightning starts them after this point) or are ended with it
(`srun --kill-on-bad-exit=1` in slurm/train.sh; torchrun stops the whole group).
"""
from __future__ import annotations

import codecs
import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator, Mapping, Optional, Set, Tuple

from pipeline import config as C
from pipeline.run import tracking
from pipeline.run.files import FILE_MODE, atomic_write, remove_temp_files

LOCK_FILE = "run.lock"


class RunDirError(Exception):
    """The run directory cannot be used by this training; the message says why and what to do."""


# Forked children (loader workers) inherit the lock's descriptor; an inherited copy would keep the lock
# alive after the training process is killed, until the orphaned workers exit. Children drop it.
_held: Set[int] = set()


def _drop_in_child() -> None:
    for fd in _held:
        try:
            os.close(fd)  # closes the child's copy only: the parent still holds the lock
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_drop_in_child)


def restrict_umask() -> int:
    """Add 022 to this process's umask (inherited by DDP ranks, loader workers and W&B): everything a run
    writes (checkpoints, config.yaml, metrics.csv, the W&B run id, images) is then at most 0644 (directories
    0755), even under `umask 000`, where anyone could replace a checkpoint. A stricter umask stays.
    Returns the previous umask."""
    previous = os.umask(0o022)
    os.umask(previous | 0o022)
    return previous


def holder_info(env: Mapping[str, str] = os.environ) -> dict:
    info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    if env.get("SLURM_JOB_ID"):
        info["slurm_job_id"] = env["SLURM_JOB_ID"]
    return info


def describe_holder(info: Optional[dict]) -> str:
    if not info:
        return "another process (it has not written its host and pid yet)"
    text = f"pid {info.get('pid')} on host {info.get('host')}"
    if info.get("slurm_job_id"):
        text += f" (SLURM job {info['slurm_job_id']})"
    return text + f", since {info.get('since')}"


class RunLock:
    """Exclusive, non-blocking lock on RUN_DIR/run.lock, held until release() or process exit."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as e:
            raise RunDirError(f"cannot write to run directory {self.run_dir}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read_holder(fd)
            os.close(fd)
            raise RunDirError(
                f"run directory {self.run_dir} is in use by {describe_holder(holder)}: one training per run "
                "directory. Wait for it to end, or train under another run.name") from None
        _held.add(fd)
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder_info()) + "\n").encode(), 0)
        return self

    @staticmethod
    def _read_holder(fd: int, wait_s: float = 1.0) -> Optional[dict]:
        deadline = time.monotonic() + wait_s  # the holder writes its details right after locking
        while True:
            try:
                return json.loads(os.pread(fd, 4096, 0).decode())
            except ValueError:
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.05)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _held.discard(fd)
            os.ftruncate(fd, 0)  # a stale description would mislead the next reader
            os.close(fd)  # releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


RUN_FILES = ("config.yaml", "metrics.csv", tracking.WANDB_ID_FILE)  # what a run reads back from RUN_DIR


def check_run_files(run_dir: str | os.PathLike) -> None:
    """RunDirError naming the file when one the run reads back is not a plain file, or metrics.csv is not
    text: said at start in one line, not a traceback from the CSV logger or the YAML parser."""
    run_dir = Path(run_dir)
    for name in RUN_FILES:
        path = run_dir / name
        if (path.exists() or path.is_symlink()) and not path.is_file():
            kind = "a directory" if path.is_dir() else "not a regular file"
            raise RunDirError(f"{path} is {kind}: move it out of the run directory (or train under another run.name)")
    metrics = run_dir / "metrics.csv"
    if metrics.is_file():
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        with metrics.open("rb") as f:
            while True:
                chunk = f.read(1 << 20)  # streamed: a long run's metrics.csv is not read into memory whole
                try:
                    if b"\0" in chunk:
                        raise ValueError(offset + chunk.index(b"\0"))
                    decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as e:
                    raise RunDirError(_not_text(metrics, offset + e.start)) from None
                except ValueError as e:
                    raise RunDirError(_not_text(metrics, e.args[0])) from None
                if not chunk:
                    break
                offset += len(chunk)


def _not_text(path: Path, at: int) -> str:
    return (f"{path} is not a CSV text file (byte {at} is not text): move it out of the run directory (the run "
            "then starts a new one)")


def check_same_run(run_dir: str | os.PathLike, cfg, checkpoint_hparams: Optional[dict] = None,
                   checkpoint: Optional[str] = None) -> None:
    """Before resuming in `run_dir`: RunDirError listing every key that differs from the run's saved
    config.yaml and changes what is trained (config.OPERATIONAL_KEYS lists what may differ). Without a
    config.yaml (a checkpoint from elsewhere), the sections the checkpoint carries (model, objective,
    optim, max_steps) are compared instead. So a setting the checkpoint would override (optim.lr: the
    restored optimizer keeps the old one) is never recorded in config.yaml while not applied."""
    saved_path = Path(run_dir) / "config.yaml"
    if saved_path.is_file():
        saved, source = C.load_saved(saved_path), f"saved in {saved_path}"
    elif isinstance(checkpoint_hparams, dict) and all(k in checkpoint_hparams for k in ("model", "objective", "optim")):
        carried = {k: checkpoint_hparams[k] for k in ("model", "objective", "optim")}
        carried["trainer"] = {"max_steps": checkpoint_hparams.get("max_steps", cfg.trainer.max_steps)}
        saved, source = C.merge_dict(cfg, carried), "carried by the checkpoint"
    else:
        return
    diffs = C.identity_differences(saved, cfg)
    if diffs and checkpoint is not None:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diffs)
        raise RunDirError(
            f"resume={checkpoint} continues another run ({listed}; old values {source}): resuming takes its "
            "optimizer and step under these keys. For a warm start from its weights (new optimizer, step 0) give "
            f"model.init_from={checkpoint} instead")
    if diffs:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diffs)
        raise RunDirError(
            f"cannot resume {run_dir} with a different config ({listed}; old values {source}): these keys "
            "change what is trained. Train a new run (run.name=<new name>), or start this one over in place "
            "(resume=never)")


def check_resume_path(checkpoint: str | os.PathLike, cfg, checkpoint_hparams: Optional[dict] = None) -> None:
    """resume=<path>: the checkpoint must continue the run this config describes, as resume=auto's must.
    Compared with the config.yaml of the run it was saved in (RUN/checkpoints/*.ckpt, RUN/hpc_ckpt_N.ckpt),
    else with the sections the checkpoint carries. RunDirError naming the keys and model.init_from."""
    path = Path(checkpoint)
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    check_same_run(run, cfg, checkpoint_hparams, checkpoint=str(checkpoint))


Resume = Tuple[str, dict]  # (checkpoint path, its loaded and verified contents)


class RunDir:
    """The one owner of a run directory: its lock, its identity (config.yaml), what a resume continues
    from and what it rolls back, its W&B run id, and the temporary files its writers leave. Rank zero writes;
    the other ranks only choose the same checkpoint to resume from."""

    def __init__(self, path: str | os.PathLike, rank_zero: bool = True):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.rank_zero = rank_zero

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.csv"

    def say(self, text: str) -> None:
        """A notice about the run directory, from rank zero only."""
        if self.rank_zero:
            print(text, flush=True)

    def create(self) -> None:
        """Make the directory. RunDirError when it or a directory above it is a file; other OSErrors (a
        failing disk, permissions) are raised as they are."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise RunDirError(f"run directory {self.path} cannot be created: it or a directory above it is a file, "
                              "not a directory. Give another run.dir (or run.name)") from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[RunDir]:
        """Hold RUN_DIR/run.lock (global rank zero only: the other ranks start after it holds it, or end with
        it). RunDirError naming the holder when another training has it."""
        lock = RunLock(self.path).acquire() if self.rank_zero else None
        try:
            yield self
        finally:
            if lock is not None:
                lock.release()

    def clean(self, cfg) -> None:
        """Before anything is chosen or written (rank zero, holding the lock): the files the run reads back are
        sound; checkpoints can be written (now, not at the first save hours in); what killed writers left is
        removed; resume=never starts over; another directory's W&B id stops the run before anything is written."""
        from pipeline.run.checkpointing import ensure_writable

        if not self.rank_zero:
            return
        check_run_files(self.path)
        ensure_writable(self.checkpoints)
        remove_temp_files(self.path, self.checkpoints)
        if cfg.resume == "never" and (removed := self.start_over()):
            self.say(f"# resume=never: starting over in {self.path}; removed {', '.join(p.name for p in removed)}")
        if tracking.resolve_wandb_mode(cfg.logger.wandb.mode) != "disabled":
            tracking.read_wandb_run_id(self.path)

    def start_over(self) -> list:
        """resume=never in a directory that holds a run: remove its checkpoints (else a later resume=auto, or
        Lightning's own SLURM resume from hpc_ckpt_N.ckpt, would continue the old run under the new config)
        and its metric rows, and its W&B run id (the new run is a new W&B run: its history starts again at step
        0). Returns what was removed."""
        removed = [p for p in [*self.path.glob("hpc_ckpt_*.ckpt"), *self.checkpoints.glob("*.ckpt")] if p.is_file()]
        for p in removed:
            p.unlink()
        if tracking.truncate_metrics_csv(self.metrics_file, 0):
            removed.append(self.metrics_file)
        id_file = self.path / tracking.WANDB_ID_FILE
        if id_file.is_file():
            id_file.unlink()
            removed.append(id_file)
        return removed

    def resume_from(self, cfg) -> Optional[Resume]:
        """The checkpoint this training continues from (`resume`: never, auto, or a path; checkpointing.
        choose_resume), or None for a fresh start. RunDirError when it continues another run, or is already
        past trainer.max_steps. resume=auto's fallback to a best-step*.ckpt continues from a copy of it at
        checkpoints/last.ckpt, so that Lightning, which never deletes the checkpoint it resumed from, can drop
        that best later."""
        from pipeline.run.checkpointing import atomic_save, choose_resume

        resume = choose_resume(cfg.resume, self.path, self.say)
        if resume is None:
            return None
        path, checkpoint = resume
        if self.rank_zero:
            hparams = checkpoint.get("hyper_parameters")
            if cfg.resume not in ("auto", "never"):  # another run's checkpoint continues that run, not this one
                check_resume_path(path, cfg, hparams)
            check_same_run(self.path, cfg, hparams)
        if int(checkpoint.get("global_step", 0)) > cfg.trainer.max_steps:
            raise RunDirError(
                f"{path} is at step {checkpoint.get('global_step')}, already past trainer.max_steps="
                f"{cfg.trainer.max_steps}: nothing to train, and the run is left as it is. Raise trainer.max_steps "
                "to extend it, train a new run (run.name=<new name>), or start this one over (resume=never)")
        if cfg.resume == "auto" and Path(path).name.startswith("best-"):
            last = self.checkpoints / "last.ckpt"
            if self.rank_zero:
                atomic_save(checkpoint, last)
                self.say(f"# {last} replaced by a copy of {path}")
            path = str(last)
        return path, checkpoint

    def save_config(self, cfg) -> None:
        """config.yaml: the run this directory holds, which a later resume must continue (check_same_run)."""
        if self.rank_zero:
            atomic_write(self.config_file, C.to_yaml(cfg))

    def roll_back_to(self, resume: Optional[Resume]) -> Optional[str]:
        """Drop what work lost after the resumed checkpoint left: metric rows logged after its step and
        best checkpoints saved after it (the resumed run redoes that work). Returns what the start-up summary
        says about the resume (rank zero), else None."""
        from pipeline.run.checkpointing import remove_later_best

        if resume is None or not self.rank_zero:
            return None
        step = int(resume[1].get("global_step", 0))
        dropped = tracking.truncate_metrics_csv(self.metrics_file, step)
        remove_later_best(self.path, step)
        return f"resuming from {resume[0]} (step {step}); dropped {dropped} metric rows logged after it"

    def wandb_run_id(self) -> str:
        """The W&B run id of this directory, created once (tracking.wandb_run_id) and reused by every restart."""
        return tracking.wandb_run_id(self.path)
