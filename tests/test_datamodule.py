"""ShardDataModule: equal batches per rank, exact validation, exact resume (loader and Trainer), errors."""
from __future__ import annotations

import warnings
from collections import Counter

import lightning.pytorch as pl
import pytest
import torch

from pipeline.data import shards
from pipeline.data.datamodule import ShardDataModule
from pipeline.data.sources import DataSetupError
from tests.helpers.data import UNEVEN, UNEVEN_VAL, KeyRecorder, data_cfg, keys_of, module_for, write_dataset, write_split


def epochs(loader, n):
    return [keys_of(loader) for _ in range(n)]


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 2)])
def test_train_equal_batches_no_repeats(uneven, world, workers):
    cfg = data_cfg(uneven, num_workers=workers)
    total, B = sum(UNEVEN), cfg.batch_size
    n = total // (world * B)
    runs = [epochs(module_for(cfg, world, r).train_dataloader(), 2) for r in range(world)]
    for epoch in range(2):
        per_rank = [run[epoch] for run in runs]
        assert [len(batches) for batches in per_rank] == [n] * world
        assert all(len(b) == B for batches in per_rank for b in batches)
        keys = [k for batches in per_rank for b in batches for k in b]
        assert len(keys) == len(set(keys)) == world * n * B  # no sample twice in an epoch
    assert runs[0][0] != runs[0][1]  # reshuffled per epoch
    dm = module_for(cfg, world, 0)
    assert dm.steps_per_epoch == n and len(dm.train_dataloader()) == n


@pytest.mark.parametrize("world,workers", [(1, 2), (2, 2), (3, 0)])
def test_val_and_test_exactly_once(uneven, world, workers):
    cfg = data_cfg(uneven, num_workers=workers, batch_size=8)
    for split, total in (("val", sum(UNEVEN_VAL)), ("test", 5)):
        stage = "fit" if split == "val" else "test"
        keys = []
        for r in range(world):
            dm = module_for(cfg, world, r, stage)
            loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
            batches = keys_of(loader)
            assert len(batches) == len(loader)
            keys += [k for b in batches for k in b]
        assert Counter(keys) == Counter({k: 1 for k in keys}) and len(keys) == total


def test_batch_format(uneven):
    dm = ShardDataModule(data_cfg(uneven, num_workers=0))
    assert dm.input_shape == (1, 4, 4)  # from the manifest, before setup
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (16, 1, 4, 4)
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (16,)
    assert batch["factors"].dtype == torch.float32 and batch["factors"].shape == (16, 3)
    assert isinstance(batch["key"], list) and all(isinstance(k, str) for k in batch["key"])
    assert batch["skipped"] == 0
    # image content and label belong to the key (written as index mod 256 / mod 10)
    idx = batch["factors"][:, 0].long()
    assert torch.equal(batch["image"][:, 0, 0, 0].long(), idx % 256) and torch.equal(batch["label"], idx % 10)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resume_matches_uninterrupted(uneven, workers):
    cfg = data_cfg(uneven, num_workers=workers)
    reference = epochs(module_for(cfg).train_dataloader(), 3)  # 3 epochs of N = 34 batches
    n = len(reference[0])
    for epoch, stop in [(0, 0), (0, 1), (0, 5), (0, n - 1), (1, 17), (1, n)]:
        loader = module_for(cfg).train_dataloader()
        assert epochs(loader, epoch) == reference[:epoch]  # the epochs before the stop, unchanged
        it = iter(loader)
        seen_now = [list(next(it)["key"]) for _ in range(stop)]
        state = loader.state_dict()
        assert (state["epoch"], state["batches_done"]) == (epoch, stop)
        del it
        resumed = module_for(cfg).train_dataloader()
        resumed.load_state_dict(state)
        assert len(resumed) == n  # the full epoch: Lightning counts the batches already done itself
        rest = epochs(resumed, 2)
        if stop == n:  # a finished epoch: the next one starts normally
            assert seen_now == reference[epoch] and rest[0] == reference[epoch + 1]
        else:
            assert seen_now + rest[0] == reference[epoch] and rest[1] == reference[epoch + 1]


