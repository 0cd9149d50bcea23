"""Where a split's shards are: a manifest.json, a directory, a brace pattern or any webdataset URL, resolved
to the shard URLs in canonical order, their sample counts when known, and the sample shape.

Counts come from the manifest (ours, or the index `python -m pipeline.prepare index` writes for shards made by
other tools), or from a manifest.json next to local shards that names every one of them; without counts (a
URL or pattern with no manifest beside it) the loader streams (see pipeline.data.layout).
"""
from __future__ import annotations

import hashlib
import os
import select
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.data import shards
from pipeline.data.shards import is_remote, url_scheme

DEFAULT_READ_TIMEOUT = 120.0  # seconds a remote shard may send nothing (data.read_timeout)
CURL_EXITS = {6: "could not resolve the host", 7: "could not connect (connection refused?)",
              22: "the server answered with an HTTP error (404, 403, ...)", 28: "timed out",
              35: "TLS handshake failed", 52: "empty reply", 56: "connection reset"}


class HashingStream:
    """A read-only stream that feeds what is read through it to sha256 and counts the bytes."""

    def __init__(self, raw):
        self.raw, self.sha, self.bytes = raw, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def hexdigest_to_end(self) -> str:
        """The sha256 of the whole stream: what is left is read (the padding after a tar's end-of-archive
        blocks belongs to the file's hash too)."""
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest()

    def close(self) -> None:
        self.raw.close()


class RemoteStream:
    """The bytes of a `pipe:` or http(s) shard, read from the command webdataset's gopen starts (curl for
    http) with a stall timeout: a read that gets nothing for `timeout` seconds raises TimeoutError, and a
    command that exits with a failure status raises OSError when its output ends (both name what failed;
    readers treat them as an unreadable shard, data.on_error). `close` stops the command and never raises,
    so the error that ended a read is the one reported."""

    def __init__(self, url: str, timeout: float):
        import webdataset as wds

        self.url, self.timeout = url, timeout
        self.pipe = wds.gopen(url, "rb")
        self.fd = self.pipe.stream.fileno()
        self.ended = False

    def _what(self) -> str:
        return "the download (curl)" if url_scheme(self.url) in ("http", "https") else "the pipe: command"

    def _exit_status(self) -> None:
        proc = self.pipe.proc
        try:
            status = proc.wait(self.timeout)
        except Exception:  # noqa: BLE001 -- subprocess.TimeoutExpired: closed its output but runs on
            raise TimeoutError(f"{self._what()} closed its output and did not exit within {self.timeout:g} s "
                               "(data.read_timeout)") from None
        if status not in self.pipe.ignore_status:
            hint = f": {CURL_EXITS[status]}" if "curl" in self._what() and status in CURL_EXITS else ""
            raise OSError(f"{self._what()} exited with status {status}{hint}")

    def read(self, n: int = -1) -> bytes:
        parts, got = [], 0
        while (n is None or n < 0 or got < n) and not self.ended:
            ready, _, _ = select.select([self.fd], [], [], self.timeout)
            if not ready:
                raise TimeoutError(f"{self._what()} sent nothing for {self.timeout:g} s (data.read_timeout)")
            part = os.read(self.fd, 1 << 20 if n is None or n < 0 else min(1 << 20, n - got))
            if not part:
                self.ended = True
                self._exit_status()
                break
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    def close(self) -> None:
        proc = self.pipe.proc
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self.pipe.stream.close()  # closed: the Pipe's own close (and __del__) has nothing left to check


def open_shard(url: str, timeout: float = DEFAULT_READ_TIMEOUT):
    """A shard's byte stream: a local file, or (pipe:, http(s)) a RemoteStream with a stall timeout."""
    import webdataset as wds

    if url_scheme(url) in ("pipe", "http", "https"):
        return RemoteStream(url, timeout)
    return wds.gopen(url, "rb")


class DataSetupError(ValueError):
    """A data source or split that cannot work as configured; the message says what to change."""


@dataclass(frozen=True)
class SplitSource:
    """The shards of one split: URLs in canonical order, their sample counts when known."""

    split: str
    origin: str  # what the config said, for messages
    urls: tuple[str, ...]
    counts: tuple[int, ...] | None  # None: no manifest, counts unknown
    shape: tuple[int, int, int] | None  # None: unknown, or several (see shapes)
    digests: tuple[str | None, ...] | None = None  # sha256 per shard from the manifest, checked while reading
    shapes: tuple[tuple[int, int, int], ...] | None = None  # every stored image shape an index saw
    members: tuple[str, ...] | None = None  # every member suffix an index saw
    indexed: str | None = None  # the cache file of the index built at start (pipeline.data.autoindex)

    @property
    def total(self) -> int | None:
        return None if self.counts is None else sum(self.counts)

    @property
    def mode(self) -> str:
        """Where the counts come from, as the start-up summary says it."""
        if self.counts is None:
            return "streaming (counts unknown)"
        return f"indexed at start (cached {self.indexed})" if self.indexed else "manifest"


