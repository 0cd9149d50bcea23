"""Local shards with no manifest (plain webdataset.ShardWriter output) are indexed at start and the index is
cached (pipeline.data.autoindex): counts, sha256, members and shapes as from `prepare index`, built once and
reused, a changed shard scanned again; pipe: sources without counts still stop with one line."""
from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data import shards
from pipeline.data.autoindex import CACHE_ENV
from pipeline.data.sources import DataSetupError
from tests.helpers.data import data_cfg, keys_of, module_for
from tests.helpers.run import EXACT, TINY, assert_same_run, run_train

TRAIN, VAL = (50, 50, 37), (20, 13)  # ShardWriter's 50-sample shards, then the rest


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), value).save(buf, "PNG")
    return buf.getvalue()


def write_plain(out: Path, split: str, sizes, start: int = 0) -> None:
    """`{split}-NNNNNN.tar` by webdataset.ShardWriter (no manifest): grey 8 x 8 png images, .cls labels."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=sizes[0], verbose=0) as sink:
        for n in range(start, start + sum(sizes)):
            sink.write({"__key__": f"{split}{n:06d}", "png": png(n % 256), "cls": str(n % 10).encode()})


@pytest.fixture
def plain(tmp_path) -> Path:
    write_plain(tmp_path / "shards", "train", TRAIN)
    write_plain(tmp_path / "shards", "val", VAL, start=1000)
    return tmp_path / "shards"


def patterns(root: Path) -> dict:
    return {"train": f"{root}/train-{{000000..000002}}.tar", "val": f"{root}/val-{{000000..000001}}.tar"}


def index_bars(err: str) -> list[str]:
    """The progress lines of finished index scans (one per scan, off a terminal)."""
    return [ln for ln in err.splitlines() if re.match(r"indexing .*100%", ln)]


def test_plain_shards_get_the_exact_mode_indexed_once(plain, index_cache, capsys):
    """No manifest, no data.steps_per_epoch: counts, sha256s, members and shapes from one scan; 2 ranks x 2
    workers get equal batches and every validation sample once; the second data module reads the cache."""
    cfg = data_cfg(plain, **patterns(plain), batch_size=8)
    dm = module_for(cfg, 2, 0)
    train = dm.source("train")
    assert train.counts == TRAIN and dm.source("val").counts == VAL
    assert train.digests == tuple(shards.sha256_file(Path(u)) for u in train.urls)
    assert train.members == ("cls", "png") and train.shapes == ((1, 8, 8),) and dm.input_shape == (1, 8, 8)
    assert train.mode == f"indexed at start (cached {train.indexed})"
    assert Path(train.indexed).parent == index_cache
    assert len(index_bars(capsys.readouterr().err)) == 2  # train, val
    stamp = os.stat(train.indexed).st_mtime_ns
    other = module_for(cfg, 2, 1)  # rank 1: reads the cache
    assert other.source("train") == train and index_bars(capsys.readouterr().err) == []
    assert os.stat(train.indexed).st_mtime_ns == stamp
    n = sum(TRAIN) // 16
    batches = [keys_of(m.train_dataloader()) for m in (dm, other)]
    assert [len(b) for b in batches] == [n, n]
    keys = [k for b in batches for batch in b for k in batch]
    assert len(keys) == len(set(keys)) == 2 * n * 8
    val = [k for m in (dm, other) for b in keys_of(m.val_dataloader()) for k in b]
    assert sorted(val) == [f"val{i:06d}" for i in range(1000, 1000 + sum(VAL))]


def test_a_changed_shard_is_indexed_again_alone(plain, capsys):
    cfg = data_cfg(plain, train=patterns(plain)["train"], batch_size=8)
    first = module_for(cfg).source("train")
    capsys.readouterr()
    shard = Path(first.urls[2])
    write_plain(plain / "new", "train", (7,))  # a shorter third shard, written over the old one
    os.replace(plain / "new" / "train-000000.tar", shard)
    again = module_for(cfg).source("train")
    assert again.counts == (50, 50, 7) and again.indexed == first.indexed
    assert again.digests[:2] == first.digests[:2] and again.digests[2] == shards.sha256_file(shard)
    bars = index_bars(capsys.readouterr().err)
    assert len(bars) == 1 and " 1/1 " in bars[0]  # the changed shard only


def test_processes_starting_together_scan_once(plain, tmp_path, monkeypatch):
    """Two processes (as srun's ranks) ask for the same index at once: one scans, the other waits for it."""
    import multiprocessing

    from pipeline.data import autoindex, index

    source = module_for(data_cfg(plain, train=patterns(plain)["train"], steps_per_epoch=1)).source("train")
    scans = tmp_path / "scans"
    scan_shards = index.scan_shards

    def slow_scan(*args, **kw):  # long enough that the other process asks while this one scans
        with open(scans, "a") as f:
            f.write("scan\n")
        time.sleep(1.0)
        return scan_shards(*args, **kw)

    monkeypatch.setattr(index, "scan_shards", slow_scan)
    monkeypatch.setenv(autoindex.CACHE_ENV, str(tmp_path / "cache"))
    def rank(r: int) -> None:
        (tmp_path / f"rank{r}").write_text(repr(autoindex.indexed(source, ("png",)).counts))

    ranks = [multiprocessing.get_context("fork").Process(target=rank, args=(r,)) for r in range(2)]
    for proc in ranks:
        proc.start()
    for proc in ranks:
        proc.join(60)
    assert [proc.exitcode for proc in ranks] == [0, 0]
    assert scans.read_text() == "scan\n" and {(tmp_path / f"rank{r}").read_text() for r in range(2)} == {repr(TRAIN)}


def test_steps_per_epoch_streams_without_a_scan(plain, index_cache):
    before = set(index_cache.iterdir())
    dm = module_for(data_cfg(plain, train=patterns(plain)["train"], batch_size=8, steps_per_epoch=3))
    assert dm.source("train").counts is None and dm.source("train").mode == "streaming (counts unknown)"
    assert set(index_cache.iterdir()) == before


def test_an_unwritable_cache_is_one_line_naming_the_setting(plain, monkeypatch):
    blocker = plain / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "index"))
    with pytest.raises(DataSetupError, match=rf"^{blocker}/index: cannot write the index of .*set {CACHE_ENV}"):
        module_for(data_cfg(plain, train=patterns(plain)["train"], batch_size=8))


