"""The one structured config: dataclass defaults <- YAML files (in order) <- dotlist overrides.

This is the only module that imports omegaconf. Every component receives its own slice
(`cfg.model`, `cfg.data`, ...), never the root. Unknown keys, wrong types and bad enum values raise
`ConfigError` naming the key (and the nearest valid keys for a typo). Each field is declared once, with
`setting(default, help, bounds)`: its meaning in `python -m pipeline.train --help` and its range check
(`validate`) are read from there.

    cfg = load_config(["configs/dsprites_beta.yaml"], ["objective.beta=4", "trainer.max_steps=100"])
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import operator
import os
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A bad config key or value; the message names the key and what would be valid."""


# Each choice typed once. OmegaConf validates Literal fields on every merge (the message names the key
# and the allowed values), and the modules that dispatch on a value read its list from here through
# choices(): adding a KL schedule is one edit here plus its function in schedules.py.
OnError = Literal["raise", "warn"]  # data errors: stop naming the shard, or skip + count
Binarize = Literal["none", "dynamic", "threshold"]
Arch = Literal["mlp", "conv"]
Likelihood = Literal["bernoulli", "gaussian", "gaussian_learned"]
LearnedVariance = Literal["pixel", "channel"]
KLSchedule = Literal["constant", "linear", "sigmoid", "cosine", "cyclical", "capacity"]
Ramp = Literal["linear", "sigmoid", "cosine"]
LRSchedule = Literal["constant", "cosine"]
Precision = Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true"]
WandbMode = Literal["online", "offline", "disabled"]
Channels = Literal[1, 3]  # data.channels: images converted to grey or RGB
Resize = Literal["center_crop", "stretch"]  # data.resize: how images reach data.image_size
ImageFormat = Literal["npy", "png", "jpg"]  # how `prepare` stores images in shards (--format)
Cache = Literal["auto", "none", "host", "device"]  # data.cache: where the decoded training split is held


def choices(alias) -> tuple:
    """The allowed values of one of the Literal types above, in order."""
    return get_args(alias)


SEED_MAX = 2**32 - 1  # numpy's and Lightning's seed range; -1 failed deep in seed_everything


# A bound's name -> (its test, how the message writes it).
BOUNDS = {"gt": (operator.gt, ">"), "ge": (operator.ge, ">="), "lt": (operator.lt, "<"), "le": (operator.le, "<=")}


def setting(default: Any = MISSING, help: str = "", *, factory: Optional[Callable[[], Any]] = None,
            item: Optional[str] = None, length: Optional[int] = None, **bounds: float) -> Any:
    """One schema field: its default (`factory` for a list), its one-line meaning in `--help`, and its bounds,
    checked by `validate` on every load: gt / ge / lt / le (None, for an Optional field, always passes). For a
    list the bounds hold for every `item` (the word in the message), and `length` fixes how many there are."""
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"unknown bound(s) {sorted(unknown)}; expected some of {list(BOUNDS)}")
    metadata = {"help": help, "bounds": bounds, "item": item, "length": length}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# The schema: each field's type, default, meaning (`python -m pipeline.train --help`) and bounds, in one place.
@dataclass
class RunConfig:
    name: str = setting("default", "left at default: named after the config files and overrides (or SLURM job, W&B agent)")
    dir: Optional[str] = setting(None, "where everything is written; default: runs/<run.name>")


