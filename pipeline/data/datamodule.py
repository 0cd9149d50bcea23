"""ShardDataModule: the Lightning DataModule of a DataConfig: sources, set-up checks, one loader per split.

    dm = ShardDataModule(cfg.data)       # cfg.data: DataConfig; dm.input_shape -> (C, H, W) right away
    trainer.fit(model, datamodule=dm)    # setup() takes world size and rank from the trainer

Batches are built inside the loader workers (pipeline.data.stream); the running count of unreadable samples
(data.on_error=warn) is `skipped_samples`, logged by callbacks.DataErrorCounter. Loader speed:
`python -m pipeline.bench loader --root data/dsprites`.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from pipeline.data import autoindex, layout, shards
from pipeline.data.decode import ImageSpec, SampleError
from pipeline.data.loader import ShardLoader, with_order_keys
from pipeline.data.sources import (
    DataSetupError,
    SplitSource,
    first_sample,
    resolve_source,
)
from pipeline.data.stream import ShardStream, SplitCache, StreamSpec
from pipeline.training.lightning_compat import shutdown_loader_workers

log = logging.getLogger(__name__)
AUTO_CACHE_BYTES = 512 << 20  # data.cache=auto holds decoded training splits up to this size (uint8 images)
ANNOUNCE_FILL_BYTES = 128 << 20  # a fill this large takes seconds (~115 MB/s measured, npy shards): say so
# Left free beside a device cache: the model, its optimizer state, activations and the allocator's slack (a VAE
# of this size takes far less; labels and factors, 8 + 4F bytes per row next to the images, fit in it too).
DEVICE_CACHE_HEADROOM = 2 << 30


def pin_batches(pin_memory: bool, device: torch.device | None) -> bool:
    """Whether host batches are page-locked: data.pin_memory, for a run on a CUDA device. Decided from the
    device the run trains on, not from torch.cuda.is_available(): a CPU run on a GPU machine would otherwise
    open a CUDA context on GPU 0 in every rank (pinning needs one)."""
    return bool(pin_memory) and device is not None and torch.device(device).type == "cuda"


def device_cache_fits(needed: int, free: int, headroom: int = DEVICE_CACHE_HEADROOM) -> bool:
    """Whether a device cache of `needed` bytes leaves `headroom` of the device's `free` bytes to training."""
    return needed + headroom <= free


