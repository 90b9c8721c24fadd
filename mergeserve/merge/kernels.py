"""Fused one-pass CPU kernels over bfloat16 tensors, compiled by numba.

Why: torch runs each elementwise step as its own pass over memory (convert to float32, divide,
convert, divide, multiply, ...), and on a CPU-bound warm merge those passes are most of the merge
math. These kernels do the same float32 operations, in the same order, per element in one pass,
so every result is bit-identical to the torch expression named in each docstring (and so to
mergekit). Sums stay in torch (its cascade order is not worth copying), except the L2 norm: torch
accumulates it in one SIMD vector of float32 lanes, which :func:`chunk_norms` copies, and which
:func:`norms_match_torch` checks against the installed torch before it is used.

The loops themselves are in :mod:`.kernels_numba`, imported on first use (numba costs ~0.5 s to
import and load): :func:`warm_in_background` does that on a thread while torch is being imported.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: :func:`warm_in_background` runs before it is loaded.


def _compiled() -> ModuleType:
    from mergeserve.merge import kernels_numba

    return kernels_numba


def warm_in_background() -> threading.Thread:
    """Import numba and load the compiled loops on a daemon thread (a merge about to start calls
    this before importing torch; numba's loading releases the GIL much of the time)."""
    thread = threading.Thread(target=lambda: _compiled().warm(), name="kernels-warm", daemon=True)
    thread.start()
    return thread


def fusable(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can go through the kernels: contiguous bfloat16 on the CPU."""
    import torch

    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def _u16(t: torch.Tensor) -> np.ndarray:
    import torch

    return t.view(torch.int16).numpy().view(np.uint16)


def chunk_norms(a: torch.Tensor, chunk: int) -> torch.Tensor:
    """L2 norm of each ``chunk``-element piece of bfloat16 ``a`` (shape ``[n]``) -> float32 ``[ceil(n / chunk)]``.

    Bit for bit ``torch.linalg.vector_norm(a[s:s + chunk].float().reshape(1, -1), dim=1)`` per
    piece, where :func:`norms_match_torch` holds.
    """
    import torch

    out = np.empty(-(-a.numel() // chunk), np.float32)
    _compiled()._chunk_norms(_u16(a), chunk, out)
    return torch.from_numpy(out)


@functools.cache
def norms_match_torch() -> bool:
    """Whether :func:`chunk_norms` equals this torch's own float32 norm, on sizes with leftovers."""
    import torch

    gen = torch.Generator().manual_seed(0)
    for n in (5, _compiled().NORM_LANES, 4099, (1 << 16) + 3):
        a = (torch.randn(n, generator=gen) * 7).bfloat16()
        want = torch.linalg.vector_norm(a.float().reshape(1, -1), dim=1)
        if not torch.equal(chunk_norms(a, n).view(torch.int32), want.view(torch.int32)):
            return False
    return True


def weighted_sum(xs: Sequence[torch.Tensor], weights: torch.Tensor, den: float, out: torch.Tensor) -> torch.Tensor:
    """``out = (acc / den).bfloat16()`` with ``acc = 0; acc.addcmul_(x, w)`` for each ``x``, ``w``
    in order, in float32 (torch fuses each step into one multiply-add); all bfloat16 of shape
    ``[n]``, ``weights`` float32 ``[len(xs)]``. Bit for bit that torch expression where
    :func:`sums_match_torch` holds."""
    _compiled()._weighted_sum(tuple(_u16(x) for x in xs), weights.numpy(), np.float32(den), _u16(out))
    return out


@functools.cache
def sums_match_torch() -> bool:
    """Whether :func:`weighted_sum` equals torch's float32 ``addcmul_`` chain, on sizes with leftovers."""
    import torch

    gen = torch.Generator().manual_seed(1)
    w = torch.tensor([0.6, -0.35, 1.7], dtype=torch.float32)
    for n in (5, 4099, (1 << 16) + 3):
        xs = [(torch.randn(n, generator=gen) * 3).bfloat16() for _ in w]
        acc = torch.zeros(n)
        for x, c in zip(xs, w.unbind(0)):
            acc.addcmul_(x, c)
        want = acc.div_(w.sum()).bfloat16()
        got = weighted_sum(xs, w, w.sum().item(), torch.empty(n, dtype=torch.bfloat16))
        if not torch.equal(got.view(torch.int16), want.view(torch.int16)):
            return False
    return True


def scaled_product(a: torch.Tensor, b: torch.Tensor, na: float, nb: float, out: torch.Tensor) -> torch.Tensor:
    """``out[:n] = (a.float() / na) * (b.float() / nb)``; ``a``, ``b`` bfloat16 of shape ``[n]``.

    ``out`` is a float32 buffer of at least ``n`` elements; returns its first ``n``.
    """
    n = a.numel()
    _compiled()._scaled_product(_u16(a), _u16(b), np.float32(na), np.float32(nb), out[:n].numpy())
    return out[:n]


def combine(a: torch.Tensor, b: torch.Tensor, ca: float, cb: float, out: torch.Tensor) -> torch.Tensor:
    """``out = (ca * a.float() + cb * b.float()).bfloat16()``; all three bfloat16 of shape ``[n]``."""
    _compiled()._combine(_u16(a), _u16(b), np.float32(ca), np.float32(cb), _u16(out))
    return out
