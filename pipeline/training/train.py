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
wandb/, run.lock (held while training: one writer per run directory, pipeline/run/rundir.py). Ctrl-C
checkpoints at the end of the current batch and exits with status 130 (a second Ctrl-C stops at once),
SIGTERM the same with status 143, USR1 outside SLURM with 138; the same command resumes. Bad input: one
line, status 2; a failing disk: one line, status 1.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from pipeline import config as C
from pipeline.exit_codes import INTERRUPTED_EXIT, TERMINATED_EXIT
from pipeline.launch.cli import config_from_argv
from pipeline.launch.cluster import describe, trainer_devices

log = logging.getLogger("pipeline.train")


def build_loggers(cfg, run):
    """The CSV logger, and W&B unless disabled (its run id from the run directory, `run`: a RunDir)."""
    from pipeline.run.tracking import resolve_wandb_mode
    from pipeline.training.lightning_compat import resumable_csv_logger, wandb_logger

    run_dir = run.path
    loggers = [resumable_csv_logger(run_dir)]
    mode = resolve_wandb_mode(cfg.logger.wandb.mode)
    if mode != "disabled":
        w = cfg.logger.wandb
        loggers.append(wandb_logger(
            project=w.project, entity=w.entity, group=w.group, tags=list(w.tags), name=cfg.run.name,
            save_dir=str(run_dir), id=run.wandb_run_id() if run.rank_zero else None, resume="allow",
            offline=(mode == "offline"), config=C.to_dict(cfg),
            checkpoints=checkpoint_files(run_dir, w.log_checkpoints) if w.log_checkpoints else None,
        ))
    return loggers, mode


def checkpoint_files(run_dir: Path, which: str):
    """logger.wandb.log_checkpoints -> a callable giving the checkpoints to log as W&B artifacts now, each with
    its aliases: `best` (the best-step*.ckpt kept), `last` (checkpoints/last.ckpt), `all` (both)."""
    import torch

    def found() -> list:
        out = []
        best = sorted((run_dir / "checkpoints").glob("best-step*.ckpt"))
        if which in ("best", "all") and best:
            out.append((best[-1], ["best", f"step-{int(best[-1].stem.split('step')[-1])}"]))
        last = run_dir / "checkpoints" / "last.ckpt"
        if which in ("last", "all") and last.is_file():
            step = torch.load(last, map_location="cpu", weights_only=False, mmap=True).get("global_step")
            out.append((last, ["latest", f"step-{step}"]))
        return out

    return found


