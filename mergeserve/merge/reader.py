"""Lazy, validated reading of safetensors checkpoints.

:class:`ModelFiles` opens a model directory, parses every shard's header (8-byte little-endian
length + JSON, see https://github.com/huggingface/safetensors#format) and checks it against the
file size *before* any tensor is read, so a truncated or corrupt file is reported up front with
its name. Tensors are then served one at a time from a read-only ``mmap``: a tensor costs page
cache, not a private copy, and the whole model is never materialised.

Pickle checkpoints (``pytorch_model*.bin``) are refused unless ``allow_pickle=True``; even then
they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from mergeserve.errors import InputError


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
_MAX_HEADER = 100 * 1024 * 1024


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


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header; raises InputError naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise InputError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise InputError(f"{path}: corrupt or truncated safetensors header (length {n}, file {size} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header")
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if dtype not in ST_DTYPES:
            raise InputError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        count = 1
        for d in shape:
            count *= d
        if b - a != count * ST_DTYPES[dtype][1] or a < 0:
            raise InputError(f"{path}: tensor {name!r}: byte range does not match its shape {list(shape)}")
        if base + b > size:
            raise InputError(f"{path}: truncated: tensor {name!r} ends at byte {base + b}, file has {size}")
        out[name] = TensorInfo(str(path), dtype, shape, base + a, base + b)
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
        files = self._shard_files()
        for f in files:
            if f.suffix == ".bin":
                self._load_pickle(f)
                continue
            for name, info in read_header(f).items():
                if name in self.tensors:
                    raise InputError(f"{f}: tensor {name!r} also appears in {self.tensors[name].file}")
                self.tensors[name] = info
        if not self.tensors:
            raise InputError(f"model {self.label}: no tensors found in {self.dir}")

    def _shard_files(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError):
                raise InputError(f"{index}: unreadable or corrupt index (needs 'weight_map')") from None
            files = sorted({self.dir / v for v in weight_map.values()})
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise InputError(f"{index}: lists missing shard file(s): {', '.join(missing)}")
            return files
        st = sorted(self.dir.glob("*.safetensors"))
        if st:
            return st
        bins = sorted(self.dir.glob("pytorch_model*.bin"))
        if bins:
            if not self.allow_pickle:
                raise InputError(
                    f"model {self.label}: only pickle checkpoints ({bins[0].name}) found; "
                    "pickle loading is refused unless --allow-pickle is given"
                )
            return bins
        raise InputError(f"model {self.label}: no *.safetensors files in {self.dir}")

    def _load_pickle(self, f: Path) -> None:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - any failure means a corrupt file
            raise InputError(f"{f}: cannot load pickle checkpoint: {e}") from None
        self._pickled[str(f)] = sd
        for name, t in sd.items():
            self.tensors[name] = TensorInfo(str(f), TORCH_TO_ST[t.dtype], tuple(t.shape), 0, t.numel() * t.element_size())

    def config(self) -> dict:
        p = self.dir / "config.json"
        try:
            return json.loads(p.read_text())
        except OSError:
            raise InputError(f"model {self.label}: missing {p}") from None
        except ValueError:
            raise InputError(f"{p}: not valid JSON") from None

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
                with open(file, "rb") as f:
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


def fingerprint(directory: str | Path) -> str:
    """Cheap identity of a model's files: names, sizes, mtimes and each header's hash."""
    d = Path(directory)
    h = hashlib.sha256()
    for f in sorted(list(d.glob("*.safetensors")) + list(d.glob("*.bin")) + list(d.glob("config.json"))):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime_ns)}".encode())
        if f.suffix == ".safetensors":
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                h.update(fh.read(min(n, _MAX_HEADER)))
    return h.hexdigest()
