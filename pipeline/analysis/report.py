"""Compare a set of runs (typically a beta sweep) from their local files: figures and a markdown table.

    python -m pipeline.report runs/beta1 runs/beta4 runs/beta8 --out reports/beta-sweep
    python -m pipeline.report runs/beta* --traverse runs/beta4      # traversal grids for that run

For each RUN_DIR it reads config.yaml (beta = objective.beta), eval.json (written by
`python -m pipeline.evaluate`, looked for in RUN_DIR/checkpoints/ then RUN_DIR/) and metrics.csv
(the last logged val/* values, used where there is no eval.json). Nothing needs the network, so it
serves offline sweeps too. Writes to --out (default: report/ next to the first run):
  rate_distortion.png   rate (KL, nats per example) against distortion (reconstruction NLL, nats per
                        example), one point per run, labelled by beta (Alemi et al. 2018)
  vs_beta.png           ELBO and IWAE bound, and the disentanglement scores (MIG, DCI disentanglement /
                        completeness / informativeness, FactorVAE score, SAP), against beta
  report.md             the table (run, beta, rate, distortion, ELBO, IWAE, the six scores, source)
  traversals.png, reconstructions.png, samples.png   for the --traverse run (default: highest MIG,
                        else the first run), when its checkpoint and data are present
When W&B is enabled in the first run's config (pipeline.run.tracking.resolve_wandb_mode) the figures and
the table also go to a W&B run of job type `report` in that project and group.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

METRIC_COLUMNS = {"elbo": "val/elbo", "iwae": "val/iwae", "recon": "val/recon", "kl": "val/kl"}
# disentanglement scores of eval.json (pipeline.evaluate), under the same names in a row, shown in the table and
# plotted against beta: {key: label}
SCORE_COLUMNS = {"mig": "MIG", "dci_disentanglement": "DCI dis.", "dci_completeness": "DCI compl.",
                 "dci_informativeness": "DCI info.", "factor_vae_score": "FactorVAE", "sap": "SAP"}
# the table's columns and their headers (one dict, so the header always matches the rows)
TABLE_HEADERS = {"run": "run", "beta": "beta", "rate": "rate KL (nats)", "distortion": "distortion NLL (nats)",
                 "elbo": "ELBO (nats)", "iwae": "IWAE (nats)", **SCORE_COLUMNS, "source": "source"}
TABLE_COLUMNS = tuple(TABLE_HEADERS)


def find_eval_json(run_dir: Path) -> Path | None:
    for p in (run_dir / "checkpoints" / "eval.json", run_dir / "eval.json"):
        if p.is_file():
            return p
    return None


def last_logged(metrics_csv: Path) -> dict[str, float]:
    """{column: its last non-empty value} of a Lightning CSVLogger metrics.csv (rows mix train and val),
    plus "step@<column>": the step of that value."""
    last: dict[str, float] = {}
    if not metrics_csv.is_file():
        return last
    with metrics_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k and k != "step" and v not in (None, ""):
                    try:
                        last[k] = float(v)
                        last[f"step@{k}"] = float(row.get("step") or "nan")
                    except ValueError:
                        pass
    return last


def training_data(cfg) -> tuple[str, str]:
    """(identity, description) of what a run trained on. The identity is the training split's shard
    checksums from its manifest when it can be read (the same data under another path matches), else the
    source as configured; plus every conversion that changes the data the ELBO is measured on."""
    import hashlib

    from pipeline.data.shards import MANIFEST, load_manifest

    d = cfg.data
    source = d.train or str(Path(d.root) / MANIFEST)
    manifest = Path(source) if source.endswith(".json") else Path(source) / MANIFEST
    identity = source
    try:
        digests = [s.get("sha256") for s in load_manifest(manifest)["splits"]["train"]["shards"]]
        if all(digests):
            identity = "sha256:" + hashlib.sha256("".join(digests).encode()).hexdigest()[:16]
    except (OSError, ValueError, KeyError):  # moved or remote data: compare what the configs say
        pass
    conversions = f"binarize={d.binarize} channels={d.channels} image_size={d.image_size} resize={d.resize}"
    return f"{identity} {conversions}", f"{source} ({conversions})"


def load_run(run_dir: str | Path) -> dict[str, object]:
    """One row of the comparison: beta, rate (KL), distortion (recon), ELBO, IWAE in nats per example, and the
    disentanglement scores of SCORE_COLUMNS (unitless, None without eval.json or factors).
    eval.json values win over the last validation metrics; `source` says which was used."""
    from pipeline.config import load_config

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"not a run directory (no config.yaml): {run_dir}")
    cfg = load_config([cfg_path])
    data, data_text = training_data(cfg)
    row: dict[str, object] = {"run": run_dir.name, "dir": str(run_dir), "beta": float(cfg.objective.beta),
                              "data": data, "data_text": data_text}
    ev = find_eval_json(run_dir)
    if ev is not None:
        e = json.loads(ev.read_text())
        row.update(rate=e.get("kl"), distortion=e.get("recon"), elbo=e.get("elbo"), iwae=e.get("iwae"),
                   **{key: e.get(key) for key in SCORE_COLUMNS},
                   source=f"eval.json ({e.get('split', '?')}, n={e.get('num_examples', '?')})")
    else:
        m = last_logged(run_dir / "metrics.csv")
        if "val/elbo" not in m:
            raise ValueError(f"{run_dir}: neither eval.json nor val/elbo in metrics.csv; run pipeline.evaluate first")
        row.update(rate=m.get("val/kl"), distortion=m.get("val/recon"), elbo=m.get("val/elbo"), iwae=m.get("val/iwae"),
                   **dict.fromkeys(SCORE_COLUMNS), source=f"metrics.csv (val, step {m['step@val/elbo']:.0f})")
    return row


def _fmt(v: object, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, object]]) -> str:
    """The comparison as a GitHub markdown table, rows sorted by beta; nats per example, scores in [0, 1]."""
    header = [TABLE_HEADERS[c] for c in TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(rows, key=lambda r: r["beta"]):
        lines.append("| " + " | ".join(_fmt(r.get(c), 2 if c == "beta" else 3) for c in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on compute nodes
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_rate_distortion(rows: Sequence[dict[str, object]], path: Path) -> Path:
    """Rate (KL) on y against distortion (recon NLL) on x, one labelled point per run; dashed lines are
    constant ELBO (-ELBO = D + R), so moving along one trades rate for distortion at equal ELBO."""
    plt = _pyplot()
    pts = sorted([r for r in rows if r.get("rate") is not None and r.get("distortion") is not None],
                 key=lambda r: r["beta"])
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    d = [r["distortion"] for r in pts]
    rt = [r["rate"] for r in pts]
    ax.plot(d, rt, "-o", color="tab:blue")
    for r in pts:
        ax.annotate(f"β={r['beta']:g}", (r["distortion"], r["rate"]), textcoords="offset points", xytext=(5, 5))
    if pts:
        lo, hi = min(x + y for x, y in zip(d, rt)), max(x + y for x, y in zip(d, rt))
        xs = [min(d) - 0.05 * (max(d) - min(d) + 1), max(d) + 0.05 * (max(d) - min(d) + 1)]
        for total in sorted({lo, hi}):
            ax.plot(xs, [total - x for x in xs], "--", color="grey", lw=0.8)
        ax.set_xlim(*xs)
        ax.set_ylim(min(0.0, min(rt)), max(rt) * 1.15 + 0.5)
    ax.set_xlabel("distortion: reconstruction NLL (nats / example)")
    ax.set_ylabel("rate: KL(q(z|x) || p(z)) (nats / example)")
    ax.set_title("Rate–distortion (dashed: constant ELBO)")
    return _save(fig, path)


def plot_vs_beta(rows: Sequence[dict[str, object]], path: Path) -> Path:
    """ELBO and IWAE (nats per example), and the disentanglement scores (MIG, DCI disentanglement, completeness
    and informativeness, FactorVAE score, SAP), against beta (log x axis when all betas are positive)."""
    plt = _pyplot()
    pts = sorted(rows, key=lambda r: r["beta"])
    betas = [r["beta"] for r in pts]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    for key, label in (("elbo", "ELBO"), ("iwae", "IWAE bound")):
        xy = [(r["beta"], r[key]) for r in pts if r.get(key) is not None]
        if xy:
            ax1.plot(*zip(*xy), "-o", label=label)
    ax1.set_xlabel("β")
    ax1.set_ylabel("nats / example")
    ax1.legend()
    top = 0.0
    for col, label in SCORE_COLUMNS.items():
        xy = [(r["beta"], r[col]) for r in pts if r.get(col) is not None]
        if xy:
            ax2.plot(*zip(*xy), "-o", label=label)
            top = max(top, max(m for _, m in xy))
    if top > 0:
        ax2.set_ylim(0.0, min(1.05, max(0.1, 1.15 * top)))  # from 0: small scores stay small
        ax2.legend()
    else:
        ax2.text(0.5, 0.5, "no disentanglement scores (no ground-truth factors / eval.json)", ha="center",
                 va="center", transform=ax2.transAxes)
    ax2.set_xlabel("β")
    ax2.set_ylabel("score (1 = disentangled)")
    for ax in (ax1, ax2):
        if betas and min(betas) > 0:
            ax.set_xscale("log")
        ax.set_xticks(betas, [f"{b:g}" for b in betas])  # label the betas run, not powers of ten
        ax.minorticks_off()
    return _save(fig, path)


def traversal_grids(run_dir: Path, out_dir: Path, num_images: int = 8, traversal_range: float = 3.0,
                    steps: int = 9, max_dims: int = 10) -> dict[str, Path]:
    """PNG grids from RUN_DIR's last checkpoint: reconstructions of the first validation images (input,
    reconstruction pairs), 64 prior samples, and traversals of the first image's mean code, one row per
    latent dim from -range to +range: the grids training draws (pipeline.vae.grids.draw_grids). Needs the
    checkpoint and data."""
    import torch
    from PIL import Image

    from pipeline.analysis.evaluate import load_module
    from pipeline.config import load_config
    from pipeline.data.datamodule import ShardDataModule
    from pipeline.vae.grids import draw_grids

    cfg = load_config([run_dir / "config.yaml"])
    module, _ = load_module(run_dir / "checkpoints" / "last.ckpt", torch.device("cpu"))
    data_cfg = cfg.data.copy()
    data_cfg.num_workers = 0
    dm = ShardDataModule(data_cfg)
    split = "val" if dm.source("val") is not None else "train"
    batch = next(iter(dm.loader(split, train=False)))
    # Training's grids (fixed prior draw, so every run compared gets the same z's), from this batch.
    grids = draw_grids(module, batch["image"], num_images, traversal_range, steps, max_dims)
    paths = {}
    for name, grid in grids.items():
        paths[name] = out_dir / f"{name}.png"
        Image.fromarray(grid).save(paths[name])
    return paths


def log_to_wandb(rows: Sequence[dict[str, object]], images: dict[str, Path], table_md: str) -> str | None:
    """A `report` job in the first run's W&B project/group, when its config enables W&B. Returns the mode."""
    from pipeline.config import load_config
    from pipeline.run.tracking import resolve_wandb_mode

    cfg = load_config([Path(rows[0]["dir"]) / "config.yaml"])
    mode = resolve_wandb_mode(cfg.logger.wandb.mode)
    if mode == "disabled":
        return mode
    import wandb

    w = cfg.logger.wandb
    run = wandb.init(project=w.project, entity=w.entity, group=w.group, job_type="report", mode=mode,
                     dir=str(images["rate_distortion"].parent), name="report")
    table = wandb.Table(columns=list(TABLE_COLUMNS), data=[[r.get(c) for c in TABLE_COLUMNS] for r in rows])
    run.log({"report/table": table, **{f"report/{k}": wandb.Image(str(p)) for k, p in images.items()}})
    run.summary["report/markdown"] = table_md
    run.finish()
    return mode


