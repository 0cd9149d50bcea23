"""pipeline.data.layout: which samples each rank, lane and batch gets, checked on integers alone (no files)."""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from pipeline.data import layout as L

UNEVEN = (13, 200, 57, 31, 120, 88, 44)  # 7 shards, 553 samples (as in the loader tests)


def lane_batches(rank: int, lane: int, *, lanes: int, n: int, B: int, block: int, start: int = 0, seed: int = 0,
                 epoch: int = 0, shuffle: bool = True) -> list[list[int]]:
    """The batches (epoch positions) `lane` of `rank` hands out from batch `start`, as ShardStream builds them."""
    base, _ = L.lane_span(rank, lane, n, lanes, B)
    blocks = L.lane_blocks(lane=lane, lanes=lanes, num_batches=n, batch_size=B, block=block, start=start, seed=seed,
                           epoch=epoch, shuffle=shuffle, key_base=base)
    return [[base + blk.lo + int(i) for i in idx] for blk in blocks for idx in blk.batches]


def rank_epoch(rank: int, *, lanes: int, start: int = 0, **kw) -> list[list[int]]:
    """A rank's batches in the order its main process sees them: the DataLoader takes one batch from each
    worker in turn (dropping exhausted ones), and worker w serves lane worker_lane(start, w, lanes)."""
    its = [iter(lane_batches(rank, L.worker_lane(start, w, lanes), lanes=lanes, start=start, **kw))
           for w in range(lanes)]
    out = []
    while its:
        for it in list(its):
            batch = next(it, None)
            if batch is None:
                its.remove(it)
            else:
                out.append(batch)
    return out


def samples(counts, order, positions) -> list[tuple[int, int]]:
    """(shard, index in shard) of each position, through segments()."""
    out = []
    for p in positions:
        (shard, first, stop), = L.segments(counts, order, p, p + 1)
        assert stop == first + 1
        out.append((shard, first))
    return out


def test_lane_arithmetic():
    assert L.lane_sizes(7, 3) == [3, 2, 2] and L.lane_sizes(2, 4) == [1, 1, 0, 0]
    for n, w in itertools.product(range(12), range(1, 5)):
        for start in range(n + 1):
            assert sum(L.lane_batches_before(start, lane, w) for lane in range(w)) == start


@pytest.mark.parametrize("world,lanes,buffer", [(1, 1, 0), (1, 3, 40), (2, 2, 40), (3, 2, 100), (4, 3, 16)])
def test_every_training_position_has_exactly_one_owner(world, lanes, buffer):
    B, total = 16, sum(UNEVEN)
    n = total // (world * B)
    block = L.block_size(B, buffer)
    owners: dict = {}  # position -> (rank, lane, batch of the lane)
    for rank in range(world):
        per_lane = [lane_batches(rank, lane, lanes=lanes, n=n, B=B, block=block, shuffle=buffer > 0)
                    for lane in range(lanes)]
        assert [len(b) for b in per_lane] == L.lane_sizes(n, lanes)
        assert len(rank_epoch(rank, lanes=lanes, n=n, B=B, block=block, shuffle=buffer > 0)) == n
        for lane, batches in enumerate(per_lane):
            for j, batch in enumerate(batches):
                assert len(batch) == B
                for p in batch:
                    assert p not in owners, (p, owners.get(p), (rank, lane, j))
                    owners[p] = (rank, lane, j)
    assert sorted(owners) == list(range(world * n * B))
    # and the positions are distinct real samples: no sample twice within an epoch
    order = L.shard_order(0, 0, len(UNEVEN))
    got = samples(UNEVEN, order, sorted(owners))
    assert len(set(got)) == len(got) and all(0 <= i < UNEVEN[s] for s, i in got)


