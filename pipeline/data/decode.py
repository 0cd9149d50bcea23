"""Raw samples -> training arrays, run inside the loader workers: which member holds the image, decoding it
(.npy, or any format PIL reads: jpg, png, webp, ppm, ...), converting channels and size, and the label from a
.cls member or a field of .json; and the header-only shape peek of `prepare index`. (The codecs
`prepare --format` writes with are in pipeline.data.shards.) numpy and PIL only: no torch.

    spec = ImageSpec.from_config(cfg.data)
    image, label, factors = spec.decode(raw)   # raw: {"__key__", suffix -> bytes}; image uint8 [C, H, W]

Errors raise SampleError without the shard's name; callers know it and add it.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from pipeline.config import Channels, Resize, choices
from pipeline.data import shards

GRAY_MODES = {"1", "L", "LA", "La", "I", "F"}  # PIL modes that stay one channel by default (and I;16*)
Shape = Tuple[int, int, int]


class SampleError(ValueError):
    """A sample that cannot become a training image; the message names the member and what is wrong."""


def _is_npy(member: str) -> bool:
    return member == "npy" or member.endswith(".npy")


def npy_image(data: bytes) -> np.ndarray:
    """A .npy member -> uint8 [C, H, W]. Ours are C x H x W; H x W and H x W x C (last axis 1, 3 or 4 and the
    first not) are what other writers store."""
    try:
        arr = shards.decode_npy(data)
    except ValueError as e:
        raise SampleError(f"undecodable .npy: {e}") from None
    if arr.dtype != np.uint8:
        raise SampleError(f".npy image is {arr.dtype} {arr.shape}, expected uint8")
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3:
        if arr.shape[0] not in (1, 3, 4) and arr.shape[2] in (1, 3, 4):
            return arr.transpose(2, 0, 1)
        if arr.shape[0] in (1, 3, 4):
            return arr
    raise SampleError(f".npy image has shape {arr.shape}; expected C x H x W, H x W or H x W x C (C 1, 3 or 4)")


def channels_of_mode(mode: str) -> int:
    """Channels a PIL image of this mode gets when data.channels is unset: grey stays 1, the rest RGB."""
    return 1 if mode in GRAY_MODES or mode.startswith("I;16") else 3


def fit(im, size: int, resize: str):
    """PIL image -> size x size: `center_crop` scales the shorter side to `size` and crops the centre (PIL's
    ImageOps.fit); `stretch` ignores the aspect ratio. Bicubic, antialiased."""
    from PIL import Image, ImageOps

    if im.size == (size, size):
        return im
    if resize == "stretch":
        return im.resize((size, size), Image.BICUBIC)
    return ImageOps.fit(im, (size, size), method=Image.BICUBIC, centering=(0.5, 0.5))


def pil_to_chw(im) -> np.ndarray:
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def load_pil(fp, channels: Optional[int], size: Optional[int], resize: str, draft: bool = True) -> np.ndarray:
    """An encoded image (file object or path) -> uint8 [C, H, W], converted and resized. JPEGs are decoded
    at the smallest 1/2, 1/4 or 1/8 scale that still covers size x size (libjpeg's draft mode; `draft=False`
    decodes in full, for the bench's comparison: `python -m pipeline.bench images`)."""
    from PIL import Image

    with Image.open(fp) as im:
        if size is not None and draft:
            im.draft("L" if channels == 1 else None, (size, size))
        mode = "L" if (channels or channels_of_mode(im.mode)) == 1 else "RGB"
        if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):  # 16-bit grey -> 8 bits
            im = Image.fromarray((np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8), "L")
        out = im.convert(mode)  # decodes; RGBA, palette, CMYK... -> L or RGB
    if size is not None:
        out = fit(out, size, resize)
    return pil_to_chw(out)


def convert_array(image: np.ndarray, channels: Optional[int], size: Optional[int], resize: str) -> np.ndarray:
    """uint8 [C, H, W] -> `channels` and size x size, through PIL only when something changes."""
    from PIL import Image

    c, h, w = image.shape
    if c == 4:
        image, c = image[:3], 3  # RGBA: drop alpha, as PIL's RGBA -> RGB does
    want = channels or c
    if want == c and (size is None or (h, w) == (size, size)):
        return image
    im = Image.fromarray(image[0] if c == 1 else image.transpose(1, 2, 0), "L" if c == 1 else "RGB")
    if want != c:
        im = im.convert("L" if want == 1 else "RGB")
    if size is not None:
        im = fit(im, size, resize)
    return pil_to_chw(im)


