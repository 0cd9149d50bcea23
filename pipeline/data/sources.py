"""Where a split's shards are: a manifest.json, a directory, a brace pattern or any webdataset URL, resolved
to the shard URLs in canonical order, their sample counts when known, and the sample shape.

Counts come from the manifest, or from a manifest.json next to local shards that names every one of them;
without counts (a URL or pattern with no manifest beside it) the loader streams (see pipeline.data.layout).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.data import shards


class DataSetupError(ValueError):
    """A data source or split that cannot work as configured; the message says what to change."""


@dataclass(frozen=True)
class SplitSource:
    """The shards of one split: URLs in canonical order, their sample counts when known."""

    split: str
    origin: str  # what the config said, for messages
    urls: tuple[str, ...]
    counts: tuple[int, ...] | None  # None: no manifest, counts unknown
    shape: tuple[int, int, int] | None
    digests: tuple[str | None, ...] | None = None  # sha256 per shard from the manifest, checked while reading

    @property
    def total(self) -> int | None:
        return None if self.counts is None else sum(self.counts)


def _from_manifest(path: Path, split: str, origin: str) -> SplitSource | None:
    manifest = shards.load_manifest(path)
    entry = manifest["splits"].get(split)
    if entry is None:
        return None
    names = [s["name"] for s in entry["shards"]]
    urls = tuple(n if "://" in n or n.startswith("pipe:") else str(path.parent / n) for n in names)
    shape = tuple(entry.get("shape") or manifest.get("shape") or ()) or None
    return SplitSource(split, origin, urls, tuple(int(s["samples"]) for s in entry["shards"]), shape,
                       tuple(s.get("sha256") for s in entry["shards"]))


def _sibling_counts(urls: Sequence[str]) -> tuple[tuple[int, ...] | None, tuple | None, tuple | None]:
    """Counts, shape and sha256s from a manifest.json next to local shards (any split), if it names every shard."""
    if any(":" in u.split("/")[0] for u in urls):  # pipe:, http:, ... : no sibling to look at
        return None, None, None
    path = Path(urls[0]).parent / shards.MANIFEST
    if not path.is_file():
        return None, None, None
    manifest = shards.load_manifest(path)
    known = {s["name"]: s for e in manifest["splits"].values() for s in e["shards"]}
    if not all(Path(u).name in known for u in urls):
        return None, None, None
    shape = tuple(manifest["shape"]) if manifest.get("shape") else None
    entries = [known[Path(u).name] for u in urls]
    return tuple(int(s["samples"]) for s in entries), shape, tuple(s.get("sha256") for s in entries)


def resolve_source(spec: str | None, split: str, root: str) -> SplitSource | None:
    """A split's shards from a manifest.json, a directory, a brace pattern or any webdataset URL.

    None means `<root>/manifest.json`. Returns None when a manifest has no such split.
    """
    import webdataset as wds

    origin = spec if spec is not None else str(Path(root) / shards.MANIFEST)
    if spec is None or spec.endswith(".json"):
        return _from_manifest(Path(origin), split, origin)
    if os.path.isdir(spec):
        if (Path(spec) / shards.MANIFEST).is_file():
            return _from_manifest(Path(spec) / shards.MANIFEST, split, origin)
        urls = sorted(str(p) for p in Path(spec).glob(f"{split}-*.tar"))
        if not urls:
            raise DataSetupError(f"{spec}: no manifest.json and no {split}-*.tar shards in this directory")
    else:
        urls = list(wds.shardlists.expand_urls(spec))
        if not urls:
            raise DataSetupError(f"{spec}: the pattern expands to no shards")
        local = [u for u in urls if ":" not in u.split("/")[0]]
        missing = [u for u in local if not os.path.exists(u)]
        if missing:
            raise DataSetupError(f"{spec}: shard {missing[0]} does not exist")
    counts, shape, digests = _sibling_counts(urls)
    return SplitSource(split, origin, tuple(urls), counts, shape, digests)


def peek_shape(source: SplitSource) -> tuple[int, int, int]:
    """The image shape of the first sample of the first shard (for sources without a manifest)."""
    import webdataset as wds

    stream = wds.gopen(source.urls[0], "rb")
    try:
        for raw in shards.iter_tar_samples(stream, source.urls[0]):
            return tuple(shards.decode_sample(raw)[0].shape)
    finally:
        stream.close()
    raise DataSetupError(f"{source.urls[0]}: first shard of {source.origin} holds no samples")