@pytest.mark.parametrize("workers", [1, 0, 3])
def test_changed_loader_workers_continue_the_epoch_exactly(uneven, workers):
    """The order does not depend on the loader workers: 2 -> 1, 0 or 3 workers mid-epoch continue with the
    batches the 2-worker run would have handed out next."""
    cfg = data_cfg(uneven, num_workers=2)
    reference = keys_of(module_for(cfg).train_dataloader())
    loader = module_for(cfg).train_dataloader()
    it = iter(loader)
    seen = [list(next(it)["key"]) for _ in range(5)]
    state = loader.state_dict()
    del it
    resumed = module_for(data_cfg(uneven, num_workers=workers), resumed=state).train_dataloader()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(state)
    assert seen + keys_of(resumed) == reference


def test_changed_order_restarts_the_epoch_with_a_warning(uneven):
    loader = module_for(data_cfg(uneven)).train_dataloader()
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    cfg1 = data_cfg(uneven, seed=1)
    fresh = keys_of(module_for(cfg1).train_dataloader())  # epoch 0 with the new settings
    resumed = module_for(cfg1, resumed=state).train_dataloader()
    with pytest.warns(UserWarning, match="seed 0 -> 1.*restarting epoch 0 from its first batch"):
        resumed.load_state_dict(state)
    assert keys_of(resumed) == fresh
    # a change at an epoch boundary is clean: no warning, next epoch
    state.update(batches_done=state["num_batches"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(state)
    assert resumed.state_dict()["epoch"] == 1


def global_steps(cfg, world, resumed=None, epochs_=1):
    """Each global step's samples, in rank order, over `epochs_` epochs from the loaders' position."""
    loaders = [module_for(cfg, world, r, resumed=resumed).train_dataloader() for r in range(world)]
    if resumed is not None:
        for loader in loaders:
            loader.load_state_dict(resumed)
    out = []
    for _ in range(epochs_):
        per_rank = [keys_of(loader) for loader in loaders]
        assert len({len(b) for b in per_rank}) == 1  # every rank the same number of batches
        out += [[k for b in step for k in b] for step in zip(*per_rank)]
    return out


@pytest.mark.slow  # 15 loaders with workers (~10 s)
@pytest.mark.parametrize("cache", ["none", "host"])
def test_elastic_resume_keeps_every_global_step(uneven, cache):
    """A run started on 4 ranks (global batch 4 x 16), stopped mid-epoch and resumed on 2, 1 or 8 ranks (and
    other worker counts) hands out the same samples in every later global step, in the same order."""
    cfg = data_cfg(uneven, num_workers=2, cache=cache)
    reference = global_steps(cfg, 4, epochs_=2)  # 8 steps of 64 per epoch
    assert len(reference) == 16 and all(len(step) == 64 for step in reference)
    first = module_for(cfg, 4, 0).train_dataloader()
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    del it
    assert (state["global_batch"], state["parts"]) == (64, 4)
    for world, workers in [(2, 1), (1, 0), (8, 3)]:
        got = global_steps(data_cfg(uneven, num_workers=workers, cache=cache), world, resumed=state, epochs_=2)
        assert got == reference[3:], world


def test_resume_on_a_world_size_that_cannot_read_the_order_is_refused(uneven):
    state = module_for(data_cfg(uneven), 4, 0).train_dataloader().state_dict()
    with pytest.raises(DataSetupError, match=r"3 ranks cannot read the run's training order \(4 canonical partitions"
                                             r".*global batch of 64.*splits exactly over 1, 2, 4, 8, 16, 32, 64 ranks; "):
        module_for(data_cfg(uneven), 3, 0, resumed=state)
    with pytest.raises(DataSetupError, match=r"global batch of 50 \(data.global_batch_size\) does not split evenly "
                                             r"over 4 ranks.*multiple of 4, or run on 1, 2, 5, 10, 25, 50 ranks"):
        module_for(data_cfg(uneven, global_batch_size=50), 4, 0)
    dm = module_for(data_cfg(uneven, global_batch_size=48), 3, 0)  # a fresh run: any divisor of G
    assert (dm.batch_size, dm.global_batch, dm.parts) == (16, 48, 3)


def _trainer(root, max_epochs, **kw):
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=2, val_check_interval=10,
                      default_root_dir=root, **kw)


def test_resume_through_lightning_trainer(uneven, tmp_path):
    """fit(ckpt_path=) from checkpoints saved mid-epoch (ModelCheckpoint every 7 steps, validation every
    10 batches) continues with exactly the batches an uninterrupted run saw next; the epoch loop's
    restored batch count and len(loader) (the full epoch) agree."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    cfg = data_cfg(uneven, num_workers=2)
    n = len(module_for(cfg).train_dataloader())  # 34 batches per epoch
    every_7 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=7, save_top_k=-1)
    on_val = ModelCheckpoint(dirpath=tmp_path / "val", monitor="val_metric", mode="max", save_top_k=-1)
    full = KeyRecorder()
    _trainer(tmp_path, 2, callbacks=[every_7, on_val]).fit(full, datamodule=ShardDataModule(cfg))
    assert len(full.train_keys) == 2 * n
    assert all(trainer_epoch == loader_epoch for trainer_epoch, loader_epoch in full.epochs)
    saved = {int(p.stem.split("step=")[1]): p for p in (tmp_path / "ckpt").glob("*.ckpt")}
    saved["val20"] = next((tmp_path / "val").glob("*step=20*.ckpt"))  # written at validation end
    for step in (7, 28, 35, 63, "val20"):  # mid-epoch 0, before val, first of epoch 1, mid-epoch 1
        model = KeyRecorder()
        trainer = _trainer(tmp_path, 2, enable_checkpointing=False)
        trainer.fit(model, datamodule=ShardDataModule(cfg), ckpt_path=saved[step])
        assert trainer.num_training_batches == n
        done = 20 if step == "val20" else step
        assert model.train_keys == full.train_keys[done:], f"resume from step {step}"
        assert trainer.global_step == 2 * n
        assert all(trainer_epoch == loader_epoch for trainer_epoch, loader_epoch in model.epochs)


def test_truncated_shard_raise_names_it(uneven, tmp_path):
    write_dataset(tmp_path, {"train": (40, 40, 40)})
    bad = tmp_path / "train-000001.tar"
    bad.write_bytes(bad.read_bytes()[:9000])
    for workers in (0, 2):
        loader = module_for(data_cfg(tmp_path, num_workers=workers)).train_dataloader()
        with pytest.raises(Exception, match="train-000001.tar"):
            keys_of(loader)


def test_corrupt_samples_warn_skips_counts_and_keeps_batches(tmp_path, caplog):
    write_dataset(tmp_path, {"train": (40, 40, 40), "val": (30,)})
    bad = tmp_path / "train-000001.tar"
    bad.write_bytes(bad.read_bytes()[:9000])  # truncated: ~15 of its 40 samples survive
    data = bytearray((tmp_path / "train-000002.tar").read_bytes())
    at = data.index(b"\x93NUMPY")  # first sample's image: break its .npy magic
    data[at:at + 6] = b"XXXXXX"
    (tmp_path / "train-000002.tar").write_bytes(bytes(data))
    cfg = data_cfg(tmp_path, num_workers=0, on_error="warn", batch_size=10)
    world, per_rank, skipped = 2, [], 0
    for r in range(world):
        dm = module_for(cfg, world, r)
        batches = list(dm.train_dataloader())
        per_rank.append(batches)
        assert sum(b["skipped"] for b in batches) == dm.skipped_samples
        skipped += dm.skipped_samples
        assert all(len(b["key"]) == 10 for b in batches)
    assert [len(b) for b in per_rank] == [6, 6]  # floor(120 / 20): unchanged by the losses
    readable = 0
    with pytest.raises(shards.ShardFormatError):
        for _ in shards.iter_tar_samples(open(bad, "rb"), str(bad)):
            readable += 1
    assert skipped == (40 - readable) + 1  # every position is read once across the two ranks
    assert "train-000001.tar" in caplog.text


def test_streaming_source_needs_steps_per_epoch(tmp_path):
    """A pipe: source has no counts (local shards without a manifest are indexed: tests/test_autoindex.py)."""
    write_split(tmp_path, "train", (20, 20, 20))  # no manifest
    pattern = f"pipe:cat {tmp_path}/train-{{000000..000002}}.tar"
    dm = ShardDataModule(data_cfg(tmp_path, train=pattern, val=None))
    with pytest.raises(DataSetupError, match="set data.steps_per_epoch"):
        dm.setup("fit")
    assert dm.input_shape == (1, 4, 4)  # read from the first sample


@pytest.mark.parametrize("world,workers", [(2, 2), (1, 2)])
def test_streaming_source_equal_batches(tmp_path, world, workers):
    write_split(tmp_path, "train", (20, 20, 21))  # 3 shards: fewer than 2 x 2 slots -> sample-level split
    cfg = data_cfg(tmp_path, train=str(tmp_path / "train-{000000..000002}.tar"), num_workers=workers,
                   steps_per_epoch=3, batch_size=5, shuffle_buffer=0)
    keys = []
    for r in range(world):
        dm = module_for(cfg, world, r)
        batches = keys_of(dm.train_dataloader())
        assert len(batches) == 3 and all(len(b) == 5 for b in batches)
        keys += [k for b in batches for k in b]
    assert len(keys) == len(set(keys))  # 15 * world <= 61: one pass, no repeats


def test_sibling_manifest_and_directory_sources(uneven):
    dm = module_for(data_cfg(uneven, train=str(uneven / "train-{000000..000006}.tar"), val=str(uneven)))
    assert dm.source("train").total == sum(UNEVEN) and dm.steps_per_epoch == sum(UNEVEN) // 16
    assert dm.source("val").total == sum(UNEVEN_VAL)


def test_set_up_checks_say_what_to_change(uneven):
    with pytest.raises(DataSetupError, match="lower data.batch_size to at most"):
        module_for(data_cfg(uneven, batch_size=300), world_size=2)
    with pytest.raises(DataSetupError, match="5 test samples for 6 ranks"):
        module_for(data_cfg(uneven, batch_size=8), world_size=6, stage="test")
    with pytest.raises(DataSetupError, match="dataset 'npz' needs a source"):
        _ = ShardDataModule(data_cfg(uneven / "nowhere", dataset="npz")).input_shape


def test_pipe_urls_stream(tmp_path):
    """Any URL webdataset opens (here `pipe:`): counts unknown, so steps_per_epoch sets the epoch."""
    write_split(tmp_path, "train", (30, 30))
    pattern = f"pipe:cat {tmp_path}/train-{{000000..000001}}.tar"
    dm = module_for(data_cfg(tmp_path, train=pattern, steps_per_epoch=4, batch_size=8, num_workers=0))
    assert dm.input_shape == (1, 4, 4) and dm.source("train").counts is None
    batches = keys_of(dm.train_dataloader())
    keys = [k for b in batches for k in b]
    assert len(batches) == 4 and len(keys) == len(set(keys)) == 32


def test_longer_explicit_epoch_wraps_around(uneven):
    cfg = data_cfg(uneven, num_workers=0, steps_per_epoch=40)  # 40 * 16 = 640 > 553 samples
    batches = keys_of(module_for(cfg).train_dataloader())
    keys = [k for b in batches for k in b]
    assert len(batches) == 40 and len(set(keys)) == sum(UNEVEN)  # every sample, some twice


def test_one_shard_for_two_ranks_and_two_workers(tmp_path):
    """Fewer shards than ranks x workers: the sample-level layout still splits exactly, no hang."""
    write_dataset(tmp_path, {"train": (100,), "val": (9,)})
    cfg = data_cfg(tmp_path, batch_size=8)
    train, val = [], []
    for r in range(2):
        dm = module_for(cfg, 2, r)
        batches = keys_of(dm.train_dataloader())
        assert len(batches) == 6 and all(len(b) == 8 for b in batches)
        train += [k for b in batches for k in b]
        val += [k for b in keys_of(dm.val_dataloader()) for k in b]
    assert len(set(train)) == len(train) == 96 and sorted(val) == sorted(f"valx0x{i}" for i in range(9))


# ---- which data a config means ----------------------------------------------------------------------
def test_mistyped_root_is_an_error_not_a_fresh_digits_dataset(tmp_path):
    from pipeline.config import DataConfig

    typo = tmp_path / "data" / "digitz"
    with pytest.raises(DataSetupError, match=r"data\.root=.*digitz: .*manifest\.json does not exist.*data\.dataset="):
        ShardDataModule(DataConfig(root=str(typo))).source("train")
    assert not (typo / shards.MANIFEST).exists()  # nothing was prepared there
    # Naming the recipe says "prepare it here": that still works anywhere.
    assert ShardDataModule(DataConfig(root=str(typo), dataset="digits")).source("train").total > 0


def test_prepared_once_per_datamodule(tmp_path, monkeypatch):
    """The training entry point prepares first, Lightning's prepare_data and every source after it find it
    done; a datamodule used alone prepares on the first source it needs."""
    from pipeline.config import DataConfig
    from pipeline.data import prepare

    calls = []
    real = prepare.ensure_prepared
    monkeypatch.setattr(prepare, "ensure_prepared", lambda cfg: calls.append(cfg) or real(cfg))
    cfg = DataConfig(root=str(tmp_path / "digits"), dataset="digits")
    dm = ShardDataModule(cfg)
    dm.prepare_data()
    dm.prepare_data()
    assert dm.source("train").total > 0 and dm.source("val").total > 0 and len(calls) == 1
    alone = ShardDataModule(cfg)
    assert alone.source("test").total > 0 and alone.source("train").total > 0 and len(calls) == 2


def test_train_alone_never_validates_on_data_root(digits_root, tmp_path):
    """data.train set, data.val not: the same source's val split, or none; data.root's manifest (the
    default dataset, here a prepared digits root) must not be used."""
    import shutil

    from pipeline.config import DataConfig

    only_train = tmp_path / "only_train"
    only_train.mkdir()
    for shard in digits_root.glob("train-*.tar"):
        shutil.copy(shard, only_train)
    dm = ShardDataModule(DataConfig(root=str(digits_root), train=str(only_train)))
    assert dm.source("val") is None and dm.source("test") is None
    with_val = tmp_path / "with_val"
    shutil.copytree(only_train, with_val)
    for shard in digits_root.glob("val-*.tar"):
        shutil.copy(shard, with_val)
    dm = ShardDataModule(DataConfig(root=str(digits_root), train=str(with_val)))
    assert [u.rsplit("/", 2)[-2:] for u in dm.source("val").urls] == [["with_val", p.name]
                                                                      for p in sorted(digits_root.glob("val-*.tar"))]
    assert dm.source("test") is None
    # A manifest given as data.train: its own val split.
    dm = ShardDataModule(DataConfig(root=str(tmp_path / "elsewhere"), train=str(digits_root / shards.MANIFEST)))
    assert dm.source("val").total == shards.load_manifest(digits_root / shards.MANIFEST)["splits"]["val"]["total"]


def test_the_summary_says_the_batch_per_device_and_per_step(uneven):
    assert module_for(data_cfg(uneven)).batch_text() == "batch 16 per device"
    assert module_for(data_cfg(uneven), 2, 0).batch_text() == "batch 16 per device, 32 per step (data.batch_size x 2 ranks)"
    state = module_for(data_cfg(uneven), 4, 0).train_dataloader().state_dict()
    assert module_for(data_cfg(uneven), 1, 0, resumed=state).batch_text() == (
        "batch 64 per device, 64 per step (kept from the checkpoint (4 ranks x 16))")
