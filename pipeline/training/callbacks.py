"""Callbacks the Trainer needs beyond Lightning's own: per-batch seeding (exact resume), image grids, a
final validation, step-consistent SLURM preemption and Ctrl-C, data-error counters, last.ckpt after
validation, a loss watch, and the EMA of the weights."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint

from pipeline.training.lightning_compat import (  # noqa: F401  EMAWeights: a Lightning callback subclassed there
    EMAWeights,
    after_signal_registration,
    align_log_step,
    batches_trained,
    hpc_save_path,
    log_step,
    logs_written_this_step,
    skip_per_step_sigterm_broadcast,
    validates_after_this_batch,
)
from pipeline.vae.grids import draw_grids

log = logging.getLogger(__name__)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers; stable across processes and Python versions (unlike hash())."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _seed_torch(seed: int) -> None:
    # torch.manual_seed also seeds every accelerator backend and records a traceback for lazy CUDA
    # seeding: ~85 us a call. Seed what is in use directly (~1 us): a per-batch cost on tiny models.
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():  # False without CUDA; cheaper than is_available() first
        torch.cuda.manual_seed(seed)  # the rank's own device: manual_seed_all touches all 8 of a node, per step


class StepSeed(Callback):
    """Reseed torch before every training batch from (seed, batches trained so far), alike on every rank.

    The reparameterisation noise and dynamic binarisation then depend only on the position in training,
    like the KL schedules: a run resumed at any batch draws exactly the noise an uninterrupted run
    would, with no RNG state to save. Every rank draws the global batch's noise and uses its own rows
    (VAEModule._noise_rows), so samples get independent noise and the same noise on any world size. The position is Lightning's
    restored total batch counter, not (current_epoch, batch_idx): a run stopped mid-epoch by max_steps
    is saved with its epoch counted as completed, so current_epoch is one ahead after resume. Counting
    batches, not optimizer steps, gives each accumulated micro-batch its own noise.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        position = batches_trained(trainer)
        _seed_torch(derived_seed(self.seed, 0, position))

    def _eval_seed(self, trainer: Trainer, stage: int) -> None:
        _seed_torch(derived_seed(self.seed, stage, trainer.global_step, trainer.global_rank))

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_seed(trainer, 1)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_seed(trainer, 2)


