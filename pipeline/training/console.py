"""What a training run prints: a short start-up summary, one progress bar (or progress lines), and no
library notices that every run would print.

    quiet_known_noise()                      # once per process, before the Trainer is built
    RunProgress(every=progress_every(cfg.trainer.max_steps, cfg.trainer.log_every_n_steps))
    print("\n".join(summary_lines(...)))     # rank zero; the full config stays in RUN_DIR/config.yaml
"""
from __future__ import annotations

import logging
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, List, Optional

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from tqdm import tqdm

from pipeline import config as C

# Warnings every run printed although nothing is wrong, each matched on its message and category.
KNOWN_WARNINGS = (
    # Outside an allocation the hint is wrong; inside one launch.py already refuses a multi-task job step
    # that srun did not start (the mistake the hint is about), with a message saying so.
    (r"The `srun` command is available on your system but is not used", PossibleUserWarning),
    # Lightning's note assumes logging per epoch; we log every N global steps across epochs (and an epoch
    # is one short pass over the shards), so the logs it says are missing are written.
    (r"The number of training batches \(\d+\) is smaller than the logging interval", PossibleUserWarning),
    # Deliberate: VAEModule.transfer_batch_to_device moves only the tensors of the batch dict (bench).
    (r"You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a "
     r"`LightningDataModule`", UserWarning),
    # A dependency deprecation between the installed torch and Lightning's own pytree copy; nothing to do here.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # Every resumed run: the directory holds the checkpoints it resumes from, on purpose.
    (r"Checkpoint directory .* exists and is not empty", UserWarning),
    # Every DDP run, once per validation key: the values logged are already the same on every rank (exact
    # all-reduced sums, vae.metrics.ExactSums), so Lightning's extra sync would only cost a collective per key.
    (r"It is recommended to use `self.log\('(val|test)/.*sync_dist=True", UserWarning),
)

# Lightning's info lines that every run printed; the start-up summary and the done line say the same.
KNOWN_INFO = (
    r"(GPU|TPU|HPU) available: ",  # the summary's `devices` line says what is used (a GPU left unused still warns)
    r"💡 Tip: ",  # advertisements for Lightning's hosted services
    r"`Trainer.fit` stopped: `max_steps=\d+` reached",  # the `# done: step N` line
    r"Restor(ing|ed all) states from the checkpoint",  # the summary's `start` line names the checkpoint
)
LIGHTNING_INFO_LOGGER = "lightning.pytorch.utilities.rank_zero"  # where rank_zero_info writes
# Lightning's start-up lines that every rank prints (4 copies of each on 2 nodes x 2): rank zero's alone, one per job.
PER_RANK_INFO = {
    "lightning.fabric.utilities.distributed": r"Initializing distributed: ",
    "lightning.pytorch.trainer.connectors.signal_connector": r"SLURM auto-requeueing enabled",
}


class _DropKnownInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(re.match(pattern, record.getMessage().lstrip()) for pattern in KNOWN_INFO)


