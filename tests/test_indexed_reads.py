"""Local shards are read through an index of their members (one read per run of samples, arrays built with
numpy): the batches must be exactly those the tar parser gives, for our shards and other writers' layouts,
and whatever cannot be read that way must fall back to the per-sample decoder."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest

from pipeline.data import shards
from pipeline.data.decode import ImageSpec
from pipeline.data.reader import Reader, ShardChecks
from tests.helpers.data import data_cfg, module_for, write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("indexed")
    write_dataset(root, {"train": (37, 120, 64, 90), "val": (23, 31)}, factors=True)
    return root


def no_index(monkeypatch):
    """Every shard through the tar parser (the path remote shards take)."""
    monkeypatch.setattr(shards, "index_tar", lambda path: None)


def contents(loader, epochs: int) -> list:
    out = []
    for _ in range(epochs):
        for b in loader:
            out.append((list(b["key"]), b["image"].numpy().tolist(), b["label"].tolist(), b["factors"].tolist(),
                        b["skipped"], str(b["image"].dtype), str(b["label"].dtype), str(b["factors"].dtype)))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_indexed_reads_give_the_parsers_batches(dataset, workers, monkeypatch):
    cfg = data_cfg(dataset, num_workers=workers, batch_size=16, shuffle_buffer=48)
    dm = module_for(cfg)
    train, val = dm.train_dataloader(), dm.val_dataloader()
    fast = (contents(train, 3), contents(val, 1))
    if workers == 0:  # the index path was taken (the workers' copies are not visible from here)
        assert train.dataset.checks.indexes and all(i is not None for i in train.dataset.checks.indexes.values())
        assert train.dataset.checks.verified == set(range(4))  # and every shard verified through it
    no_index(monkeypatch)
    dm = module_for(cfg)
    assert (contents(dm.train_dataloader(), 3), contents(dm.val_dataloader(), 1)) == fast


def write_tar(path, samples) -> None:
    """samples: lists of (member name, bytes), written with tarfile's defaults (another writer's headers)."""
    with tarfile.open(path, "w") as tar:
        for members in samples:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def npy(a) -> bytes:
    return shards.npy_bytes(np.asarray(a))


rng = np.random.default_rng(0)
LAYOUTS = {  # name: (samples, spec, fast path expected)
    "ours, 2-digit labels": ([[(f"s{i}.npy", npy(rng.integers(0, 255, (1, 5, 5), dtype=np.uint8))),
                               (f"s{i}.label.cls", str(i * 7).encode()),
                               (f"s{i}.factors.npy", npy(np.arange(3, dtype=np.float64) + i))] for i in range(30)],
                             ImageSpec(), True),
    "H x W x C npy, cls": ([[(f"dir/k{i:03d}.npy", npy(rng.integers(0, 255, (5, 6, 3), dtype=np.uint8))),
                             (f"dir/k{i:03d}.cls", str(i % 3).encode())] for i in range(20)], ImageSpec(), True),
    "H x W npy, no label": ([[(f"k{i}.npy", npy(rng.integers(0, 255, (4, 4), dtype=np.uint8)))] for i in range(9)],
                            ImageSpec(), True),
    "cls with a newline": ([[(f"k{i}.npy", npy(np.full((1, 2, 2), i, np.uint8))), (f"k{i}.cls", f"{i}\n".encode())]
                            for i in range(5)], ImageSpec(), False),
    "json labels": ([[(f"k{i}.npy", npy(np.full((1, 2, 2), i, np.uint8))),
                      (f"k{i}.json", json.dumps({"label": i}).encode())] for i in range(5)], ImageSpec(), False),
    "channels to convert": ([[(f"k{i}.npy", npy(np.full((1, 2, 2), i, np.uint8)))] for i in range(5)],
                            ImageSpec(channels=3), False),
    "mixed shapes": ([[(f"k{i}.npy", npy(np.zeros((1, 2 + i % 2, 2), np.uint8)))] for i in range(6)],
                     ImageSpec(), False),
    "label in some only": ([[(f"k{i}.npy", npy(np.zeros((1, 2, 2), np.uint8)))]
                            + ([(f"k{i}.cls", b"1")] if i % 2 else []) for i in range(6)], ImageSpec(), False),
    "pax long names": ([[("x" * 120 + f"{i}.npy", npy(np.full((1, 2, 2), i, np.uint8)))] for i in range(4)],
                       ImageSpec(), True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_block_decoding_equals_per_sample_decoding(layout, tmp_path):
    samples, spec, fast = LAYOUTS[layout]
    path = tmp_path / "s.tar"
    write_tar(path, samples)
    parsed = list(shards.iter_tar_samples(open(path, "rb"), str(path)))
    index = shards.index_tar(str(path))
    assert index is not None and len(index) == len(parsed)
    reader = Reader([str(path)], "raise", ShardChecks([len(parsed)], None))
    for lo, hi in [(0, len(parsed)), (1, len(parsed) - 1), (2, 3)]:
        block = reader.block(0, lo, hi)
        assert block is not None
        assert block.raws() == parsed[lo:hi]  # the indexed bytes are the parser's
        cols = spec.decode_block(block, None)
        if lo == 0 or fast:  # (a one-sample block of mixed shapes has one shape: arrays are fine there)
            assert (cols is not None) == fast, layout
        if cols is None:
            continue
        want = [spec.decode(raw) for raw in parsed[lo:hi]]
        assert cols.keys == [raw["__key__"] for raw in parsed[lo:hi]]
        assert cols.image.dtype == np.uint8 and cols.image.flags.writeable
        np.testing.assert_array_equal(cols.image, np.stack([w[0] for w in want]))
        if want[0][1] is None:
            assert cols.label is None
        else:
            assert cols.label.dtype == np.int64 and cols.label.tolist() == [w[1] for w in want]
        if want[0][2] is None:
            assert cols.factors is None
        else:
            assert cols.factors.dtype == np.float32
            np.testing.assert_array_equal(cols.factors, np.stack([w[2] for w in want]))


def test_a_shard_changed_after_indexing_goes_back_to_the_parser(dataset, tmp_path):
    write_dataset(tmp_path, {"train": (40,)})
    url = str(tmp_path / "train-000000.tar")
    reader = Reader([url], "raise", ShardChecks([40], None))
    assert reader.block(0, 0, 10) is not None
    with open(url, "ab") as f:  # grows (what a rewrite in place does to size and mtime)
        f.write(b"\0" * 512)
    os.utime(url, ns=(0, 0))
    assert reader.block(0, 0, 10) is None and reader.checks.indexes[0] is None
    assert len(list(reader.read(0, 0, 10))) == 10


def test_shards_the_index_cannot_vouch_for_are_parsed(tmp_path):
    """A truncated shard or one with a sample more than the manifest lists has no index: the parser reads
    it and reports what is wrong (test_data_integrity, test_datamodule check the messages)."""
    write_dataset(tmp_path, {"train": (40, 40)})
    short = tmp_path / "train-000000.tar"
    short.write_bytes(short.read_bytes()[:9000])
    assert shards.index_tar(str(short)) is None
    reader = Reader([str(short), str(tmp_path / "train-000001.tar")], "raise", ShardChecks([40, 39], None))
    assert reader.block(0, 0, 5) is None and reader.block(1, 0, 5) is None  # truncated; 40 held, 39 listed
