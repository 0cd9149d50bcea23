"""Pinned host batches for CUDA runs, decided from the run's device.

Without CUDA nothing can actually be pinned, so these check the objects: torch's pin-memory function (what
the DataLoader's pin thread runs) pins a streamed batch's numpy arrays through `Batch.pin_memory`, the host
cache builds batches in page-locked buffers when asked, and the decision reads the device, not
torch.cuda.is_available().
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data._utils.pin_memory import pin_memory as loader_pin_memory

from pipeline.data import stream as S
from pipeline.data.datamodule import pin_batches
from pipeline.data.decode import Columns


@pytest.fixture
def pin_calls(monkeypatch):
    """Tensor.pin_memory recorded (and made a plain copy: nothing can be pinned without CUDA)."""
    calls = []

    def fake_pin(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return self.clone()
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    return calls


def test_pinning_follows_the_run_device_not_cuda_availability(monkeypatch):
    def no_probe():
        raise AssertionError("asked torch.cuda.is_available()")
    monkeypatch.setattr(torch.cuda, "is_available", no_probe)
    assert pin_batches(True, torch.device("cuda", 1)) is True
    assert pin_batches(True, "cuda") is True
    assert pin_batches(True, torch.device("cpu")) is False  # a CPU run on a GPU machine: no CUDA context
    assert pin_batches(False, torch.device("cuda", 0)) is False
    assert pin_batches(True, None) is False


def test_streamed_batches_get_their_arrays_pinned_by_the_loader_pin_thread(pin_calls):
    image = np.arange(2 * 1 * 4 * 4, dtype=np.uint8).reshape(2, 1, 4, 4)
    batch = S.for_transfer({"image": image, "label": np.array([3, 4]), "key": ["a", "b"], "skipped": 0})
    assert isinstance(batch, S.Batch)  # what a loader worker sends
    pinned = loader_pin_memory(batch)
    assert sorted(pin_calls) == [(2,), (2, 1, 4, 4)]  # numpy arrays too, not only tensors
    assert isinstance(pinned, S.Batch) and isinstance(pinned["image"], torch.Tensor)
    assert torch.equal(pinned["image"], torch.from_numpy(image)) and pinned["key"] == ["a", "b"]
    assert pinned["skipped"] == 0


def test_host_cache_builds_pinned_batches_when_asked(monkeypatch):
    made = []

    def fake_pinned_empty(shape, dtype):
        made.append((shape, dtype))
        return torch.empty(shape, dtype=dtype)
    monkeypatch.setattr(S, "pinned_empty", fake_pinned_empty)
    image = np.random.default_rng(0).integers(0, 256, (10, 1, 4, 4), dtype=np.uint8)
    cache = S.SplitCache([6, 4], columns=Columns([f"{i}" for i in range(10)], image, np.arange(10, dtype=np.int64)))
    rows = np.array([7, 2, 5])
    plain = cache.batch(rows)
    assert made == []  # not pinned unless asked
    cache.pin = True
    pinned = cache.batch(rows)
    assert made == [((3, 1, 4, 4), torch.uint8), ((3,), torch.int64)]
    assert torch.equal(pinned["image"], plain["image"]) and torch.equal(pinned["label"], plain["label"])
    assert pinned["key"] == plain["key"] == ["7", "2", "5"]
