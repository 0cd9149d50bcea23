"""pipeline.data.layout: which samples each rank, lane and batch gets, checked on integers alone (no files)."""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from pipeline.data import layout as L

UNEVEN = (13, 200, 57, 31, 120, 88, 44)  # 7 shards, 553 samples (as in the loader tests)


def rank_batch(canon: L.Canon, rank: int, world: int, step: int, *, seed: int = 0, epoch: int = 0) -> list[int]:
    """The epoch positions of `rank`'s batch at `step`, as ShardStream builds it (a piece per partition)."""
    k = canon.step_block(step)
    return [part * canon.part_length + int(q)
            for part, a, z in L.rank_parts(rank, world, canon.parts, canon.part_batch)
            for q in canon.block_order(seed, epoch, part, k)[canon.step_slice(step)][a:z]]


def rank_epoch(canon: L.Canon, rank: int, world: int, *, start: int = 0, lanes: int = 1, **kw) -> list[list[int]]:
    """A rank's batches in the order its main process sees them: the DataLoader takes one batch from each
    worker in turn (dropping exhausted ones), worker w serving lane worker_lane(start, w, lanes)."""
    its = [iter(L.lane_steps(start, L.worker_lane(start, w, lanes), lanes, canon.num_steps)) for w in range(lanes)]
    out = []
    while its:
        for it in list(its):
            step = next(it, None)
            if step is None:
                its.remove(it)
            else:
                out.append(rank_batch(canon, rank, world, step, **kw))
    return out


def global_epoch(canon: L.Canon, world: int, **kw) -> list[list[int]]:
    per_rank = [rank_epoch(canon, r, world, **kw) for r in range(world)]
    return [[p for batch in step for p in batch] for step in zip(*per_rank)]


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
            steps = sorted(i for lane in range(w) for i in L.lane_steps(start, lane, w, n))
            assert steps == list(range(start, n))  # the lanes hand out every batch from `start` once