def build_callbacks(cfg, run_dir: Path, sync_requests=None):
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from pipeline.training.callbacks import (
        DataErrorCounter,
        DeferredSignals,
        EMAWeights,
        FinalValidation,
        ImageLogger,
        LastCheckpoint,
        LossWatch,
        StepLabels,
        StepSeed,
        SyncRequest,
    )

    ckpt_dir = run_dir / "checkpoints"
    # first: the step's EMA update comes before any checkpoint taken at that batch end (EMAWeights)
    callbacks = [EMAWeights(cfg.optim.ema_decay)] if cfg.optim.ema_decay is not None else []
    callbacks += [
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
    if sync_requests is not None:
        callbacks.append(SyncRequest(sync_requests))
    if cfg.trainer.enable_progress_bar:
        from pipeline.training.console import RunProgress, progress_every

        callbacks.append(RunProgress(progress_every(cfg.trainer.max_steps, cfg.trainer.log_every_n_steps)))
    return callbacks


def build_trainer(cfg, run_dir: Path, loggers, callbacks, checkpoint_io=None):
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    t = cfg.trainer
    from pipeline.run.checkpointing import AtomicCheckpointIO
    from pipeline.training.hooks import NullProfiler, grouped

    # every save (last, best, SLURM's hpc_ckpt_N) is atomic and checksummed
    plugins = [checkpoint_io if checkpoint_io is not None else AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # Lightning saves hpc_ckpt_N.ckpt and requeues on USR1 (sbatch --signal=USR1@90);
        # DeferredSignals moves that to a batch boundary.
        plugins.append(SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1))
    return pl.Trainer(
        default_root_dir=str(run_dir),
        max_steps=t.max_steps, max_epochs=-1,
        accelerator=t.accelerator, devices=trainer_devices(t.devices), num_nodes=t.num_nodes, strategy=_strategy(t.strategy),
        precision=t.precision,
        val_check_interval=t.val_check_interval, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        limit_val_batches=t.limit_val_batches,  # None: all (1.0 would print a notice on every run)
        log_every_n_steps=t.log_every_n_steps,
        # the clip uses the norm VAEModule already took for logging and skipping (configure_gradient_clipping)
        gradient_clip_val=cfg.optim.grad_clip_norm, gradient_clip_algorithm="norm",
        accumulate_grad_batches=t.accumulate_grad_batches,
        enable_progress_bar=t.enable_progress_bar, deterministic=t.deterministic,
        enable_model_summary=False,  # the start-up summary gives the parameter count
        # one dispatch for our stateless callbacks, no profiler contexts: ~0.15 ms of a short step (pipeline/training/hooks.py)
        logger=loggers, callbacks=grouped(callbacks), plugins=plugins, profiler=NullProfiler(),
    )


def _strategy(name: str):
    """trainer.strategy, with DDP's gradients as views into its buckets (pipeline/training/accel.py)."""
    from pipeline.training.accel import ddp_kwargs

    kwargs = ddp_kwargs(name)
    if kwargs is None:
        return name
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(**kwargs)


def apply_device_defaults(cfg, trainer) -> str:
    """TF32 matmuls and cuDNN autotuning for the device the run trains on (pipeline/training/accel.py); returns the
    start-up summary's line for them and fused AdamW."""
    from pipeline.training import accel

    device = trainer.strategy.root_device.type
    matmul = accel.matmul_precision(device)
    if matmul is not None:
        torch.set_float32_matmul_precision(matmul)
    benchmark = accel.cudnn_benchmark(cfg.model.arch, device, cfg.trainer.deterministic)
    if benchmark is not None:
        torch.backends.cudnn.benchmark = benchmark
    fused = accel.fused_adamw({device}, str(trainer.precision), cfg.optim.grad_clip_norm,
                              cfg.optim.grad_skip_norm is not None)
    return accel.describe(device, fused, matmul, benchmark, accel.ddp_kwargs(cfg.trainer.strategy))


# What ended a run early, as the lines say it; the exit status is 128 + the signal number (callbacks.RunInterrupted)
STOPPED_BY = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1"}


def report_interrupt(stop, run_dir: Path, command: Optional[str], signum: int = signal.SIGINT) -> None:
    """Where a stop signal left the run and how to continue it (`stop`: None when it stopped at once)."""
    from pipeline.run.checkpointing import resume_candidates

    by = STOPPED_BY.get(signum, f"signal {int(signum)}")
    if stop is not None and signum == signal.SIGUSR1:
        print(f"# {by} at step {stop.step}: checkpoint saved to {stop.path}; stopped (outside SLURM nothing "
              "requeues the run)", flush=True)
    elif stop is not None and signum == signal.SIGTERM:
        print(f"# {by} at step {stop.step}: checkpoint saved to {stop.path}; stopped", flush=True)
    elif stop is not None:
        print(f"# interrupted at step {stop.step}: checkpoint saved to {stop.path}", flush=True)
    else:
        last = next(iter(resume_candidates(run_dir)), None)
        print(f"# stopped at once ({by}); " + (f"the newest checkpoint is {last}" if last
                                              else "no checkpoint yet: the run starts over"), flush=True)
    print(f"# continue with the same command: {command or 'the command that started it'}", flush=True)


def train(cfg, command: Optional[str] = None) -> dict:
    """Run (or resume) training for a loaded config; returns the final logged metrics (floats).
    A run directory that cannot be used (held by another training, a different config, unwritable or
    damaged checkpoints) stops with SystemExit and a one-line message. Ctrl-C raises
    SystemExit(INTERRUPTED_EXIT) after saying how to continue (`command`: the command line that started it)."""
    from lightning.pytorch.utilities import rank_zero_only

    from pipeline.run.checkpointing import CheckpointError, CheckpointWriteError
    from pipeline.run.rundir import RunDir, RunDirError, restrict_umask
    from pipeline.run.tracking import RunIdError
    from pipeline.training.console import quiet_known_noise

    quiet_known_noise()
    restrict_umask()  # run files at most 0644 whatever the umask: nobody else can replace a checkpoint
    run = RunDir(cfg.run.dir, rank_zero=rank_zero_only.rank == 0)
    try:
        run.create()
    except RunDirError as e:  # it, or a directory above it, is a file: status 2
        _bad_input(e)
    except OSError as e:
        raise SystemExit(f"error: cannot create run directory {run.path}: {e.strerror or e}") from None
    try:
        with run.locked():  # global rank zero only: the other ranks start after it holds the lock, or end with it
            return _train(cfg, run, command)
    except CheckpointWriteError as e:  # the disk (full, read-only, a quota), not the input: status 1
        raise SystemExit(f"error: {e}") from None
    except (RunDirError, CheckpointError, C.ConfigError, RunIdError) as e:
        _bad_input(e)


BAD_INPUT_EXIT = 2  # a config, run directory or checkpoint that cannot be used: as a config error


def _bad_input(e: BaseException | str) -> None:
    """One line on stderr, exit status 2 (bad input, as config errors; a failing disk stays status 1)."""
    print(f"error: {e}", file=sys.stderr, flush=True)
    raise SystemExit(BAD_INPUT_EXIT) from None


# The model keys that fix the shapes of the weights: a warm start (model.init_from) needs them equal.
WEIGHT_SHAPE_KEYS = ("arch", "latent_dim", "hidden_dims", "conv_channels", "likelihood", "learned_variance")


def warm_start(module, path: str) -> str:
    """model.init_from: load the model weights of checkpoint `path` into `module` (the optimizer, the step
    and the schedules start fresh). RunDirError naming the key when its architecture or input shape differs
    (not torch's size-mismatch traceback). Returns what the start-up summary says."""
    from pipeline.run.checkpointing import load_verified
    from pipeline.run.rundir import RunDirError

    checkpoint = load_verified(path)  # the checkpointing helper: checksum first, then the state
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not isinstance(state, dict):
        raise RunDirError(f"model.init_from={path}: not a training checkpoint (no hyper_parameters / state_dict)")
    theirs = hparams.get("model") or {}
    diffs = [(f"model.{k}", theirs.get(k), getattr(module.model_cfg, k)) for k in WEIGHT_SHAPE_KEYS
             if k in theirs and theirs.get(k) != getattr(module.model_cfg, k)]
    if "input_shape" in hparams and list(hparams["input_shape"]) != list(module.input_shape):
        diffs.append(("input shape (data)", list(hparams["input_shape"]), list(module.input_shape)))
    if diffs:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs)
        raise RunDirError(f"model.init_from={path}: its weights do not fit this model ({listed}): give the same "
                          "architecture, or start without model.init_from")
    weights = {k[len("vae."):]: v for k, v in state.items() if k.startswith("vae.")}
    try:
        module.vae.load_state_dict(weights)
    except RuntimeError as e:  # missing / unexpected keys or sizes that the keys above did not explain
        first = (str(e).strip().splitlines() or [""])[-1].strip()[:200]
        raise RunDirError(f"model.init_from={path}: its weights do not fit this model ({first})") from None
    return f"model weights from {path} (step {checkpoint.get('global_step', '?')}); new optimizer, step 0"


