"""W&B mode resolution, run-id persistence and metrics.csv truncation on resume."""
import csv
from concurrent.futures import ThreadPoolExecutor

from pipeline.tracking import resolve_wandb_mode, truncate_metrics_csv, wandb_run_id


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
