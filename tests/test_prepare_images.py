"""`prepare images` streams: bounded memory (peak RSS measured against a tiny folder), worker processes that
do not change a byte, --format npy|png|jpg read back by the loader, bad files named before anything is
written or with nothing half-written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import shards
from pipeline.data.prepare import main
from pipeline.run.files import is_temp
from tests.helpers.data import data_cfg, module_for

REPO = Path(__file__).resolve().parents[1]


def photo(rng, w: int, h: int) -> np.ndarray:
    """A smooth RGB image (compresses like a photo, unlike noise), H x W x 3."""
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    a = rng.random((3, 3)) * 10
    return ((np.stack([np.sin(a[c, 0] * x + a[c, 1] * y + a[c, 2]) for c in range(3)], -1) + 1) * 127.5).astype(
        np.uint8)


def folder(root: Path, n: int, sizes=((256, 256),), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        im = Image.fromarray(photo(rng, w, h))
        if i % 4 == 3:
            im.save(root / f"{i:05d}.jpg", quality=90)
        else:
            im.save(root / f"{i:05d}.png", compress_level=1)
    return root


# The main process's peak is VmHWM (its ru_maxrss would include the pytest process it was started from: Linux
# carries the high-water mark across exec); the workers are forked, so RUSAGE_CHILDREN is theirs alone.
PEAK_RSS = """
import json, re, resource, sys
from pipeline.data.prepare import main
rc = main(sys.argv[1:])
hwm = int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"rc": rc, "main": hwm, "workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def peak_rss_mib(src: Path, out: Path) -> dict:
    """Peak resident MiB of `prepare images` (default --workers) in a fresh process: the main process and
    its largest worker."""
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, "images", "--source", str(src), "--out", str(out),
                           "--size", "32", "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["rc"] == 0
    return {k: r[k] / 1024 for k in ("main", "workers")}


@pytest.mark.slow
def test_memory_stays_bounded_as_the_folder_grows(tmp_path):
    """400 PNG/JPEG files of 256 x 256 RGB decode to 75 MiB (100 MiB as PIL holds RGB); preparing them must
    not cost more than 20 MiB above preparing 8 of them: holding the folder decoded would."""
    small = peak_rss_mib(folder(tmp_path / "small", 8), tmp_path / "out_small")
    large = peak_rss_mib(folder(tmp_path / "large", 400, seed=1), tmp_path / "out_large")
    decoded = 400 * 256 * 256 * 3 / 2**20
    assert shards.load_manifest(tmp_path / "out_large" / "manifest.json")["num_samples"] == 400
    for who in ("main", "workers"):
        assert large[who] - small[who] < 20 < decoded / 3, (who, small, large)


def test_workers_do_not_change_a_byte_and_the_bar_shows_images_per_second(tmp_path, capsys):
    src = folder(tmp_path / "src", 24, sizes=((40, 30), (30, 50), (64, 64)))
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        assert main(["images", "--source", str(src), "--out", str(out), "--size", "16", "--shard-size", "7",
                     "--workers", str(workers)]) == 0
        outs.append(out)
    assert "img/s" in capsys.readouterr().err  # the progress bar: rate and ETA
    files = sorted(p.name for p in outs[0].iterdir())
    assert len(files) > 4 and files == sorted(p.name for p in outs[1].iterdir())
    assert all((outs[0] / f).read_bytes() == (outs[1] / f).read_bytes() for f in files)


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_compressed_formats_read_back_through_the_loader(tmp_path, fmt):
    src = folder(tmp_path / "src", 40, sizes=((48, 40),))
    ref, out = tmp_path / "npy", tmp_path / fmt
    for dest, extra in ((ref, []), (out, ["--format", fmt, "--quality", "90"])):
        assert main(["images", "--source", str(src), "--out", str(dest), "--size", "32", "--no-progress",
                     "--val-fraction", "0", "--test-fraction", "0", *extra]) == 0
    manifest = shards.load_manifest(out / "manifest.json")
    assert manifest["image_format"] == ("png" if fmt == "png" else "jpg quality 90")

    def members(root):
        with open(root / "train-000000.tar", "rb") as f:
            return list(shards.iter_tar_samples(f, "x"))

    assert {k for s in members(out) for k in s} == {"__key__", fmt}
    size = {root: sum(len(v) for s in members(root) for k, v in s.items() if k != "__key__") for root in (ref, out)}
    assert size[out] < size[ref]  # smooth images compress

    def images(root):
        dm = module_for(data_cfg(root, batch_size=8, shuffle_buffer=0))
        assert dm.input_shape == (3, 32, 32)
        got = {k: im for b in dm.train_dataloader() for k, im in zip(b["key"], b["image"].numpy())}
        return np.stack([got[k] for k in sorted(got)]).astype(int)

    want, have = images(ref), images(out)
    err = np.abs(want - have)
    assert err.max() == 0 if fmt == "png" else err.mean() < 6  # png lossless; jpg close (measured 3.8)


def test_unreadable_file_stops_before_anything_is_written(tmp_path, capsys):
    src = folder(tmp_path / "src", 6, sizes=((20, 20),))
    good = (src / "00002.png").read_bytes()
    (src / "00002.png").write_bytes(good[: len(good) // 2])  # truncated PNG: found by the header pass
    out = tmp_path / "out"
    assert main(["images", "--source", str(src), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{src / '00002.png'}: not a readable image" in err
    assert not out.exists()


def test_pixels_failing_mid_write_leave_no_manifest_and_no_temp_file(tmp_path, capsys):
    src = folder(tmp_path / "src", 30, sizes=((120, 120),))
    good = (src / "00027.jpg").read_bytes()
    (src / "00027.jpg").write_bytes(good[: len(good) * 3 // 4])  # a JPEG's header reads; its pixels do not
    out = tmp_path / "out"
    assert main(["images", "--source", str(src), "--out", str(out), "--no-progress", "--shard-size", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{src / '00027.jpg'}: not a readable image" in err and "no manifest" in err
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if is_temp(p.name)]
