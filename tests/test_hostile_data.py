"""Hostile and careless data (issue 18, the data layer): a manifest is data and never runs a command nor
reads outside its directory, remote sources that stall or fail end with one line, malformed shards and
images (16-bit PNGs, duplicate keys, lying size fields and .npy headers) are reported or read right, and
`prepare` is safe to kill and to run twice. Each test fails on the code before the fix."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import shards
from pipeline.data.sources import DataSetupError
from tests.helpers.data import data_cfg, keys_of, module_for, write_dataset

REPO = Path(__file__).resolve().parents[1]


def edit_manifest(root: Path, edit) -> Path:
    path = root / shards.MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return path


def train_source_error(cfg) -> str:
    """The one-line DataSetupError building the training loader raises (and iterating it, should it not)."""
    with pytest.raises(DataSetupError) as e:
        dm = module_for(cfg)
        keys_of(dm.train_dataloader())
    return str(e.value)


# ---------------------------------------------------------------------------- a manifest is data
@pytest.mark.slow  # a real training run (or several processes)
def test_manifest_pipe_entry_never_runs(tmp_path):
    root = tmp_path / "ds"
    write_dataset(root, {"train": [40, 40], "val": [16]})
    planted = tmp_path / "PWNED"
    edit_manifest(root, lambda m: m["splits"]["train"]["shards"][0].update(
        name=f"pipe:touch {planted}; cat {root}/train-000000.tar"))
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", f"data.root={root}", "trainer.accelerator=cpu",
                           "trainer.max_steps=2", "logger.wandb.mode=disabled", f"run.dir={tmp_path / 'run'}",
                           "data.batch_size=8"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert not planted.exists()
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "manifest.json" in err[0] and "pipe:touch" in err[0] and "pipe: command" in err[0]


@pytest.mark.parametrize("name", ["../outside/train-000000.tar", "sub/../../outside/train-000000.tar",
                                  "/etc/passwd", "file:///etc/passwd"])
def test_manifest_entry_outside_its_directory_is_refused(tmp_path, name):
    root = tmp_path / "ds"
    write_dataset(root, {"train": [40]})
    write_dataset(tmp_path / "outside", {"train": [40]})
    edit_manifest(root, lambda m: m["splits"]["train"]["shards"][0].update(name=name))
    message = train_source_error(data_cfg(root, batch_size=8))
    assert str(root / "manifest.json") in message and name in message and "\n" not in message


def test_manifest_link_out_of_its_directory_is_refused(tmp_path):
    root = tmp_path / "ds"
    write_dataset(root, {"train": [40]})
    (root / "secret.tar").symlink_to("/etc/passwd")
    edit_manifest(root, lambda m: m["splits"]["train"]["shards"][0].update(name="secret.tar"))
    assert "outside" in train_source_error(data_cfg(root, batch_size=8))


def test_error_about_a_non_tar_file_does_not_echo_its_bytes(tmp_path):
    root = tmp_path / "ds"
    write_dataset(root, {"train": [40]})
    secret = b"SECRET" * 400
    (root / "train-000000.tar").write_bytes(secret)
    edit_manifest(root, lambda m: m["splits"]["train"]["shards"][0].update(sha256=None))
    with pytest.raises(shards.ShardFormatError) as e:
        keys_of(module_for(data_cfg(root, batch_size=8)).train_dataloader())
    assert "SECRET" not in str(e.value) and "CRET" not in str(e.value)
    assert "train-000000.tar" in str(e.value)


def test_manifest_listing_a_shard_twice_is_refused(tmp_path):
    root = tmp_path / "ds"
    write_dataset(root, {"train": [40, 40]})

    def twice(m):
        entry = m["splits"]["train"]
        entry["shards"][1] = dict(entry["shards"][0])
        entry["total"] = 80
    edit_manifest(root, twice)
    message = train_source_error(data_cfg(root, batch_size=8))
    assert "train-000000.tar is listed twice" in message


@pytest.mark.parametrize("field, value", [
    ("samples", "40"), ("samples", None), ("samples", -3), ("name", 7), ("name", ["a"]), ("sha256", 12),
    ("shard", "notadict"), ("total", "80"), ("shape", "1x4x4"), ("entry", [1, 2]),
])
def test_manifest_fields_of_the_wrong_type_are_one_line(tmp_path, field, value):
    root = tmp_path / "ds"
    write_dataset(root, {"train": [40, 40]})

    def edit(m):
        entry = m["splits"]["train"]
        if field == "shard":
            entry["shards"][0] = value
        elif field == "total":
            entry["total"] = value
        elif field == "shape":
            entry["shape"] = value
        elif field == "entry":
            m["splits"]["train"] = value
        else:
            entry["shards"][0][field] = value
    edit_manifest(root, edit)
    message = train_source_error(data_cfg(root, batch_size=8))
    assert str(root / "manifest.json") in message and "\n" not in message


# ---------------------------------------------------------------------------- lying shards
def write_members(path: Path, members) -> None:
    """A tar of (name, bytes) members, in order, as other tools might write it."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def foreign_dataset(root: Path, members, samples: int) -> Path:
    """root/train-000000.tar of `members` plus a manifest listing it with `samples` samples (no sha256)."""
    root.mkdir(parents=True, exist_ok=True)
    write_members(root / "train-000000.tar", members)
    manifest = {"format": shards.FORMAT, "shape": [1, 4, 4], "splits": {"train": {
        "total": samples, "shape": [1, 4, 4], "shards": [{"name": "train-000000.tar", "samples": samples}]}}}
    (root / shards.MANIFEST).write_text(json.dumps(manifest))
    return root


