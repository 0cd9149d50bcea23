"""WebDataset streaming for training: shard sources, the rank/worker split, equal batches, exact resume.

    dm = ShardDataModule(cfg.data)       # cfg.data: DataConfig; dm.input_shape -> (C, H, W) right away
    trainer.fit(model, datamodule=dm)    # setup() takes world size and rank from the trainer

    python -m pipeline.data.datamodule --root data/dsprites --batches 300    # loader samples/s on this machine

Batches are dicts: "image" uint8 [B, C, H, W] (the model converts to float on its device), "label" int64 [B]
and "factors" float32 [B, F] when the shards have them, "key" list[str], "skipped" int (samples of this batch
that were unreadable and replaced, data.on_error=warn; logged by callbacks.DataErrorCounter). They are built
inside the loader workers (DataLoader(batch_size=None)).

Design, per split and epoch e (B = data.batch_size, W = max(1, data.num_workers), R = world size):
- Train, shard sample counts known (a manifest): the shard order is permuted from (seed, e) and the shards'
  concatenation read as one global sample sequence. Each rank gets exactly N batches of B samples,
  N = data.steps_per_epoch or floor(total / (R * B)): rank r owns positions [r*N*B, (r+1)*N*B) (positions
  past `total`, possible only with a larger explicit steps_per_epoch, wrap around). Equal batches by
  construction, whatever the shard sizes or count: fewer shards than R * W is fine.
- Workers: batch i of the rank's epoch belongs to lane i % W; lanes are contiguous runs of the rank's range
  in lane order. PyTorch's DataLoader takes batches round-robin from its workers, so when an epoch starts at
  batch `start`, worker w serves lane (start + w) % W from that lane's next batch, and the main process sees
  batches start, start + 1, ... in order. Mid-epoch resume is just `start` = batches already handed out.
  A worker opens only the shards its lane overlaps and skips to its offset.
- Shuffle: within a lane, blocks of K samples (data.shuffle_buffer rounded to a multiple of B) are permuted
  with a seed from (seed, e, block position). Unlike a rolling buffer per worker, a block's content depends
  only on positions, so a resumed epoch re-reads at most one block and yields identical batches.
- Val/test: no shuffle. Rank r reads positions [r*T//R, (r+1)*T//R): every sample exactly once per run,
  ranks may differ by one batch, the last batch may be short (the LightningModule sums, never averages
  per rank).
- Sources without sample counts (a URL or pattern with no manifest.json next to it): train needs
  data.steps_per_epoch. Slot s = r * W + lane reads shards s, s + R*W, ... of each (seed, e, cycle)
  permutation, cycling until its N-batch quota is met; with fewer shards than R * W every slot reads every
  shard and keeps every (R*W)-th sample. Val reads the same split once, without cycling.
- Errors: data.on_error=raise stops with the shard's name. warn logs, counts (batch["skipped"], and the
  running total `ShardDataModule.skipped_samples`) and, in training, fills each lost sample with a repeat of
  a readable sample of the same shuffle block (a block with none borrows from the positions after it), so
  every rank still yields N full batches and resume stays exact. Val/test drop lost samples instead.
- Loader workers are persistent (a digits epoch is shorter than forking them) and forked where possible
  (inside spawned ranks the default would be spawn, which re-imports torch and Lightning per worker).
- Resume: `ShardLoader.state_dict()` = {epoch, batches_done, world_size, num_workers, seed, batch_size,
  num_batches}; Lightning saves it in checkpoints and loads it before iterating. A different world size,
  worker count, seed, batch size or epoch length restarts the interrupted epoch from its first batch, with
  a warning (an epoch that had finished simply moves on to the next one).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import multiprocessing
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data import shards

log = logging.getLogger(__name__)

Item = Tuple[str, np.ndarray, Optional[int], Optional[np.ndarray]]  # key, image, label, factors


class DataSetupError(ValueError):
    """A data source or split that cannot work as configured; the message says what to change."""


# -------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class SplitSource:
    """The shards of one split: URLs in canonical order, their sample counts when known."""

    split: str
    origin: str  # what the config said, for messages
    urls: Tuple[str, ...]
    counts: Optional[Tuple[int, ...]]  # None: no manifest, counts unknown
    shape: Optional[Tuple[int, int, int]]

    @property
    def total(self) -> Optional[int]:
        return None if self.counts is None else sum(self.counts)


def _from_manifest(path: Path, split: str, origin: str) -> Optional[SplitSource]:
    manifest = shards.load_manifest(path)
    entry = manifest["splits"].get(split)
    if entry is None:
        return None
    names = [s["name"] for s in entry["shards"]]
    urls = tuple(n if "://" in n or n.startswith("pipe:") else str(path.parent / n) for n in names)
    shape = tuple(entry.get("shape") or manifest.get("shape") or ()) or None
    return SplitSource(split, origin, urls, tuple(int(s["samples"]) for s in entry["shards"]), shape)


def _sibling_counts(urls: Sequence[str]) -> Tuple[Optional[Tuple[int, ...]], Optional[tuple]]:
    """Counts from a manifest.json next to local shards (any split), if it names every shard."""
    if any(":" in u.split("/")[0] for u in urls):  # pipe:, http:, ... : no sibling to look at
        return None, None
    path = Path(urls[0]).parent / shards.MANIFEST
    if not path.is_file():
        return None, None
    manifest = shards.load_manifest(path)
    known = {s["name"]: int(s["samples"]) for e in manifest["splits"].values() for s in e["shards"]}
    if not all(Path(u).name in known for u in urls):
        return None, None
    shape = tuple(manifest["shape"]) if manifest.get("shape") else None
    return tuple(known[Path(u).name] for u in urls), shape


def resolve_source(spec: Optional[str], split: str, root: str) -> Optional[SplitSource]:
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
    counts, shape = _sibling_counts(urls)
    return SplitSource(split, origin, tuple(urls), counts, shape)


def _peek_shape(source: SplitSource) -> Tuple[int, int, int]:
    import webdataset as wds

    stream = wds.gopen(source.urls[0], "rb")
    try:
        for raw in shards.iter_tar_samples(stream, source.urls[0]):
            return tuple(shards.decode_sample(raw)[0].shape)
    finally:
        stream.close()
    raise DataSetupError(f"{source.urls[0]}: first shard of {source.origin} holds no samples")


# ------------------------------------------------------------------------------------------- layout
def lane_sizes(num_batches: int, lanes: int) -> List[int]:
    """Batches per lane when batch i belongs to lane i % lanes."""
    return [len(range(lane, num_batches, lanes)) for lane in range(lanes)]


def lane_batches_before(start: int, lane: int, lanes: int) -> int:
    """How many of batches 0 .. start-1 belong to `lane`."""
    return len(range(lane, start, lanes))


def _seed(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) % (1 << 63) for p in parts])


class _Reader:
    """Sequential access to one worker's shards; keeps the current shard open across reads."""

    def __init__(self, urls: Sequence[str], on_error: str):
        self.urls, self.on_error = urls, on_error
        self.shard: Optional[int] = None
        self.pos = 0  # position of the next sample of the open shard
        self.it: Optional[Iterator] = None  # None once the shard is exhausted or broken
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
        except Exception as e:  # missing file, failing pipe or download
            self._fail(f"{self.urls[shard]}: cannot open: {e}")

    def _fail(self, message: str) -> None:
        if self.on_error == "raise":
            raise shards.ShardFormatError(message)
        log.warning("skipping unreadable data: %s", message)
        self.it, self.broken = None, True  # the rest of this shard is lost

    def _next(self) -> Optional[dict]:
        if self.it is None:
            return None
        try:
            return next(self.it)
        except StopIteration:
            self.it = None
        except shards.ShardFormatError as e:
            self._fail(str(e))
        return None

    def read(self, shard: int, lo: int, hi: Optional[int]) -> Iterator[Optional[dict]]:
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


