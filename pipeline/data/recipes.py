"""Dataset recipes: turn a named source into uint8 [C, H, W] images (+ labels / factors) for the writer.

    recipe = build("digits")                       # sklearn's bundled 8x8 digits, no download
    recipe = build("dsprites", limit=20000, seed=0)
    recipe = build("mnist", source="~/mnist")      # the four idx files, gzipped or not
    recipe = build("npz", source="x.npz")          # N x H x W, N x H x W x C or N x C x H x W
    recipe = build("images", source="dir/", size=64, workers=8)

A `Recipe` fetches any chunk of source indices (so dSprites is rendered and image folders decoded chunk by
chunk, never held whole).
Every check of the input happens in `build`, before anything is written; problems raise `RecipeError`
naming the file and what is wrong.
"""
from __future__ import annotations

import gzip
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from pipeline.data.decode import channels_of_mode
from pipeline.data.workers import ProcessMap

RECIPES = ("digits", "dsprites", "mnist", "npz", "images")
SELF_CONTAINED = ("digits", "dsprites")  # need no --source: safe to prepare automatically


class RecipeError(ValueError):
    """Bad input to a recipe; the message names the file and the problem."""


@dataclass
class Recipe:
    name: str
    source: str  # provenance, recorded in the manifest
    n: int
    shape: Tuple[int, int, int]  # C, H, W
    fetch: Callable[[np.ndarray], Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]]
    ids: Optional[np.ndarray] = None  # source index of each sample (keys); default arange(n)
    test_indices: Optional[np.ndarray] = None  # an official test split (MNIST's t10k), if any
    meta: Dict = field(default_factory=dict)  # extra manifest entries: classes, factors
    close: Callable[[], None] = lambda: None  # releases worker processes; prepare calls it when done

    def key(self, i: int) -> str:
        return f"{int(self.ids[i] if self.ids is not None else i):07d}"


def _in_memory(name: str, source: str, images: np.ndarray, labels: Optional[np.ndarray] = None,
               **kw) -> Recipe:
    def fetch(idx):
        return images[idx], (None if labels is None else labels[idx]), None
    return Recipe(name, source, len(images), tuple(images.shape[1:]), fetch, **kw)


# -------------------------------------------------------------------------------------------- digits
def digits() -> Recipe:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # values 0..16 -> 0..255
    return _in_memory("digits", "sklearn.datasets.load_digits", images, d.target.astype(np.int64),
                      meta={"classes": [str(c) for c in range(10)]})


# ------------------------------------------------------------------------------------------ dSprites
DSPRITES_FACTORS = ("shape", "scale", "orientation", "pos_x", "pos_y")
DSPRITES_SIZES = (3, 6, 40, 32, 32)  # 737,280 combinations; index order as dSprites' latents_classes
DSPRITES_VALUES = (
    np.arange(3, dtype=np.float32),  # 0 square, 1 ellipse, 2 heart
    np.linspace(0.5, 1.0, 6, dtype=np.float32),
    np.linspace(0.0, 2 * np.pi, 40, dtype=np.float32),
    np.linspace(0.0, 1.0, 32, dtype=np.float32),
    np.linspace(0.0, 1.0, 32, dtype=np.float32),
)
DSPRITES_TOTAL = int(np.prod(DSPRITES_SIZES))
_RES = 64
_RADIUS = 0.14  # half-size of a scale-1 shape, in image widths: the rotated square still fits
_MARGIN = 0.2  # shape centres span [0.2, 0.8] of the image as pos goes 0 -> 1
_PATCH = 28  # pixels around a centre that can be covered: 2 * ceil(0.14 * sqrt(2) * 64) + 2


def dsprites_factors(indices: np.ndarray) -> np.ndarray:
    """Flat dSprites indices -> factor values, float32 [k, 5] (shape, scale, orientation, pos_x, pos_y)."""
    classes = np.unravel_index(np.asarray(indices), DSPRITES_SIZES)
    return np.stack([v[c] for v, c in zip(DSPRITES_VALUES, classes)], axis=1).astype(np.float32)


