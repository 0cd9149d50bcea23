"""The real-data example on real data: Debian's dataset-fashion-mnist idx files, prepared by the mnist recipe
and trained by configs/fashion_mnist.yaml as the README says. CI installs the package (.ci/run); elsewhere the
test skips, saying so."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.run import REPO, TINY, run_train

SOURCE = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not (SOURCE / "train-images-idx3-ubyte.gz").is_file(),
                                reason=f"no Fashion-MNIST at {SOURCE}: `apt-get install dataset-fashion-mnist`")


@pytest.mark.slow  # prepares 70,000 images and trains 20 steps
def test_fashion_mnist_recipe_prepares_the_real_files_and_the_config_trains(tmp_path):
    root = tmp_path / "fashion-mnist"
    subprocess.run([sys.executable, "-m", "pipeline.prepare", "mnist", "--source", str(SOURCE), "--out", str(root),
                    "--no-progress"], cwd=REPO, check=True, capture_output=True, text=True, timeout=300)
    manifest = json.loads((root / "manifest.json").read_text())
    totals = {s: v["total"] for s, v in manifest["splits"].items()}
    assert totals == {"train": 53000, "val": 7000, "test": 10000} and manifest["shape"] == [1, 28, 28]

    from pipeline.config import load_config
    from pipeline.data.datamodule import ShardDataModule

    cfg = load_config([REPO / "configs" / "fashion_mnist.yaml"], [f"data.root={root}"]).data
    batch = next(iter(ShardDataModule(cfg).loader("test", train=False)))
    images, labels = batch["image"].numpy(), batch["label"].numpy()
    # Fashion-MNIST, not digits or noise: mean grey level ~73/255 (MNIST's is ~33), all ten classes
    assert 60 < images.mean() < 85 and set(np.unique(labels)) == set(range(10)), (images.mean(), np.unique(labels))

    run = tmp_path / "run"
    shrink = [o for o in TINY if o.split("=")[0] not in ("model.hidden_dims", "model.latent_dim", "data.batch_size")]
    proc = run_train([str(REPO / "configs" / "fashion_mnist.yaml"), *shrink, f"data.root={root}", f"run.dir={run}",
                      "trainer.max_steps=20"])
    assert "# done: step 20" in proc.stdout
    elbo = float(proc.stdout.split("val/elbo ")[1].split()[0])
    assert -600 < elbo < -200, elbo  # 20 steps from ~ -545 nats (784 Bernoulli pixels at p=0.5) toward ~ -240