def expected_world_size(cfg) -> int:
    """Processes the run will have (devices x nodes, as the launch filled them in); 1 where Lightning decides
    later ("auto"): the checks that depend on it then also run again at set-up."""
    from pipeline.launch.cluster import device_count

    return (device_count(cfg.trainer.devices) or 1) * int(cfg.trainer.num_nodes)


def _train(cfg, run, command: Optional[str]) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from pipeline.data.datamodule import ShardDataModule
    from pipeline.launch.cli import data_errors
    from pipeline.run.checkpointing import AtomicCheckpointIO, CheckpointError
    from pipeline.training.callbacks import DeferredSignals, LossBoundExceeded, RunInterrupted
    from pipeline.training.console import summary_lines
    from pipeline.training.lightning_compat import launched_by_rank_zero, saved_loader_state
    from pipeline.training.module import VAEModule

    run_dir, rank_zero, ckpt_dir = run.path, run.rank_zero, run.checkpoints
    # The data first: a bad source, shape or size fails here, before any run file or W&B run exists.
    dm = ShardDataModule(cfg.data)
    dm.prepare_data()  # data.dataset into data.root on first use; Lightning's call later finds it done
    dm.preflight(expected_world_size(cfg))
    run.clean(cfg)
    resume = run.resume_from(cfg)
    if resume:  # the checkpoint's training order continues on this world size, or the run stops here
        dm.continue_order(saved_loader_state(resume[1]))
        dm.preflight(expected_world_size(cfg))
    run.save_config(cfg)
    resume_said = run.roll_back_to(resume)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # model init; per-batch noise: StepSeed
    module = VAEModule(C.to_object(cfg.model), C.to_object(cfg.objective), C.to_object(cfg.optim),
                       input_shape=tuple(dm.input_shape), max_steps=cfg.trainer.max_steps,
                       binarize=cfg.data.binarize)
    if cfg.model.init_from and not resume:  # a resumed run has its own weights already
        resume_said = warm_start(module, cfg.model.init_from)
    if cfg.trainer.compile:
        module.vae.compile()  # in place: checkpoint keys stay unprefixed

    loggers, wandb_mode = build_loggers(cfg, run)
    sync_requests = None
    if cfg.logger.wandb.sync_dir and wandb_mode == "offline" and rank_zero:
        from pipeline.run.sync import SyncRequests

        sync_requests = SyncRequests(Path(cfg.logger.wandb.sync_dir), run_dir, run.wandb_run_id())
    callbacks = build_callbacks(cfg, run_dir, sync_requests)
    trainer = build_trainer(cfg, run_dir, loggers, callbacks, AtomicCheckpointIO(preloaded=resume))
    signals = next(c for c in callbacks if isinstance(c, DeferredSignals))
    signals.arm()  # a Ctrl-C in Lightning's set-up stops at once with status 130, not Lightning's 1
    defaults = apply_device_defaults(cfg, trainer)
    dm.preflight(trainer.world_size)  # the batch for the world size Lightning found (devices=auto)
    if rank_zero:
        print("\n".join(summary_lines(cfg, dm, module, trainer, wandb_mode, resume_said, defaults)), flush=True)
    started = time.time()
    try:
        # every checkpoint is read by AtomicCheckpointIO: weights-only unpickling, then the checksum
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=resume[0] if resume else None, weights_only=True)
        except Exception as e:
            # A Ctrl-C raised inside library code that turned it into its own error (omegaconf, building
            # the logged hyperparameters: a ConfigKeyError) is still the Ctrl-C: exit 130, below.
            if signals.stopped_at_once:
                raise SystemExit(1) from e
            raise
    except (FloatingPointError, LossBoundExceeded) as e:
        raise SystemExit(f"error: {e}. The last good checkpoint is kept in {ckpt_dir}.") from None
    except CheckpointError:
        _end_started_ranks(trainer)  # rank zero's save failed; the others wait in its barrier
        raise
    except RuntimeError as e:  # another rank ended (its own message says why): one line here, not gloo's traceback
        if trainer.world_size == 1 or not _peer_lost(e):
            raise
        status = _started_ranks_status(trainer)
        print(f"# rank {trainer.global_rank}: stopped because another rank ended"
              f"{f' with exit status {status}' if status else ''} (its message is above)", file=sys.stderr, flush=True)
        raise SystemExit(status or 1) from None
    except OSError as e:  # a run file that cannot be written mid-run (read-only or full disk): the CSV logger
        if e.filename is None or not Path(os.path.abspath(e.filename)).is_relative_to(os.path.abspath(run_dir)):
            raise  # not a run file (a shard, say): the data layer's errors say what it is
        _end_started_ranks(trainer)
        raise SystemExit(f"error: cannot write {e.filename}: {e.strerror or e}. The last checkpoint is kept in "
                         f"{ckpt_dir}.") from None
    except RunInterrupted as e:  # Ctrl-C, SIGTERM, USR1 outside SLURM: checkpointed at a batch end
        if rank_zero:
            report_interrupt(e, run_dir, command, e.signum)
        # A rank Lightning started from rank zero exits 0 after this stop that every rank agreed on: a status
        # other than 0 makes rank zero's child-process observer SIGKILL it before it reports. Rank zero's
        # status (and every rank's under srun or torchrun) is the signal's.
        raise SystemExit(0 if launched_by_rank_zero(trainer) else e.exit_status) from None
    except data_errors():  # this rank's data: one line from main(); the ranks it started stop quietly
        _end_started_ranks(trainer)
        raise
    except SystemExit as e:  # Lightning exits 1 after a KeyboardInterrupt, 0 after its own SIGTERM handling
        term = isinstance(e, SIGTERMException)  # SIGTERM outside the training loop (set-up, teardown)
        if not (signals.stopped_at_once or term):
            raise
        if rank_zero:
            report_interrupt(None, run_dir, command, signal.SIGTERM if term else signal.SIGINT)
        raise SystemExit(TERMINATED_EXIT if term else INTERRUPTED_EXIT) from None
    finally:
        if sync_requests is not None:  # W&B has finished: the watcher syncs the whole segment
            sync_requests.request()
    if signals.requeue and rank_zero:  # after fit: every logger has finished (W&B's last rows are on disk)
        from pipeline.launch.cluster import requeue_slurm_job

        requeue_slurm_job()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
    if rank_zero:
        elbo = metrics.get("val/elbo")
        print(f"# done: step {trainer.global_step} in {time.time() - started:.1f}s; "
              f"val/elbo {elbo if elbo is None else round(elbo, 3)} nats; run dir {run_dir}; wandb {wandb_mode}",
              flush=True)
        if wandb_mode == "offline":
            print(f"# upload later with: wandb sync {run_dir / 'wandb'}/offline-run-*", flush=True)
    return metrics


