"""Write a dataset as WebDataset shards plus manifest.json.

    python -m pipeline.prepare digits --out data/digits                      # built in, no download
    python -m pipeline.prepare dsprites --out data/dsprites --limit 20000    # seeded subset of 737,280
    python -m pipeline.prepare mnist --source ~/mnist --out data/mnist       # four idx files (.gz or not)
    python -m pipeline.prepare npz --source x.npz --out data/x
    python -m pipeline.prepare images --source photos/ --size 64 --out data/photos --format png
    python -m pipeline.prepare index --source 'shards/{00000..00099}.tar' --out data/shards   # shards of other tools

Samples are shuffled with --seed before being cut into train/val/test and into shards, so shards are
i.i.d. and the reader's shard-level shuffle plus a modest buffer mix well. Same inputs and seed give
byte-identical output. Bad input exits with status 2 and a one-line message; nothing is written.
Image folders stream: --workers processes decode and resize, one bounded chunk of images at a time.
`index` writes a manifest for existing shards without copying them (see pipeline.data.index).

`ensure_prepared(cfg)` is the training-time entry point: it prepares the self-contained recipes
(digits, dsprites) into `cfg.root` once, under a file lock, when several ranks start together.
"""
from __future__ import annotations

import argparse
import fcntl
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from pipeline.config import DataConfig, ImageFormat, OnError, choices
from pipeline.data import index, recipes, shards
from pipeline.exit_codes import INTERRUPTED_EXIT

DEFAULT_SHARD_SIZE = 10_000  # samples; dSprites shards are then ~60 MB
AUTO_DSPRITES_LIMIT = 50_000  # subset `ensure_prepared` renders (~300 MB); prepare it yourself for more
CHUNK_BYTES = 64 << 20  # decoded images held at once while writing (at most 1024 of them)


class PrepareError(ValueError):
    """Bad arguments or input; the CLI prints it as one line and exits non-zero."""


