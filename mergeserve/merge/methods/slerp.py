"""Spherical linear interpolation between exactly two models.

Shoemake, "Animating rotation with quaternion curves" (1985); https://en.wikipedia.org/wiki/Slerp

Each tensor (shape ``S``) is flattened to one vector. With ``a`` the base (t = 0 end) and ``b``
the other model, in float32:

    dot   = <a / |a|, b / |b|>           (|v| <= 1e-8 counts as 1; dot clamped to [-1, 1])
    out   = (1 - t) a + t b                               if |dot| > 0.9995 (near-colinear)
    out   = sin((1 - t) theta) / sin(theta) * a
          + sin(t theta) / sin(theta) * b                 otherwise, theta = acos(dot)

on the UNnormalised inputs, cast back to the input dtype. Norms and the dot product are
accumulated in chunks of 2**20 elements (norm of per-chunk norms; sum of per-chunk dots) as
mergekit 0.1.5 does, so that rounding agrees with it on large tensors too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergeserve.merge import kernels
from mergeserve.merge.methods.registry import MethodSpec, Param, register

CHUNK = 1 << 20
DOT_THRESHOLD = 0.9995
EPS = 1e-8


def _spans(n: int) -> list[tuple[int, int]]:
    return [(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]


def _chunk_norms(v: torch.Tensor, dtype: torch.dtype, fused: bool) -> torch.Tensor:
    """Norm of each CHUNK-element piece of flat ``v``, as float32 (or float64) ``[pieces]``."""
    if fused:
        return kernels.chunk_norms(v, CHUNK)
    # vector_norm(dtype=...) upcasts inside the reduction: same bits, no float32 copy.
    return torch.stack([torch.linalg.vector_norm(v[s:e], dtype=dtype) for s, e in _spans(v.numel())])


def _geometry(va: torch.Tensor, vb: torch.Tensor, dtype: torch.dtype, bx: torch.Tensor, by: torch.Tensor, *, fused: bool) -> torch.Tensor:
    """The clamped cosine between two flat vectors, accumulated per chunk as mergekit does."""
    na = torch.linalg.vector_norm(_chunk_norms(va, dtype, fused))
    nb = torch.linalg.vector_norm(_chunk_norms(vb, dtype, fused))
    na = torch.where(na > EPS, na, 1)
    nb = torch.where(nb > EPS, nb, 1)
    # Unfused, each chunk is converted into two reused float32 buffers and every step is done in
    # place: the same operations, in the same order, as ``(x.to(f32) / na) * (y.to(f32) / nb)``
    # (so the same bits), without a fresh 4 MB temporary per step. The buffers stay in cache.
    dots = []
    scales = (na.item(), nb.item()) if fused else None
    for s, e in _spans(va.numel()):
        if scales:
            dots.append(kernels.scaled_product(va[s:e], vb[s:e], *scales, bx).sum())
            continue
        x, y = bx[: e - s], by[: e - s]
        x.copy_(va[s:e]).div_(na)
        y.copy_(vb[s:e]).div_(nb)
        dots.append(x.mul_(y).sum())
    return torch.stack(dots).sum().clamp(-1, 1)


def _apply(
    t: float, dot: torch.Tensor, a: torch.Tensor, va: torch.Tensor, vb: torch.Tensor, bx: torch.Tensor, by: torch.Tensor, *, fused: bool
) -> torch.Tensor:
    """``ca * a + cb * b`` in ``bx.dtype``, chunk by chunk in place, cast to a's dtype and shape."""
    dtype = bx.dtype
    tt = torch.tensor(t, dtype=torch.float32).to(dtype=dtype, device=a.device)
    colinear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(colinear, 0, dot))
    sin_theta = torch.sin(theta)
    ca = torch.where(colinear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    cb = torch.where(colinear, tt, torch.sin(tt * theta) / sin_theta)
    out = torch.empty(va.shape, dtype=a.dtype, device=a.device)
    if fused:
        kernels.combine(va, vb, ca.item(), cb.item(), out)
        return out.reshape(a.shape)
    for s, e in _spans(va.numel()):  # same ops and order as ca * x.to(f32) + cb * y.to(f32)
        x, y = bx[: e - s], by[: e - s]
        x.copy_(va[s:e]).mul_(ca)
        y.copy_(vb[s:e]).mul_(cb)
        out[s:e].copy_(x.add_(y))
    return out.reshape(a.shape)


def slerp_pairs(ts: Sequence[float], a: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
    """Slerp from ``a`` (t=0) to ``b`` (t=1) at every position in ``ts``; shapes ``S`` -> ``[S] * len(ts)``.

    The norms and the dot product do not depend on ``t``, so a sweep over ``t`` computes them once;
    each result is bit-identical to :func:`slerp_pair` at that ``t``.
    """
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    va, vb = a.reshape(-1), b.reshape(-1)
    n = va.numel()
    if n == 0:
        return [a.clone() for _ in ts]
    bx = torch.empty(min(CHUNK, n), dtype=dtype, device=a.device)
    by = torch.empty(min(CHUNK, n), dtype=dtype, device=a.device)
    fused = kernels.fusable(va, vb)  # bfloat16 on the CPU: one pass a step, same bits (kernels.py)
    dot = _geometry(va, vb, dtype, bx, by, fused=fused)
    return [_apply(t, dot, a, va, vb, bx, by, fused=fused) for t in ts]


def slerp_pair(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Slerp from ``a`` (t=0) to ``b`` (t=1); both of shape ``S``; returns shape ``S``, a's dtype."""
    return slerp_pairs([t], a, b)[0]


def slerp(tensors: Sequence[torch.Tensor], base_index: int | None, *, t: float) -> torch.Tensor:
    base = 0 if base_index is None else base_index
    return slerp_pair(t, tensors[base], tensors[1 - base])


def slerp_many(tensors: Sequence[torch.Tensor], base_index: int | None, param_sets: Sequence[dict]) -> list[torch.Tensor]:
    """:func:`slerp` for several parameter sets over the same inputs (a sweep over ``t``)."""
    base = 0 if base_index is None else base_index
    return slerp_pairs([p["t"] for p in param_sets], tensors[base], tensors[1 - base])


register(
    MethodSpec(
        name="slerp",
        fn=slerp,
        many=slerp_many,
        params=(Param("t", description="interpolation position: 0 is the base model, 1 the other"),),
        base="required",
        min_models=2,
        max_models=2,
        reference="https://en.wikipedia.org/wiki/Slerp",
    )
)