@dataclass
class DataConfig:
    dataset: Optional[str] = setting(None, "recipe prepared into `root` on first use (digits, dsprites); null: digits, at the default root only")
    root: str = setting("data/digits", "the recipe's output directory (shards and manifest.json)")
    train: Optional[str] = setting(None, "shards: a manifest.json, a directory, a brace pattern or a URL; null: root's")
    val: Optional[str] = setting(None, "validation shards, as data.train")
    test: Optional[str] = setting(None, "test shards (evaluation), as data.train")
    batch_size: int = setting(128, "per device (the global batch is this x world size at the run's first start)", gt=0)
    global_batch_size: Optional[int] = setting(None, "samples per step over all ranks, split evenly; null: data.batch_size x world size, kept on resume", gt=0)
    num_workers: int = setting(2, "loader worker processes per device", ge=0)
    shuffle_buffer: int = setting(1000, "samples held by the in-worker shuffle buffer", ge=0)
    steps_per_epoch: Optional[int] = setting(None, "default: floor(total / global batch)", gt=0)
    on_error: OnError = setting("raise", "unreadable data: raise stops naming the shard; warn skips, counts, logs it")
    verify_checksums: bool = setting(True, "sha256 of each shard checked against the manifest as read (once per worker)")
    read_timeout: float = setting(120.0, "seconds a pipe: / http(s) shard may send nothing before it counts as unreadable (on_error)", gt=0)
    cache: Cache = setting("auto", "train split decoded in the training process: host RAM, device; auto: host if <= 512 MiB")
    seed: Optional[int] = setting(None, "data order; default: the root `seed`", ge=0, le=SEED_MAX)
    binarize: Binarize = setting("none", "dynamic: Bernoulli resample each time (MNIST-style); threshold: > 0.5")
    pin_memory: bool = setting(True, "page-locked batches for faster host-to-GPU copies (GPU only)")
    # Shards written by other tools (img2dataset, webdataset.ShardWriter): members looked up in order.
    image_keys: List[str] = setting(help="image member: the first present", factory=lambda: ["jpg", "jpeg", "png", "webp", "ppm", "npy"])
    label_keys: List[str] = setting(help="label member (ASCII integer): the first present", factory=lambda: ["cls", "label.cls"])
    label_field: Optional[str] = setting("label", "else the label is this field of a .json member; null: no json label")
    # Converted in the loader workers before batching; when set they also fix the model's input shape.
    channels: Optional[Channels] = setting(None, "1 or 3; null: as stored (grey stays 1, other PIL images 3)")
    image_size: Optional[int] = setting(None, "square side in pixels; null: as stored (all images one size)")
    resize: Resize = setting("center_crop", "center_crop: shorter side to image_size, then crop; stretch: ignore aspect")


@dataclass
class ModelConfig:
    arch: Arch = setting("mlp", "encoder/decoder family")
    latent_dim: int = setting(10, "dimensions of z", gt=0)
    hidden_dims: List[int] = setting(help="mlp layer widths", factory=lambda: [256, 128], item="width", gt=0)
    conv_channels: List[int] = setting(help="conv stages, stride 2 each", factory=lambda: [32, 64, 128], item="width", gt=0)
    likelihood: Likelihood = setting("bernoulli", "decoder distribution p(x|z)")
    gaussian_sigma: float = setting(0.1, "fixed decoder std for `gaussian` (data scaled to [0, 1])", gt=0)
    learned_variance: LearnedVariance = setting("pixel", "for `gaussian_learned`")
    logvar_min: float = setting(-10.0, "clamp for every log-variance (encoder and decoder): no inf/NaN")
    logvar_max: float = setting(10.0, "upper clamp for every log-variance")
    init_from: Optional[str] = setting(None, "warm start: a checkpoint's model weights (same architecture), new optimizer, step 0")


@dataclass
class ObjectiveConfig:
    beta: float = setting(1.0, "KL weight (beta-VAE); the effective weight is beta * w(step)", ge=0)
    kl_schedule: KLSchedule = setting("constant", "w(step)")
    warmup_steps: int = setting(1000, "linear / sigmoid / cosine ramp length", ge=0)
    cycles: int = setting(4, "cyclical: number of cycles over trainer.max_steps", gt=0)
    cycle_ratio: float = setting(0.5, "cyclical: fraction of each cycle spent ramping", gt=0, le=1)
    cycle_ramp: Ramp = setting("linear", "cyclical ramp shape")
    capacity_max_nats: float = setting(25.0, "capacity: C rises linearly to this ...", ge=0)
    capacity_steps: int = setting(10000, "... over this many steps", ge=0)
    gamma: float = setting(1000.0, "capacity: weight of |KL - C|", ge=0)
    free_bits: float = setting(0.0, "nats per latent dimension floor on the batch-mean KL; 0 disables", ge=0)
    val_iwae_samples: int = setting(0, "if > 0, also log val/iwae with this many importance samples", ge=0)