class ImageLogger(Callback):
    """Reconstructions, prior samples and latent traversals, every `every_n_steps` (rank zero only).

    Uses the first validation batch (captured during validation, no extra loader pass) and a fixed
    prior draw, so grids are comparable across steps. PNGs go to RUN_DIR/images/ (useful offline), and
    to W&B when a WandbLogger is attached.
    """

    def __init__(self, out_dir: Path, every_n_steps: int, num_images: int = 16, traversal_range: float = 3.0,
                 traversal_steps: int = 9, max_traversal_dims: int = 10):
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.traversal_range = traversal_range
        self.traversal_steps = traversal_steps
        self.max_traversal_dims = max_traversal_dims
        self._batch: Optional[torch.Tensor] = None
        self._last_logged, self._last_step = -1, -1

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.is_global_zero and batch_idx == 0 and dataloader_idx == 0 and not trainer.sanity_checking:
            self._batch = batch["image"][: self.num_images].detach()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking or self._batch is None or trainer.state.fn != "fit":
            return
        bucket = trainer.global_step // self.every_n_steps
        last_step = trainer.global_step >= trainer.max_steps > 0  # the final validation: grids of the result
        if bucket > self._last_logged or (last_step and trainer.global_step != self._last_step):
            self._last_logged, self._last_step = bucket, trainer.global_step
            self.log_images(trainer, pl_module)

    def make_grids(self, pl_module: LightningModule) -> dict:
        """The grids of the captured validation batch (pipeline.vae.grids.draw_grids)."""
        return draw_grids(pl_module, self._batch, self.num_images, self.traversal_range, self.traversal_steps,
                          self.max_traversal_dims)

    def log_images(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from PIL import Image

        grids = self.make_grids(pl_module)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        step = trainer.global_step
        for name, grid in grids.items():
            Image.fromarray(grid).save(self.out_dir / f"{name}_step{step:07d}.png")
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # WandbLogger: on the row of this validation's val/* metrics
                for name, grid in grids.items():
                    logger.log_image(key=f"images/{name}", images=[grid], step=log_step(trainer))


class StepLabels(Callback):
    """Every logged row is labelled with the optimizer step it belongs to, however the run was resumed
    (lightning_compat.align_log_step): an extended run continues its metrics.csv without a gap or a
    step twice."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        align_log_step(trainer)


class FinalValidation(Callback):
    """Validate after the last training step whatever `trainer.val_check_interval` is, so every run that
    ends normally has val metrics (and, through ImageLogger, grids) at its last step.

    Lightning validates after any batch during which `trainer.should_stop` was set (how EarlyStopping
    gets a final validation), in the same check as a scheduled one: a last step that is due anyway
    validates once. It also writes that step's train metrics whatever log_every_n_steps says, so the
    flag is set before the batch that completes the last optimizer step, where VAEModule (which skips
    `self.log` on steps that are not written) sees it and logs fresh values. Training ends after that
    batch anyway (max_steps), so nothing else changes.
    """

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        steps = (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or batch_idx + 1 == trainer.num_training_batches
        if trainer.global_step + 1 >= trainer.max_steps > 0 and steps:
            trainer.should_stop = True


class RunInterrupted(Exception):
    """Ends `fit` on every rank after a stop signal's checkpoint (no validation, no requeue); train.py reports
    it and exits with `exit_status`: 130 after Ctrl-C, 143 after SIGTERM, 138 after USR1 outside SLURM
    (128 + the signal number, as a shell reports a program ended by that signal)."""

    def __init__(self, step: int, path: Path, signum: int = signal.SIGINT):
        super().__init__(f"interrupted at step {step}")
        self.step, self.path, self.signum = step, Path(path), signal.Signals(signum)

    @property
    def exit_status(self) -> int:
        return 128 + int(self.signum)


class DeferredSignals(Callback):
    """USR1 (SLURM preemption) and INT (Ctrl-C) act at a batch boundary, on every rank at once.

    Lightning's USR1 handler saves the checkpoint inside the signal handler, i.e. at whatever bytecode
    the main thread was on: possibly after `optimizer.step()` but before the step counter moves, which
    would train that step twice on resume; a bare Ctrl-C loses everything since the last checkpoint.
    Here a handler only records the signal; at the end of a training batch the ranks agree on what was
    received and then act, all at the same batch. On a single device that is every batch (a Python flag,
    no sync); under DDP every `every_n_steps` batches (trainer.signal_every_n_steps: one all-reduce of
    three flags there, none in between), so a signal waits at most that many batches: keep it well below
    the 90 s of `--signal=USR1@90` divided by the step time. Then:

    - USR1 under SLURM's auto-requeue: `hpc_ckpt_N.ckpt` is saved (the checkpoint Lightning's SLURM handler
      writes and resumes from) and training stops after this step's rows (and a validation, as on any stop)
      are logged. `requeue` is set: train.py asks SLURM to requeue the job once fit has returned, i.e. after
      the loggers finished (W&B's last rows committed; the requeue kills the job, loader workers included,
      when nothing is left to lose). Lightning's own handler would requeue inside the batch.
    - USR1 without SLURM's handler: the same `hpc_ckpt_N.ckpt` is written and RunInterrupted ends the run
      (exit 138): nothing requeues it, the same command continues it.
    - INT and TERM (SLURM's time limit without --signal, `kill`): `checkpoints/last.ckpt` is saved and
      RunInterrupted ends the run before the next batch or validation (after this step's metrics are
      written); never a requeue; exit 130 / 143. At the last step the run simply finishes. A second Ctrl-C,
      or one before training starts, stops at once (KeyboardInterrupt); `stopped_at_once` tells train.py.
      Lightning's SIGTERM handler is replaced while training (it ends the run with status 0 and no
      checkpoint), and under DDP its per-step SIGTERM broadcast is switched off (lightning_compat).
    """

    def __init__(self, last_ckpt: Path, every_n_steps: int = 1):
        self.last_ckpt = Path(last_ckpt)
        self.every_n_steps = max(1, int(every_n_steps))
        self._received = {signal.SIGUSR1: False, signal.SIGINT: False, signal.SIGTERM: False}
        self._lightning_usr1 = None
        self._previous: dict = {}
        self._training = False
        self._rank_zero = True
        self._stop: Optional[RunInterrupted] = None
        self.interrupts = 0
        self.stopped_at_once = False
        self.requeue = False

    def arm(self) -> None:
        """From here on Ctrl-C is ours (before training: stop at once, exit 130). train.py calls it before
        `fit`: Lightning runs the datamodule's set-up before any callback's, and exits 1 on a Ctrl-C there."""
        if signal.getsignal(signal.SIGINT) != self._on_signal:
            self._install(signal.SIGINT)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.arm()
        if stage == "fit":  # USR1 and TERM ours from Lightning's registration on: a signal during the cache fill waits
            after_signal_registration(trainer, self._take_usr1_and_term)

    def _take_usr1_and_term(self) -> None:
        # Lightning registered its SLURM handler when fit began; keep it and put ours in front.
        current = signal.getsignal(signal.SIGUSR1)
        if callable(current) and current != self._on_signal:
            self._lightning_usr1 = current
        self._install(signal.SIGUSR1)
        self._install(signal.SIGTERM)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._take_usr1_and_term()  # again, in case the registration hook did not run (a Lightning change)
        if trainer.world_size > 1:
            skip_per_step_sigterm_broadcast(trainer)
        self._training, self._rank_zero = True, trainer.is_global_zero

    def _install(self, sig: int) -> None:
        self._previous.setdefault(sig, signal.getsignal(sig))
        signal.signal(sig, self._on_signal)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            if signal.getsignal(sig) == self._on_signal:  # Lightning may have restored its own already
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        self._training = False

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()

    def _say(self, message: str) -> None:
        if self._rank_zero:  # os.write: print() may be mid-write in the interrupted code (reentrant call)
            os.write(sys.stderr.fileno(), f"{chr(10) if sys.stdout.isatty() else ''}# {message}\n".encode())

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if not self._training or self.interrupts > 1:
                self.stopped_at_once = True
                raise KeyboardInterrupt
            self._say("Ctrl-C: saving a checkpoint at the end of this batch, then stopping "
                      "(Ctrl-C again: stop at once)")
        elif signum == signal.SIGTERM:
            log.warning("received SIGTERM: stopping on every rank within %d batches, after a checkpoint",
                        self.every_n_steps)
        elif self._lightning_usr1 is not None:
            log.warning("received signal %s: will checkpoint and requeue at the end of this batch", signum)
        else:
            log.warning("received signal %s: will checkpoint and stop at the end of this batch (outside SLURM "
                        "nothing requeues the run)", signum)
        self._received[signum] = True

    def _agree(self, trainer: Trainer, pl_module: LightningModule) -> Optional[tuple]:
        """(USR1, INT, TERM) received on any rank since the last agreement, or None when the ranks do not
        agree after this batch (DDP: only every `every_n_steps` batches, counted from the run's start)."""
        local = (self._received[signal.SIGUSR1], self._received[signal.SIGINT], self._received[signal.SIGTERM])
        if trainer.world_size == 1:
            return local
        if (batches_trained(trainer) + 1) % self.every_n_steps:
            return None
        flags = torch.tensor(local, dtype=torch.float32, device=pl_module.device)
        torch.distributed.all_reduce(flags)  # one collective: Strategy.reduce would add a barrier
        return tuple(bool(f) for f in flags.tolist())

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        agreed = self._agree(trainer, pl_module)
        if agreed is None or not any(agreed):
            return
        usr1, interrupt, term = agreed
        self._received = dict.fromkeys(self._received, False)
        slurm_usr1 = usr1 and self._lightning_usr1 is not None  # under SLURM with auto-requeue
        if trainer.global_step >= trainer.max_steps and not slurm_usr1:
            return  # the last step: the run ends normally anyway
        if slurm_usr1:  # first: SLURM's SIGTERM may follow its USR1. The requeue waits for the end of fit
            trainer.save_checkpoint(hpc_save_path(trainer), weights_only=False)
            trainer.should_stop = True
            self.requeue = True
        elif interrupt or term:
            trainer.save_checkpoint(self.last_ckpt, weights_only=False)
            self._stop = RunInterrupted(trainer.global_step, self.last_ckpt,
                                        signal.SIGINT if interrupt else signal.SIGTERM)
        elif usr1:  # not under Lightning's SLURM handling: a resumable checkpoint, then stop (nothing requeues)
            path = hpc_save_path(trainer)
            trainer.save_checkpoint(path, weights_only=False)
            self._stop = RunInterrupted(trainer.global_step, path, signal.SIGUSR1)

    def _stop_here(self, trainer: Trainer) -> None:
        if self._stop is not None:
            # a checkpointed stop, not a failure: the W&B run finishes cleanly (exit code 0), its rows written,
            # before Lightning finalizes the loggers as "failed" for the exception
            for logger in trainer.loggers:
                logger.finalize("interrupted")
            raise self._stop

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._stop_here(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop_here(trainer)


class SyncRequest(Callback):
    """Rank zero asks the login-node watcher to sync this run's offline W&B segment (logger.wandb.sync_dir,
    pipeline/run/sync.py) after each checkpoint and each validation; train.py asks once more after W&B finished."""

    def __init__(self, requests):
        self.requests = requests  # pipeline.run.sync.SyncRequests

    def _ask(self, trainer: Trainer) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        for logger in trainer.loggers:
            if hasattr(logger, "log_image") and not getattr(logger, "finished", False):  # WandbLogger
                self.requests.request(Path(logger.experiment.dir).parent)  # RUN_DIR/wandb/offline-run-*/files

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._ask(trainer)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        self._ask(trainer)


class DataErrorCounter(Callback):
    """Logs `data/skipped_samples`: this rank's running count of unreadable samples skipped under
    data.on_error=warn (kept in the loader's checkpointed state, so it survives resume). Logged only
    once something was skipped, so clean runs carry no empty column, and only on steps whose metrics are
    written: logging a Python number makes a device tensor from it (a host-to-device copy on a GPU)."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if not logs_written_this_step(trainer):
            return
        skipped = getattr(trainer.datamodule, "skipped_samples", 0)
        if skipped:
            pl_module.log("data/skipped_samples", float(skipped), on_step=True, on_epoch=False)


class LastCheckpoint(Checkpoint):
    """`path` (RUN_DIR/checkpoints/last.ckpt) every `every_n_steps` optimizer steps and at the last step,
    never ahead of what metrics.csv holds.

    After the step's validation when one follows: a kill during it then resumes from the previous
    checkpoint and runs it again. A checkpoint taken before it (Lightning's ModelCheckpoint) resumes past
    it: Lightning counts it as done, so its val/* row, image grids and best checkpoint were lost for good.
    Otherwise taken at the batch end, as Lightning's own restore expects, but committed (renamed into
    place, AtomicCheckpointIO.staged) only at the next batch start or the end of training: after Lightning
    has written the step's train/* row, which a kill in between would otherwise lose for good.
    The last step inside the loop, not after fit: a checkpoint taken after fit returned restores
    Lightning's logging step one ahead, so an extended run (trainer.max_steps raised) labelled every
    later metric row step + 1.
    A `Checkpoint`, so Lightning runs it after the other callbacks and after any ModelCheckpoint listed
    before it: last.ckpt then records that validation's best checkpoint.
    """

    def __init__(self, path: Path, every_n_steps: int):
        self.path = Path(path)
        self.every_n_steps = every_n_steps
        self._seen_step: Optional[int] = None
        self._due: Optional[int] = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._seen_step, self._due = trainer.global_step, None  # the restored step is saved already

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # no optimizer step on this batch (gradient accumulation)
            return
        self._seen_step = step
        if step % self.every_n_steps and step < trainer.max_steps:
            return
        if validates_after_this_batch(trainer):
            self._due = step
            return
        io = trainer.strategy.checkpoint_io
        with io.staged() if hasattr(io, "staged") else contextlib.nullcontext():
            self._save(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._due is not None and self._due == trainer.global_step:
            self._due = None
            self._save(trainer)  # the step's rows, train and val, are written: commit at once

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._commit(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._commit(trainer)

    @staticmethod
    def _commit(trainer: Trainer) -> None:
        commit = getattr(trainer.strategy.checkpoint_io, "commit", None)
        if commit is not None:
            commit()

    def _save(self, trainer: Trainer) -> None:
        for logger in trainer.loggers:  # rows logged outside Lightning's connector (LearningRateMonitor)
            logger.save()
        trainer.save_checkpoint(self.path, weights_only=False)  # every rank (it holds a barrier); rank zero writes


class LossBoundExceeded(RuntimeError):
    """The training loss went over trainer.max_loss."""


class LossWatch(Callback):
    """Warns once when the training loss diverges (over DIVERGENCE times the first logged loss in this
    process), and stops the run when a loss exceeds `max_loss` (trainer.max_loss; None: never).

    The loss is read on the host only on the steps whose metrics Lightning writes (every
    trainer.log_every_n_steps; the first of them is the baseline), where the logger fetches it to the host
    anyway: no extra GPU sync on other steps. Under DDP the stop is decided together (one boolean all-reduce on
    those steps) so that no rank is left waiting. Listed before LastCheckpoint, which runs in the same
    hook: an exploded state is never saved as last.ckpt.
    """

    DIVERGENCE = 10.0

    def __init__(self, max_loss: Optional[float] = None):
        self.max_loss = max_loss
        self._first: Optional[float] = None
        self._warned = False

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if not logs_written_this_step(trainer):  # the loss reaches the host only on these steps anyway
            return
        first = self._first is None
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not torch.is_tensor(loss):
            return
        value = float(loss)
        if first:
            self._first = value
        elif not self._warned and value > self.DIVERGENCE * max(abs(self._first), 1.0):
            self._warned = True
            if trainer.is_global_zero:
                log.warning("warning: training loss %.4g after %d steps is over %g times the first logged one (%.4g): "
                            "training is diverging (optim.lr too high?). trainer.max_loss=<nats> stops such a run.",
                            value, trainer.global_step, self.DIVERGENCE, self._first)
        if self.max_loss is not None and logs_written_this_step(trainer):
            if trainer.strategy.reduce_boolean_decision(value > self.max_loss, all=False):
                raise LossBoundExceeded(f"training loss {value:.4g} after {trainer.global_step} steps exceeds "
                                        f"trainer.max_loss={self.max_loss:g}")

