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

Local shards are read through an index of their members' offsets (shards.index_tar, built once per process
and shard from the headers alone, used only when it holds the manifest's sample count): `block` reads a run
of positions with one read for the loader to decode with a few numpy operations, hashing the bytes in file
order as the parser would, with the same checks at the same points. Remote shards, and any shard whose
index does not match, go through the tar parser (`read`).
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np

from pipeline.data import shards
from pipeline.data.shards import is_remote
from pipeline.data.sources import DEFAULT_READ_TIMEOUT, HashingStream, open_shard

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
        self.indexes: dict[int, shards.TarIndex | None] = {}  # local shards' member offsets, built once

    def count(self, shard: int) -> int | None:
        return None if self.counts is None else self.counts[shard]

    def to_verify(self, shard: int) -> str | None:
        """The sha256 the shard's bytes must have, while this process has not verified it yet."""
        if self.digests is None or shard in self.verified:
            return None
        return self.digests[shard]


class Reader:
    """Sequential access to one worker's shards; keeps the current shard open across reads."""

    def __init__(self, urls: Sequence[str], on_error: str, checks: ShardChecks | None = None,
                 timeout: float = DEFAULT_READ_TIMEOUT):
        """`timeout`: seconds a remote (pipe:, http) shard may send nothing before it counts as unreadable."""
        self.urls, self.on_error, self.timeout = urls, on_error, timeout
        self.checks = checks if checks is not None else ShardChecks(None, None)
        self.shard: int | None = None
        self.pos = 0  # position of the next sample of the open shard
        self.it: Iterator | None = None  # None once the shard is exhausted or broken
        self.broken = False
        self.stream = None
        self.expected: str | None = None  # sha256 the open shard must have, while it is being verified
        # the index path (`block`) verifying the open shard: its file, the hash so far and how far it got
        self.fd: int | None = None
        self.sha = None
        self.hashed = 0

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        if self.fd is not None:
            os.close(self.fd)
        self.shard, self.it, self.stream, self.pos, self.broken = None, None, None, 0, False
        self.expected, self.fd, self.sha, self.hashed = None, None, None, 0

    def finish(self) -> None:
        """Leave the open shard: one still being verified is read on to its end (parsed, so a sample past
        the manifest's count is caught too; through the index, whose count matched the manifest's, hashed)
        and its hash compared. Call before handing out the samples of a lane's last read, so an error is
        raised before they go out."""
        if self.expected is None:
            return
        if self.fd is not None:
            try:
                self._hash_to(None)
            except OSError as e:
                self._fail(f"{self.urls[self.shard]}: unreadable after its last sample: {e}")
                return
            self._compare(self.sha.hexdigest())
            return
        while self._next() is not None:
            self.pos += 1

    def _hash_to(self, end: int | None) -> None:
        """Feed the open shard's bytes from where hashing got to up to `end` (None: the end of the file)."""
        while end is None or self.hashed < end:
            n = 1 << 20 if end is None else min(1 << 20, end - self.hashed)
            data = os.pread(self.fd, n, self.hashed)
            if not data:
                if end is not None:
                    raise OSError(f"file ends at byte {self.hashed}, expected {end}")
                return
            self.sha.update(data)
            self.hashed += len(data)

    def _compare(self, digest: str) -> None:
        url = self.urls[self.shard]
        if digest != self.expected:
            self._fail(f"{url}: sha256 {digest[:16]}... differs from the manifest's {self.expected[:16]}...: "
                       "the file is corrupt or was changed after the manifest was written", mismatch=True)
        else:
            self.checks.verified.add(self.shard)
        self.expected = None

    def _open(self, shard: int) -> None:
        self.finish()
        self.close()
        self.shard = shard
        try:
            self.stream = open_shard(self.urls[shard], self.timeout)
            self.expected = self.checks.to_verify(shard)
            if self.expected is not None:
                self.stream = HashingStream(self.stream)
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
            self._compare(digest)
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

    def block(self, shard: int, lo: int, hi: int) -> shards.RawBlock | None:
        """Positions lo .. hi-1 of a local shard with one read, through the shard's index (its members'
        offsets, built from its headers the first time this process reads it), or None where the tar parser
        (`read`) must read them: a remote shard, one the parser has open, one whose index does not hold the
        manifest's count (the parser reports what is wrong), one changed since it was indexed, a failed read.

        The checks are those of `read`: a shard not verified yet is hashed as it is read (the bytes skipped
        to reach `lo` too) and compared on leaving it (`finish`, or opening another shard) or when a read
        reaches its last sample, so the same errors come at the same points."""
        checks, url = self.checks, self.urls[shard]
        count = checks.count(shard)
        if hi <= lo or shard in checks.bad or count is None or is_remote(url):
            return None
        if self.shard == shard and self.fd is None:
            return None  # the parser is on this shard: it carries on
        if shard not in checks.indexes:
            index = shards.index_tar(url)
            checks.indexes[shard] = index if index is not None and len(index) == count else None
        index = checks.indexes[shard]
        if index is None:
            return None
        if self.shard is not None and self.shard != shard:
            self.finish()  # leaving a shard: finish verifying it, as opening the next one in `read` does
            self.close()
        start, end = int(index.start[lo]), int(index.end[hi - 1])
        fd = self.fd if self.shard == shard else None
        try:
            if fd is None:
                fd = os.open(url, os.O_RDONLY)
                st = os.fstat(fd)
                if (st.st_size, st.st_mtime_ns) != (index.size, index.mtime_ns):
                    os.close(fd)
                    checks.indexes[shard] = None  # changed since indexed: the parser reads what is there now
                    return None
                verify = checks.to_verify(shard)
                if verify is not None:  # keep it open, hashing from byte 0, until the shard is left
                    self.shard, self.fd, self.expected, self.sha, self.hashed = shard, fd, verify, hashlib.sha256(), 0
            verifying = self.fd == fd
            try:
                if verifying and self.hashed < start:
                    self._hash_to(start)  # the bytes skipped to reach lo are part of the file's hash
                data = os.pread(fd, end - start, start)
                if len(data) != end - start:
                    raise OSError(f"short read at byte {start}")
                if verifying and end > self.hashed:
                    self.sha.update(memoryview(data)[self.hashed - start:])
                    self.hashed = end
            finally:
                if not verifying:
                    os.close(fd)
        except OSError:
            if self.shard == shard:
                self.close()  # verification starts over in the parser
            checks.indexes[shard] = None  # the parser reads it from now on and reports what it finds
            return None
        if verifying and hi == count:  # its last sample read: compare now, before these samples go out
            self.finish()
            self.close()
        return shards.RawBlock(np.frombuffer(data, dtype=np.uint8), start, index, lo, hi)

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