@dataclass
class OptimConfig:
    lr: float = setting(1e-3, "AdamW learning rate", gt=0)
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay", ge=0)
    betas: List[float] = setting(help="AdamW moment decay rates", factory=lambda: [0.9, 0.999], item="number", length=2, ge=0, lt=1)
    lr_schedule: LRSchedule = setting("constant", "cosine decays to min_lr_ratio * lr at max_steps")
    lr_warmup_steps: int = setting(0, "linear LR warm-up from 0", ge=0)
    min_lr_ratio: float = setting(0.1, "cosine: the final LR as a fraction of lr", ge=0, le=1)
    ema_decay: Optional[float] = setting(None, "EMA of the weights, updated every step: validation, checkpoints' state_dict and evaluate use it; null: off", gt=0, lt=1)
    grad_clip_norm: Optional[float] = setting(None, "clip the total gradient norm to this (Lightning's gradient_clip_val, norm); null: off", gt=0)
    grad_skip_norm: Optional[float] = setting(None, "skip the optimizer step when the total gradient norm (before clipping) exceeds this or is not finite; null: off", gt=0)


@dataclass
class TrainerConfig:
    max_steps: int = setting(3000, "optimizer steps; raise it and re-run to extend a finished run", gt=0)
    accelerator: str = setting("auto", "auto | cpu | gpu | ...")
    # null, not "auto": Lightning's auto takes every GPU of the node, which silently multiplies the global batch
    devices: Any = setting(None, 'null: one device (under SLURM or torchrun: the allocation); "auto" or -1: every '
                           'device of the node; a count or a list of device ids')  # checked by _check_devices
    num_nodes: int = setting(1, "under SLURM taken from the allocation", gt=0)
    strategy: str = setting("auto", 'auto | ddp | ...; "auto" picks ddp for >1 device')
    precision: Precision = setting("32-true", "Lightning precision")
    val_check_interval: int = setting(500, "validate every N training batches (and always at the last step)", gt=0)
    log_every_n_steps: int = setting(25, "write train metrics every N steps", gt=0)
    accumulate_grad_batches: int = setting(1, "batches per optimizer step", gt=0)
    limit_val_batches: Optional[int] = setting(None, "null: the whole validation split", ge=0)
    enable_progress_bar: bool = setting(True, "one bar on a terminal, a line every few steps otherwise")
    deterministic: bool = setting(False, "torch deterministic algorithms (slower)")
    compile: bool = setting(False, "torch.compile the model")
    # Off by default: the loss scale spans orders of magnitude between datasets (~30 on digits, ~1e4 on
    # 64x64 RGB Gaussian), so no fixed bound is both generous and useful; divergence is always warned about.
    max_loss: Optional[float] = setting(None, "stop when a logged training loss exceeds this (nats per example)", gt=0)
    signal_every_n_steps: int = setting(10, "DDP: ranks agree on USR1/Ctrl-C/TERM every N batches (one all-reduce)", gt=0)


@dataclass
class CheckpointConfig:
    every_n_steps: int = setting(500, "write checkpoints/last.ckpt every N steps (and at the end, on Ctrl-C)", gt=0)
    save_best: bool = setting(True, "also keep the best checkpoint by val/elbo")


