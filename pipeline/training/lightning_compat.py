"""Every private Lightning / PyTorch name the pipeline relies on, in one place.

Each function says why no public API does the job; tests/test_lightning_compat.py runs each against the
installed Lightning and fails if the behaviour relied on changes (pyproject.toml bounds Lightning to the
versions tested). Nothing else in `pipeline` may touch a private Lightning or DataLoader attribute.
"""
from __future__ import annotations

import csv
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging


def attached_trainer(module):
    """The Trainer `module` (a LightningModule) is attached to, or None. `module.trainer` raises when there is
    none (a module built for evaluation, or called outside `fit`), and Lightning has no public check; it is
    read on every training step, so no exception is caught per step either."""
    return module._trainer


def batches_trained(trainer) -> int:
    """Training batches run so far in this run, restored from a checkpoint on resume.

    StepSeed derives each batch's noise from it. `trainer.global_step` counts optimizer steps (not
    batches under gradient accumulation) and `current_epoch` is one ahead after a max_steps stop.
    """
    return trainer.fit_loop.epoch_loop.total_batch_idx


def align_log_step(trainer) -> None:
    """Make Lightning's logging step (the `step` of metrics.csv rows and W&B) the optimizer step count.

    Lightning saves its logging counter one behind and adds one on restore, except when the checkpoint was
    taken after a validation that the restored loop does not see as scheduled (the final validation of a
    run ended by max_steps): a run extended from it then labelled every later row one step early. The
    counter is, by definition, optimizer steps taken (one optimizer here), so it is set rather than patched.
    """
    trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step


def logs_written_this_step(trainer) -> bool:
    """Whether Lightning writes step metrics after the current training batch (every
    trainer.log_every_n_steps). Skipping `self.log` on other steps saves ~2.7 ms per step (bench).
    During training this is Lightning's `_LoggerConnector.should_update_logs` for the fit loop, computed
    directly: the property first finds the active loop (~6 us a call in a training step; called twice a
    step). Anything unexpected falls back to True (log every step: slower, never wrong)."""
    try:
        every = trainer.log_every_n_steps
        if every == 0:
            return False
        return (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % every == 0 or trainer.should_stop
    except AttributeError:
        return True


def skip_per_step_sigterm_broadcast(trainer) -> bool:
    """Switch off Lightning's per-step SIGTERM broadcast for this trainer's fit; True if there was one.

    Under DDP, Lightning (2.5+) broadcasts a SIGTERM flag from rank zero before every training batch and
    reads it on the host (`_TrainingEpochLoop._broadcast_sigterm_tensor`): a collective and a device sync
    per step, with no public switch. DeferredSignals agrees on SIGTERM (with USR1 and INT) every
    trainer.signal_every_n_steps batches instead and then runs Lightning's SIGTERM handler on every rank
    at once (its broadcast pairs up across ranks; Lightning stops after that batch as usual)."""
    loop = trainer.fit_loop.epoch_loop
    if not callable(getattr(type(loop), "_broadcast_sigterm_tensor", None)):
        return False
    loop._broadcast_sigterm_tensor = lambda: None  # shadows the method on this instance only
    return True


def after_signal_registration(trainer, install: Callable[[], None]) -> None:
    """Run `install` right after Lightning registers its signal handlers for this trainer's run. Trainer._run
    registers them after the callbacks' setup and before the training data is loaded (a long data.cache fill,
    DDP's first collectives); the first hook after that is on_train_start, so without this Lightning's USR1
    handler (a checkpoint and requeue from inside the handler) and its SIGTERM handler were live until then."""
    connector = trainer._signal_connector
    register = connector.register_signal_handlers

    def register_then_install() -> None:
        register()
        install()

    connector.register_signal_handlers = register_then_install  # this instance only


def hpc_save_path(trainer) -> str:
    """The next `RUN_DIR/hpc_ckpt_N.ckpt`: the name Lightning's SLURM requeue writes and resumes from,
    used when DeferredSignals saves without Lightning's SLURM handler."""
    return trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)


def shutdown_loader_workers(loader) -> None:
    """Stop a DataLoader's live persistent workers, so the next iter() forks new ones from the
    loader's current state (a resume position set after the workers started). DataLoader has no
    public way to drop persistent workers short of deleting the loader."""
    if loader._iterator is not None:
        loader._iterator._shutdown_workers()
        loader._iterator = None


