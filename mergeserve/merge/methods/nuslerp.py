"""NuSLERP: slerp between two models with weights, row-wise or whole-tensor, optionally about a base.

With non-base inputs ``x0, x1`` (shape ``S``) and weights ``w0, w1``, ``t = w1 / (w0 + w1)``
(0.5 when the weights sum to ~0). Without a base it slerps ``x0 -> x1``; with a base it slerps
the task vectors ``x_i - base`` and adds the base back. ``nuslerp_flatten`` (default) treats the
whole tensor as one vector; otherwise each row (``nuslerp_row_wise``: each column) is slerped
on its own. Vectors that are (anti)colinear within ``eps`` fall back to lerp. Runs in the loaded
dtype, as mergekit 0.1.5 does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergeserve.merge.methods.registry import MethodSpec, Param, register


def _unit(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)


def nuslerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool, eps: float = 1e-8) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos = torch.sum(_unit(v0) * _unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp(
    tensors: Sequence[torch.Tensor],
    base_index: int | None,
    *,
    weight: Sequence[float | None],
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
) -> torch.Tensor:
    others = [i for i in range(len(tensors)) if i != base_index]
    if len(others) != 2:
        raise ValueError(f"nuslerp needs exactly two non-base models, got {len(others)}")
    w0, w1 = (weight[i] for i in others)
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    a, b = (tensors[i] for i in others)
    if base_index is None:
        return nuslerp_pair(t, a, b, nuslerp_row_wise, nuslerp_flatten)
    base = tensors[base_index]
    return base + nuslerp_pair(t, a - base, b - base, nuslerp_row_wise, nuslerp_flatten)


register(
    MethodSpec(
        name="nuslerp",
        fn=nuslerp,
        params=(
            Param("weight", per_model=True, description="relative weight of each of the two models"),
            Param("nuslerp_row_wise", False, kind=bool, description="slerp columns separately (row vectors of the transpose)"),
            Param("nuslerp_flatten", True, kind=bool, description="slerp the whole tensor as one vector"),
        ),
        base="optional",
        min_models=2,
        max_models=3,
        non_base_models=2,
    )
)
