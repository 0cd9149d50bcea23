"""The worker processes of `prepare images` and `prepare index` (pipeline/data/workers.py): results in input
order, and a stop before the end (a bad file, Ctrl-C) that never hangs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.data import shards
from pipeline.data.workers import ProcessMap
from pipeline.exit_codes import INTERRUPTED_EXIT
from pipeline.run.files import is_temp
from tests.helpers.run import REPO


def square_or_fail(i: int) -> int:
    if i == 37:
        raise ValueError(f"item {i} is bad")
    return i * i


def test_results_come_in_input_order_and_an_error_stops_the_map_promptly():
    items = list(range(500))
    with ProcessMap(2) as pool:
        assert list(pool.map(abs, items)) == items
        assert list(pool.map(abs, items, chunk=1)) == items
    t = time.monotonic()
    with pytest.raises(ValueError, match="item 37 is bad"), ProcessMap(2) as pool:
        list(pool.map(square_or_fail, items))
    assert time.monotonic() - t < 30
    with ProcessMap(1) as pool:  # no processes: the plain map
        assert pool._executor is None and list(pool.map(abs, [-1, 2])) == [1, 2]


STOP_EARLY = r"""
import numpy as np
from pipeline.data import shards
from pipeline.data.workers import ProcessMap

def big(i):
    return np.zeros(4_000_000, np.uint8)  # a worker holds the result queue's write lock while it sends this

for k in range(100):
    with ProcessMap(2) as pool:
        next(iter(pool.map(big, range(400), chunk=1)))  # stop with both workers mid-send
print("done", flush=True)
"""


def run_in_group(args: list, timeout: float, **kw) -> subprocess.CompletedProcess:
    """Run `args` in its own process group; past `timeout`, kill the whole group (a hung pool's workers too)."""
    p = subprocess.Popen(args, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"still running after {timeout} s (hung):\n{out[-2000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(args, p.returncode, out, err)


@pytest.mark.slow
def test_stopping_while_workers_send_results_never_hangs():
    # multiprocessing.Pool.terminate() (the pool before) hung within 5 to 76 of these stops, in 5 tries of 5.
    r = run_in_group([sys.executable, "-c", STOP_EARLY], timeout=120)
    assert r.returncode == 0 and r.stdout == "done\n", r.stderr[-3000:]


@pytest.mark.slow  # two real prepare processes
def test_ctrl_c_during_prepare_images_says_one_line_exits_130_and_the_same_command_finishes(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)).save(src / "a.jpg", quality=90)
    jpeg = (src / "a.jpg").read_bytes()
    for i in range(1500):  # enough decoding to be interrupted in (copies: nothing to render)
        (src / f"{i:05d}.jpg").write_bytes(jpeg)
    cmd = [sys.executable, "-m", "pipeline.prepare", "images", "--source", str(src), "--out", str(out),
           "--size", "32"]
    p = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        first = p.stdout.readline()  # "found N images": printed after the header pass, before decoding
        assert "found 1501 images" in first, first
        while not (out / shards.INCOMPLETE).exists():  # the writer has started: decoding, writing shards
            assert p.poll() is None, p.communicate()
            time.sleep(0.01)
        os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        rest, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == INTERRUPTED_EXIT, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]  # nor one per worker
    assert err.strip().splitlines()[-1] == f"vae-prepare: interrupted; run the same command again to finish {out}"
    assert "manifest.json" not in rest and not (out / "manifest.json").exists()
    assert not [f.name for f in out.iterdir() if is_temp(f.name)]
    again = run_in_group(cmd + ["--no-progress"], timeout=120)
    assert again.returncode == 0 and (out / "manifest.json").exists(), again.stderr[-3000:]
