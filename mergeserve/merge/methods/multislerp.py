"""Multi-SLERP: barycentric interpolation of any number of models on a hypersphere.

Goddard, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea

Non-base inputs ``x_i`` (shape ``S``; minus the base when there is one) are flattened and
projected to the unit sphere, ``u_i = x_i / (|x_i| + eps)``. With weights ``w`` (normalised to
sum 1 by default): ``m`` = normalised weighted mean of ``u``; the tangent vectors
``u_i - <u_i, m> m`` are averaged with ``w`` into ``v``; the result is the exponential map
``m cos|v| + v sin|v| / |v|`` scaled by the weighted mean norm ``sum w_i |x_i|`` (plus the
base). Runs in the loaded dtype, as mergekit 0.1.5 does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergeserve.errors import InputError
from mergeserve.merge.methods.registry import MethodSpec, Param, register


def multislerp(
    tensors: Sequence[torch.Tensor],
    base_index: int | None,
    *,
    weight: Sequence[float | None],
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    others = [i for i in range(len(tensors)) if i != base_index]
    if len(others) == 1:
        return tensors[others[0]]
    base = tensors[base_index] if base_index is not None else None
    x = torch.stack([tensors[i] for i in others])
    if base is not None:
        x -= base
    flat = x.view(x.shape[0], -1)
    w = torch.tensor([weight[i] for i in others], dtype=x.dtype, device=x.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if x.shape[0] != 2:
            raise InputError("multislerp: the weighted sum of the inputs is zero (antipodal inputs with balancing weights)")
        out = (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:])
        return out + base if base is not None else out
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    v = (tangent * w.view(-1, 1)).sum(0)
    vn = torch.norm(v) + eps
    out = mean * torch.cos(vn) + v * (torch.sin(vn) / vn)
    out = (out * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return out + base if base is not None else out


register(
    MethodSpec(
        name="multislerp",
        fn=multislerp,
        params=(
            Param("weight", per_model=True, description="weight of each non-base model"),
            Param("normalize_weights", True, kind=bool, description="rescale the weights to sum to 1"),
            Param("eps", 1e-8, description="numerical floor for norms"),
        ),
        base="optional",
        reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    )
)
