"""Tar bytes -> raw samples for one loader worker: opens shards (files or any webdataset URL), skips to a
position without decoding, reads position ranges, and applies data.on_error to what cannot be read
(raise: ShardFormatError naming the shard; warn: log, and report the lost positions as None).

Shards are checked against the manifest while they are read (ShardChecks): a sample past the manifest's
count is an error, and the first time a process reads a shard its bytes are hashed (sha256) and compared
with the manifest when the shard's end is reached. The reader never seeks: a read at an offset parses the
shard from byte 0, so the hash covers the skipped bytes too; a process that leaves a shard it is verifying
before its end (its lane's range ends inside the shard) reads on to the end first (`finish`), so every
shard a process reads is verified by it once. A shard found not to match (under warn) is skipped by that
process from then on: its positions come back as None. Samples read before the end was reached have
been handed out by then; under raise the run stops at the end of the shard.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence

from pipeline.data import shards

log = logging.getLogger(__name__)


class ShardChecks:
    """What the manifest says about a split's shards (sample counts, sha256; None where unknown or not
    checked) and what this process learned reading them: shards verified (not hashed again) and shards
    found not to match (skipped, warn mode). One per ShardStream; each loader worker keeps its copy
    across epochs (persistent workers), so "once per process"."""

    def __init__(self, counts: Sequence[int] | None, digests: Sequence[str | None] | None):
        self.counts, self.digests = counts, digests
        self.verified: set[int] = set()
        self.bad: set[int] = set()

    def count(self, shard: int) -> int | None:
        return None if self.counts is None else self.counts[shard]

    def to_verify(self, shard: int) -> str | None:
        """The sha256 the shard's bytes must have, while this process has not verified it yet."""
        if self.digests is None or shard in self.verified:
            return None
        return self.digests[shard]


class _Hashing:
    """A read-only stream that feeds what is read through it to sha256."""

    def __init__(self, raw):
        self.raw, self.sha = raw, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        return data

    def hexdigest_to_end(self) -> str:
        while block := self.raw.read(1 << 20):  # past the end-of-archive block: padding is in the hash too
            self.sha.update(block)
        return self.sha.hexdigest()

    def close(self) -> None:
        self.raw.close()


class Reader:
    """Sequential access to one worker's shards; keeps the current shard open across reads."""

    def __init__(self, urls: Sequence[str], on_error: str, checks: ShardChecks | None = None):
        self.urls, self.on_error = urls, on_error
        self.checks = checks if checks is not None else ShardChecks(None, None)
        self.shard: int | None = None
        self.pos = 0  # position of the next sample of the open shard
        self.it: Iterator | None = None  # None once the shard is exhausted or broken
        self.broken = False
        self.stream = None
        self.expected: str | None = None  # sha256 the open shard must have, while it is being verified

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        self.shard, self.it, self.stream, self.pos, self.broken = None, None, None, 0, False
        self.expected = None

    def finish(self) -> None:
        """Leave the open shard: one still being verified is read on to its end (parsed, so a sample past
        the manifest's count is caught too) and its hash compared. Call before handing out the samples of
        a lane's last read, so an error is raised before they go out."""
        if self.expected is not None:
            while self._next() is not None:
                self.pos += 1

    def _open(self, shard: int) -> None:
        import webdataset as wds

        self.finish()
        self.close()
        self.shard = shard
        try:
            self.stream = wds.gopen(self.urls[shard], "rb")
            self.expected = self.checks.to_verify(shard)
            if self.expected is not None:
                self.stream = _Hashing(self.stream)
            self.it = shards.iter_tar_samples(self.stream, self.urls[shard])
        except Exception as e:  # noqa: BLE001 -- missing file, failing pipe or download: on_error decides
            self._fail(f"{self.urls[shard]}: cannot open: {e}")

    def _fail(self, message: str, mismatch: bool = False) -> None:
        """Raise, or (warn) log and give up the rest of the shard; a shard that does not match its manifest
        (`mismatch`) is given up for good by this process."""
        if self.on_error == "raise":
            raise shards.ShardFormatError(message)
        if mismatch:
            self.checks.bad.add(self.shard)
            log.warning("skipping a shard that does not match its manifest from now on in this worker "
                        "(samples already read from it were used): %s", message)
        else:
            log.warning("skipping unreadable data: %s", message)
        self.it, self.broken, self.expected = None, True, None  # the rest of this shard is lost

    def _ended(self) -> None:
        """The open shard's tar ended cleanly after self.pos samples: compare with the manifest."""
        url, count = self.urls[self.shard], self.checks.count(self.shard)
        if count is not None and self.pos < count:
            self._fail(f"{url}: ends after {self.pos} samples, the manifest says it holds {count}")
        elif self.expected is not None:
            try:
                digest = self.stream.hexdigest_to_end()
            except OSError as e:  # the bytes after the end-of-archive block, e.g. a download cut short
                self._fail(f"{url}: unreadable after its last sample: {e}")
                return
            if digest != self.expected:
                self._fail(f"{url}: sha256 {digest[:16]}... differs from the manifest's {self.expected[:16]}...: "
                           "the file is corrupt or was changed after the manifest was written", mismatch=True)
            else:
                self.checks.verified.add(self.shard)
        self.expected = None

    def _next(self) -> dict | None:
        if self.it is None:
            return None
        try:
            raw = next(self.it, None)
        except shards.ShardFormatError as e:
            self._fail(str(e))
            return None
        if raw is None:
            self.it = None
            self._ended()
            return None
        count = self.checks.count(self.shard)
        if count is not None and self.pos >= count:  # self.pos: this sample's position
            self._fail(f"{self.urls[self.shard]}: holds more than the {count} samples its manifest lists "
                       "(the shard was changed after the manifest was written)", mismatch=True)
            return None
        return raw

    def read(self, shard: int, lo: int, hi: int | None) -> Iterator[dict | None]:
        """Raw samples at positions lo .. hi-1 of `shard`, skipped to without decoding. With hi given
        (counts known) every position yields something: None where it could not be read (warn mode).
        With hi None, the samples up to the shard's end. A read up to the manifest's count looks one
        sample further (there must be none) and, while verifying, compares the hash, before it returns."""
        if shard in self.checks.bad:
            yield from [None] * (0 if hi is None else hi - lo)
            return
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
            if raw is None:  # broken, or ended early (_ended reported it): the rest is lost
                for _ in range(max(lo, self.pos), hi):
                    yield None
                self.pos = hi
                return
            self.pos += 1
            yield raw
        if hi == self.checks.count(shard):
            self._next()
