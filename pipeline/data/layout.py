"""Which samples each rank, loader worker (lane) and batch gets in an epoch: pure functions of integers
(sample counts, seed, epoch, rank, world size, lanes, batch size, shuffle block, start); no files, no torch.

Per split and epoch e (G = global batch, R = world size, B = G / R per rank, W = lanes = max(1, data.num_workers)):
- Train, sample counts known (a manifest or an index): one global order, fixed by (seed, e), G and P
  canonical partitions (the world size of the run's first start), not by the world size or loader workers
  the run has now, so a run resumed on other hardware continues with the same samples in every global step
  (mosaicml streaming's "elastic determinism"; P plays the part of its num_canonical_nodes). The shard order
  is permuted from (seed, e) and the shards' concatenation read as one sequence of positions; N global steps
  per epoch (data.steps_per_epoch or floor(total / G)); partition p owns positions [p*N*b, (p+1)*N*b),
  b = G / P (past `total` they wrap around). Step i takes b samples from each partition, in partition order:
  partition p's block i*b // K (blocks of K samples, data.shuffle_buffer rounded to a multiple of b, each
  permuted with a seed from (seed, e, its first position)), its samples (i*b mod K) .. + b of the
  permutation. Rank r of R reads partitions [r*P/R, (r+1)*P/R) whole (R divides P), or slice r mod (R/P) of
  partition r // (R/P) (P divides R, which then reads R/P times the bytes it uses); other R are refused.
- Lanes: rank batch i belongs to lane i % W (the DataLoader takes batches round-robin from its workers); when
  an epoch starts at batch `start`, worker w serves lane (start + w) % W. A lane reads each block that holds
  one of its batches and decodes only the samples of its batches (all of them in that block, also those
  before `start`, so a resumed lane decodes, and fills lost samples, exactly as the uninterrupted one).
- Val/test: no shuffle. Rank r reads positions [r*T//R, (r+1)*T//R): every sample exactly once per run,
  ranks may differ by one batch, the last batch may be short.
- Counts unknown (streaming): train needs data.steps_per_epoch. Slot s = r * W + lane reads shards
  s, s + R*W, ... of each (seed, e, cycle) permutation, cycling until its N-batch quota is met; with fewer
  shards than R * W every slot reads every shard and keeps every (R*W)-th sample. Val reads the split once.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

STREAM_KEY_SHIFT = 40  # streaming blocks are seeded from (slot << 40) + position: distinct per slot


def rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) % (1 << 63) for p in parts])


# --------------------------------------------------------------------------------------------- lanes
def lane_sizes(num_batches: int, lanes: int) -> list[int]:
    """Batches per lane when batch i belongs to lane i % lanes."""
    return [len(range(lane, num_batches, lanes)) for lane in range(lanes)]


def lane_batches_before(start: int, lane: int, lanes: int) -> int:
    """How many of batches 0 .. start-1 belong to `lane`."""
    return len(range(lane, start, lanes))


def worker_lane(start: int, worker: int, lanes: int) -> int:
    """The lane loader worker `worker` serves in an epoch that starts at batch `start`."""
    return (start + worker) % lanes


# --------------------------------------------------------------------------------------------- train
def block_size(batch_size: int, shuffle_buffer: int) -> int:
    """Samples per shuffle block: data.shuffle_buffer rounded to a multiple of the batch size (>= one batch)."""
    return batch_size * max(1, round(shuffle_buffer / batch_size))


def shard_order(seed: int, epoch: int, num_shards: int) -> np.ndarray:
    """The training epoch's shard permutation (counts known)."""
    return rng(seed, epoch).permutation(num_shards)


@dataclass(frozen=True)
class Block:
    """A shuffle block of a lane: samples lo .. hi-1 of the lane (0 = its first sample of the epoch)."""

    lo: int
    hi: int
    key: int  # seeds the block's permutation: a position, so a resumed epoch draws the same one
    batches: tuple[np.ndarray, ...]  # the batches handed out, in order: indices into the block's samples


