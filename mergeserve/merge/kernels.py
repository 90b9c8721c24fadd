"""Fused one-pass CPU loops over bfloat16 tensors (``kernels.c``, built here with the system's C
compiler on first use and cached).

Why: torch runs each elementwise step as its own pass over memory (convert to float32, divide,
convert, divide, multiply, ...), and on a CPU-bound warm merge those passes were most of the merge
math (per element on one core: a bf16 slerp 6.4 ns op by op, 2.2 fused; linear 11.7 against ~1.5;
block FP8 quantization ~3.4 against ~1.2). These loops do the same float32 operations, in the same
order, per element in one pass, so every result is bit-identical to the torch expression named in
each docstring (and so to mergekit). Sums stay in torch (its cascade order is not worth copying),
except the L2 norm: torch accumulates it in one SIMD vector of 8 float32 lanes, which
:func:`chunk_norms` copies. :func:`matches_torch` checks every loop against the installed torch
before the merge uses them; where it fails, or no C compiler is found, the methods keep to torch's
own ops (slower, the same bits).

Built with ``-ffp-contract=off`` (a multiply is fused into an add only where the C says
``fmaf``, as torch's ``addcmul_`` does), without ``-ffast-math``, and with ``-fno-math-errno``
(``rintf`` and ``sqrtf`` then vectorise; no result changes); ``-march=native``, so the cached
library is keyed by this CPU's flags too. ctypes releases the GIL during each call, so the merge
threads run them side by side.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-fPIC", "-shared", "-std=gnu11"]
_build_lock = threading.Lock()

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
SIGNATURES = {
    "chunk_norms": [_ptr, _i64, _i64, _ptr],
    "scaled_product": [_ptr, _ptr, _i64, _f32, _f32, _ptr],
    "combine": [_ptr, _ptr, _i64, _f32, _f32, _ptr],
    "weighted_sum": [_ptr, _ptr, _i64, _i64, _f32, _ptr],
    "quantize_e4m3_blocks": [_ptr, _i64, _i64, _ptr, _ptr],
    "e4m3_cast": [_ptr, _i64, _ptr],
}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _cache_dirs() -> list[Path]:
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergeserve"
    return [SOURCE.parent / "__pycache__", home]


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built loops, or None (no C compiler, or the build failed: logged once)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler: merge math uses torch's ops (slower, the same bits)")
        return None
    key = hashlib.sha256(repr((SOURCE.read_bytes(), cc, CFLAGS, platform.machine(), _cpu_flags())).encode()).hexdigest()[:16]
    with _build_lock:
        for d in _cache_dirs():
            lib = d / f"kernels-{key}.so"
            if not lib.exists() and not _build(cc, d, lib):
                continue
            try:
                return _bind(ctypes.CDLL(str(lib)))
            except OSError as e:
                log.info("cannot load %s: %s", lib, e)
    log.info("could not build %s: merge math uses torch's ops (slower, the same bits)", SOURCE.name)
    return None


def _build(cc: str, directory: Path, lib: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".so.tmp")
        os.close(fd)
        try:
            subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE), "-lm"], check=True, capture_output=True, timeout=120)
            os.replace(tmp, lib)  # atomic: another process may build the same library meanwhile
        finally:
            Path(tmp).unlink(missing_ok=True)
        return True
    except (OSError, subprocess.SubprocessError) as e:
        log.info("building %s in %s failed: %s", SOURCE.name, directory, getattr(e, "stderr", b"") or e)
        return False


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    return lib


def fusable(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can go through the loops: contiguous bfloat16 on the CPU, and the
    loops built and equal to this torch (:func:`matches_torch`)."""
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() for t in tensors) and matches_torch()


