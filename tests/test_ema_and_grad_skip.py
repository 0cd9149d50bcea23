"""optim.ema_decay (EMAWeights: Lightning's EMAWeightAveraging, updated on the device) and optim.grad_clip_norm /
optim.grad_skip_norm (VAEModule: one norm per step; a skipped step leaves weights and AdamW moments as they were),
in process on in-memory batches. Exact resume through pipeline.train is in tests/test_train.py."""
from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.training.callbacks import EMAWeights, ImageLogger
from pipeline.training.module import VAEModule

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

MODEL = {"arch": "mlp", "latent_dim": 3, "hidden_dims": [16]}


class Batches(pl.LightningDataModule):
    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        images = (torch.rand(96, 1, 8, 8, generator=g) * 255).round().to(torch.uint8)
        return DataLoader([{"image": im} for im in images], batch_size=16)

    val_dataloader = train_dataloader


class FixedNoise(pl.Callback):
    """The same validation noise in every validation (fit's and trainer.validate's)."""

    def on_validation_epoch_start(self, trainer, pl_module):
        torch.manual_seed(123)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(1000 + trainer.global_step)


class Snapshots(pl.Callback):
    """The trained weights and AdamW state after every optimizer step (listed after EMAWeights)."""

    def __init__(self):
        self.weights, self.moments = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append([p.detach().clone() for p in pl_module.parameters()])
        state = trainer.optimizers[0].state
        self.moments.append([{k: v.clone() for k, v in state[p].items()} for p in pl_module.parameters()])


def trainer(steps: int, callbacks, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      val_check_interval=min(steps, 6), log_every_n_steps=1, callbacks=callbacks, **kwargs)


def module(optim=None) -> VAEModule:
    torch.manual_seed(0)
    return VAEModule(MODEL, {}, optim or {}, (1, 8, 8), max_steps=100)


def test_ema_follows_its_closed_form_step_by_step():
    decay, steps = 0.7, 4
    ema, snaps = EMAWeights(decay), Snapshots()
    m = module()
    trainer(steps, [ema, snaps, FixedNoise()]).fit(m, datamodule=Batches())
    w = snaps.weights
    expected = [t.clone() for t in w[0]]  # the first update copies the weights of step 1
    for k in range(1, steps):
        expected = [decay * e + (1 - decay) * x for e, x in zip(expected, w[k])]
    for got, want in zip(ema.averaged_parameters(), expected):
        torch.testing.assert_close(got.detach(), want, atol=1e-6, rtol=1e-5)
    # written out: ema_2 = d w_1 + (1 - d) w_2 for the first tensor
    assert not torch.allclose(w[0][0], w[1][0])


class SeenAtEpochEnd(pl.Callback):
    """The weights the module holds in on_validation_epoch_end, where ImageLogger draws its grids."""

    def on_validation_epoch_end(self, trainer, pl_module):
        assert hasattr(ImageLogger, "on_validation_epoch_end")
        self.weights = [p.detach().clone() for p in pl_module.parameters()]


def test_validation_numbers_and_grids_come_from_the_ema_weights():
    ema, seen = EMAWeights(0.9), SeenAtEpochEnd()
    m = module()
    fit = trainer(6, [ema, seen, FixedNoise()])
    fit.fit(m, datamodule=Batches())
    val_ema = float(fit.callback_metrics["val/elbo"])
    averaged = [p.clone() for p in ema.averaged_parameters()]
    assert all(torch.equal(a, p) for a, p in zip(averaged, seen.weights))  # the grids' weights: the average
    # after fit the module holds the average (Lightning's on_train_end): a plain validation of it agrees
    assert all(torch.equal(a, p) for a, p in zip(averaged, m.parameters()))
    again = trainer(6, [FixedNoise()])
    assert float(again.validate(m, datamodule=Batches(), verbose=False)[0]["val/elbo"]) == pytest.approx(val_ema, abs=1e-5)
    # and the trained (live) weights give another number
    live = module()
    trainer(6, [FixedNoise()]).fit(live, datamodule=Batches())
    assert not all(torch.equal(a, p) for a, p in zip(averaged, live.parameters()))
    val_live = float(trainer(6, [FixedNoise()]).validate(live, datamodule=Batches(), verbose=False)[0]["val/elbo"])
    assert val_live != pytest.approx(val_ema, abs=1e-4)


class Spike(VAEModule):
    """Multiplies the loss of one optimizer step (a poisoned batch: a gradient spike)."""
    spike_step = 3

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 1e6 if self.global_step == self.spike_step else loss


class ClipProbe(VAEModule):
    """Records the total gradient norm after clipping, i.e. what optimizer.step applies."""
    applied: list = []

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.applied.append((float(self._grad_norm), float(torch.nn.utils.get_total_norm(grads))))


def spiked(optim, steps=6, ckpt_path=None, callbacks=()):
    torch.manual_seed(0)
    m = Spike(MODEL, {}, optim, (1, 8, 8), max_steps=100)
    snaps = Snapshots()
    t = trainer(steps, [snaps, FixedNoise(), *callbacks])
    t.fit(m, datamodule=Batches(), ckpt_path=ckpt_path)
    return m, snaps, t


def test_a_gradient_spike_is_skipped_counted_logged_and_training_goes_on():
    m, snaps, t = spiked({"grad_skip_norm": 1e3})
    assert t.global_step == 6 and m.skipped_steps == 1
    assert isinstance(t.optimizers[0], torch.optim.AdamW) and t.optimizers[0].defaults["fused"]
    before, after = Spike.spike_step - 1, Spike.spike_step  # snapshots after steps 3 and 4 (the spiked one)
    assert all(torch.equal(a, b) for a, b in zip(snaps.weights[before], snaps.weights[after]))
    for a, b in zip(snaps.moments[before], snaps.moments[after]):  # moments and AdamW's step count too
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a, b) for a, b in zip(snaps.weights[after], snaps.weights[after + 1]))
    assert float(t.callback_metrics["train/skipped_steps"]) == 1
    assert float(t.callback_metrics["train/grad_norm"]) < 1e3
    # the LR schedule still advanced at the skipped step (a pure function of the step)
    assert t.lr_scheduler_configs[0].scheduler.last_epoch == 6