def good(i: int) -> list:
    return [(f"k{i:04d}.npy", shards.npy_bytes(np.full((1, 4, 4), i % 256, np.uint8))), (f"k{i:04d}.cls", b"1")]


def test_npy_header_claiming_112_gib_is_one_error_not_an_allocation(tmp_path):
    huge = shards.npy_bytes(np.zeros((1, 4, 4), np.uint8)).replace(b"(1, 4, 4)", b"(3, 200000, 200000)")
    members = [m for i in range(20) for m in good(i)] + [("k0020.npy", huge), ("k0020.cls", b"1")]
    root = foreign_dataset(tmp_path / "ds", members, 21)
    with pytest.raises(shards.ShardFormatError) as e:
        keys_of(module_for(data_cfg(root, batch_size=7)).train_dataloader())
    assert "train-000000.tar" in str(e.value) and "k0020" in str(e.value) and "header says" in str(e.value)


def test_tar_size_field_of_2_to_the_80_is_one_error(tmp_path):
    members = [m for i in range(20) for m in good(i)]
    root = foreign_dataset(tmp_path / "ds", members, 20)
    path = root / "train-000000.tar"
    raw = bytearray(path.read_bytes())
    at = 512 * 2 * 10  # the header of sample k0010's first member
    raw[at + 124:at + 136] = b"\x80" + (1 << 80).to_bytes(11, "big")  # GNU base-256 size
    raw[at + 148:at + 156] = b" " * 8
    raw[at + 148:at + 156] = f"{sum(raw[at:at + 512]):06o}\0 ".encode()
    path.write_bytes(bytes(raw))
    with pytest.raises(shards.ShardFormatError) as e:
        keys_of(module_for(data_cfg(root, batch_size=5)).train_dataloader())
    assert "train-000000.tar" in str(e.value) and "truncated member data" in str(e.value)


@pytest.mark.parametrize("where", ["later", "adjacent"])
def test_duplicate_sample_key_names_shard_and_key_or_is_skipped_and_counted(tmp_path, where):
    members = [m for i in range(20) for m in good(i)]
    dup = [("k0005.npy", shards.npy_bytes(np.full((1, 4, 4), 99, np.uint8))), ("k0005.cls", b"2")]
    if where == "later":  # k0005 again after k0019: 21 samples as webdataset groups them
        members, samples, batch = members + dup, 21, 7
    else:  # k0005's members twice in a row: one sample holding two images (the second won)
        members, samples, batch = members[:12] + dup + members[12:], 20, 5
    root = foreign_dataset(tmp_path / "ds", members, samples)
    with pytest.raises(shards.ShardFormatError) as e:
        keys_of(module_for(data_cfg(root, batch_size=batch)).train_dataloader())
    assert "train-000000.tar" in str(e.value) and "'k0005'" in str(e.value) and "duplicate" in str(e.value)
    batches = list(module_for(data_cfg(root, batch_size=batch, on_error="warn")).train_dataloader())
    assert len(batches) == samples // batch and sum(int(b["skipped"]) for b in batches) == 1
    assert all(b["image"].shape == (batch, 1, 4, 4) for b in batches)
    assert 99 not in {int(b["image"][i].max()) for b in batches for i in range(batch)}  # the duplicate's image