def test_an_unreadable_image_stops_at_start_under_raise(tmp_path):
    import webdataset as wds

    with wds.ShardWriter(str(tmp_path / "%06d.tar"), maxcount=100, verbose=0) as sink:
        for n in range(20):
            sink.write({"__key__": f"k{n:03d}", "png": png(n)[:20] if n == 13 else png(n), "cls": b"1"})
    cfg = data_cfg(tmp_path, train=str(tmp_path), batch_size=4)
    with pytest.raises(DataSetupError, match=r"000000.tar: sample 'k013': undecodable .png.*data.on_error=warn"):
        module_for(cfg)
    assert module_for(data_cfg(tmp_path, train=str(tmp_path), batch_size=4, on_error="warn")).source(
        "train").counts == (20,)  # the same cached index


def test_a_pipe_source_without_counts_is_one_line_at_set_up(plain, index_cache):
    """pipe: (and http(s)) shards are not scanned at start: without data.steps_per_epoch, one line says what to
    set, at set-up (the training entry point's preflight: before any run file, as test_hostile_run checks)."""
    before = set(index_cache.iterdir())
    with pytest.raises(DataSetupError) as e:
        module_for(data_cfg(plain, train=f"pipe:cat {patterns(plain)['train']}", batch_size=8))
    message = str(e.value)
    assert "\n" not in message and message.startswith("pipe:cat ") and "set data.steps_per_epoch" in message
    assert "sample counts unknown (no manifest.json, and pipe: / http(s) shards are not indexed at start)" in message
    assert set(index_cache.iterdir()) == before


@pytest.mark.slow
def test_two_ddp_ranks_train_on_a_plain_directory_with_exact_resume(plain, tmp_path):
    """`data.train=<directory>` and nothing else about the data (data.cache=none: the training split through
    the loader workers, not held in RAM): 2 DDP ranks (gloo) x 2 loader workers,
    validation on the directory's val shards; the index is built by the first start only; a run cut
    mid-epoch and resumed equals the uninterrupted one."""
    base = TINY + EXACT + ["trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=16", "data.cache=none",
                           f"data.train={plain}", "trainer.max_steps=8", "trainer.val_check_interval=4"]
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref = run_train(base + [f"run.dir={ref_dir}"])
    assert len(index_bars(ref.stderr)) == 2, ref.stderr[-3000:]  # train and val, by one rank
    counts = next(ln for ln in ref.stdout.splitlines() if ln.startswith("# counts"))
    assert re.fullmatch(r"# counts    train: indexed at start \(cached \S+\.json\); "
                        r"val: indexed at start \(cached \S+\.json\)", counts), counts
    cached = {p: p.stat().st_mtime_ns for p in Path(os.environ[CACHE_ENV]).glob("*.json")}
    cut = run_train(base + [f"run.dir={cut_dir}", "trainer.max_steps=5"])  # mid-epoch: 4 steps per epoch
    resumed = run_train(base + [f"run.dir={cut_dir}"])
    assert "(step 5)" in resumed.stdout
    assert index_bars(cut.stderr + resumed.stderr) == []
    assert {p: p.stat().st_mtime_ns for p in cached} == cached
    assert_same_run(ref_dir, cut_dir, first_step=5, last_step=8)
