"""Helpers for the data tests: uneven shard sets, a key-recording LightningModule, loader plumbing."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

import lightning.pytorch as pl
import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.data import shards

UNEVEN = (13, 200, 57, 31, 120, 88, 44)  # 7 shards, 553 samples
UNEVEN_VAL = (9, 40, 3, 21)  # 73 validation samples: 2 ranks get 36 and 37


def write_split(out: Path, split: str, sizes: Sequence[int], *, shape=(1, 4, 4), factors: bool = False) -> dict:
    """Shards `{split}-NNNNNN.tar` of the given sizes; keys `{split}x{shard}x{i}` (unique, no dots);
    each image is filled with the sample's running index mod 256; label = index mod 10."""
    out.mkdir(parents=True, exist_ok=True)
    entry, n = [], 0
    for s, size in enumerate(sizes):
        samples = []
        for i in range(size):
            image = np.full(shape, n % 256, dtype=np.uint8)
            f = np.array([n, s, i], dtype=np.float32) if factors else None
            samples.append(shards.encode_sample(f"{split}x{s}x{i}", image, n % 10, f))
            n += 1
        name = f"{split}-{s:06d}.tar"
        count, digest = shards.write_shard(out / name, samples)
        entry.append({"name": name, "samples": count, "sha256": digest})
    return {"total": n, "shape": list(shape), "dtype": "uint8", "source": "test", "shards": entry}


def write_dataset(out: Path, splits: Dict[str, Sequence[int]], **kw) -> Path:
    manifest = {"format": shards.FORMAT, "dataset": "test", "shape": list(kw.get("shape", (1, 4, 4))),
                "dtype": "uint8", "source": "test",
                "splits": {split: write_split(out, split, sizes, **kw) for split, sizes in splits.items()}}
    (out / shards.MANIFEST).write_text(json.dumps(manifest))
    return out / shards.MANIFEST


def data_cfg(root: Path, **kw) -> DataConfig:
    """A DataConfig streaming through the loader workers (data.cache=none: these tests are about the stream;
    tests/test_cache.py checks that the cache gives the same batches)."""
    base = dict(root=str(root), batch_size=16, num_workers=2, shuffle_buffer=40, seed=0, pin_memory=False,
                cache="none")
    base.update(kw)
    return DataConfig(**base)


def module_for(cfg: DataConfig, world_size: int = 1, rank: int = 0, stage: str = "fit", resumed: dict | None = None):
    """A datamodule set up as rank `rank` of `world_size`; `resumed`: the loader state of the checkpoint it
    continues (what pipeline.train hands it before set-up)."""
    from pipeline.data.datamodule import ShardDataModule

    dm = ShardDataModule(cfg)
    dm.world_size, dm.rank = world_size, rank
    dm.continue_order(resumed)
    dm.setup(stage)
    return dm


def keys_of(loader) -> List[List[str]]:
    return [list(batch["key"]) for batch in loader]


class KeyRecorder(pl.LightningModule):
    """A one-parameter model that records the keys of every training / validation batch it sees."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.train_keys: List[List[str]] = []
        self.val_keys: List[List[str]] = []
        self.epochs: List[tuple] = []  # (trainer epoch, loader epoch) per training batch

    def training_step(self, batch, batch_idx):
        assert batch["image"].dtype == torch.uint8
        self.train_keys.append(list(batch["key"]))
        self.epochs.append((self.trainer.current_epoch, self.trainer.train_dataloader.epoch))
        return (self.w * batch["image"].float().mean()) ** 2

    def validation_step(self, batch, batch_idx):
        self.val_keys.append(list(batch["key"]))
        self.log("val_metric", float(self.global_step))  # lets a ModelCheckpoint save on validation end

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def ddp_rank_main(rank: int, world: int, init_file: str, root: str, out: str, epochs: int = 2) -> None:
    """One rank of a real gloo process group: reads `epochs` training epochs and one validation pass
    with 2 loader workers, all-reducing once per training batch (as DDP's gradient sync would: unequal
    batch counts would hang, and the 60 s timeout turns that into an error), then writes its keys."""
    from datetime import timedelta

    import torch.distributed as dist

    from pipeline.data.datamodule import ShardDataModule

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        dm = ShardDataModule(data_cfg(Path(root), num_workers=2))
        dm.setup("fit")  # no trainer: world size and rank come from torch.distributed
        train = []
        loader = dm.train_dataloader()
        for _ in range(epochs):
            keys = []
            for batch in loader:
                dist.all_reduce(torch.ones(1))
                keys.append(list(batch["key"]))
            train.append(keys)
        val = [list(b["key"]) for b in dm.val_dataloader()]
        dist.barrier()
        Path(out, f"rank{rank}.json").write_text(json.dumps(
            {"world": dm.world_size, "rank": dm.rank, "steps": dm.steps_per_epoch, "train": train, "val": val}))
    finally:
        dist.destroy_process_group()


class KeyFileRecorder(KeyRecorder):
    """KeyRecorder that also writes its keys to OUT/trainer_rank{r}.json (for spawned DDP ranks)."""

    def __init__(self, out: str):
        super().__init__()
        self.out = out

    def on_fit_end(self):
        Path(self.out, f"trainer_rank{self.global_rank}.json").write_text(json.dumps(
            {"train": self.train_keys, "val": self.val_keys, "world": self.trainer.world_size}))


def foreign_rank_main(rank: int, world: int, init_file: str, cfg_json: str, out: str, stop: int) -> None:
    """One gloo rank over the DataConfig data_cfg(out, **cfg_json) with 2 loader workers: a training epoch,
    the same epoch interrupted after `stop` batches and resumed from the loader's state in a new loader,
    and a validation pass; an all-reduce per training batch (unequal counts would hang, then time out)."""
    from datetime import timedelta

    import torch.distributed as dist

    from pipeline.data.datamodule import ShardDataModule

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))

    def keys(batches) -> List[List[str]]:
        got = []
        for batch in batches:
            dist.all_reduce(torch.ones(1))
            got.append(list(batch["key"]))
        return got

    def module():
        dm = ShardDataModule(data_cfg(Path(out), num_workers=2, **json.loads(cfg_json)))
        dm.setup("fit")  # world size and rank from torch.distributed
        return dm

    try:
        dm = module()
        train = keys(dm.train_dataloader())
        interrupted = module().train_dataloader()
        it = iter(interrupted)
        keys(next(it) for _ in range(stop))
        state = interrupted.state_dict()
        del it
        resumed = module().train_dataloader()
        resumed.load_state_dict(state)
        rest = keys(resumed)
        val = [list(b["key"]) for b in dm.val_dataloader()]
        dist.barrier()
        Path(out, f"rank{rank}.json").write_text(json.dumps({"train": train, "resumed": rest, "val": val}))
    finally:
        dist.destroy_process_group()