def split_indices(n: int, val_fraction: float, test_fraction: Optional[float], seed: int,
                  fixed_test: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Shuffled source indices per split. `fixed_test` (an official test set) is used when
    `test_fraction` is None; otherwise test is drawn at random like val."""
    for name, f in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if f is not None and not 0.0 <= f < 1.0:
            raise PrepareError(f"{name} must be in [0, 1), got {f}")
    rng = np.random.default_rng(seed)
    if test_fraction is None and fixed_test is not None:
        test = rng.permutation(np.asarray(fixed_test))
        rest = rng.permutation(np.setdiff1d(np.arange(n), test))
    else:
        order = rng.permutation(n)
        n_test = int(round(n * (0.1 if test_fraction is None else test_fraction)))
        test, rest = order[:n_test], order[n_test:]
    n_val = int(round(n * val_fraction))
    splits = {"train": rest[n_val:], "val": rest[:n_val], "test": test}
    if len(splits["train"]) == 0:
        raise PrepareError(f"no training samples left: {n} samples, val {n_val}, test {len(test)}; "
                           "lower --val-fraction / --test-fraction")
    return {k: v for k, v in splits.items() if len(v)}


def prepare(dataset: str, out: Path, *, source: Optional[str] = None, shard_size: int = DEFAULT_SHARD_SIZE,
            val_fraction: float = 0.1, test_fraction: Optional[float] = None, seed: int = 0,
            limit: Optional[int] = None, size: Optional[int] = None, progress: bool = True, workers: int = 1,
            fmt: str = "npy", quality: int = 95) -> dict:
    """Build the recipe (all input checks first), split, write shards then the manifest; returns it.
    `workers` processes decode image folders; images are stored as `fmt` (npy, png, jpg at `quality`)."""
    out = Path(out)
    if shard_size <= 0:
        raise PrepareError(f"--shard-size must be positive, got {shard_size}")
    if workers <= 0:
        raise PrepareError(f"--workers must be positive, got {workers}")
    if fmt not in choices(ImageFormat):
        raise PrepareError(f"--format must be one of {', '.join(choices(ImageFormat))}, got {fmt!r}")
    if not 1 <= quality <= 100:
        raise PrepareError(f"--quality must be in 1..100, got {quality}")
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out}: --out exists and is not a directory")
    try:
        recipe = recipes.build(dataset, source=source, limit=limit, size=size, seed=seed, workers=workers,
                               progress=progress)
    except recipes.RecipeError as e:
        raise PrepareError(str(e)) from None
    try:
        if fmt != "npy" and recipe.shape[0] not in (1, 3):
            raise PrepareError(f"--format {fmt} stores 1 or 3 channels; {recipe.source} has {recipe.shape[0]}")
        splits = split_indices(recipe.n, val_fraction, test_fraction, seed, recipe.test_indices)
        meta = {"dataset": recipe.name, "seed": seed, "num_samples": recipe.n, **recipe.meta}
        chunk = max(1, min(1024, CHUNK_BYTES // int(np.prod(recipe.shape))))
        return shards.write_dataset(out, recipe.fetch, splits, shard_size=shard_size, shape=recipe.shape,
                                    source=recipe.source, key_fn=recipe.key, meta=meta, progress=progress,
                                    chunk=chunk, fmt=fmt, quality=quality,
                                    unit="img" if dataset == "images" else "sample")
    except recipes.RecipeError as e:  # a file whose pixels fail to decode, met while writing
        raise PrepareError(f"{e}; no manifest was written, {out} holds no dataset now") from None
    except shards.WriterBusyError as e:
        raise PrepareError(str(e)) from None
    finally:
        recipe.close()


def index_source(source: Optional[str], out: Path, *, split: str = "train", workers: int = 1,
                 image_keys: Sequence[str] = index.ImageSpec.image_keys, on_error: str = "raise",
                 progress: bool = True) -> dict:
    """`prepare index`: the manifest of existing shards (a directory, brace pattern or URL) at OUT."""
    from pipeline.data.sources import DataSetupError, shard_urls

    if not source:
        raise PrepareError("index needs --source: a directory of .tar shards, a brace pattern or a URL")
    if split not in shards.SPLITS:
        raise PrepareError(f"--split must be one of {', '.join(shards.SPLITS)}, got {split!r}")
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out}: --out exists and is not a directory")
    try:
        urls = shard_urls(source, split)
        return index.index_shards(urls, out, split=split, source=source, image_keys=image_keys,
                                  workers=workers, on_error=on_error, progress=progress,
                                  log=lambda m: print(m, file=sys.stderr))
    except (DataSetupError, index.IndexingError) as e:
        raise PrepareError(str(e)) from None


DEFAULT_DATASET = "digits"  # what `python -m pipeline.train` trains on with no data settings at all


def ensure_prepared(cfg) -> Path:
    """Path of the manifest for `cfg` (a DataConfig), preparing `cfg.dataset` into `cfg.root` first
    when `cfg.train` is None and `<root>/manifest.json` is missing. With no data.dataset, only the
    default dataset at the default root is prepared: anything else is a PrepareError naming the root.

    Only self-contained recipes (digits; dsprites limited to AUTO_DSPRITES_LIMIT samples) are prepared
    here. Safe when every rank calls it: one takes an fcntl lock at `<root>/.prepare.lock` and writes,
    the others block on the lock and then find the manifest.
    """
    root = Path(cfg.root)
    manifest = root / shards.MANIFEST
    if cfg.train is not None or manifest.is_file():
        return manifest
    dataset = cfg.dataset
    if dataset is None:  # only the built-in default, at its own root: a mistyped data.root is an error
        if root.resolve() != Path(DataConfig.root).resolve():
            raise PrepareError(
                f"data.root={cfg.root}: {manifest} does not exist. Point data.root at prepared shards, prepare "
                f"them (`python -m pipeline.prepare RECIPE --out {root}`), or set data.dataset=digits|dsprites "
                "to prepare that recipe there on first use")
        dataset = DEFAULT_DATASET
    if dataset not in recipes.SELF_CONTAINED:
        raise PrepareError(f"{manifest} is missing and dataset {dataset!r} needs a source: run "
                           f"`python -m pipeline.prepare {dataset} --source ... --out {root}`")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        if not manifest.is_file():  # a rank that waited finds it written
            limit = AUTO_DSPRITES_LIMIT if dataset == "dsprites" else None
            prepare(dataset, root, seed=cfg.seed or 0, limit=limit)
    return manifest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vae-prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help=f"recipe: {', '.join(recipes.RECIPES)}; or index (existing shards)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--source", help="input directory or file (mnist, npz, images); index: shard directory, "
                                    "brace pattern or URL (pipe:, http(s))")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=None,
                   help="default 0.1, or the official test set where there is one (mnist)")
    p.add_argument("--seed", type=int, default=0, help="split, shuffle and subset seed")
    p.add_argument("--limit", type=int, help="keep a seeded subset of this many samples")
    p.add_argument("--size", type=int, help="images: resize and centre-crop to SIZE x SIZE")
    p.add_argument("--format", dest="fmt", default="npy", choices=choices(ImageFormat),
                   help="how shards store images: npy (default: no decoding cost), png (lossless, smaller), jpg")
    p.add_argument("--quality", type=int, default=95, help="jpg quality, 1..100 (default 95)")
    p.add_argument("--workers", type=int, default=index.default_workers(),
                   help="processes decoding images (images) or reading shards (index); default: all cores")
    p.add_argument("--split", default="train", help="index: the split these shards are (train, val, test)")
    p.add_argument("--image-keys", default=",".join(index.ImageSpec.image_keys),
                   help="index: image members to look for, first present wins (as data.image_keys)")
    p.add_argument("--on-error", default="raise", choices=choices(OnError),
                   help="index: a sample without a readable image stops (raise) or is counted (warn)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.dataset == "index":
            manifest = index_source(args.source, args.out, split=args.split, workers=args.workers,
                                    image_keys=[k.strip().lower() for k in args.image_keys.split(",") if k.strip()],
                                    on_error=args.on_error, progress=not args.no_progress)
            print(f"{args.out / shards.MANIFEST}: {index.summary(manifest, args.split)}")
            return 0
        manifest = prepare(args.dataset, args.out, source=args.source, shard_size=args.shard_size,
                           val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                           seed=args.seed, limit=args.limit, size=args.size, progress=not args.no_progress,
                           workers=args.workers, fmt=args.fmt, quality=args.quality)
    except (PrepareError, shards.ShardFormatError) as e:
        print(f"vae-prepare: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions: still one line, still nothing half-written
        print(f"vae-prepare: error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the workers ignore Ctrl-C (workers.py): this is the one message
        print(f"vae-prepare: interrupted; run the same command again to finish {args.out}", file=sys.stderr)
        return INTERRUPTED_EXIT
    counts = ", ".join(f"{k} {v['total']} in {len(v['shards'])} shards" for k, v in manifest["splits"].items())
    print(f"{args.out / shards.MANIFEST}: {manifest['dataset']} {tuple(manifest['shape'])} uint8: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
