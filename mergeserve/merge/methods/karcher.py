"""Karcher (Riemannian) mean of all inputs on the unit hypersphere, with equal weights.

Karcher, "Riemannian center of mass and mollifier smoothing" (1977); mergekit cites
https://arxiv.org/abs/2603.04972.

Each input (shape ``S``) is split into its norm and direction. The mean direction is found by
fixed-point iteration (at most ``max_iter`` steps; stop when the tangent step is below ``tol``)
and scaled by the mean norm. Direction arithmetic runs in the loaded dtype, norms in float32,
as mergekit 0.1.5 does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergeserve.merge.methods.registry import MethodSpec, Param, register


def karcher(tensors: Sequence[torch.Tensor], base_index: int | None, *, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    acc = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(x.to(acc)) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(x * 0 for x in tensors)
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    u = [units[i] for i in valid]

    mean = torch.zeros_like(u[0])
    for ai, ui in zip(a, u):
        mean += ai * ui
    mn = torch.linalg.vector_norm(mean.to(acc))
    mean = u[0].clone() if mn.item() < tol else (mean / mn).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, ui in zip(a, u):
            dot = torch.clamp(torch.dot(mean.flatten(), ui.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (ui - dot * mean)
        tn = torch.linalg.vector_norm(tangent.to(acc))
        if tn.item() < tol:
            break
        mean = (torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)).to(mean.dtype)
        un = torch.linalg.vector_norm(mean.to(acc))
        if un.item() > tol:
            mean = (mean / un).to(mean.dtype)
    return sum(ai * n for ai, n in zip(alphas, norms)) * mean


register(
    MethodSpec(
        name="karcher",
        fn=karcher,
        params=(
            Param("max_iter", 10, kind=int, description="iteration limit"),
            Param("tol", 1e-5, description="convergence tolerance"),
        ),
        base="unused",
        reference="https://arxiv.org/abs/2603.04972",
    )
)
