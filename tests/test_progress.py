"""Progress outside a terminal is plain lines (SLURM logs, CI): no carriage-return redraws piled on one line."""
from __future__ import annotations

import io
import subprocess
import sys

from pipeline.progress import progress_bar
from tests.helpers.run import REPO


def test_off_a_terminal_each_update_is_a_line_and_the_last_state_is_kept():
    out = io.StringIO()
    with progress_bar(total=3, unit="img", desc="work", file=out, mininterval=0) as bar:
        for _ in range(3):
            bar.update(1)
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and lines and all(line.startswith("work:") for line in lines), text
    assert "3/3" in lines[-1]


def test_on_a_terminal_it_stays_a_redrawn_bar():
    out = io.StringIO()
    with progress_bar(total=3, desc="work", file=out, tty=True, mininterval=0) as bar:
        bar.update(3)
    assert "\r" in out.getvalue()


def test_prepare_logs_lines_not_carriage_returns(tmp_path):
    """`prepare` as a batch job runs it: stderr to a file."""
    log = tmp_path / "prepare.log"
    with log.open("w") as f:
        subprocess.run([sys.executable, "-m", "pipeline.prepare", "digits", "--out", str(tmp_path / "d")],
                       cwd=REPO, check=True, stdout=f, stderr=subprocess.STDOUT, timeout=120)
    text = log.read_text()
    assert "\r" not in text and any(line.startswith("writing ") for line in text.splitlines()), text
