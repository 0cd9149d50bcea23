"""Expand a W&B grid sweep file offline: its points, and the argv a W&B agent would run for each; or run
the whole grid on this machine.

One sweep file, three ways to run it:

    wandb sweep configs/sweep.yaml                          # online: prints ENTITY/PROJECT/SWEEP_ID
    sbatch --array=0-5 slurm/sweep.sh ENTITY/PROJECT/SWEEP_ID
    sbatch --array=0-5 slurm/grid.sh                        # offline twin: task i trains point i
    python -m pipeline.sweep run configs/sweep.yaml trainer.max_steps=500   # here, one point after another

    python -m pipeline.sweep configs/sweep.yaml --count      # number of grid points (6)
    python -m pipeline.sweep configs/sweep.yaml --index 2    # the train args of point 2, one a line
    python -m pipeline.sweep configs/sweep.yaml --command 2  # the agent's full command for point 2
    python -m pipeline.sweep configs/sweep.yaml --name       # the sweep's name (W&B group offline)

Points are the cartesian product of every parameter's `values` list, parameters in file order, the
last one varying fastest; a `value:` parameter is a constant of every point. The agent expands
`${args_no_hyphens}` to `key=value` per parameter (Python's str of the value), `${env}` to
/usr/bin/env and `${interpreter}` to `python` (whichever is first on PATH).

`run` trains every point in its own run directory, `runs/<sweep name>/<swept key=value ...>`, grouped in
W&B under the sweep name (like slurm/grid.sh); extra `key=value` arguments apply to every point, after
its own. Re-running the same command skips finished points (last.ckpt at trainer.max_steps) and resumes
an interrupted one; Ctrl-C stops the point in progress at a checkpoint and the sweep with status 130.
It ends with the comparison table of pipeline.report (figures in <sweep dir>/report).
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


def sweep_name(sweep: Dict[str, Any], path: str | Path) -> str:
    return str(sweep.get("name") or Path(path).stem)


def point_name(sweep: Dict[str, Any], params: Dict[str, Any], index: int) -> str:
    """A point's run directory name: its swept `key=value` items (constants left out)."""
    from pipeline.launch.naming import run_name

    swept = [f"{k}={v}" for k, v in params.items() if "values" in sweep["parameters"][k]]
    return run_name(swept) if swept else f"point{index}"


def point_args(sweep: Dict[str, Any], params: Dict[str, Any], name: str, run_dir: Path, group: str,
               overrides: Sequence[str] = ()) -> List[str]:
    """The pipeline.train args of one point of a local sweep: the agent's args, the point's run name and
    directory, the W&B group, then `overrides` (they apply to every point, as in grid.sh)."""
    return [*train_args(sweep, params), f"run.name={name}", f"run.dir={run_dir}", f"logger.wandb.group={group}",
            *overrides]


def _finished(args: Sequence[str]) -> Optional[int]:
    """The step of a point's last.ckpt when it has reached trainer.max_steps, else None. A last.ckpt that
    does not load or verify makes the point unfinished (with a warning): its training then falls back to
    the best checkpoint as `pipeline.train` alone does, instead of the whole sweep stopping here."""
    from pipeline.config import load_config
    from pipeline.launch.cli import split_argv
    from pipeline.run.checkpointing import CheckpointError, checkpoint_step

    cfg = load_config(*split_argv(args))
    last = Path(cfg.run.dir) / "checkpoints" / "last.ckpt"
    try:
        step = checkpoint_step(last) if last.is_file() else -1
    except CheckpointError as e:
        print(f"# warning: {e}; the point trains again from its best checkpoint, if any", flush=True)
        return None
    return step if step >= cfg.trainer.max_steps else None


def _child_handles_ctrl_c(signum, frame) -> None:
    """While a point trains, Ctrl-C is the training process's: it checkpoints and exits 130, and the
    sweep stops after it. (A Python handler, not SIG_IGN: the child gets the default back at exec.)"""


def run_sweep(path: str | Path, overrides: Sequence[str] = (), out: Optional[Path] = None,
              command: Optional[str] = None) -> int:
    """Train every grid point of the sweep file here, one after another; returns the exit status."""
    import signal
    import subprocess

    from pipeline.config import ConfigError

    sweep = load_sweep(path)
    name = sweep_name(sweep, path)
    out = Path(out) if out is not None else Path("runs") / name
    points = grid_points(sweep)
    runs = []
    for i, params in enumerate(points):
        pname = point_name(sweep, params, i)
        args = point_args(sweep, params, pname, out / pname, name, overrides)
        try:
            done = _finished(args)  # also checks every point's config before anything trains
        except (ConfigError, ValueError) as e:
            raise SweepError(f"point {i} ({pname}): {e}") from None
        runs.append((pname, args, done))
    for i, (pname, args, done) in enumerate(runs):
        where = f"# sweep {name}: point {i + 1}/{len(runs)} {pname}"
        if done is not None:
            print(f"{where}: finished (step {done}), skipped", flush=True)
            continue
        print(f"{where} -> {out / pname}", flush=True)
        previous = signal.signal(signal.SIGINT, _child_handles_ctrl_c)
        try:
            code = subprocess.call([sys.executable, "-m", "pipeline.train", *args])
        finally:
            signal.signal(signal.SIGINT, previous)
        if code != 0:
            print(f"# sweep {name} stopped at point {i + 1}/{len(runs)} ({pname}, exit status {code}); "
                  f"continue with the same command: {command or 'the command that started it'}", flush=True)
            return code
    print(f"# sweep {name}: {len(runs)} points done in {out}", flush=True)
    from pipeline.analysis.report import report  # matplotlib and the analysis code only when the sweep ends

    result = report([out / pname for pname, _, _ in runs], out=out / "report", traversals=False, wandb_log=False)
    print(result["table"], end="")
    print(f"# report: {result['files']['markdown']}", flush=True)
    return 0


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option's help (where there is one), the description and examples as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def run_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.sweep run", formatter_class=_Help,
        description="Train every grid point of a sweep file on this machine, one after another; resumable.",
        epilog="examples:\n  python -m pipeline.sweep run configs/sweep.yaml\n"
               "  python -m pipeline.sweep run configs/sweep.yaml trainer.max_steps=500 logger.wandb.mode=offline\n"
               "  python -m pipeline.sweep run configs/sweep.yaml --out /scratch/beta-sweep")
    p.add_argument("sweep_file", help="a W&B grid sweep file (configs/sweep.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="pipeline.train overrides for every point")
    p.add_argument("--out", type=Path, default=None, help="the sweep directory; default: runs/<sweep name>")
    a = p.parse_intermixed_args(argv)
    try:
        return run_sweep(a.sweep_file, a.overrides, a.out,
                         command=shlex.join(["python", "-m", "pipeline.sweep", "run", *argv]))
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        return run_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=_Help, epilog="examples:\n" + "\n".join(
                                    ln for ln in __doc__.splitlines() if ln.startswith("    python -m pipeline.sweep")))
    p.add_argument("sweep_file", help="a W&B grid sweep file (configs/sweep.yaml)")
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
            print(sweep_name(sweep, a.sweep_file))
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