def header_shape(member: str, data: bytes) -> Shape:
    """(C, H, W) of an image member from its header alone (no pixel decoding); C as `decode` makes it with
    data.channels unset."""
    if _is_npy(member):
        c, h, w = npy_image(data).shape
        return (3 if c == 4 else c), h, w
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return channels_of_mode(im.mode), im.size[1], im.size[0]
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for bad bytes
        raise SampleError(f"undecodable .{member} member: {e}") from None


class Item(NamedTuple):
    """One decoded sample."""

    key: str
    image: np.ndarray  # uint8 [C, H, W]
    label: Optional[int]
    factors: Optional[np.ndarray]  # float32 [F]


@dataclass
class Columns:
    """Decoded samples as arrays: keys [n], image uint8 [n, C, H, W], label int64 [n] or None, factors float32
    [n, F] or None. What a batch is made of when every sample of a read decoded the same way."""

    keys: List[str]
    image: np.ndarray
    label: Optional[np.ndarray] = None
    factors: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.keys)

    def items(self) -> List[Item]:
        labels = [None] * len(self) if self.label is None else self.label.tolist()
        factors = [None] * len(self) if self.factors is None else list(self.factors)
        return list(map(Item._make, zip(self.keys, list(self.image), labels, factors)))

    @staticmethod
    def concat(parts: Sequence[Columns]) -> Optional[Columns]:
        """One Columns of several, or None when they do not fit together (shapes, labels or factors differ)."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        if any(p.image.shape[1:] != first.image.shape[1:] or (p.label is None) != (first.label is None)
               or (p.factors is None) != (first.factors is None)
               or (p.factors is not None and p.factors.shape[1:] != first.factors.shape[1:]) for p in parts):
            return None
        cat = np.concatenate
        return Columns([k for p in parts for k in p.keys], cat([p.image for p in parts]),
                       None if first.label is None else cat([p.label for p in parts]),
                       None if first.factors is None else cat([p.factors for p in parts]))


def _npy_columns(block: shards.RawBlock, suffix: str) -> Optional[np.ndarray]:
    """[n, *shape] array of a .npy member every sample of the block has, all with one header (dtype, shape),
    or None (absent from some, several headers, Fortran order: left to the per-sample decoder)."""
    found = block.member(suffix)
    if found is None:
        return None
    offs, sizes = found
    if (offs < 0).any() or (sizes != sizes[0]).any():
        return None
    first = block.buf[offs[0]:offs[0] + sizes[0]].tobytes()
    if len(first) < 10 or first[:6] != b"\x93NUMPY":
        return None
    hlen_size = 2 if first[6] == 1 else 4
    start = 8 + hlen_size + int.from_bytes(first[8:8 + hlen_size], "little")
    if start > len(first):
        return None
    headers = block.gather(offs, start)
    if not (headers == headers[0]).all():
        return None
    try:
        arr = shards.decode_npy(first)
    except ValueError:
        return None
    if arr.dtype.hasobject or (arr.ndim > 1 and np.isfortran(arr)):
        return None
    data = block.gather(offs + start, int(sizes[0]) - start)
    return data.copy().view(arr.dtype).reshape((len(offs), *arr.shape))


def _cls_columns(block: shards.RawBlock, suffix: str) -> Optional[np.ndarray]:
    """int64 [n] labels of an ASCII-digits member every sample has, or None (left to the per-sample decoder,
    which also reports bad ones)."""
    found = block.member(suffix)
    if found is None:
        return None
    offs, sizes = found
    if (offs < 0).any() or (sizes < 1).any() or (sizes > 18).any():
        return None
    width = int(sizes.max())
    digits = block.gather(offs, width).astype(np.int64) - 48
    pos = np.arange(width)
    inside = pos < sizes[:, None]
    if not ((digits >= 0) & (digits <= 9) | ~inside).all():
        return None
    scale = np.where(inside, 10 ** np.maximum(sizes[:, None] - 1 - pos, 0), 0)
    return (digits * scale).sum(axis=1)


@dataclass(frozen=True)
class ImageSpec:
    """What the loader makes of a raw sample (see DataConfig: image_keys ... resize)."""

    image_keys: Tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "ppm", "npy")
    label_keys: Tuple[str, ...] = ("cls", "label.cls")
    label_field: Optional[str] = "label"
    channels: Optional[int] = None
    size: Optional[int] = None
    resize: str = "center_crop"

    def __post_init__(self):
        if not self.image_keys:
            raise ValueError("data.image_keys is empty: name at least one image member (e.g. jpg)")
        if self.channels is not None and self.channels not in choices(Channels):
            raise ValueError(f"data.channels must be one of {choices(Channels)}, got {self.channels}")
        if self.size is not None and self.size <= 0:
            raise ValueError(f"data.image_size must be positive, got {self.size}")
        if self.resize not in choices(Resize):
            raise ValueError(f"data.resize must be one of {choices(Resize)}, got {self.resize!r}")

    @classmethod
    def from_config(cls, cfg) -> ImageSpec:
        return cls(tuple(k.lower() for k in cfg.image_keys), tuple(k.lower() for k in cfg.label_keys),
                   cfg.label_field, cfg.channels, cfg.image_size, cfg.resize)

    def target(self, shape: Sequence[int]) -> Shape:
        """The shape an image of stored shape (C, H, W) has after conversion."""
        c, h, w = (int(s) for s in shape)
        return self.channels or (3 if c == 4 else c), self.size or h, self.size or w

    @property
    def fixed_shape(self) -> Optional[Shape]:
        """The shape every image gets, when the config fixes both channels and size."""
        return (self.channels, self.size, self.size) if self.channels and self.size else None

    def image_member(self, raw: Dict[str, bytes]) -> str:
        if shards.DUPLICATE in raw:
            raise SampleError("duplicate sample key: another sample of this shard has the same key")
        member = next((k for k in self.image_keys if k in raw), None)
        if member is None:
            has = ", ".join(sorted(k for k in raw if not k.startswith("__"))) or "nothing"
            raise SampleError(f"no image member (it has {has}; data.image_keys is [{', '.join(self.image_keys)}])")
        return member

    def decode(self, raw: Dict[str, bytes]) -> Tuple[np.ndarray, Optional[int], Optional[np.ndarray]]:
        """(image uint8 [C, H, W] converted to the spec, label or None, factors float32 or None)."""
        member = self.image_member(raw)
        data = raw[member]
        if _is_npy(member):
            image = convert_array(npy_image(data), self.channels, self.size, self.resize)
        else:
            try:
                image = load_pil(io.BytesIO(data), self.channels, self.size, self.resize)
            except Exception as e:  # noqa: BLE001 -- PIL raises many types (OSError, SyntaxError, ...)
                raise SampleError(f"undecodable .{member} member ({len(data)} bytes): {e}") from None
        factors = raw.get(shards.FACTORS)
        if factors is not None:
            factors = shards.decode_npy(factors).astype(np.float32, copy=False)
        return image, self.label(raw), factors

    def decode_block(self, block: shards.RawBlock, shape: Optional[Shape]) -> Optional[Columns]:
        """The samples of a block as Columns, with a few numpy operations over its bytes, when every sample
        takes the same path: one .npy image member with one header and nothing to convert (channels, size),
        labels from one ASCII-digits member or none, factors in all or none. Else None: the caller decodes
        sample by sample (`decode`), which also reports what is wrong with a sample. `shape`: the (C, H, W)
        the images must have (None: any)."""
        present = [k for k in self.image_keys if block.member(k) is not None]
        if not present or not _is_npy(present[0]):
            return None
        image = _npy_columns(block, present[0])  # None unless every sample has it (then it is each one's first)
        if image is None or image.dtype != np.uint8:
            return None
        if image.ndim == 3:
            image = image[:, None]  # H x W
        elif image.ndim == 4:
            c, h, w = image.shape[1:]
            if c not in (1, 3, 4) and w in (1, 3, 4):
                image = image.transpose(0, 3, 1, 2)  # H x W x C
            elif c not in (1, 3, 4):
                return None
        else:
            return None
        c, h, w = image.shape[1:]
        if c == 4 or (self.channels or c) != c or (self.size is not None and (h, w) != (self.size, self.size)):
            return None  # conversion through PIL, per sample
        if shape is not None and (c, h, w) != tuple(shape):
            return None  # the per-sample decoder names the sample
        label = None
        has = [k for k in self.label_keys if block.member(k) is not None]
        if has:
            label = _cls_columns(block, has[0])
            if label is None:
                return None
        elif self.label_field and block.member("json") is not None:
            return None
        factors = None
        if block.member(shards.FACTORS) is not None:
            factors = _npy_columns(block, shards.FACTORS)
            if factors is None:
                return None
            factors = factors.astype(np.float32, copy=False)
        return Columns(block.keys(), np.ascontiguousarray(image), label, factors)

    def label(self, raw: Dict[str, bytes]) -> Optional[int]:
        for k in self.label_keys:
            if k in raw:
                try:
                    return int(raw[k])
                except ValueError:
                    raise SampleError(f".{k} member {raw[k][:40]!r} is not an integer label") from None
        if self.label_field and "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except ValueError as e:
                raise SampleError(f"undecodable .json member: {e}") from None
            value = meta.get(self.label_field) if isinstance(meta, dict) else None
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int):
                raise SampleError(f"field {self.label_field!r} of the .json member is {value!r}, not an integer "
                                  "label (data.label_field)")
            return value
        return None
