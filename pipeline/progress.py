"""Progress of long work outside training (prepare, index, evaluate): a tqdm bar on a terminal; plain
periodic lines where the stream is a file (SLURM logs, CI), as training's own progress does.

    with progress_bar(total=n, unit="img", desc="writing data/x") as bar:
        bar.update(k)

tqdm redraws its line with a carriage return: in a log file every redraw piles onto one line (a 70k-sample
prepare left one line of dozens of updates). Off a terminal the same bar writes one line per update, at
most every `LINE_EVERY_S` seconds, plus the final state.
"""
from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

LINE_EVERY_S = 30.0


class _Lines:
    """A stream for tqdm that turns its carriage-return redraws into whole lines."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Any = None, *, file: TextIO | None = None, tty: bool | None = None, **kw) -> tqdm:
    """tqdm(iterable, **kw) on `file` (default stderr): a bar on a terminal, lines elsewhere."""
    file = sys.stderr if file is None else file
    if tty is None:
        tty = bool(getattr(file, "isatty", lambda: False)())
    if tty:
        return tqdm(iterable, file=file, **kw)
    kw.update(file=_Lines(file), mininterval=LINE_EVERY_S, maxinterval=LINE_EVERY_S, leave=True,
              dynamic_ncols=False, ncols=None, ascii=True)
    return tqdm(iterable, **kw)
