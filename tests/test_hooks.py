"""pipeline/training/hooks.py: our callbacks behind one dispatch, and a profiler without a context per call, change
what Lightning costs per step, never which hooks run, in which order, with which arguments."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.profilers import PassThroughProfiler

from pipeline.training.hooks import HOOKS, CallbackGroup, NullProfiler, grouped


class Recorder(pl.Callback):
    """Records (name, hook, global step) for a few hooks, per step and per stage."""

    def __init__(self, name: str, log: list):
        self.name, self.events = name, log

    def _note(self, hook, trainer):
        self.events.append((self.name, hook, trainer.global_step))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._note("on_train_batch_start", trainer)

    def on_before_backward(self, trainer, pl_module, loss):
        self._note("on_before_backward", trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        assert outputs["loss"].ndim == 0 and batch.shape == (4, 3)  # the arguments arrive unchanged
        self._note("on_train_batch_end", trainer)

    def on_validation_end(self, trainer, pl_module):
        self._note("on_validation_end", trainer)

    def teardown(self, trainer, pl_module, stage):
        self._note(f"teardown:{stage}", trainer)


class EndOnly(pl.Callback):
    def __init__(self, log: list):
        self.events = log

    def on_train_end(self, trainer, pl_module):
        self.events.append(("end-only", "on_train_end", trainer.global_step))


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val", self.layer(batch).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(callbacks, profiler) -> None:
    data = torch.utils.data.DataLoader(torch.randn(24, 3), batch_size=4)
    trainer = pl.Trainer(max_steps=8, val_check_interval=3, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks, profiler=profiler)
    trainer.fit(Tiny(), data, data)


def test_a_group_calls_the_same_hooks_in_the_same_order_as_separate_callbacks():
    separate, together = [], []
    fit([Recorder("a", separate), EndOnly(separate), Recorder("b", separate)], PassThroughProfiler())
    group = CallbackGroup([Recorder("a", together), EndOnly(together), Recorder("b", together)])
    fit([group], NullProfiler())
    assert together == separate
    assert ("b", "on_train_batch_end", 8) in separate and ("end-only", "on_train_end", 8) in separate
    assert [e for e in separate if e[1] == "on_validation_end"] == [("a", "on_validation_end", 3),
                                                                 ("b", "on_validation_end", 3),
                                                                 ("a", "on_validation_end", 6),
                                                                 ("b", "on_validation_end", 6)]


def test_a_group_forwards_only_to_members_that_define_the_hook_and_stops_at_an_exception():
    log: list = []

    class Boom(pl.Callback):
        def on_train_batch_end(self, *args):
            raise RuntimeError("stop here")

    group = CallbackGroup([EndOnly(log), Boom(), Recorder("after", log)])
    assert group.on_train_end.__self__ is group.members[0]  # one member: called directly, no wrapper
    assert group.on_before_zero_grad(None, None, None) is None  # nobody defines it: nothing happens
    with pytest.raises(RuntimeError, match="stop here"):
        group.on_train_batch_end(None, None, None, None, 0)
    assert log == []  # the member after the failing one did not run, as in Lightning's own loop
    assert set(HOOKS) >= {"setup", "teardown", "on_exception", "on_train_batch_start", "on_before_optimizer_step"}


def test_checkpoints_progress_bars_and_stateful_callbacks_stay_on_their_own(tmp_path):
    class Stateful(pl.Callback):
        def state_dict(self):
            return {"n": 1}

    ckpt, bar, stateful = ModelCheckpoint(dirpath=tmp_path), TQDMProgressBar(), Stateful()
    lr = LearningRateMonitor()
    log: list = []
    a, b = Recorder("a", log), Recorder("b", log)
    out = grouped([a, ckpt, lr, bar, stateful, b])
    assert [type(c) for c in out] == [CallbackGroup, ModelCheckpoint, TQDMProgressBar, Stateful]
    assert out[0].members == [a, lr, b] and out[1] is ckpt and out[3] is stateful
    assert grouped([a, ckpt]) == [a, ckpt]  # one member: nothing to group
    for alone in (ckpt, bar, stateful):
        with pytest.raises(ValueError, match="cannot join a CallbackGroup"):
            CallbackGroup([a, alone])


def test_the_null_profiler_is_a_reusable_context():
    p = NullProfiler()
    with p.profile("x") as a, p.profile("y"):  # nested, as Lightning nests hook calls
        pass
    assert a is None and p.profile("z") is p.profile("w")
