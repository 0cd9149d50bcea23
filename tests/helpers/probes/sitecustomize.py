"""Put this directory on PYTHONPATH with KEY_PROBE_OUT=DIR set, and every Lightning Trainer built in the
process records the sample keys of each training batch it sees; at the end of fit each rank writes
DIR/rank<global rank>.json. It reaches the ranks of `slurm/train.sh` as they are (srun starts new
interpreters, which import sitecustomize from PYTHONPATH), so the test runs the user's script unchanged."""
import os

if os.environ.get("KEY_PROBE_OUT"):
    import json
    from pathlib import Path

    from lightning.pytorch import Callback, Trainer

    class KeyProbe(Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.rows.append([trainer.global_step, list(batch["key"])])

        def on_train_end(self, trainer, pl_module):
            out = Path(os.environ["KEY_PROBE_OUT"])
            out.mkdir(parents=True, exist_ok=True)
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
                {"rows": self.rows, "world": trainer.world_size, "node": os.environ.get("SLURMD_NODENAME")}))

    _init = Trainer.__init__

    def _init_with_probe(self, *args, **kwargs):
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), KeyProbe()]
        _init(self, *args, **kwargs)

    Trainer.__init__ = _init_with_probe
