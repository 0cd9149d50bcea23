"""The one atomic writer (pipeline/run/files.py): whole or not at all, at most 0644, create-if-absent."""
from __future__ import annotations

import os
import stat

import pytest

from pipeline.run.files import atomic_write, is_temp, remove_temp_files, temp_path


def test_a_writer_killed_mid_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "state.bin"
    atomic_write(path, b"old")

    def dies_half_way(f):
        f.write(b"new, half")
        raise KeyboardInterrupt  # what a kill looks like from inside the writer

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies_half_way)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.bin"]  # a failing writer removes its own temporary file

    left = temp_path(path)  # what a SIGKILLed one leaves: swept by whoever holds the directory
    left.write_bytes(b"new, half")
    assert is_temp(left.name) and remove_temp_files(tmp_path) == [left]
    assert os.listdir(tmp_path) == ["state.bin"] and path.read_bytes() == b"old"


def test_exclusive_never_replaces_a_file_that_is_there(tmp_path):
    path = tmp_path / "id.txt"
    assert atomic_write(path, "first\n", exclusive=True)
    assert not atomic_write(path, "second\n", exclusive=True)
    assert path.read_text() == "first\n" and os.listdir(tmp_path) == ["id.txt"]
    assert atomic_write(path, lambda f: f.write(b"third\n"))  # not exclusive: replaced
    assert path.read_text() == "third\n"


def test_files_are_at_most_0644_under_umask_0(tmp_path):
    old = os.umask(0)
    try:
        atomic_write(tmp_path / "a", b"x")
        atomic_write(tmp_path / "b", b"x", mode=0o777)
        atomic_write(tmp_path / "c", b"x", exclusive=True)
    finally:
        os.umask(old)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {"a": 0o644, "b": 0o644, "c": 0o644}
