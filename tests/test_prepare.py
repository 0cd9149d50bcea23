"""`python -m pipeline.prepare`: recipes, manifest vs files, determinism, bad inputs, atomicity, locking."""
from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import recipes, shards
from pipeline.data.prepare import PrepareError, ensure_prepared, main, prepare
from pipeline.run.files import is_temp

REPO = Path(__file__).resolve().parents[1]


def read_split(out: Path, split: str):
    """(keys, images, labels, factors) of a split, read back in manifest order."""
    manifest = shards.load_manifest(out / shards.MANIFEST)
    keys, images, labels, factors = [], [], [], []
    for shard in manifest["splits"][split]["shards"]:
        with open(out / shard["name"], "rb") as f:
            got = [shards.decode_sample(s) + (s["__key__"],) for s in shards.iter_tar_samples(f, shard["name"])]
        assert len(got) == shard["samples"]
        for image, label, fac, key in got:
            keys.append(key), images.append(image), labels.append(label), factors.append(fac)
    return keys, np.stack(images), labels, factors


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline.prepare", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_digits_manifest_matches_files(tmp_path):
    out = tmp_path / "digits"
    assert main(["digits", "--out", str(out), "--shard-size", "400", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shape"] == [1, 8, 8] and manifest["dataset"] == "digits"
    assert {k: v["total"] for k, v in manifest["splits"].items()} == {"train": 1437, "val": 180, "test": 180}
    assert shards.verify_dataset(out) == []  # every sha256 matches its file
    names = sorted(p.name for p in out.iterdir() if p.name != shards.WRITE_LOCK)  # the lock stays, as flock's do
    listed = sorted(s["name"] for e in manifest["splits"].values() for s in e["shards"])
    assert names == sorted(listed + ["manifest.json"])
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [400, 400, 400, 237]
    all_keys = []
    for split, entry in manifest["splits"].items():
        keys, images, labels, _ = read_split(out, split)
        assert len(keys) == entry["total"] and images.dtype == np.uint8 and images.shape[1:] == (1, 8, 8)
        all_keys += keys
    assert sorted(all_keys) == [f"{i:07d}" for i in range(1797)]  # every source sample once
    from sklearn.datasets import load_digits
    d = load_digits()
    keys, images, labels, _ = read_split(out, "val")
    i = int(keys[0])
    assert np.array_equal(images[0, 0], np.rint(d.images[i] * 255 / 16).astype(np.uint8)) and labels[0] == d.target[i]
    # tamper with a shard: the manifest catches it
    shard = out / manifest["splits"]["val"]["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[700] ^= 1  # one bit of the first image
    shard.write_bytes(bytes(data))
    assert shards.verify_dataset(out) == [f"{shard}: sha256 differs from the manifest"]


def test_same_inputs_same_bytes(tmp_path):
    for dataset, extra in (("digits", ["--shard-size", "500"]), ("dsprites", ["--limit", "300", "--shard-size", "100"])):
        a, b = tmp_path / f"{dataset}_a", tmp_path / f"{dataset}_b"
        for out in (a, b):
            assert main([dataset, "--out", str(out), "--seed", "3", "--no-progress", *extra]) == 0
        files = sorted(p.name for p in a.iterdir())
        assert files == sorted(p.name for p in b.iterdir()) and len(files) > 3
        assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    c = tmp_path / "digits_c"
    main(["digits", "--out", str(c), "--seed", "4", "--no-progress", "--shard-size", "500"])
    assert (c / "val-000000.tar").read_bytes() != (tmp_path / "digits_a" / "val-000000.tar").read_bytes()


def test_dsprites_factors_and_renderer(tmp_path):
    out = tmp_path / "ds"
    manifest = prepare("dsprites", out, limit=400, shard_size=150, progress=False)
    assert manifest["factors"]["names"] == ["shape", "scale", "orientation", "pos_x", "pos_y"]
    assert manifest["factors"]["sizes"] == [3, 6, 40, 32, 32] and manifest["shape"] == [1, 64, 64]
    keys, images, _, factors = read_split(out, "train")
    factors = np.stack(factors)
    assert factors.shape == (len(keys), 5) and factors.dtype == np.float32
    assert set(np.unique(images)) <= {0, 255} and (images > 0).any(axis=(1, 2, 3)).all()
    assert np.array_equal(factors, recipes.dsprites_factors(np.array([int(k) for k in keys])))
    assert np.array_equal(images, recipes.render_dsprites(factors))
    lo, hi = factors.min(0), factors.max(0)
    assert (lo >= [0, 0.5, 0, 0, 0]).all() and (hi <= [2, 1, 2 * np.pi + 1e-6, 1, 1]).all()
    assert recipes.DSPRITES_TOTAL == 737_280


def write_idx(path: Path, array: np.ndarray, gz: bool):
    data = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    (gzip.open if gz else open)(str(path) + (".gz" if gz else ""), "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_from_idx_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    src = tmp_path / "mnist"
    src.mkdir()
    train, test = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    write_idx(src / "train-images-idx3-ubyte", train, gz)
    write_idx(src / "train-labels-idx1-ubyte", np.arange(50, dtype=np.uint8) % 10, gz)
    write_idx(src / "t10k-images-idx3-ubyte", test, gz)
    write_idx(src / "t10k-labels-idx1-ubyte", np.arange(20, dtype=np.uint8) % 10, gz)
    out = tmp_path / "out"
    manifest = prepare("mnist", out, source=str(src), progress=False)
    # test: the official t10k files; val: --val-fraction of all 70 samples, taken from the training files
    assert {k: v["total"] for k, v in manifest["splits"].items()} == {"train": 43, "val": 7, "test": 20}
    keys, images, labels, _ = read_split(out, "test")  # the official test set
    assert sorted(int(k) for k in keys) == list(range(50, 70))
    i = int(keys[0]) - 50
    assert np.array_equal(images[0, 0], test[i]) and labels[0] == i % 10  # not binarised


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw", "float", "bool"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (30, 6, 5, 3), dtype=np.uint8)
    arr = {"nhw": base[..., 0], "nhwc": base, "nchw": base.transpose(0, 3, 1, 2),
           "float": base / 255.0, "bool": base > 127}[layout]
    np.savez(tmp_path / "x.npz", images=arr, labels=np.arange(30))
    prepare("npz", tmp_path / "out", source=str(tmp_path / "x.npz"), progress=False)
    keys, images, labels, _ = read_split(tmp_path / "out", "train")
    want = {"nhw": base[..., :1], "nhwc": base, "nchw": base, "float": base,
            "bool": (base > 127).astype(np.uint8) * 255}[layout].transpose(0, 3, 1, 2)
    idx = [int(k) for k in keys]
    assert np.array_equal(images, want[idx]) and labels == idx


def test_images_folder(tmp_path):
    src = tmp_path / "imgs"
    for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (src / cls).mkdir(parents=True)
        for i, size in enumerate([(20, 10), (12, 12), (9, 30)]):
            Image.new("RGB", size, color).save(src / cls / f"{i}.png")
    Image.new("RGB", (16, 16), (0, 255, 0)).save(src / "dog" / "x.JPG")
    manifest = prepare("images", tmp_path / "out", source=str(src), size=8, val_fraction=0, test_fraction=0,
                       progress=False)
    assert manifest["shape"] == [3, 8, 8] and manifest["classes"] == ["cat", "dog"]
    keys, images, labels, _ = read_split(tmp_path / "out", "train")
    assert len(keys) == 7 and sorted(labels) == [0, 0, 0, 1, 1, 1, 1]
    cat = images[[lab == 0 for lab in labels]]
    assert (cat[:, 0] == 255).all() and (cat[:, 2] == 0).all()


def bad_inputs(tmp_path: Path):
    """(name, argv, what the message must name) for every bad input the issue lists."""
    (tmp_path / "empty").mkdir()
    np.save(tmp_path / "rank1.npy", np.zeros(7, dtype=np.uint8))
    np.save(tmp_path / "hot.npy", np.full((3, 4, 4), 2.0))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("L", (8, 8)).save(mixed / "a.png")
    Image.new("L", (9, 8)).save(mixed / "b.png")
    mn = tmp_path / "mn"
    mn.mkdir()
    write_idx(mn / "train-images-idx3-ubyte", np.zeros((4, 3, 3), np.uint8), False)
    (mn / "train-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01\0\0\0\x04\0")  # says 4 labels, has 1
    return [
        ("missing file", ["npz", "--source", str(tmp_path / "nope.npz")], "nope.npz: file not found"),
        ("wrong rank", ["npz", "--source", str(tmp_path / "rank1.npy")], "rank1.npy: wrong array rank 1"),
        ("floats out of range", ["npz", "--source", str(tmp_path / "hot.npy")], "hot.npy: float values must lie in [0, 1]"),
        ("empty folder", ["images", "--source", str(tmp_path / "empty")], "empty: empty folder"),
        ("mixed sizes", ["images", "--source", str(mixed)], "mixed image sizes"),
        ("truncated idx", ["mnist", "--source", str(mn)], "train-labels-idx1-ubyte: holds 1 data bytes"),
        ("missing idx", ["mnist", "--source", str(tmp_path / "empty")], "missing MNIST file train-images-idx3-ubyte"),
        ("unknown recipe", ["cifar"], "unknown dataset 'cifar'"),
        ("bad fraction", ["digits", "--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
    ]


def test_bad_inputs_one_line_nothing_written(tmp_path, capsys):
    for name, argv, message in bad_inputs(tmp_path):
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        assert main([*argv, "--out", str(out), "--no-progress"]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("vae-prepare: error: ") and message in err, (name, err)
        assert not out.exists(), name
    # and as a real process: exit status 2, one line, no traceback
    proc = run_cli("npz", "--source", str(tmp_path / "rank1.npy"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_a_crash_mid_write_leaves_no_partial_shard_and_no_manifest(tmp_path, monkeypatch):
    out = tmp_path / "d"
    prepare("digits", out, shard_size=300, progress=False)  # an old, complete dataset
    real = recipes.digits

    def failing():
        r = real()
        fetch, calls = r.fetch, []

        def fetch_then_fail(idx):
            calls.append(1)
            if len(calls) > 2:
                raise RuntimeError("killed")
            return fetch(idx)
        r.fetch = fetch_then_fail
        return r
    monkeypatch.setattr(recipes, "digits", failing)
    with pytest.raises(RuntimeError):
        prepare("digits", out, shard_size=300, progress=False, seed=1)
    assert not (out / "manifest.json").exists()  # readers see "not prepared", never a mix
    assert (out / shards.INCOMPLETE).exists()  # training refuses the directory (tests/test_hostile_data.py)
    assert not [p for p in out.iterdir() if p.name.startswith(".")  # no temp files
                and p.name not in (shards.INCOMPLETE, shards.WRITE_LOCK)]
    for tar in out.glob("*.tar"):  # whatever is under a final name is a complete shard
        assert sum(1 for _ in shards.iter_tar_samples(open(tar, "rb"), str(tar))) in (300, 237, 180)


@pytest.mark.slow
def test_sigkill_leaves_only_complete_shards(tmp_path):
    args = ["dsprites", "--limit", "12000", "--shard-size", "1000", "--no-progress"]
    ref = tmp_path / "ref"
    assert run_cli(*args, "--out", str(ref)).returncode == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.prepare", *args, "--out", str(out)], cwd=REPO)
    deadline = time.time() + 60
    while time.time() < deadline and not (out.is_dir() and len(list(out.glob("train-*.tar"))) >= 2):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    finals = [f for f in out.glob("*.tar") if not is_temp(f.name)]
    assert 2 <= len(finals) < len(list(ref.glob("*.tar")))  # killed part-way
    assert all(f.read_bytes() == (ref / f.name).read_bytes() for f in finals)


def test_ensure_prepared_one_writer(tmp_path):
    """Two processes start at once: one prepares under the lock, the other waits and reuses it."""
    root = tmp_path / "digits"
    log = tmp_path / "writers.log"
    code = (
        "import sys, pipeline.data.prepare as P\n"
        "from pipeline.config import DataConfig\n"
        "real = P.prepare\n"
        "def logged(*a, **k):\n"
        f"    open({str(log)!r}, 'a').write('x\\n')\n"
        "    return real(*a, **k)\n"
        "P.prepare = logged\n"
        f"print(P.ensure_prepared(DataConfig(dataset='digits', root={str(root)!r}, seed=0)))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs == [str(root / "manifest.json")] * 2
    assert log.read_text() == "x\n" and shards.verify_dataset(root) == []
    with pytest.raises(PrepareError, match="needs a source: run `python -m pipeline.prepare mnist"):
        from pipeline.config import DataConfig
        ensure_prepared(DataConfig(dataset="mnist", root=str(tmp_path / "m")))
