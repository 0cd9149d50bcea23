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
wandb/. Ctrl-C checkpoints at the end of the current batch and exits with status 130 (a second Ctrl-C
stops at once); the same command resumes.
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


def find_resume_checkpoint(resume: str, run_dir: Path) -> Optional[str]:
    """`never` -> None; a path -> that path; `auto` -> the newest of checkpoints/last.ckpt and
    Lightning's SLURM `hpc_ckpt_N.ckpt` in RUN_DIR (None on a fresh run)."""
    if resume == "never":
        return None
    if resume != "auto":
        return resume
    candidates = [p for p in [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    if not candidates:
        return None
    return str(max(candidates, key=lambda p: (p.stat().st_mtime, p.name.startswith("hpc"))))


def checkpoint_step(path: str) -> int:
    # mmap: read the step without loading every tensor (Lightning loads the file for real next)
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return int(ckpt.get("global_step", 0))


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

    from pipeline.callbacks import DataErrorCounter, DeferredSignals, FinalValidation, ImageLogger, StepSeed

    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        StepSeed(cfg.seed),
        # `last.ckpt` every N steps; Lightning writes through an fsspec transaction (temp file, then
        # move), so a kill mid-write leaves the previous last.ckpt intact.
        ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:07d}", auto_insert_metric_name=False,
                        every_n_train_steps=cfg.checkpoint.every_n_steps, save_top_k=0, save_last=True),
        LearningRateMonitor(logging_interval="step"),
        DataErrorCounter(),
        DeferredSignals(ckpt_dir / "last.ckpt", cfg.trainer.signal_every_n_steps),
        FinalValidation(),
    ]
    if cfg.checkpoint.save_best:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best-step{step:07d}", monitor="val/elbo",
                                         mode="max", save_top_k=1, auto_insert_metric_name=False))
    if cfg.logger.images_every_n_steps > 0:
        callbacks.append(ImageLogger(run_dir / "images", cfg.logger.images_every_n_steps, cfg.logger.num_images))
    if cfg.trainer.enable_progress_bar:
        from pipeline.console import RunProgress, progress_every

        callbacks.append(RunProgress(progress_every(cfg.trainer.max_steps, cfg.trainer.log_every_n_steps)))
    return callbacks


def build_trainer(cfg, run_dir: Path, loggers, callbacks):
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    t = cfg.trainer
    plugins = []
    if SLURMEnvironment.detect():
        # Lightning saves hpc_ckpt_N.ckpt and requeues on USR1 (sbatch --signal=USR1@90);
        # DeferredSignals moves that to a batch boundary.
        plugins.append(SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1))
    return pl.Trainer(
        default_root_dir=str(run_dir),
        max_steps=t.max_steps, max_epochs=-1,
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        precision=t.precision,
        val_check_interval=t.val_check_interval, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        limit_val_batches=t.limit_val_batches,  # None: all (1.0 would print a notice on every run)
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val or None, accumulate_grad_batches=t.accumulate_grad_batches,
        enable_progress_bar=t.enable_progress_bar, deterministic=t.deterministic,
        enable_model_summary=False,  # the start-up summary gives the parameter count
        logger=loggers, callbacks=callbacks, plugins=plugins or None,
    )


def report_interrupt(stop, run_dir: Path, command: Optional[str]) -> None:
    """Where a Ctrl-C left the run and how to continue it (`stop`: None when it stopped at once)."""
    if stop is not None:
        print(f"# interrupted at step {stop.step}: checkpoint saved to {stop.path}", flush=True)
    else:
        last = find_resume_checkpoint("auto", run_dir)
        print("# stopped at once (Ctrl-C); " + (f"the last checkpoint is {last} (step {checkpoint_step(last)})"
                                               if last else "no checkpoint yet: the run starts over"), flush=True)
    print(f"# continue with the same command: {command or 'the command that started it'}", flush=True)


def train(cfg, command: Optional[str] = None) -> dict:
    """Run (or resume) training for a loaded config; returns the final logged metrics (floats).

    Ctrl-C raises SystemExit(INTERRUPTED_EXIT) after saying how to continue (`command`, the command
    line that started the run)."""
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import rank_zero_only

    from pipeline.callbacks import DeferredSignals, RunInterrupted
    from pipeline.console import quiet_known_noise, summary_lines
    from pipeline.data.datamodule import ShardDataModule
    from pipeline.module import VAEModule
    from pipeline.data.prepare import ensure_prepared
    from pipeline.tracking import truncate_metrics_csv

    quiet_known_noise()
    rank_zero = rank_zero_only.rank == 0
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero:
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(C.to_yaml(cfg))
        os.replace(tmp, run_dir / "config.yaml")

    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # model init; per-batch noise: StepSeed
    ensure_prepared(cfg.data)
    dm = ShardDataModule(cfg.data)
    module = VAEModule(model=C.to_dict(cfg.model), objective=C.to_dict(cfg.objective), optim=C.to_dict(cfg.optim),
                       input_shape=tuple(dm.input_shape), max_steps=cfg.trainer.max_steps,
                       binarize=cfg.data.binarize)
    if cfg.trainer.compile:
        module.vae.compile()  # in place: checkpoint keys stay unprefixed

    ckpt_path, resume = find_resume_checkpoint(cfg.resume, run_dir), None
    if ckpt_path and rank_zero:
        step = checkpoint_step(ckpt_path)
        dropped = truncate_metrics_csv(run_dir / "metrics.csv", step)
        resume = f"resuming from {ckpt_path} (step {step}); dropped {dropped} metric rows logged after it"

    loggers, wandb_mode = build_loggers(cfg, run_dir, rank_zero)
    callbacks = build_callbacks(cfg, run_dir)
    trainer = build_trainer(cfg, run_dir, loggers, callbacks)
    if rank_zero:
        print("\n".join(summary_lines(cfg, dm, module, trainer, wandb_mode, resume)), flush=True)
    started = time.time()
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    except FloatingPointError as e:
        raise SystemExit(f"error: {e}. The last good checkpoint is kept in {run_dir / 'checkpoints'}.") from None
    except (RunInterrupted, SystemExit) as e:  # Ctrl-C; Lightning exits 1 after a KeyboardInterrupt
        signals = next(c for c in callbacks if isinstance(c, DeferredSignals))
        if isinstance(e, SystemExit) and not signals.stopped_at_once:
            raise
        if rank_zero:
            report_interrupt(e if isinstance(e, RunInterrupted) else None, run_dir, command)
        raise SystemExit(INTERRUPTED_EXIT) from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
    if trainer.global_step >= cfg.trainer.max_steps and not trainer.interrupted:
        # `last.ckpt` at the very end too (every_n_steps need not divide max_steps). Every rank calls
        # it (it holds a barrier); rank zero writes.
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    if rank_zero:
        elbo = metrics.get("val/elbo")
        print(f"# done: step {trainer.global_step} in {time.time() - started:.1f}s; "
              f"val/elbo {elbo if elbo is None else round(elbo, 3)} nats; run dir {run_dir}; wandb {wandb_mode}",
              flush=True)
        if wandb_mode == "offline":
            print(f"# upload later with: wandb sync {run_dir / 'wandb'}/offline-run-*", flush=True)
    return metrics


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