def test_a_skipped_step_leaves_the_ema_as_it_was():
    """The average follows the closed form over the steps taken; the skipped step's update is left out."""
    decay = 0.7
    ema = EMAWeights(decay)
    m, snaps, t = spiked({"grad_skip_norm": 1e3}, callbacks=[ema])
    assert m.skipped_steps == 1
    w = snaps.weights
    expected = [x.clone() for x in w[0]]
    for k in range(1, len(w)):
        if k != Spike.spike_step:
            expected = [decay * e + (1 - decay) * x for e, x in zip(expected, w[k])]
    for got, want in zip(ema.averaged_parameters(), expected):
        torch.testing.assert_close(got.detach(), want, atol=1e-6, rtol=1e-5)


def test_without_skipping_the_spike_moves_the_weights():
    _, snaps, _ = spiked({})
    before, after = Spike.spike_step - 1, Spike.spike_step
    assert not all(torch.equal(a, b) for a, b in zip(snaps.weights[before], snaps.weights[after]))


def test_the_skip_count_survives_a_resume(tmp_path):
    m, _, t = spiked({"grad_skip_norm": 1e3}, steps=5)
    t.save_checkpoint(tmp_path / "five.ckpt")
    assert torch.load(tmp_path / "five.ckpt", weights_only=True)["skipped_steps"] == 1
    resumed, _, t2 = spiked({"grad_skip_norm": 1e3}, steps=8, ckpt_path=tmp_path / "five.ckpt")
    assert t2.global_step == 8 and resumed.skipped_steps == 1
    assert float(t2.callback_metrics["train/skipped_steps"]) == 1


def test_clipping_bounds_the_applied_norm():
    ClipProbe.applied = []
    torch.manual_seed(0)
    m = ClipProbe(MODEL, {}, {"grad_clip_norm": 0.5}, (1, 8, 8), max_steps=100)
    trainer(5, [FixedNoise()], gradient_clip_val=0.5, gradient_clip_algorithm="norm").fit(m, datamodule=Batches())
    assert len(ClipProbe.applied) == 5
    assert all(before > 0.5 for before, _ in ClipProbe.applied)  # the clip was active ...
    assert all(after == pytest.approx(0.5, rel=1e-4) for _, after in ClipProbe.applied)  # ... and bounds it


@pytest.mark.slow
def test_evaluate_and_safe_load_read_an_ema_checkpoint_as_its_average(tiny_overrides, tmp_path):
    from pipeline.analysis.evaluate import evaluate, load_module
    from pipeline.config import load_config
    from pipeline.run.checkpointing import safe_load
    from pipeline.training.train import train

    run_dir = tmp_path / "run"
    train(load_config([], tiny_overrides + ["trainer.max_steps=12", "optim.ema_decay=0.9"]))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    state = safe_load(ckpt)  # the weights-only unpickler: current_model_state and averaging_state are plain
    assert {"state_dict", "current_model_state", "averaging_state"} <= set(state)
    module, step = load_module(ckpt, torch.device("cpu"))
    assert step == 12
    ours = module.state_dict()
    key = "vae.encoder.1.0.weight"
    assert all(torch.equal(ours[k], v) for k, v in state["state_dict"].items())  # the average ...
    assert not torch.equal(ours[key], state["current_model_state"][key])  # ... not the trained weights
    results = evaluate(run_dir, split="val", iwae_samples=2, progress=False, wandb_log=False)
    assert results["global_step"] == 12 and math.isfinite(results["elbo"])
    best = sorted((run_dir / "checkpoints").glob("best-step*.ckpt"))
    assert best and "current_model_state" in safe_load(best[-1])


def test_config_keys_bounds_the_moved_clip_key_and_16_mixed():
    from pipeline.config import ConfigError, load_config

    cfg = load_config([], ["optim.ema_decay=0.999", "optim.grad_clip_norm=1", "optim.grad_skip_norm=100"])
    assert (cfg.optim.ema_decay, cfg.optim.grad_clip_norm, cfg.optim.grad_skip_norm) == (0.999, 1.0, 100.0)
    defaults = load_config([])
    assert defaults.optim.ema_decay is None and defaults.optim.grad_clip_norm is None
    assert defaults.optim.grad_skip_norm is None
    for bad in ("optim.ema_decay=1", "optim.ema_decay=0", "optim.grad_clip_norm=0", "optim.grad_skip_norm=-1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config([], [bad])
    with pytest.raises(ConfigError, match="grad_skip_norm.*16-mixed"):
        load_config([], ["optim.grad_skip_norm=10", "trainer.precision=16-mixed"])
    with pytest.raises(ConfigError, match="It moved: optim.grad_clip_norm"):
        load_config([], ["trainer.gradient_clip_val=1"])


def test_a_config_yaml_saved_before_the_move_still_reads(tmp_path):
    from pipeline.config import load_config, load_saved

    old = tmp_path / "config.yaml"
    old.write_text("trainer:\n  gradient_clip_val: 0.0\n  max_steps: 7\n")  # every run's config.yaml had it
    assert load_saved(old).optim.grad_clip_norm is None and load_saved(old).trainer.max_steps == 7
    old.write_text("trainer:\n  gradient_clip_val: 2.5\n")
    assert load_config([old]).optim.grad_clip_norm == 2.5
