"""Lazy, validated reading of safetensors checkpoints.

:class:`ModelFiles` opens a model directory, parses every shard's header (8-byte little-endian
length + JSON, see https://github.com/huggingface/safetensors#format) and checks it against the
file size *before* any tensor is read, so a truncated or corrupt file is reported up front with
its name. Every file is reached through :mod:`.untrusted`: it must resolve inside the model
directory (symlinks included) and be a regular file. Tensors are then served one at a time from
a read-only ``mmap``: a tensor costs page cache, not a private copy, and the whole model is never
materialised.

Pickle checkpoints (``pytorch_model*.bin``) are refused unless ``allow_pickle=True``; even then
they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from mergeserve.errors import InputError
from mergeserve.merge.untrusted import model_bound, open_regular, parse_json, read_capped, resolve_inside


class DType(NamedTuple):
    torch: torch.dtype
    itemsize: int  # bytes per element


# safetensors dtype codes -> (torch dtype, bytes per element)
ST_DTYPES: dict[str, DType] = {
    "F64": DType(torch.float64, 8), "F32": DType(torch.float32, 4), "F16": DType(torch.float16, 2),
    "BF16": DType(torch.bfloat16, 2), "I64": DType(torch.int64, 8), "I32": DType(torch.int32, 4),
    "I16": DType(torch.int16, 2), "I8": DType(torch.int8, 1), "U8": DType(torch.uint8, 1), "BOOL": DType(torch.bool, 1),
    "F8_E4M3": DType(torch.float8_e4m3fn, 1), "F8_E5M2": DType(torch.float8_e5m2, 1),
}
TORCH_TO_ST = {v.torch: k for k, v in ST_DTYPES.items()}
_MAX_HEADER = 100_000_000  # the safetensors library's limit
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
# Far above any real file (a 671B model's index is ~10 MB, configs a few KB), far below memory.
MAX_INDEX_BYTES = 256 << 20
MAX_CONFIG_BYTES = 16 << 20


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of safetensors dtype code ``dtype`` and ``shape``."""
    n = ST_DTYPES[dtype].itemsize
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype code, shape and byte range inside the data section."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_DTYPES[self.dtype].torch


U64_MAX = 2**64 - 1  # offsets and sizes are u64 (usize) in the reference reader
I64_MAX = 2**63 - 1  # torch's sizes are int64


def _is_u64(x: object) -> bool:
    return type(x) is int and 0 <= x <= U64_MAX  # type(): True is an int to isinstance