def chunk_norms(a: torch.Tensor, chunk: int) -> torch.Tensor:
    """L2 norm of each ``chunk``-element piece of bfloat16 ``a`` (shape ``[n]``) -> float32 ``[ceil(n / chunk)]``;
    bit for bit ``torch.linalg.vector_norm(a[s:s + chunk].float().reshape(1, -1), dim=1)`` per piece."""
    out = torch.empty(-(-a.numel() // chunk), dtype=torch.float32)
    library().chunk_norms(a.data_ptr(), a.numel(), chunk, out.data_ptr())
    return out


def scaled_product(a: torch.Tensor, b: torch.Tensor, na: float, nb: float, out: torch.Tensor) -> torch.Tensor:
    """``out[:n] = (a.float() / na) * (b.float() / nb)``; ``a``, ``b`` bfloat16 of shape ``[n]``;
    ``out`` a float32 buffer of at least ``n`` elements. Returns ``out[:n]``."""
    n = a.numel()
    library().scaled_product(a.data_ptr(), b.data_ptr(), n, na, nb, out.data_ptr())
    return out[:n]


def combine(a: torch.Tensor, b: torch.Tensor, ca: float, cb: float, out: torch.Tensor) -> torch.Tensor:
    """``out = (ca * a.float() + cb * b.float()).bfloat16()``; all three bfloat16 of shape ``[n]``."""
    library().combine(a.data_ptr(), b.data_ptr(), a.numel(), ca, cb, out.data_ptr())
    return out


def weighted_sum(xs: Sequence[torch.Tensor], weights: torch.Tensor, den: float, out: torch.Tensor) -> torch.Tensor:
    """``out = (acc / den).bfloat16()`` with ``acc = 0; acc.addcmul_(x, w)`` for each ``x``, ``w``
    in order, in float32 (torch fuses each step into one multiply-add); ``xs`` and ``out``
    bfloat16 of shape ``[n]``, ``weights`` float32 ``[len(xs)]``."""
    ptrs = (ctypes.c_void_p * len(xs))(*(x.data_ptr() for x in xs))
    w = weights.contiguous()
    library().weighted_sum(ptrs, w.data_ptr(), len(xs), out.numel(), den, out.data_ptr())
    return out


def quantize_e4m3_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block FP8 of a contiguous bfloat16 ``[rows, cols]``: (float8_e4m3fn ``[rows, cols]``,
    float32 scales ``[ceil(rows / 128), ceil(cols / 128)]``), bit for bit
    :func:`mergeserve.merge.quantize.quantize_fp8_block_reference`."""
    rows, cols = w.shape
    q = torch.empty((rows, cols), dtype=torch.float8_e4m3fn)
    scale = torch.empty((-(-rows // 128), -(-cols // 128)), dtype=torch.float32)
    library().quantize_e4m3_blocks(w.data_ptr(), rows, cols, q.data_ptr(), scale.data_ptr())
    return q, scale


def e4m3_cast(x: torch.Tensor) -> torch.Tensor:
    """float32 ``[n]`` in [-448, 448] -> float8_e4m3fn ``[n]``: the loops' own cast (tests)."""
    out = torch.empty(x.numel(), dtype=torch.float8_e4m3fn)
    library().e4m3_cast(x.data_ptr(), x.numel(), out.data_ptr())
    return out


@functools.cache
def matches_torch() -> bool:
    """Whether the loops are built and each equals this torch's own ops, on sizes with leftovers
    (a torch that sums a norm in other lanes, or fuses differently, turns them off)."""
    if library() is None:
        return False
    gen = torch.Generator().manual_seed(0)
    w = torch.tensor([0.6, -0.35, 1.7], dtype=torch.float32)
    for n in (5, 4099, (1 << 16) + 3):
        a, b, c = ((torch.randn(n, generator=gen) * 7).bfloat16() for _ in range(3))
        norms = torch.linalg.vector_norm(a.float().reshape(1, -1), dim=1)
        product = (a.float() / 3.3) * (b.float() / 0.7)
        mixed = (torch.tensor(0.3) * a.float() + torch.tensor(-1.9) * b.float()).bfloat16()
        acc = torch.zeros(n)
        for x, cw in zip((a, b, c), w.unbind(0)):
            acc.addcmul_(x, cw)
        linear = acc.div_(w.sum()).bfloat16()
        got = [
            chunk_norms(a, n), scaled_product(a, b, 3.3, 0.7, torch.empty(n)),
            combine(a, b, 0.3, -1.9, torch.empty_like(a)), weighted_sum((a, b, c), w, w.sum().item(), torch.empty_like(a)),
        ]
        if not all(_same_bits(want, have) for want, have in zip((norms, product, mixed, linear), got)) or not _fp8_matches(a):
            log.info("the merge loops differ from this torch: merge math uses torch's ops")
            return False
    return True


def _fp8_matches(a: torch.Tensor) -> bool:
    from mergeserve.merge.quantize import quantize_fp8_block_reference

    n = a.numel()
    w = a[: n - n % 131].reshape(-1, 131) if n >= 131 else a.reshape(1, -1)
    want, have = quantize_fp8_block_reference(w), quantize_e4m3_blocks(w)
    return all(_same_bits(x, y) for x, y in zip(want, have))


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))
