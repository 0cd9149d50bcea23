"""No host-device synchronisation per training step in the default configuration.

On a GPU a small VAE step takes about a millisecond; a host read of a device tensor (`if not
torch.isfinite(loss)`, `.item()`, `.tolist()`) or a collective with a host read (agreeing on signals
across ranks) in every step stalls the queue of kernels each time. tests/helpers/sync_probe.py runs
`pipeline.train` with the default cadences and counts, per training step, the host reads of tensor values
and the Python-level collectives (CPU here: counting stands in for `torch.cuda.set_sync_debug_mode`). Only
steps whose metrics Lightning writes anyway (every trainer.log_every_n_steps) may read values; under DDP
the ranks agree on received signals (one all-reduce, one read) every trainer.signal_every_n_steps batches,
and Lightning's own per-step SIGTERM broadcast is off (DeferredSignals handles SIGTERM at those steps).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.config import load_config
from tests.helpers.run import REPO

pytestmark = pytest.mark.slow


def probe(args: list[str], out) -> dict[int, list]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SLURM_"))}
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.sync_probe", str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}


# optim.ema_decay, grad_clip_norm and grad_skip_norm on (a low skip limit: some steps are skipped): the EMA update,
# the norm, the clip and the skip stay on the device
EMA_CLIP_SKIP = ["optim.ema_decay=0.9", "optim.grad_clip_norm=3.5", "optim.grad_skip_norm=4.0"]


@pytest.mark.parametrize("devices,extra", [(1, []), (2, []), (1, EMA_CLIP_SKIP)], ids=["1", "2", "1-ema-clip-skip"])
def test_no_host_read_or_collective_in_a_step_unless_metrics_are_written(devices, extra, digits_root, tmp_path):
    steps = 60
    every = load_config([]).trainer.signal_every_n_steps
    # the default config (cadences, loader, progress, checkpoints, images), a CPU-sized model and run
    args = ["trainer.accelerator=cpu", f"trainer.max_steps={steps}", "model.hidden_dims=[64,32]",
            "model.latent_dim=4", "data.batch_size=64", "logger.wandb.mode=disabled", f"data.root={digits_root}",
            f"run.dir={tmp_path / 'run'}"]
    if devices > 1:
        args += [f"trainer.devices={devices}", "trainer.strategy=ddp"]
    ranks = probe(args + extra, tmp_path / "counts")
    assert sorted(ranks) == list(range(devices))
    for rank, rows in ranks.items():
        assert [r[0] for r in rows] == list(range(steps))
        quiet = agreed = 0
        for batches, step, logs, reads, collectives in rows[:-1]:  # the last step validates and saves
            agree = devices > 1 and (batches + 1) % every == 0
            assert collectives == int(agree), (rank, step, collectives)
            if not logs:
                assert reads == int(agree), (rank, step, reads)
                quiet += not agree
            agreed += agree
        assert quiet >= steps - 10 and agreed == (0 if devices == 1 else (steps - 1) // every)
        assert sum(r[2] for r in rows) == 3  # metrics written at steps 25, 50 and the last: reads allowed there
