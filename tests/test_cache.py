"""data.cache: the decoded training split held by the training process (host RAM or the accelerator), filled
through the loader's own reader and decoder, serving exactly the batches the loader workers would: same
order, same epochs, exact mid-epoch resume (also across cache on and off), the same checks while filling."""
from __future__ import annotations

import math
import re
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_data_integrity import flip_image_bytes

from pipeline.data import datamodule as D
from pipeline.data import shards
from pipeline.data import stream as S
from pipeline.data.decode import Columns
from tests.helpers.data import UNEVEN, data_cfg, module_for, write_dataset


def batches(loader, epochs: int = 1) -> list:
    out = []
    for _ in range(epochs):
        for b in loader:
            out.append((list(b["key"]), b["skipped"], sorted(b), *((b[k].tolist(), b[k].dtype) for k in
                                                                   ("image", "label", "factors") if k in b)))
    return out


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 2), (3, 1)])
def test_cached_batches_are_the_streams(uneven, world, workers):
    for rank in range(world):
        streamed = batches(module_for(data_cfg(uneven, num_workers=workers), world, rank).train_dataloader(), 3)
        cached_loader = module_for(data_cfg(uneven, num_workers=workers, cache="host"), world, rank).train_dataloader()
        assert cached_loader.dataset.cache is not None and cached_loader.num_workers == 0  # built here, no workers
        assert batches(cached_loader, 3) == streamed


@pytest.mark.parametrize("saved_with,resumed_with", [("host", "host"), ("none", "host"), ("host", "none")])
def test_mid_epoch_resume_is_exact_with_and_across_the_cache(uneven, saved_with, resumed_with):
    reference = batches(module_for(data_cfg(uneven, cache="none")).train_dataloader(), 2)
    n = len(reference) // 2
    loader = module_for(data_cfg(uneven, cache=saved_with)).train_dataloader()
    it = iter(loader)
    first = [list(next(it)["key"]) for _ in range(5)]
    state = loader.state_dict()
    resumed = module_for(data_cfg(uneven, cache=resumed_with)).train_dataloader()
    resumed.load_state_dict(state)
    rest = batches(resumed, 2)
    assert first == [b[0] for b in reference[:5]]
    assert rest == reference[5:n] + batches_of_epoch(uneven, 1)


def batches_of_epoch(root, epoch: int) -> list:
    loader = module_for(data_cfg(root, cache="none")).train_dataloader()
    for _ in range(epoch):
        list(loader)
    return batches(loader)


def test_auto_holds_small_splits_in_host_memory_and_streams_large_ones(uneven, monkeypatch):
    dm = module_for(data_cfg(uneven, cache="auto"))
    assert dm.cache_device() == torch.device("cpu") and dm.train_dataloader().dataset.cache is not None
    assert dm.loader("val", train=False).dataset.cache is None  # validation streams
    monkeypatch.setattr(D, "AUTO_CACHE_BYTES", sum(UNEVEN) * 16 - 1)  # one byte short of the split's images
    dm = module_for(data_cfg(uneven, cache="auto"))
    assert dm.cache_device() is None and dm.train_dataloader().num_workers == 2
    assert module_for(data_cfg(uneven, cache="device")).cache_device() == torch.device("cpu")  # no accelerator here


def test_streaming_sources_and_unreadable_samples_are_not_cached(uneven, tmp_path, caplog):
    streaming = data_cfg(uneven, train=f"pipe:cat {uneven}/train-{{000000..000006}}.tar", steps_per_epoch=3,
                         cache="host")
    assert module_for(streaming).train_dataloader().dataset.cache is None
    assert "data.cache=host: pipe:cat" in caplog.text and "no sample counts (no manifest): streaming it" in caplog.text
    caplog.clear()
    write_dataset(tmp_path, {"train": (40, 40)})
    bad = tmp_path / "train-000001.tar"
    bad.write_bytes(bad.read_bytes()[:9000])  # truncated: the stream fills the lost samples (warn)
    cfg = dict(batch_size=10, on_error="warn")
    loader = module_for(data_cfg(tmp_path, cache="host", **cfg)).train_dataloader()
    assert loader.dataset.cache is None
    assert "data.cache=host" in caplog.text and "cannot be held alike" in caplog.text
    assert batches(loader, 2) == batches(module_for(data_cfg(tmp_path, **cfg)).train_dataloader(), 2)
    caplog.clear()
    module_for(data_cfg(tmp_path, cache="auto", **cfg)).train_dataloader()  # auto: streams without a word
    assert "data.cache" not in caplog.text


def test_a_large_fill_is_announced_with_its_time(uneven, monkeypatch, capsys):
    monkeypatch.setattr(D, "ANNOUNCE_FILL_BYTES", 1)
    module_for(data_cfg(uneven, cache="host")).train_dataloader()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"# cache     reading the training split into cpu memory ({sum(UNEVEN):,} images, ")
    assert re.fullmatch(r"# cache     filled in \d+\.\d s", out[1]), out
    monkeypatch.setattr(D, "ANNOUNCE_FILL_BYTES", sum(UNEVEN) * 16 + 1)  # one byte over the split: quiet
    module_for(data_cfg(uneven, cache="host")).train_dataloader()
    assert capsys.readouterr().out == ""


