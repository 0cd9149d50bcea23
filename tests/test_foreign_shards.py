"""WebDataset shards written by other tools (plain webdataset.ShardWriter and tarfile, img2dataset-style keys):
jpg / png / webp / npy members, .cls and .json labels, two image sizes and grey images mixed, uneven shards.
`prepare index` gives them the exact mode (equal batches, exact validation, exact mid-epoch resume); without
it they stream; bad input fails naming the shard and the sample."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from pipeline.data import shards
from pipeline.data.datamodule import ShardDataModule
from pipeline.data.prepare import main as prepare_main
from pipeline.data.sources import DataSetupError
from tests.helpers.data import data_cfg, foreign_rank_main, keys_of, module_for

TRAIN, VAL = (45, 45, 40, 17), (9, 14)  # ShardWriter's 45-sample shards, then one written with tarfile
FORMATS = ("jpg", "png", "webp", "npy")
PIL_NAMES = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def value(n: int) -> int:
    return 20 + (n * 7) % 200  # every pixel of sample n


def sample(n: int) -> dict:
    """Sample n: a flat image of value(n) in format FORMATS[n % 4], 8x8 or 12 wide x 10 high, grey for
    every fifth png; label n % 10 as .cls (even n) or in .json (odd n)."""
    fmt = FORMATS[n % 4]
    w, h = (12, 10) if n % 3 == 0 else (8, 8)
    grey = fmt == "png" and n % 5 == 0
    if fmt == "npy":
        data = shards.npy_bytes(np.full((h, w, 3), value(n), dtype=np.uint8))  # H x W x C, as other writers do
    else:
        buf = io.BytesIO()
        Image.new("L" if grey else "RGB", (w, h), value(n) if grey else (value(n),) * 3).save(buf, PIL_NAMES[fmt])
        data = buf.getvalue()
    out = {"__key__": f"{n:09d}", fmt: data}
    if n % 2 == 0:
        out["cls"] = str(n % 10).encode()
    else:
        out["json"] = json.dumps({"label": n % 10, "url": f"http://x/{n}.jpg", "width": w}).encode()
    return out


def write_tar(path: Path, samples) -> None:
    with tarfile.open(path, "w") as tar:  # tarfile's default (pax) format, real mtimes: not our writer
        for s in samples:
            for suffix, data in s.items():
                if suffix != "__key__":
                    info = tarfile.TarInfo(f"{s['__key__']}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def write_foreign(root: Path) -> Path:
    """root/train/0000{0..3}.tar (ShardWriter, then tarfile) and root/val/0000{0,1}.tar (tarfile)."""
    import webdataset as wds

    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    n = 0
    with wds.ShardWriter(str(root / "train" / "%05d.tar"), maxcount=TRAIN[0], verbose=0) as sink:
        for _ in range(sum(TRAIN[:3])):
            sink.write(sample(n))
            n += 1
    write_tar(root / "train" / "00003.tar", [sample(i) for i in range(n, n + TRAIN[3])])
    n = 100_000
    for s, size in enumerate(VAL):
        write_tar(root / "val" / f"{s:05d}.tar", [sample(i) for i in range(n, n + size)])
        n += size
    return root


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """(shard root, index directory) with train and val indexed into one manifest."""
    root = write_foreign(tmp_path_factory.mktemp("foreign"))
    idx = root / "index"
    for split in ("train", "val"):
        assert prepare_main(["index", "--source", str(root / split), "--split", split, "--out", str(idx),
                             "--workers", "2", "--no-progress"]) == 0
    return root, idx


def cfg_for(idx: Path, **kw):
    base = dict(train=str(idx / "manifest.json"), val=str(idx / "manifest.json"), image_size=8, channels=3,
                batch_size=8)
    base.update(kw)
    return data_cfg(idx, **base)


def check_batch(batch) -> None:
    """Every image is the flat value its key encodes, converted to 3 x 8 x 8; labels from .cls or .json."""
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, 8, 8)
    n = torch.tensor([int(k) for k in batch["key"]])
    want = torch.tensor([value(int(i)) for i in n], dtype=torch.float32)
    err = (batch["image"].float() - want[:, None, None, None]).abs().amax(dim=(1, 2, 3))
    assert (err <= 3).all(), err  # jpg / webp are lossy; the flat images stay flat through centre-crop
    assert torch.equal(batch["label"], n % 10)


def test_index_counts_hashes_members_and_shapes(foreign):
    root, idx = foreign
    manifest = json.loads((idx / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert [s["samples"] for s in train["shards"]] == list(TRAIN) and train["total"] == sum(TRAIN)
    assert [s["samples"] for s in manifest["splits"]["val"]["shards"]] == list(VAL)
    for s in train["shards"]:  # points at the originals, hashed whole
        assert s["sha256"] == shards.sha256_file(Path(s["name"])) and Path(s["name"]).parent == root / "train"
    assert sorted(p.name for p in idx.iterdir()) == ["manifest.json"]  # nothing copied
    n = range(sum(TRAIN))
    assert train["members"] == {**Counter(FORMATS[i % 4] for i in n), "cls": 74, "json": 73}
    want = Counter(f"{1 if FORMATS[i % 4] == 'png' and i % 5 == 0 else 3}x{10 if i % 3 == 0 else 8}x"
                   f"{12 if i % 3 == 0 else 8}" for i in n)
    assert train["shapes"] == dict(want) and len(want) == 4 and train["shape"] is None


@pytest.mark.parametrize("shards_of", ["foreign", "gzipped"])
@pytest.mark.parametrize("world", [1, 2])
def test_exact_mode_after_index(shards_of, world, request):
    """2 loader workers per rank: equal batches, no training sample twice, every validation sample once,
    images converted and labelled right; gzip shards too (streamed, their sha256 checked on the way)."""
    _, idx = request.getfixturevalue(shards_of)
    cfg = cfg_for(idx)
    n = sum(TRAIN) // (world * 8)
    train, val = [], []
    for r in range(world):
        dm = module_for(cfg, world, r)
        assert dm.input_shape == (3, 8, 8) and dm.source("train").counts == TRAIN
        batches = list(dm.train_dataloader())
        assert len(batches) == n and all(len(b["key"]) == 8 for b in batches)
        for b in batches:
            check_batch(b)
        train += [k for b in batches for k in b["key"]]
        vb = list(dm.val_dataloader())
        for b in vb:
            check_batch(b)
        val += [k for b in vb for k in b["key"]]
    assert len(train) == len(set(train)) == world * n * 8
    assert sorted(val) == [f"{i:09d}" for i in range(100_000, 100_000 + sum(VAL))]


def test_mid_epoch_resume_is_exact(foreign):
    _, idx = foreign
    cfg = cfg_for(idx, shuffle_buffer=16)
    reference = keys_of(module_for(cfg).train_dataloader())
    for stop in (1, 7, len(reference) - 1):
        loader = module_for(cfg).train_dataloader()
        it = iter(loader)
        seen = [list(next(it)["key"]) for _ in range(stop)]
        state = loader.state_dict()
        del it
        resumed = module_for(cfg).train_dataloader()
        resumed.load_state_dict(state)
        assert seen + keys_of(resumed) == reference, stop


@pytest.mark.slow
def test_two_gloo_ranks_two_workers_equal_exact_and_resumed(foreign, tmp_path):
    """Real ranks (gloo, an all-reduce per batch as DDP does) with 2 loader workers each, over the index."""
    _, idx = foreign
    cfg = {"train": str(idx / "manifest.json"), "val": str(idx / "manifest.json"), "image_size": 8,
           "channels": 3, "batch_size": 8}
    mp.spawn(foreign_rank_main, args=(2, str(tmp_path / "init"), json.dumps(cfg), str(tmp_path), 5), nprocs=2,
             join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    n = sum(TRAIN) // 16
    assert [len(r["train"]) for r in results] == [n, n]
    keys = [k for r in results for b in r["train"] for k in b]
    assert len(keys) == len(set(keys)) == 2 * n * 8
    assert [r["resumed"] for r in results] == [r["train"][5:] for r in results]  # from batch 5, per rank
    val = Counter(k for r in results for b in r["val"] for k in b)
    assert len(val) == sum(VAL) and set(val.values()) == {1}


def test_pipe_urls_are_not_indexed(foreign, tmp_path, capsys):
    """`pipe:` shards are not written into a manifest (training refuses manifests that run commands:
    tests/test_hostile_data.py); one line says so and what to do instead."""
    root, _ = foreign
    pipe_idx = tmp_path / "pipe_index"
    pattern = f"pipe:cat {root}/train/{{00000..00003}}.tar"
    assert prepare_main(["index", "--source", pattern, "--out", str(pipe_idx), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "may not hold pipe: commands" in err
    assert not (pipe_idx / "manifest.json").exists()


def test_streaming_without_index(foreign):
    """No manifest: the streaming mode (data.steps_per_epoch) reads the same foreign shards."""
    root, _ = foreign
    cfg = data_cfg(root, train=str(root / "train" / "{00000..00003}.tar"), val=str(root / "val"), image_size=8,
                   channels=3, batch_size=8, steps_per_epoch=6)
    dm = module_for(cfg, 2, 1)
    assert dm.source("train").counts is None
    batches = list(dm.train_dataloader())
    assert len(batches) == 6
    for b in batches + list(dm.val_dataloader()):
        check_batch(b)


def test_input_shape_comes_from_the_config_without_reading(tmp_path):
    cfg = data_cfg(tmp_path, train="pipe:exit 1", image_size=16, channels=1)  # unreadable if it were read
    assert ShardDataModule(cfg).input_shape == (1, 16, 16)
    with pytest.raises(DataSetupError, match="pipe:exit 1"):  # without both set, it must read a sample
        _ = ShardDataModule(data_cfg(tmp_path, train="pipe:exit 1", image_size=16)).input_shape


def test_mixed_shapes_need_image_size(foreign):
    _, idx = foreign
    with pytest.raises(DataSetupError, match=r"images come in 4 shapes .*set data.image_size"):
        module_for(cfg_for(idx, image_size=None, channels=None))
    with pytest.raises(DataSetupError, match=r"in 2 shapes.*3x10x12"):  # channels alone unify only grey/RGB
        module_for(cfg_for(idx, image_size=None))


def test_val_shape_differing_from_train_stops_before_step_one(tmp_path):
    def jpgs(size):
        buf = io.BytesIO()
        Image.new("RGB", (size, size), (90, 90, 90)).save(buf, "JPEG")
        return [{"__key__": f"{size}x{i}", "jpg": buf.getvalue(), "cls": b"1"} for i in range(16)]

    small, big = tmp_path / "small", tmp_path / "big"
    for d, size in ((small, 8), (big, 16)):
        d.mkdir()
        write_tar(d / "00000.tar", jpgs(size))
    assert prepare_main(["index", "--source", str(big), "--split", "val", "--out", str(big), "--no-progress"]) == 0
    cfg = data_cfg(tmp_path, train=str(small / "00000.tar"), val=str(big), steps_per_epoch=1, batch_size=4)
    with pytest.raises(DataSetupError) as e:
        module_for(cfg)  # setup("fit"): before the first training step
    assert str(e.value) == (f"val data {big} has images of shape 3x16x16, training data {small / '00000.tar'} "
                            "3x8x8: set data.image_size and data.channels to convert both to one shape, or use "
                            "matching data")
    dm = module_for(dataclasses.replace(cfg, image_size=8))  # converted: both 3 x 8 x 8
    assert next(iter(dm.val_dataloader()))["image"].shape == (4, 3, 8, 8)


def test_sample_without_image_names_shard_key_members_and_setting(tmp_path):
    bad = tmp_path / "00000.tar"
    write_tar(bad, [sample(0), {"__key__": "000000001", "txt": b"a caption", "cls": b"3"}, sample(2)])
    cfg = data_cfg(tmp_path, train=str(bad), steps_per_epoch=1, batch_size=2, num_workers=0, image_size=8,
                   channels=3)
    with pytest.raises(shards.ShardFormatError) as e:
        list(module_for(cfg).train_dataloader())
    message = str(e.value)
    assert f"{bad}: sample '000000001': no image member (it has cls, txt; data.image_keys is [jpg, " in message
    assert "\n" not in message
    out = tmp_path / "idx"
    assert prepare_main(["index", "--source", str(bad), "--out", str(out), "--no-progress"]) == 2
    assert not out.exists()


@pytest.mark.slow  # ~10 s of loader passes
def test_undecodable_image_raise_names_it_warn_skips_and_counts(tmp_path, capsys):
    samples = [sample(i) for i in range(40)]
    samples[13]["png"] = samples[13]["png"][:20]  # not even a header: `prepare index` names it
    write_tar(tmp_path / "00000.tar", samples)
    assert prepare_main(["index", "--source", str(tmp_path), "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "00000.tar: sample '000000013': undecodable .png member" in err
    samples[13] = sample(13)
    samples[13]["png"] = samples[13]["png"][:45]  # the header reads, the pixels are cut off
    write_tar(tmp_path / "00000.tar", samples)
    assert prepare_main(["index", "--source", str(tmp_path), "--out", str(tmp_path), "--no-progress"]) == 0
    for workers in (0, 2):
        cfg = data_cfg(tmp_path, train=str(tmp_path / "manifest.json"), batch_size=8, num_workers=workers,
                       image_size=8, channels=3)
        with pytest.raises(shards.ShardFormatError, match=r"00000.tar: sample '000000013': undecodable .png"):
            keys_of(module_for(cfg).train_dataloader())
    dm = module_for(data_cfg(tmp_path, train=str(tmp_path / "manifest.json"), batch_size=8, image_size=8,
                             channels=3, on_error="warn"))
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 and all(len(b["key"]) == 8 for b in batches)  # the lost sample is refilled
    assert dm.skipped_samples == 1 and sum(b["skipped"] for b in batches) == 1
    for b in batches:
        check_batch(b)


@pytest.mark.slow
def test_pipeline_train_on_foreign_shards_after_index(foreign, tmp_path):
    """`python -m pipeline.train data.train=INDEX ...` as a user runs it: trains, validates, checkpoints."""
    from tests.helpers.run import TINY, run_train

    _, idx = foreign
    run_dir = tmp_path / "run"
    proc = run_train(TINY + [f"data.train={idx}/manifest.json", f"data.val={idx}/manifest.json", "data.image_size=8",
                             "data.channels=3", "data.batch_size=16", f"run.dir={run_dir}"])
    assert "# done: step 30" in proc.stdout
    val = [float(r["val/elbo"]) for r in csv.DictReader((run_dir / "metrics.csv").open()) if r.get("val/elbo")]
    assert len(val) == 3 and all(math.isfinite(v) and v < 0 for v in val)


def test_resize_modes_and_channel_conversion():
    """center_crop keeps the centre at full height; stretch keeps the whole width; grey is PIL's luma."""
    from pipeline.data.decode import ImageSpec

    rgb = np.zeros((8, 16, 3), np.uint8)
    rgb[:, :4] = (255, 0, 0)  # a red left quarter, the rest blue
    rgb[:, 4:] = (0, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    raw = {"__key__": "k", "png": buf.getvalue()}
    crop = ImageSpec(size=8).decode(raw)[0]
    stretch = ImageSpec(size=8, resize="stretch").decode(raw)[0]
    assert crop.shape == stretch.shape == (3, 8, 8)
    assert (crop[0] == 0).all() and (crop[2] == 255).all()  # the centre 8 columns: all blue
    assert (stretch[0, :, 0] > 200).all() and (stretch[2, :, -1] > 200).all()  # red left, blue right
    grey = ImageSpec(channels=1).decode(raw)[0]
    assert grey.shape == (1, 8, 16) and grey[0, 0, 0] == 76 and grey[0, 0, -1] == 29  # 0.299 R, 0.114 B
    hwc = {"__key__": "k", "npy": shards.npy_bytes(rgb)}  # the same pixels as H x W x C .npy
    assert np.array_equal(ImageSpec(size=8).decode(hwc)[0], crop)


# ------------------------------------------------------------------ gzip-compressed shards (.tar.gz, .tgz)
@pytest.fixture(scope="module")
def gzipped(foreign, tmp_path_factory):
    """The foreign shards gzip-compressed as other tools ship them (.tar.gz and .tgz mixed), indexed."""
    import gzip
    import shutil

    root, _ = foreign
    out = tmp_path_factory.mktemp("gzipped")
    for split in ("train", "val"):
        (out / split).mkdir()
        for i, tar in enumerate(sorted((root / split).glob("*.tar"))):
            suffix = ".tgz" if i % 2 else ".tar.gz"
            with open(tar, "rb") as src, gzip.open(out / split / (tar.stem + suffix), "wb") as dst:
                shutil.copyfileobj(src, dst)
    idx = out / "index"
    for split in ("train", "val"):
        assert prepare_main(["index", "--source", str(out / split), "--split", split, "--out", str(idx),
                             "--workers", "2", "--no-progress"]) == 0
    return out, idx


def test_gzip_shards_are_indexed_with_the_files_own_sha256(gzipped):
    import hashlib

    out, idx = gzipped
    manifest = json.loads((idx / "manifest.json").read_text())
    entries = manifest["splits"]["train"]["shards"]
    assert [e["samples"] for e in entries] == list(TRAIN)
    for e in entries:
        path = Path(shards.shard_location(idx / "manifest.json", manifest, e["name"]))
        assert shards.is_gzip(path.name) and e["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_gzip_shards_stream_without_index(gzipped):
    out, _ = gzipped
    cfg = data_cfg(out, train=str(out / "train"), val=str(out / "val"), image_size=8, channels=3, batch_size=8,
                   steps_per_epoch=6)
    dm = module_for(cfg, 2, 0)
    assert len(dm.source("train").urls) == len(TRAIN) and dm.source("train").counts is None
    batches = list(dm.train_dataloader())
    assert len(batches) == 6
    for b in batches + list(dm.val_dataloader()):
        check_batch(b)


def test_a_damaged_gzip_shard_is_one_line_naming_it(gzipped, tmp_path):
    out, _ = gzipped
    bad = tmp_path / "train"
    bad.mkdir()
    data = (out / "train" / "00001.tgz").read_bytes()
    (bad / "00001.tgz").write_bytes(data[: len(data) // 2] + bytes(64))  # cut and garbled
    cfg = data_cfg(tmp_path, train=str(bad), val=None, image_size=8, channels=3, batch_size=8, steps_per_epoch=4,
                   num_workers=0)
    with pytest.raises(shards.ShardFormatError, match=r"00001\.tgz: unreadable tar data"):
        list(module_for(cfg).train_dataloader())
