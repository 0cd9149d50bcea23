"""ShardStream: one rank's batches of one split, an IterableDataset run inside the loader workers. Each
worker reads and decodes what pipeline.data.layout assigns to its lane, and assembles whole batches.

Batches are dicts: "image" uint8 [B, C, H, W] (the model converts to float on its device), "label" int64 [B]
and "factors" float32 [B, F] when the shards have them, "key" list[str], "skipped" int (samples of this batch
that were unreadable and replaced, data.on_error=warn). Images are decoded (.npy, jpg, png, ...) and brought
to the configured channels and size here, in the workers, by pipeline.data.decode.ImageSpec.

A worker runs small stages, each testable alone (webdataset's DataPipeline(*stages) shape):

    plan     pipeline.data.layout: the positions each lane reads and the batches each block hands out
    read     pipeline.data.reader.Reader: raw samples of a shard's positions, or one RawBlock of bytes
    decode   Decoder: a RawBlock as Columns with a few numpy operations (the fast path), else Items one by one
    fill     `fill`: lost samples replaced by repeats of readable ones (training, data.on_error=warn)
    collate  `collate_columns` / `collate_items`: the batch dict

With data.cache the training process holds the decoded split (SplitCache, filled once by the same read and
decode stages) and a batch is rows of it, chosen by the same plan: read, decode and fill are skipped.

Errors: data.on_error=raise stops with the shard's name. warn logs, counts (batch["skipped"]) and, in
training, fills each lost sample with a repeat of a readable sample of the same shuffle block (a block with
none borrows from the positions after it), so every rank still yields N full batches and resume stays
exact. Val/test drop lost samples instead.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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


@dataclass(frozen=True)
class StreamSpec:
    """What one rank's stream of one split is: which batches (the plan), how samples are read and decoded.

    `num_batches`: batches per rank (= global steps) per epoch for training (None: unknown, streaming val/test); val/test with
    counts compute their own. `image`: how samples are decoded and converted; `shape`: the (C, H, W) every
    image must have after conversion (None: the source's, when known). `verify_checksums`: hash shards against
    the manifest; `read_timeout`: seconds a remote shard may stall before it counts as unreadable."""

    train: bool
    batch_size: int  # per rank: the global batch / world_size
    world_size: int = 1
    rank: int = 0
    parts: int = 1  # canonical partitions of the training order (layout.Canon): the first start's world size
    lanes: int = 1
    seed: int = 0
    shuffle_buffer: int = 0
    num_batches: int | None = None
    on_error: str = "raise"
    verify_checksums: bool = True
    image: ImageSpec = field(default_factory=ImageSpec)
    shape: tuple[int, int, int] | None = None
    read_timeout: float = DEFAULT_READ_TIMEOUT

    @property
    def block(self) -> int:
        """Samples per shuffle block (training), or per read (val/test: one batch)."""
        return layout.block_size(self.batch_size, self.shuffle_buffer) if self.train else self.batch_size

    @property
    def shuffle(self) -> bool:
        return self.train and self.shuffle_buffer > 0


class TrainPlan(NamedTuple):
    """The training epoch's order (counts known): layout.Canon over the shards concatenated in `order`."""

    canon: layout.Canon
    counts: np.ndarray  # samples per shard, int64 [S]
    order: np.ndarray  # the epoch's shard permutation


class BlockRead:
    """The samples a lane uses of one block of one partition, read and decoded once: `batch(step, a, z)` is
    samples a .. z-1 of step `step`'s b-sample part of it, filled (lost samples, data.on_error=warn) among
    the lane's samples of the block alone, so a resumed lane fills as the uninterrupted one did."""

    def __init__(self, read: Read, lo: int, order: np.ndarray, kept: np.ndarray,
                 donors: Callable[[], list[Item]], origin: str, image: ImageSpec):
        self.lo, self.order, self.origin, self.image = lo, order, origin, image
        self.columns = read if isinstance(read, Columns) else None
        if self.columns is None:
            self.index = {int(q): j for j, q in enumerate(kept)}
            self.items, self.filled = fill([read[int(q) - lo] for q in kept], donors)

    def batch(self, where: slice, a: int, z: int) -> dict:
        rows = self.order[where][a:z] - self.lo
        if self.columns is not None:
            return collate_columns(self.columns, rows)
        picked = [self.index[int(r) + self.lo] for r in rows]
        return collate_items([self.items[j] for j in picked], sum(self.filled[j] for j in picked), self.origin,
                             self.image)


def concat_batches(parts: list[dict]) -> dict:
    """A rank's batch from its partitions' pieces, in partition order."""
    if len(parts) == 1:
        return parts[0]
    out = {"key": [k for p in parts for k in p["key"]], "skipped": sum(p["skipped"] for p in parts)}
    for name in parts[0]:
        if name not in out:
            out[name] = (torch.cat if isinstance(parts[0][name], torch.Tensor) else np.concatenate)(
                [p[name] for p in parts])
    return out


# ------------------------------------------------------------------------------------------- decode
class Decoder:
    """Raw samples -> Items, and a shard's positions -> a Read: Columns through the shard's index where the
    block fast path takes them (ImageSpec.decode_block), else Items one by one. A sample that cannot be
    decoded raises ShardFormatError naming the shard and key (on_error=raise) or is logged and lost (None)."""

    def __init__(self, image: ImageSpec, shape: tuple[int, int, int] | None, on_error: str):
        self.image, self.shape, self.on_error = image, shape, on_error

    def item(self, raw: dict | None, url: str) -> Item | None:
        if raw is None:
            return None
        try:
            image, label, factors = self.image.decode(raw)
            if self.shape is not None and tuple(image.shape) != self.shape:
                raise ValueError(f"image shape {tuple(image.shape)} after conversion, expected {self.shape}; set "
                                 "data.image_size and data.channels to bring every image to one shape")
            return Item(raw["__key__"], image, label, factors)
        except (ValueError, KeyError) as e:
            message = f"{url}: sample {raw.get('__key__')!r}: {e}"
            if self.on_error == "raise":
                raise shards.ShardFormatError(message) from None
            log.warning("skipping sample: %s", message)
            return None

    def read(self, reader: Reader, shard: int, lo: int, hi: int, keep: np.ndarray | None = None) -> Read:
        """Positions lo .. hi-1 of a shard: as arrays through the shard's index where that works, else
        decoded sample by sample (from the indexed bytes, or parsed from the tar stream); where `keep` (a mask
        over the positions) is given, only those are decoded one by one (the others come back as None)."""
        url = reader.urls[shard]
        block = reader.block(shard, lo, hi)
        raws = reader.read(shard, lo, hi) if block is None else None
        if block is not None:
            columns = self.image.decode_block(block, self.shape)
            if columns is not None:
                return columns
            raws = block.raws()
        if keep is None:
            return [self.item(raw, url) for raw in raws]
        return [self.item(raw, url) if k else None for raw, k in zip(raws, keep)]

    def positions(self, reader: Reader, counts: np.ndarray, order: np.ndarray, lo: int, hi: int,
                  keep: np.ndarray | None = None) -> Read:
        """Positions lo .. hi-1 of the shards concatenated in `order` (wrapping modulo the total); `keep`: a
        mask over them, as in `read`."""
        parts, at = [], lo
        for shard, a, b in layout.segments(counts, order, lo, hi):
            parts.append(self.read(reader, shard, a, b, None if keep is None else keep[at - lo:at - lo + b - a]))
            at += b - a
        return join(parts)


def as_items(read: Read) -> list[Item | None]:
    return read.items() if isinstance(read, Columns) else read


def join(parts: list[Read]) -> Read:
    """The reads of consecutive segments as one: arrays when every part is, else items."""
    if parts and all(isinstance(p, Columns) for p in parts):
        joined = Columns.concat(parts)
        if joined is not None:
            return joined
    return [it for p in parts for it in as_items(p)]


def columns_of(items: list[Item | None]) -> Columns | None:
    """Items as Columns, or None when they are not alike (a lost sample, labels or factors in some only,
    several shapes): left to the stream, which fills or reports them."""
    if not items or any(it is None for it in items):
        return None
    first = items[0]
    if any(it.image.shape != first.image.shape or (it.label is None) != (first.label is None)
           or (it.factors is None) != (first.factors is None)
           or (it.factors is not None and it.factors.shape != first.factors.shape)
           for it in items):
        return None
    return Columns([it.key for it in items], np.stack([it.image for it in items]),
                   None if first.label is None else np.array([it.label for it in items], dtype=np.int64),
                   None if first.factors is None else np.stack([it.factors for it in items]).astype(np.float32))


# --------------------------------------------------------------------------------------------- fill
def fill(items: list[Item | None], donors: Callable[[], list[Item]]) -> tuple[list[Item], list[bool]]:
    """Lost samples (None) replaced by repeats of the readable ones, in turn; `donors` (called only when every
    sample is lost) gives readable samples from the positions after them. Returns the items and which were
    filled. Depends on positions only, so a resumed epoch fills the same way."""
    filled = [it is None for it in items]
    if not any(filled):
        return items, filled
    good = [it for it in items if it is not None] or donors()
    out, j = [], 0
    for it in items:
        if it is None:
            it, j = good[j % len(good)], j + 1
        out.append(it)
    return out, filled


# ------------------------------------------------------------------------------------------ collate
def collate_columns(cols: Columns, idx: np.ndarray | None = None) -> dict:
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


def collate_items(items: Sequence[Item], skipped: int, origin: str, image: ImageSpec) -> dict:
    """A batch of items; labels in some only is a ShardFormatError naming `origin` and the sample."""
    batch = {"image": np.stack([it.image for it in items]), "key": [it.key for it in items], "skipped": skipped}
    if items[0].label is not None:
        if any(it.label is None for it in items):
            unlabelled = next(it.key for it in items if it.label is None)
            raise shards.ShardFormatError(
                f"{origin}: sample {unlabelled!r} has no label (data.label_keys {list(image.label_keys)}, "
                f".json field {image.label_field!r}) while others have one")
        batch["label"] = np.array([it.label for it in items], dtype=np.int64)
    if items[0].factors is not None:
        batch["factors"] = np.stack([it.factors for it in items]).astype(np.float32)
    return batch


# ----------------------------------------------------------------------------------------- transfer
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


def for_transfer(batch: dict) -> dict:
    """In a loader worker: arrays above BY_VALUE_MAX_BYTES become tensors (shared memory); the rest travel
    by value. A Batch: the pin-memory thread pins the arrays too."""
    for k, v in batch.items():
        if isinstance(v, np.ndarray) and v.nbytes > BY_VALUE_MAX_BYTES:
            batch[k] = torch.from_numpy(v)
    return Batch(batch)


def column_arrays(columns: Columns) -> dict[str, np.ndarray]:
    """The arrays of Columns by batch name (contiguous: torch.from_numpy takes no negative strides)."""
    return {name: np.ascontiguousarray(value) for name, value in
            (("image", columns.image), ("label", columns.label), ("factors", columns.factors)) if value is not None}


def torch_dtype(a: np.ndarray) -> torch.dtype:
    return torch.from_numpy(a[:0]).dtype


def rows_fit(tensors: dict[str, torch.Tensor], arrays: dict[str, np.ndarray]) -> bool:
    """Whether a shard's arrays are rows of the cache's tensors: the same names, per-row shapes and dtypes
    (copy_ would cast a dtype silently)."""
    return tensors.keys() == arrays.keys() and all(
        tuple(tensors[k].shape[1:]) == a.shape[1:] and tensors[k].dtype == torch_dtype(a) for k, a in arrays.items())


class SplitCache:
    """A split's decoded samples in canonical order (shard 0's positions, then shard 1's, ...) held by the
    training process, in its RAM or on the accelerator (data.cache). Filled by `ShardStream.fill_cache`,
    which reads every shard through the same reader and decoder as the loader workers (with the same
    checks); batches are then rows of it, chosen by the same layout, so they are the stream's batches.
    `pin`: a host cache builds each batch in page-locked memory (set for CUDA runs with data.pin_memory), so
    the copy to the GPU is asynchronous; pageable memory makes `non_blocking=True` wait for the copy. The
    cache itself stays pageable: page-locking a whole split takes that much RAM from the OS for nothing."""

    pin = False

    def __init__(self, counts, device: torch.device | str | None = None, columns: Columns | None = None):
        """An empty cache of sum(counts) rows on `device` that `put` fills shard by shard (`columns`: all rows at
        once). Its tensors are allocated once, at the first put, where they stay: host memory holds one
        shard's decoded arrays besides them (concatenating the shards first held the split twice in host
        RAM, and a device cache went through both copies)."""
        counts = np.asarray(counts, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.device = torch.device(device or "cpu")
        self.total, self.filled = int(counts.sum()), 0
        self.keys = np.empty(self.total, dtype=object)
        self.tensors: dict[str, torch.Tensor] = {}
        if columns is not None and not self.put(columns):
            raise ValueError(f"{len(columns)} rows do not fit a cache of {self.total}")

    def put(self, columns: Columns | None) -> bool:
        """Copy the next shard's rows in after the ones before; False when they do not fit those (other
        members, per-row shapes or dtypes; more rows than the counts) or are None (samples not alike): the
        stream serves such a split."""
        if columns is None:
            return False
        arrays = column_arrays(columns)
        if not self.tensors:
            self.tensors = {name: torch.empty((self.total, *a.shape[1:]), dtype=torch_dtype(a), device=self.device)
                            for name, a in arrays.items()}
        lo, hi = self.filled, self.filled + len(columns)
        if hi > self.total or not rows_fit(self.tensors, arrays):
            return False
        for name, a in arrays.items():  # blocking: the shard's arrays are freed right after
            self.tensors[name][lo:hi].copy_(torch.from_numpy(a))
        self.keys[lo:hi] = columns.keys
        self.filled = hi
        return True

    @property
    def complete(self) -> bool:
        return bool(self.tensors) and self.filled == self.total

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


# ------------------------------------------------------------------------------------------- stream
class ShardStream(IterableDataset):
    """One rank's batches of one split: the stages above, composed per case (counts known: training or
    val/test; counts unknown: streaming; data.cache)."""

    def __init__(self, source: SplitSource, spec: StreamSpec):
        self.source, self.spec = source, spec
        self.checks = ShardChecks(source.counts, source.digests if spec.verify_checksums else None)
        shape = spec.shape if spec.shape is not None else source.shape
        self.decoder = Decoder(spec.image, tuple(shape) if shape else None, spec.on_error)
        self.num_batches = spec.num_batches
        self.epoch, self.start = 0, 0
        self._iterated = False
        self.cache: SplitCache | None = None  # set: training batches come from it, in the training process
        if not spec.train and source.counts is not None:  # exact split of the val/test samples
            self.range = layout.eval_range(source.total, spec.world_size, spec.rank)
            self.num_batches = layout.eval_num_batches(*self.range, spec.batch_size)

    def set_position(self, epoch: int, start: int) -> None:
        """Called in the main process before workers start: new workers copy it."""
        self.epoch, self.start, self._iterated = epoch, start, False

    def _reader(self) -> Reader:
        return Reader(self.source.urls, self.spec.on_error, self.checks, self.spec.read_timeout)

    def __iter__(self) -> Iterator[dict]:
        if self._iterated:  # a persistent worker's copy: each further pass is the next epoch, from batch 0
            self.epoch, self.start = self.epoch + 1, 0
        self._iterated = True
        if self.cache is not None:
            yield from self._cached_batches()
            return
        info = get_worker_info()
        w, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.spec.lanes:
            raise RuntimeError(f"ShardStream built for {self.spec.lanes} lanes runs in {workers} workers")
        lane = layout.worker_lane(self.start, w, self.spec.lanes)
        reader = self._reader()
        try:
            if self.source.counts is None:
                batches = self._stream_batches(reader, lane)
            elif self.spec.train:
                batches = self._train_batches(reader, lane)
            else:
                batches = self._eval_batches(reader, lane)
            for batch in batches:
                yield for_transfer(batch) if info is not None else Batch(batch)
        finally:
            reader.close()

    # ---- plan: which positions a lane reads, which batches each block hands out
    def _blocks(self, lane: int, key_base: int) -> Iterator[layout.Block]:
        """A streaming slot's shuffle blocks (counts unknown)."""
        s = self.spec
        return layout.lane_blocks(lane=lane, lanes=s.lanes, num_batches=self.num_batches, batch_size=s.batch_size,
                                  block=s.block, start=self.start, seed=s.seed, epoch=self.epoch, shuffle=s.shuffle,
                                  key_base=key_base)

    def _train_plan(self) -> TrainPlan:
        s = self.spec
        counts = np.asarray(self.source.counts, dtype=np.int64)
        canon = layout.Canon(s.parts, s.batch_size * s.world_size, self.num_batches, s.shuffle_buffer)
        return TrainPlan(canon, counts, layout.shard_order(s.seed, self.epoch, len(counts)))

    def _slices(self, plan: TrainPlan) -> list[tuple[int, int, int]]:
        return layout.rank_parts(self.spec.rank, self.spec.world_size, plan.canon.parts, plan.canon.part_batch)

    def _step_blocks(self, plan: TrainPlan, steps: Sequence[int],
                     load: Callable[[int, int, int, int, int], Any]) -> Iterator[tuple[int, list]]:
        """Each step with [(its block of the partition, a, z) for each (partition, a, z) this rank takes]: a
        block is load(slice index, partition, block, a, z), called once, when the steps first reach it (one
        held per partition; the streamed reads and the cache's rows share this walk)."""
        slices, held = self._slices(plan), {}
        for i in steps:
            k, pieces = plan.canon.step_block(i), []
            for slot, (part, a, z) in enumerate(slices):
                if part not in held or held[part][0] != k:
                    held[part] = (k, load(slot, part, k, a, z))
                pieces.append((held[part][1], a, z))
            yield i, pieces

    # ---- the in-memory cache (data.cache)
    def fill_cache(self, device: torch.device | str | None = None) -> SplitCache | None:
        """Read and decode every sample of the split, shard by shard, through the loader's reader (sha256 and
        count checks included) into a SplitCache on `device`, one shard's arrays in host memory at a time;
        None where the stream must serve the batches instead: unknown counts (streaming), or samples that could
        not be read or decoded alike."""
        if self.source.counts is None:
            return None
        cache = SplitCache(self.source.counts, device)
        reader = self._reader()
        try:
            for shard, count in enumerate(self.source.counts):
                if count and not cache.put(self._shard_columns(reader, shard, count)):
                    return None
        finally:
            reader.close()
        return cache if cache.complete else None

    def _shard_columns(self, reader: Reader, shard: int, count: int) -> Columns | None:
        """A whole shard, read and decoded, as Columns; None when its samples are not alike (or some are lost)."""
        read = self.decoder.read(reader, shard, 0, count)
        reader.finish()
        return read if isinstance(read, Columns) else columns_of(read)

    def _cached_batches(self) -> Iterator[dict]:
        """The epoch's batches from `start`, from the cache: the rows the layout gives each step, the same
        samples the loader workers would read (the lanes only decide who reads, not what)."""
        if not self.spec.train:
            raise RuntimeError("the cache serves training batches only")
        plan = self._train_plan()
        canon = plan.canon

        def block_rows(slot: int, part: int, k: int, a: int, z: int) -> tuple[np.ndarray, np.ndarray]:
            lo, hi = canon.block_range(k)
            base = part * canon.part_length
            rows = self.cache.rows(layout.segments(plan.counts, plan.order, base + lo, base + hi))
            return rows, canon.block_order(self.spec.seed, self.epoch, part, k) - lo

        for i, pieces in self._step_blocks(plan, range(self.start, canon.num_steps), block_rows):
            where = canon.step_slice(i)
            yield self.cache.batch(np.concatenate([rows[order[where][a:z]] for (rows, order), a, z in pieces]))

    # ---- sample counts known
    def _emit(self, read: Read, blk: layout.Block, donors: Callable[[], list[Item]]) -> Iterator[dict]:
        """fill + collate: a streaming block's batches."""
        if isinstance(read, Columns):  # every sample read and decoded: nothing to fill
            for idx in blk.batches:
                yield collate_columns(read, idx)
            return
        items, filled = fill(read, donors)
        for idx in blk.batches:
            yield collate_items([items[i] for i in idx], sum(filled[i] for i in idx), self.source.origin,
                                self.spec.image)

    def _train_donors(self, plan: TrainPlan, pos: int) -> list[Item]:
        """Readable samples for a block with none: the first after epoch position `pos` (wrapping), read block
        by block by a reader of their own."""
        reader, total, block = self._reader(), int(plan.counts.sum()), plan.canon.block
        try:
            for lo in range(pos, pos + total, block):
                read = self.decoder.positions(reader, plan.counts, plan.order, lo, min(lo + block, pos + total))
                good = [it for it in as_items(read) if it is not None]
                if good:
                    return good
        finally:
            reader.close()
        raise shards.ShardFormatError(f"{self.source.origin}: no readable training sample at all")

    def _read_block(self, reader: Reader, plan: TrainPlan, part: int, k: int, lane: int, a: int, z: int,
                    last: bool) -> BlockRead:
        """Block k of partition `part`: the samples a .. z-1 of every step of this lane in it (also those
        before `start`: a resumed lane decodes and fills as the uninterrupted one did)."""
        canon, s = plan.canon, self.spec
        lo, hi = canon.block_range(k)
        order = canon.block_order(s.seed, self.epoch, part, k)
        kept = np.sort(np.concatenate([order[canon.step_slice(j)][a:z] for j in canon.block_steps(k)
                                       if j % s.lanes == lane]))
        keep = np.zeros(hi - lo, dtype=bool)
        keep[kept - lo] = True
        base = part * canon.part_length
        read = self.decoder.positions(reader, plan.counts, plan.order, base + lo, base + hi, keep)
        if last:  # the lane's last read of this partition: finish verifying its shard before these samples go out
            reader.finish()
        donors = lambda: self._train_donors(plan, base + hi)  # noqa: E731
        return BlockRead(read, lo, order, kept, donors, self.source.origin, s.image)

    def _train_batches(self, reader: Reader, lane: int) -> Iterator[dict]:
        plan = self._train_plan()
        canon, s = plan.canon, self.spec
        steps = layout.lane_steps(self.start, lane, s.lanes, canon.num_steps)
        if not steps:
            return
        # a reader per partition: each reads its own range of positions in order
        readers = [reader] + [self._reader() for _ in self._slices(plan)[1:]]
        last_block = canon.step_block(steps[-1])

        def read(slot: int, part: int, k: int, a: int, z: int) -> BlockRead:
            return self._read_block(readers[slot], plan, part, k, lane, a, z, k == last_block)

        try:
            for i, pieces in self._step_blocks(plan, steps, read):
                yield concat_batches([block.batch(canon.step_slice(i), a, z) for block, a, z in pieces])
        finally:
            for extra in readers[1:]:
                extra.close()

    def _eval_batches(self, reader: Reader, lane: int) -> Iterator[dict]:
        counts = np.asarray(self.source.counts, dtype=np.int64)
        order = np.arange(len(counts))
        s = self.spec
        batches = layout.eval_batches(*self.range, lane=lane, lanes=s.lanes, batch_size=s.batch_size)
        for j, (a, b) in enumerate(batches):
            read = self.decoder.positions(reader, counts, order, a, b)
            if j == len(batches) - 1:  # the lane's last read: finish verifying its shard first
                reader.finish()
            if isinstance(read, Columns):
                yield collate_columns(read)
                continue
            good = [it for it in read if it is not None]
            if good:
                yield collate_items(good, len(read) - len(good), self.source.origin, s.image)

    # ---- streaming (sample counts unknown)
    def _stream_raws(self, reader: Reader, lane: int) -> Iterator[tuple[dict | None, str]]:
        """This slot's raw samples and their shards' URLs, cycling through the epoch for training."""
        s = self.spec
        slot = layout.slot_of(s.rank, lane, s.lanes)
        cycle = 0
        while True:
            urls, stride, offset = layout.stream_cycle(len(self.source.urls), slot=slot, slots=s.world_size * s.lanes,
                                                       seed=s.seed, epoch=self.epoch, cycle=cycle, permute=s.train)
            produced = i = 0
            for shard in urls:
                for raw in reader.read(shard, 0, None):
                    if i % stride == offset:
                        produced += 1
                        yield raw, self.source.urls[shard]
                    i += 1
            if not s.train:
                return
            if produced == 0:
                raise shards.ShardFormatError(f"{self.source.origin}: slot {slot} read no samples in a full "
                                              "pass; the shards are empty or unreadable")
            cycle += 1

    def _stream_donors(self, lane: int, pos: int) -> list[Item]:
        """A readable sample for an unreadable block: the slot's stream after position `pos`."""
        for i, (raw, url) in enumerate(self._stream_raws(self._reader(), lane)):
            if i >= pos and (it := self.decoder.item(raw, url)) is not None:
                return [it]
            if i >= pos + 100 * self.spec.block:
                break
        raise shards.ShardFormatError(f"{self.source.origin}: no readable training sample at all")

    def _stream_batches(self, reader: Reader, lane: int) -> Iterator[dict]:
        s = self.spec
        raws = self._stream_raws(reader, lane)
        if not s.train:
            items: list[Item] = []
            for raw, url in raws:
                it = self.decoder.item(raw, url)
                if it is not None:
                    items.append(it)
                if len(items) == s.batch_size:
                    yield collate_items(items, 0, self.source.origin, s.image)
                    items = []
            if items:
                yield collate_items(items, 0, self.source.origin, s.image)
            return
        pos = 0  # samples of the slot's stream consumed so far
        for blk in self._blocks(lane, key_base=layout.stream_key_base(s.rank, lane, s.lanes)):
            for _ in range(blk.lo - pos):  # resume: skip whole blocks undecoded
                next(raws)
            items = [self.decoder.item(*next(raws)) for _ in range(blk.hi - blk.lo)]
            pos = blk.hi
            yield from self._emit(items, blk, lambda hi=blk.hi: self._stream_donors(lane, hi))
