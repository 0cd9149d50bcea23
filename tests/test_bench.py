"""pipeline.bench smoke test with tiny sizes: the JSON and its ratio keys. Never asserts speed."""
from __future__ import annotations

import json
import math

import pytest

from pipeline.analysis.bench import main

pytestmark = pytest.mark.slow  # Lightning fits plus two DDP process trees


def test_bench_smoke_writes_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["--presets", "digits", "--steps", "3", "--warmup", "1", "--out", str(out),
               "--data-dir", str(tmp_path / "data"), "--quiet"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert set(r["ratios"]) == {"digits/pipeline_vs_bare", "digits/lightning_floor_vs_bare", "digits/loader_vs_raw",
                                "digits/loader_vs_bytes", "digits/cached_loader_vs_raw", "digits/ddp_2_vs_1",
                                "digits/pipeline_vs_peer_loop"}
    assert all(math.isfinite(v) and v > 0 for v in r["ratios"].values())
    d = r["presets"]["digits"]
    # the val ELBO of both after the same steps, compared with the stated tolerance (4 steps: barely trained)
    e = d["val_elbo"]
    assert e["pipeline"] < 0 and e["peer_loop"] < 0 and e["tolerance"] > 0 and isinstance(e["equal"], bool)
    for key in ("pipeline", "bare", "lightning_floor", "peer_loop"):
        assert d[key]["images_per_s"] > 0
    assert d["loader"]["samples_per_s"] > 0 and d["raw_read"]["samples_per_s"] > 0
    # loader_vs_raw streams through the workers; the configured default holds digits in memory
    assert (d["loader"]["cache"], d["loader"]["cached"]) == ("none", False)
    assert (d["loader_as_configured"]["cache"], d["loader_as_configured"]["cached"]) == ("auto", True)
    files = sum(p.stat().st_size for p in (tmp_path / "data" / "digits").glob("train-*.tar"))
    assert d["file_read"]["bytes_per_sample"] == pytest.approx(files / d["train_images"])
    # The DDP run counts the images of both ranks: twice the per-rank batch per timed step.
    assert d["ddp_2"]["images"] == 2 * d["ddp_1"]["images"] == 2 * 3 * d["batch_size"]
    assert r["device"] == "cpu" and "pipeline" in capsys.readouterr().out


def test_checksum_cost_times_a_first_epoch_each_way(digits_root):
    from pipeline.analysis.bench import checksum_cost
    from pipeline.config import DataConfig
    from pipeline.data import shards

    total = shards.load_manifest(digits_root / shards.MANIFEST)["splits"]["train"]["total"]
    r = checksum_cost(DataConfig(root=str(digits_root), seed=0, pin_memory=False), repeats=1)
    assert r["samples"] == total // 128 * 128  # one whole epoch at the default batch size and 2 workers
    assert len(r["runs_on"]) == len(r["runs_off"]) == 1
    assert r["verify_on_samples_per_s"] > 0 and r["verify_off_samples_per_s"] > 0
    assert math.isfinite(r["cost"])


def test_step_timer_synchronises_only_at_the_window_ends_like_the_bare_loop(monkeypatch):
    """Both loops are timed the same way: one device sync when the window opens (after the warm-up steps) and
    one when it closes (the last step); none in between, where the bare loop has none either."""
    from types import SimpleNamespace

    import torch

    from pipeline.analysis import bench as B

    syncs = []
    monkeypatch.setattr(B, "_sync", lambda device: syncs.append(device))
    timer = B.make_timer(warmup=3, device="cuda")
    trainer = SimpleNamespace(global_step=0, max_steps=10, world_size=2)
    batch = {"image": torch.zeros(4, 1, 2, 2)}
    for step in range(1, 11):
        trainer.global_step = step
        timer.on_train_batch_end(trainer, None, None, batch, step - 1)
        assert len(syncs) == (0 if step < 3 else 1 if step < 10 else 2), step
    r = timer.result()
    assert r["images"] == 7 * 4 * 2 and r["seconds"] > 0


def test_jpeg_draft_decodes_smaller_and_close_to_a_full_decode():
    """Draft mode does change the decode (pixels differ from full decoding) and stays close to it."""
    from pipeline.analysis.bench import jpeg_draft

    r = jpeg_draft(samples=16, stored=256, size=64)
    assert 0 < r["mean_abs_diff"] < 4 and r["max_abs_diff"] < 96
    assert r["draft_samples_per_s"] > 0 and r["full_samples_per_s"] > 0


def test_fashion_like_data_has_fashion_mnist_shape_and_split(tmp_path):
    """The fashion preset's generated images: 1x28x28 uint8 and, after prepare's split, 53,000 training images."""
    import numpy as np

    from pipeline.analysis import bench as B
    from pipeline.data.prepare import split_indices

    path = B.generate_fashion_like(tmp_path / "f.npz", n=500)
    with np.load(path) as f:
        images, labels = f["images"], f["labels"]
    assert images.shape == (500, 1, 28, 28) and images.dtype == np.uint8 and labels.shape == (500,)
    assert images.std() > 20  # structure to learn, not a constant
    assert len(split_indices(B.FASHION_SAMPLES, 0.1, None, 0)["train"]) == 53_000


def test_compare_elbo_states_the_tolerance():
    from pipeline.analysis.bench import compare_elbo

    e = compare_elbo([-250.0, -251.0, -249.0], [-251.0, -252.0], tolerance=0.01, nats=0.5)
    assert e["pipeline"] == -250.0 and e["peer_loop"] == -251.5 and e["difference"] == 1.5
    assert e["tolerance"] == 2.515 and e["equal"]
    assert not compare_elbo([-240.0], [-251.5], tolerance=0.01, nats=0.5)["equal"]
    small = compare_elbo([-25.4], [-25.0], tolerance=0.01, nats=0.5)  # 1% of 25 nats is under the 0.5 nats floor
    assert small["tolerance"] == 0.5 and small["equal"]


def test_profile_rows_add_up_to_the_step(tmp_path, capsys):
    """`python -m pipeline.bench profile`: every row of the table, Lightning's loop included, sums to the step."""
    from pipeline.analysis import step_profile

    out = tmp_path / "profile.json"
    assert step_profile.main(["--presets", "digits", "--steps", "12", "--warmup", "2", "--out", str(out),
                              "--data-dir", str(tmp_path / "data")]) == 0
    r = json.loads(out.read_text())["digits"]
    rows = r["rows_ms_per_step"]
    assert set(rows) == {name for name, _ in step_profile.CATEGORIES}
    assert sum(rows.values()) == pytest.approx(r["ms_per_step"])
    assert all(v > 0 for k, v in rows.items() if not k.startswith("logging"))  # 12 steps: no log row written
    assert r["actions_ms_per_step"]["[optimizer]step"] > 0 and r["unprofiled_ms_per_step"] > 0
    table = capsys.readouterr().out
    assert "| backward |" in table and table.count("| Lightning's loop") == 1
