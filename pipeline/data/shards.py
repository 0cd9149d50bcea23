"""The shard format: writing WebDataset tar shards and their manifest, and decoding samples.

Layout written by `write_dataset` (used by `python -m pipeline.prepare`):

    DIR/train-000000.tar ...  DIR/val-000000.tar ...  DIR/test-000000.tar ...  DIR/manifest.json

A sample is a run of tar members sharing one key (no dots in keys: webdataset splits at the first dot):
    KEY.npy          image, uint8 [C, H, W]  (or KEY.png / KEY.jpg: `prepare --format`)
    KEY.label.cls    optional class label, ASCII integer
    KEY.factors.npy  optional ground-truth generative factors, float32 [F]
so plain `wds.WebDataset(url).decode()` yields {"npy", "label.cls", "factors.npy"}.

Deterministic: same samples in, same bytes out (USTAR headers with mtime 0, uid/gid 0, no user names,
mode 0444; `np.save` headers carry no timestamps; the manifest has sorted keys and no dates).
Atomic: each shard goes to a hidden temp name, is fsynced and renamed; an old manifest is removed
before the first rename and the new one is written (the same way) last, so a killed run leaves either
the old complete dataset or no manifest, and never a half-written file under a final name. While a
writer runs, and after one was killed, DIR/.prepare-incomplete marks the directory (training refuses it,
a new prepare starts it over); one writer at a time (flock on DIR/.write.lock, naming its holder).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from pipeline.run.files import SPLITS, atomic_write, fsync_dir, remove_temp_files, write_json_atomic

MANIFEST = "manifest.json"
INCOMPLETE = ".prepare-incomplete"  # present while a prepare writes (or after one was killed): not a dataset
WRITE_LOCK = ".write.lock"  # flock of the process writing the directory (holder's pid and host inside)
FORMAT = "vae-pipeline-shards/1"
INDEX_FORMAT = "vae-pipeline-index/1"  # `prepare index` manifests (pipeline.data.index)
IMAGE, LABEL, FACTORS = "npy", "label.cls", "factors.npy"  # sample field names (file suffixes)
# gzip-compressed shards (webdataset reads them, several public datasets ship them): read by streaming
# decompression, never through the index (no seeks into a gzip stream); their sha256 is the file's own.
GZIP_SUFFIXES = (".tar.gz", ".tgz")
SHARD_SUFFIXES = (".tar", *GZIP_SUFFIXES)


def is_gzip(name: str) -> bool:
    return name.lower().endswith(GZIP_SUFFIXES)


SHARD_RE = re.compile(rf"^({'|'.join(SPLITS)})-\d{{6}}\.tar$")


def url_scheme(url: str) -> Optional[str]:
    """"pipe", "http", "https", "s3", ... for a URL (a colon before the first slash), None for a local path:
    the one test of "is this remote" in the package (`is_remote`)."""
    first = url.split("/", 1)[0]
    return first.split(":", 1)[0] if ":" in first else None


def is_remote(url: str) -> bool:
    """pipe:, http:, s3:, ... (anything webdataset's gopen opens that is not a local path)."""
    return url_scheme(url) is not None


class ShardFormatError(ValueError):
    """A shard or manifest that does not follow this format; the message names the file."""


# ---------------------------------------------------------------------------------------------- codec
def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_sample(key: str, image: np.ndarray, label: Optional[int] = None,
                  factors: Optional[np.ndarray] = None, fmt: str = IMAGE, quality: int = 95) -> List[Tuple[str, bytes]]:
    """(member name, bytes) pairs of one sample; `image` must be uint8 [C, H, W]; `fmt` npy, png or jpg."""
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"sample {key}: image must be uint8 [C, H, W], got {image.dtype} {image.shape}")
    members = [(f"{key}.{fmt}", npy_bytes(image) if fmt == IMAGE else encode_image(image, fmt, quality))]
    if label is not None:
        members.append((f"{key}.{LABEL}", str(int(label)).encode()))
    if factors is not None:
        members.append((f"{key}.{FACTORS}", npy_bytes(np.asarray(factors, dtype=np.float32))))
    return members


_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG"}  # member suffix -> PIL format name (config.ImageFormat less npy)