def lane_blocks(*, lane: int, lanes: int, num_batches: int, batch_size: int, block: int, start: int,
                seed: int, epoch: int, shuffle: bool, key_base: int) -> Iterator[Block]:
    """The blocks a lane reads when the epoch starts at batch `start`, and the batches each hands out.

    The lane has lane_sizes(num_batches, lanes)[lane] batches; it starts at the block that holds its first
    batch not yet handed out and drops the batches of that block handed out before `start`. A block's
    batches are consecutive runs of B of its permutation (seeded by seed, epoch and key_base + lo) when
    `shuffle`, of its samples in order otherwise."""
    length = lane_sizes(num_batches, lanes)[lane] * batch_size
    first = lane_batches_before(start, lane, lanes) * batch_size
    for lo in range((first // block) * block, length, block):
        hi, key = min(length, lo + block), key_base + lo
        order = rng(seed, epoch, key).permutation(hi - lo) if shuffle else np.arange(hi - lo)
        batches = tuple(order[b:b + batch_size] for b in range(max(0, first - lo), hi - lo, batch_size))
        yield Block(lo, hi, key, batches)


# ------------------------------------------------------------------- train, counts known: one global order
@dataclass(frozen=True)
class Canon:
    """The training epoch's global order: `parts` canonical partitions, `global_batch` samples per step,
    `num_steps` steps per epoch, shuffle blocks of `block` samples per partition (0: no shuffle)."""

    parts: int
    global_batch: int
    num_steps: int
    shuffle_buffer: int = 0

    @property
    def part_batch(self) -> int:
        return self.global_batch // self.parts

    @property
    def block(self) -> int:
        return block_size(self.part_batch, self.shuffle_buffer)

    @property
    def part_length(self) -> int:
        return self.num_steps * self.part_batch

    def step_block(self, step: int) -> int:
        """The block of each partition that step `step` takes its samples from."""
        return step * self.part_batch // self.block

    def block_range(self, k: int) -> tuple[int, int]:
        """Positions [lo, hi) of block k within a partition."""
        return k * self.block, min((k + 1) * self.block, self.part_length)

    def block_steps(self, k: int) -> range:
        lo, hi = self.block_range(k)
        return range(lo // self.part_batch, -(-hi // self.part_batch))

    def block_order(self, seed: int, epoch: int, part: int, k: int) -> np.ndarray:
        """Block k of partition `part` in hand-out order: positions within the partition."""
        lo, hi = self.block_range(k)
        if self.shuffle_buffer <= 0:
            return np.arange(lo, hi)
        return lo + rng(seed, epoch, part * self.part_length + lo).permutation(hi - lo)

    def step_slice(self, step: int) -> slice:
        """Where step `step`'s samples lie in its block's order."""
        first = step * self.part_batch - self.step_block(step) * self.block
        return slice(first, first + self.part_batch)


def rank_parts(rank: int, world_size: int, parts: int, part_batch: int) -> list[tuple[int, int, int]]:
    """(partition, a, z): rank `rank` takes samples a .. z-1 of each listed partition's b-sample step batch,
    in this order (world_size divides parts: whole partitions; parts divides world_size: one slice)."""
    if parts % world_size == 0:
        per = parts // world_size
        return [(p, 0, part_batch) for p in range(rank * per, (rank + 1) * per)]
    share = world_size // parts
    width = part_batch // share
    return [(rank // share, (rank % share) * width, (rank % share + 1) * width)]


def world_fits(world_size: int, parts: int, global_batch: int) -> bool:
    """Whether `world_size` ranks can read an order of `parts` partitions, each rank B = G / R samples."""
    return global_batch % world_size == 0 and (parts % world_size == 0 or world_size % parts == 0)


def fitting_worlds(parts: int, global_batch: int, up_to: int = 64) -> list[int]:
    return [w for w in range(1, up_to + 1) if world_fits(w, parts, global_batch)]


def lane_steps(start: int, lane: int, lanes: int, num_steps: int) -> range:
    """The epoch's rank batches (= global steps) `lane` hands out from batch `start` on."""
    return range(start + (lane - start) % lanes, num_steps, lanes)


def segments(counts: Sequence[int], order: Sequence[int], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(shard, first, stop) pieces of global positions [lo, hi) of the concatenation of shards in `order`;
    positions wrap modulo the total."""
    counts, order = np.asarray(counts, dtype=np.int64), np.asarray(order)
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


# ---------------------------------------------------------------------------------------- val / test
def eval_range(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """Positions [lo, hi) of the unshuffled split that `rank` reads: every sample once across ranks."""
    return rank * total // world_size, (rank + 1) * total // world_size


def eval_num_batches(lo: int, hi: int, batch_size: int) -> int:
    return -(-(hi - lo) // batch_size)


def eval_batches(lo: int, hi: int, *, lane: int, lanes: int, batch_size: int) -> list[tuple[int, int]]:
    """Positions [a, b) of each batch `lane` reads of the rank's range [lo, hi): lanes take contiguous
    runs of batches in lane order; only the range's last batch may be short."""
    sizes = lane_sizes(eval_num_batches(lo, hi, batch_size), lanes)
    first = sum(sizes[:lane])
    return [(lo + (first + j) * batch_size, min(hi, lo + (first + j + 1) * batch_size)) for j in range(sizes[lane])]


# ---------------------------------------------------------------------------- streaming (no counts)
def slot_of(rank: int, lane: int, lanes: int) -> int:
    """A streaming slot: one lane of one rank."""
    return rank * lanes + lane


def stream_key_base(rank: int, lane: int, lanes: int) -> int:
    """key_base of lane_blocks for a streaming slot."""
    return slot_of(rank, lane, lanes) << STREAM_KEY_SHIFT


def stream_cycle(num_shards: int, *, slot: int, slots: int, seed: int, epoch: int, cycle: int,
                 permute: bool) -> tuple[list[int], int, int]:
    """One pass of a streaming slot over the shards: (shards to read in order, stride, offset); the slot keeps
    sample i of their concatenation when i % stride == offset. With at least as many shards as slots it
    reads shards slot, slot + slots, ... of the pass's permutation and keeps every sample; with fewer,
    every slot reads every shard and keeps every slots-th sample."""
    order = rng(seed, epoch, cycle).permutation(num_shards) if permute else np.arange(num_shards)
    if num_shards >= slots:
        return [int(s) for s in order[slot::slots]], 1, 0
    return [int(s) for s in order], slots, slot
