"""Tar bytes -> raw samples for one loader worker: opens shards (files or any webdataset URL), skips to a
position without decoding, reads position ranges, and applies data.on_error to what cannot be read
(raise: ShardFormatError naming the shard; warn: log, and report the lost positions as None).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from pipeline.data import shards

log = logging.getLogger(__name__)


class Reader:
    """Sequential access to one worker's shards; keeps the current shard open across reads."""

    def __init__(self, urls: Sequence[str], on_error: str):
        self.urls, self.on_error = urls, on_error
        self.shard: int | None = None
        self.pos = 0  # position of the next sample of the open shard
        self.it: Iterator | None = None  # None once the shard is exhausted or broken
        self.broken = False
        self.stream = None

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        self.shard, self.it, self.stream, self.pos, self.broken = None, None, None, 0, False

    def _open(self, shard: int) -> None:
        import webdataset as wds

        self.close()
        self.shard = shard
        try:
            self.stream = wds.gopen(self.urls[shard], "rb")
            self.it = shards.iter_tar_samples(self.stream, self.urls[shard])
        except Exception as e:  # noqa: BLE001 -- missing file, failing pipe or download: on_error decides
            self._fail(f"{self.urls[shard]}: cannot open: {e}")

    def _fail(self, message: str) -> None:
        if self.on_error == "raise":
            raise shards.ShardFormatError(message)
        log.warning("skipping unreadable data: %s", message)
        self.it, self.broken = None, True  # the rest of this shard is lost

    def _next(self) -> dict | None:
        if self.it is None:
            return None
        try:
            return next(self.it)
        except StopIteration:
            self.it = None
        except shards.ShardFormatError as e:
            self._fail(str(e))
        return None

    def read(self, shard: int, lo: int, hi: int | None) -> Iterator[dict | None]:
        """Raw samples at positions lo .. hi-1 of `shard`, skipped to without decoding. With hi given
        (counts known) every position yields something: None where it could not be read (warn mode).
        With hi None, the samples up to the shard's end."""
        if self.shard != shard or self.pos > lo:
            self._open(shard)
        while self.pos < lo and self._next() is not None:
            self.pos += 1
        if hi is None:
            while (raw := self._next()) is not None:
                self.pos += 1
                yield raw
            return
        while self.pos < hi:
            raw = self._next() if self.pos >= lo else None
            if raw is None:  # exhausted or broken before hi
                if not self.broken:  # ended cleanly but early: the counts are wrong
                    self._fail(f"{self.urls[shard]}: ends after {self.pos} samples, the manifest says "
                               f"it holds at least {hi}")
                for _ in range(max(lo, self.pos), hi):
                    yield None
                self.pos = hi
                return
            self.pos += 1
            yield raw
