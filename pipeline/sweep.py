"""Expand a W&B grid sweep file offline: its points, and the argv a W&B agent would run for each.

One sweep file, two ways to run it:

    wandb sweep configs/sweep.yaml                          # online: prints ENTITY/PROJECT/SWEEP_ID
    sbatch --array=0-5 slurm/sweep.sh ENTITY/PROJECT/SWEEP_ID
    sbatch --array=0-5 slurm/grid.sh                        # offline twin: task i trains point i

    python -m pipeline.sweep configs/sweep.yaml --count      # number of grid points (6)
    python -m pipeline.sweep configs/sweep.yaml --index 2    # the train args of point 2, one a line
    python -m pipeline.sweep configs/sweep.yaml --command 2  # the agent's full command for point 2
    python -m pipeline.sweep configs/sweep.yaml --name       # the sweep's name (W&B group offline)

Points are the cartesian product of every parameter's `values` list, parameters in file order, the
last one varying fastest; a `value:` parameter is a constant of every point. The agent expands
`${args_no_hyphens}` to `key=value` per parameter (Python's str of the value), `${env}` to
/usr/bin/env and `${interpreter}` to `python` (whichever is first on PATH).
"""
from __future__ import annotations

import argparse
import itertools
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

AGENT_MACROS = {"${env}": ["/usr/bin/env"], "${interpreter}": ["python"]}
TRAIN_MODULE = ["-m", "pipeline.train"]


class SweepError(ValueError):
    """A sweep file this module cannot expand; the message says what to change."""


def load_sweep(path: str | Path) -> Dict[str, Any]:
    path = Path(path)
    try:
        sweep = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SweepError(f"cannot read sweep file {path}: {e}") from None
    if not isinstance(sweep, dict) or not isinstance(sweep.get("parameters"), dict) or not sweep["parameters"]:
        raise SweepError(f"{path}: a sweep file needs a non-empty `parameters:` mapping")
    if sweep.get("method") != "grid":
        raise SweepError(f"{path}: method is {sweep.get('method')!r}; only `grid` sweeps can be expanded offline")
    for key, spec in sweep["parameters"].items():
        if not isinstance(spec, dict) or not (("values" in spec and isinstance(spec["values"], list)
                                               and spec["values"]) or "value" in spec):
            raise SweepError(f"{path}: parameter {key!r} needs a non-empty `values:` list or a `value:`")
    return sweep


def grid_points(sweep: Dict[str, Any]) -> List[Dict[str, Any]]:
    """All points of the grid, as {parameter: value} in file order; deterministic."""
    params = sweep["parameters"]
    keys = list(params)
    choices = [params[k]["values"] if "values" in params[k] else [params[k]["value"]] for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]


def point(sweep: Dict[str, Any], index: int) -> Dict[str, Any]:
    points = grid_points(sweep)
    if not 0 <= index < len(points):
        raise SweepError(f"grid point {index} out of range: the grid has {len(points)} points (0..{len(points) - 1})")
    return points[index]


def args_no_hyphens(params: Dict[str, Any]) -> List[str]:
    """What the agent substitutes for `${args_no_hyphens}`: f"{key}={value}" per parameter."""
    return [f"{k}={v}" for k, v in params.items()]


def agent_command(sweep: Dict[str, Any], params: Dict[str, Any]) -> List[str]:
    """The argv a W&B agent runs for a point: the sweep's `command` with its macros expanded."""
    command = sweep.get("command")
    if not command:
        raise SweepError("the sweep file has no `command:`; it must run `-m pipeline.train ${args_no_hyphens}`")
    argv: List[str] = []
    for item in map(str, command):
        if item == "${args_no_hyphens}":
            argv += args_no_hyphens(params)
        elif item in AGENT_MACROS:
            argv += AGENT_MACROS[item]
        elif item.startswith("${") and item.endswith("}"):
            raise SweepError(f"sweep command macro {item} is not supported here; use ${{args_no_hyphens}}")
        else:
            argv.append(item)
    return argv


def train_args(sweep: Dict[str, Any], params: Dict[str, Any]) -> List[str]:
    """The arguments the agent's command passes to `python -m pipeline.train` (fixed ones included)."""
    argv = agent_command(sweep, params)
    for i in range(len(argv) - 1):
        if argv[i:i + 2] == TRAIN_MODULE:
            return argv[i + 2:]
    raise SweepError(f"the sweep command {argv} does not run `-m pipeline.train`")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_file")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--index", type=int, help="print the pipeline.train args of grid point INDEX, one per line")
    g.add_argument("--command", type=int, metavar="INDEX", help="print the agent's full command, shell-quoted")
    g.add_argument("--count", action="store_true", help="print the number of grid points")
    g.add_argument("--name", action="store_true", help="print the sweep's name")
    a = p.parse_args(argv)
    try:
        sweep = load_sweep(a.sweep_file)
        if a.count:
            print(len(grid_points(sweep)))
        elif a.name:
            print(sweep.get("name") or Path(a.sweep_file).stem)
        elif a.command is not None:
            print(shlex.join(agent_command(sweep, point(sweep, a.command))))
        else:
            print("\n".join(train_args(sweep, point(sweep, a.index))))
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
