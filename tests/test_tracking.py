"""W&B mode resolution, run-id persistence and ownership, and metrics.csv truncation on resume."""
import csv
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.run.tracking import RunIdError, read_wandb_run_id, resolve_wandb_mode, truncate_metrics_csv, wandb_run_id
from tests.helpers.run import run_train


def test_wandb_mode_resolution(tmp_path):
    no_netrc = {"NETRC": str(tmp_path / "none")}
    assert resolve_wandb_mode("disabled", {"WANDB_API_KEY": "k"}) == "disabled"  # explicit config wins
    assert resolve_wandb_mode(None, no_netrc) == "offline"  # no credentials: compute-node default
    assert resolve_wandb_mode(None, {**no_netrc, "WANDB_API_KEY": "k"}) == "online"
    assert resolve_wandb_mode(None, {**no_netrc, "WANDB_API_KEY": "k", "WANDB_MODE": "offline"}) == "offline"
    assert resolve_wandb_mode(None, {**no_netrc, "WANDB_MODE": "dryrun"}) == "offline"
    assert resolve_wandb_mode(None, {**no_netrc, "WANDB_DISABLED": "true"}) == "disabled"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    netrc.chmod(0o600)
    assert resolve_wandb_mode(None, {"NETRC": str(netrc)}) == "online"


def test_run_id_is_created_once_and_reused(tmp_path):
    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _: wandb_run_id(tmp_path), range(32)))
    assert len(ids) == 1
    assert wandb_run_id(tmp_path) == ids.pop()
    assert wandb_run_id(tmp_path / "other") != wandb_run_id(tmp_path)


def test_run_id_belongs_to_its_directory(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_id = wandb_run_id(a)
    assert (a / "wandb_run_id.txt").read_text() == f"{run_id}\nowner: {a.resolve()}\n"
    b.mkdir()
    shutil.copy(a / "wandb_run_id.txt", b)  # a new directory never inherits an id by copying
    with pytest.raises(RunIdError, match=rf"^{b / 'wandb_run_id.txt'} holds W&B run {run_id} of {a.resolve()}, not"):
        wandb_run_id(b)
    (b / "wandb_run_id.txt").write_text("legacy123456\n")  # written before owners: taken as this directory's
    assert wandb_run_id(b) == "legacy123456" and read_wandb_run_id(b) == "legacy123456"
    assert (b / "wandb_run_id.txt").read_text() == f"legacy123456\nowner: {b.resolve()}\n"
    assert read_wandb_run_id(tmp_path / "none") is None


@pytest.mark.slow
def test_copied_run_id_stops_a_new_run_and_resume_never_starts_a_new_wandb_run(tiny_overrides, tmp_path):
    first = tmp_path / "run"
    args = [a for a in tiny_overrides if not a.startswith("logger.wandb.mode=")] + [
        "logger.wandb.mode=offline", "trainer.max_steps=10"]
    run_train(args)
    run_id = read_wandb_run_id(first)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(first / "wandb_run_id.txt", other)  # "the same W&B run, another beta"
    proc = run_train([*args, f"run.dir={other}", "objective.beta=4"], check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and lines[-1].startswith(f"error: {other / 'wandb_run_id.txt'} holds W&B run {run_id}")
    assert sorted(p.name for p in other.iterdir()) == ["checkpoints", "run.lock", "wandb_run_id.txt"]  # nothing written

    proc = run_train([*args, "resume=never", "objective.beta=4"])  # start over in place: a new W&B run
    assert "wandb_run_id.txt" in proc.stdout
    assert read_wandb_run_id(first) not in (None, run_id)


def test_truncate_metrics_drops_rows_after_checkpoint(tmp_path):
    path = tmp_path / "metrics.csv"
    rows = [{"epoch": 0, "step": s, "train/loss": 10 - s} for s in range(0, 30, 5)]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["epoch", "step", "train/loss"])
        w.writeheader()
        w.writerows(rows)
    assert truncate_metrics_csv(path, 11) == 3  # checkpoint after 11 steps: rows logged at 0..10 stay
    with path.open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [0, 5, 10]
    assert truncate_metrics_csv(path, 11) == 0
    assert truncate_metrics_csv(path, 10) == 1
    assert truncate_metrics_csv(tmp_path / "missing.csv", 3) == 0
