"""Read a run's offline W&B records back with W&B's own reader (`wandb leet inspect --json`, wandb >= 0.31)
and check them against metrics.csv: what `wandb sync` would upload, segment by segment."""
from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path


def wandb_cli() -> str:
    """The `wandb` command of this interpreter's environment (PATH may hold another one, or none)."""
    beside = Path(sys.executable).parent / "wandb"
    return str(beside) if beside.is_file() else (shutil.which("wandb") or "wandb")


def segment_records(segment: Path) -> list[dict]:
    """Every record of one offline run directory, in file order."""
    out = subprocess.run([wandb_cli(), "leet", "inspect", "--json", str(segment)], capture_output=True, text=True,
                         timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(segment), "WANDB_SILENT": "true"})
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def segments(run_dir: Path) -> list[dict]:
    """The offline segments of RUN_DIR in start order: {dir, run_id, start, history: [row items], artifacts, exit_code}."""
    found = []
    for seg in (Path(run_dir) / "wandb").glob("offline-run-*"):
        records = segment_records(seg)
        run = next(r["run"] for r in records if r["type"] == "run")
        found.append({"dir": seg, "run_id": run["run_id"], "start": run.get("start_time", ""),
                      "history": [r["history"]["item"] for r in records if r["type"] == "history"],
                      "artifacts": [r["artifact"] for r in records if r["type"] == "artifact"],
                      "exit_code": next((r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit"), None)})
    return sorted(found, key=lambda s: (s["start"], s["dir"].name))


def step_ranges(segs: list[dict]) -> list[tuple]:
    """(min _step, max _step, rows) per segment: what the issue asks the closing note to quote."""
    return [(min(s), max(s), len(s)) if s else (None, None, 0)
            for s in ([int(h["_step"]) for h in seg["history"]] for seg in segs)]


def metrics_rows(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def check_history(run_dir: Path, n_segments: int) -> list[dict]:
    """One W&B run whose history continues across its segments and holds metrics.csv:

    - `n_segments` offline segments, all of the id in RUN_DIR/wandb_run_id.txt;
    - `_step` strictly increasing over the segments taken in start order (what `wandb sync` replays);
    - every value of every metrics.csv row (train/*, val/*, the LR) in the W&B row of the same step;
    - the image grids of every validation that wrote them, on its row;
    - every segment finished cleanly (an exit record with code 0: its last rows written).
    Returns the segments (for the ranges)."""
    segs = segments(run_dir)
    ranges = step_ranges(segs)
    print(f"W&B history of {run_dir}: (min _step, max _step, rows) per segment: {ranges}")
    assert len(segs) == n_segments, ranges
    run_id = (Path(run_dir) / "wandb_run_id.txt").read_text().split()[0]
    assert {s["run_id"] for s in segs} == {run_id}, [s["run_id"] for s in segs]
    assert [s["exit_code"] for s in segs] == [0] * n_segments, [s["exit_code"] for s in segs]
    steps = [int(h["_step"]) for s in segs for h in s["history"]]
    assert all(a < b for a, b in zip(steps, steps[1:])), f"_step not strictly increasing: {ranges}"
    by_step = {int(h["_step"]): h for s in segs for h in s["history"]}
    rows = metrics_rows(run_dir)
    val_steps = set()
    for row in rows:
        step = int(float(row["step"]))
        for key, value in row.items():
            if key in ("step", "epoch") or value in ("", None):
                continue
            got = by_step.get(step, {}).get(key)
            assert got is not None, f"{key} of step {step} missing from W&B (segments {ranges})"
            assert math.isclose(float(got), float(value), rel_tol=1e-6, abs_tol=1e-9), (key, step, got, value)
            if key == "val/elbo":
                val_steps.add(step)
    assert val_steps, "no validation row in metrics.csv"
    # each grid written to RUN_DIR/images/ (named by global step s) is on the W&B row of its validation (s - 1)
    grids = sorted(int(p.stem.rsplit("step", 1)[1]) for p in (Path(run_dir) / "images").glob("reconstructions_step*.png"))
    assert grids, "no image grids written"
    for step in grids:
        assert {"images/reconstructions", "images/samples", "images/traversals"} <= \
            {k.split(".")[0] for k in by_step.get(step - 1, {})}, f"no image grids on the W&B row of step {step - 1}"
    return segs
