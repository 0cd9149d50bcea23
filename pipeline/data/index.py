"""`python -m pipeline.prepare index`: a manifest for WebDataset shards written by other tools, pointing at
them where they are (nothing is copied).

    python -m pipeline.prepare index --source 'shards/{00000..00099}.tar' --out data/laion
    python -m pipeline.prepare index --source val_shards/ --split val --out data/laion    # adds a split

Each shard is read once, in parallel worker processes: its samples are counted exactly as the loader groups
them (pipeline.data.shards.iter_tar_samples), its bytes hashed (sha256), and every sample's image member
(the first of --image-keys it has) measured from its header alone, without decoding pixels. The manifest
lists per split the shards (name, samples, sha256, bytes), the member suffixes seen with their counts and
the image shapes seen ("CxHxW" -> count). With it the loader knows every shard's count, so foreign shards
get the exact mode: equal batches per rank, exact validation, exact mid-epoch resume.

Shard names are stored relative to --out when the shards lie under it, else as absolute paths or URLs
(`pipe:` commands, http(s): anything webdataset's gopen opens).
"""
from __future__ import annotations

import os
from collections import Counter
from functools import partial
from pathlib import Path
from typing import List, Sequence

from pipeline.data import shards
from pipeline.data.decode import ImageSpec, SampleError, header_shape
from pipeline.data.shards import is_remote, url_scheme
from pipeline.data.sources import HashingStream, open_shard
from pipeline.data.workers import ProcessMap

INDEX_FORMAT = shards.INDEX_FORMAT


class IndexingError(ValueError):
    """Bad input to `prepare index`; the message names the shard (and the sample)."""


def scan_shard(url: str, image_keys: Sequence[str], on_error: str = "raise") -> dict:
    """One shard's entry: samples, sha256, bytes, member counts, image shapes, bad samples (on_error=warn)."""
    spec = ImageSpec(image_keys=tuple(image_keys))
    members: Counter = Counter()
    shapes: Counter = Counter()
    bad: List[str] = []  # the first few messages
    samples = unreadable = 0
    try:
        stream = open_shard(url)
        hashing, read_all = HashingStream(stream), False
        try:
            for raw in shards.iter_tar_samples(hashing, url):
                samples += 1
                members.update(k for k in raw if not k.startswith("__"))
                try:
                    member = spec.image_member(raw)
                    shapes["x".join(map(str, header_shape(member, raw[member])))] += 1
                except SampleError as e:
                    message = f"{url}: sample {raw['__key__']!r}: {e}"
                    if on_error == "raise":
                        raise IndexingError(message) from None
                    unreadable += 1
                    bad += [message][:10 - len(bad)]
            digest = hashing.hexdigest_to_end()  # the end-of-archive blocks belong to the file's sha256 too
            read_all = True
        finally:
            try:
                stream.close()  # a pipe's exit status is checked here
            except OSError:
                if read_all:  # else an error is on its way already: it says more than the pipe's status
                    raise
    except shards.ShardFormatError as e:
        raise IndexingError(str(e)) from None
    except OSError as e:  # missing file, failing command or download
        raise IndexingError(f"{url}: cannot read: {e}") from None
    return {"url": url, "samples": samples, "sha256": digest, "bytes": hashing.bytes,
            "members": dict(members), "shapes": dict(shapes), "bad": bad, "unreadable": unreadable}


def _name(url: str, out: Path) -> str:
    """How the manifest refers to a shard: relative to its directory when inside it, else absolute or a URL."""
    if is_remote(url):
        return url
    path = Path(url).resolve()
    try:
        return str(path.relative_to(out.resolve()))
    except ValueError:
        return str(path)


