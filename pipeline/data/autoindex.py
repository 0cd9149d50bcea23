"""The index of local shards that have no manifest, built when a run (or evaluate, bench) first needs the
split and cached, so the split gets a manifest's guarantees (equal batches, exact validation, exact resume)
without a `python -m pipeline.prepare index` first.

    if can_index(source):
        source = indexed(source, image_keys, on_error)   # counts, sha256, members, shapes as from a manifest

Each shard is scanned as `prepare index` scans it (pipeline.data.index.scan_shards: in parallel, a progress
bar). The result is kept in `cache_dir()/<hash of the shard paths and image keys>.json`, one entry per shard
stamped with its size and mtime: a later start (a resume, evaluate, every other rank) reads it instead of the
shards, and only a shard whose size or mtime changed is scanned again.

Why a cache directory (VAE_INDEX_CACHE, default ~/.cache/vae-pipeline/index) and not the run directory or the
shards' one: the data is set up before the run directory is settled (pipeline.training.train), and shard
directories are often read-only or shared with other users and tools (a file written there would also be seen
as part of the data set). One process builds an index, under an fcntl lock: the ranks of a run that start
together wait for it and read it (no N-fold scan); a rank that dies releases the lock with its process.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

from pipeline.data import shards
from pipeline.data.shards import is_remote
from pipeline.data.sources import DataSetupError, SplitSource

CACHE_ENV = "VAE_INDEX_CACHE"  # where indexes are cached (default: ~/.cache/vae-pipeline/index)
FORMAT = "vae-pipeline-index-cache/1"


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vae-pipeline" / "index"


def cache_file(paths: Sequence[str], image_keys: Sequence[str]) -> Path:
    """One file per shard list: the image keys decide which member's shape is measured, so they key it too."""
    key = hashlib.sha256(json.dumps([list(paths), list(image_keys)]).encode()).hexdigest()[:32]
    return cache_dir() / f"{key}.json"


def can_index(source: SplitSource | None) -> bool:
    """Counts unknown and every shard a local file: a scan reads them at disk speed. pipe: and http(s) shards
    are not scanned at start (a download of the whole split each time the cache misses)."""
    return source is not None and source.counts is None and not any(is_remote(u) for u in source.urls)


def indexed(source: SplitSource, image_keys: Sequence[str], on_error: str = "raise") -> SplitSource:
    """`source` with its counts, sha256s, members and shapes from the cached index (built or refreshed first)."""
    paths = [os.path.abspath(u) for u in source.urls]
    path = cache_file(paths, image_keys)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
            entries = _fresh_entries(path, paths, image_keys, source.origin)
    except OSError as e:  # the cache's directory, lock or file (a shard's errors are DataSetupErrors)
        raise DataSetupError(f"{path.parent}: cannot write the index of {source.origin} there "
                             f"({e.strerror or e}): set {CACHE_ENV} to a writable directory, or "
                             "data.steps_per_epoch to stream the shards without counts") from None
    _refuse_unreadable(entries, on_error)
    return _with_counts(source, entries, path)


def _stamp(path: str) -> dict:
    try:
        st = os.stat(path)
    except OSError as e:  # gone since the source was listed: not the cache's fault
        raise DataSetupError(f"{path}: cannot read: {e.strerror or e}") from None
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _load(path: Path) -> dict[str, dict]:
    """The cached entries by shard path; nothing when the file is missing or not one of ours (re-indexed)."""
    try:
        cached = json.loads(path.read_text())
        return {e["path"]: e for e in cached["shards"]} if cached.get("format") == FORMAT else {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _fresh_entries(path: Path, paths: Sequence[str], image_keys: Sequence[str], origin: str) -> list[dict]:
    """Every shard's entry: the cached one where its size and mtime are unchanged, else scanned now (and the
    cache file rewritten)."""
    from pipeline.data import index

    cached = _load(path)
    stamps = [_stamp(p) for p in paths]  # before the scan: a shard changed during it is scanned again next time
    stale = [s for s in stamps if {k: cached.get(s["path"], {}).get(k) for k in s} != s]
    if not stale:
        return [cached[p] for p in paths]
    try:
        scanned = index.scan_shards([s["path"] for s in stale], image_keys, workers=index.default_workers(),
                                    on_error="warn", desc=f"indexing {origin}")
    except index.IndexingError as e:  # a damaged or unreadable shard
        raise DataSetupError(f"{e}; cannot index {origin} (fix or remove the shard)") from None
    cached.update({s["path"]: {**s, **e} for s, e in zip(stale, scanned)})
    entries = [cached[p] for p in paths]
    shards.write_json_atomic(path, {"format": FORMAT, "image_keys": list(image_keys), "shards": entries})
    return entries


def _refuse_unreadable(entries: Sequence[dict], on_error: str) -> None:
    """data.on_error=raise: a sample without a readable image stops the run now, as it would at its batch.
    The index scans with warn whatever data.on_error is, so one cache serves both."""
    bad = next((b for e in entries for b in e["bad"]), None)
    if on_error == "raise" and bad is not None:
        raise DataSetupError(f"{bad} (data.on_error=warn skips and counts such samples)")


def _with_counts(source: SplitSource, entries: Sequence[dict], path: Path) -> SplitSource:
    from pipeline.data.index import merged

    if sum(e["samples"] for e in entries) == 0:
        raise DataSetupError(f"{source.origin}: the shards hold no samples")
    members, shapes = merged(entries)
    seen = tuple(sorted(tuple(int(d) for d in s.split("x")) for s in shapes))
    return dataclasses.replace(
        source, counts=tuple(int(e["samples"]) for e in entries), digests=tuple(e["sha256"] for e in entries),
        shape=seen[0] if len(seen) == 1 else None, shapes=seen, members=tuple(sorted(members)), indexed=str(path))
