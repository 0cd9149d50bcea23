"""Hostile and careless data (issue 18, the data layer): a manifest is data and never runs a command nor
reads outside its directory, remote sources that stall or fail end with one line, malformed shards and
images (16-bit PNGs, duplicate keys, lying size fields and .npy headers) are reported or read right, and
`prepare` is safe to kill and to run twice. Each test fails on the code before the fix."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import data_cfg, keys_of, module_for, write_dataset

from pipeline.data import shards
from pipeline.data.sources import DataSetupError

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