def test_shuffle_permutes_within_blocks_only():
    B, lanes, n = 8, 2, 20
    block = L.block_size(B, 30)  # 32: four batches per block
    plain = lane_batches(0, 1, lanes=lanes, n=n, B=B, block=block, shuffle=False)
    assert all(b == list(range(b[0], b[0] + B)) for b in plain)  # in order without shuffle
    mixed = lane_batches(0, 1, lanes=lanes, n=n, B=B, block=block, shuffle=True)
    assert mixed != plain
    base, hi = L.lane_span(0, 1, n, lanes, B)
    for k in range(0, len(mixed), block // B):  # each block's batches hold exactly that block's positions
        lo = base + k * B
        assert sorted(p for b in mixed[k:k + block // B] for p in b) == list(range(lo, min(hi, lo + block)))


@pytest.mark.parametrize("counts,world", [((5,), 1), ((100,), 2), ((1, 2, 3, 500), 3), ((7,) * 11, 4),
                                          (UNEVEN, 3), ((40, 1, 1, 1, 1, 1, 90), 2)])
def test_each_rank_gets_the_same_number_of_batches_of_distinct_samples(counts, world):
    B, lanes = 4, 3
    n = sum(counts) // (world * B)
    order = L.shard_order(7, 2, len(counts))
    seen: set = set()
    for rank in range(world):
        batches = rank_epoch(rank, lanes=lanes, n=n, B=B, block=L.block_size(B, 10), seed=7, epoch=2)
        assert len(batches) == n and all(len(b) == B for b in batches)
        mine = set(samples(counts, order, [p for b in batches for p in b]))
        assert len(mine) == n * B and not mine & seen  # within the rank and across ranks, no repeat
        seen |= mine


@pytest.mark.parametrize("lanes,buffer", [(1, 0), (1, 40), (2, 40), (3, 16), (4, 100)])
def test_resume_at_start_yields_the_tail_of_the_uninterrupted_epoch(lanes, buffer):
    B, world, n = 8, 2, 23
    block = L.block_size(B, buffer)
    for rank in range(world):
        full = rank_epoch(rank, lanes=lanes, n=n, B=B, block=block, seed=3, epoch=5, shuffle=buffer > 0)
        assert len(full) == n
        for start in range(n + 1):
            resumed = rank_epoch(rank, lanes=lanes, start=start, n=n, B=B, block=block, seed=3, epoch=5,
                                 shuffle=buffer > 0)
            assert resumed == full[start:], (rank, start)


def test_resumed_lane_skips_whole_blocks():
    B, block, lanes, n = 4, 12, 1, 10  # three batches per block
    blocks = list(L.lane_blocks(lane=0, lanes=lanes, num_batches=n, batch_size=B, block=block, start=4, seed=0,
                                epoch=0, shuffle=True, key_base=100))
    assert [(b.lo, b.hi, b.key) for b in blocks] == [(12, 24, 112), (24, 36, 124), (36, 40, 136)]
    assert [len(b.batches) for b in blocks] == [2, 3, 1]  # batch 3 of the epoch was handed out already


@pytest.mark.parametrize("total,world", [(5, 1), (5, 5), (50, 3), (73, 2), (73, 4), (9, 2)])
@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_validation_positions_split_exactly_once_across_ranks(total, world, lanes):
    B = 8
    seen = Counter()
    per_rank = []
    for rank in range(world):
        lo, hi = L.eval_range(total, world, rank)
        batches = [ab for lane in range(lanes) for ab in L.eval_batches(lo, hi, lane=lane, lanes=lanes, batch_size=B)]
        assert len(batches) == L.eval_num_batches(lo, hi, B)
        assert all(b - a == B for a, b in batches if b != hi) and all(0 < b - a <= B for a, b in batches)
        seen.update(p for a, b in batches for p in range(a, b))
        per_rank.append(len(batches))
    assert sorted(seen) == list(range(total)) and set(seen.values()) == {1}
    assert max(per_rank) - min(per_rank) <= 1


@pytest.mark.parametrize("world,lanes", [(1, 1), (1, 2), (2, 3)])
def test_wrap_around_when_steps_per_epoch_exceed_the_data(world, lanes):
    B, total = 16, sum(UNEVEN)
    n = 40 // world  # 640 positions > 553 samples
    order = L.shard_order(0, 1, len(UNEVEN))
    positions = [p for r in range(world)
                 for b in rank_epoch(r, lanes=lanes, n=n, B=B, block=L.block_size(B, 40), epoch=1) for p in b]
    assert sorted(positions) == list(range(world * n * B))
    counts = Counter(samples(UNEVEN, order, positions))
    assert len(counts) == total  # every sample ...
    assert sorted(Counter(counts.values()).items()) == [(1, 2 * total - 640), (2, 640 - total)]  # ... some twice


def test_segments_match_the_concatenation():
    rng = np.random.default_rng(0)
    for counts in [(5,), (3, 1, 4), UNEVEN, (2, 9, 1, 1, 6)]:
        order = rng.permutation(len(counts))
        flat = [(int(s), i) for s in order for i in range(counts[s])]
        total = len(flat)
        for lo in range(0, 2 * total, 3):
            for hi in (lo, lo + 1, lo + 7, lo + total + 2):
                segs = L.segments(counts, order, lo, hi)
                assert all(first < stop for _, first, stop in segs)
                got = [(s, i) for s, first, stop in segs for i in range(first, stop)]
                assert got == [flat[p % total] for p in range(lo, hi)]


def test_orders_depend_on_seed_epoch_and_block_position():
    assert np.array_equal(L.shard_order(1, 2, 9), L.shard_order(1, 2, 9))
    assert not np.array_equal(L.shard_order(1, 2, 9), L.shard_order(1, 3, 9))
    assert sorted(L.shard_order(1, 2, 9)) == list(range(9))
    kw = {"lanes": 1, "n": 8, "B": 4, "block": 16}
    assert lane_batches(0, 0, epoch=0, **kw) == lane_batches(0, 0, epoch=0, **kw)
    assert lane_batches(0, 0, epoch=0, **kw) != lane_batches(0, 0, epoch=1, **kw)
    assert lane_batches(0, 0, seed=0, **kw) != lane_batches(0, 0, seed=1, **kw)
    a, b = lane_batches(0, 0, **kw)[:4], lane_batches(0, 0, **kw)[4:]  # two blocks, permuted differently
    assert [p - 16 for batch in b for p in batch] != [p for batch in a for p in batch]
    kw["lanes"] = 2  # lanes 0 and 1: one block of 16 each, seeded by their own positions
    a, b = lane_batches(0, 0, **kw), lane_batches(0, 1, **kw)
    assert [p - 16 for batch in b for p in batch] != [p for batch in a for p in batch]


@pytest.mark.parametrize("num_shards", [1, 2, 3, 5, 6, 13])
@pytest.mark.parametrize("world,lanes", [(1, 1), (2, 2), (1, 3), (3, 2)])
def test_streaming_slots_split_every_pass_exactly(num_shards, world, lanes):
    slots = world * lanes
    sizes = [3 + (7 * s) % 5 for s in range(num_shards)]
    for cycle, permute in [(0, True), (1, True), (0, False)]:
        kept, read_by = Counter(), Counter()
        for rank, lane in itertools.product(range(world), range(lanes)):
            slot = L.slot_of(rank, lane, lanes)
            shards, stride, offset = L.stream_cycle(num_shards, slot=slot, slots=slots, seed=4, epoch=1,
                                                    cycle=cycle, permute=permute)
            read_by.update(shards)
            flat = [(s, i) for s in shards for i in range(sizes[s])]
            kept.update(x for k, x in enumerate(flat) if k % stride == offset)
        assert len(kept) == sum(sizes) and set(kept.values()) == {1}  # every sample of the pass once
        if num_shards >= slots:
            assert set(read_by.values()) == {1}  # each shard read by one slot only
    assert len({L.slot_of(r, w, lanes) for r in range(world) for w in range(lanes)}) == slots
    one = L.stream_cycle(num_shards, slot=0, slots=1, seed=4, epoch=1, cycle=0, permute=False)[0]
    assert one == list(range(num_shards))


def test_streaming_block_keys_differ_per_slot():
    keys = {L.stream_key_base(r, w, 4) for r in range(8) for w in range(4)}
    assert len(keys) == 32 and min(np.diff(sorted(keys))) >= 1 << 40