def test_filling_checks_the_shards_as_the_workers_do(tmp_path):
    write_dataset(tmp_path, {"train": (60, 20)})
    flip_image_bytes(tmp_path / "train-000000.tar", 10)
    with pytest.raises(shards.ShardFormatError, match=r"train-000000\.tar: sha256 .* differs from the manifest"):
        module_for(data_cfg(tmp_path, batch_size=10, cache="host")).train_dataloader()


def fill(root, shape, device="cpu"):
    """The training split of `root` filled into a SplitCache, and the tracemalloc peak (numpy and Python objects,
    not the cache's torch tensors) of a second fill (the first imports and caches what a fill needs once)."""
    dm = module_for(data_cfg(root, cache="none"))
    stream = S.ShardStream(dm.source("train"), S.StreamSpec(train=True, batch_size=16, shape=shape))
    stream.fill_cache(device)
    tracemalloc.start()
    try:
        cache = stream.fill_cache(device)
        return cache, tracemalloc.get_traced_memory()[1], stream
    finally:
        tracemalloc.stop()


def test_a_fill_holds_one_shard_in_host_memory_not_the_split(tmp_path, monkeypatch):
    shape, sizes = (3, 32, 32), (50,) * 24
    write_dataset(tmp_path, {"train": sizes}, shape=shape, factors=True)
    split = sum(sizes) * math.prod(shape)  # 3.7 MB of images
    shard_file = (tmp_path / "train-000000.tar").stat().st_size  # 0.3 MB: a shard's bytes, then its arrays
    monkeypatch.setattr(Columns, "concat", None)  # never the whole split as one array
    cache, peak, stream = fill(tmp_path, shape)
    # was 7.6 MB (every shard's arrays, then their concatenation); now one shard's bytes and arrays, and the keys
    assert peak < min(split / 4, 3 * shard_file), (peak, split, shard_file)
    monkeypatch.undo()
    reader = stream._reader()  # the reference: the shards' Columns concatenated, as the fill built them before
    reference = Columns.concat([stream._shard_columns(reader, s, n) for s, n in enumerate(sizes)])
    reader.close()
    assert cache.keys.tolist() == reference.keys and sorted(cache.tensors) == ["factors", "image", "label"]
    for name, t in cache.tensors.items():
        assert t.dtype == torch.from_numpy(getattr(reference, name)).dtype
        assert torch.equal(t, torch.from_numpy(getattr(reference, name))), name


def test_shards_that_are_not_rows_of_one_cache_are_streamed():
    image = np.zeros((4, 1, 2, 2), dtype=np.uint8)
    cache = S.SplitCache([4, 4, 4, 4])
    assert cache.put(Columns(list("abcd"), image, np.arange(4)))
    assert not cache.put(Columns(list("efgh"), image))  # labels in some shards only
    assert not cache.put(Columns(list("efgh"), image.astype(np.float32), np.arange(4)))  # copy_ would cast
    assert not cache.put(Columns(list("efgh"), np.zeros((4, 1, 2, 3), np.uint8), np.arange(4)))
    assert not cache.put(None)  # a shard whose samples are not alike
    assert cache.put(Columns(list("efgh"), image, np.arange(4))) and not cache.complete
    assert not S.SplitCache([3]).put(Columns(list("abcd"), image))  # more rows than the counts


@pytest.mark.parametrize("needed, free, fits", [(2 << 30, 4 << 30, True), (2 << 30, (4 << 30) - 1, False),
                                                (0, 1 << 30, False), (3 << 30, 1 << 30, False)])
def test_a_device_cache_must_leave_the_headroom_free(needed, free, fits):
    assert D.device_cache_fits(needed, free) is fits  # headroom: DEVICE_CACHE_HEADROOM, 2 GiB


def test_a_gpu_without_room_streams_the_split_with_one_line(uneven, monkeypatch, caplog):
    asked = []
    monkeypatch.setattr(D, "free_device_bytes", lambda device: asked.append(device) or (2 << 30) - 1)
    dm = module_for(data_cfg(uneven, cache="device"))
    # a trainer on cuda:3, seen by the datamodule only: no CUDA is touched, as nothing fills
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 3)), current_epoch=0)
    assert dm.cache_device() is None  # what the start-up summary asks first: it says the split is streamed
    loader = dm.train_dataloader()
    assert asked == [torch.device("cuda", 3)] and loader.dataset.cache is None and loader.num_workers == 2
    [line] = [r.getMessage() for r in caplog.records if "data.cache" in r.getMessage()]
    assert re.fullmatch(r"warning: data\.cache=device: \S+ needs 0\.00 GiB of cuda:3 memory and 2\.00 GiB is "
                        r"free \(2 GiB kept for training\): streaming it instead", line), line
    assert batches(loader) == batches(module_for(data_cfg(uneven)).train_dataloader())
    dm.trainer.strategy.root_device = torch.device("cpu")  # a CPU run's device cache asks no GPU
    asked.clear()
    assert dm.cache_device() == torch.device("cpu") and asked == []