@dataclass
class WandbConfig:
    project: str = setting("vae-pipeline", "W&B project")
    mode: Optional[WandbMode] = setting(None, "null: online if logged in, else offline")
    entity: Optional[str] = setting(None, "W&B team or user; null: your default")
    group: Optional[str] = setting(None, "W&B group (sweeps group their runs by the sweep name)")
    tags: List[str] = setting(help="W&B tags", factory=list)
    log_checkpoints: Optional[Literal["best", "last", "all"]] = setting(None, "W&B artifacts at each process end; null: none")
    sync_dir: Optional[str] = setting(None, "offline: shared dir where rank zero asks `python -m pipeline.sync watch DIR` to sync")


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    images_every_n_steps: int = setting(500, "image grids every N steps (and at the last step); 0 disables", ge=0)
    num_images: int = setting(16, "inputs shown in the reconstruction grid")


@dataclass
class Config:
    seed: int = setting(0, "model init, per-batch noise (with the step and rank) and data order", ge=0, le=SEED_MAX)
    resume: str = setting("auto", "auto: the newest checkpoint in run.dir | never | path/to/checkpoint.ckpt")
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def _yaml_value(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(list(value)) if isinstance(value, (list, tuple)) else str(value)


def _type_name(t: Any) -> str:
    args = get_args(t)
    if get_origin(t) is Literal:
        return "|".join(map(str, args))
    if get_origin(t) is Union:  # Optional[X]
        return " or ".join([_type_name(a) for a in args if a is not type(None)] + ["null"])
    if get_origin(t) is list:
        return f"list[{_type_name(args[0])}]"
    return "any" if t is Any else t.__name__


@functools.cache
def schema_fields(cls: type = None, prefix: str = "") -> Tuple[Tuple[str, Any, dataclasses.Field], ...]:
    """(dotted key, type, dataclasses.Field) of every leaf key of the schema, in schema order."""
    cls = cls or Config
    hints, rows = get_type_hints(cls), []
    for f in fields(cls):
        t = hints[f.name]
        rows += schema_fields(t, f"{prefix}{f.name}.") if dataclasses.is_dataclass(t) else [(prefix + f.name, t, f)]
    return tuple(rows)


def bounds_text(bounds: Dict[str, float]) -> str:
    """How messages and `--help` write a field's bounds: `> 0`, `>= 0`, `in (0, 1]`, ..."""
    lower = next(((k, v) for k, v in bounds.items() if k in ("gt", "ge")), None)
    upper = next(((k, v) for k, v in bounds.items() if k in ("lt", "le")), None)
    if lower and upper:
        return f"in {'(' if lower[0] == 'gt' else '['}{lower[1]}, {upper[1]}{')' if upper[0] == 'lt' else ']'}"
    name, value = lower or upper
    return f"{BOUNDS[name][1]} {value}"


def key_docs() -> List[Tuple[str, str, str, str]]:
    """(key, type and bounds, default, meaning) for every leaf key of the schema, in schema order."""
    rows = []
    for key, t, f in schema_fields():
        default = f.default if f.default is not MISSING else f.default_factory()
        typ, bounds = _type_name(t), f.metadata.get("bounds")
        if bounds:
            typ += f", {'each ' if f.metadata['item'] else ''}{bounds_text(bounds)}"
        rows.append((key, typ, _yaml_value(default), f.metadata.get("help", "")))
    return rows


def keys_help() -> str:
    """Every config key with its default, type and meaning: the table of `python -m pipeline.train --help`."""
    rows = [(f"{key} = {default}", f"{typ}: {meaning}" if meaning else typ) for key, typ, default, meaning
            in key_docs()]
    width = max(len(left) for left, _ in rows)
    return "\n".join(f"  {left:<{width}}  {right}" for left, right in rows)


def _flat(d: dict, prefix: str = "") -> Dict[str, Any]:
    """A nested plain dict -> {dotted key: leaf value}."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def default_run_dir(name: str) -> str:
    """run.dir of a run that does not set it: runs/<run.name>."""
    return str(Path("runs") / name)


def changed_keys(cfg: DictConfig) -> Dict[str, str]:
    """key -> value (as YAML text) for every leaf that differs from the schema's default, in schema
    order; run.dir and data.seed are left out where they are just derived from run.name and seed."""
    default = _flat(to_dict(OmegaConf.structured(Config)))
    out = {k: _yaml_value(v) for k, v in _flat(to_dict(cfg)).items() if v != default.get(k)}
    if cfg.run.dir == default_run_dir(cfg.run.name):
        out.pop("run.dir", None)
    if cfg.data.seed == cfg.seed:
        out.pop("data.seed", None)
    return out


# Keys that say how a run is executed, watched, saved, stopped or how long it goes, never what it trains
# (a trailing "." covers a section). One list serves two rules: they stay out of the run name derived from
# the config (pipeline.launch.naming.derived_run_name), and they alone may differ when a run directory is resumed
# (identity_differences; any other difference from RUN_DIR/config.yaml stops the resume, pipeline/run/rundir.py).
OPERATIONAL_KEYS = (
    "resume", "run.", "logger.", "checkpoint.", "objective.val_iwae_samples",
    "trainer.max_steps",  # except on resume when a schedule spans the run: see SPANS_MAX_STEPS
    "trainer.max_loss", "trainer.val_check_interval", "trainer.log_every_n_steps", "trainer.limit_val_batches",
    "trainer.enable_progress_bar", "trainer.devices", "trainer.num_nodes", "trainer.accelerator",
    "trainer.strategy", "trainer.compile", "trainer.deterministic",
    "data.num_workers", "data.pin_memory", "data.cache", "data.on_error", "data.verify_checksums",
    "data.read_timeout", "trainer.signal_every_n_steps",
)


def is_operational(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in OPERATIONAL_KEYS)


# Schedules whose shape is stretched over trainer.max_steps: with them, max_steps is part of what is trained.
SPANS_MAX_STEPS = {"optim.lr_schedule": ("cosine",), "objective.kl_schedule": ("cyclical",)}


# Keys that moved: old -> (new, how an old value reads as the new one). YAML files written before the move (every
# run's config.yaml holds every key) are read with the new key; a command-line override of the old one is told it.
MOVED = {"trainer.gradient_clip_val": ("optim.grad_clip_norm", lambda v: v or None)}


def _moved_keys(loaded: Any) -> Any:
    """A loaded YAML mapping with each MOVED key given under its new name."""
    if not isinstance(loaded, DictConfig):
        return loaded
    for old, (new, convert) in MOVED.items():
        section, key = old.rsplit(".", 1)
        node = OmegaConf.select(loaded, section, throw_on_missing=False)
        if isinstance(node, DictConfig) and key in node:
            value = convert(node.pop(key))
            if OmegaConf.select(loaded, new, throw_on_missing=False) is None:
                OmegaConf.update(loaded, new, value, force_add=True)
    return loaded


def load_saved(path: str | os.PathLike) -> DictConfig:
    """A run's saved config.yaml over the schema, not re-validated (its `resume` path may be gone)."""
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:
        raise ConfigError(f"{path}: cannot parse YAML: {e}") from None
    return _merge(OmegaConf.structured(Config), _moved_keys(loaded), str(path))


def identity_differences(saved: DictConfig, new: DictConfig) -> List[Tuple[str, Any, Any]]:
    """(key, saved value, new value) for each key that differs and changes what is trained."""
    a, b = _flat(to_dict(saved)), _flat(to_dict(new))
    spans = any(c.get(k) in v for c in (a, b) for k, v in SPANS_MAX_STEPS.items())
    diffs = []
    for key in sorted(a.keys() | b.keys()):
        if a.get(key) == b.get(key):
            continue
        if is_operational(key) and not (key == "trainer.max_steps" and spans):
            continue
        diffs.append((key, a.get(key), b.get(key)))
    return diffs


def _all_keys(node: dict, prefix: str = "") -> List[str]:
    """Every key of a nested plain dict, sections and leaves, dotted."""
    keys = []
    for k, v in node.items():
        keys.append(f"{prefix}{k}")
        keys.extend(_all_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [])
    return keys


def _nearest(bad: str, valid: Sequence[str]) -> str:
    depth = bad.count(".")
    valid = [k for k in valid if k.count(".") == depth] or list(valid)  # suggest siblings, not parents
    close = difflib.get_close_matches(bad, valid, n=3, cutoff=0.5)
    if not close:  # try the last component, so `objective.betta` still finds `objective.beta`
        leaf = bad.rsplit(".", 1)[-1]
        close = [k for k in valid if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], cutoff=0.7)][:3]
    return f" Did you mean: {', '.join(close)}?" if close else ""