class _RankZeroCopy(logging.Filter):
    """Drops `pattern` lines on every rank but global rank zero (read when the line is logged: Lightning sets
    it before it initializes the process group)."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        return getattr(rank_zero_only, "rank", 0) == 0 or not re.match(self.pattern, record.getMessage())


def quiet_known_noise() -> None:
    """Filter exactly the known-harmless notices above; every other warning still shows."""
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    logger = logging.getLogger(LIGHTNING_INFO_LOGGER)
    if not any(isinstance(f, _DropKnownInfo) for f in logger.filters):
        logger.addFilter(_DropKnownInfo())
    for name, pattern in PER_RANK_INFO.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RankZeroCopy) for f in logger.filters):
            logger.addFilter(_RankZeroCopy(pattern))


def progress_every(max_steps: int, log_every_n_steps: int) -> int:
    """Steps between progress lines: about 20 per run, on steps whose train metrics were just logged."""
    return log_every_n_steps * max(1, round(max_steps / 20 / log_every_n_steps))


def _fmt(value: Any) -> str:
    return f"{float(value):.4g}"


class RunProgress(TQDMProgressBar):
    """One progress bar for the whole run on a terminal: step / max_steps, elapsed < ETA, it/s, and the
    latest train loss, ELBO and KL; a line per validation above it. Elsewhere (SLURM logs, pipes) a
    line every `every` steps and per validation instead of a redrawn bar.

    Lightning's own bar restarts every epoch and shows no loss; an epoch here is a short pass over the
    shards (11 steps on digits), so the run's unit is the step.
    """

    TRAIN_KEYS = (("loss", "train/loss"), ("elbo", "train/elbo"), ("kl", "train/kl"))
    VAL_KEYS = (("elbo", "val/elbo"), ("recon", "val/recon"), ("kl", "val/kl"))

    def __init__(self, every: int, tty: Optional[bool] = None):
        super().__init__()
        self.every = every
        self.tty = sys.stdout.isatty() if tty is None else tty
        self._start_step, self._started = 0, 0.0

    def _values(self, trainer, keys) -> str:
        metrics = trainer.callback_metrics
        return "  ".join(f"{name} {_fmt(metrics[key])}" for name, key in keys if key in metrics)

    def on_train_start(self, trainer, pl_module) -> None:
        self._start_step, self._started = trainer.global_step, time.monotonic()
        self.train_progress_bar = Tqdm(
            desc="train", total=trainer.max_steps, initial=trainer.global_step,
            disable=self.is_disabled or not self.tty, leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0,
            bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        pass  # one bar for the run: nothing restarts with an epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.is_disabled:
            return
        fresh = step % trainer.log_every_n_steps == 0 or step >= trainer.max_steps  # train metrics just logged
        if self.tty:
            bar = self.train_progress_bar
            if fresh:
                metrics = trainer.callback_metrics
                bar.set_postfix({n: _fmt(metrics[k]) for n, k in self.TRAIN_KEYS if k in metrics}, refresh=False)
            if step > bar.n:
                bar.update(step - bar.n)  # draws at most every 0.1 s
        elif step % self.every == 0 or step >= trainer.max_steps:
            print(self._line(trainer), flush=True)

    def _line(self, trainer) -> str:
        step, total = trainer.global_step, trainer.max_steps
        elapsed = time.monotonic() - self._started
        rate = (step - self._start_step) / elapsed if elapsed > 0 else 0.0
        eta = tqdm.format_interval((total - step) / rate) if rate > 0 else "?"
        return (f"step {step}/{total} ({100 * step // total}%)  {rate:.1f} it/s  ETA {eta}  "
                f"{self._values(trainer, self.TRAIN_KEYS)}").rstrip()

    # validation: no second bar; one line with its result
    def on_validation_start(self, trainer, pl_module) -> None:
        pass

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        pass

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        pass

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.is_disabled or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        line = f"val at step {trainer.global_step}: {self._values(trainer, self.VAL_KEYS)}"
        if self.tty:
            self.train_progress_bar.write(line)
        else:
            print(line, flush=True)


def _size(n: Optional[int]) -> str:
    return "?" if n is None else f"{n:,}"


def data_name(root: str) -> str:
    """What data.root holds, for the summary: the dataset its manifest names (digits, dsprites, mnist, images,
    ...), "indexed shards" for a `prepare index` manifest, else "shards"."""
    import json

    from pipeline.data.shards import INDEX_FORMAT, MANIFEST

    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return "shards"
    name = manifest.get("dataset") if isinstance(manifest, dict) else None
    if isinstance(name, str) and name:
        return name[:40]
    return "indexed shards" if isinstance(manifest, dict) and manifest.get("format") == INDEX_FORMAT else "shards"


def optim_line(o) -> str:
    """The summary's optimizer line, and which weights the numbers of the run come from (optim.ema_decay)."""
    clip = f"clip at norm {o.grad_clip_norm:g}" if o.grad_clip_norm is not None else "no clipping"
    skip = f"skip steps with norm > {o.grad_skip_norm:g}" if o.grad_skip_norm is not None else "no skipping"
    if o.ema_decay is None:
        weights = "validation, grids and evaluate use the trained weights"
    else:
        weights = (f"validation, grids, checkpoints' state_dict and evaluate use the EMA of the weights (decay "
                   f"{o.ema_decay:g}); training and resume continue the trained ones (current_model_state)")
    return f"# optim     AdamW lr {o.lr:g} ({o.lr_schedule}), {clip}, {skip}; {weights}"