def _from_manifest(path: Path, split: str, origin: str) -> SplitSource | None:
    manifest = shards.load_manifest(path)
    entry = manifest["splits"].get(split)
    if entry is None:
        return None
    urls = tuple(shards.shard_location(path, manifest, s["name"]) for s in entry["shards"])
    shape = tuple(entry.get("shape") or manifest.get("shape") or ()) or None
    shapes = tuple(tuple(int(d) for d in s.split("x")) for s in entry["shapes"]) if "shapes" in entry else None
    members = tuple(entry["members"]) if "members" in entry else None
    return SplitSource(split, origin, urls, tuple(int(s["samples"]) for s in entry["shards"]), shape,
                       digests=tuple(s.get("sha256") for s in entry["shards"]), shapes=shapes, members=members)


def _sibling_counts(urls: Sequence[str]) -> tuple[tuple[int, ...] | None, tuple | None, tuple | None]:
    """Counts, shape and sha256s from a manifest.json next to local shards (any split), if it names every shard."""
    if any(is_remote(u) for u in urls):  # no sibling to look at
        return None, None, None
    path = Path(urls[0]).parent / shards.MANIFEST
    if not path.is_file():
        return None, None, None
    manifest = shards.load_manifest(path)
    known = {Path(s["name"]).name: s for e in manifest["splits"].values() for s in e["shards"]}
    if not all(Path(u).name in known for u in urls):
        return None, None, None
    shape = tuple(manifest["shape"]) if manifest.get("shape") else None
    entries = [known[Path(u).name] for u in urls]
    return tuple(int(s["samples"]) for s in entries), shape, tuple(s.get("sha256") for s in entries)


def shard_urls(spec: str, split: str | None = None) -> list[str]:
    """The shards of a directory (its `{split}-*.tar`; failing those, every `*.tar`, `*.tar.gz`, `*.tgz`: the names other tools
    write), a brace pattern or a URL, in canonical order; local ones must exist."""
    import webdataset as wds

    if os.path.isdir(spec):
        _refuse_incomplete(Path(spec))
        tars = sorted(p for p in Path(spec).iterdir()
                      if p.name.lower().endswith(shards.SHARD_SUFFIXES) and not p.name.startswith("."))
        if any(shards.SHARD_RE.match(p.name) for p in tars):  # our naming: only this split's shards
            tars = [p for p in tars if split and p.name.startswith(f"{split}-")]
            if not tars:
                raise DataSetupError(f"{spec}: no manifest.json and no {split}-*.tar shards in this directory")
        if not tars:
            raise DataSetupError(f"{spec}: no manifest.json and no .tar / .tar.gz / .tgz shards in this directory")
        return [str(p) for p in tars]
    urls = list(wds.shardlists.expand_urls(spec))
    if not urls:
        raise DataSetupError(f"{spec}: the pattern expands to no shards")
    missing = [u for u in urls if not is_remote(u) and not os.path.exists(u)]
    if missing:
        raise DataSetupError(f"{spec}: shard {missing[0]} does not exist")
    for parent in {Path(u).parent for u in urls if not is_remote(u)}:
        _refuse_incomplete(parent)
    return urls


def _refuse_incomplete(directory: Path) -> None:
    if (directory / shards.INCOMPLETE).exists():
        raise DataSetupError(f"{directory}: a `python -m pipeline.prepare` into this directory has not finished "
                             f"(it is running, or was killed: {shards.INCOMPLETE} is there and no manifest); "
                             "wait for it, or run it again")


def resolve_source(spec: str | None, split: str, root: str) -> SplitSource | None:
    """A split's shards from a manifest.json, a directory, a brace pattern or any webdataset URL.

    None means `<root>/manifest.json`. Returns None when a manifest has no such split.
    """
    origin = spec if spec is not None else str(Path(root) / shards.MANIFEST)
    if spec is None or spec.endswith(".json"):
        return _from_manifest(Path(origin), split, origin)
    if os.path.isdir(spec) and (Path(spec) / shards.MANIFEST).is_file():
        return _from_manifest(Path(spec) / shards.MANIFEST, split, origin)
    urls = shard_urls(spec, split)
    counts, shape, digests = _sibling_counts(urls)
    return SplitSource(split, origin, tuple(urls), counts, shape, digests=digests)


def first_sample(source: SplitSource, timeout: float = DEFAULT_READ_TIMEOUT) -> dict:
    """The first raw sample of the first shard (for sources whose image shape is not in a manifest)."""
    url = source.urls[0]
    try:
        stream = open_shard(url, timeout)
        try:
            for raw in shards.iter_tar_samples(stream, url):
                return raw
        finally:
            stream.close()
    except (OSError, ValueError) as e:  # missing file, failing pipe or download (timeout), damaged tar
        raise DataSetupError(f"{url}: cannot read the first sample of {source.origin}: {e}") from None
    raise DataSetupError(f"{url}: first shard of {source.origin} holds no samples")