@functools.cache
def _section_keys(cls: type = None, prefix: str = "") -> frozenset:
    """The dotted keys of the schema's sections (`data`, `logger.wandb`, ...)."""
    hints = get_type_hints(cls or Config)
    return frozenset(k for f in fields(cls or Config) if dataclasses.is_dataclass(hints[f.name])
                     for k in (prefix + f.name, *_section_keys(hints[f.name], f"{prefix}{f.name}.")))


def _check_sections(other: Any, source: str) -> None:
    """A YAML file that is not a mapping, or a section given as a list or a value (`data: [1, 2]`):
    ConfigError naming it (OmegaConf raises a TypeError, or an error without a key or message)."""
    if not isinstance(other, DictConfig):
        what = "a list" if isinstance(other, (list, tuple)) or OmegaConf.is_list(other) else type(other).__name__
        raise ConfigError(f"{source}: the file must be a mapping of keys (key: value), not {what}")

    def check(node: dict, prefix: str) -> None:
        for k, value in node.items():
            key = f"{prefix}{k}"
            if key not in _section_keys():
                continue
            if isinstance(value, dict):
                check(value, f"{key}.")
            elif value != "???":  # a missing value (`data: ???`) is left to the merge
                raise ConfigError(f"{source}: bad value for '{key}': {value!r}; '{key}' is a section: "
                                  f"give its keys ({key}.<key>=...)")

    check(OmegaConf.to_container(other, resolve=False), "")  # plain containers: nothing resolved


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    _check_sections(other, source)
    try:
        return OmegaConf.merge(base, other)
    except (ConfigKeyError, ValidationError, OmegaConfBaseException) as e:
        key = getattr(e, "full_key", None) or ""
        msg = (getattr(e, "msg", None) or str(e)).splitlines()[0].split(" Did you mean")[0].rstrip(".")
        literal = re.fullmatch(r"Invalid value '(.*)', expected one of \[(.*)\]", msg)
        if literal:  # a Literal field: the same words as every other bad value
            allowed = ", ".join(a.strip().strip("'") for a in literal.group(2).split(","))
            raise ConfigError(f"{source}: bad value for '{key}': {literal.group(1)!r}; expected one of: {allowed}") from None
        hint = _nearest(key, _all_keys(OmegaConf.to_container(base, resolve=False))) if isinstance(e, ConfigKeyError) or "not in" in msg else ""
        if key in MOVED:
            hint = f" It moved: {MOVED[key][0]} (null: off)."
        raise ConfigError(f"{source}: bad config key '{key}': {msg}.{hint}") from None


