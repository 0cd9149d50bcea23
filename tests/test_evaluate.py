"""pipeline.evaluate on a tiny trained checkpoint: eval.json, exact counts, IWAE vs ELBO, errors, W&B, MIG."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.analysis.evaluate import EvalError, evaluate, evaluate_batches, main, summarize
from pipeline.data.shards import load_manifest


def split_total(digits_root: Path, split: str) -> int:
    return load_manifest(digits_root / "manifest.json")["splits"][split]["total"]


@pytest.mark.slow  # trains a tiny run (once per module)
def test_eval_json_counts_every_example_once(trained_run, digits_root, capsys):
    # Batch 64 does not divide the split: the short last batch must be counted, nothing padded.
    total = split_total(digits_root, "test")
    assert total % 64
    assert main([str(trained_run), "--iwae-samples", "1000", "--batch-size", "64", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "iwae" in out and "active_units" in out and "kl_per_dim" in out

    r = json.loads((trained_run / "checkpoints" / "eval.json").read_text())  # next to last.ckpt
    assert r["num_examples"] == total and r["split"] == "test" and r["iwae_samples"] == 1000
    assert r["global_step"] == 20 and r["checkpoint"].endswith("last.ckpt")
    for key in ("elbo", "iwae", "recon", "kl", "bits_per_dim_elbo", "bits_per_dim_iwae"):
        assert math.isfinite(r[key]), key
    assert r["elbo"] == pytest.approx(-(r["recon"] + r["kl"]), abs=1e-6)
    assert r["iwae"] >= r["elbo"] - 0.05  # a bound at least as tight (K = 1000 vs 1), up to noise
    assert r["bits_per_dim_iwae"] == pytest.approx(-r["iwae"] / (64 * math.log(2)))
    assert len(r["kl_per_dim"]) == r["latent_dim"] == 4  # TINY's model.latent_dim
    assert sum(r["kl_per_dim"]) == pytest.approx(r["kl"], rel=1e-6)
    assert 0 <= r["active_units"] <= 4
    assert r["mig"] is None  # digits have no ground-truth factors


@pytest.mark.slow  # trains a tiny run (once per module)
def test_other_split_and_checkpoint_file(trained_run, digits_root):
    best = sorted((trained_run / "checkpoints").glob("best-step*.ckpt"))[0]
    r = evaluate(best, split="val", iwae_samples=3, batch_size=50, progress=False)
    assert r["num_examples"] == split_total(digits_root, "val") and r["split"] == "val"
    # Same seed, same draws: a rerun reproduces the numbers exactly; decoding one sample at a time
    # (the memory knob) changes only float rounding.
    again = evaluate(best, split="val", iwae_samples=3, batch_size=50, progress=False)
    assert again["iwae"] == r["iwae"] and again["elbo"] == r["elbo"]
    chunked = evaluate(best, split="val", iwae_samples=3, batch_size=50, chunk_size=1, progress=False)
    assert chunked["iwae"] == pytest.approx(r["iwae"], abs=1e-4)


@pytest.mark.slow  # trains a tiny run (once per module)
def test_missing_and_incompatible_checkpoints_exit_with_one_line(tmp_path, trained_run, capsys):
    missing = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert main([str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: checkpoint not found: {missing}"

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    assert main([str(garbage)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "incompatible checkpoint" in err and str(garbage) in err

    state = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state["hyper_parameters"]["model"]["latent_dim"] = 3  # weights no longer fit the config
    wrong = tmp_path / "wrong.ckpt"
    torch.save(state, wrong)
    assert main([str(wrong), "--no-progress", "data.root=unused"]) == 2  # overrides after options too
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "do not fit" in err and str(wrong) in err


@pytest.mark.slow  # trains a tiny run (once per module)
def test_results_go_to_the_runs_wandb_summary(trained_run, monkeypatch):
    for k in [k for k in list(__import__("os").environ) if k.startswith("WANDB_")]:
        monkeypatch.delenv(k)
    (trained_run / "wandb_run_id.txt").write_text("evaltest1234\n")
    try:
        r = evaluate(trained_run, iwae_samples=2, overrides=["logger.wandb.mode=offline"], progress=False)
    finally:
        (trained_run / "wandb_run_id.txt").unlink()
    assert r["wandb"] == "offline"
    runs = list((trained_run / "wandb").glob("offline-run-*-evaltest1234"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


@pytest.mark.slow  # a real training run (or several processes)
def test_mig_is_computed_when_batches_carry_factors():
    from pipeline.training.module import VAEModule
    from pipeline.vae.disentangle import mig

    torch.manual_seed(0)
    module = VAEModule({"arch": "mlp", "latent_dim": 3, "hidden_dims": [16]}, {}, {}, input_shape=(1, 4, 4),
                       max_steps=10)
    batches = []
    for b in range(3):
        factors = torch.stack([torch.randint(0, 3, (20,)).float(), torch.rand(20)], dim=1)
        image = torch.randint(0, 256, (20, 1, 4, 4), dtype=torch.uint8)
        image[:, 0, 0, 0] = (factors[:, 0] * 100).to(torch.uint8)  # the codes carry factor 0
        batches.append({"image": image, "factors": factors, "key": [f"{b}-{i}" for i in range(20)]})
    sums = evaluate_batches(module, batches, iwae_samples=4, progress=False)
    r = summarize(sums, num_dims=16, factor_names=["shape", "noise"])
    assert r["num_examples"] == 60 and r["factor_names"] == ["shape", "noise"] and len(r["mig_per_factor"]) == 2
    # The same number as MIG of the mean codes computed directly: the codes are mu, in batch order.
    with torch.no_grad():
        mu = torch.cat([module.vae.encode(b["image"].float() / 255)[0] for b in batches]).numpy()
    expected = mig(mu, torch.cat([b["factors"] for b in batches]).numpy())
    assert r["mig"] == pytest.approx(expected["mig"], abs=1e-6) and 0.0 <= r["mig"] <= 1.0
    assert r["mig_per_factor"] == pytest.approx(expected["per_factor"], abs=1e-6)
    # DCI, FactorVAE and SAP of the same mean codes, beside MIG
    from pipeline.analysis.evaluate import DISENTANGLEMENT_SCORES, disentanglement_scores

    assert {k: r[k] for k in DISENTANGLEMENT_SCORES} == disentanglement_scores(mu, torch.cat(
        [b["factors"] for b in batches]).numpy())
    assert all(0.0 <= r[k] <= 1.0 for k in DISENTANGLEMENT_SCORES)


def test_wrong_image_shape_is_reported():
    from pipeline.training.module import VAEModule

    module = VAEModule({"arch": "mlp", "latent_dim": 2, "hidden_dims": [8]}, {}, {}, input_shape=(1, 4, 4),
                       max_steps=10)
    with pytest.raises(EvalError, match=r"shape \(1, 8, 8\).*expects uint8 \(1, 4, 4\)"):
        evaluate_batches(module, [{"image": torch.zeros(2, 1, 8, 8, dtype=torch.uint8)}], 2, progress=False)
