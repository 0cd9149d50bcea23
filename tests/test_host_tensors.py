"""No tensor is made from host values on the step path, except on steps whose metrics are written.

On a GPU, `torch.tensor(x, device=cuda)` (what `self.log(name, float)` does) and `t.new_tensor(x)` copy a host
value to the device from pageable memory: the host waits. The sync probe (tests/test_sync.py) counts reads
of device values; this counts the other direction, by wrapping the factories that take host values, over a
real fit: every training batch and every validation batch, with a sample skipped (DataErrorCounter logs).
"""
from __future__ import annotations

import sys

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.training.callbacks import DataErrorCounter, EMAWeights
from pipeline.training.lightning_compat import logs_written_this_step
from pipeline.training.module import VAEModule
from pipeline.vae.metrics import ExactSums

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

COUNT = {"made": 0}
# torch.optim's step counters are host tensors unless the optimizer is fused or capturable (as in
# tests/helpers/sync_probe.py): AdamW's first step makes them on the host, no device involved.
HOST_SIDE = ("torch.optim.optimizer", "torch.optim.adam", "torch.optim.adamw", "torch.optim.lr_scheduler")


@pytest.fixture
def counting(monkeypatch):
    """Counts calls of the factories that make a tensor from host values (any device: on CPU the call is
    what we can see)."""
    def wrap(owner, name):
        fn = getattr(owner, name)

        def counted(*args, **kwargs):
            if not sys._getframe(1).f_globals.get("__name__", "").startswith(HOST_SIDE):
                COUNT["made"] += 1
            return fn(*args, **kwargs)
        monkeypatch.setattr(owner, name, counted)

    for owner, name in ((torch, "tensor"), (torch, "as_tensor"), (torch, "scalar_tensor"),
                        (torch.Tensor, "new_tensor")):
        wrap(owner, name)
    COUNT["made"] = 0
    return COUNT


def test_exact_sums_update_makes_no_tensor_from_host_values(counting):
    metric = ExactSums(latent_dim=3)
    mu = torch.randn(5, 3)
    terms = {"mu": mu, "recon": torch.rand(5), "kl": torch.rand(5), "elbo": -torch.rand(5),
             "kl_per_dim": torch.rand(5, 3)}
    metric.update(terms, torch.rand(5))
    metric.update(terms)
    assert counting["made"] == 0
    assert metric.count.item() == 10 and metric.count.dtype == torch.float64


class Skipping(pl.LightningDataModule):
    """In-memory batches; reports skipped samples as the shard loader does under data.on_error=warn."""
    skipped_samples = 3

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        images = (torch.rand(96, 1, 8, 8, generator=g) * 255).round().to(torch.uint8)
        return DataLoader([{"image": im} for im in images], batch_size=16)

    val_dataloader = train_dataloader


class Windows(pl.Callback):
    """Factory calls per training batch, from its on_train_batch_start to the next one's (its own end hooks,
    metric writing and what Lightning does in between; a validation epoch's own start and end are left
    out: they log the epoch's means once), and per validation batch."""

    def __init__(self):
        self.train, self.val, self._open, self._val_epoch = [], [], None, 0

    def _close(self):
        if self._open is not None:
            start, logs = self._open
            self.train.append((logs, COUNT["made"] - start - self._val_epoch))
            self._open, self._val_epoch = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._close()
        self._open = (COUNT["made"], logs_written_this_step(trainer))

    def on_train_end(self, trainer, pl_module):
        self._close()

    def on_validation_start(self, trainer, pl_module):
        self._val_start = COUNT["made"]

    def on_validation_end(self, trainer, pl_module):
        self._val_epoch += COUNT["made"] - self._val_start - sum(self.val[self._val_batches:])

    def on_validation_epoch_start(self, trainer, pl_module):
        self._val_batches = len(self.val)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._at = COUNT["made"]

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.val.append(COUNT["made"] - self._at)


# optim.ema_decay, grad_clip_norm and grad_skip_norm on, with a limit that skips some steps
EMA_CLIP_SKIP = {"ema_decay": 0.9, "grad_clip_norm": 1.0, "grad_skip_norm": 1.5}


@pytest.mark.parametrize("optim", [{}, EMA_CLIP_SKIP], ids=["default", "ema-clip-skip"])
def test_no_host_value_tensor_in_training_or_validation_steps(counting, optim):
    torch.manual_seed(0)
    module = VAEModule({"arch": "mlp", "latent_dim": 3, "hidden_dims": [16]}, {}, optim, (1, 8, 8), max_steps=12)
    windows = Windows()
    ema = [EMAWeights(optim["ema_decay"])] if "ema_decay" in optim else []
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=12, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         val_check_interval=6, log_every_n_steps=5, gradient_clip_val=optim.get("grad_clip_norm"),
                         callbacks=[*ema, windows, DataErrorCounter()])
    trainer.fit(module, datamodule=Skipping())
    if optim:
        assert 0 < module.skipped_steps < 12 and "train/grad_norm" in trainer.callback_metrics
    assert len(windows.train) == 12 and len(windows.val) == 2 * 6
    quiet = [made for logs, made in windows.train if not logs]
    assert len(quiet) == 10 and quiet == [0] * 10, windows.train
    assert windows.val == [0] * 12
    assert trainer.callback_metrics["data/skipped_samples"] == 3  # still logged, on the steps that write