# ---------------------------------------------------------------------------- remote sources
def train_cli(tmp_path, *args, timeout=90) -> subprocess.CompletedProcess:
    """`python -m pipeline.train` as a user runs it, on a tiny model for two steps; stops a hang at `timeout`."""
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.train", "trainer.accelerator=cpu", "trainer.max_steps=2",
                           "logger.wandb.mode=disabled", f"run.dir={tmp_path / 'run'}", "data.batch_size=8",
                           "model.hidden_dims=[16]", "model.latent_dim=2", "data.image_size=4", "data.channels=1",
                           "data.steps_per_epoch=2", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def error_line_only(proc) -> str:
    """The run ended with status 2 and one `error:` line, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    return last


@pytest.fixture
def shard_dir(tmp_path):
    root = tmp_path / "ds"
    write_dataset(root, {"train": [40, 40]})
    return root


@pytest.mark.slow
def test_stalled_pipe_source_ends_after_read_timeout(tmp_path, shard_dir):
    """A source that sends part of a shard, then nothing: data.read_timeout later, one line naming it
    (was: blocked for ever)."""
    url = f"pipe:head -c 2600 {shard_dir}/train-000000.tar; exec sleep 300"
    proc = train_cli(tmp_path, f"data.train={url}", "data.read_timeout=2")
    line = error_line_only(proc)
    assert url in line and "sent nothing for 2 s (data.read_timeout)" in line


@pytest.mark.slow
def test_pipe_source_exiting_non_zero_is_one_line_and_skipped_under_warn(tmp_path, shard_dir):
    script = tmp_path / "fetch.sh"  # shard 1 fails after 4 samples with status 3
    script.write_text(f'if [ "$1" = 0 ]; then cat {shard_dir}/train-000000.tar; '
                      f'else head -c 9000 {shard_dir}/train-000001.tar; exit 3; fi\n')
    url = f"pipe:sh {script} 1"
    line = error_line_only(train_cli(tmp_path, f"data.train={url}"))
    assert url in line and "exited with status 3" in line
    proc = train_cli(tmp_path, f"data.train=pipe:sh {script} {{0..1}}", "data.on_error=warn", "resume=never")
    assert proc.returncode == 0 and "# done" in proc.stdout, proc.stderr[-3000:]
    assert "skipping unreadable data" in proc.stderr and "exited with status 3" in proc.stderr


@pytest.mark.slow
def test_http_connection_refused_is_one_line(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/train-000000.tar"
    line = error_line_only(train_cli(tmp_path, f"data.train={url}"))
    assert url in line and "could not connect" in line


# ---------------------------------------------------------------------------- images
def png16(value: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(value.astype(np.uint16)).save(buf, "PNG")
    return buf.getvalue()


GREY16 = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535 in steps of 257


def test_16_bit_png_is_scaled_to_8_bits_in_the_loader(tmp_path):
    members = [(f"k{i:04d}.png", png16(GREY16)) for i in range(8)]
    root = foreign_dataset(tmp_path / "ds", members, 8)
    edit_manifest(root, lambda m: (m.update(shape=[1, 16, 16]), m["splits"]["train"].update(shape=[1, 16, 16])))
    batch = next(iter(module_for(data_cfg(root, batch_size=8)).train_dataloader()))
    image = np.asarray(batch["image"])
    assert image.shape == (8, 1, 16, 16)
    assert (image == (GREY16 >> 8).astype(np.uint8)).all()  # was: 255 wherever the value was over 255


def test_16_bit_png_is_scaled_to_8_bits_by_prepare_images(tmp_path):
    from pipeline.data.prepare import main as prepare_main

    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        (src / f"{i}.png").write_bytes(png16(GREY16))
    assert prepare_main(["images", "--source", str(src), "--out", str(tmp_path / "out"), "--no-progress",
                         "--workers", "1", "--val-fraction", "0", "--test-fraction", "0"]) == 0
    with open(tmp_path / "out" / "train-000000.tar", "rb") as f:
        sample = next(shards.iter_tar_samples(f, "train-000000.tar"))
    assert (shards.decode_npy(sample["npy"])[0] == (GREY16 >> 8).astype(np.uint8)).all()


# ---------------------------------------------------------------------------- what a run says
@pytest.mark.slow
def test_summary_names_the_data_at_data_root(tmp_path, shard_dir):
    """`# data` names what data.root holds (was: `digits (<root>)` for any root, foreign shards included)."""
    from pipeline.data.prepare import main as prepare_main

    idx = tmp_path / "idx"
    assert prepare_main(["index", "--source", str(shard_dir), "--out", str(idx), "--no-progress", "--workers", "1"]) == 0
    proc = train_cli(tmp_path, f"data.root={idx}", "data.train=null")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("# data"))
    assert line.startswith(f"# data      indexed shards ({idx}): 80 train"), line


# ---------------------------------------------------------------------------- prepare: killed, or twice
@pytest.mark.slow  # a real training run (or several processes)
def test_killed_prepare_is_refused_by_training_a_second_writer_is_named_and_a_rerun_starts_over(tmp_path):
    import os
    import signal
    import socket
    import time

    out = tmp_path / "ds"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, "-m", "pipeline.prepare", "dsprites", "--out", str(out), "--limit",
                              "400000", "--shard-size", "300", "--no-progress", "--workers", "1"],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (out / "train-000001.tar").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "pipeline.prepare", "digits", "--out", str(out),
                                 "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and f"pid {first.pid} on host {socket.gethostname()}" in err[0], err
        assert first.poll() is None  # the first writer was left alone
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not (out / "manifest.json").exists() and (out / "train-000000.tar").exists()
    message = train_source_error(data_cfg(tmp_path, train=str(out), steps_per_epoch=2, batch_size=8))
    assert str(out) in message and "has not finished" in message and "\n" not in message
    with pytest.raises(DataSetupError, match="has not finished"):  # a brace pattern of its shards too
        module_for(data_cfg(tmp_path, train=f"{out}/train-{{000000..000001}}.tar", steps_per_epoch=2))

    rerun = subprocess.run([sys.executable, "-m", "pipeline.prepare", "digits", "--out", str(out), "--no-progress"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {s["name"] for e in manifest["splits"].values() for s in e["shards"]}
    assert {p.name for p in out.glob("*.tar")} == listed  # the killed run's shards are gone
    assert not (out / shards.INCOMPLETE).exists()
    assert keys_of(module_for(data_cfg(tmp_path, train=str(out))).train_dataloader())


# ---------------------------------------------------------------------------- prepare images
def test_prepare_images_reads_every_pil_format_and_says_what_it_found_skipped_and_labelled(tmp_path, capsys):
    from PIL import Image

    from pipeline.data.prepare import main as prepare_main

    src = tmp_path / "src"
    (src / "cats").mkdir(parents=True)
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    for i, fmt in enumerate(["png", "webp", "bmp", "tif", "gif", "ppm"]):
        Image.fromarray(grey).convert("RGB").save(src / ("cats" if i % 2 else "") / f"{i}.{fmt}")
    (src / "notes.txt").write_text("not an image")
    assert prepare_main(["images", "--source", str(src), "--out", str(tmp_path / "out"), "--no-progress",
                         "--workers", "1", "--val-fraction", "0", "--test-fraction", "0"]) == 0
    err = capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["total"] == 6  # was 1: .webp .bmp .tif .gif .ppm ignored
    assert "found 6 images" in err and "skipped 1 other files (.txt 1)" in err
    assert "no labels: images at mixed depths (3 at depth 0, 3 at depth 1)" in err


def test_prepare_images_stops_on_an_unreadable_path_naming_it(tmp_path, capsys):
    from PIL import Image

    from pipeline.data.prepare import main as prepare_main

    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(src / f"{i}.png")
    (src / "gone.png").symlink_to(tmp_path / "nowhere.png")  # was: skipped silently
    out = tmp_path / "out"
    assert prepare_main(["images", "--source", str(src), "--out", str(out), "--no-progress", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(src / "gone.png") in err[0] and not (out / "manifest.json").exists()
