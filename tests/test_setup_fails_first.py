"""Everything that can fail at set-up fails before W&B starts: a run that never trained one step leaves no W&B
run (offline: no wandb/ directory; online: no failed run in the project) and no run files."""
from __future__ import annotations

import pytest

from tests.helpers.run import TINY, run_train


@pytest.mark.slow  # a real training run (or several processes)
def test_a_data_error_leaves_no_wandb_run_and_no_run_files(digits_root, tmp_path):
    run = tmp_path / "run"
    args = [o for o in TINY if not o.startswith("logger.wandb.mode=")]
    proc = run_train([*args, f"data.root={digits_root}", f"run.dir={run}", "logger.wandb.mode=offline",
                      "data.batch_size=5000"], check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "data.batch_size 5000" in err[0], proc.stderr
    assert "wandb" not in proc.stdout.lower(), proc.stdout  # W&B never started
    assert not (run / "wandb").exists() and not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
