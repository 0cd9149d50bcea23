"""Which samples each rank, loader worker (lane) and batch gets in an epoch: pure functions of integers
(sample counts, seed, epoch, rank, world size, lanes, batch size, shuffle block, start); no files, no torch.

Per split and epoch e (B = batch size, W = lanes = max(1, data.num_workers), R = world size):
- Train, sample counts known (a manifest): the shard order is permuted from (seed, e) and the shards'
  concatenation read as one sequence of positions. Each rank gets exactly N batches of B samples,
  N = data.steps_per_epoch or floor(total / (R * B)): rank r owns positions [r*N*B, (r+1)*N*B) (positions
  past `total`, possible only with a larger explicit steps_per_epoch, wrap around). Equal batches by
  construction, whatever the shard sizes or count: fewer shards than R * W is fine.
- Lanes: batch i of the rank's epoch belongs to lane i % W; lanes are contiguous runs of the rank's range
  in lane order. PyTorch's DataLoader takes batches round-robin from its workers, so when an epoch starts at
  batch `start`, worker w serves lane (start + w) % W from that lane's next batch, and the main process sees
  batches start, start + 1, ... in order. Mid-epoch resume is just `start` = batches already handed out.
- Shuffle: within a lane, blocks of K samples (data.shuffle_buffer rounded to a multiple of B) are permuted
  with a seed from (seed, e, block position). Unlike a rolling buffer per worker, a block's content depends
  only on positions, so a resumed epoch re-reads at most one block and yields identical batches.
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


def lane_span(rank: int, lane: int, num_batches: int, lanes: int, batch_size: int) -> tuple[int, int]:
    """Positions [lo, hi) of the epoch's sequence that `lane` of `rank` reads (counts known): rank r owns
    [r*N*B, (r+1)*N*B), split into contiguous runs in lane order."""
    sizes = lane_sizes(num_batches, lanes)
    lo = rank * num_batches * batch_size + batch_size * sum(sizes[:lane])
    return lo, lo + sizes[lane] * batch_size


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