def select(cfg: DictConfig, dotted: str) -> Any:
    """The value at a dotted key (`objective.beta`); None where there is none."""
    return OmegaConf.select(cfg, dotted, throw_on_missing=False)


def validate(cfg: DictConfig) -> None:
    """Range and cross-field checks that the dataclass types cannot express (Literal types are
    checked by OmegaConf on every merge)."""
    for key, value in _flat(to_dict(cfg)).items():  # inf passes `> 0` and fails at step 1
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"bad value for '{key}': {value!r}; must be a finite number")
    check_bounds(cfg)
    if cfg.model.logvar_min >= cfg.model.logvar_max:
        raise ConfigError("'model.logvar_min' must be below 'model.logvar_max'")
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).is_file():
        raise ConfigError(f"bad value for 'resume': {cfg.resume!r} is neither auto, never nor an existing checkpoint")
    if cfg.model.init_from is not None and not Path(cfg.model.init_from).is_file():
        raise ConfigError(f"bad value for 'model.init_from': {cfg.model.init_from!r} is not an existing checkpoint")
    if cfg.optim.grad_skip_norm is not None and cfg.trainer.precision == "16-mixed":
        raise ConfigError("'optim.grad_skip_norm' cannot be used with trainer.precision=16-mixed: its GradScaler sets "
                          "the fused optimizer's found_inf itself and leaves the gradients scaled; use bf16-mixed")
    _check_devices(cfg.trainer.devices)
    if cfg.trainer.devices in (-1, "-1"):  # Lightning's "all devices"; on CPU it raised there, "auto" means the same
        cfg.trainer.devices = "auto"


