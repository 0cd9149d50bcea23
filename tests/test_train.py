"""The training entry point end to end: outputs, W&B offline runs, exact resume (1 process and 2 DDP ranks)."""
from __future__ import annotations

import math
import re

import pytest
import torch

from pipeline.config import load_config
from pipeline.training.train import train
from tests.helpers.run import EMA_CLIP_SKIP, EXACT, assert_same_run, read_metrics, run_train

pytestmark = pytest.mark.slow


def test_default_run_writes_config_metrics_checkpoints_images_and_offline_wandb(tiny_overrides, tmp_path):
    run_dir = tmp_path / "run"
    secret = "sk-test-0123456789abcdef-not-a-real-key"
    proc = run_train(tiny_overrides + ["logger.wandb.mode=offline"], env_extra={"WANDB_API_KEY": secret})
    assert f"# run       {run_dir}" in proc.stdout and "# done: step 30" in proc.stdout

    assert load_config([run_dir / "config.yaml"]).trainer.max_steps == 30
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if r.get("train/loss")]
    val_rows = [r for r in rows if r.get("val/elbo")]
    assert train_rows and val_rows
    # val after steps 10, 20, 30 (Lightning logs the k-th step under step k - 1, as W&B shows it)
    assert [int(r["step"]) for r in val_rows] == [9, 19, 29]
    assert all(math.isfinite(float(r["val/elbo"])) and float(r["val/elbo"]) < 0 for r in val_rows)
    assert {"val/kl", "val/recon", "val/active_units", "train/kl_weight", "val/kl_dim_0"} <= set(rows[0])

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 30
    assert list((run_dir / "checkpoints").glob("best-step*.ckpt"))
    for kind in ("reconstructions", "samples", "traversals"):
        assert len(list((run_dir / "images").glob(f"{kind}_step*.png"))) >= 3

    offline = list((run_dir / "wandb").glob("offline-run-*"))
    run_id = (run_dir / "wandb_run_id.txt").read_text().split()[0]
    assert len(offline) == 1 and offline[0].name.endswith(run_id)
    assert any(offline[0].rglob("*.wandb"))

    # No secret in any log, config dump, checkpoint or W&B file.
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f"secret leaked into {f}"


# A resumed run keeps its W&B run: tests/test_secrets.py::
# test_a_resumed_offline_run_keeps_one_wandb_history_and_writes_the_key_nowhere (the same two offline runs, also
# grepped for the key).


