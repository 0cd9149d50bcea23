"""The one tar header parser (shards.tar_members): what it reads from a stream and what it skips with seeks
agree, GNU and pax long names included; truncation is an error in both modes, and no index."""
from __future__ import annotations

import io
import tarfile

import pytest

from pipeline.data import shards

LONG = "d" * 120 + "/" + "k" * 110  # over ustar's 100 + 155 name limits: a GNU `L` or pax `x` header


def _tar(path, fmt, members):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_read_and_seek_agree(tmp_path, fmt):
    path = tmp_path / "a.tar"
    members = [(f"{LONG}0.npy", b"x" * 700), (f"{LONG}0.cls", b"3"), ("short1.npy", b"")]
    _tar(path, fmt, members)
    with open(path, "rb") as f:
        read = list(shards.tar_members(f))
    with open(path, "rb") as f:
        seeked = list(shards.tar_members(f, read_data=False, length=path.stat().st_size))
    assert [(m.name, m.data) for m in read] == members
    assert [(m.name, m.offset, m.size) for m in read] == [(m.name, m.offset, m.size) for m in seeked]
    raw = path.read_bytes()
    assert all(raw[m.offset:m.offset + m.size] == m.data for m in read)  # offsets point at the data
    assert all(m.data is None for m in seeked)
    index = shards.index_tar(str(path))
    assert index.keys.tolist() == [f"{LONG}0".encode(), b"short1"] and index.end[-1] == read[-1].end
    assert [s["__key__"] for s in shards.iter_tar_samples(open(path, "rb"), "a.tar")] == [f"{LONG}0", "short1"]


def test_truncation_in_both_modes(tmp_path):
    path = tmp_path / "a.tar"
    _tar(path, tarfile.USTAR_FORMAT, [("0.npy", b"x" * 2000), ("1.npy", b"y" * 10)])
    cut = tmp_path / "cut.tar"
    for at, what in ((1024, "truncated member data"), (512 * 5 + 100, "truncated header")):
        cut.write_bytes(path.read_bytes()[:at])
        with pytest.raises(EOFError, match=what), open(cut, "rb") as f:
            list(shards.tar_members(f))
        with pytest.raises(EOFError, match="truncated"), open(cut, "rb") as f:
            list(shards.tar_members(f, read_data=False, length=at))
        assert shards.index_tar(str(cut)) is None


def test_directories_are_skipped_by_the_parser_and_refused_by_the_index(tmp_path):
    path = tmp_path / "a.tar"
    _tar(path, tarfile.USTAR_FORMAT, [("sub", None), ("sub/0.npy", b"x"), ("__meta__.json", b"{}")])
    with open(path, "rb") as f:
        assert [(m.kind, m.name) for m in shards.tar_members(f)] == [
            (tarfile.DIRTYPE, ""), (b"0", "sub/0.npy"), (b"0", "__meta__.json")]
    assert [s["__key__"] for s in shards.iter_tar_samples(open(path, "rb"), "a.tar")] == ["sub/0"]
    assert shards.index_tar(str(path)) is None  # the parser reads such a shard


def test_member_key():
    assert shards.member_key("a/b.c/0001.Label.CLS") == ("a/b.c/0001", "label.cls")
    assert shards.member_key("dir/__meta__.json") is None and shards.member_key("noext") is None
