"""Real 2-rank runs on CPU (gloo) over 7 uneven shards with 2 loader workers per rank: equal batch
counts per rank, no training sample twice in an epoch, every validation sample exactly once."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch.multiprocessing as mp

from tests.helpers.data import UNEVEN, UNEVEN_VAL, KeyFileRecorder, data_cfg, ddp_rank_main


def check(results, batch_size=16):
    steps = sum(UNEVEN) // (2 * batch_size)
    assert [r["world"] for r in results] == [2, 2]
    for epoch in range(len(results[0]["train"])):
        per_rank = [r["train"][epoch] for r in results]
        assert [len(b) for b in per_rank] == [steps, steps]  # equal, and floor(553 / 32) = 17
        keys = [k for batches in per_rank for b in batches for k in b]
        assert len(keys) == len(set(keys)) == 2 * steps * batch_size
    val = Counter(k for r in results for b in r["val"] for k in b)
    assert len(val) == sum(UNEVEN_VAL) and set(val.values()) == {1}


@pytest.mark.slow
def test_two_gloo_ranks(uneven, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(ddp_rank_main, args=(2, str(tmp_path / "init"), str(uneven), str(out)), nprocs=2, join=True)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in results] == [0, 1]
    check(results)


@pytest.mark.slow
def test_two_device_lightning_ddp_spawn(uneven, tmp_path):
    """The same through a 2-device Lightning Trainer: world size and rank come from the trainer."""
    import lightning.pytorch as pl

    from pipeline.data.datamodule import ShardDataModule

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(KeyFileRecorder(str(tmp_path)), datamodule=ShardDataModule(data_cfg(uneven, num_workers=2)))
    results = [json.loads((tmp_path / f"trainer_rank{r}.json").read_text()) for r in range(2)]
    check([{"world": r["world"], "train": [r["train"]], "val": r["val"]} for r in results])
