"""pipeline.report from local files: two fake run dirs (one with eval.json, one with metrics.csv only)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.analysis.report import main, report
from pipeline.config import load_config, to_yaml


def fake_run(root: Path, name: str, beta: float, metrics: list[dict], eval_json: dict | None = None,
             extra: tuple = ()) -> Path:
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    cfg = load_config([], [f"objective.beta={beta}", "logger.wandb.mode=disabled", f"run.dir={run}", *extra])
    (run / "config.yaml").write_text(to_yaml(cfg))
    cols = sorted({k for m in metrics for k in m})
    lines = [",".join(cols)] + [",".join(str(m.get(c, "")) for c in cols) for m in metrics]
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    if eval_json is not None:
        (run / "checkpoints" / "eval.json").write_text(json.dumps(eval_json))
    return run


@pytest.fixture
def two_runs(tmp_path):
    a = fake_run(tmp_path, "beta4", 4.0, [
        {"step": 9, "train/loss": 80.0},
        {"step": 10, "val/elbo": -70.0, "val/kl": 5.0, "val/recon": 65.0},
        {"step": 19, "train/loss": 75.0},  # a later train-only row must not hide the last val values
    ], eval_json={"elbo": -69.0, "iwae": -66.5, "recon": 64.0, "kl": 5.0, "mig": 0.31, "split": "test",
                  "dci_disentanglement": 0.42, "dci_completeness": 0.38, "dci_informativeness": 0.91,
                  "factor_vae_score": 0.75, "sap": 0.12,
                  "num_examples": 180})
    b = fake_run(tmp_path, "beta1", 1.0, [
        {"step": 10, "val/elbo": -60.0, "val/kl": 12.0, "val/recon": 48.0},
        {"step": 20, "val/elbo": -55.0, "val/kl": 14.0, "val/recon": 41.0},
        {"step": 29, "train/loss": 50.0},
    ])
    return a, b


def test_report_writes_figures_and_table(two_runs, tmp_path):
    out = tmp_path / "report"
    result = report([str(d) for d in two_runs], out=out)
    for name in ("rate_distortion", "vs_beta"):
        img = Image.open(result["files"][name])
        assert img.size[0] > 300 and img.size[1] > 200
    md = (out / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| beta")]
    assert len(table) == 2 and table[0].startswith("| beta1 | 1.00 ")  # sorted by beta
    assert "| beta1 | 1.00 | 14.000 | 41.000 | -55.000 | - | - | - | - | - | - | - | metrics.csv (val, step 20) |" in md
    assert ("| beta4 | 4.00 | 5.000 | 64.000 | -69.000 | -66.500 | 0.310 | 0.420 | 0.380 | 0.910 | 0.750 | 0.120 | "
            "eval.json (test, n=180) |") in md
    assert "No traversal grids" in md  # fake runs have no checkpoint: said, not crashed
    assert result["wandb"] == "disabled"


def test_table_header_names_every_column_of_its_rows(two_runs, tmp_path):
    """All four disentanglement metrics (DCI as its three numbers) get a header cell, and the header has as
    many cells as each row: a header shorter than the rows renders the extra cells unnamed, or not at all."""
    table = report([str(d) for d in two_runs], out=tmp_path / "report", wandb_log=False)["table"].splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    assert cells[0] == ["run", "beta", "rate KL (nats)", "distortion NLL (nats)", "ELBO (nats)", "IWAE (nats)",
                        "MIG", "DCI dis.", "DCI compl.", "DCI info.", "FactorVAE", "SAP", "source"]
    assert all(len(row) == len(cells[0]) for row in cells[1:])


def test_runs_on_different_data_are_refused_naming_both(two_runs, tmp_path, capsys):
    val = [{"step": 10, "val/elbo": -60.0, "val/kl": 12.0, "val/recon": 48.0}]
    other = fake_run(tmp_path, "faces", 2.0, val, extra=("data.root=data/faces",))
    binarized = fake_run(tmp_path, "dyn", 2.0, val, extra=("data.binarize=dynamic",))
    for odd in (other, binarized):
        assert main([str(two_runs[0]), str(two_runs[1]), str(odd), "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "different data" in err
        assert f"beta4, beta1 on {Path('data/digits') / 'manifest.json'}" in err and f"{odd.name} on " in err
    assert not (tmp_path / "r" / "report.md").exists()


def test_cli_errors_name_the_directory(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no config.yaml" in err and str(tmp_path / "nope") in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_science_beta_sweep_trades_rate_for_distortion(tmp_path):
    """The science check, shrunk (pipeline/analysis/science.py runs the full one): three betas on a small dSprites
    subset; rate falls, distortion rises, IWAE >= ELBO; then the report of the real runs, with grids."""
    import torch

    from pipeline.analysis.science import check, sweep

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors on a shared 2-core box: spinning intra-op threads only cost
    try:
        rows = sweep(tmp_path / "sci", betas=[0.5, 4.0, 32.0], steps=100, limit=1500, iwae_samples=20,
                     extra=["model.hidden_dims=[256,64]"], progress=False)
    finally:
        torch.set_num_threads(threads)
    assert check(rows) == [], rows
    assert all(r["num_examples"] == 75 for r in rows)  # the 5% test split of 1500, every example once
    assert all(r["mig"] is not None and 0.0 <= r["mig"] <= 1.0 for r in rows)

    result = report([r["dir"] for r in rows], out=tmp_path / "report", wandb_log=False)
    assert {"rate_distortion", "vs_beta", "traversals", "reconstructions", "samples"} <= set(result["files"])
    trav = Image.open(result["files"]["traversals"])
    assert trav.size == (9 * 65 + 1, 6 * 65 + 1)  # 9 steps across, one row per latent dim; 64 px + 1 pad
    assert "| beta32 | 32.00 |" in result["table"]