def resumable_csv_logger(run_dir: Path):
    """Lightning's CSVLogger writing RUN_DIR/metrics.csv, made safe for resume.

    Stock CSVLogger deletes an existing metrics.csv when its directory is not empty (the private
    `ExperimentWriter._check_log_dir_exists`), and rebuilds the header from the current process's keys
    only: a resumed run would lose every earlier row. This one appends, starting from the existing
    header (train.py first drops rows after the checkpoint).
    """
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter
    from lightning.pytorch.loggers.logger import rank_zero_experiment

    class AppendingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:  # keep earlier rows
            if self._fs.isfile(self.metrics_file_path):
                with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                    self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    class ResumableCSVLogger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self) -> ExperimentWriter:
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = AppendingWriter(log_dir=self.log_dir)
            return self._experiment

    return ResumableCSVLogger(save_dir=str(run_dir), name="", version="")


def wandb_logger(checkpoints=None, **kwargs):
    """Lightning's WandbLogger, writing one history that continues across resumes.

    - Each row goes to W&B under `step=` the trainer's logging step (the `step` of metrics.csv), so
      `_step` is the same number in W&B as in metrics.csv: a resumed, requeued or extended run starts its
      new W&B segment where the last one stopped instead of at `_step` 0 (stock WandbLogger lets W&B count
      its `log` calls, per process). Rows logged with the same step merge into one row.
    - The config is given once, to `wandb.init` (train.py: the whole resolved config); the module's
      hyperparameters, a subset of it, are not logged a second time under the same names.
    - `finalize` finishes the W&B run, so the last row is committed and the offline segment closed before
      the process goes (a SLURM requeue kills the job right after train.py asks for it).
    - `checkpoints` (a callable giving [(path, aliases)]) are logged as versions of the artifact
      `model-<run id>` before the run finishes, unless it failed (logger.wandb.log_checkpoints).
    - Minus the `anonymous` argument: Lightning puts `anonymous=None` into its private `_wandb_init` dict
      whatever the caller says, and wandb >= 0.19 prints "The anonymous setting has no effect and will be
      removed" for any value given, None included: on every run. Leaving the key out is what wandb asks for.
    """
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.utilities import rank_zero_only

    class StepWandbLogger(WandbLogger):
        finished = False

        @rank_zero_only
        def log_metrics(self, metrics, step=None) -> None:
            if self.finished:  # never a second W&B segment from this process
                warnings.warn(f"W&B run already finished: step {step} not sent to W&B ({', '.join(sorted(metrics))})",
                              stacklevel=2)
                return None
            if step is None:
                return super().log_metrics(metrics, step)
            self.experiment.log(dict(metrics, **{"trainer/global_step": step}), step=int(step))

        @rank_zero_only
        def log_hyperparams(self, params) -> None:  # the full config went to wandb.init
            pass

        @rank_zero_only
        def finalize(self, status: str) -> None:
            super().finalize(status)
            if self._experiment is not None and not self.finished:
                if checkpoints is not None and status != "failed":
                    self.log_checkpoint_artifacts(checkpoints())
                self.finished = True
                self._experiment.finish(exit_code=1 if status == "failed" else 0)

        def log_checkpoint_artifacts(self, found) -> None:
            import wandb

            for path, aliases in found:
                art = wandb.Artifact(f"model-{self._experiment.id}", type="model",
                                     metadata={"file": Path(path).name, "aliases": list(aliases)})
                art.add_file(str(path), name=Path(path).name)  # copied to W&B's staging: last.ckpt may change
                self._experiment.log_artifact(art, aliases=list(aliases))

    logger = StepWandbLogger(**kwargs)
    if logger._wandb_init.get("anonymous", False) is None:
        del logger._wandb_init["anonymous"]
    return logger


def log_step(trainer) -> int:
    """The step Lightning labels the rows it logs now with (metrics.csv `step`, W&B `_step`): during a
    validation at global step s it is s - 1, as the val/* row. ImageLogger puts its grids on that row.
    Lightning's logger connector has it only as the private counter that align_log_step sets."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def validates_after_this_batch(trainer) -> bool:
    """Whether the fit loop runs validation right after the current training batch (asked from
    on_train_batch_end). LastCheckpoint then takes its checkpoint after that validation. This is the loop's
    own decision (val_check_interval, limit_val_batches=0, a stop request), which no public API exposes."""
    return bool(trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))


def started_ranks(trainer) -> list:
    """The processes (subprocess.Popen) of the ranks Lightning started from this process: rank zero of a
    one-node run launched without srun or torchrun (`_SubprocessScriptLauncher.procs`, a public attribute of
    a private class); [] elsewhere. Its child-process observer SIGKILLs this process within 5 s of any of them
    exiting with a status other than 0."""
    launcher = getattr(trainer.strategy, "launcher", None)
    return list(getattr(launcher, "procs", None) or []) if trainer.is_global_zero else []


def launched_by_rank_zero(trainer) -> bool:
    """Whether this rank is a process that Lightning's own launcher started from rank zero (LOCAL_RANK set by
    it, LightningEnvironment), not by srun or torchrun: its exit status is seen only by that launcher's
    observer, which SIGKILLs rank zero on a status other than 0."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    return not trainer.is_global_zero and type(trainer.strategy.cluster_environment) is LightningEnvironment


