"""Command-line helpers shared by the entry points (train, evaluate, report, sweep).

Imports go one way: `train` / `evaluate` -> `cli` -> `launch` -> `config`; nothing here imports an
entry point, so none of them needs another's internals.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

from pipeline import config as C
from pipeline.launch.cluster import apply_cluster_env
from pipeline.launch.naming import DEFAULT_RUN_NAME, derived_run_name, name_run


def split_argv(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Positional arguments -> (CONFIG.yaml files, key=value overrides); anything else is a ConfigError."""
    files, overrides = [], []
    for a in argv:
        if a.endswith((".yaml", ".yml")) and "=" not in a:
            files.append(a)
        elif "=" in a:
            overrides.append(a)
        else:
            raise C.ConfigError(f"argument {a!r} is neither a .yaml config file nor a key=value override")
    return files, overrides


def data_errors() -> tuple[type[Exception], ...]:
    """Errors in the data (shards, manifest, sources, preparation) whose message names the file and the
    problem: entry points print them as one line, like config errors."""
    from pipeline.data.prepare import PrepareError
    from pipeline.data.shards import ShardFormatError
    from pipeline.data.sources import DataSetupError

    return ShardFormatError, DataSetupError, PrepareError


def error_line(e: BaseException) -> str:
    """An exception's own message. One raised in a DataLoader worker reaches the main process re-raised by
    PyTorch with the worker's whole traceback as its message; the original message is its last entry."""
    text = str(e)
    if "Original Traceback" in text:
        prefix = f"\n{type(e).__module__}.{type(e).__qualname__}: "
        at = text.rfind(prefix)
        if at >= 0:
            text = text[at + len(prefix):]
    return text.strip()


def config_from_argv(argv: Sequence[str], require_srun: bool = True):
    """CONFIG.yaml files and key=value overrides -> the validated config, with devices, nodes and run
    name taken from the launch (SLURM, W&B agent), else a run name derived from the config. Raises
    ValueError (ConfigError is one) on bad input."""
    from pipeline.run.tracking import wandb_secrets

    files, overrides = split_argv(argv)
    loaded = C.load_config(files, overrides)
    C.refuse_secret_values(loaded, wandb_secrets())
    cfg = apply_cluster_env(loaded, require_srun=require_srun)
    return name_from_config(cfg, files, overrides)


def name_from_config(cfg, files: Sequence[str], overrides: Sequence[str]):
    """A run still at the default name (not named by the user, a config file, SLURM or a W&B agent) gets
    one derived from its config (naming.derived_run_name), so a different config lands in its own
    directory; the bare default keeps `runs/default`. Modifies and returns cfg."""
    if cfg.run.name != DEFAULT_RUN_NAME or any(o.split("=", 1)[0].strip() == "run.name" for o in overrides):
        return cfg
    return name_run(cfg, derived_run_name(files, overrides))