def read_header(path: Path, label: str | Path | None = None) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header; raises InputError naming ``label``
    (default: the path) and, where one is at fault, the tensor.

    The rules are the format's, as the safetensors library applies them (checked against it by
    tests/merge/test_reader_fuzz.py): an 8-byte length, then a JSON object of at most 100 MB;
    ``__metadata__`` a map of strings; each tensor a known dtype, a shape of non-negative
    integers whose element count does not overflow u64, and two integer ``data_offsets`` whose
    span is the shape times the dtype's size; sorted by offset, the tensors tile the data section
    exactly: from 0, without gaps or overlaps, to the last byte of the file. Stricter than the
    library: a key given twice is refused (it keeps the last), and so are dtypes this project
    cannot merge, nesting deeper than 64, and dimensions beyond torch's int64.
    """
    name = str(label or path)
    with open_regular(path, name) as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise InputError(f"{name}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise InputError(f"{name}: corrupt safetensors header (length {n} exceeds the {_MAX_HEADER}-byte limit)")
        if 8 + n > size:
            raise InputError(f"{name}: corrupt or truncated safetensors header (length {n}, file {size} bytes)")
        blob = f.read(n)
    if len(blob) != n:
        raise InputError(f"{name}: truncated safetensors header (the file shrank while being read)")
    header = parse_json(blob, f"{name}: safetensors header")
    if not isinstance(header, dict):
        raise InputError(f"{name}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    return _check_header(header, name, path, 8 + n, size)


def _check_header(header: dict, name: str, path: Path, base: int, size: int) -> dict[str, TensorInfo]:
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise InputError(f"{name}: __metadata__ must be a map of strings to strings")
    spans = []
    for tensor, entry in header.items():
        if tensor == "__metadata__":
            continue
        where = f"{name}: tensor {tensor!r}"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: header entry is not an object")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
        if missing:
            raise InputError(f"{where}: header entry lacks {', '.join(missing)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ST_DTYPES:
            raise InputError(f"{where} has unsupported dtype {dtype!r} (known: {', '.join(ST_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
            raise InputError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if any(d > I64_MAX for d in shape):  # the library allows it when another dimension is 0
            raise InputError(f"{where}: shape {shape} has a dimension beyond torch's int64 limit")
        count = 1
        for d in shape:
            count *= d
            if count > U64_MAX:  # as the library: any overflowing prefix refuses the file
                raise InputError(f"{where}: shape {shape} overflows")
        nbytes = count * ST_DTYPES[dtype].itemsize
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_u64(o) for o in offsets)):
            raise InputError(f"{where}: data_offsets {offsets!r} are not two non-negative integers")
        a, b = offsets
        if b < a or b - a != nbytes:
            raise InputError(f"{where}: byte range {offsets} does not match its shape {shape} ({nbytes} bytes of {dtype})")
        spans.append((a, b, tensor, dtype, tuple(shape)))
    spans.sort(key=lambda s: (s[0], s[1]))
    end = 0
    out: dict[str, TensorInfo] = {}
    for a, b, tensor, dtype, shape in spans:
        if a != end:
            how = "overlaps the tensor before it" if a < end else f"leaves a gap of {a - end} bytes before it"
            raise InputError(f"{name}: tensor {tensor!r}: data_offsets {[a, b]} {how}")
        end = b
        out[tensor] = TensorInfo(str(path), dtype, shape, base + a, base + b)
    if base + end != size:
        if base + end > size:
            raise InputError(f"{name}: truncated: the tensors end at byte {base + end}, the file has {size}")
        raise InputError(f"{name}: {size - base - end} bytes after the last tensor (the tensors must end at the end of the file)")
    return out


class ModelFiles:
    """All tensors of one model directory, by name, read lazily."""

    def __init__(self, directory: str | Path, *, allow_pickle: bool = False, label: str | None = None):
        self.dir = Path(directory)
        self.label = label or str(directory)
        self.allow_pickle = allow_pickle
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()
        self._pickled: dict[str, dict[str, torch.Tensor]] = {}
        if not self.dir.is_dir():
            raise InputError(f"model {self.label}: {self.dir} is not a readable directory")
        self.tensors: dict[str, TensorInfo] = {}
        for shown, f in shard_files(self.dir, allow_pickle=allow_pickle, label=self.label):
            if shown.endswith(".bin"):
                self._load_pickle(f, shown)
                continue
            for name, info in read_header(f, shown).items():
                if name in self.tensors:
                    raise InputError(f"{shown}: tensor {name!r} also appears in {self.tensors[name].file}")
                self.tensors[name] = info
        if not self.tensors:
            raise InputError(f"model {self.label}: no tensors found in {self.dir}")

    def _load_pickle(self, f: Path, shown: str) -> None:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - any failure means a corrupt file
            raise InputError(f"{shown}: cannot load pickle checkpoint: {e}") from None
        if not isinstance(sd, dict):
            raise InputError(f"{shown}: not a checkpoint of named tensors (holds a {type(sd).__name__})")
        for name, t in sd.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise InputError(f"{shown}: not a checkpoint of named tensors ({name!r} is a {type(t).__name__}, not a tensor)")
            if t.dtype not in TORCH_TO_ST or t.layout != torch.strided:
                raise InputError(f"{shown}: tensor {name!r} has unsupported type {t.dtype} ({t.layout})")
        self._pickled[str(f)] = sd
        for name, t in sd.items():
            self.tensors[name] = TensorInfo(str(f), TORCH_TO_ST[t.dtype], tuple(t.shape), 0, t.numel() * t.element_size())

    def config(self) -> dict:
        """The model's ``config.json``: a JSON object (InputError for anything else)."""
        shown = self.dir / CONFIG
        p = resolve_inside(self.dir, CONFIG, str(shown))
        if p is None:
            raise InputError(f"model {self.label}: missing {shown}")
        cfg = parse_json(read_capped(p, MAX_CONFIG_BYTES, str(shown)), str(shown), strict=False)
        if not isinstance(cfg, dict):
            raise InputError(f"{shown}: must be a JSON object, not a {type(cfg).__name__}")
        return cfg

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise InputError(f"model {self.label}: tensor {name!r} is missing") from None

    def _map(self, file: str) -> mmap.mmap:
        with self._lock:  # tensors of one model are read from several merge threads
            m = self._maps.get(file)
            if m is None:
                with open_regular(file) as f:
                    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._maps[file] = m
            return m

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``: a read-only view of the page cache (do not modify in place)."""
        info = self.info(name)
        if info.file in self._pickled:
            return self._pickled[info.file][name]
        dtype, itemsize = ST_DTYPES[info.dtype]
        count = info.nbytes // itemsize
        if count == 0:
            return torch.empty(info.shape, dtype=dtype)
        buf = memoryview(self._map(info.file))[info.start : info.end]
        import warnings

        with warnings.catch_warnings():  # frombuffer warns that the mmap is read-only: we never write to it
            warnings.simplefilter("ignore")
            t = torch.frombuffer(buf, dtype=dtype, count=count)
        return t.view(info.shape)

    def release(self, name: str) -> None:
        """Drop ``name``'s pages from this process's mapping once merged (they stay in the page
        cache). Without this every input page ever touched counts toward our RSS, so a merge's
        resident memory would grow to the size of its inputs."""
        info = self.info(name)
        m = self._maps.get(info.file)
        if m is None or info.end <= info.start:
            return
        start = info.start - info.start % mmap.PAGESIZE
        m.madvise(mmap.MADV_DONTNEED, start, info.end - start)

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:
                pass  # a view is still alive; the mapping goes when it does
        self._maps.clear()


def shard_files(directory: Path, *, allow_pickle: bool, label: str) -> list[tuple[str, Path]]:
    """(name as shown to the user, real path) of each weight file of a model directory: those its
    index lists, else its ``*.safetensors``, else (with ``allow_pickle``) its
    ``pytorch_model*.bin``. Each one resolves to a regular file inside the model (see
    :func:`~mergeserve.merge.untrusted.resolve_inside`)."""
    index = directory / INDEX
    if os.path.lexists(index):
        names = _index_entries(directory, index)
        where = {n: f"{index}: weight_map entry {n!r}" for n in names}
    else:
        names = [p.name for p in sorted(directory.glob("*.safetensors"))]
        if not names:
            names = [p.name for p in sorted(directory.glob("pytorch_model*.bin"))]
            if names and not allow_pickle:
                raise InputError(
                    f"model {label}: only pickle checkpoints ({names[0]}) found; "
                    "pickle loading is refused unless --allow-pickle is given"
                )
        if not names:
            raise InputError(f"model {label}: no *.safetensors files in {directory}")
        where = {n: str(directory / n) for n in names}
    out, missing = [], []
    bound = model_bound(directory)
    for n in names:
        if n.endswith(".bin") and not allow_pickle:
            raise InputError(f"{where[n]}: a pickle checkpoint; pickle loading is refused unless --allow-pickle is given")
        real = resolve_inside(directory, n, where[n], bound)
        if real is None:
            missing.append(str(directory / n))
        else:
            out.append((str(directory / n), real))
    if missing:
        what = f"{index}: lists missing shard file(s)" if os.path.lexists(index) else f"model {label}: broken symbolic link(s)"
        raise InputError(f"{what}: {', '.join(missing)}")
    return out


def _index_entries(directory: Path, index: Path) -> list[str]:
    """The shard files ``model.safetensors.index.json`` lists (sorted, each once)."""
    real = resolve_inside(directory, INDEX, str(index))
    if real is None:  # a dangling symlink
        raise InputError(f"{index}: missing (a broken symbolic link)")
    data = parse_json(read_capped(real, MAX_INDEX_BYTES, str(index)), str(index))
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        got = type(weight_map).__name__ if isinstance(data, dict) and "weight_map" in data else "nothing"
        raise InputError(f"{index}: 'weight_map' must be a non-empty object of tensor names to shard files (found {got})")
    bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if bad:
        raise InputError(f"{index}: weight_map entry {bad[0]!r} is {bad[1]!r}, not a shard file name")
    return sorted(set(weight_map.values()))


def fingerprint(directory: str | Path) -> str:
    """Cheap identity of a model's files: names, sizes, mtimes and each header's hash."""
    d = Path(directory)
    h = hashlib.sha256()
    files = [real for _, real in shard_files(d, allow_pickle=True, label=str(d))]
    cfg = resolve_inside(d, CONFIG, str(d / CONFIG))
    for f in sorted(files) + ([cfg] if cfg else []):
        with open_regular(f) as fh:
            st = os.fstat(fh.fileno())
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime_ns)}".encode())
            if f.suffix == ".safetensors":
                raw = fh.read(8)
                (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (0,)
                h.update(fh.read(min(n, _MAX_HEADER)))
    return h.hexdigest()
