"""What a run prints: the start-up summary, one progress bar (a terminal) or progress lines (logs), and none
of the library notices every run used to print, while real warnings still show."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import warnings

import pytest
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from pipeline.training.console import LIGHTNING_INFO_LOGGER, quiet_known_noise
from tests.helpers.run import REPO, run_train

# What the default run printed on every start (and resume) although nothing was wrong.
NOISE = [
    "The `srun` command is available on your system but is not used",  # where srun is installed
    "is smaller than the logging interval", "You have overridden `transfer_batch_to_device`",
    "isinstance(treespec, LeafSpec)", "GPU available:", "TPU available:", "Tip:", "`Trainer.fit` stopped",
    "was configured so 100% of the batches", "`weights_only` was not set", "anonymous setting has no effect",
    "Trainable params", "| Name ",  # the model summary table
]
RESUME_NOISE = ["exists and is not empty", "Restoring states from the checkpoint", "Restored all states"]


def run_on_a_terminal(args, timeout=300) -> tuple[int, str]:
    """`python -m pipeline.train ARGS` with a 120-column pseudo-terminal as stdout and stderr."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", *args], cwd=REPO, env=env,
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], timeout)
        assert ready, f"no output for {timeout}s:\n{out.decode(errors='replace')[-3000:]}"
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal's other side closed: the process is done
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout=60), out.decode(errors="replace")


@pytest.mark.slow
def test_summary_progress_and_no_known_noise_in_logs_and_on_a_terminal(tiny_overrides, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_overrides + ["trainer.enable_progress_bar=true", "logger.wandb.mode=offline"]
    proc = run_train(args)
    out = proc.stdout + proc.stderr
    lines = out.splitlines()

    # a short summary instead of the 90-line config dump (the config is in RUN_DIR/config.yaml)
    assert "objective:" not in out and "resolved config" not in out
    summary = [ln for ln in lines if ln.startswith("# ")]
    expected = [f"# run       {run_dir}", "# data      digits (",
                "# loader    train split held in host RAM (data.cache=auto, 0.1 MiB per process, no workers); val/test "
                "streamed by 2 loader workers", "# model     mlp VAE, latent 4",
                "# devices   cpu x 1", "# steps     30", "# wandb     offline", "# start     fresh", "# changed   "]
    for head in expected:
        assert any(ln.startswith(head) for ln in summary), (head, summary)
    assert "1,437 train / 180 val / 180 test images of 1x8x8" in out
    changed = next(ln for ln in summary if ln.startswith("# changed"))
    assert "trainer.max_steps=30" in changed and "model.latent_dim=4" in changed and "objective.beta" not in changed

    # logs (not a terminal): a progress line every few steps up to max_steps, no bar restarting per epoch
    progress = [ln for ln in lines if ln.startswith("step ")]
    assert [int(re.match(r"step (\d+)/30 ", ln).group(1)) for ln in progress] == [5, 10, 15, 20, 25, 30], progress
    assert re.match(r"step 30/30 \(100%\)  [\d.]+ it/s  ETA \S+  loss \S+  elbo -\S+  kl \S+$", progress[-1])
    assert "val at step 30: elbo -" in out and "Epoch" not in out and "it/s]" not in out
    for text in NOISE:
        assert text not in out, text

    # a terminal: the run resumed, one bar to the new max_steps; a real warning of the run still shows
    workers = (os.cpu_count() or 1) + 1  # more loader workers than cores: torch's UserWarning, a real one
    code, tty = run_on_a_terminal(args + ["trainer.max_steps=40", f"data.num_workers={workers}"])
    assert code == 0, tty[-3000:]
    assert f"# start     resuming from {run_dir / 'checkpoints' / 'last.ckpt'} (step 30)" in tty
    assert f"This DataLoader will create {workers} worker processes in total" in tty
    bars = re.findall(r"train: +\d+%\|[^|]*\| (\d+)/(\d+) \[", tty)
    assert bars and {total for _, total in bars} == {"40"} and bars[-1][0] == "40", tty[-3000:]
    assert "loss=" in tty and "Epoch" not in tty
    for text in NOISE + RESUME_NOISE:
        assert text not in tty, text


def test_filters_match_only_the_known_notices():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_noise()
        warnings.warn("The number of training batches (11) is smaller than the logging interval "
                      "Trainer(log_every_n_steps=25).", PossibleUserWarning, stacklevel=1)
        warnings.warn("You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a "
                      "`LightningDataModule`. It will use the implementation from `LightningModule` instance.",
                      stacklevel=1)
        warnings.warn("The number of training batches (11) is smaller than the logging interval", UserWarning,
                      stacklevel=1)
        warnings.warn("a real problem", PossibleUserWarning, stacklevel=1)
    assert [(str(w.message), w.category) for w in caught] == [
        ("The number of training batches (11) is smaller than the logging interval", UserWarning),
        ("a real problem", PossibleUserWarning)]

    with recorded(LIGHTNING_INFO_LOGGER) as (logger, records):
        logger.warning("GPU available: True (cuda), used: True")
        logger.warning("Restored all states from the checkpoint at x.ckpt")
        logger.warning("LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]")
    assert [r.getMessage() for r in records] == ["LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]"]


@contextlib.contextmanager
def recorded(name: str):
    """(the logger `name`, the records it passes on to its handlers, after its filters) while inside."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield logger, records
    finally:
        logger.removeHandler(handler)


def test_per_rank_start_up_lines_are_kept_on_rank_zero_only(monkeypatch):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from pipeline.training.console import PER_RANK_INFO

    quiet_known_noise()
    with recorded("lightning.fabric.utilities.distributed") as (logger, records):
        for rank in (0, 1, 3):
            monkeypatch.setattr(rank_zero_only, "rank", rank)
            logger.warning("Initializing distributed: GLOBAL_RANK: %d, MEMBER: %d/4", rank, rank + 1)
            logger.warning("something else from rank %d", rank)
    assert [r.getMessage() for r in records] == [
        "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/4", "something else from rank 0",
        "something else from rank 1", "something else from rank 3"]
    assert "lightning.pytorch.trainer.connectors.signal_connector" in PER_RANK_INFO
