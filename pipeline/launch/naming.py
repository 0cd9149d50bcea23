"""Run names: every way a run gets its name, and with it its directory when the config does not set one.

    derived_run_name(["configs/dsprites_beta.yaml"], ["objective.beta=8"])   # 'dsprites_beta-objective.beta=8'
    name_run(cfg, "train-4242")   # a run still at the default name: run.name and, unless given, run.dir

Names come from the launch (SLURM job, torchrun, W&B agent: launch.cluster.default_run_name), else from the
config files and overrides (derived_run_name); sweep points are named by their swept values (run_name).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Sequence

from pipeline import config as C

DEFAULT_RUN_NAME = C.RunConfig.name  # a run left at it gets a launch- or config-derived name
RUN_NAME_MAX = 80  # characters: a directory name that stays readable in `ls` and W&B


def name_part(text: str) -> str:
    """Text made safe for a directory name."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_")


def run_name(parts: Sequence[str]) -> str:
    """Parts (file stems, `key=value` items) made safe for a directory name and joined by `-`; longer
    than RUN_NAME_MAX characters: cut, plus a hash of the whole (distinct configs stay distinct)."""
    name = "-".join("=".join(map(name_part, p.split("=", 1))) for p in parts)
    if len(name) > RUN_NAME_MAX:
        name = f"{name[:RUN_NAME_MAX - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def derived_run_name(files: Sequence[str | os.PathLike] = (), overrides: Sequence[str] = ()) -> str:
    """The name of a run whose config does not name it: the config file stems joined by `+` (`default`
    without files), then `-key=value` for each override that changes what is trained (sorted by key;
    operational keys and overrides equal to the files' value left out), sanitised for a directory name.
    E.g. `dsprites_beta-objective.beta=8`."""
    stems = "+".join(name_part(Path(f).stem) for f in files) or DEFAULT_RUN_NAME
    last = dict(o.split("=", 1) for o in overrides)  # the last value of each key wins, as in the merge
    base, full = C.load_config(files, []), C.load_config(files, overrides)
    return run_name([stems, *(f"{k}={v}" for k, v in sorted(last.items())
                              if not C.is_operational(k) and C.select(base, k) != C.select(full, k))])


def name_run(cfg, name: str):
    """Give `cfg` the run name `name`; its run.dir follows (config.default_run_dir) unless the user set one.
    Modifies and returns cfg."""
    if cfg.run.dir == C.default_run_dir(cfg.run.name):  # load_config's default, not a user's dir
        cfg.run.dir = C.default_run_dir(name)
    cfg.run.name = name
    return cfg
