"""ShardLoader: the DataLoader over a ShardStream that counts the batches it handed out, so a checkpoint
can resume mid-epoch; and the loader workers' start-up (worker_init, signals).

- Workers are persistent (a digits epoch is shorter than forking them) and forked where possible (inside
  spawned ranks the default would be spawn, which re-imports torch and Lightning per worker).
- Resume: `ShardLoader.state_dict()` = {epoch, batches_done, skipped_samples, world_size, num_workers, seed,
  batch_size, num_batches, global_batch, parts}; Lightning saves it in checkpoints and loads it before
  iterating. With sample counts known the order depends on the seed, the global batch, the epoch length and
  the canonical partitions only (pipeline.data.layout), so the world size and worker count may change
  (elastic resume); streamed splits (counts unknown) also need the same world size and workers. A change
  of what the order depends on restarts the interrupted epoch from its first batch, with a warning (an
  epoch that had finished simply moves on to the next one).
"""
from __future__ import annotations

import multiprocessing
import signal
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.data.stream import ShardStream
from pipeline.training.lightning_compat import shutdown_loader_workers


def _passthrough(batch: dict) -> dict:
    return batch


# SLURM signals every process of a job step, loader workers included (`--signal=USR1@90`, `scancel -s`),
# and a terminal's Ctrl-C reaches the whole process group. These belong to the training process: a worker
# ignores them, or it would die of USR1 (crashing the run) or run the trainer's handler it inherited at
# fork (a checkpoint from inside the worker that blocks in a collective: a hung job). SIGTERM goes back to
# its default, so a worker never runs the trainer's SIGTERM handler (a broadcast) and still ends when
# PyTorch terminates it on shutdown.
WORKER_IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGINT)
WORKER_DEFAULT_SIGNALS = (signal.SIGTERM,)
_WORKER_SIGNALS = set(WORKER_IGNORED_SIGNALS + WORKER_DEFAULT_SIGNALS)


def worker_init(worker_id: int) -> None:
    """Runs first in each loader worker. The workers were forked with these signals blocked (see
    ShardLoader.__iter__), so one that arrived in between is still pending and is now discarded."""
    for sig in WORKER_IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    for sig in WORKER_DEFAULT_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_SIGNALS)


# what the epoch's order depends on (pipeline.data.layout): counts known, and streamed (counts unknown)
ORDER_KEYS = ("seed", "global_batch", "num_batches", "parts")
STREAM_ORDER_KEYS = ("world_size", "num_workers", "seed", "batch_size", "num_batches")


def with_order_keys(state: dict) -> dict:
    """A loader state with its global batch and canonical partitions, filled in for checkpoints written before
    elastic resume (the global batch was batch_size x world_size, one partition per rank)."""
    if "batch_size" not in state or "world_size" not in state:
        return dict(state)
    return {"global_batch": state["batch_size"] * state["world_size"], "parts": state["world_size"], **state}


class ShardLoader(DataLoader):
    """DataLoader over a ShardStream that knows its epoch and how many batches it handed out.

    Each `iter()` starts the next epoch (the first starts `start_epoch`), unless `load_state_dict`
    set a position. `len()` is the full epoch length N, also when resuming mid-epoch: Lightning restores
    its own batch count and expects only the remaining batches, which is what the loader yields.
    """

    def __init__(self, stream: ShardStream, *, num_workers: int, pin_memory: bool, start_epoch: int = 0):
        # batch_size=None: batches come whole from the workers; _passthrough skips the default per-item
        # conversion, which would walk every key string
        # persistent workers: forking them each epoch costs more than a digits epoch; their copies of
        # the stream advance one epoch per pass, in step with this loader's own count
        # fork where there is one: inside spawned ranks (ddp_spawn, mp.spawn) the default is spawn, and a
        # spawned worker re-imports torch and Lightning (seconds per worker, per loader)
        context = "fork" if num_workers > 0 and "fork" in multiprocessing.get_all_start_methods() else None
        super().__init__(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=num_workers > 0, collate_fn=_passthrough,
                         multiprocessing_context=context, worker_init_fn=worker_init)
        self.epoch, self.batches_done = start_epoch, 0
        self.skipped_samples = 0
        self._started = False
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        if self.dataset.num_batches is None:
            raise TypeError("batch count unknown: the source has no sample counts")
        return self.dataset.num_batches

    def __iter__(self) -> Iterator[dict]:
        if self._resume is not None:
            (epoch, start), self._resume = self._resume, None
        else:
            epoch, start = (self.epoch + 1 if self._started else self.epoch), 0
        self._started = True
        self.epoch, self.batches_done = epoch, start
        self.dataset.set_position(epoch, start)
        if self.dataset.cache is not None:  # batches from data.cache, built here: no DataLoader machinery
            return self._count(iter(self.dataset))
        # Workers are forked here (first epoch, or after a restart) with the training process's signal
        # handlers; block the signals across the fork so none runs in a worker before worker_init. The
        # training process still gets them: pending until the unblock, or taken by another thread.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)
        try:
            batches = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return self._count(batches)

    def _count(self, batches: Iterator[dict]) -> Iterator[dict]:
        try:
            for batch in batches:
                for k, v in batch.items():  # arrays that came by value (stream.BY_VALUE_MAX_BYTES): no copy
                    if isinstance(v, np.ndarray):
                        batch[k] = torch.from_numpy(v)
                self.skipped_samples += batch.get("skipped", 0)
                self.batches_done += 1
                yield batch
        except Exception:
            # A worker's error ends this pass: stop the workers now. Left to the garbage collector, PyTorch's
            # shutdown waited 5 s per worker (measured: 10 s after every data error with the default 2).
            shutdown_loader_workers(self)
            raise

    def _settings(self) -> dict:
        s = self.dataset.spec
        return {"world_size": s.world_size, "num_workers": s.lanes, "seed": s.seed,
                "batch_size": s.batch_size, "num_batches": self.dataset.num_batches,
                "global_batch": s.batch_size * s.world_size, "parts": s.parts}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done,
                "skipped_samples": self.skipped_samples, **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        self.skipped_samples = int(state.get("skipped_samples", 0))
        mine = self._settings()
        state = with_order_keys(state)
        keys = ORDER_KEYS if self.dataset.source.counts is not None else STREAM_ORDER_KEYS
        changed = [f"{k} {state[k]} -> {mine[k]}" for k in keys if k in state and state[k] != mine[k]]
        if done >= int(state.get("num_batches") or mine["num_batches"] or 0):
            self._resume = (epoch + 1, 0)  # the saved epoch had finished: start the next one normally
        elif changed:
            warnings.warn(f"data loader settings changed since the checkpoint ({', '.join(changed)}): "
                          f"restarting epoch {epoch} from its first batch instead of batch {done}; "
                          "samples of that epoch may repeat", stacklevel=2)
            self._resume = (epoch, 0)
        else:
            self._resume = (epoch, done)
        self._started = True
        self.epoch, self.batches_done = self._resume[0], self._resume[1]
        shutdown_loader_workers(self)  # live persistent workers hold the old position: restart them