def devices_why(devices, trainer) -> str:
    """Why the run has the devices it has (pipeline.launch.cluster.choose_devices). The node's count comes from
    the chosen accelerator's class: a CPU run never asks CUDA (that would open a context)."""
    from pipeline.launch.cluster import choose_devices

    return choose_devices(devices, int(trainer.accelerator.auto_device_count()))[1]


def summary_lines(cfg, dm, module, trainer, wandb_mode: str, resume: Optional[str],
                  defaults: Optional[str] = None) -> List[str]:
    """The start-up summary: where the run writes, what it trains on and with, and what differs from
    the defaults (the full config is RUN_DIR/config.yaml)."""
    counts = {s: (dm.source(s).total if dm.source(s) is not None else 0) for s in ("train", "val", "test")}
    shape = "x".join(map(str, dm.input_shape))
    params = sum(p.numel() for p in module.parameters())
    m, t = cfg.model, cfg.trainer
    accelerator = type(trainer.accelerator).__name__.replace("Accelerator", "").lower()
    strategy = type(trainer.strategy).__name__.replace("Strategy", "")
    nodes = f" x {trainer.num_nodes} nodes" if trainer.num_nodes > 1 else ""
    changed = C.changed_keys(cfg)
    group = f", group {cfg.logger.wandb.group}" if cfg.logger.wandb.group else ""
    data = cfg.data.train or f"{data_name(cfg.data.root)} ({cfg.data.root})"
    workers = f"{cfg.data.num_workers} loader workers" if cfg.data.num_workers else "the training process"
    if dm.cache_device() is None:
        loader = f"every split streamed by {workers} (data.cache={cfg.data.cache})"
    else:
        place = f"{accelerator} memory" if cfg.data.cache == "device" else "host RAM"
        mib = dm.train_image_bytes() / 2**20
        loader = (f"train split held in {place} (data.cache={cfg.data.cache}, {mib:,.1f} MiB per process, no workers); "
                  f"val/test streamed by {workers}")
    devices = (f"{accelerator} x {trainer.num_devices}{nodes} ({devices_why(t.devices, trainer)}; {strategy}, "
               f"precision {trainer.precision})")
    if defaults:
        devices += f"; {defaults}"
    lines = [
        f"# run       {cfg.run.dir}  (full config: {cfg.run.dir}/config.yaml)",
        f"# data      {data}: {_size(counts['train'])} train / {_size(counts['val'])} val / {_size(counts['test'])} "
        f"test images of {shape}, {dm.batch_text()}",
        "# counts    " + "; ".join(f"{s}: {dm.source(s).mode}" for s in counts if dm.source(s) is not None),
        f"# loader    {loader}",
        f"# model     {m.arch} VAE, latent {m.latent_dim}, {m.likelihood} likelihood, {params:,} parameters; "
        f"beta {cfg.objective.beta:g} ({cfg.objective.kl_schedule} KL schedule)",
        optim_line(cfg.optim),
        f"# devices   {devices}",
        f"# steps     {t.max_steps}; validate every {t.val_check_interval} and at the end; "
        f"checkpoint every {cfg.checkpoint.every_n_steps}",
        f"# wandb     {wandb_mode} (project {cfg.logger.wandb.project}{group})",
        f"# start     {resume or 'fresh (no checkpoint in the run dir)'}",
        "# changed   " + ("  ".join(f"{k}={v}" for k, v in changed.items()) if changed else "nothing (all defaults)"),
    ]
    if str(t.devices) in ("auto", "-1") and trainer.num_devices > 1:  # not SLURM's: launch.py fills those in
        lines.insert(7, f"# NOTE      trainer.devices={t.devices} took all {trainer.num_devices} {accelerator} devices "
                        f"on this node: global batch {cfg.data.batch_size * trainer.num_devices * trainer.num_nodes}; "
                        "trainer.devices=1 trains on one")
    return lines
