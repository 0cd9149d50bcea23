"""The loader's stages one by one (pipeline.data.stream): decode (the block fast path and the per-sample path
agree), fill, collate, and the stream spec; tests/test_datamodule.py checks them composed."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.data import shards
from pipeline.data import stream as S
from pipeline.data.decode import Columns, ImageSpec, Item
from pipeline.data.reader import Reader, ShardChecks
from pipeline.data.sources import resolve_source
from tests.helpers.data import write_dataset


def item(key, value, label=None, factors=None):
    return Item(key, np.full((1, 2, 2), value, dtype=np.uint8), label, factors)


def test_item_fields_are_named():
    it = item("a", 7, 3, np.ones(2, dtype=np.float32))
    assert (it.key, int(it.image[0, 0, 0]), it.label, it.factors.tolist()) == ("a", 7, 3, [1.0, 1.0])
    cols = Columns(["a", "b"], np.zeros((2, 1, 2, 2), dtype=np.uint8), np.array([4, 5]))
    assert [(i.key, i.label, i.factors) for i in cols.items()] == [("a", 4, None), ("b", 5, None)]


def test_fill_repeats_readable_samples_in_turn_and_borrows_only_when_none_is():
    a, b = item("a", 1), item("b", 2)
    assert S.fill([a, b], donors=lambda: pytest.fail("not needed")) == ([a, b], [False, False])
    out, filled = S.fill([None, a, None, b, None], donors=lambda: pytest.fail("not needed"))
    assert [it.key for it in out] == ["a", "a", "b", "b", "a"] and filled == [True, False, True, False, True]
    out, filled = S.fill([None, None], donors=lambda: [b])
    assert [it.key for it in out] == ["b", "b"] and filled == [True, True]


def test_collate_items_and_columns_give_the_same_batch():
    items = [item(k, v, v, np.full(3, v, dtype=np.float32)) for k, v in (("a", 1), ("b", 2), ("c", 3))]
    cols = S.columns_of(items)
    idx = np.array([2, 0])
    from_items = S.collate_items([items[i] for i in idx], 1, "src", ImageSpec())
    from_cols = S.collate_columns(cols, idx)
    assert from_items["key"] == from_cols["key"] == ["c", "a"] and from_items["skipped"] == 1
    for name in ("image", "label", "factors"):
        assert np.array_equal(from_items[name], from_cols[name]) and from_items[name].dtype == from_cols[name].dtype
    assert S.columns_of(items[:2] + [None]) is None and S.columns_of([items[0], item("d", 4)]) is None
    with pytest.raises(shards.ShardFormatError, match=r"src: sample 'd' has no label"):
        S.collate_items([items[0], item("d", 4)], 0, "src", ImageSpec())


def test_join_keeps_arrays_only_when_every_part_is():
    cols = S.columns_of([item("a", 1, 1)])
    assert isinstance(S.join([cols, cols]), Columns) and len(S.join([cols, cols])) == 2
    mixed = S.join([cols, [None, item("b", 2, 2)]])
    assert isinstance(mixed, list) and [None if it is None else it.key for it in mixed] == ["a", None, "b"]


def test_decoder_fast_path_and_per_sample_path_agree(tmp_path, monkeypatch):
    write_dataset(tmp_path, {"train": [10, 6]}, factors=True)
    src = resolve_source(None, "train", str(tmp_path))
    decoder = S.Decoder(ImageSpec(), (1, 4, 4), "raise")
    counts, order = np.array(src.counts), np.array([1, 0])
    def reader():
        return Reader(src.urls, "raise", ShardChecks(src.counts, src.digests))

    fast = decoder.positions(reader(), counts, order, 3, 14)  # across both shards
    monkeypatch.setattr(shards, "index_tar", lambda path: None)  # no index: the tar parser, item by item
    slow = decoder.positions(reader(), counts, order, 3, 14)
    assert isinstance(fast, Columns) and isinstance(slow, list)  # arrays from the bytes; items from the parser
    slow = S.columns_of(slow)
    assert fast.keys == slow.keys == [f"trainx1x{i}" for i in range(3, 6)] + [f"trainx0x{i}" for i in range(8)]
    for name in ("image", "label", "factors"):
        assert np.array_equal(getattr(fast, name), getattr(slow, name))


def test_decoder_reports_or_drops_a_bad_sample():
    raw = {"__key__": "k", "npy": shards.npy_bytes(np.zeros((3, 4, 4), dtype=np.uint8))}
    with pytest.raises(shards.ShardFormatError, match=r"u.tar: sample 'k': image shape \(3, 4, 4\)"):
        S.Decoder(ImageSpec(), (1, 4, 4), "raise").item(raw, "u.tar")
    assert S.Decoder(ImageSpec(), (1, 4, 4), "warn").item(raw, "u.tar") is None
    assert S.Decoder(ImageSpec(), None, "warn").item(raw, "u.tar").image.shape == (3, 4, 4)


def test_stream_spec_is_frozen_and_says_its_block():
    spec = S.StreamSpec(train=True, batch_size=8, shuffle_buffer=100)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.batch_size = 4
    assert spec.shuffle and spec.block == 96  # the buffer rounded to whole batches
    assert not S.StreamSpec(train=False, batch_size=8, shuffle_buffer=100).shuffle
    assert S.StreamSpec(train=False, batch_size=8, shuffle_buffer=100).block == 8
