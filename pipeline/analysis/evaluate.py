"""Evaluate a trained VAE checkpoint on a whole data split: ELBO, IWAE log-likelihood bound, MIG.

    python -m pipeline.evaluate runs/dsprites-beta4                       # its checkpoints/last.ckpt, test split
    python -m pipeline.evaluate runs/x/checkpoints/best-step0004000.ckpt --split val --iwae-samples 1000
    python -m pipeline.evaluate runs/x --batch-size 256 data.root=/scratch/dsprites   # data moved

RUN_DIR_OR_CKPT is a run directory (meaning RUN_DIR/checkpoints/last.ckpt) or a .ckpt file. The config
is RUN_DIR/config.yaml when the checkpoint sits in RUN_DIR/checkpoints/; further `*.yaml` files and
`key=value` overrides apply on top (as for pipeline.train), e.g. to point `data.root` elsewhere.

Reported, in nats per example (summed over pixels and latent dims), averaged over every example of the
split, each counted exactly once:
  elbo, recon, kl      one z ~ q(z|x) per example (the true beta = 1 ELBO, whatever beta trained it)
  iwae                 IWAE bound on log p(x) with K = --iwae-samples importance samples (Burda et al.
                       2016), decoded in chunks so K = 5000 fits in memory; >= elbo in expectation.
                       Cost is K decoder passes per example: on 2 CPU cores K = 5000 takes ~0.03 s per
                       digits example but ~11 s per dSprites conv example (peak ~7 GB at the default
                       chunk) -- use a GPU, --iwae-samples 100 or --chunk-size there
  bits_per_dim_{elbo,iwae}   -bound / (C*H*W ln 2)
  active_units         latent dims with Var_x(E_q[z_d|x]) > 0.01 (Burda et al. 2016; pipeline.vae.metrics.active_units)
  kl_per_dim           [D] mean KL of each latent dim
  mig, mig_per_factor  Mutual Information Gap of the mean codes against the ground-truth factors
                       (dSprites), when the data has them; estimator in pipeline/vae/disentangle.py
  dci_disentanglement, dci_completeness, dci_informativeness, factor_vae_score, sap
                       the other disentanglement scores of the same codes, beside MIG (estimators in
                       pipeline/vae/scores.py); all from the mean codes of the evaluated weights
Written to eval.json next to the checkpoint (replacing an earlier one), printed as a table, and added
to the run's W&B summary under `eval/<split>/...` (resuming the run id in RUN_DIR/wandb_run_id.txt)
when W&B is enabled in the config (pipeline.run.tracking.resolve_wandb_mode).

Runs in a single process on one device (--device, default cuda when available), reading the split's
shards in order with no shuffling, padding or dropping: every example is counted exactly once and the
count is checked against the manifest. A missing or incompatible checkpoint exits with status 2 and a
one-line message naming the file.
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.run.files import SPLITS, write_json_atomic
from pipeline.vae import objectives
from pipeline.vae.disentangle import mig


class EvalError(Exception):
    """A problem the CLI reports as one line (exit 2): missing or incompatible checkpoint or data."""


# ------------------------------------------------------------------------------------- the inputs
def resolve_checkpoint(target: str | os.PathLike) -> tuple[Path, Path | None]:
    """RUN_DIR or .ckpt -> (checkpoint path, run dir or None). A checkpoint in RUN_DIR/checkpoints/
    belongs to RUN_DIR."""
    path = Path(target)
    ckpt = path if path.is_file() or path.suffix == ".ckpt" else path / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise EvalError(f"checkpoint not found: {ckpt}")
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    return ckpt, run_dir


def use_device(dev: torch.device) -> torch.device:
    """`--device cuda:N` also makes GPU N the current device, so kernels, the caching allocator and any
    tensor made on plain "cuda" go there, not to GPU 0."""
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    return dev


def load_module(ckpt: Path, device: torch.device):
    """(VAEModule in eval mode on `device`, the checkpoint's global step), through training's loader
    (VAEModule.from_checkpoint); EvalError naming the file when it cannot be loaded."""
    from pipeline.run.checkpointing import CheckpointError
    from pipeline.training.module import VAEModule

    try:
        module, state = VAEModule.from_checkpoint(ckpt)
    except CheckpointError as e:
        raise EvalError(str(e)) from None
    return module.eval().to(device), int(state.get("global_step", -1))


def load_eval_config(run_dir: Path | None, ckpt: Path, files: Sequence[str] = (), overrides: Sequence[str] = ()):
    """The run's config (RUN_DIR/config.yaml) <- extra YAML files <- overrides. The checkpoint's own
    hyperparameters hold the model but not the data section, so without config.yaml the data must come
    from the files / overrides given (e.g. `data.root=...`)."""
    from pipeline.config import ConfigError, load_config

    cfg_files = [str(run_dir / "config.yaml")] if run_dir is not None and (run_dir / "config.yaml").is_file() else []
    if not cfg_files and not files and not any(o.startswith("data.") for o in overrides):
        raise EvalError(f"no config.yaml beside {ckpt} (expected in its RUN_DIR): give a config file or "
                        "data.* overrides saying which data to evaluate on")
    try:
        return load_config(cfg_files + list(files), list(overrides))
    except ConfigError as e:
        raise EvalError(str(e)) from None


# ------------------------------------------------------------------------------------- the math
def summarize(sums, num_dims: int, factor_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Means per example (nats), bits/dim, active units, KL per dim and MIG from the running sums (the
    pipeline.vae.metrics.ExactSums that `evaluate_batches` returns)."""
    from pipeline.vae.metrics import active_units

    mean = sums.means()
    if mean is None:
        raise EvalError("the split has no examples")
    out: dict[str, Any] = {
        "num_examples": mean["count"],
        **{k: mean[k].item() for k in ("elbo", "iwae", "recon", "kl")},
        "bits_per_dim_elbo": float(objectives.bits_per_dim(-mean["elbo"], num_dims)),
        "bits_per_dim_iwae": float(objectives.bits_per_dim(-mean["iwae"], num_dims)),
        "active_units": active_units(mean["mu_variance"]),
        "kl_per_dim": mean["kl_dim"].tolist(),
        "mu_variance_per_dim": mean["mu_variance"].tolist(),
        "mig": None, "mig_per_factor": None, "factor_names": None,
        **dict.fromkeys(DISENTANGLEMENT_SCORES),
    }
    if "codes" in mean and len(out["kl_per_dim"]) >= 2:
        result = mig(mean["codes"].cpu().numpy(), mean["factors"].cpu().numpy())
        f = len(result["per_factor"])
        names = list(factor_names) if factor_names and len(factor_names) == f else [f"factor_{i}" for i in range(f)]
        out.update(mig=result["mig"], factor_names=names, mig_bins=result["bins"],
                   mig_per_factor=[None if math.isnan(v) else v for v in result["per_factor"]])
        out.update(disentanglement_scores(mean["codes"].cpu().numpy(), mean["factors"].cpu().numpy()))
    return out


DISENTANGLEMENT_SCORES = ("dci_disentanglement", "dci_completeness", "dci_informativeness", "factor_vae_score", "sap")


def disentanglement_scores(codes, factors, max_examples: int = 10000, seed: int = 0) -> dict[str, float]:
    """DCI, FactorVAE score and SAP of mean codes [N, D] (pipeline/vae/scores.py), on at most
    `max_examples` examples (a seeded subset: the tree classifiers of DCI grow with N)."""
    import numpy as np

    from pipeline.vae.scores import dci, factor_vae_score, sap

    if len(codes) > max_examples:
        keep = np.sort(np.random.default_rng(seed).choice(len(codes), max_examples, replace=False))
        codes, factors = codes[keep], factors[keep]
    d = dci(codes, factors, seed=seed)
    return {"dci_disentanglement": d["disentanglement"], "dci_completeness": d["completeness"],
            "dci_informativeness": d["informativeness"], "factor_vae_score": factor_vae_score(codes, factors)["score"],
            "sap": sap(codes, factors)["score"]}


@torch.no_grad()
def evaluate_batches(module, batches: Iterable[dict[str, Any]], iwae_samples: int, chunk_size: int | None = None,
                     total: int | None = None, progress: bool = True):
    """Evaluate `module` (a VAEModule) over dict batches (uint8 `image` [B, C, H, W], optional `factors`
    [B, F]). Each batch is converted to float once (binarised as in training), and the same x feeds the
    ELBO and the IWAE bound (VAEModule.evaluation_terms, as in validation). Returns the running sums, an
    ExactSums metric keeping the mean codes for MIG (see `summarize`)."""
    from pipeline.progress import progress_bar
    from pipeline.vae.metrics import ExactSums

    module.eval()
    device = module.device
    sums = ExactSums(module.vae.latent_dim, keep_codes=True).to(device)
    bar = progress_bar(total=total, unit="img", desc=f"evaluate (K={iwae_samples})", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    with bar:
        for batch in batches:
            image = batch["image"].to(device, non_blocking=True)
            if image.dtype != torch.uint8 or tuple(image.shape[1:]) != tuple(module.input_shape):
                raise EvalError(f"data gives {image.dtype} images of shape {tuple(image.shape[1:])}, the model "
                                f"expects uint8 {tuple(module.input_shape)}")
            terms, iwae = module.evaluation_terms(module.to_float(image), iwae_samples, chunk_size)
            sums.update(terms, iwae, batch.get("factors"))
            bar.update(image.shape[0])
    return sums


# ------------------------------------------------------------------------------------- the data
def split_batches(data_cfg, split: str, batch_size: int) -> tuple[Iterable[dict[str, Any]], int | None, dict]:
    """(the split's batches, every example exactly once: ShardDataModule's unshuffled evaluation
    loader at world size 1; the split's example count from its manifest, or None; the manifest's
    metadata, e.g. factor names)."""
    from pipeline.data.datamodule import DataSetupError, ShardDataModule
    from pipeline.data.shards import MANIFEST, ShardFormatError, load_manifest

    cfg = data_cfg.copy()
    cfg.batch_size = batch_size
    dm = ShardDataModule(cfg)
    try:
        src = dm.source(split)
        if src is None:
            raise EvalError(f"no {split!r} split in {getattr(cfg, split) or Path(cfg.root) / MANIFEST}")
        loader = dm.loader(split, train=False)  # the val/test reader (no shuffle, exact), for any split
    except (DataSetupError, ShardFormatError, ValueError, OSError) as e:
        raise EvalError(f"cannot read the {split} data: {e}") from None
    meta: dict = {}
    manifest = Path(src.urls[0]).parent / MANIFEST
    if manifest.is_file():
        meta = {k: v for k, v in load_manifest(manifest).items() if k != "splits"}
    return loader, src.total, meta


# ------------------------------------------------------------------------------------- the outputs
def format_table(r: dict[str, Any]) -> str:
    lines = [f"{'metric':<22}{'value':>14}", "-" * 36]
    for key, unit in (("elbo", "nats"), ("iwae", "nats"), ("recon", "nats"), ("kl", "nats"),
                      ("bits_per_dim_elbo", "bits"), ("bits_per_dim_iwae", "bits"), ("active_units", ""),
                      ("mig", ""), *((k, "") for k in DISENTANGLEMENT_SCORES), ("num_examples", "")):
        v = r.get(key)
        if v is None:
            continue
        lines.append(f"{key:<22}{v:>14.4f} {unit}" if isinstance(v, float) else f"{key:<22}{v:>14} {unit}")
    lines.append("kl_per_dim (nats)     " + " ".join(f"{v:.2f}" for v in r["kl_per_dim"]))
    if r.get("mig_per_factor"):
        lines.append("mig_per_factor        " + " ".join(
            f"{n}={'-' if v is None else f'{v:.3f}'}" for n, v in zip(r["factor_names"], r["mig_per_factor"])))
    return "\n".join(lines)


def log_to_wandb(cfg, run_dir: Path | None, results: dict[str, Any]) -> str:
    """Add the scalar results to the run's W&B summary (same run id, same mode); returns what happened."""
    from pipeline.run.tracking import WANDB_ID_FILE, read_wandb_run_id, resolve_wandb_mode

    mode = resolve_wandb_mode(cfg.logger.wandb.mode)
    if mode == "disabled":
        return "disabled"
    if run_dir is None or not (run_dir / WANDB_ID_FILE).is_file():
        return f"skipped (no {WANDB_ID_FILE} in the run dir)"
    import wandb

    w = cfg.logger.wandb
    run = wandb.init(id=read_wandb_run_id(run_dir), resume="allow", project=w.project,
                     entity=w.entity, group=w.group, dir=str(run_dir), mode=mode)
    prefix = f"eval/{results['split']}"
    summary = {f"{prefix}/{k}": v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for i, v in enumerate(results["kl_per_dim"]):
        summary[f"{prefix}/kl_dim_{i}"] = v
    for name, v in zip(results.get("factor_names") or [], results.get("mig_per_factor") or []):
        if v is not None:
            summary[f"{prefix}/mig_{name}"] = v
    run.summary.update(summary)
    run.finish()
    return mode


def evaluate(target: str | os.PathLike, split: str = "test", iwae_samples: int = 5000, batch_size: int | None = None,
             files: Sequence[str] = (), overrides: Sequence[str] = (), device: str | None = None,
             chunk_size: int | None = None, progress: bool = True, wandb_log: bool = True) -> dict[str, Any]:
    """Evaluate a run dir or checkpoint; writes eval.json next to the checkpoint and returns its contents."""
    if split not in SPLITS:
        raise EvalError(f"unknown split {split!r}; expected one of {SPLITS}")
    if iwae_samples < 1:
        raise EvalError(f"--iwae-samples must be >= 1, got {iwae_samples}")
    ckpt, run_dir = resolve_checkpoint(target)
    dev = use_device(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    module, step = load_module(ckpt, dev)
    cfg = load_eval_config(run_dir, ckpt, files, overrides)
    torch.manual_seed(cfg.seed)  # the sampled z's: rerunning gives the same numbers
    batches, expected, meta = split_batches(cfg.data, split, batch_size or cfg.data.batch_size)
    started = time.time()
    from pipeline.data.shards import ShardFormatError

    try:
        sums = evaluate_batches(module, batches, iwae_samples, chunk_size, total=expected, progress=progress)
    except ShardFormatError as e:  # a corrupt shard met mid-way (data.on_error=raise)
        raise EvalError(f"cannot read the {split} data: {e}") from None
    count = int(sums.count.item())
    if expected is not None and count != expected:
        raise EvalError(f"read {count} examples of split {split!r} but the manifest says {expected}")
    factor_names = (meta.get("factors") or {}).get("names") if isinstance(meta.get("factors"), dict) else None
    results = summarize(sums, module.num_dims, factor_names)
    results.update(checkpoint=str(ckpt), global_step=step, split=split, iwae_samples=iwae_samples,
                   beta=float(cfg.objective.beta), latent_dim=int(module.vae.latent_dim),
                   seconds=round(time.time() - started, 2), units="nats per example",
                   mig_estimator="pipeline.vae.disentangle.mig: mean codes, 20 equal-width bins per dim")
    write_json_atomic(ckpt.parent / "eval.json", results)
    results["wandb"] = log_to_wandb(cfg, run_dir, results) if wandb_log else "not requested"
    return results


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("target", metavar="RUN_DIR_OR_CKPT")
    p.add_argument("config", nargs="*", metavar="CONFIG.yaml|key=value", help="extra config files / overrides")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--iwae-samples", type=int, default=5000, metavar="K")
    p.add_argument("--batch-size", type=int, default=None, metavar="B", help="default: data.batch_size")
    p.add_argument("--chunk-size", type=int, default=None, metavar="S",
                   help="IWAE samples decoded at once per example (default: ~2^24 decoded values per chunk); "
                        "lower it if memory runs out: conv decoders hold far more in activations than in outputs")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_intermixed_args(argv)  # overrides may come after the options too
    try:
        from pipeline.config import ConfigError
        from pipeline.launch.cli import split_argv

        try:
            files, overrides = split_argv(args.config)
        except ConfigError as e:
            raise EvalError(str(e)) from None
        for flag, value in (("--batch-size", args.batch_size), ("--chunk-size", args.chunk_size)):
            if value is not None and value < 1:
                raise EvalError(f"{flag} must be >= 1, got {value}")
        r = evaluate(args.target, args.split, args.iwae_samples, args.batch_size, files, overrides,
                     device=args.device, chunk_size=args.chunk_size, progress=not args.no_progress)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# {r['checkpoint']} (step {r['global_step']}), split {r['split']}, K={r['iwae_samples']}: "
          f"nats per example")
    print(format_table(r))
    print(f"# wrote {Path(r['checkpoint']).parent / 'eval.json'}; wandb: {r['wandb']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
