"""Where a training step's time goes: `python -m pipeline.bench profile`.

    python -m pipeline.bench profile                              # digits and fashion, 600 steps each
    python -m pipeline.bench profile --presets fashion --steps 300 --out profile.json

Runs the bench preset's pipeline (pipeline.analysis.bench: the same Trainer, callbacks, logger and loader)
with a Lightning profiler that keeps each profiled action's exclusive time (its own, minus the actions run
inside it), plus three actions Lightning does not profile: AdamW's step (optimizer step hooks: its update, the
closure's forward and backward being actions of their own), `self.log` and the loggers' writes. The actions
are summed into the rows of the README's table (CATEGORIES) over the steps after `--warmup`; "Lightning's loop"
is the rest of the step's time: the loop's own code between actions (and Lightning's optimizer_step wrappers).
Each profiled action costs ~2 us, so the profiled step is a little longer than an unprofiled one; the JSON has
both (an unprofiled run first). --clock cpu times by this process's CPU seconds (a shared machine; with
OMP_NUM_THREADS=1).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

LOOP = "Lightning's loop (optimizer_step wrappers, closure, hook dispatch, progress tracking, results)"
# (row, substrings of Lightning's action names, first match wins); the rest is Lightning's loop too
CATEGORIES = (
    (LOOP, ("VAEModule.optimizer_step", "run_training")),  # LightningOptimizer, strategy, precision, scheduler wraps
    ("data: batch from the loader, device transfer", ("train_dataloader_next", "batch_to_device",
                                                       "batch_transfer")),
    ("AdamW update + zero_grad", ("[optimizer]", "optimizer_zero_grad")),
    ("forward + loss (training_step)", ("training_step",)),
    ("backward", ("backward",)),
    ("logging: self.log and the loggers' writes", ("[log]",)),
    ("callbacks (ours grouped, progress, checkpoints, LR monitor)", ("[Callback]",)),
    ("module hooks (grad norm / clip, LR scheduler step)", ("[LightningModule]",)),
)


def category(action: str) -> str:
    for name, keys in CATEGORIES:
        if any(k in action for k in keys):
            return name
    return LOOP


def step_profiler():
    """A Lightning Profiler summing each action's exclusive time while `window` is open."""
    from lightning.pytorch.profilers import Profiler

    from pipeline.analysis.bench import clock

    class ExclusiveProfiler(Profiler):
        def __init__(self):
            super().__init__()
            self.stack: list[list] = []  # [action, start, time in actions inside it]
            self.total: dict[str, float] = defaultdict(float)
            self.calls: dict[str, int] = defaultdict(int)
            self.window = False

        def start(self, action_name: str) -> None:
            self.stack.append([action_name, clock(), 0.0])

        def stop(self, action_name: str) -> None:
            now = clock()
            while self.stack:  # an action left open by an exception closes with the one that outlived it
                name, t0, inner = self.stack.pop()
                if self.stack:
                    self.stack[-1][2] += now - t0
                if self.window:
                    self.total[name] += now - t0 - inner
                    self.calls[name] += 1
                if name == action_name:
                    return

        def summary(self) -> str:
            return ""

    return ExclusiveProfiler()


def _timed(profiler, name: str, fn):
    def call(*args, **kwargs):
        profiler.start(name)
        try:
            return fn(*args, **kwargs)
        finally:
            profiler.stop(name)
    return call


def profile_pipeline(cfg, warmup: int, steps: int) -> dict[str, Any]:
    """ms per step per CATEGORIES row (and per action) of `steps` pipeline steps after `warmup`."""
    import lightning.pytorch as pl

    from pipeline.analysis.bench import build_pipeline, clock

    prof = step_profiler()
    window: dict[str, float] = {}

    class Window(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            for opt in trainer.optimizers:  # AdamW's own step; the closure inside it is profiled apart
                opt.register_step_pre_hook(lambda *_: prof.start("[optimizer]step"))
                opt.register_step_post_hook(lambda *_: prof.stop("[optimizer]step"))
            pl_module.log = _timed(prof, "[log]self.log", pl_module.log)
            for logger in trainer.loggers:
                logger.log_metrics = _timed(prof, f"[log]{type(logger).__name__}.log_metrics", logger.log_metrics)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == warmup:
                prof.window, window["start"] = True, clock()
            elif trainer.global_step >= trainer.max_steps:
                prof.window, window["end"] = False, clock()

    trainer, module, dm = build_pipeline(cfg, [Window()])
    trainer.profiler = prof
    trainer.fit(module, datamodule=dm)
    wall = window["end"] - window["start"]
    rows: dict[str, float] = defaultdict(float)
    for action, t in prof.total.items():
        if category(action) != LOOP:
            rows[category(action)] += t
    rows[LOOP] = wall - sum(rows.values())
    per_step = {k: 1e3 * v / steps for k, v in rows.items()}
    return {"steps": steps, "ms_per_step": 1e3 * wall / steps, "rows_ms_per_step": per_step,
            "actions_ms_per_step": {a: round(1e3 * t / steps, 4) for a, t in sorted(prof.total.items(),
                                                                                    key=lambda kv: -kv[1])},
            "action_calls_per_step": {a: prof.calls[a] / steps for a in prof.total}}


def format_table(preset: str, r: dict[str, Any]) -> str:
    lines = [f"{preset}: {r['ms_per_step']:.2f} ms per profiled step ({r['unprofiled_ms_per_step']:.2f} unprofiled), "
             f"{r['steps']} steps, {r['clock']} clock, load average {r['load_average_before']:.1f}", "",
             "| | ms per step |", "| --- | --- |"]
    for name in sorted(dict(CATEGORIES), key=lambda n: -r["rows_ms_per_step"].get(n, 0.0)):
        lines.append(f"| {name} | {r['rows_ms_per_step'].get(name, 0.0):.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    import os

    from pipeline.analysis import bench

    p = argparse.ArgumentParser(prog="python -m pipeline.bench profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["digits", "fashion"], choices=list(bench.PRESETS))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--data-dir", default="data/bench")
    p.add_argument("--out", type=Path, default=None, help="JSON of every row and action")
    p.add_argument("--clock", default="wall", choices=list(bench.CLOCKS), help="wall time, or this process's CPU "
                   "time (a shared machine; with OMP_NUM_THREADS=1)")
    args = p.parse_args(argv)
    bench._CLOCK["now"] = bench.CLOCKS[args.clock]
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vae-profile-") as work:
        for preset in args.presets:
            root = bench.prepare_data(preset, Path(args.data_dir))
            load = os.getloadavg()[0]
            cfg = bench.bench_config(preset, root, Path(work) / f"{preset}-plain", "cpu", args.steps, args.warmup)
            plain = bench.measure_pipeline(cfg, args.warmup, "cpu")
            cfg = bench.bench_config(preset, root, Path(work) / preset, "cpu", args.steps, args.warmup)
            r = profile_pipeline(cfg, args.warmup, args.steps)
            r["unprofiled_ms_per_step"] = 1e3 * plain["seconds"] / args.steps
            r["load_average_before"], r["clock"] = load, args.clock
            result[preset] = r
            print(format_table(preset, r), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