def check_bounds(cfg: DictConfig) -> None:
    """Each field's bounds, from its `setting(...)` in the schema (a null Optional value passes)."""
    for key, t, f in schema_fields():
        bounds = f.metadata.get("bounds")
        value = select(cfg, key)
        if not bounds or value is None:
            continue
        text, item, length = bounds_text(bounds), f.metadata["item"], f.metadata["length"]
        values = list(value) if item else [value]
        if (length is None or len(values) == length) and all(BOUNDS[k][0](v, b) for v in values for k, b in bounds.items()):
            continue
        if item:
            count = {2: "two", 3: "three"}.get(length, str(length))
            need = f"must be {count} {item}s {text}" if length else f"every {item} must be {text}"
            raise ConfigError(f"bad value for '{key}': {values}; {need}")
        null = " (or null)" if type(None) in get_args(t) else ""
        raise ConfigError(f"bad value for '{key}': {value!r}; must be {text}{null}")


def _check_devices(devices: Any) -> None:
    """trainer.devices: null (one, or the launch's), "auto" (or -1, Lightning's "all"), a count >= 1, or a non-empty
    list of device indices (0 and -2 reached Lightning as a traceback)."""
    bad = (f"bad value for 'trainer.devices': {devices!r}; must be null (one), auto (or -1: all), a number of devices "
           ">= 1 or a list of device indices")
    if devices is None or (devices == -1 and not isinstance(devices, bool)):
        return
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts or not all(p.isdigit() for p in parts) or (len(parts) == 1 and not text.endswith(",") and int(parts[0]) < 1):
            raise ConfigError(bad)
    elif isinstance(devices, bool) or (isinstance(devices, int) and devices < 1):
        raise ConfigError(bad)
    elif isinstance(devices, (list, tuple)) or hasattr(devices, "__len__"):
        if not len(devices) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices):
            raise ConfigError(bad)
    elif not isinstance(devices, int):
        raise ConfigError(bad)