def test_exact_resume_single_process(tiny_overrides, tmp_path):
    base = tiny_overrides + EXACT
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    train(load_config([], base + [f"run.dir={ref_dir}"]))
    train(load_config([], base + [f"run.dir={cut_dir}", "trainer.max_steps=17"]))  # mid-epoch
    assert torch.load(cut_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 17
    train(load_config([], base + [f"run.dir={cut_dir}"]))
    assert_same_run(ref_dir, cut_dir, first_step=17, last_step=30)


# EMA_CLIP_SKIP on; the cut run is a finished run (its EMA copied into the module at its end, as Lightning
# does) extended by a larger trainer.max_steps


def test_exact_resume_with_ema_clipping_and_skipping(tiny_overrides, tmp_path):
    base = tiny_overrides + EXACT + EMA_CLIP_SKIP
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    train(load_config([], base + [f"run.dir={ref_dir}"]))
    train(load_config([], base + [f"run.dir={cut_dir}", "trainer.max_steps=17"]))
    cut = torch.load(cut_dir / "checkpoints" / "last.ckpt", weights_only=False)
    train(load_config([], base + [f"run.dir={cut_dir}"]))
    assert_same_run(ref_dir, cut_dir, first_step=17, last_step=30)
    last = torch.load(ref_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert 0 < last["skipped_steps"] < 30 and int(last["averaging_state"]["n_averaged"]) == 30
    key = "vae.encoder.1.0.weight"
    assert not torch.equal(last["state_dict"][key], last["current_model_state"][key])  # EMA != trained
    assert not torch.equal(last["current_model_state"][key], cut["current_model_state"][key])  # trained on
    skipped = [float(r["train/skipped_steps"]) for r in read_metrics(ref_dir) if r.get("train/skipped_steps")]
    assert skipped == sorted(skipped) and skipped[-1] == last["skipped_steps"]


# With EMA, clipping and skipping (they add state to the exact resume); plain 2-rank exact resume, streamed
# from a directory of shards: tests/test_autoindex.py
def test_exact_resume_two_ddp_ranks_with_ema_clipping_and_skipping(tiny_overrides, tmp_path):
    ddp = ["trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=32"]
    base = tiny_overrides + EXACT + ddp + EMA_CLIP_SKIP
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    run_train(base + [f"run.dir={ref_dir}"])
    run_train(base + [f"run.dir={cut_dir}", "trainer.max_steps=13"])
    proc = run_train(base + [f"run.dir={cut_dir}"])
    assert "(step 13)" in proc.stdout
    assert_same_run(ref_dir, cut_dir, first_step=13, last_step=30)


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(tiny_overrides, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(tiny_overrides + ["optim.lr=1e30", "checkpoint.every_n_steps=1",
                                       "model.likelihood=gaussian"], check=False)
    assert proc.returncode != 0
    stop = re.search(r"non-finite training loss \(\S+\) at global_step (\d+)", proc.stderr)
    assert stop, proc.stderr[-3000:]
    assert "last good checkpoint" in proc.stderr
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] >= 1  # the latest checkpoint is intact and loadable
    # and holds no weights trained on that loss (step s trains the weights saved as step s + 1)
    assert ckpt["global_step"] <= int(stop.group(1))
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_corrupt_shard_is_skipped_and_counted_under_warn(digits_root, tiny_overrides, tmp_path):
    import shutil

    data = tmp_path / "digits"
    shutil.copytree(digits_root, data)
    shard = sorted(data.glob("train-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated mid-file
    base = tiny_overrides + [f"data.root={data}", "trainer.max_steps=25", "trainer.log_every_n_steps=1"]
    with pytest.raises(Exception, match=shard.name):  # default on_error=raise names the shard
        train(load_config([], base + [f"run.dir={tmp_path / 'raise'}"]))
    run_dir = tmp_path / "warn"
    train(load_config([], base + [f"run.dir={run_dir}", "data.on_error=warn"]))
    skipped = [float(r["data/skipped_samples"]) for r in read_metrics(run_dir) if r.get("data/skipped_samples")]
    assert skipped and skipped[-1] > 0 and skipped == sorted(skipped)  # a running count


def test_every_run_ends_with_a_validation_and_images_at_its_last_step(tiny_overrides, tmp_path):
    """A short run whose last step is not a validation step still ends with val metrics and grids there,
    and a last step that is one validates once."""
    kinds = ("reconstructions", "samples", "traversals")
    short = tmp_path / "short"  # validation every 500 steps, 25 steps: only the final one
    metrics = train(load_config([], tiny_overrides + [f"run.dir={short}", "trainer.max_steps=25",
                                                      "trainer.val_check_interval=500",
                                                      "logger.images_every_n_steps=500"]))
    assert math.isfinite(metrics["val/elbo"])
    assert [int(r["step"]) for r in read_metrics(short) if r.get("val/elbo")] == [24]
    assert all((short / "images" / f"{k}_step0000025.png").is_file() for k in kinds)

    every10 = tmp_path / "every10"  # validation and images every 10: steps 10, 20 and the last, 25
    train(load_config([], tiny_overrides + [f"run.dir={every10}", "trainer.max_steps=25"]))
    assert [int(r["step"]) for r in read_metrics(every10) if r.get("val/elbo")] == [9, 19, 24]
    assert sorted(p.name for p in (every10 / "images").glob("samples_*")) == [
        "samples_step0000010.png", "samples_step0000020.png", "samples_step0000025.png"]
