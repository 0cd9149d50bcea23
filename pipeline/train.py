"""Train a VAE: config -> data -> model -> Lightning Trainer, resumable and tracked.

    python -m pipeline.train                                       # digits default (CPU or one GPU): runs/default
    python -m pipeline.train configs/dsprites_beta.yaml objective.beta=8   # runs/dsprites_beta-objective.beta=8
    python -m pipeline.train trainer.max_steps=6000                # extend the default run (same directory)
    python -m pipeline.train trainer.devices=4                     # one node, 4 GPUs (DDP)
    sbatch slurm/train.sh configs/dsprites_beta.yaml               # many nodes, requeue on preemption
    python -m pipeline.train --dry-run [ARGS ...]                  # resolve the config and the launch, then exit

Positional arguments ending in .yaml/.yml are config files, merged in order over the dataclass
defaults (pipeline/config.py); `key=value` arguments override them. A run not named by `run.name` is
named after its config files and the overrides that change what is trained. Outputs in RUN_DIR
(`run.dir`, default runs/<run.name>): config.yaml, metrics.csv, checkpoints/{last,best-*}.ckpt, images/,
wandb/, run.lock (held while training: one writer per run directory, pipeline/rundir.py). Ctrl-C
checkpoints at the end of the current batch and exits with status 130 (a second Ctrl-C stops at once);
the same command resumes.
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from pipeline import config as C
from pipeline.cli import config_from_argv
from pipeline.launch import describe

log = logging.getLogger("pipeline.train")
INTERRUPTED_EXIT = 130  # Ctrl-C: 128 + SIGINT, what a shell reports for a program ended by it


def build_loggers(cfg, run_dir: Path, rank_zero: bool):
    from pipeline.lightning_compat import resumable_csv_logger, wandb_logger
    from pipeline.tracking import resolve_wandb_mode, wandb_run_id

    loggers = [resumable_csv_logger(run_dir)]
    mode = resolve_wandb_mode(cfg.logger.wandb.mode)
    if mode != "disabled":
        w = cfg.logger.wandb
        loggers.append(wandb_logger(
            project=w.project, entity=w.entity, group=w.group, tags=list(w.tags), name=cfg.run.name,
            save_dir=str(run_dir), id=wandb_run_id(run_dir) if rank_zero else None, resume="allow",
            offline=(mode == "offline"), config=C.to_dict(cfg),
        ))
    return loggers, mode


def build_callbacks(cfg, run_dir: Path):
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from pipeline.callbacks import (
        DataErrorCounter,
        DeferredSignals,
        FinalValidation,
        ImageLogger,
        LastCheckpoint,
        LossWatch,
        StepLabels,
        StepSeed,
    )

    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        StepSeed(cfg.seed),
        StepLabels(),
        LearningRateMonitor(logging_interval="step"),
        DataErrorCounter(),
        DeferredSignals(ckpt_dir / "last.ckpt", cfg.trainer.signal_every_n_steps),
        FinalValidation(),
        LossWatch(cfg.trainer.max_loss),  # before LastCheckpoint: an exploded state is never saved
    ]
    if cfg.checkpoint.save_best:  # before LastCheckpoint: last.ckpt records the best of its step
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best-step{step:07d}", monitor="val/elbo",
                                         mode="max", save_top_k=1, auto_insert_metric_name=False,
                                         enable_version_counter=False))  # a redone step rewrites its file
    callbacks.append(LastCheckpoint(ckpt_dir / "last.ckpt", cfg.checkpoint.every_n_steps))
    if cfg.logger.images_every_n_steps > 0:
        callbacks.append(ImageLogger(run_dir / "images", cfg.logger.images_every_n_steps, cfg.logger.num_images))
    if cfg.trainer.enable_progress_bar:
        from pipeline.console import RunProgress, progress_every

        callbacks.append(RunProgress(progress_every(cfg.trainer.max_steps, cfg.trainer.log_every_n_steps)))
    return callbacks


def build_trainer(cfg, run_dir: Path, loggers, callbacks, checkpoint_io=None):
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    t = cfg.trainer
    from pipeline.checkpointing import AtomicCheckpointIO
    from pipeline.hooks import NullProfiler, grouped

    # every save (last, best, SLURM's hpc_ckpt_N) is atomic and checksummed
    plugins = [checkpoint_io if checkpoint_io is not None else AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # Lightning saves hpc_ckpt_N.ckpt and requeues on USR1 (sbatch --signal=USR1@90);
        # DeferredSignals moves that to a batch boundary.
        plugins.append(SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1))
    return pl.Trainer(
        default_root_dir=str(run_dir),
        max_steps=t.max_steps, max_epochs=-1,
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=_strategy(t.strategy),
        precision=t.precision,
        val_check_interval=t.val_check_interval, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        limit_val_batches=t.limit_val_batches,  # None: all (1.0 would print a notice on every run)
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val or None, accumulate_grad_batches=t.accumulate_grad_batches,
        enable_progress_bar=t.enable_progress_bar, deterministic=t.deterministic,
        enable_model_summary=False,  # the start-up summary gives the parameter count
        # one dispatch for our stateless callbacks, no profiler contexts: ~0.15 ms of a short step (pipeline/hooks.py)
        logger=loggers, callbacks=grouped(callbacks), plugins=plugins, profiler=NullProfiler(),
    )


def _strategy(name: str):
    """trainer.strategy, with DDP's gradients as views into its buckets (pipeline/accel.py)."""
    from pipeline.accel import ddp_kwargs

    kwargs = ddp_kwargs(name)
    if kwargs is None:
        return name
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(**kwargs)