def encode_image(image: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """uint8 [C, H, W], C 1 or 3 -> PNG or JPEG bytes (a .png / .jpg member); deterministic for given inputs
    and Pillow version (no timestamps)."""
    from PIL import Image  # only compressed shards need it

    if fmt not in _PIL_FORMATS or image.shape[0] not in (1, 3):
        raise ValueError(f"cannot store a {image.dtype} {image.shape} image as {fmt!r}: "
                         f"expected one of npy, {', '.join(_PIL_FORMATS)} and 1 or 3 channels")
    im = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
    buf = io.BytesIO()
    im.save(buf, _PIL_FORMATS[fmt], **({"quality": quality} if fmt == "jpg" else {}))
    return buf.getvalue()


_NPY_HEADERS: Dict[bytes, Tuple[np.dtype, tuple, bool, int]] = {}  # raw header -> parsed; samples share one


def _npy_header(data: bytes) -> Tuple[np.dtype, tuple, bool, int]:
    """(dtype, shape, Fortran order, element count) from a .npy header alone: nothing is allocated, so a
    header that claims more than the blob holds (112 GiB in 200 bytes) is an error, not an allocation."""
    f = io.BytesIO(data)
    try:
        major, _ = np.lib.format.read_magic(f)
        read = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}.get(major)
        if read is None:
            raise ValueError(f"unsupported .npy format version {major}")
        shape, fortran, dtype = read(f)
    except (ValueError, TypeError, SyntaxError, EOFError) as e:
        raise ValueError(f"bad .npy header: {e}") from None
    if dtype.hasobject:
        raise ValueError(".npy blob holds Python objects (not loaded)")
    count = int(np.prod(shape, dtype=object)) if shape else 1
    return dtype, tuple(shape), bool(fortran), count


def decode_npy(data: bytes) -> np.ndarray:
    """np.load for one .npy blob, parsing each distinct header once (the header parse dominates)."""
    if len(data) < 10 or data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy blob")
    hlen_size = 2 if data[6] == 1 else 4
    start = 8 + hlen_size + int.from_bytes(data[8:8 + hlen_size], "little")
    header = data[:start]
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        parsed = _npy_header(data)
        if len(_NPY_HEADERS) < 64:
            _NPY_HEADERS[header] = parsed
    dtype, shape, fortran, count = parsed
    if len(data) - start != count * dtype.itemsize:
        raise ValueError(f".npy blob holds {len(data) - start} bytes, header says {count * dtype.itemsize}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=start)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def decode_sample(sample: Dict[str, bytes]) -> Tuple[np.ndarray, Optional[int], Optional[np.ndarray]]:
    """Raw sample dict (suffix -> bytes) -> (image uint8 [C, H, W], label or None, factors or None)."""
    if DUPLICATE in sample:
        raise ValueError(f"sample key {sample.get('__key__')!r} occurs twice in the shard")
    if IMAGE not in sample:
        raise ValueError(f"sample {sample.get('__key__')!r} has no .{IMAGE} member (has {sorted(sample)})")
    image = decode_npy(sample[IMAGE])
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"sample {sample.get('__key__')!r}: image is {image.dtype} {image.shape}, "
                         "expected uint8 [C, H, W]")
    label = int(sample[LABEL]) if LABEL in sample else None
    factors = decode_npy(sample[FACTORS]).astype(np.float32, copy=False) if FACTORS in sample else None
    return image, label, factors


# ------------------------------------------------------------------------------------ tar parsing
EXTENDED_HEADERS = (b"L", b"x", b"g", b"K")  # GNU long name / pax extended headers: describe the next member


def member_long_name(kind: bytes, data: bytes) -> Optional[str]:
    """The name an extended header gives the member after it (GNU `L`, pax `x` path=), else None."""
    if kind == b"L":
        return data.split(b"\0", 1)[0].decode()
    if kind == b"x":
        for record in data.decode().split("\n"):
            if " path=" in record:
                return record.split(" path=", 1)[1]
    return None


def header_name(header: bytes) -> str:
    """A member's name from its 512-byte tar header (ustar prefix + name)."""
    name = header[:100].split(b"\0", 1)[0].decode()
    if header[257:262] == b"ustar" and header[345] != 0:
        name = header[345:500].split(b"\0", 1)[0].decode() + "/" + name
    return name


