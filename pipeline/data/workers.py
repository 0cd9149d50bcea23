"""Ordered maps over forked worker processes that can stop early without hanging.

`prepare images` (headers, then decoding) and `prepare index` (scanning shards) map a function over many
files in `--workers` processes and may stop before the end: a bad file, Ctrl-C. multiprocessing.Pool cannot
stop safely there: `Pool.terminate()` SIGTERMs workers that may be writing a result, holding the result
queue's write lock, and its task thread then waits on that lock forever (a CI run hung 600 s in
`test_pixels_failing_mid_write...`; tests/test_workers.py reproduces it within ~100 early stops).
concurrent.futures' ProcessPoolExecutor never kills a worker on shutdown: `shutdown(cancel_futures=True)`
drops the queued chunks and waits for the running ones (at most workers x chunksize items).
"""

from __future__ import annotations

import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator, Optional, Sequence


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole foreground process group: the main process alone handles it (closing the map,
    # which lets the running chunks finish), instead of every worker printing a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def chunksize(n: int, workers: int) -> int:
    """Items per task: about four tasks per worker, at most 64 items (results arrive in order, so a
    large chunk delays the first result and the progress bar)."""
    return max(1, min(64, n // (4 * max(1, workers))))


class ProcessMap:
    """`map(fn, items)` in input order over `workers` forked processes (in-process for one worker, so
    nothing forks for small inputs). Use as a context manager or call close(); close() is idempotent."""

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self._executor: Optional[ProcessPoolExecutor] = None
        if self.workers > 1:
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"),
                                                 initializer=_ignore_sigint)

    def map(self, fn: Callable, items: Sequence, chunk: Optional[int] = None) -> Iterator:
        """fn over items in order; `chunk` items per task (default: `chunksize`; 1 for items that each take
        long, such as whole shards)."""
        if self._executor is None:
            return map(fn, items)
        return self._executor.map(fn, items, chunksize=chunk or chunksize(len(items), self.workers))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> ProcessMap:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
