"""ShardStream: one rank's batches of one split, an IterableDataset run inside the loader workers. Each
worker reads and decodes what pipeline.data.layout assigns to its lane, and assembles whole batches.

Batches are dicts: "image" uint8 [B, C, H, W] (the model converts to float on its device), "label" int64 [B]
and "factors" float32 [B, F] when the shards have them, "key" list[str], "skipped" int (samples of this batch
that were unreadable and replaced, data.on_error=warn). Images are decoded (.npy, jpg, png, ...) and brought
to the configured channels and size here, in the workers, by pipeline.data.decode.ImageSpec.

Errors: data.on_error=raise stops with the shard's name. warn logs, counts (batch["skipped"]) and, in
training, fills each lost sample with a repeat of a readable sample of the same shuffle block (a block with
none borrows from the positions after it), so every rank still yields N full batches and resume stays
exact. Val/test drop lost samples instead.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.data import layout, shards
from pipeline.data.decode import Columns, ImageSpec, Item
from pipeline.data.reader import Reader, ShardChecks
from pipeline.data.sources import DEFAULT_READ_TIMEOUT, SplitSource

log = logging.getLogger(__name__)

Read = Columns | list[Item | None]  # what a read of positions gives: arrays, or per-sample items (None: lost)
# Arrays up to this size leave a loader worker by value (pickled through its pipe): for small batches that
# costs the training process ~5x less than a tensor in shared memory (a file descriptor and a mapping per
# tensor, ~0.3 ms each); larger ones go as shared-memory tensors. See ShardLoader, which makes tensors of both.
BY_VALUE_MAX_BYTES = 1 << 20


def as_items(read: Read) -> list[Item | None]:
    return read.items() if isinstance(read, Columns) else read


def join(parts: list[Read]) -> Read:
    """The reads of consecutive segments as one: arrays when every part is, else items."""
    if parts and all(isinstance(p, Columns) for p in parts):
        joined = Columns.concat(parts)
        if joined is not None:
            return joined
    return [it for p in parts for it in as_items(p)]


class Batch(dict):
    """A batch as the loader hands it out, which the DataLoader's pin-memory thread can pin (data.pin_memory
    on a CUDA run): torch pins tensors only, and small arrays leave the loader workers as numpy
    (BY_VALUE_MAX_BYTES). torch calls `pin_memory()` on a Mapping that has one from 2.3 on; before, the
    arrays stay pageable."""

    def pin_memory(self, device=None) -> Batch:
        return Batch({k: _pinned(v) for k, v in self.items()})


def _pinned(value):
    if isinstance(value, np.ndarray) and value.dtype != object:
        value = torch.from_numpy(value)
    return value.pin_memory() if isinstance(value, torch.Tensor) else value


def pinned_empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """Page-locked host memory (torch's caching host allocator reuses it batch after batch)."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


class SplitCache:
    """A split's decoded samples in canonical order (shard 0's positions, then shard 1's, ...) held by the
    training process, in its RAM or on the accelerator (data.cache). Filled by `ShardStream.fill_cache`,
    which reads every shard through the same reader and decoder as the loader workers (with the same
    checks); batches are then rows of it, chosen by the same layout, so they are the stream's batches.
    `pin`: a host cache builds each batch in page-locked memory (set for CUDA runs with data.pin_memory), so
    the copy to the GPU is asynchronous; pageable memory makes `non_blocking=True` wait for the copy."""

    pin = False

    def __init__(self, columns: Columns, counts, device: torch.device | str | None = None):
        self.offsets = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))[:-1]])
        self.device = torch.device(device or "cpu")
        self.keys = np.array(columns.keys, dtype=object)
        self.tensors = {name: torch.from_numpy(np.ascontiguousarray(value)).to(self.device)
                        for name, value in (("image", columns.image), ("label", columns.label),
                                            ("factors", columns.factors)) if value is not None}

    def rows(self, segments) -> np.ndarray:
        """Cache rows of (shard, first, stop) segments, in order."""
        return np.concatenate([self.offsets[s] + np.arange(a, b, dtype=np.int64) for s, a, b in segments])

    def batch(self, rows: np.ndarray) -> dict:
        index = torch.from_numpy(rows)
        if self.device.type != "cpu":
            index = index.to(self.device, non_blocking=True)
        if self.pin and self.device.type == "cpu":
            batch = {name: torch.index_select(t, 0, index, out=pinned_empty((len(index), *t.shape[1:]), t.dtype))
                     for name, t in self.tensors.items()}
        else:
            batch = {name: torch.index_select(t, 0, index) for name, t in self.tensors.items()}
        batch["key"] = self.keys[rows].tolist()
        batch["skipped"] = 0
        return batch