def apply_device_defaults(cfg, trainer) -> str:
    """TF32 matmuls and cuDNN autotuning for the device the run trains on (pipeline/accel.py); returns the
    start-up summary's line for them and fused AdamW."""
    from pipeline import accel

    device = trainer.strategy.root_device.type
    matmul = accel.matmul_precision(device)
    if matmul is not None:
        torch.set_float32_matmul_precision(matmul)
    benchmark = accel.cudnn_benchmark(cfg.model.arch, device, cfg.trainer.deterministic)
    if benchmark is not None:
        torch.backends.cudnn.benchmark = benchmark
    fused = accel.fused_adamw({device}, str(trainer.precision), cfg.trainer.gradient_clip_val)
    return accel.describe(device, fused, matmul, benchmark, accel.ddp_kwargs(cfg.trainer.strategy))


def report_interrupt(stop, run_dir: Path, command: Optional[str]) -> None:
    """Where a Ctrl-C left the run and how to continue it (`stop`: None when it stopped at once)."""
    from pipeline.checkpointing import resume_candidates

    if stop is not None:
        print(f"# interrupted at step {stop.step}: checkpoint saved to {stop.path}", flush=True)
    else:
        last = next(iter(resume_candidates(run_dir)), None)
        print("# stopped at once (Ctrl-C); " + (f"the newest checkpoint is {last}" if last
                                               else "no checkpoint yet: the run starts over"), flush=True)
    print(f"# continue with the same command: {command or 'the command that started it'}", flush=True)