def render_dsprites(factors: np.ndarray) -> np.ndarray:
    """Factor values [k, 5] -> binary images uint8 [k, 1, 64, 64] in {0, 255}, vectorised over k.

    A procedural stand-in for the dSprites archive (same factors and ranges, not the same pixels).
    Each shape is evaluated on a 28 x 28 patch around its centre (5x fewer pixels than the frame).
    """
    factors = np.asarray(factors, dtype=np.float32)
    k = len(factors)
    centre = _MARGIN + (1 - 2 * _MARGIN) * factors[:, 3:5]  # (x, y) in image widths
    start = np.clip(np.floor(centre * _RES).astype(np.int64) - _PATCH // 2, 0, _RES - _PATCH)  # k, 2
    offs = np.arange(_PATCH)
    u = (start[:, :, None] + offs + 0.5) / _RES  # k, 2, P: patch pixel centres (columns, rows)
    dx = (u[:, 0] - centre[:, :1])[:, None, :]  # k, 1, P   (columns)
    dy = (u[:, 1] - centre[:, 1:])[:, :, None]  # k, P, 1   (rows, pointing down)
    r = (_RADIUS * factors[:, 1])[:, None, None]
    c, s = np.cos(factors[:, 2])[:, None, None], np.sin(factors[:, 2])[:, None, None]
    x, y = (c * dx + s * dy) / r, (c * dy - s * dx) / r  # shape frame, unit half-size
    mask = np.empty((k, _PATCH, _PATCH), dtype=bool)
    for shape in range(3):
        sel = factors[:, 0] == shape
        if not sel.any():
            continue
        xs, ys = x[sel].astype(np.float32), y[sel].astype(np.float32)
        if shape == 0:
            mask[sel] = np.maximum(np.abs(xs), np.abs(ys)) <= 1.0
        elif shape == 1:
            mask[sel] = xs * xs + 4.0 * ys * ys <= 1.0  # 2:1 ellipse
        else:  # heart curve (x^2 + y^2 - 1)^3 <= x^2 y^3, y up, fitted into the unit box
            hx2, hy = (1.15 * xs) ** 2, -1.15 * ys + 0.1
            mask[sel] = (hx2 + hy * hy - 1.0) ** 3 <= hx2 * hy ** 3
    out = np.zeros((k, 1, _RES, _RES), dtype=np.uint8)
    rows = (start[:, 1, None] + offs)[:, :, None]
    cols = (start[:, 0, None] + offs)[:, None, :]
    out[np.arange(k)[:, None, None], 0, rows, cols] = mask.astype(np.uint8) * 255
    return out


def dsprites(limit: Optional[int] = None, seed: int = 0) -> Recipe:
    if limit is not None and not 0 < limit <= DSPRITES_TOTAL:
        raise RecipeError(f"dsprites: --limit must be in 1..{DSPRITES_TOTAL}, got {limit}")
    if limit is None or limit == DSPRITES_TOTAL:
        ids = np.arange(DSPRITES_TOTAL)
    else:  # a seeded subset, in index order (the writer shuffles)
        ids = np.sort(np.random.default_rng([seed, 0xD5]).choice(DSPRITES_TOTAL, limit, replace=False))

    def fetch(idx):
        f = dsprites_factors(ids[idx])
        return render_dsprites(f), None, f

    meta = {"factors": {"names": list(DSPRITES_FACTORS), "sizes": list(DSPRITES_SIZES),
                        "values": [v.tolist() for v in DSPRITES_VALUES]}}
    return Recipe("dsprites", "procedural dSprites renderer (pipeline.data.recipes.render_dsprites)",
                  len(ids), (1, _RES, _RES), fetch, ids=ids, meta=meta)


# --------------------------------------------------------------------------------------------- MNIST
_MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """An idx file of unsigned bytes (gzipped or not) -> uint8 array of its dimensions."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise RecipeError(f"{path}: cannot read: {e}") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise RecipeError(f"{path}: not an idx file of unsigned bytes (bad magic number)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise RecipeError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    payload = data[4 + 4 * ndim:]
    if len(payload) != int(np.prod(dims)):
        raise RecipeError(f"{path}: holds {len(payload)} data bytes, its header {dims} says {int(np.prod(dims))}")
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def source_path(source: Optional[str], missing: str, directory: bool, hint: str = "") -> Path:
    """--source as an existing directory or file; RecipeError `missing` when none was given, or one line
    naming the path when it is not there."""
    if not source:
        raise RecipeError(missing)
    path = Path(source).expanduser()
    if directory and not path.is_dir():
        raise RecipeError(f"{path}: not a directory{hint}")
    if not directory and not path.is_file():
        raise RecipeError(f"{path}: file not found")
    return path


def _find_mnist(root: Path, names: Tuple[str, ...]) -> Path:
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise RecipeError(f"{root}: missing MNIST file {names[0]} (or {names[0]}.gz)")


def mnist(source: Optional[str]) -> Recipe:
    root = source_path(source, "mnist needs --source DIR holding the four idx files (no download here)",
                       directory=True, hint=" (expected the folder with the MNIST idx files)")
    arrays = {k: (read_idx(p := _find_mnist(root, names)), p) for k, names in _MNIST_FILES.items()}
    for split in ("train", "test"):
        (images, ipath), (labels, lpath) = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3:
            raise RecipeError(f"{ipath}: expected N x H x W images, got shape {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise RecipeError(f"{lpath}: {labels.shape[0]} labels for {len(images)} images in {ipath}")
    train_x, test_x = arrays["train_images"][0], arrays["test_images"][0]
    if train_x.shape[1:] != test_x.shape[1:]:
        raise RecipeError(f"{root}: train images are {train_x.shape[1:]}, test images {test_x.shape[1:]}")
    images = np.concatenate([train_x, test_x])[:, None]  # binarisation is a training-time option
    labels = np.concatenate([arrays["train_labels"][0], arrays["test_labels"][0]]).astype(np.int64)
    test = np.arange(len(train_x), len(images))
    return _in_memory("mnist", str(root), images, labels, test_indices=test,
                      meta={"classes": [str(c) for c in range(int(labels.max()) + 1)]})


# ----------------------------------------------------------------------------------------------- npz
_IMAGE_KEYS = ("images", "image", "x", "X", "data", "arr_0")
_LABEL_KEYS = ("labels", "label", "y", "Y", "targets")
_CHANNELS = (1, 3, 4)


def to_uint8_nchw(arr: np.ndarray, what: str) -> np.ndarray:
    """N x H x W, N x H x W x C or N x C x H x W; uint8, bool or floats in [0, 1] -> uint8 N x C x H x W."""
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        if arr.shape[1] in _CHANNELS and arr.shape[3] not in _CHANNELS:
            pass  # N C H W
        elif arr.shape[3] in _CHANNELS:
            arr = arr.transpose(0, 3, 1, 2)  # N H W C
        elif arr.shape[1] not in _CHANNELS:
            raise RecipeError(f"{what}: shape {arr.shape}: cannot find a channel axis of size 1, 3 or 4")
    else:
        raise RecipeError(f"{what}: wrong array rank {arr.ndim} (shape {arr.shape}); expected "
                          "N x H x W, N x H x W x C or N x C x H x W")
    if len(arr) == 0:
        raise RecipeError(f"{what}: holds no samples (shape {arr.shape})")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.bool_:
        return np.ascontiguousarray(arr.astype(np.uint8) * 255)
    if np.issubdtype(arr.dtype, np.floating):
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if np.isnan(arr).any() or lo < 0.0 or hi > 1.0:
            raise RecipeError(f"{what}: float values must lie in [0, 1], found [{lo:g}, {hi:g}]"
                              + (" and NaN" if np.isnan(arr).any() else ""))
        return np.ascontiguousarray(np.rint(arr * 255.0).astype(np.uint8))
    raise RecipeError(f"{what}: dtype {arr.dtype} not supported; use uint8 or floats in [0, 1]")


def npz(source: Optional[str]) -> Recipe:
    path = source_path(source, "npz needs --source FILE (.npz or .npy)", directory=False)
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise RecipeError(f"{path}: not a readable .npy/.npz file: {e}") from None
    labels = None
    if isinstance(loaded, np.ndarray):
        images, key = loaded, None
    else:
        with loaded:
            keys = list(loaded.files)
            key = next((k for k in _IMAGE_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise RecipeError(f"{path}: no image array; name it one of {', '.join(_IMAGE_KEYS)} "
                                  f"(found {', '.join(keys) or 'nothing'})")
            images = loaded[key]
            lkey = next((k for k in _LABEL_KEYS if k in keys), None)
            labels = loaded[lkey] if lkey else None
    what = f"{path}" + (f" array '{key}'" if key else "")
    images = to_uint8_nchw(images, what)
    if labels is not None:
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise RecipeError(f"{path}: labels '{lkey}' must be {len(images)} integers, got "
                              f"{labels.dtype} {labels.shape}")
        labels = labels.astype(np.int64)
    return _in_memory("npz", str(path), images, labels)


# -------------------------------------------------------------------------------------------- images
def _pil_suffixes() -> set:
    """Every file suffix PIL opens (png, jpg, webp, bmp, tif, gif, ppm, ...)."""
    from PIL import Image

    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _counts(counter: Counter) -> str:
    return ", ".join(f"{k or '(none)'} {n}" for k, n in counter.most_common(8)) + (", ..." if len(counter) > 8 else "")


def _image_files(root: Path) -> Tuple[List[Path], Counter]:
    """Image files under root (recursive, sorted) and the suffixes of the other files skipped. A directory or
    file that cannot be read (permissions, a dangling link) is a RecipeError naming it: never silently fewer."""
    suffixes = _pil_suffixes()
    files, skipped = [], Counter()

    def unreadable(e: OSError):
        raise RecipeError(f"{e.filename}: cannot read this directory: {e.strerror or e}")

    for top, dirs, names in os.walk(root, onerror=unreadable, followlinks=True):
        dirs.sort()
        for name in names:
            path = Path(top) / name
            suffix = path.suffix.lower()
            if name.startswith("."):
                continue
            if suffix not in suffixes:
                skipped[suffix] += 1
                continue
            if not os.access(path, os.R_OK) or not path.is_file():
                raise RecipeError(f"{path}: cannot read this file (permissions, or a link to nothing)")
            files.append(path)
    return sorted(files), skipped


def _image_header(path: Path) -> Tuple[int, int, str]:
    """(width, height, mode) of an image file, read from its header; PIL's verify() also checks the rest of
    the file where the format allows it without decoding (PNG: every chunk's CRC, so truncation shows)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            (w, h), mode = im.size, im.mode
            im.verify()
    except Exception as e:  # noqa: BLE001 -- PIL raises many types (OSError, SyntaxError, ...) for bad files
        raise RecipeError(f"{path}: not a readable image: {e}") from None
    return w, h, mode


def _load_image(path: Path, channels: int, size: Optional[int]) -> np.ndarray:
    """Decode, convert and resize one file (runs in a worker process)."""
    from pipeline.data.decode import load_pil

    try:
        return load_pil(path, channels, size, "center_crop")
    except Exception as e:  # noqa: BLE001 -- as above: a file whose header read but whose pixels do not
        raise RecipeError(f"{path}: not a readable image: {e}") from None


def images(source: Optional[str], size: Optional[int] = None, workers: int = 1, progress: bool = False) -> Recipe:
    """A folder of images in any format PIL reads (recursive). Labels come from first-level subfolders when
    every image sits in one (ImageFolder layout, at least two classes). Prints what it found, what it skipped
    and how labels were assigned; an unreadable directory or file stops it naming the path.

    Streams: `build` reads every file's header (in `workers` processes, checking each file), and `fetch`
    decodes, converts and resizes only the chunk of files asked for, in the same processes; the recipe
    never holds more than one chunk of decoded images."""
    from pipeline.progress import progress_bar

    root = source_path(source, "images needs --source DIR", directory=True)
    if size is not None and size <= 0:
        raise RecipeError(f"--size must be positive, got {size}")
    files, skipped = _image_files(root)
    if not files:
        raise RecipeError(f"{root}: empty folder: no image files found (searched recursively for every format PIL reads"
                          f"{'; skipped: ' + _counts(skipped) if skipped else ''})")
    pool = ProcessMap(min(workers, len(files)))
    try:
        headers = list(progress_bar(pool.map(_image_header, files), total=len(files), unit="img", leave=False,
                            desc=f"checking {root}", disable=not progress))
    except BaseException:
        pool.close()
        raise
    if size is None:
        sizes = {(w, h) for w, h, _ in headers}
        if len(sizes) > 1:
            first = {(w, h): p for (w, h, _), p in zip(reversed(headers), reversed(files))}
            shown = ", ".join(f"{w}x{h} ({first[(w, h)].name})" for w, h in sorted(sizes)[:3])
            pool.close()
            raise RecipeError(f"{root}: mixed image sizes ({shown}...); pass --size S to resize and centre-crop")
    channels = 1 if all(channels_of_mode(mode) == 1 for _, _, mode in headers) else 3
    w, h, _ = headers[0]
    shape = (channels, size or h, size or w)
    load = partial(_load_image, channels=channels, size=size)

    rel = [p.relative_to(root).parts for p in files]
    classes = sorted({r[0] for r in rel}) if all(len(r) == 2 for r in rel) else []
    labels, meta = None, {}
    if len(classes) >= 2:
        index = {c: i for i, c in enumerate(classes)}
        labels, meta = np.array([index[r[0]] for r in rel], dtype=np.int64), {"classes": classes}
        shown = ", ".join(classes[:6]) + (", ..." if len(classes) > 6 else "")
        how = f"labels from the {len(classes)} first-level subfolders ({shown})"
    else:
        depths = Counter(len(r) - 1 for r in rel)
        how = ("no labels: " + ("images at mixed depths (" + ", ".join(
            f"{n} at depth {d}" for d, n in sorted(depths.items())) + "); labels need every image in a "
            "first-level subfolder" if len(depths) > 1 else "one subfolder only" if classes else
            "images not in first-level class subfolders"))
    found = Counter(p.suffix.lower() for p in files)
    print(f"{root}: found {len(files)} images ({_counts(found)})"
          f"{'; skipped ' + str(sum(skipped.values())) + ' other files (' + _counts(skipped) + ')' if skipped else ''}"
          f"; {how}", flush=True)

    def fetch(idx):
        out = np.empty((len(idx), *shape), dtype=np.uint8)
        for j, image in enumerate(pool.map(load, [files[i] for i in idx])):
            out[j] = image
        return out, (None if labels is None else labels[idx]), None

    return Recipe("images", str(root), len(files), shape, fetch, meta=meta, close=pool.close)


def build(name: str, *, source: Optional[str] = None, limit: Optional[int] = None,
          size: Optional[int] = None, seed: int = 0, workers: int = 1, progress: bool = False) -> Recipe:
    """The recipe `name` with every input check done; `limit` takes a seeded subset (any recipe).
    `workers` processes decode image folders; call `recipe.close()` when done with it."""
    if name == "digits":
        recipe = digits()
    elif name == "dsprites":
        return dsprites(limit, seed)  # renders only its subset
    elif name == "mnist":
        recipe = mnist(source)
    elif name == "npz":
        recipe = npz(source)
    elif name == "images":
        recipe = images(source, size, workers, progress)
    else:
        raise RecipeError(f"unknown dataset {name!r}; expected one of: {', '.join(RECIPES)}")
    if limit is not None:
        if limit <= 0:
            recipe.close()
            raise RecipeError(f"--limit must be positive, got {limit}")
        if limit < recipe.n:
            recipe = _subset(recipe, np.sort(np.random.default_rng([seed, 0x5B]).choice(recipe.n, limit, replace=False)))
    return recipe


def _subset(recipe: Recipe, keep: np.ndarray) -> Recipe:
    inner, ids = recipe.fetch, (recipe.ids if recipe.ids is not None else np.arange(recipe.n))[keep]
    test = None
    if recipe.test_indices is not None:
        test = np.flatnonzero(np.isin(keep, recipe.test_indices))
    return Recipe(recipe.name, recipe.source, len(keep), recipe.shape, lambda idx: inner(keep[idx]),
                  ids=ids, test_indices=test, meta=recipe.meta, close=recipe.close)