class CachedRows:
    """A read served by a SplitCache: the cache rows of the positions read."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows


def columns_of(items: list[Item | None]) -> Columns | None:
    """Items as Columns, or None when they are not alike (a lost sample, labels or factors in some only,
    several shapes): left to the stream, which fills or reports them."""
    if not items or any(it is None for it in items):
        return None
    first = items[0]
    if any(it[1].shape != first[1].shape or (it[2] is None) != (first[2] is None)
           or (it[3] is None) != (first[3] is None) or (it[3] is not None and it[3].shape != first[3].shape)
           for it in items):
        return None
    return Columns([it[0] for it in items], np.stack([it[1] for it in items]),
                   None if first[2] is None else np.array([it[2] for it in items], dtype=np.int64),
                   None if first[3] is None else np.stack([it[3] for it in items]).astype(np.float32))


def for_transfer(batch: dict) -> dict:
    """In a loader worker: arrays above BY_VALUE_MAX_BYTES become tensors (shared memory); the rest travel
    by value. A Batch: the pin-memory thread pins the arrays too."""
    for k, v in batch.items():
        if isinstance(v, np.ndarray) and v.nbytes > BY_VALUE_MAX_BYTES:
            batch[k] = torch.from_numpy(v)
    return Batch(batch)


class ShardStream(IterableDataset):
    """One rank's batches of one split; pipeline.data.layout says which samples, in which order."""

    def __init__(self, source: SplitSource, *, train: bool, batch_size: int, world_size: int, rank: int,
                 lanes: int, seed: int, shuffle_buffer: int, num_batches: int | None, on_error: str,
                 verify_checksums: bool = True, spec: ImageSpec | None = None,
                 shape: tuple[int, int, int] | None = None, read_timeout: float = DEFAULT_READ_TIMEOUT):
        """`spec`: how samples are decoded and converted; `shape`: the (C, H, W) every image must have after
        conversion (default: the source's, when known); `verify_checksums`: hash shards against the manifest;
        `read_timeout`: seconds a remote shard may stall before it counts as unreadable (data.on_error)."""
        self.source, self.train, self.batch_size = source, train, batch_size
        self.checks = ShardChecks(source.counts, source.digests if verify_checksums else None)
        self.spec = spec or ImageSpec()
        self.shape = tuple(shape) if shape is not None else (tuple(source.shape) if source.shape else None)
        self.world_size, self.rank, self.lanes, self.seed = world_size, rank, lanes, seed
        self.on_error, self.num_batches, self.read_timeout = on_error, num_batches, read_timeout
        self.block = layout.block_size(batch_size, shuffle_buffer) if train else batch_size
        self.shuffle = train and shuffle_buffer > 0
        self.epoch, self.start = 0, 0
        self._iterated = False
        self.cache: SplitCache | None = None  # set: training batches come from it, in the training process
        if not train and source.counts is not None:  # exact split of the val/test samples
            self.range = layout.eval_range(source.total, world_size, rank)
            self.num_batches = layout.eval_num_batches(*self.range, batch_size)

    def set_position(self, epoch: int, start: int) -> None:
        """Called in the main process before workers start: new workers copy it."""
        self.epoch, self.start, self._iterated = epoch, start, False

    def __iter__(self) -> Iterator[dict]:
        if self._iterated:  # a persistent worker's copy: each further pass is the next epoch, from batch 0
            self.epoch, self.start = self.epoch + 1, 0
        self._iterated = True
        if self.cache is not None:
            yield from self._cached_batches()
            return
        info = get_worker_info()
        w, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.lanes:
            raise RuntimeError(f"ShardStream built for {self.lanes} lanes runs in {workers} workers")
        lane = layout.worker_lane(self.start, w, self.lanes)
        reader = Reader(self.source.urls, self.on_error, self.checks, self.read_timeout)
        try:
            if self.source.counts is None:
                batches = self._batches_streaming(reader, lane)
            elif self.train:
                batches = self._train_batches(reader, lane)
            else:
                batches = self._eval_batches(reader, lane)
            for batch in batches:
                yield for_transfer(batch) if info is not None else Batch(batch)
        finally:
            reader.close()

    # ---- the in-memory cache (data.cache)
    def fill_cache(self, device: torch.device | str | None = None) -> SplitCache | None:
        """Read and decode every sample of the split, shard by shard, through the loader's reader (sha256 and
        count checks included) into a SplitCache on `device`; None where the stream must serve the batches
        instead: unknown counts (streaming), or samples that could not be read or decoded alike."""
        if self.source.counts is None:
            return None
        reader = Reader(self.source.urls, self.on_error, self.checks, self.read_timeout)
        parts: list[Columns] = []
        try:
            for shard, count in enumerate(self.source.counts):
                if count == 0:
                    continue
                read = self._read(reader, shard, 0, count)
                reader.finish()
                read = read if isinstance(read, Columns) else columns_of(read)
                if read is None:
                    return None
                parts.append(read)
        finally:
            reader.close()
        columns = Columns.concat(parts) if parts else None
        return None if columns is None else SplitCache(columns, self.source.counts, device)

    def _cached_batches(self) -> Iterator[dict]:
        """The epoch's batches from `start`, from the cache: each lane's batches exactly as a loader worker
        builds them, taken in the order the DataLoader takes them from its workers (batch i from lane i % W)."""
        if not self.train:
            raise RuntimeError("the cache serves training batches only")
        lanes = [self._train_batches(None, lane) for lane in range(self.lanes)]
        for i in range(self.start, self.num_batches):
            yield next(lanes[i % self.lanes])

    # ---- items and batches
    def _decode(self, raw: dict | None, url: str) -> Item | None:
        if raw is None:
            return None
        try:
            image, label, factors = self.spec.decode(raw)
            if self.shape is not None and tuple(image.shape) != self.shape:
                raise ValueError(f"image shape {tuple(image.shape)} after conversion, expected {self.shape}; set "
                                 "data.image_size and data.channels to bring every image to one shape")
            return raw["__key__"], image, label, factors
        except (ValueError, KeyError) as e:
            message = f"{url}: sample {raw.get('__key__')!r}: {e}"
            if self.on_error == "raise":
                raise shards.ShardFormatError(message) from None
            log.warning("skipping sample: %s", message)
            return None

    def _read(self, reader: Reader, shard: int, lo: int, hi: int) -> Read:
        """Positions lo .. hi-1 of a shard: as arrays through the shard's index where that works, else
        decoded sample by sample (from the indexed bytes, or parsed from the tar stream)."""
        url = self.source.urls[shard]
        block = reader.block(shard, lo, hi)
        if block is None:
            return [self._decode(raw, url) for raw in reader.read(shard, lo, hi)]
        columns = self.spec.decode_block(block, self.shape)
        return columns if columns is not None else [self._decode(raw, url) for raw in block.raws()]

    @staticmethod
    def _collate_columns(cols: Columns, idx: np.ndarray | None = None) -> dict:
        """A batch (numpy arrays; the loader makes tensors) of rows `idx` of `cols` (None: all, in order)."""
        if idx is None:
            batch = {"image": cols.image, "key": list(cols.keys), "skipped": 0}
        else:
            batch = {"image": cols.image[idx], "key": [cols.keys[i] for i in idx.tolist()], "skipped": 0}
        for name in ("label", "factors"):
            value = getattr(cols, name)
            if value is not None:
                batch[name] = value if idx is None else value[idx]
        return batch

    def _collate(self, items: list[Item], skipped: int) -> dict:
        batch = {"image": np.stack([it[1] for it in items]),
                 "key": [it[0] for it in items], "skipped": skipped}
        if items[0][2] is not None:
            if any(it[2] is None for it in items):
                unlabelled = next(it[0] for it in items if it[2] is None)
                raise shards.ShardFormatError(
                    f"{self.source.origin}: sample {unlabelled!r} has no label "
                    f"(data.label_keys {list(self.spec.label_keys)}, .json field {self.spec.label_field!r}) "
                    "while others have one")
            batch["label"] = np.array([it[2] for it in items], dtype=np.int64)
        if items[0][3] is not None:
            batch["factors"] = np.stack([it[3] for it in items]).astype(np.float32)
        return batch

    def _fill(self, items: list[Item | None], more: Callable[[], list[Item]]) -> tuple[list[Item], list[bool]]:
        """Replace unreadable samples by repeats of this block's readable ones; a block with none borrows
        from the positions after it (`more`). Both depend on positions only, so resume sees the same."""
        filled = [it is None for it in items]
        if not any(filled):
            return items, filled
        donors = [it for it in items if it is not None] or more()
        out, j = [], 0
        for it in items:
            if it is None:
                it, j = donors[j % len(donors)], j + 1
            out.append(it)
        return out, filled

    def _emit_block(self, items: Read | CachedRows, block: layout.Block,
                    more: Callable[[], list[Item]]) -> Iterator[dict]:
        if isinstance(items, CachedRows):
            for idx in block.batches:
                yield self.cache.batch(items.rows[idx])
            return
        if isinstance(items, Columns):  # every sample read and decoded: nothing to fill
            for idx in block.batches:
                yield self._collate_columns(items, idx)
            return
        items, filled = self._fill(items, more)
        for idx in block.batches:
            yield self._collate([items[i] for i in idx], sum(filled[i] for i in idx))

    def _blocks(self, lane: int, key_base: int) -> Iterator[layout.Block]:
        return layout.lane_blocks(lane=lane, lanes=self.lanes, num_batches=self.num_batches,
                                  batch_size=self.batch_size, block=self.block, start=self.start,
                                  seed=self.seed, epoch=self.epoch, shuffle=self.shuffle, key_base=key_base)

    # ---- sample counts known
    def _train_batches(self, reader: Reader, lane: int) -> Iterator[dict]:
        counts = np.asarray(self.source.counts, dtype=np.int64)
        order = layout.shard_order(self.seed, self.epoch, len(counts))
        base, end = layout.lane_span(self.rank, lane, self.num_batches, self.lanes, self.batch_size)

        def read(lo: int, hi: int, rd: Reader = reader) -> Read | CachedRows:
            if self.cache is not None:
                return CachedRows(self.cache.rows(layout.segments(counts, order, lo, hi)))
            items = join([self._read(rd, shard, a, b) for shard, a, b in layout.segments(counts, order, lo, hi)])
            if hi == end:  # the lane's last read: finish verifying its shard before these samples go out
                rd.finish()
            return items

        def lookahead(pos: int) -> list[Item]:  # donors for a block with no readable sample
            rd, total = Reader(self.source.urls, self.on_error, self.checks, self.read_timeout), int(counts.sum())
            try:
                for lo in range(pos, pos + total, self.block):
                    good = [it for it in as_items(read(lo, min(lo + self.block, pos + total), rd)) if it is not None]
                    if good:
                        return good
            finally:
                rd.close()
            raise shards.ShardFormatError(f"{self.source.origin}: no readable training sample at all")

        for blk in self._blocks(lane, key_base=base):
            yield from self._emit_block(read(base + blk.lo, base + blk.hi), blk,
                                        lambda pos=base + blk.hi: lookahead(pos))

    def _eval_batches(self, reader: Reader, lane: int) -> Iterator[dict]:
        counts = np.asarray(self.source.counts, dtype=np.int64)
        order = np.arange(len(counts))
        batches = layout.eval_batches(*self.range, lane=lane, lanes=self.lanes, batch_size=self.batch_size)
        for j, (a, b) in enumerate(batches):
            items = join([self._read(reader, s, x, y) for s, x, y in layout.segments(counts, order, a, b)])
            if j == len(batches) - 1:  # the lane's last read: finish verifying its shard first
                reader.finish()
            if isinstance(items, Columns):
                yield self._collate_columns(items)
                continue
            good = [it for it in items if it is not None]
            if good:
                yield self._collate(good, len(items) - len(good))

    # ---- streaming (sample counts unknown)
    def _stream_items(self, reader: Reader, lane: int) -> Iterator[tuple[dict | None, str]]:
        """This slot's raw samples and their shards' URLs, cycling through the epoch for training."""
        slot = layout.slot_of(self.rank, lane, self.lanes)
        cycle = 0
        while True:
            urls, stride, offset = layout.stream_cycle(len(self.source.urls), slot=slot,
                                                       slots=self.world_size * self.lanes, seed=self.seed,
                                                       epoch=self.epoch, cycle=cycle, permute=self.train)
            produced = i = 0
            for s in urls:
                for raw in reader.read(s, 0, None):
                    if i % stride == offset:
                        produced += 1
                        yield raw, self.source.urls[s]
                    i += 1
            if not self.train:
                return
            if produced == 0:
                raise shards.ShardFormatError(f"{self.source.origin}: slot {slot} read no samples in a full "
                                              "pass; the shards are empty or unreadable")
            cycle += 1

    def _batches_streaming(self, reader: Reader, lane: int) -> Iterator[dict]:
        stream = self._stream_items(reader, lane)
        if not self.train:
            items: list[Item] = []
            for raw, url in stream:
                it = self._decode(raw, url)
                if it is not None:
                    items.append(it)
                if len(items) == self.batch_size:
                    yield self._collate(items, 0)
                    items = []
            if items:
                yield self._collate(items, 0)
            return

        def more(pos: int) -> list[Item]:  # donors for an unreadable block: the stream after it
            ahead = self._stream_items(Reader(self.source.urls, self.on_error, self.checks, self.read_timeout), lane)
            for i, (raw, url) in enumerate(ahead):
                if i >= pos and (it := self._decode(raw, url)) is not None:
                    return [it]
                if i >= pos + 100 * self.block:
                    break
            raise shards.ShardFormatError(f"{self.source.origin}: no readable training sample at all")

        pos = 0  # samples of the slot's stream consumed so far
        for blk in self._blocks(lane, key_base=layout.stream_key_base(self.rank, lane, self.lanes)):
            for _ in range(blk.lo - pos):  # resume: skip whole blocks undecoded
                next(stream)
            items = [self._decode(*next(stream)) for _ in range(blk.hi - blk.lo)]
            pos = blk.hi
            yield from self._emit_block(items, blk, lambda hi=blk.hi: more(hi))
