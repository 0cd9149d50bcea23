"""Each private Lightning / PyTorch behaviour that pipeline/training/lightning_compat.py relies on, checked against
the installed versions: these fail first when an upgrade changes what we depend on."""
from __future__ import annotations

import csv
import os

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from pipeline.training import lightning_compat as compat

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.seen, self.log_steps = [], []

    def training_step(self, batch, batch_idx):
        written = compat.logs_written_this_step(self.trainer)
        assert written == self.trainer._logger_connector.should_update_logs  # Lightning's own answer
        self.log_steps.append((self.global_step, written))
        loss = self.layer(batch).pow(2).mean()
        self.log("loss", loss)
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        self.seen.append(compat.batches_trained(self.trainer))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(torch.randn(40, 2), batch_size=4)  # 10 batches an epoch


def trainer(tmp_path, **kw):
    kw = {"max_epochs": -1, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
          "accelerator": "cpu", "default_root_dir": str(tmp_path), **kw}
    return pl.Trainer(**kw)


def test_attached_trainer_is_none_until_a_trainer_runs_the_module(tmp_path):
    module = Tiny()
    assert compat.attached_trainer(module) is None
    t = trainer(tmp_path, max_steps=1, enable_checkpointing=False)
    t.fit(module)
    assert compat.attached_trainer(module) is t is module.trainer


def test_batches_trained_counts_batches_across_epochs_and_resume(tmp_path):
    first = Tiny()
    t = trainer(tmp_path, max_steps=7, accumulate_grad_batches=2, enable_checkpointing=False)
    t.fit(first)
    assert first.seen == list(range(14))  # batches, not optimizer steps; across the epoch boundary
    t.save_checkpoint(tmp_path / "a.ckpt")
    resumed = Tiny()
    trainer(tmp_path, max_steps=9, accumulate_grad_batches=2, enable_checkpointing=False).fit(
        resumed, ckpt_path=tmp_path / "a.ckpt")
    assert resumed.seen == list(range(14, 18))  # restored from the checkpoint


def test_logs_written_this_step_follows_log_every_n_steps(tmp_path):
    m = Tiny()
    trainer(tmp_path, max_steps=9, log_every_n_steps=3, enable_checkpointing=False).fit(m)
    assert m.log_steps == [(s, (s + 1) % 3 == 0) for s in range(9)]


def test_hpc_save_path_numbers_lightnings_requeue_checkpoints(tmp_path):
    t = trainer(tmp_path, max_steps=1)
    first = compat.hpc_save_path(t)
    assert first == str(tmp_path / "hpc_ckpt_1.ckpt")
    open(first, "wb").close()
    assert compat.hpc_save_path(t) == str(tmp_path / "hpc_ckpt_2.ckpt")


class Pids(IterableDataset):
    def __iter__(self):
        yield os.getpid()


def test_shutdown_loader_workers_forks_new_ones(tmp_path):
    loader = DataLoader(Pids(), batch_size=None, num_workers=1, persistent_workers=True)
    first = next(iter(loader))
    assert next(iter(loader)) == first  # persistent: the same worker serves the next pass
    compat.shutdown_loader_workers(loader)
    with pytest.raises(ProcessLookupError):
        os.kill(int(first), 0)  # the old worker is gone
    assert next(iter(loader)) != first
    compat.shutdown_loader_workers(loader)


def test_resumable_csv_logger_keeps_earlier_rows_and_columns(tmp_path):
    first = compat.resumable_csv_logger(tmp_path)
    first.log_metrics({"a": 1.0}, step=0)
    first.finalize("success")
    again = compat.resumable_csv_logger(tmp_path)
    again.log_metrics({"a": 2.0, "b": 3.0}, step=1)
    again.finalize("success")
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["a"], r["b"]) for r in rows] == [("0", "1.0", ""), ("1", "2.0", "3.0")]


