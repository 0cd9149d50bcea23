"""`python -m tests.helpers.sync_probe OUT_DIR [key=value ...]`: pipeline.training.train's run, counting per training step
every host read of a tensor's value (.item(), .tolist(), bool(), float(), int(): on a GPU each one waits for
the device; the optimizer's host-side step counters left out) and every Python-level collective
(torch.distributed.all_reduce, broadcast, ...). Each rank writes OUT_DIR/rank<r>.json: one row per
training batch, [batches trained before it, global step, whether Lightning writes step metrics after it,
host reads, collectives]. Under DDP, Lightning relaunches this module for the other ranks, which count the
same way.

The window of a batch runs from its on_train_batch_start to the next one's (so it holds the batch's own
end hooks, metric writing, validation and checkpoints when due, and what Lightning does before the next
batch); the last window ends at on_train_end.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import Callback

COUNTS = {"reads": 0, "collectives": 0}
# Reads that are not syncs on any device: torch.optim's step counters are host tensors unless the optimizer
# is capturable or fused (torch/optim/adam.py), so AdamW's per-parameter `.item()` never waits for a GPU.
# Only the optimizer's own modules: torch.optim.swa_utils (AveragedModel, under Lightning's weight averaging)
# reads a device buffer, and is counted.
HOST_SIDE = ("torch.optim.optimizer", "torch.optim.adam", "torch.optim.adamw", "torch.optim.lr_scheduler")


def _counting(fn, kind: str):
    def wrapper(*args, **kwargs):
        if kind == "collectives" or not sys._getframe(1).f_globals.get("__name__", "").startswith(HOST_SIDE):
            COUNTS[kind] += 1
        return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn
    return wrapper


for _name in ("item", "tolist", "__bool__", "__float__", "__int__"):
    setattr(torch.Tensor, _name, _counting(getattr(torch.Tensor, _name), "reads"))
for _name in ("all_reduce", "broadcast", "all_gather", "reduce", "barrier", "all_gather_object",
              "broadcast_object_list", "gather", "scatter"):
    setattr(dist, _name, _counting(getattr(dist, _name), "collectives"))


class Probe(Callback):
    def __init__(self, out: Path):
        self.out, self.rows, self._open = out, [], None

    def _close(self) -> None:
        if self._open is not None:
            batches, step, logs, reads, collectives = self._open
            self.rows.append([batches, step, logs, COUNTS["reads"] - reads, COUNTS["collectives"] - collectives])
            self._open = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        from pipeline.training.lightning_compat import batches_trained, logs_written_this_step

        self._close()
        self._open = (batches_trained(trainer), trainer.global_step, logs_written_this_step(trainer),
                      COUNTS["reads"], COUNTS["collectives"])

    def on_train_end(self, trainer, pl_module):
        self._close()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))


def main(argv: list[str]) -> int:
    from pipeline.config import load_config
    from pipeline.training import train as T

    out = Path(argv[0])
    build = T.build_callbacks
    T.build_callbacks = lambda cfg, run_dir, *rest: build(cfg, run_dir, *rest) + [Probe(out)]
    T.train(load_config([], argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