def report(run_dirs: Sequence[str | Path], out: Path | None = None, traverse: str | Path | None = None,
           traversals: bool = True, wandb_log: bool = True) -> dict[str, object]:
    """Build the report; returns {"rows", "files", "wandb"}. See the module docstring."""
    rows = [load_run(d) for d in run_dirs]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["data"], []).append(r)
    if len(groups) > 1:  # one rate-distortion curve across datasets would compare nothing
        listed = "; ".join(f"{', '.join(r['run'] for r in g)} on {g[0]['data_text']}" for g in groups.values())
        raise ValueError(f"these runs trained on different data, report each group separately: {listed}")
    out = Path(out) if out is not None else Path(run_dirs[0]).parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    files = {"rate_distortion": plot_rate_distortion(rows, out / "rate_distortion.png"),
             "vs_beta": plot_vs_beta(rows, out / "vs_beta.png")}
    table = markdown_table(rows)
    notes = []
    if traversals:
        if traverse is None:
            with_mig = [r for r in rows if r.get("mig") is not None]
            traverse = max(with_mig, key=lambda r: r["mig"])["dir"] if with_mig else rows[0]["dir"]
        tdir = Path(traverse)
        if (tdir / "checkpoints" / "last.ckpt").is_file():
            try:
                files.update(traversal_grids(tdir, out))
                notes.append(f"Grids (reconstructions, samples, traversals of ±3 σ per latent dim) from `{tdir}`.")
            except Exception as e:  # noqa: BLE001 -- grids are extras: a missing data dir must not lose the report
                notes.append(f"No traversal grids for `{tdir}`: {type(e).__name__}: {e}")
        else:
            notes.append(f"No traversal grids: no checkpoint at `{tdir / 'checkpoints' / 'last.ckpt'}`.")
    md = ["# Run comparison", "", ("Nats per example (summed over pixels and latent dims); rate = KL, distortion = "
                                   "reconstruction NLL; MIG, DCI, FactorVAE and SAP from the mean codes against the "
                                   "ground-truth factors (pipeline/vae/disentangle.py, pipeline/vae/scores.py)."),
          "", table]
    md += ["![rate-distortion](rate_distortion.png)", "", "![vs beta](vs_beta.png)", ""]
    if "traversals" in files:
        md += ["![traversals](traversals.png)", ""]
    md += notes
    files["markdown"] = out / "report.md"
    files["markdown"].write_text("\n".join(md) + "\n")
    mode = log_to_wandb(rows, {k: v for k, v in files.items() if v.suffix == ".png"}, table) if wandb_log else None
    return {"rows": rows, "files": files, "wandb": mode, "table": table}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: report/ beside the first run)")
    p.add_argument("--traverse", default=None, metavar="RUN_DIR", help="run for the traversal grids")
    p.add_argument("--no-traversals", action="store_true", help="skip the grids (no checkpoint or data needed)")
    args = p.parse_intermixed_args(argv)
    try:
        result = report(args.run_dirs, args.out, args.traverse, traversals=not args.no_traversals)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result["table"], end="")
    for name, path in result["files"].items():
        print(f"# {name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