_PEER_LOST = re.compile(r"Connection (closed|reset) by peer|Broken pipe|[Pp]eer .*(closed|lost)|NCCL .*(remote|abort)")


def _peer_lost(e: BaseException) -> bool:
    """A collective that failed because another rank's process is gone (gloo: `Connection closed by peer`),
    also where that failure is the context of a later error: a torchrun agent restarting its group ends this
    rank's loader workers too, and PyTorch's worker watchdog then raises `DataLoader worker ... killed`."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, RuntimeError) and _PEER_LOST.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def _started_ranks_status(trainer, wait_s: float = 3.0) -> int:
    """The first status other than 0 among the ranks this process started (0 if none yet): the rank whose
    error ended the run. Waits at most `wait_s`: inside the 5 s after which Lightning's observer kills us
    (1 s was too short on a loaded machine)."""
    from pipeline.training.lightning_compat import started_ranks

    deadline = time.monotonic() + wait_s
    procs = started_ranks(trainer)
    while True:
        codes = [p.poll() for p in procs]
        bad = [c for c in codes if c]
        if bad or all(c is not None for c in codes) or time.monotonic() > deadline:
            return next((c if c > 0 else 128 - c for c in bad), 0)
        time.sleep(0.05)


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
    from pipeline.launch.cli import data_errors, error_line

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