def _segments(counts: np.ndarray, order: np.ndarray, lo: int, hi: int) -> List[Tuple[int, int, int]]:
    """(shard, first, stop) pieces of global positions [lo, hi) of the concatenation of shards in `order`;
    positions wrap modulo the total."""
    sizes = counts[order]
    cum = np.concatenate([[0], np.cumsum(sizes)])
    total = int(cum[-1])
    out = []
    while lo < hi:
        base = (lo // total) * total
        p, end = lo - base, min(hi - base, total)
        i = int(np.searchsorted(cum, p, side="right")) - 1
        stop = min(end, int(cum[i + 1]))
        out.append((int(order[i]), p - int(cum[i]), stop - int(cum[i])))
        lo = base + stop
    return out


class ShardStream(IterableDataset):
    """One rank's batches of one split; see the module docstring for the layout."""

    def __init__(self, source: SplitSource, *, train: bool, batch_size: int, world_size: int, rank: int,
                 lanes: int, seed: int, shuffle_buffer: int, num_batches: Optional[int], on_error: str):
        self.source, self.train, self.batch_size = source, train, batch_size
        self.world_size, self.rank, self.lanes, self.seed = world_size, rank, lanes, seed
        self.on_error, self.num_batches = on_error, num_batches
        self.block = batch_size * max(1, round(shuffle_buffer / batch_size)) if train else batch_size
        self.shuffle = train and shuffle_buffer > 0
        self.epoch, self.start = 0, 0
        self._iterated = False
        if not train and source.counts is not None:  # exact split of the val/test samples
            total = source.total
            self.range = (rank * total // world_size, (rank + 1) * total // world_size)
            self.num_batches = math.ceil((self.range[1] - self.range[0]) / batch_size)

    def set_position(self, epoch: int, start: int) -> None:
        """Called in the main process before workers start: new workers copy it."""
        self.epoch, self.start, self._iterated = epoch, start, False

    def __iter__(self) -> Iterator[dict]:
        if self._iterated:  # a persistent worker's copy: each further pass is the next epoch, from batch 0
            self.epoch, self.start = self.epoch + 1, 0
        self._iterated = True
        info = get_worker_info()
        w, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.lanes:
            raise RuntimeError(f"ShardStream built for {self.lanes} lanes runs in {workers} workers")
        lane = (self.start + w) % self.lanes
        reader = _Reader(self.source.urls, self.on_error)
        try:
            if self.source.counts is None:
                yield from self._batches_streaming(reader, lane)
            elif self.train:
                yield from self._train_batches(reader, lane)
            else:
                yield from self._eval_batches(reader, lane)
        finally:
            reader.close()

    # ---- items and batches
    def _decode(self, raw: Optional[dict]) -> Optional[Item]:
        if raw is None:
            return None
        try:
            image, label, factors = shards.decode_sample(raw)
            if self.source.shape is not None and tuple(image.shape) != tuple(self.source.shape):
                raise ValueError(f"image shape {tuple(image.shape)}, expected {tuple(self.source.shape)}")
            return raw["__key__"], image, label, factors
        except (ValueError, KeyError) as e:
            message = f"sample {raw.get('__key__')!r}: {e}"
            if self.on_error == "raise":
                raise shards.ShardFormatError(message) from None
            log.warning("skipping sample: %s", message)
            return None

    def _collate(self, items: List[Item], skipped: int) -> dict:
        batch = {"image": torch.from_numpy(np.stack([it[1] for it in items])),
                 "key": [it[0] for it in items], "skipped": skipped}
        if items[0][2] is not None:
            if any(it[2] is None for it in items):
                raise shards.ShardFormatError(f"{self.source.origin}: some samples lack label.cls")
            batch["label"] = torch.tensor([it[2] for it in items], dtype=torch.int64)
        if items[0][3] is not None:
            batch["factors"] = torch.from_numpy(np.stack([it[3] for it in items]).astype(np.float32))
        return batch

    def _fill(self, items: List[Optional[Item]], more: Callable[[], List[Item]]) -> Tuple[List[Item], List[bool]]:
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

    def _emit_block(self, items: List[Optional[Item]], block_pos: int, drop: int,
                    more: Callable[[], List[Item]]) -> Iterator[dict]:
        items, filled = self._fill(items, more)
        if self.shuffle:
            perm = _seed(self.seed, self.epoch, block_pos).permutation(len(items))
            items, filled = [items[i] for i in perm], [filled[i] for i in perm]
        for b in range(drop, len(items), self.batch_size):
            yield self._collate(items[b:b + self.batch_size], sum(filled[b:b + self.batch_size]))

    def _train_batches(self, reader: _Reader, lane: int) -> Iterator[dict]:
        B, sizes = self.batch_size, lane_sizes(self.num_batches, self.lanes)
        length = sizes[lane] * B
        lane_pos = self.rank * self.num_batches * B + B * sum(sizes[:lane])
        first = lane_batches_before(self.start, lane, self.lanes) * B
        counts = np.asarray(self.source.counts, dtype=np.int64)
        order = _seed(self.seed, self.epoch).permutation(len(counts))

        def read(lo: int, hi: int, rd: _Reader = reader) -> List[Optional[Item]]:
            return [self._decode(raw) for shard, a, b in _segments(counts, order, lo, hi)
                    for raw in rd.read(shard, a, b)]

        def lookahead(pos: int) -> List[Item]:  # donors for a block with no readable sample
            rd, total = _Reader(self.source.urls, self.on_error), int(counts.sum())
            try:
                for lo in range(pos, pos + total, self.block):
                    good = [it for it in read(lo, min(lo + self.block, pos + total), rd) if it is not None]
                    if good:
                        return good
            finally:
                rd.close()
            raise shards.ShardFormatError(f"{self.source.origin}: no readable training sample at all")

        for lo in range((first // self.block) * self.block, length, self.block):
            hi = min(length, lo + self.block)
            yield from self._emit_block(read(lane_pos + lo, lane_pos + hi), lane_pos + lo, max(0, first - lo),
                                        lambda: lookahead(lane_pos + hi))

    def _eval_batches(self, reader: _Reader, lane: int) -> Iterator[dict]:
        B, (lo, hi) = self.batch_size, self.range
        sizes = lane_sizes(self.num_batches, self.lanes)
        first_batch = sum(sizes[:lane])  # lane's batches, in sample order
        counts = np.asarray(self.source.counts, dtype=np.int64)
        order = np.arange(len(counts))
        for j in range(sizes[lane]):
            a = lo + (first_batch + j) * B
            b = min(hi, a + B)
            items = [self._decode(r) for s, x, y in _segments(counts, order, a, b) for r in reader.read(s, x, y)]
            good = [it for it in items if it is not None]
            if good:
                yield self._collate(good, len(items) - len(good))

    def _stream_items(self, reader: _Reader, lane: int) -> Iterator[Optional[dict]]:
        """Streaming mode (no counts): this slot's raw samples, cycling through the epoch for training."""
        slots = self.world_size * self.lanes
        slot = self.rank * self.lanes + lane
        n = len(self.source.urls)
        cycle = 0
        while True:
            order = _seed(self.seed, self.epoch, cycle).permutation(n) if self.train else np.arange(n)
            produced = 0
            if n >= slots:
                for s in order[slot::slots]:
                    for raw in reader.read(int(s), 0, None):
                        produced += 1
                        yield raw
            else:  # sample-level split: every slot reads every shard and keeps its residue class
                i = 0
                for s in order:
                    for raw in reader.read(int(s), 0, None):
                        if i % slots == slot:
                            produced += 1
                            yield raw
                        i += 1
            if not self.train:
                return
            if produced == 0:
                raise shards.ShardFormatError(f"{self.source.origin}: slot {slot} read no samples in a full "
                                              "pass; the shards are empty or unreadable")
            cycle += 1

    def _batches_streaming(self, reader: _Reader, lane: int) -> Iterator[dict]:
        stream = self._stream_items(reader, lane)
        if not self.train:
            items: List[Item] = []
            for raw in stream:
                it = self._decode(raw)
                if it is not None:
                    items.append(it)
                if len(items) == self.batch_size:
                    yield self._collate(items, 0)
                    items = []
            if items:
                yield self._collate(items, 0)
            return
        B = self.batch_size
        length = lane_sizes(self.num_batches, self.lanes)[lane] * B
        first = lane_batches_before(self.start, lane, self.lanes) * B
        lo = (first // self.block) * self.block
        for _ in range(lo):  # resume: skip whole blocks undecoded
            next(stream)
        slot_pos = (self.rank * self.lanes + lane) << 40  # distinct block seeds per slot

        def more(pos: int) -> List[Item]:  # donors for an unreadable block: the stream after it
            ahead = self._stream_items(_Reader(self.source.urls, self.on_error), lane)
            for i, raw in enumerate(ahead):
                if i >= pos and (it := self._decode(raw)) is not None:
                    return [it]
                if i >= pos + 100 * self.block:
                    break
            raise shards.ShardFormatError(f"{self.source.origin}: no readable training sample at all")

        while lo < length:
            hi = min(length, lo + self.block)
            items = [self._decode(next(stream)) for _ in range(hi - lo)]
            yield from self._emit_block(items, slot_pos + lo, max(0, first - lo), lambda: more(hi))
            lo = hi


# ------------------------------------------------------------------------------------------- loader
def _passthrough(batch: dict) -> dict:
    return batch


# SLURM signals every process of a job step, loader workers included (`--signal=USR1@90`, `scancel -s`),
# and a terminal's Ctrl-C reaches the whole process group. These belong to the training process: a worker
# ignores them, or it would die of USR1 (crashing the run) or run the trainer's handler it inherited at
# fork (a checkpoint from inside the worker that blocks in a collective: a hung job). SIGTERM goes back to
# its default, so a worker never runs the trainer's SIGTERM handler (a broadcast) and still ends when
# PyTorch terminates it on shutdown.
WORKER_IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGINT)
WORKER_DEFAULT_SIGNALS = (signal.SIGTERM,)
_WORKER_SIGNALS = set(WORKER_IGNORED_SIGNALS + WORKER_DEFAULT_SIGNALS)


def worker_init(worker_id: int) -> None:
    """Runs first in each loader worker. The workers were forked with these signals blocked (see
    ShardLoader.__iter__), so one that arrived in between is still pending and is now discarded."""
    for sig in WORKER_IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    for sig in WORKER_DEFAULT_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_SIGNALS)


STATE_CHECKED = ("world_size", "num_workers", "seed", "batch_size", "num_batches")


class ShardLoader(DataLoader):
    """DataLoader over a ShardStream that knows its epoch and how many batches it handed out.

    Each `iter()` starts the next epoch (the first starts `start_epoch`), unless `load_state_dict`
    set a position. `len()` is the full epoch length N, also when resuming mid-epoch: Lightning restores
    its own batch count and expects only the remaining batches, which is what the loader yields.
    """

    def __init__(self, stream: ShardStream, *, num_workers: int, pin_memory: bool, start_epoch: int = 0):
        # batch_size=None: batches come whole from the workers; _passthrough skips the default per-item
        # conversion, which would walk every key string
        # persistent workers: forking them each epoch costs more than a digits epoch; their copies of
        # the stream advance one epoch per pass, in step with this loader's own count
        # fork where there is one: inside spawned ranks (ddp_spawn, mp.spawn) the default is spawn, and a
        # spawned worker re-imports torch and Lightning (seconds per worker, per loader)
        context = "fork" if num_workers > 0 and "fork" in multiprocessing.get_all_start_methods() else None
        super().__init__(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=num_workers > 0, collate_fn=_passthrough,
                         multiprocessing_context=context, worker_init_fn=worker_init)
        self.epoch, self.batches_done = start_epoch, 0
        self.skipped_samples = 0
        self._started = False
        self._resume: Optional[Tuple[int, int]] = None

    def __len__(self) -> int:
        if self.dataset.num_batches is None:
            raise TypeError("batch count unknown: the source has no sample counts")
        return self.dataset.num_batches

    def __iter__(self) -> Iterator[dict]:
        if self._resume is not None:
            (epoch, start), self._resume = self._resume, None
        else:
            epoch, start = (self.epoch + 1 if self._started else self.epoch), 0
        self._started = True
        self.epoch, self.batches_done = epoch, start
        self.dataset.set_position(epoch, start)
        # Workers are forked here (first epoch, or after a restart) with the training process's signal
        # handlers; block the signals across the fork so none runs in a worker before worker_init. The
        # training process still gets them: pending until the unblock, or taken by another thread.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)
        try:
            batches = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return self._count(batches)

    def _count(self, batches: Iterator[dict]) -> Iterator[dict]:
        for batch in batches:
            self.skipped_samples += batch.get("skipped", 0)
            self.batches_done += 1
            yield batch

    def _settings(self) -> dict:
        s = self.dataset
        return {"world_size": s.world_size, "num_workers": s.lanes, "seed": s.seed,
                "batch_size": s.batch_size, "num_batches": s.num_batches}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done,
                "skipped_samples": self.skipped_samples, **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        self.skipped_samples = int(state.get("skipped_samples", 0))
        mine = self._settings()
        changed = [f"{k} {state[k]} -> {mine[k]}" for k in STATE_CHECKED if k in state and state[k] != mine[k]]
        if done >= int(state.get("num_batches") or mine["num_batches"] or 0):
            self._resume = (epoch + 1, 0)  # the saved epoch had finished: start the next one normally
        elif changed:
            warnings.warn(f"data loader settings changed since the checkpoint ({', '.join(changed)}): "
                          f"restarting epoch {epoch} from its first batch instead of batch {done}; "
                          "samples of that epoch may repeat", stacklevel=2)
            self._resume = (epoch, 0)
        else:
            self._resume = (epoch, done)
        self._started = True
        self.epoch, self.batches_done = self._resume[0], self._resume[1]
        if self._iterator is not None:  # live persistent workers hold the old position: restart them
            self._iterator._shutdown_workers()
            self._iterator = None


# --------------------------------------------------------------------------------------- datamodule
class ShardDataModule(pl.LightningDataModule):
    """Train/val/test loaders over WebDataset shards, configured by a DataConfig.

    With `cfg.train` None and no `<cfg.root>/manifest.json`, the first access to the manifest prepares
    `cfg.dataset` (digits or dsprites only) under a file lock: see `pipeline.prepare.ensure_prepared`.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self._sources: Dict[str, Optional[SplitSource]] = {}
        self._loaders: List[ShardLoader] = []
        self.world_size, self.rank = 1, 0
        self.steps_per_epoch: Optional[int] = None
        self.seed = 0 if cfg.seed is None else int(cfg.seed)

    # ---- sources
    def source(self, split: str) -> Optional[SplitSource]:
        if split not in self._sources:
            spec = getattr(self.cfg, split)
            if spec is None and self.cfg.train is None:
                from pipeline.data.prepare import PrepareError, ensure_prepared
                try:
                    ensure_prepared(self.cfg)
                except PrepareError as e:
                    raise DataSetupError(str(e)) from None
            if spec is None and not (Path(self.cfg.root) / shards.MANIFEST).is_file():
                if split != "train":  # train given explicitly, nothing at root: no such split
                    log.info("data.%s not set and no %s: no %s split", split, Path(self.cfg.root) / shards.MANIFEST, split)
                    self._sources[split] = None
                    return None
                raise DataSetupError(f"data.{split} is not set and {Path(self.cfg.root) / shards.MANIFEST} "
                                     f"does not exist: set data.{split} or prepare data.root")
            try:
                self._sources[split] = resolve_source(spec, split, self.cfg.root)
            except shards.ShardFormatError as e:
                raise DataSetupError(str(e)) from None
        return self._sources[split]

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        src = self.source("train")
        if src is None:
            raise DataSetupError(f"no train split in {self.cfg.train or self.cfg.root}")
        if src.shape is None:
            self._sources["train"] = src = dataclasses.replace(src, shape=_peek_shape(src))
        return tuple(src.shape)

    def prepare_data(self) -> None:
        if self.cfg.train is None:
            from pipeline.data.prepare import ensure_prepared
            ensure_prepared(self.cfg)

    # ---- set-up
    def setup(self, stage: Optional[str] = None) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            self.world_size, self.rank = trainer.world_size, trainer.global_rank
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            self.world_size, self.rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        # our __len__ is exact by construction; Lightning warns about any IterableDataset with one
        warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
        if stage in (None, "fit"):
            self.steps_per_epoch = self._check_train()
        if stage in (None, "fit", "validate"):
            self._check_eval("val")
        if stage in (None, "test"):
            self._check_eval("test")

    def _check_train(self) -> int:
        src, B, R = self.source("train"), self.cfg.batch_size, self.world_size
        if src is None:
            raise DataSetupError(f"no train split in {self.cfg.train or self.cfg.root}")
        if src.counts is None:
            if self.cfg.steps_per_epoch is None:
                raise DataSetupError(
                    f"{src.origin}: sample counts unknown (no manifest.json next to the shards), so the "
                    "equal per-rank batch count cannot be computed: set data.steps_per_epoch (batches per "
                    "rank per epoch) or put the manifest written by `python -m pipeline.prepare` next to them")
            if len(src.urls) < R * self._lanes():
                log.info("%s: %d shards for %d ranks x %d workers: reading with a sample-level split "
                         "(every worker reads every shard); reshard into >= %d shards for less I/O",
                         src.origin, len(src.urls), R, self._lanes(), R * self._lanes())
            return int(self.cfg.steps_per_epoch)
        total = src.total
        if B * R > total:
            raise DataSetupError(
                f"data.batch_size {B} x world size {R} = {B * R} exceeds the {total} training samples in "
                f"{src.origin}: lower data.batch_size to at most {max(1, total // R)} or use fewer devices")
        full = total // (B * R)
        if self.cfg.steps_per_epoch is not None and self.cfg.steps_per_epoch > full:
            log.warning("data.steps_per_epoch %d > %d = floor(%d / (%d x %d)): samples repeat within an epoch",
                        self.cfg.steps_per_epoch, full, total, R, B)
        return int(self.cfg.steps_per_epoch or full)

    def _check_eval(self, split: str) -> None:
        src = self.source(split)
        if src is not None and src.total is not None and src.total < self.world_size:
            raise DataSetupError(f"{src.origin}: {src.total} {split} samples for {self.world_size} ranks: "
                                 f"every rank needs at least one; use fewer devices or a larger {split} split")

    def _lanes(self) -> int:
        return max(1, self.cfg.num_workers)

    def loader(self, split: str, train: bool) -> ShardLoader:
        """This rank's loader for any split: `train=True` is the shuffled, equal-batch training stream;
        `train=False` the exact, unshuffled reader that validation, test and evaluation use."""
        src = self.source(split)
        stream = ShardStream(src, train=train, batch_size=self.cfg.batch_size, world_size=self.world_size,
                             rank=self.rank, lanes=self._lanes(), seed=self.seed,
                             shuffle_buffer=self.cfg.shuffle_buffer,
                             num_batches=self.steps_per_epoch if train else None, on_error=self.cfg.on_error)
        trainer = getattr(self, "trainer", None)
        loader = ShardLoader(stream, num_workers=self.cfg.num_workers,
                             pin_memory=bool(self.cfg.pin_memory) and torch.cuda.is_available(),
                             start_epoch=trainer.current_epoch if train and trainer is not None else 0)
        self._loaders.append(loader)
        return loader

    def train_dataloader(self) -> ShardLoader:
        if self.steps_per_epoch is None:
            self.setup("fit")
        return self.loader("train", train=True)

    def val_dataloader(self):
        return self.loader("val", train=False) if self.source("val") is not None else []

    def test_dataloader(self):
        return self.loader("test", train=False) if self.source("test") is not None else []

    @property
    def skipped_samples(self) -> int:
        """Samples this rank's loaders could not read so far (data.on_error=warn)."""
        return sum(loader.skipped_samples for loader in self._loaders)


# ------------------------------------------------------------------------------------------- bench
def loader_throughput(cfg, split: str = "train", batches: int = 200, warmup: int = 5) -> dict:
    """Samples/s of one rank's loader for `cfg` (a DataConfig): times `batches` batches after `warmup`
    (worker start-up excluded), re-iterating epochs as needed. Single process, world size 1."""
    dm = ShardDataModule(cfg)
    dm.setup("fit")
    loader = dm.train_dataloader() if split == "train" else dm.loader(split, train=False)
    seen = samples = 0
    start = None
    while seen < warmup + batches:
        for batch in loader:
            seen += 1
            if seen == warmup:
                start = time.perf_counter()
            elif seen > warmup:
                samples += len(batch["key"])
            if seen >= warmup + batches:
                break
    elapsed = time.perf_counter() - start
    return {"split": split, "batches": batches, "samples": samples, "seconds": elapsed,
            "samples_per_s": samples / elapsed, "batch_size": cfg.batch_size, "num_workers": cfg.num_workers,
            "shuffle_buffer": cfg.shuffle_buffer}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from pipeline.config import DataConfig

    d = DataConfig()
    p = argparse.ArgumentParser(prog="python -m pipeline.data.datamodule", description="loader samples/s")
    p.add_argument("--root", default=d.root, help="prepared dataset directory (manifest.json)")
    p.add_argument("--dataset", default=d.dataset, help="recipe prepared into --root if it is missing")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--workers", type=int, default=d.num_workers)
    p.add_argument("--shuffle-buffer", type=int, default=d.shuffle_buffer)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--split", default="train")
    args = p.parse_args(argv)
    cfg = DataConfig(dataset=args.dataset, root=args.root, batch_size=args.batch_size,
                     num_workers=args.workers, shuffle_buffer=args.shuffle_buffer, seed=0)
    r = loader_throughput(cfg, split=args.split, batches=args.batches)
    print(f"{args.root} {args.split}: {r['samples_per_s']:.0f} samples/s ({r['samples']} samples in "
          f"{r['seconds']:.2f} s; batch {r['batch_size']}, {r['num_workers']} workers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
