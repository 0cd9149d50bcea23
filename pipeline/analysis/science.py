"""Science check: a small dSprites beta sweep that must show the rate-distortion trade-off.

    python -m pipeline.science                                  # 4 betas, CPU, a few minutes
    python -m pipeline.science --betas 0.5 2 8 --steps 300 --out runs/science-quick

Prepares a seeded dSprites subset, trains one VAE per beta with pipeline.train (configs/dsprites_beta.yaml
shrunk: the MLP encoder/decoder, constant KL weight, short runs), evaluates each on the test split with
pipeline.evaluate (ELBO, IWAE with --iwae-samples, MIG against the 5 ground-truth factors), and writes
pipeline.report's figures and table to OUT/report. Then it checks what theory requires:
  * rate (KL) falls as beta grows           (strictly, in sweep order)
  * distortion (recon NLL) rises as beta grows (strictly)
  * IWAE bound >= ELBO for every run         (up to --slack nats of Monte-Carlo noise)
Prints the table (beta, rate, distortion, ELBO, IWAE, MIG) and PASS / FAIL; exits 1 on FAIL.
All numbers are nats per example on the test split, averaged over every test example.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_BETAS = (0.5, 2.0, 8.0, 32.0)
HELD_OUT = 0.05  # val and test fractions of the subset
# What differs from configs/dsprites_beta.yaml, and why: an MLP and short constant-beta runs, so a
# sweep fits in minutes on 2 CPU cores; the trade-off shows well before convergence.
SHRINK = [
    "model.arch=mlp", "model.hidden_dims=[512,128]", "model.latent_dim=6",  # 5 factors + 1 spare dim
    "objective.kl_schedule=constant", "optim.lr=1e-3", "data.batch_size=64", "data.shuffle_buffer=2000",
    "trainer.accelerator=cpu", "trainer.devices=1", "trainer.enable_progress_bar=false",
    "logger.images_every_n_steps=0", "checkpoint.save_best=false", "logger.wandb.mode=disabled",
]


def check(rows: Sequence[dict[str, float]], slack: float = 0.0) -> list[str]:
    """Violations of the expected trends in rows (dicts with beta, rate, distortion, elbo, iwae); [] = PASS."""
    rows = sorted(rows, key=lambda r: r["beta"])
    problems = []
    for a, b in itertools.pairwise(rows):
        if not b["rate"] < a["rate"]:
            problems.append(f"rate does not fall from beta {a['beta']:g} to {b['beta']:g}: {a['rate']:.3f} -> {b['rate']:.3f}")
        if not b["distortion"] > a["distortion"]:
            problems.append(f"distortion does not rise from beta {a['beta']:g} to {b['beta']:g}: "
                            f"{a['distortion']:.3f} -> {b['distortion']:.3f}")
    for r in rows:
        if r["iwae"] < r["elbo"] - slack:
            problems.append(f"beta {r['beta']:g}: IWAE {r['iwae']:.3f} below ELBO {r['elbo']:.3f}")
    return problems


def table(rows: Sequence[dict[str, float]]) -> str:
    head = "| beta | rate KL (nats) | distortion (nats) | ELBO (nats) | IWAE (nats) | MIG | active units |"
    lines = [head, "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["beta"]):
        mig = "-" if r.get("mig") is None else f"{r['mig']:.3f}"
        lines.append(f"| {r['beta']:g} | {r['rate']:.2f} | {r['distortion']:.2f} | {r['elbo']:.2f} | "
                     f"{r['iwae']:.2f} | {mig} | {r.get('active_units', '-')} |")
    return "\n".join(lines) + "\n"


def sweep(out: Path, betas: Sequence[float] = DEFAULT_BETAS, steps: int = 1500, limit: int = 40000,
          iwae_samples: int = 200, seed: int = 0, num_workers: int = 0, extra: Sequence[str] = (),
          progress: bool = True) -> list[dict[str, float]]:
    """Train and evaluate one run per beta under OUT; returns one row per run (see `table`)."""
    import torch

    from pipeline.analysis.evaluate import evaluate
    from pipeline.config import load_config
    from pipeline.data.prepare import prepare
    from pipeline.data.shards import MANIFEST
    from pipeline.training.train import train

    out = Path(out)
    data = out / "data"
    if not (data / MANIFEST).is_file():
        # A large training split: the low-beta runs overfit a small one, and the trade-off is one of the
        # training objective, so held-out distortion only follows it when the gap stays small.
        prepare("dsprites", data, limit=limit, seed=seed, val_fraction=HELD_OUT, test_fraction=HELD_OUT,
                progress=progress)
    repo = Path(__file__).resolve().parents[2]
    rows = []
    for beta in betas:
        run_dir = out / f"beta{beta:g}"
        overrides = [*SHRINK, f"objective.beta={beta}", f"trainer.max_steps={steps}", f"seed={seed}",
                     f"trainer.val_check_interval={steps}", f"checkpoint.every_n_steps={steps}",
                     f"data.num_workers={num_workers}", f"data.root={data}", f"run.dir={run_dir}",
                     f"run.name=science-beta{beta:g}", "resume=never", *extra]
        cfg = load_config([repo / "configs" / "dsprites_beta.yaml"], overrides)
        print(f"# science: training beta={beta:g} for {steps} steps -> {run_dir}", file=sys.stderr, flush=True)
        train(cfg)
        torch.manual_seed(seed)
        r = evaluate(run_dir, split="test", iwae_samples=iwae_samples, progress=progress, wandb_log=False)
        rows.append({"beta": float(beta), "rate": r["kl"], "distortion": r["recon"], "elbo": r["elbo"],
                     "iwae": r["iwae"], "mig": r["mig"], "active_units": r["active_units"],
                     "num_examples": r["num_examples"], "dir": str(run_dir)})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.science", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/science"))
    p.add_argument("--betas", type=float, nargs="+", default=list(DEFAULT_BETAS))
    p.add_argument("--steps", type=int, default=1500, help="training steps per run")
    p.add_argument("--limit", type=int, default=40000, help="dSprites subset size (90/5/5 train/val/test)")
    p.add_argument("--iwae-samples", type=int, default=200)
    p.add_argument("--slack", type=float, default=0.0, help="nats of noise allowed in IWAE >= ELBO")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-report", action="store_true", help="skip pipeline.report's figures")
    args = p.parse_args(argv)
    if len(args.betas) < 2:
        p.error("--betas needs at least two values")
    rows = sweep(args.out, args.betas, args.steps, args.limit, args.iwae_samples, args.seed)
    if not args.no_report:
        from pipeline.analysis.report import report

        report([r["dir"] for r in rows], out=args.out / "report", wandb_log=False)
    problems = check(rows, args.slack)
    print(f"# dSprites beta sweep: {args.steps} steps per run, test split ({rows[0]['num_examples']} examples), "
          f"IWAE with K={args.iwae_samples}; nats per example")
    print(table(rows), end="")
    for msg in problems:
        print(f"FAIL: {msg}")
    print("PASS: rate falls, distortion rises with beta; IWAE >= ELBO for every run" if not problems else
          f"FAIL ({len(problems)} problem(s))")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