def free_device_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device, as the driver counts it (opens the context the run uses anyway)."""
    return torch.cuda.mem_get_info(device)[0]


def room_on_device(device: torch.device, needed: int, origin: str) -> bool:
    """Whether this rank's GPU has room for a cache of `needed` bytes, asked before the fill; if not, one line
    saying why, on every rank that streams (GPUs may differ; a streaming rank serves the same batches)."""
    free = free_device_bytes(device)
    if device_cache_fits(needed, free):
        return True
    log.warning("warning: data.cache=device: %s needs %.2f GiB of %s memory and %.2f GiB is free (%.0f GiB kept "
                "for training): streaming it instead", origin, needed / 2**30, device, free / 2**30,
                DEVICE_CACHE_HEADROOM / 2**30)
    return False


class ShardDataModule(pl.LightningDataModule):
    """Train/val/test loaders over WebDataset shards, configured by a DataConfig.

    With `cfg.train` None and no `<cfg.root>/manifest.json`, the first access to the manifest prepares
    `cfg.dataset` (digits or dsprites only) under a file lock: see `pipeline.data.prepare.ensure_prepared`.
    With `cfg.train` set, val/test default to the same source's splits (or none), never data.root's.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self._sources: dict[str, SplitSource | None] = {}
        self._loaders: list[ShardLoader] = []
        self.world_size, self.rank = 1, 0
        self.steps_per_epoch: int | None = None
        # the training batch: per rank, over all ranks, the canonical partitions (layout.Canon), and why
        self.batch_size, self.global_batch, self.parts = cfg.batch_size, None, None
        self.batch_origin = "data.batch_size x 1 ranks"
        self.resumed: dict | None = None  # the checkpoint's loader state (continue_order)
        self.seed = 0 if cfg.seed is None else int(cfg.seed)
        try:
            self.spec = ImageSpec.from_config(cfg)
        except ValueError as e:
            raise DataSetupError(str(e)) from None
        self._shapes: dict[str, tuple[int, int, int]] = {}
        self._cache: SplitCache | None = None  # data.cache: the decoded training split, filled once
        self._room: bool | None = None  # data.cache=device: whether the GPU had room for it, asked once
        self._prepared = False  # prepare_data ran (data.root holds its manifest)

    # ---- sources
    def source(self, split: str) -> SplitSource | None:
        if split not in self._sources:
            self._sources[split] = self._resolve(split)
        return self._sources[split]

    def _resolve(self, split: str) -> SplitSource | None:
        spec, root_manifest = getattr(self.cfg, split), Path(self.cfg.root) / shards.MANIFEST
        if spec is None and self.cfg.train is not None and split != "train":
            return self._sibling_split(split)
        if spec is None:  # nothing given: data.root's manifest, the default dataset prepared on first use
            from pipeline.data.prepare import PrepareError
            try:
                self.prepare_data()
            except PrepareError as e:
                raise DataSetupError(str(e)) from None
            if not root_manifest.is_file():
                raise DataSetupError(f"data.{split} is not set and {root_manifest} does not exist: set "
                                     f"data.{split} or prepare data.root")
        return self._located(spec, split)

    def _located(self, spec: str | None, split: str) -> SplitSource | None:
        """resolve_source; local shards without a manifest are indexed (cached: pipeline.data.autoindex)
        unless data.steps_per_epoch is set, which streams them as before, with no scan."""
        try:
            src = resolve_source(spec, split, self.cfg.root)
        except shards.ShardFormatError as e:
            raise DataSetupError(str(e)) from None
        if self.cfg.steps_per_epoch is None and autoindex.can_index(src):
            src = autoindex.indexed(src, self.spec.image_keys, self.cfg.on_error)
        return src

    def _sibling_split(self, split: str) -> SplitSource | None:
        """data.train given, data.<split> not: the same source's split (its manifest's, or `<split>-*.tar`
        beside train's shards in its directory), or no such split. Never data.root's: validating on
        another dataset than the one trained on would be silently wrong."""
        train = self.cfg.train
        directory = Path(train)
        has_split = (train.endswith(".json") or (directory / shards.MANIFEST).is_file()
                     or (directory.is_dir() and any(directory.glob(f"{split}-*.tar"))))
        source = None
        if has_split:
            source = self._located(train, split)
        if source is None:
            log.info("data.%s not set and %s has no %s split: no %s split", split, train, split, split)
        return source

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the training batches: the model's input shape."""
        if self.source("train") is None:
            raise DataSetupError(f"no train split in {self.cfg.train or self.cfg.root}")
        return self.split_shape("train")

    def split_shape(self, split: str) -> tuple[int, int, int]:
        """(C, H, W) of `split`'s images after conversion: data.channels and data.image_size where set (both
        set: no data is read), the rest from the manifest, else from the split's first sample."""
        if split in self._shapes:
            return self._shapes[split]
        src, spec = self.source(split), self.spec
        shape = spec.fixed_shape
        if src.members is not None and not set(spec.image_keys) & set(src.members):  # an index saw them
            raise DataSetupError(f"{src.origin}: its samples have members {', '.join(src.members)} and none of "
                                 f"data.image_keys [{', '.join(spec.image_keys)}]; add the image member to them")
        if shape is None and src.shapes:
            seen = sorted({spec.target(s) for s in src.shapes})
            if len(seen) > 1:
                shown = ", ".join("x".join(map(str, s)) for s in seen[:4])
                raise DataSetupError(f"{src.origin}: images come in {len(seen)} shapes after conversion ({shown}"
                                     f"{', ...' if len(seen) > 4 else ''}); set data.image_size (and data.channels) "
                                     "to bring them to one")
            shape = seen[0]
        if shape is None and src.shape is not None:
            shape = spec.target(src.shape)
        if shape is None:  # no manifest: decode the first sample
            raw = first_sample(src, self.cfg.read_timeout)
            try:
                shape = tuple(spec.decode(raw)[0].shape)
            except (SampleError, ValueError) as e:
                raise DataSetupError(f"{src.urls[0]}: sample {raw['__key__']!r}: {e}") from None
        self._shapes[split] = tuple(int(d) for d in shape)
        return self._shapes[split]

    def prepare_data(self) -> None:
        """data.dataset prepared into data.root when nothing is there yet (`ensure_prepared`), once per
        datamodule: the training entry point calls it first, Lightning calls it again, and a datamodule used
        alone (bench, evaluate) has it done by the first source that needs it."""
        if self.cfg.train is None and not self._prepared:
            from pipeline.data.prepare import ensure_prepared
            ensure_prepared(self.cfg)
            self._prepared = True

    # ---- set-up
    def setup(self, stage: str | None = None) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            self.world_size, self.rank = trainer.world_size, trainer.global_rank
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            self.world_size, self.rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        # our __len__ is exact by construction; Lightning warns about any IterableDataset with one
        warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
        if stage in (None, "fit"):
            self.steps_per_epoch = self._check_train()
        if stage in (None, "fit", "validate"):
            self._check_eval("val", against_train=stage in (None, "fit"))
        if stage in (None, "test"):
            self._check_eval("test")

    def preflight(self, world_size: int) -> None:
        """`setup("fit")`'s checks for `world_size` ranks, before the Trainer (and W&B) start: a run that cannot
        train fails with nothing else begun. Lightning's own set-up checks again with the real world size."""
        saved = self.world_size
        self.world_size = world_size
        try:
            self._check_train()
            self._check_eval("val", against_train=True)
        finally:
            self.world_size = saved

    def continue_order(self, state: dict | None) -> None:
        """A resumed run: the loader state its checkpoint holds (ShardLoader.state_dict), whose global batch
        and canonical partitions this run keeps whatever its world size (elastic resume)."""
        self.resumed = with_order_keys(state) if state else None

    def _choose_batch(self, src: SplitSource) -> None:
        """The global batch G and canonical partitions P of the training order, and this rank's batch G / R.

        G: data.global_batch_size when set; else, resuming on another world size, the checkpoint's (kept: the
        effective batch never changes behind the user's back); else data.batch_size x world size. P: the
        checkpoint's when it continues that order, else the world size. A world size that cannot read the
        order (R must divide G, and divide or be divided by P) is refused naming the sizes that work."""
        R, cfg, old = self.world_size, self.cfg, self.resumed
        old_G, old_P = (old.get("global_batch"), old.get("parts")) if old else (None, None)
        if cfg.global_batch_size is not None:
            G, origin = int(cfg.global_batch_size), "data.global_batch_size"
        elif old_G and old.get("world_size") != R:
            G, origin = int(old_G), f"kept from the checkpoint ({old.get('world_size')} ranks x {old.get('batch_size')})"
        else:
            G, origin = cfg.batch_size * R, f"data.batch_size x {R} ranks"
        P = int(old_P) if old_G == G and old_P else R
        if src.counts is None:
            P = R  # a streamed split's order depends on the world size anyway
        if P != R and not layout.world_fits(R, P, G):
            works = ", ".join(map(str, layout.fitting_worlds(P, G)))
            raise DataSetupError(f"{R} ranks cannot read the run's training order ({P} canonical partitions, its first "
                                 f"start's world size, and a global batch of {G}, {origin}): it splits exactly over "
                                 f"{works} ranks; resume on one of those (or train a new run: run.name=<new name>)")
        if G % R:
            works = ", ".join(map(str, layout.fitting_worlds(1, G)))
            raise DataSetupError(f"a global batch of {G} ({origin}) does not split evenly over {R} ranks: set "
                                 f"data.global_batch_size to a multiple of {R}, or run on {works} ranks")
        self.batch_size, self.global_batch, self.parts, self.batch_origin = G // R, G, P, origin

    def batch_text(self) -> str:
        """The training batch as the start-up summary says it."""
        if self.global_batch in (None, self.batch_size) and self.batch_origin.startswith("data.batch_size"):
            return f"batch {self.batch_size} per device"
        return f"batch {self.batch_size} per device, {self.global_batch} per step ({self.batch_origin})"

    def _check_train(self) -> int:
        src, R = self.source("train"), self.world_size
        if src is None:
            raise DataSetupError(f"no train split in {self.cfg.train or self.cfg.root}")
        self._choose_batch(src)
        B = self.batch_size
        if src.counts is None:
            if self.cfg.steps_per_epoch is None:
                raise DataSetupError(
                    f"{src.origin}: sample counts unknown (no manifest.json, and pipe: / http(s) shards are not "
                    "indexed at start), so the equal per-rank batch count cannot be computed: set "
                    "data.steps_per_epoch (batches per rank per epoch), or for http(s) shards write their "
                    "manifest once with `python -m pipeline.prepare index` and train on it")
            if len(src.urls) < R * self._lanes():
                log.info("%s: %d shards for %d ranks x %d workers: reading with a sample-level split "
                         "(every worker reads every shard); reshard into >= %d shards for less I/O",
                         src.origin, len(src.urls), R, self._lanes(), R * self._lanes())
            return int(self.cfg.steps_per_epoch)
        total = src.total
        if B * R > total:
            what = (f"data.batch_size {B} x world size {R} = {B * R}" if self.batch_origin.startswith("data.batch_size")
                    else f"the global batch {B * R} ({self.batch_origin})")
            raise DataSetupError(f"{what} exceeds the {total} training samples in {src.origin}: lower data.batch_size "
                                 f"to at most {max(1, total // R)} or use fewer devices")
        full = total // (B * R)
        if self.cfg.steps_per_epoch is not None and self.cfg.steps_per_epoch > full:
            log.warning("data.steps_per_epoch %d > %d = floor(%d / (%d x %d)): samples repeat within an epoch",
                        self.cfg.steps_per_epoch, full, total, R, B)
        return int(self.cfg.steps_per_epoch or full)

    def _check_eval(self, split: str, against_train: bool = False) -> None:
        src = self.source(split)
        if src is not None and src.total is not None and src.total < self.world_size:
            raise DataSetupError(f"{src.origin}: {src.total} {split} samples for {self.world_size} ranks: "
                                 f"every rank needs at least one; use fewer devices or a larger {split} split")
        # a shape mismatch would otherwise surface as a matmul error at the first validation
        if src is not None and against_train and self.input_shape != self.split_shape(split):
            fmt = "x".join
            raise DataSetupError(
                f"{split} data {src.origin} has images of shape {fmt(map(str, self.split_shape(split)))}, training "
                f"data {self.source('train').origin} {fmt(map(str, self.input_shape))}: set data.image_size and "
                "data.channels to convert both to one shape, or use matching data")

    def _lanes(self) -> int:
        return max(1, self.cfg.num_workers)

    def train_image_bytes(self) -> int | None:
        """Bytes of the decoded training images (uint8), what data.cache holds; None: unknown counts."""
        src = self.source("train")
        return None if src is None or src.total is None else src.total * math.prod(self.input_shape)

    def cache_device(self) -> torch.device | None:
        """Where data.cache holds the decoded training split (None: not held; the loader workers stream it).
        auto: host RAM when the split has a manifest and its decoded images take at most AUTO_CACHE_BYTES."""
        mode, src = self.cfg.cache, self.source("train")
        if mode == "none" or src is None or src.counts is None:
            return None
        if mode == "auto" and self.train_image_bytes() > AUTO_CACHE_BYTES:
            return None
        trainer = getattr(self, "trainer", None)
        if mode == "device" and trainer is not None:
            return self._with_room(trainer.strategy.root_device)
        return torch.device("cpu")

    def _with_room(self, device: torch.device) -> torch.device | None:
        """`device`, or None (streamed) where a GPU has no room for the split. Asked once, before the fill takes
        that memory, and first by the start-up summary, which then says the split is streamed."""
        if device.type != "cuda":
            return device
        if self._room is None:
            self._room = room_on_device(device, self.train_image_bytes(), self.source("train").origin)
        return device if self._room else None

    def _training_cache(self, stream: ShardStream, src: SplitSource) -> SplitCache | None:
        """data.cache for the training split, filled once (a large fill is announced with its time), or None:
        streamed, with a warning where an explicit host / device cache cannot be held (auto streams quietly)."""
        device = self.cache_device()
        explicit = self.cfg.cache in ("host", "device")
        if device is None:
            if explicit and src.counts is None and self.rank == 0:
                log.warning("warning: data.cache=%s: %s has no sample counts (no manifest): streaming it instead",
                            self.cfg.cache, src.origin)
            return None
        if self._cache is None:
            size = self.train_image_bytes()
            announce = self.rank == 0 and size >= ANNOUNCE_FILL_BYTES
            if announce:
                print(f"# cache     reading the training split into {device} memory ({src.total:,} images, "
                      f"{size / 2**20:,.0f} MiB) ...", flush=True)
            start = time.perf_counter()
            self._cache = stream.fill_cache(device)
            if announce and self._cache is not None:
                print(f"# cache     filled in {time.perf_counter() - start:.1f} s", flush=True)
            if self._cache is None and explicit and self.rank == 0:
                log.warning("warning: data.cache=%s: %s has samples that cannot be held alike (unreadable, or labels "
                            "or factors in some only): streaming it instead", self.cfg.cache, src.origin)
        return self._cache

    def loader(self, split: str, train: bool) -> ShardLoader:
        """This rank's loader for any split: `train=True` is the shuffled, equal-batch training stream;
        `train=False` the exact, unshuffled reader that validation, test and evaluation use. The training
        split is served from data.cache when that holds it: the same batches, built in this process."""
        src = self.source(split)
        stream = ShardStream(src, StreamSpec(
            train=train, batch_size=self.batch_size if train else self.cfg.batch_size, world_size=self.world_size,
            rank=self.rank, parts=self.parts or self.world_size,
            lanes=self._lanes(), seed=self.seed, shuffle_buffer=self.cfg.shuffle_buffer,
            num_batches=self.steps_per_epoch if train else None, on_error=self.cfg.on_error,
            verify_checksums=self.cfg.verify_checksums, image=self.spec, shape=self.split_shape(split),
            read_timeout=self.cfg.read_timeout))
        if train and split == "train":
            stream.cache = self._training_cache(stream, src)
        trainer = getattr(self, "trainer", None)
        pin = pin_batches(self.cfg.pin_memory, trainer.strategy.root_device if trainer is not None else None)
        if stream.cache is not None:
            stream.cache.pin = pin
        loader = ShardLoader(stream, num_workers=0 if stream.cache is not None else self.cfg.num_workers,
                             pin_memory=pin,
                             start_epoch=trainer.current_epoch if train and trainer is not None else 0)
        self._loaders.append(loader)
        return loader

    def train_dataloader(self) -> ShardLoader:
        if self.steps_per_epoch is None:
            self.setup("fit")
        return self.loader("train", train=True)

    def val_dataloader(self):
        return self.loader("val", train=False) if self.source("val") is not None else []

    def test_dataloader(self):
        return self.loader("test", train=False) if self.source("test") is not None else []

    def teardown(self, stage: str | None = None) -> None:
        """End of fit/validate/test: stop the loaders' persistent workers now. Left to the garbage
        collector, which finds Lightning's objects in reference cycles, PyTorch's shutdown can wait 5 s
        per worker (its queues may be finalized first)."""
        for loader in self._loaders:
            shutdown_loader_workers(loader)

    @property
    def skipped_samples(self) -> int:
        """Samples this rank's loaders could not read so far (data.on_error=warn)."""
        return sum(loader.skipped_samples for loader in self._loaders)