def test_wandb_logger_leaves_out_the_anonymous_argument_lightning_always_passes(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    kw = {"project": "p", "save_dir": str(tmp_path), "offline": True}
    assert WandbLogger(**kw)._wandb_init["anonymous"] is None  # what wandb warns about on every run
    logger = compat.wandb_logger(**kw)
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["project"] == "p"


class Validated(Tiny):
    """Records, at each training batch end, whether validation is about to run, and when it does run."""

    def __init__(self):
        super().__init__()
        self.predicted, self.validated = [], []

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if compat.validates_after_this_batch(self.trainer):
            self.predicted.append(self.global_step)

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.validated.append(self.global_step)

    def val_dataloader(self):
        return DataLoader(torch.randn(8, 2), batch_size=4)


def test_validates_after_this_batch_predicts_the_fit_loops_validation(tmp_path):
    m = Validated()
    trainer(tmp_path, max_steps=12, val_check_interval=5, check_val_every_n_epoch=None, num_sanity_val_steps=0,
            enable_checkpointing=False).fit(m)
    assert m.validated == [5, 10] and m.predicted == m.validated  # across the epoch boundary (10 batches)
    m = Validated()
    trainer(tmp_path, max_steps=6, val_check_interval=5, check_val_every_n_epoch=None, limit_val_batches=0,
            enable_checkpointing=False).fit(m)
    assert m.validated == [] and m.predicted == []  # validation switched off


def test_align_log_step_labels_rows_with_the_optimizer_step(tmp_path):
    class Misaligned(Tiny):
        def on_train_batch_start(self, batch, batch_idx):
            self.trainer.fit_loop.epoch_loop._batches_that_stepped = 100 + batch_idx  # what a bad restore leaves
            compat.align_log_step(self.trainer)

    m = Misaligned()
    t = trainer(tmp_path, max_steps=4, log_every_n_steps=1, enable_checkpointing=False,
                logger=compat.resumable_csv_logger(tmp_path))
    t.fit(m)
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f) if r.get("loss")] == [0, 1, 2, 3]


def test_skip_per_step_sigterm_broadcast_silences_the_loops_broadcast(tmp_path, monkeypatch):
    """Lightning's training loop broadcasts a SIGTERM flag before every batch under DDP (a collective and a
    host read per step); the compat switch turns that into a no-op for one trainer. The full DDP run with it
    is tests/test_sync.py; SIGTERM handled at agreed batches instead: tests/test_signals.py."""
    import inspect

    import torch.distributed as dist
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    advance = inspect.getsource(_TrainingEpochLoop.advance)
    assert "self._broadcast_sigterm_tensor()" in advance and "world_size > 1" in advance  # DDP, every batch
    calls = []
    monkeypatch.setattr(dist, "broadcast", lambda *a, **k: calls.append(a))
    t = trainer(tmp_path, max_steps=1)
    t.fit_loop.epoch_loop._broadcast_sigterm_tensor()
    assert len(calls) == 1  # what runs per step under DDP
    assert compat.skip_per_step_sigterm_broadcast(t)
    t.fit_loop.epoch_loop._broadcast_sigterm_tensor()
    assert len(calls) == 1  # silenced on this trainer
    other = trainer(tmp_path, max_steps=1)
    other.fit_loop.epoch_loop._broadcast_sigterm_tensor()
    assert len(calls) == 2  # and only on it


def test_log_step_is_the_step_of_the_validation_row(tmp_path):
    """ImageLogger puts its grids on the W&B row of the validation's metrics: log_step during validation is
    the step Lightning writes that validation's row under (metrics.csv)."""
    class Stepped(Validated):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.layer(batch).pow(2).mean())
            if batch_idx == 0:
                self.validated.append(compat.log_step(self.trainer))

    m = Stepped()
    trainer(tmp_path, max_steps=10, val_check_interval=5, check_val_every_n_epoch=None, num_sanity_val_steps=0,
            log_every_n_steps=1, enable_checkpointing=False, logger=compat.resumable_csv_logger(tmp_path)).fit(m)
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f) if r.get("val_loss")] == m.validated == [4, 9]


def test_wandb_logger_sends_the_trainer_step_as_wandb_step_and_finishes(tmp_path, monkeypatch):
    """Rows go to W&B under step= Lightning's step (the history continues across resumes); the config is not
    logged a second time; finalize finishes the run, and nothing is logged after it."""
    calls = []

    class Run:
        def log(self, data, step=None):
            calls.append(("log", dict(data), step))

        def finish(self, exit_code=0):
            calls.append(("finish", exit_code))

    logger = compat.wandb_logger(project="p", save_dir=str(tmp_path), offline=True)
    logger._experiment = Run()  # Lightning's WandbLogger keeps the wandb run here
    logger.log_metrics({"a": 1.0}, step=7)
    logger.log_hyperparams({"lr": 1.0})
    logger.finalize("success")
    logger.finalize("success")
    with pytest.warns(UserWarning, match="W&B run already finished: step 8 not sent"):
        logger.log_metrics({"a": 2.0}, step=8)
    assert calls == [("log", {"a": 1.0, "trainer/global_step": 7}, 7), ("finish", 0)]