def _octal(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256, for members over 8 GiB
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise ValueError(f"not a tar header (its {what} field is not a number)") from None  # no bytes echoed


def _read_up_to(stream, n: int) -> bytes:
    """Up to n bytes; a large n (a member size field can claim 2^80 bytes) is read in pieces, so a lying
    header costs what the stream holds, not an allocation of n bytes (or an OverflowError)."""
    if n <= 1 << 26:
        return stream.read(n)
    parts, got = [], 0
    while got < n:
        part = stream.read(min(1 << 24, n - got))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


REGULAR = (b"0", b"\0", b"7")  # typeflags of regular files; the rest (directories, links, devices) hold no sample


class TarMember(NamedTuple):
    """One member of a tar archive, as its header (and an extended header before it) describes it."""

    name: str  # ustar prefix + name, or a GNU / pax long name; "" for members that are not regular files
    kind: bytes  # the typeflag (REGULAR: a file)
    offset: int  # archive byte offset of its data (its header is the 512 bytes before)
    size: int  # bytes of data, stored padded to a multiple of 512
    data: Optional[bytes]  # the data, when the parser reads it (None: skipped with a seek)

    @property
    def end(self) -> int:
        """Archive byte offset after its padded data."""
        return self.offset + ((self.size + 511) & ~511)


def tar_members(stream, *, read_data: bool = True, length: Optional[int] = None) -> Iterator[TarMember]:
    """The members of a tar stream in order, extended headers applied to the member after them: the one
    header parser of this package, a minimal ustar/GNU/pax reader about 10x faster than `tarfile` for small
    members, which is most of the loader's time.

    `read_data`: read each member's data sequentially (pipes and HTTP work); False: skip it with seeks
    (a file; `length`, its size, then catches truncated data without reading it). Raises ValueError on a
    bad header (checksum, size field) and EOFError on truncation; a size field may claim 2^80 bytes: it costs
    what the stream holds, never an allocation of that size.
    """
    pos = 0
    long_name: Optional[str] = None
    while True:
        header = stream.read(512)
        if len(header) < 512:
            if not header:
                return  # EOF at a member boundary: an archive without end blocks
            raise EOFError(f"truncated header ({len(header)} of 512 bytes)")
        if header.count(0) == 512:
            return  # end-of-archive block
        if _octal(header[148:156], "checksum") != sum(header) - sum(header[148:156]) + 256:
            raise ValueError("header checksum mismatch")
        size = _octal(header[124:136], "size")
        kind = header[156:157]
        padded = (size + 511) & ~511
        offset, pos = pos + 512, pos + 512 + padded
        if length is not None and pos > length:
            raise EOFError(f"truncated member data ({length - offset} of {padded} bytes)")
        data = None
        if read_data or kind in EXTENDED_HEADERS:
            data = _read_up_to(stream, padded)
            if len(data) < padded:
                raise EOFError(f"truncated member data ({len(data)} of {padded} bytes)")
            data = data[:size] if padded != size else data
        else:
            stream.seek(padded, 1)
        if kind in EXTENDED_HEADERS:
            long_name = member_long_name(kind, data) or long_name
            continue
        name = (long_name or header_name(header)) if kind in REGULAR else ""
        long_name = None
        yield TarMember(name, kind, offset, size, data)


def member_key(name: str) -> Optional[Tuple[str, str]]:
    """(sample key, suffix) of a member name, webdataset's way (the key is the path up to the first dot of
    the file name; the suffix lower-cased); None for members that belong to no sample (no dot, `__` names)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0 or name.startswith("__", slash):
        return None
    return name[:dot], name[dot + 1:].lower()


DUPLICATE = "__duplicate__"  # marks a sample whose key an earlier sample of the shard had: unreadable


def iter_tar_samples(stream, name: str) -> Iterator[Dict[str, bytes]]:
    """Samples (dicts: "__key__" and suffix -> bytes) of a tar stream, grouped by consecutive key
    (webdataset's rule: the key is the path up to the first dot of the file name).

    Errors (truncation, bad headers) raise ShardFormatError naming `name`. A sample whose key an earlier one
    had (or with a member twice) comes with a DUPLICATE member: decoders report it as unreadable, so it
    follows data.on_error at its position (raise: the shard and key named; warn: skipped and counted).
    """
    current: Optional[Dict[str, bytes]] = None
    seen = set()  # keys met so far: a key twice is a DUPLICATE sample (plain webdataset raises; we report it)
    if is_gzip(name):  # decompressed here, so a HashingStream around `stream` hashes the file's bytes
        stream = gzip.GzipFile(fileobj=stream, mode="rb")
    try:
        for member in tar_members(stream):
            split = member_key(member.name) if member.kind in REGULAR else None
            if split is None:
                continue  # directories, links, webdataset metadata, extension-less members
            key, suffix = split
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
                if key in seen:
                    current[DUPLICATE] = b""
                seen.add(key)
            elif suffix in current:  # the same member twice in a row: two samples under one key
                current[DUPLICATE] = b""
            current[suffix] = member.data
    except (EOFError, OSError, ValueError, UnicodeDecodeError, zlib.error) as e:  # gzip: BadGzipFile, EOFError
        raise ShardFormatError(f"{name}: unreadable tar data after sample "
                               f"{current['__key__'] if current else '(none)'}: {e}") from e
    if current is not None:
        yield current


class TarIndex:
    """Where every sample's members lie in one tar file, from its headers alone (`index_tar`): the loader
    then reads a run of samples with one read and builds their arrays with a few numpy operations, instead of
    parsing a header per member and decoding per sample.

    Samples are grouped exactly as iter_tar_samples groups them. `keys`: bytes [n]; `start`, `end`: byte
    range of each sample (its first header to the end of its last member's padded data); `members`: suffix
    -> (data offset, size) int64 arrays [n], -1 where a sample lacks the member. `size`, `mtime_ns`: the file
    as indexed (a changed file is not read through the index)."""

    def __init__(self, keys, start, end, members, size: int, mtime_ns: int):
        self.keys, self.start, self.end, self.members = keys, start, end, members
        self.size, self.mtime_ns = size, mtime_ns

    def __len__(self) -> int:
        return len(self.keys)


class RawBlock:
    """Samples lo .. hi-1 of one indexed tar file as one read buffer (uint8) starting at file offset `base`."""

    def __init__(self, buf: np.ndarray, base: int, index: TarIndex, lo: int, hi: int):
        self.buf, self.base, self.index, self.lo, self.hi = buf, base, index, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def keys(self) -> List[str]:
        return [k.decode() for k in self.index.keys[self.lo:self.hi].tolist()]

    def member(self, suffix: str) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """(offsets into buf, sizes) of a member of these samples (-1: absent), or None if none has it."""
        col = self.index.members.get(suffix)
        if col is None:
            return None
        offs, sizes = col[0][self.lo:self.hi], col[1][self.lo:self.hi]
        if not (offs >= 0).any():
            return None
        return np.where(offs >= 0, offs - self.base, -1), sizes

    def raws(self) -> List[Dict[str, bytes]]:
        """The samples as iter_tar_samples yields them ({"__key__", suffix -> bytes})."""
        out = [{"__key__": k} for k in self.keys()]
        for suffix in self.index.members:
            offs, sizes = self.member(suffix) or (None, None)
            if offs is None:
                continue
            for raw, o, n in zip(out, offs.tolist(), sizes.tolist()):
                if o >= 0:
                    raw[suffix] = self.buf[o:o + n].tobytes()
        return out

    def gather(self, offs: np.ndarray, width: int) -> np.ndarray:
        """[n, width] uint8: `width` bytes from each offset (a strided view when the offsets are evenly spaced,
        as in shards whose samples all have one layout; else a copy)."""
        n = len(offs)
        if n == 0:
            return np.zeros((0, width), dtype=np.uint8)
        step = int(offs[1] - offs[0]) if n > 1 else 0
        if step > 0 and (n == 2 or bool((np.diff(offs) == step).all())) and offs[-1] + width <= len(self.buf):
            return np.lib.stride_tricks.as_strided(self.buf[offs[0]:], shape=(n, width), strides=(step, 1),
                                                   writeable=False)
        return np.stack([self.buf[o:o + width] for o in offs.tolist()])


def index_tar(path: str) -> Optional[TarIndex]:
    """A TarIndex of a local tar file, or None when the file is not one this reads without doubt (a bad
    header, truncation, a link or device member, a key twice): callers then parse it the usual way, which
    reports what is wrong. Reads headers only (`tar_members` skips the data with seeks). None for a gzip
    shard: it is read by streaming decompression."""
    if is_gzip(str(path)):
        return None
    keys: List[bytes] = []
    start: List[int] = []
    end: List[int] = []
    members: Dict[str, Tuple[List[int], List[int]]] = {}
    seen = set()
    current: Optional[str] = None
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            for member in tar_members(f, read_data=False, length=st.st_size):
                if member.kind not in REGULAR:
                    return None  # directories, links, devices: rare in shards; the parser handles them
                split = member_key(member.name)
                if split is None:
                    continue  # webdataset metadata or extension-less members, as the parser skips them
                key, suffix = split
                if key != current:
                    if key in seen:
                        return None  # a duplicate sample key: the parser reports it
                    seen.add(key)
                    current = key
                    keys.append(key.encode())
                    start.append(member.offset - 512)
                    end.append(member.end)
                n = len(keys) - 1
                offs, sizes = members.setdefault(suffix, ([-1] * n, [-1] * n))
                offs += [-1] * (n - len(offs))
                sizes += [-1] * (n - len(sizes))
                if len(offs) > n:
                    return None  # a suffix twice in one sample: the parser keeps the last; rare
                offs.append(member.offset)
                sizes.append(member.size)
                end[-1] = member.end
    except (OSError, EOFError, ValueError, UnicodeDecodeError):
        return None
    n = len(keys)
    cols = {}
    for suffix, (offs, sizes) in members.items():
        cols[suffix] = (np.array(offs + [-1] * (n - len(offs)), dtype=np.int64),
                        np.array(sizes + [-1] * (n - len(sizes)), dtype=np.int64))
    return TarIndex(np.array(keys, dtype=bytes) if keys else np.array([], dtype="S1"),
                    np.array(start, dtype=np.int64), np.array(end, dtype=np.int64), cols,
                    st.st_size, st.st_mtime_ns)


# ------------------------------------------------------------------------------------------ writing
def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(path: Path, samples: Iterable[List[Tuple[str, bytes]]]) -> Tuple[int, str]:
    """Write encoded samples to `path` atomically (files.atomic_write); returns (count, sha256)."""
    count, digest = 0, []

    def write(f) -> None:
        nonlocal count
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for members in samples:
                for name, data in members:
                    tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
                count += 1

    atomic_write(path, write, check=lambda tmp: digest.append(sha256_file(tmp)))
    return count, digest[0]


# A chunk source: indices -> (images uint8 [k, C, H, W], labels int [k] or None, factors float32 [k, F] or None)
FetchFn = Callable[[np.ndarray], Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]]


def _encoded(fetch: FetchFn, indices: np.ndarray, key_fn: Callable[[int], str], chunk: int,
             progress, fmt: str, quality: int) -> Iterator[List[Tuple[str, bytes]]]:
    for lo in range(0, len(indices), chunk):
        idx = indices[lo:lo + chunk]
        images, labels, factors = fetch(idx)
        for j, i in enumerate(idx):
            yield encode_sample(key_fn(int(i)), images[j],
                                None if labels is None else int(labels[j]),
                                None if factors is None else factors[j], fmt, quality)
        if progress is not None:
            progress.update(len(idx))


def write_dataset(out_dir: Path, fetch: FetchFn, splits: Dict[str, np.ndarray], *, shard_size: int,
                  shape: Sequence[int], source: str, key_fn: Callable[[int], str],
                  meta: Optional[dict] = None, progress: bool = True, chunk: int = 1024, fmt: str = IMAGE,
                  quality: int = 95, unit: str = "sample") -> dict:
    """Write every split's shards, then the manifest; returns the manifest.

    `splits` maps split name -> source indices in write order. `meta` goes into the manifest top level
    (dataset name, seed, classes, factor names, ...). `chunk` samples are fetched (held decoded) at a time.
    Images are stored as `fmt` (npy, png, or jpg at `quality`). Stale shards of an earlier run into the
    same directory are removed once the new manifest is in place.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = _writer_lock(out_dir)
    try:
        return _write_dataset(out_dir, fetch, splits, shard_size=shard_size, shape=shape, source=source,
                              key_fn=key_fn, meta=meta, progress=progress, chunk=chunk, fmt=fmt, quality=quality,
                              unit=unit)
    finally:
        os.ftruncate(lock, 0)  # no holder any more (and the directory's bytes do not depend on the pid)
        os.close(lock)  # releases the flock


class WriterBusyError(ValueError):
    """Another process is writing a dataset into the same directory; the message names it."""


def _writer_lock(out_dir: Path) -> int:
    """An exclusive flock on DIR/.write.lock (dies with its process), holding who took it; a second writer
    gets WriterBusyError naming the first (pid, host, since)."""
    import fcntl

    from pipeline.run.rundir import describe_holder, holder_info

    fd = os.open(out_dir / WRITE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode())
        except ValueError:
            holder = None
        os.close(fd)
        raise WriterBusyError(f"{out_dir}: another prepare is writing into this directory: "
                              f"{describe_holder(holder)}; wait for it to end, or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder_info()) + "\n").encode(), 0)
    return fd


def _write_dataset(out_dir: Path, fetch: FetchFn, splits: Dict[str, np.ndarray], *, shard_size: int,
                   shape: Sequence[int], source: str, key_fn: Callable[[int], str], meta: Optional[dict],
                   progress: bool, chunk: int, fmt: str, quality: int, unit: str) -> dict:
    from pipeline.progress import progress_bar  # only the writer needs it

    incomplete = out_dir / INCOMPLETE  # until the manifest is in place: training refuses the directory
    incomplete.write_text("a prepare into this directory started and has not finished\n")
    fsync_dir(out_dir)
    remove_temp_files(out_dir)  # of a killed run
    (out_dir / MANIFEST).unlink(missing_ok=True)  # from now on the directory is "not prepared"
    fsync_dir(out_dir)

    manifest = {"format": FORMAT, "source": source, "shape": list(shape), "dtype": "uint8",
                **(meta or {}), "splits": {}}
    if fmt != IMAGE:  # npy manifests stay byte-identical to those written before formats existed
        manifest["image_format"] = fmt if fmt == "png" else f"{fmt} quality {quality}"
    total = sum(len(v) for v in splits.values())
    bar = progress_bar(total=total, unit=unit, desc=f"writing {out_dir}", disable=not progress, leave=False)
    written = set()
    with bar:
        for split, indices in splits.items():
            shards = []
            for s, lo in enumerate(range(0, len(indices), shard_size)):
                name = f"{split}-{s:06d}.tar"
                count, digest = write_shard(out_dir / name, _encoded(
                    fetch, indices[lo:lo + shard_size], key_fn, chunk, bar, fmt, quality))
                shards.append({"name": name, "samples": count, "sha256": digest})
                written.add(name)
            manifest["splits"][split] = {"total": int(len(indices)), "shape": list(shape), "dtype": "uint8",
                                         "source": source, "shards": shards}
    fsync_dir(out_dir)
    write_json_atomic(out_dir / MANIFEST, manifest, indent=1)  # indent 1: manifests stay byte-identical
    for old in out_dir.iterdir():
        if SHARD_RE.match(old.name) and old.name not in written:
            old.unlink()
    incomplete.unlink()
    fsync_dir(out_dir)
    return manifest


# ------------------------------------------------------------------------------------------ reading
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_manifest(path: Path) -> dict:
    """Parse and sanity-check a manifest (field types included); errors name the file, the field and the
    problem. A manifest is data: where its shards may be is checked by `shard_location`."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardFormatError(f"{path}: manifest not found") from None
    except (OSError, ValueError) as e:
        raise ShardFormatError(f"{path}: cannot read manifest: {e}") from None
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    if not isinstance(splits, dict):
        raise ShardFormatError(f"{path}: not a shard manifest (no 'splits' table)")
    for key in ("shape",):
        value = manifest.get(key)
        if value is not None and not (isinstance(value, list) and all(_is_int(d) and d > 0 for d in value)):
            raise ShardFormatError(f"{path}: field {key!r} is {str(value)[:60]}, expected a list of positive integers")
    for split, entry in splits.items():
        where = f"{path}: split {split!r}"
        if not isinstance(entry, dict):
            raise ShardFormatError(f"{where} is {type(entry).__name__}, expected a table")
        shards = entry.get("shards")
        if not isinstance(shards, list) or any(not isinstance(s, dict) or "name" not in s or "samples" not in s
                                               for s in shards):
            raise ShardFormatError(f"{where} has no valid 'shards' list")
        seen = set()
        for i, s in enumerate(shards):
            name, samples, digest = s["name"], s["samples"], s.get("sha256")
            if not isinstance(name, str) or not name:
                raise ShardFormatError(f"{where}: shard {i} has name {str(name)[:60]}, expected a file name")
            if name in seen:
                raise ShardFormatError(f"{where}: shard {name} is listed twice (it would be read twice per epoch)")
            seen.add(name)
            if not _is_int(samples) or samples < 0:
                raise ShardFormatError(f"{where}: shard {name}: 'samples' is {str(samples)[:40]}, "
                                       "expected a non-negative integer")
            if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
                raise ShardFormatError(f"{where}: shard {name}: 'sha256' is {str(digest)[:40]}, expected 64 hex digits")
        if not _is_int(entry.get("total")) or sum(s["samples"] for s in shards) != entry.get("total"):
            raise ShardFormatError(f"{where}: shard sample counts do not add up to 'total'")
        value = entry.get("shape")
        if value is not None and not (isinstance(value, list) and all(_is_int(d) and d > 0 for d in value)):
            raise ShardFormatError(f"{where}: field 'shape' is {str(value)[:60]}, expected a list of positive integers")
        value = entry.get("shapes")
        if value is not None and not (isinstance(value, dict) and all(
                isinstance(k, str) and re.fullmatch(r"\d+x\d+x\d+", k) for k in value)):
            raise ShardFormatError(f"{where}: field 'shapes' is {str(value)[:60]}, expected a table of CxHxW shapes")
        value = entry.get("members")
        if value is not None and not (isinstance(value, (dict, list)) and all(isinstance(k, str) for k in value)):
            raise ShardFormatError(f"{where}: field 'members' is {str(value)[:60]}, expected member suffixes")
    return manifest


def shard_location(path: Path, manifest: dict, name: str) -> str:
    """Where a shard a manifest at `path` names is: a path inside the manifest's directory; for an index
    (`prepare index`), also the absolute path or http(s) URL it was indexed from. Never a `pipe:` command
    (a downloaded manifest would run it: only what the user types may be one), never outside the directory
    through `..` or a link. Anything else is a ShardFormatError naming the manifest and the entry."""
    path = Path(path)
    index = manifest.get("format") == INDEX_FORMAT
    scheme = url_scheme(name)
    if scheme == "pipe":
        raise ShardFormatError(f"{path}: shard entry {name[:80]!r} is a pipe: command; a manifest is data and "
                               "may not run commands (type pipe: sources yourself: data.train='pipe:...')")
    if scheme is not None:
        if index and scheme in ("http", "https") and name.split("/")[1:2] == [""]:
            return name
        raise ShardFormatError(f"{path}: shard entry {name[:80]!r}: a manifest's shards are files in its "
                               "directory (an index's: also absolute paths and http(s) URLs)")
    if os.path.isabs(name):
        if index and ".." not in Path(name).parts:
            return name
        raise ShardFormatError(f"{path}: shard entry {name[:80]!r} is an absolute path; this manifest's shards "
                               "must be files in its directory")
    base = path.parent.resolve()
    target = (path.parent / name).resolve()
    if ".." in Path(name).parts or (target != base and base not in target.parents):
        raise ShardFormatError(f"{path}: shard entry {name[:80]!r} lies outside {path.parent}")
    return str(path.parent / name)


def verify_dataset(out_dir: Path) -> List[str]:
    """Problems found by re-hashing every shard named in DIR/manifest.json (empty list: all good)."""
    out_dir = Path(out_dir)
    manifest = load_manifest(out_dir / MANIFEST)
    problems = []
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            path = Path(shard_location(out_dir / MANIFEST, manifest, shard["name"]))
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif sha256_file(path) != shard.get("sha256"):
                problems.append(f"{path}: sha256 differs from the manifest")
    return problems