def _leaves(node: Any, prefix: str = ""):
    """(dotted key, value) of every leaf of plain containers (list items keyed by index)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
    if items is None:
        yield prefix, node
        return
    for k, v in items:
        yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))


def refuse_environment_values(cfg: DictConfig) -> None:
    """No value may come from the environment (`${oc.env:...}`): the resolved config is written to config.yaml,
    the console, W&B and every checkpoint, and an environment variable may hold a secret (a shared config with
    `tags: ["${oc.env:WANDB_API_KEY}"]` uploaded the key). The way out is the value itself on the command line,
    where the shell expands a variable the user chose to put there."""
    for key, value in _leaves(OmegaConf.to_container(cfg, resolve=False)):
        if isinstance(value, str) and "oc.env:" in value.replace(" ", ""):
            raise ConfigError(f"{key}: values from the environment ({value}) are refused: the config is written to "
                              f"config.yaml, W&B and checkpoints; give the value itself ({key}=...)")


def refuse_secret_values(cfg: DictConfig, secrets: Sequence[str]) -> None:
    """No value may hold one of `secrets` (the W&B API key: WANDB_API_KEY, the netrc password): refused at
    start naming the key, never written anywhere. Keys shorter than 8 characters are not looked for."""
    secrets = [s for s in secrets if s and len(s) >= 8]
    if not secrets:
        return
    for key, value in _leaves(OmegaConf.to_container(cfg, resolve=True)):
        if isinstance(value, str) and any(s in value for s in secrets):
            raise ConfigError(f"{key} holds your W&B API key (WANDB_API_KEY or ~/.netrc): refused, it would be "
                              f"written to config.yaml, W&B and checkpoints; wandb reads the key itself")


def load_config(files: Sequence[str | os.PathLike] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults <- each YAML file in order <- `key=value` overrides; validated; `run.dir` resolved."""
    cfg = OmegaConf.structured(Config)
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors come in several types
            raise ConfigError(f"{path}: cannot parse YAML: {e}") from None
        cfg = _merge(cfg, _moved_keys(loaded), str(path))
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form key=value")
    if overrides:
        try:
            dot = OmegaConf.from_dotlist(list(overrides))
        except Exception as e:  # OmegaConf's messages go on with `full_key: ...` lines: one line, naming the key
            first, key = (str(e).splitlines() or [""])[0], getattr(e, "full_key", None)
            if key:
                given = [o for o in overrides if o.split("=", 1)[0].strip() == key or o.startswith(f"{key}.")]
                raise ConfigError(f"command line: bad value for '{key}' ({', '.join(given)}): {first}") from None
            raise ConfigError(f"cannot parse overrides {list(overrides)}: {first}") from None
        cfg = _merge(cfg, dot, "command line")
    refuse_environment_values(cfg)
    validate(cfg)
    if cfg.run.dir is None:
        cfg.run.dir = default_run_dir(cfg.run.name)
    if cfg.data.seed is None:
        cfg.data.seed = cfg.seed
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_dict(cfg: DictConfig) -> dict:
    """Plain containers (for W&B, checkpoints' hyperparameters)."""
    return OmegaConf.to_container(cfg, resolve=True)


def from_dict(d: dict) -> DictConfig:
    """Rebuild a validated config from `to_dict` output (e.g. a checkpoint's hyperparameters)."""
    cfg = _merge(OmegaConf.structured(Config), OmegaConf.create(d), "saved config")
    return cfg


def merge_dict(cfg: DictConfig, d: dict) -> DictConfig:
    """`cfg` with the nested values of plain dict `d` merged over it (typed, not re-validated)."""
    return _merge(cfg, OmegaConf.create(d), "saved values")


def to_object(cfg: DictConfig) -> Any:
    """The config, or one of its sections, as its dataclass instance (`Config`, `ModelConfig`, ...)."""
    return OmegaConf.to_object(cfg)


def section(value: Any, cls: type) -> Any:
    """A section as its dataclass `cls` (e.g. ModelConfig): an instance as is, a DictConfig section converted,
    a plain mapping (a checkpoint's hyperparameters) read over the schema's defaults first; unknown keys, wrong
    types and bad enum values raise ConfigError naming the full key (`model.arch`)."""
    if isinstance(value, cls):
        return value
    if not OmegaConf.is_config(value):
        prefix = next(f.name for f in fields(Config) if f.default_factory is cls)
        value = _merge(OmegaConf.structured(Config), OmegaConf.create({prefix: dict(value)}), cls.__name__)[prefix]
    return to_object(value)