def test_started_ranks_and_launched_by_rank_zero_read_the_local_launcher(tmp_path, monkeypatch):
    """Rank zero of a local 2-process DDP run holds its started ranks in `launcher.procs` (empty before fit);
    a rank started by it (LOCAL_RANK set, LightningEnvironment) is `launched_by_rank_zero`."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    assert isinstance(trainer.strategy.launcher.procs, list)
    assert compat.started_ranks(trainer) == [] and not compat.launched_by_rank_zero(trainer)
    assert type(trainer.strategy.cluster_environment) is LightningEnvironment
    trainer.strategy.launcher.procs = ["rank 1"]
    assert compat.started_ranks(trainer) == ["rank 1"]
    monkeypatch.setattr(type(trainer.strategy), "global_rank", property(lambda self: 1))
    assert compat.launched_by_rank_zero(trainer) and compat.started_ranks(trainer) == []


def test_ema_weights_keeps_lightnings_checkpoint_layout_and_swap(tmp_path):
    """EMAWeights relies on WeightAveraging's private `_average_model`, `_latest_update_step` and `_swap_models`:
    a checkpoint taken inside fit holds the average in state_dict and the trained weights in current_model_state,
    a resume restores both and the step of the last update, and the swap exchanges them."""
    from pipeline.training.module import VAEModule
    from tests.test_ema_and_grad_skip import Batches

    class SaveAt(pl.Callback):  # after EMAWeights: the step's average is in
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                trainer.save_checkpoint(tmp_path / "three.ckpt")
                self.live = [p.detach().clone() for p in pl_module.parameters()]

    def fit(steps, ema, callbacks=(), ckpt_path=None):
        torch.manual_seed(0)
        module = VAEModule({"arch": "mlp", "latent_dim": 2, "hidden_dims": [8]}, {}, {}, (1, 8, 8), max_steps=10)
        pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   limit_val_batches=0, callbacks=[ema, *callbacks]).fit(module, datamodule=Batches(), ckpt_path=ckpt_path)
        return module

    ema, save = compat.EMAWeights(0.5), SaveAt()
    fit(3, ema, [save])
    ckpt = torch.load(tmp_path / "three.ckpt", weights_only=True)
    names = [n for n, _ in VAEModule({"arch": "mlp", "latent_dim": 2, "hidden_dims": [8]}, {}, {}, (1, 8, 8),
                                     max_steps=10).named_parameters()]
    assert all(torch.equal(ckpt["state_dict"][n], a) for n, a in zip(names, ema.averaged_parameters()))
    assert all(torch.equal(ckpt["current_model_state"][n], w) for n, w in zip(names, save.live))
    assert int(ckpt["averaging_state"]["n_averaged"]) == 3 and ckpt["callbacks"]
    resumed = compat.EMAWeights(0.5)
    module = fit(3, resumed, ckpt_path=tmp_path / "three.ckpt")  # nothing left to train: restored only
    assert resumed._latest_update_step == 3
    assert all(torch.equal(a, b) for a, b in zip(resumed.averaged_parameters(), ema.averaged_parameters()))
    before = [p.detach().clone() for p in module.parameters()]
    average = [a.clone() for a in resumed.averaged_parameters()]
    if all(torch.equal(b, a) for b, a in zip(before, average)):  # fit's end copied the average in: back to the trained
        module.load_state_dict(ckpt["current_model_state"])
        before = [p.detach().clone() for p in module.parameters()]
    assert not all(torch.equal(b, a) for b, a in zip(before, average))
    resumed._swap_models(module)
    assert all(torch.equal(p, a) for p, a in zip(module.parameters(), average))
    assert all(torch.equal(a, b) for a, b in zip(resumed.averaged_parameters(), before))