class EMAWeights(EMAWeightAveraging):
    """optim.ema_decay: an exponential moving average of the weights, updated after every optimizer step,
    ema <- decay * ema + (1 - decay) * w (the first update copies w, as torch's AveragedModel does).

    Lightning's EMAWeightAveraging keeps its layout: checkpoints hold the average in `state_dict` (what
    `pipeline.evaluate`, `model.init_from` and `VAEModule.from_checkpoint` load) and the trained weights in
    `current_model_state` (what a resume continues from), and `n_averaged` in `averaging_state`; validation (its
    metrics, image grids and best checkpoint) runs on the average. Three changes, each for something the run
    relies on:
    - The average is made on the training device (`trainer.strategy.root_device`): Lightning's setup hook runs
      before the model is moved there, so the stock callback kept it on the CPU and copied every weight off the
      GPU at every step.
    - The update is torch's `get_ema_multi_avg_fn` (one foreach lerp) on the device, with no host read:
      AveragedModel.update_parameters reads its `n_averaged` buffer twice a step (a GPU sync each;
      tests/test_sync.py counts them). Whether it is the first update is known on the host
      (`_latest_update_step`, restored from the checkpoint).
    - The average is swapped back after `on_validation_end` of the callbacks before checkpoints, not at
      `on_validation_epoch_end`: ImageLogger draws its grids in that hook, after this callback's (it is listed
      first), and must see the average; checkpoint callbacks run after this one and save the trained weights.
    It must come before DeferredSignals and LastCheckpoint (build_callbacks lists it first): a checkpoint taken at
    a batch end then holds this step's average, and the resumed run continues it exactly. After fit the module
    holds the average (Lightning's on_train_end), as the checkpoints' state_dict does.
    Here, not in callbacks.py: it uses WeightAveraging's private `_average_model` (torch's AveragedModel),
    `_latest_update_step` (its checkpointed state), `_device` and `_swap_models`; tests/test_lightning_compat.py
    checks the checkpoint layout and the swap they give.
    """

    def __init__(self, decay: float):
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        super().__init__(decay=decay)
        self.decay = float(decay)
        self._lerp = get_ema_multi_avg_fn(self.decay)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._device = trainer.strategy.root_device
        super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The precision plugin converted the model after setup (64-true: float64): the average follows, kept at
        # least float32 (bf16-true / 16-true weights: a float32 average, whose small updates do not round away).
        for average, live in zip(self._average_model.module.parameters(), pl_module.parameters()):
            dtype = torch.promote_types(live.dtype, torch.float32) if live.is_floating_point() else live.dtype
            if average.dtype != dtype:
                average.data = average.data.to(dtype)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step <= self._latest_update_step:  # no optimizer step on this batch (accumulation)
            return
        self.update(pl_module, first=self._latest_update_step == 0)
        self._latest_update_step = trainer.global_step

    @torch.no_grad()
    def update(self, pl_module: LightningModule, first: bool = False) -> None:
        """One EMA step of the average towards pl_module's weights (first: a copy of them)."""
        averaged = self._average_model
        ema = [p.detach() for p in averaged.module.parameters()]
        live = [p.detach() for p in pl_module.parameters()]
        live = [w if w.dtype == e.dtype and w.device == e.device else w.to(e) for w, e in zip(live, ema)]
        skipped = getattr(pl_module, "step_skipped", None)  # optim.grad_skip_norm: a device bool, no host read
        if first:
            for e, w in zip(ema, live):
                e.copy_(w)
        elif skipped is None:
            self._lerp(ema, live, None)  # torch's own EMA step: one foreach lerp
        else:  # a skipped step leaves the average as it is (as VDVAE's, which updates it only after a taken step)
            weight = (1.0 - self.decay) * (~skipped).to(ema[0].dtype)
            torch._foreach_lerp_(ema, live, [weight] * len(ema))
        averaged.n_averaged.add_(1)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pass  # swapped back in on_validation_end

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._average_model is not None:
            self._swap_models(pl_module)

    def averaged_parameters(self) -> list:
        """The average's parameters (tensors on the training device), in pl_module.parameters() order."""
        return [p.detach() for p in self._average_model.module.parameters()]


def saved_loader_state(checkpoint: dict) -> dict | None:
    """The training loader's state in a Lightning checkpoint (ShardLoader.state_dict, saved by the fit loop's
    combined loader), if it holds one."""
    loaders = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader")
    return loaders[0] if isinstance(loaders, list) and loaders and isinstance(loaders[0], dict) else None
