"""Shards that differ from their manifest: flipped image bytes (same length, so the tar still parses) and an
appended sample. Checked while reading with the default 2 loader workers; the train CLI's one-line errors."""
from __future__ import annotations

import io
import re
import tarfile

import pytest

from pipeline.data import shards
from tests.helpers.data import data_cfg, keys_of, module_for, write_dataset
from tests.helpers.run import TINY, run_train


def flip_image_bytes(path, sample: int) -> None:
    """Invert the pixel bytes of the `sample`-th image of a shard in place: same length, valid tar, valid .npy."""
    data = bytearray(path.read_bytes())
    at = -1
    for _ in range(sample + 1):
        at = data.index(b"\x93NUMPY", at + 1)
    start = at + 10 + int.from_bytes(data[at + 8:at + 10], "little")  # .npy v1: 10-byte preamble + header
    shape = (1, 4, 4)
    for i in range(start, start + shape[0] * shape[1] * shape[2]):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def append_sample(path, key: str) -> None:
    """One more sample at the end of a shard; the manifest is left as it was."""
    import numpy as np

    with tarfile.open(path, "a", format=tarfile.USTAR_FORMAT) as tar:
        for name, blob in shards.encode_sample(key, np.zeros((1, 4, 4), dtype=np.uint8), 0):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


@pytest.fixture(params=["index", "parser"])
def read_path(request, monkeypatch):
    """Local shards read through their member index (the default) or by the tar parser (what remote shards
    take): the checks must hold on both."""
    if request.param == "parser":
        monkeypatch.setattr(shards, "index_tar", lambda path: None)
    return request.param


@pytest.fixture
def corrupt(tmp_path):
    """Train shards of 60 and 20 samples; shard 0's 11th image flipped. Batch 10, 2 lanes of 40 positions:
    whatever the epoch's shard order, both lanes read part of shard 0 and only one reaches its end."""
    write_dataset(tmp_path, {"train": (60, 20), "val": (10,)})
    flip_image_bytes(tmp_path / "train-000000.tar", 10)
    return tmp_path


def test_flipped_bytes_stop_the_run_naming_the_shard(corrupt, read_path):
    loader = module_for(data_cfg(corrupt, batch_size=10)).train_dataloader()
    with pytest.raises(shards.ShardFormatError, match=r"train-000000\.tar: sha256 .* differs from the manifest"):
        keys_of(loader)


def test_flipped_bytes_under_warn_skip_the_shard_from_then_on(corrupt, read_path):
    """Each worker learns the shard is corrupt during its first pass over it (the samples it read before
    that were used); from then on every position of the shard is skipped, counted and filled."""
    loader = module_for(data_cfg(corrupt, batch_size=10, on_error="warn")).train_dataloader()
    good = {f"trainx1x{i}" for i in range(20)}
    epochs = [list(loader) for _ in range(3)]
    assert [len(e) for e in epochs] == [8, 8, 8] and all(len(b["key"]) == 10 for e in epochs for b in e)
    for later in epochs[1:]:  # both workers read part of shard 0 in epoch 0, so both skip it now
        assert sum(b["skipped"] for b in later) == 60
        assert {k for b in later for k in b["key"]} <= good
    assert loader.skipped_samples == 120


def test_verification_off_reads_the_flipped_shard(corrupt, read_path):
    loader = module_for(data_cfg(corrupt, batch_size=10, verify_checksums=False)).train_dataloader()
    for _ in range(2):
        batches = list(loader)
        assert sorted(k for b in batches for k in b["key"]) == sorted(
            [f"trainx0x{i}" for i in range(60)] + [f"trainx1x{i}" for i in range(20)])
        assert sum(b["skipped"] for b in batches) == 0


@pytest.mark.parametrize("verify", [True, False])
def test_an_extra_sample_is_an_error_naming_the_shard(tmp_path, verify, read_path):
    write_dataset(tmp_path, {"train": (40, 40, 40)})
    append_sample(tmp_path / "train-000001.tar", "extra")
    loader = module_for(data_cfg(tmp_path, batch_size=10, verify_checksums=verify)).train_dataloader()
    with pytest.raises(shards.ShardFormatError, match=r"train-000001\.tar: holds more than the 40 samples"):
        keys_of(loader)


@pytest.mark.slow
def test_train_cli_prints_one_line_and_exits_2_on_a_data_error(tmp_path):
    write_dataset(tmp_path / "data", {"train": (200, 200), "val": (40,)})
    flip_image_bytes(tmp_path / "data" / "train-000001.tar", 150)
    args = TINY + [f"data.root={tmp_path / 'data'}", f"run.dir={tmp_path / 'run'}", "trainer.max_steps=20"]
    proc = run_train(args, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: \S*train-000001\.tar: sha256 .* differs from the manifest.*", last), last
    debug = run_train(args + [f"run.dir={tmp_path / 'run2'}"], env_extra={"VAE_DEBUG": "1"}, check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "train-000001.tar" in debug.stderr