def scan_shards(urls: Sequence[str], image_keys: Sequence[str], *, workers: int = 1, on_error: str = "raise",
                progress: bool = True, desc: str = "indexing") -> List[dict]:
    """`scan_shard` of every URL, in order, in up to `workers` processes, with a progress bar of shards."""

    from pipeline.progress import progress_bar

    scan = partial(scan_shard, image_keys=list(image_keys), on_error=on_error)
    workers = max(1, min(workers, len(urls)))
    bar = progress_bar(total=len(urls), unit="shard", desc=desc, disable=not progress)
    entries: List[dict] = []
    try:
        with ProcessMap(workers) as pool:
            for entry in pool.map(scan, urls, chunk=1):  # a shard is a long task
                entries.append(entry)
                bar.update(1)
                bar.set_postfix(samples=sum(e["samples"] for e in entries), refresh=False)
    finally:
        bar.close()
    return entries


def merged(entries: Sequence[dict]) -> tuple[Counter, Counter]:
    """The member suffixes and the image shapes ("CxHxW") of several shards' entries, with their counts."""
    members: Counter = Counter()
    shapes: Counter = Counter()
    for e in entries:
        members.update(e["members"])
        shapes.update(e["shapes"])
    return members, shapes


def index_shards(urls: Sequence[str], out: Path, *, split: str = "train", source: str = "",
                 image_keys: Sequence[str] = ImageSpec.image_keys, workers: int = 1, on_error: str = "raise",
                 progress: bool = True, log=print) -> dict:
    """Scan `urls` and write (or update: other splits are kept) OUT/manifest.json; returns the manifest."""
    out = Path(out)
    path = out / shards.MANIFEST
    piped = next((u for u in urls if url_scheme(u) == "pipe"), None)
    if piped is not None:  # the loader refuses them: a downloaded manifest must not run commands
        raise IndexingError(f"{piped[:80]}: a manifest may not hold pipe: commands (training refuses them); "
                            "index local copies or http(s) URLs, or train on data.train='pipe:...' directly "
                            "with data.steps_per_epoch")
    manifest = {"format": INDEX_FORMAT, "splits": {}}
    if path.is_file():  # another split indexed before: keep it
        manifest = shards.load_manifest(path)
        if manifest.get("format") != INDEX_FORMAT:
            raise IndexingError(f"{path} belongs to a prepared dataset, not an index; choose another --out")
    entries = scan_shards(urls, image_keys, workers=workers, on_error=on_error, progress=progress,
                          desc=f"indexing {source or split}")
    members, shapes = merged(entries)
    unreadable = sum(e["unreadable"] for e in entries)
    for b in [b for e in entries for b in e["bad"]][:10]:
        log(f"warning: {b}")
    if unreadable > 10:
        log(f"warning: ... {unreadable} samples in all without a readable image member")
    total = sum(e["samples"] for e in entries)
    if total == 0:
        raise IndexingError(f"{source or urls[0]}: the shards hold no samples")
    only = [tuple(int(d) for d in s.split("x")) for s in shapes]
    manifest["splits"][split] = {
        "source": source, "total": total, "dtype": "uint8",
        "shape": list(only[0]) if len(only) == 1 else None,  # None: several; data.image_size must unify them
        "shapes": dict(sorted(shapes.items())), "members": dict(sorted(members.items())),
        "unreadable": unreadable,
        "shards": [{"name": _name(e["url"], out), "samples": e["samples"], "sha256": e["sha256"], "bytes": e["bytes"]}
                   for e in entries],
    }
    out.mkdir(parents=True, exist_ok=True)
    shards.write_json_atomic(path, manifest)
    return manifest


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def summary(manifest: dict, split: str) -> str:
    e = manifest["splits"][split]
    shapes = ", ".join(f"{s} ({n})" for s, n in list(e["shapes"].items())[:4])
    return (f"{split}: {e['total']} samples in {len(e['shards'])} shards; members "
            f"{', '.join(f'{k} ({n})' for k, n in e['members'].items())}; image shapes {shapes}"
            + (f"; {e['unreadable']} without a readable image" if e["unreadable"] else ""))