def train(cfg, command: Optional[str] = None) -> dict:
    """Run (or resume) training for a loaded config; returns the final logged metrics (floats).
    A run directory that cannot be used (held by another training, a different config, unwritable or
    damaged checkpoints) stops with SystemExit and a one-line message. Ctrl-C raises
    SystemExit(INTERRUPTED_EXIT) after saying how to continue (`command`: the command line that started it)."""
    from lightning.pytorch.utilities import rank_zero_only

    from pipeline.checkpointing import CheckpointError
    from pipeline.console import quiet_known_noise
    from pipeline.rundir import RunDirError, RunLock

    quiet_known_noise()
    rank_zero = rank_zero_only.rank == 0
    run_dir = Path(cfg.run.dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot create run directory {run_dir}: {e.strerror or e}") from None
    lock = None
    try:
        # Global rank zero only: the other ranks start after it holds the lock, or end with it (rundir.py).
        lock = RunLock(run_dir).acquire() if rank_zero else None
        return _train(cfg, run_dir, rank_zero, command)
    except (RunDirError, CheckpointError, C.ConfigError) as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        if lock is not None:
            lock.release()


def prepare_run_dir(cfg, run_dir: Path, rank_zero: bool):
    """Everything done to RUN_DIR before training (rank zero holds the run lock): fail now if checkpoints
    cannot be written; clear what a killed writer left; pick the checkpoint to resume from and check that
    it continues the same run; save config.yaml; drop metric rows and best checkpoints from work lost
    after that checkpoint. Returns ((checkpoint path, its verified contents) or None, what the start-up
    summary says about it)."""
    from pipeline.checkpointing import atomic_save, choose_resume, ensure_writable, remove_later_best, remove_temp_files
    from pipeline.rundir import check_same_run, start_over
    from pipeline.tracking import truncate_metrics_csv

    def say(text: str) -> None:
        if rank_zero:
            print(text, flush=True)

    ckpt_dir = run_dir / "checkpoints"
    if rank_zero:
        ensure_writable(ckpt_dir)  # now, not at the first save hours in
        remove_temp_files(run_dir, ckpt_dir)
        if cfg.resume == "never" and (removed := start_over(run_dir)):
            say(f"# resume=never: starting over in {run_dir}; removed {', '.join(p.name for p in removed)}")
    resume = choose_resume(cfg.resume, run_dir, say)
    if resume and rank_zero:
        check_same_run(run_dir, cfg, resume[1].get("hyper_parameters"))
    if resume and cfg.resume == "auto" and Path(resume[0]).name.startswith("best-"):
        # The fallback when last.ckpt and hpc_ckpt_N do not load: continue from a copy at last.ckpt, so
        # that Lightning, which never deletes the checkpoint it resumed from, can drop this best later.
        if rank_zero:
            atomic_save(resume[1], ckpt_dir / "last.ckpt")
            say(f"# {ckpt_dir / 'last.ckpt'} replaced by a copy of {resume[0]}")
        resume = str(ckpt_dir / "last.ckpt"), resume[1]
    if rank_zero:
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(C.to_yaml(cfg))
        os.replace(tmp, run_dir / "config.yaml")
    said = None
    if resume and rank_zero:
        step = int(resume[1].get("global_step", 0))
        dropped = truncate_metrics_csv(run_dir / "metrics.csv", step)
        remove_later_best(run_dir, step)
        said = f"resuming from {resume[0]} (step {step}); dropped {dropped} metric rows logged after it"
    return resume, said


def _train(cfg, run_dir: Path, rank_zero: bool, command: Optional[str]) -> dict:
    import lightning.pytorch as pl

    from pipeline.callbacks import DeferredSignals, LossBoundExceeded, RunInterrupted
    from pipeline.checkpointing import AtomicCheckpointIO, CheckpointError
    from pipeline.console import summary_lines
    from pipeline.data.datamodule import ShardDataModule
    from pipeline.data.prepare import ensure_prepared
    from pipeline.module import VAEModule

    ckpt_dir = run_dir / "checkpoints"
    resume, resume_said = prepare_run_dir(cfg, run_dir, rank_zero)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # model init; per-batch noise: StepSeed
    ensure_prepared(cfg.data)
    dm = ShardDataModule(cfg.data)
    module = VAEModule(model=C.to_dict(cfg.model), objective=C.to_dict(cfg.objective), optim=C.to_dict(cfg.optim),
                       input_shape=tuple(dm.input_shape), max_steps=cfg.trainer.max_steps,
                       binarize=cfg.data.binarize)
    if cfg.trainer.compile:
        module.vae.compile()  # in place: checkpoint keys stay unprefixed

    loggers, wandb_mode = build_loggers(cfg, run_dir, rank_zero)
    callbacks = build_callbacks(cfg, run_dir)
    trainer = build_trainer(cfg, run_dir, loggers, callbacks, AtomicCheckpointIO(preloaded=resume))
    defaults = apply_device_defaults(cfg, trainer)
    if rank_zero:
        print("\n".join(summary_lines(cfg, dm, module, trainer, wandb_mode, resume_said, defaults)), flush=True)
    started = time.time()
    try:
        # weights_only=False: our own checkpoints, checksum-verified (AtomicCheckpointIO); also no notice
        trainer.fit(module, datamodule=dm, ckpt_path=resume[0] if resume else None, weights_only=False)
    except (FloatingPointError, LossBoundExceeded) as e:
        raise SystemExit(f"error: {e}. The last good checkpoint is kept in {ckpt_dir}.") from None
    except CheckpointError:
        _end_started_ranks(trainer)  # rank zero's save failed; the others wait in its barrier
        raise
    except (RunInterrupted, SystemExit) as e:  # Ctrl-C; Lightning exits 1 after a KeyboardInterrupt
        signals = next(c for c in callbacks if isinstance(c, DeferredSignals))
        if isinstance(e, SystemExit) and not signals.stopped_at_once:
            raise
        if rank_zero:
            report_interrupt(e if isinstance(e, RunInterrupted) else None, run_dir, command)
        raise SystemExit(INTERRUPTED_EXIT) from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
    if rank_zero:
        elbo = metrics.get("val/elbo")
        print(f"# done: step {trainer.global_step} in {time.time() - started:.1f}s; "
              f"val/elbo {elbo if elbo is None else round(elbo, 3)} nats; run dir {run_dir}; wandb {wandb_mode}",
              flush=True)
        if wandb_mode == "offline":
            print(f"# upload later with: wandb sync {run_dir / 'wandb'}/offline-run-*", flush=True)
    return metrics


def _end_started_ranks(trainer) -> None:
    """Kill the ranks Lightning started from this process (one node, trainer.devices > 1), as Lightning
    does on Ctrl-C; under srun, --kill-on-bad-exit ends the others."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if trainer.is_global_zero and hasattr(launcher, "kill"):
        launcher.kill(signal.SIGKILL)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(f"{__doc__}\nConfig keys, KEY = DEFAULT  TYPE: MEANING (pipeline/config.py):\n{C.keys_help()}")
        return 0
    dry_run = bool(argv) and argv[0] == "--dry-run"
    try:
        # --dry-run runs in SLURM's batch step, before srun starts the ranks
        cfg = config_from_argv(argv[dry_run:], require_srun=not dry_run)
    except ValueError as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if dry_run:
        print(describe(cfg))
        return 0
    from pipeline.cli import data_errors, error_line

    try:
        train(cfg, command=shlex.join(["python", "-m", "pipeline.train", *argv]))
    except KeyboardInterrupt:  # Ctrl-C before the Trainer started (data preparation, model set-up)
        print("# stopped (Ctrl-C) before training started", flush=True)
        return INTERRUPTED_EXIT
    except data_errors() as e:  # a bad shard or source: one line naming it; VAE_DEBUG=1 keeps the traceback
        if os.environ.get("VAE_DEBUG", "0") not in ("", "0"):
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