@pytest.mark.parametrize("parts,world", [(1, 1), (2, 2), (3, 3), (4, 2), (4, 1), (2, 4), (1, 3)])
@pytest.mark.parametrize("lanes,buffer", [(1, 0), (3, 40), (2, 100)])
def test_every_training_position_has_exactly_one_owner(parts, world, lanes, buffer):
    G, total = 48, sum(UNEVEN)
    canon = L.Canon(parts, G, total // G, buffer)
    owners: dict = {}  # position -> (step, rank)
    for rank in range(world):
        batches = rank_epoch(canon, rank, world, lanes=lanes)
        assert len(batches) == canon.num_steps and all(len(b) == G // world for b in batches)
        for step, batch in enumerate(batches):
            for p in batch:
                assert p not in owners, (p, owners.get(p), (step, rank))
                owners[p] = (step, rank)
    assert sorted(owners) == list(range(canon.num_steps * G))
    order = L.shard_order(0, 0, len(UNEVEN))  # and they are distinct real samples
    got = samples(UNEVEN, order, sorted(owners))
    assert len(set(got)) == len(got) and all(0 <= i < UNEVEN[s] for s, i in got)


@pytest.mark.parametrize("parts", [1, 2, 4])
def test_global_steps_do_not_depend_on_world_size_or_lanes(parts):
    """Elastic determinism: each global step holds the same samples, in the same order, on every world size
    the order's partitions allow and with any number of lanes."""
    canon = L.Canon(parts, 32, sum(UNEVEN) // 32, 40)
    reference = global_epoch(canon, parts, lanes=2, seed=5, epoch=3)
    for world in L.fitting_worlds(parts, 32, up_to=16):
        for lanes in (1, 3):
            assert global_epoch(canon, world, lanes=lanes, seed=5, epoch=3) == reference, (world, lanes)
    assert L.fitting_worlds(4, 32, up_to=16) == [1, 2, 4, 8, 16] and L.fitting_worlds(3, 48, up_to=16) == [1, 3, 6, 12]
    assert not L.world_fits(3, 4, 48) and not L.world_fits(8, 4, 20)


def test_a_canonical_order_on_its_own_world_size_is_the_per_rank_order():
    """With as many ranks as partitions, rank r reads partition r only: its own contiguous range."""
    canon = L.Canon(3, 48, 11, 40)
    for rank in range(3):
        positions = [p for b in rank_epoch(canon, rank, 3) for p in b]
        assert sorted(positions) == list(range(rank * canon.part_length, (rank + 1) * canon.part_length))


def test_shuffle_permutes_within_blocks_only():
    canon = L.Canon(1, 8, 20, 30)  # blocks of 32: four steps per block
    plain = rank_epoch(L.Canon(1, 8, 20, 0), 0, 1)
    assert plain == [list(range(i * 8, i * 8 + 8)) for i in range(20)]  # in order without shuffle
    mixed = rank_epoch(canon, 0, 1)
    assert mixed != plain
    for k in range(0, 20, 4):  # each block's steps hold exactly that block's positions
        assert sorted(p for b in mixed[k:k + 4] for p in b) == list(range(k * 8, min(160, k * 8 + 32)))


@pytest.mark.parametrize("counts,world", [((5,), 1), ((100,), 2), ((1, 2, 3, 500), 3), ((7,) * 11, 4),
                                          (UNEVEN, 3), ((40, 1, 1, 1, 1, 1, 90), 2)])
def test_each_rank_gets_the_same_number_of_batches_of_distinct_samples(counts, world):
    B = 4
    canon = L.Canon(world, B * world, sum(counts) // (world * B), 10)
    order = L.shard_order(7, 2, len(counts))
    seen: set = set()
    for rank in range(world):
        batches = rank_epoch(canon, rank, world, lanes=3, seed=7, epoch=2)
        assert len(batches) == canon.num_steps and all(len(b) == B for b in batches)
        mine = set(samples(counts, order, [p for b in batches for p in b]))
        assert len(mine) == canon.num_steps * B and not mine & seen  # within the rank and across ranks, no repeat
        seen |= mine


@pytest.mark.parametrize("lanes,buffer", [(1, 0), (1, 40), (2, 40), (3, 16), (4, 100)])
def test_resume_at_start_yields_the_tail_of_the_uninterrupted_epoch(lanes, buffer):
    canon = L.Canon(2, 16, 23, buffer)
    for rank in range(2):
        full = rank_epoch(canon, rank, 2, lanes=lanes, seed=3, epoch=5)
        assert len(full) == 23
        for start in range(24):
            assert rank_epoch(canon, rank, 2, lanes=lanes, start=start, seed=3, epoch=5) == full[start:], (rank, start)


def test_streaming_resumed_lane_skips_whole_blocks():
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
    total = sum(UNEVEN)
    canon = L.Canon(world, 16 * world, 40 // world, 40)  # 640 positions > 553 samples
    order = L.shard_order(0, 1, len(UNEVEN))
    positions = [p for r in range(world) for b in rank_epoch(canon, r, world, lanes=lanes, epoch=1) for p in b]
    assert sorted(positions) == list(range(640))
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
    canon = L.Canon(1, 4, 8, 16)
    assert rank_epoch(canon, 0, 1, epoch=0) == rank_epoch(canon, 0, 1, epoch=0)
    assert rank_epoch(canon, 0, 1, epoch=0) != rank_epoch(canon, 0, 1, epoch=1)
    assert rank_epoch(canon, 0, 1, seed=0) != rank_epoch(canon, 0, 1, seed=1)
    a, b = rank_epoch(canon, 0, 1)[:4], rank_epoch(canon, 0, 1)[4:]  # two blocks, permuted differently
    assert [p - 16 for batch in b for p in batch] != [p for batch in a for p in batch]
    two = L.Canon(2, 8, 4, 16)  # partitions 0 and 1: one block of 16 each, seeded by their own positions
    a, b = rank_epoch(two, 0, 2), rank_epoch(two, 1, 2)
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
