"""The shard format: sample codec, the tar reader, deterministic and atomic writes, plain webdataset."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from pipeline.data import shards


def samples(n, factors=True):
    rng = np.random.default_rng(0)
    return [shards.encode_sample(f"{i:07d}", rng.integers(0, 256, (3, 5, 4), dtype=np.uint8), i % 7,
                                 rng.random(4).astype(np.float32) if factors else None) for i in range(n)]


def test_codec_round_trip():
    image = np.arange(60, dtype=np.uint8).reshape(3, 5, 4)
    members = dict(shards.encode_sample("0000042", image, 3, np.array([0.5, 2.0])))
    assert set(members) == {"0000042.npy", "0000042.label.cls", "0000042.factors.npy"}
    raw = {"__key__": "0000042", "npy": members["0000042.npy"], "label.cls": members["0000042.label.cls"],
           "factors.npy": members["0000042.factors.npy"]}
    got_image, label, factors = shards.decode_sample(raw)
    assert np.array_equal(got_image, image) and label == 3
    assert factors.dtype == np.float32 and np.array_equal(factors, [0.5, 2.0])
    with pytest.raises(ValueError, match="must not contain"):
        shards.encode_sample("a.b", image)
    with pytest.raises(ValueError, match="uint8"):
        shards.encode_sample("x", image.astype(np.float32))
    with pytest.raises(ValueError, match="header says"):
        shards.decode_npy(members["0000042.npy"][:-1])


def test_writes_are_deterministic_and_normalised(tmp_path):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    count, digest = shards.write_shard(a, samples(20))
    assert (count, digest) == shards.write_shard(b, samples(20))
    assert a.read_bytes() == b.read_bytes() and digest == shards.sha256_file(a)
    with tarfile.open(a) as tar:
        members = tar.getmembers()
    assert len(members) == 60
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o444)}


def test_a_failed_write_leaves_nothing(tmp_path):
    def broken():
        yield from samples(5)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        shards.write_shard(tmp_path / "train-000000.tar", broken())
    assert list(tmp_path.iterdir()) == []


def test_reader_matches_tarfile_and_handles_long_names(tmp_path):
    path = tmp_path / "s.tar"
    shards.write_shard(path, samples(30))
    got = list(shards.iter_tar_samples(open(path, "rb"), str(path)))
    with tarfile.open(path) as tar:
        want = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert [(f"{s['__key__']}.{k}", v) for s in got for k, v in s.items() if k != "__key__"] == want
    # GNU long names and pax headers, directories and a nested path, written by tarfile itself
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            d = tarfile.TarInfo("sub")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            for name in ("sub/" + "k" * 150 + ".npy", "sub/" + "k" * 150 + ".label.cls", "sub/short.npy"):
                data = name.encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        buf.seek(0)
        got = list(shards.iter_tar_samples(buf, "mem"))
        assert [s["__key__"] for s in got] == ["sub/" + "k" * 150, "sub/short"]
        assert got[0]["label.cls"] == ("sub/" + "k" * 150 + ".label.cls").encode()


def test_reader_names_the_shard_on_damage(tmp_path):
    path = tmp_path / "train-000003.tar"
    shards.write_shard(path, samples(10))
    data = path.read_bytes()
    with pytest.raises(shards.ShardFormatError, match=r"train-000003.tar: unreadable tar data.*truncated"):
        list(shards.iter_tar_samples(io.BytesIO(data[:3000]), str(path)))
    bad = bytearray(data)
    bad[1024 + 10] ^= 0xFF  # a name byte in the second member's header
    with pytest.raises(shards.ShardFormatError, match="train-000003.tar.*checksum"):
        list(shards.iter_tar_samples(io.BytesIO(bytes(bad)), str(path)))


def test_plain_webdataset_reads_our_shards(tmp_path):
    import webdataset as wds

    path = tmp_path / "train-000000.tar"
    written = samples(12)
    shards.write_shard(path, written)
    got = list(wds.WebDataset(str(path), shardshuffle=False).decode())
    assert len(got) == 12
    for sample, members in zip(got, written):
        m = dict(members)
        key = sample["__key__"]
        assert np.array_equal(sample["npy"], np.load(io.BytesIO(m[f"{key}.npy"])))
        assert sample["npy"].dtype == np.uint8 and sample["npy"].shape == (3, 5, 4)
        assert sample["label.cls"] == int(m[f"{key}.label.cls"])
        assert np.array_equal(sample["factors.npy"], np.load(io.BytesIO(m[f"{key}.factors.npy"])))


def test_manifest_checks(tmp_path):
    shards.write_json_atomic(tmp_path / "manifest.json", {"splits": {"train": {"total": 3, "shards": [
        {"name": "train-000000.tar", "samples": 2}]}}})
    with pytest.raises(shards.ShardFormatError, match="do not add up"):
        shards.load_manifest(tmp_path / "manifest.json")
    with pytest.raises(shards.ShardFormatError, match="manifest not found"):
        shards.load_manifest(tmp_path / "nope.json")
