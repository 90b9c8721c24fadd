"""SCE: Select (high-variance entries), Calculate (weights), Erase (sign conflicts).

Wan et al., "FuseChat", https://arxiv.org/abs/2408.07990

Task vectors ``T_i = x_i - base`` (stacked ``[n, *S]``). With ``select_topk < 1`` only the
``int(select_topk * nonzero)`` entries with the largest variance across models are kept. Each
model gets the weight ``mean(T_i^2) / sum_j mean(T_j^2)``; entries whose sign disagrees with the
column sum are erased; the result is ``base + sum(T * W) / max(sum(W), 1e-6)``. Runs in the
loaded dtype, as mergekit 0.1.5 does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergeserve.merge.methods.registry import MethodSpec, Param, register
from mergeserve.merge.methods.task_arithmetic import sign_consensus


def _select(tvs: torch.Tensor, fraction: float) -> torch.Tensor:
    if fraction <= 0:
        return torch.zeros_like(tvs[0])
    if fraction >= 1:
        return torch.ones_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)
    mask = torch.zeros_like(var)
    if k:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def _weights(tvs: torch.Tensor) -> torch.Tensor:
    w = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(w).item()
    return torch.ones_like(w) / w.shape[0] if abs(total) < 1e-6 else w / total


def sce(
    tensors: Sequence[torch.Tensor], base_index: int | None, *, select_topk: float = 1.0, int8_mask: bool = False
) -> torch.Tensor:
    base = tensors[base_index]
    others = [x for i, x in enumerate(tensors) if i != base_index]
    if not others:
        return base
    tvs = torch.stack([x - base for x in others], dim=0)
    if select_topk < 1:
        tvs = tvs * _select(tvs, select_topk).unsqueeze(0)
    keep = sign_consensus(tvs)
    w = _weights(tvs).reshape(-1, *([1] * (tvs.dim() - 1)))
    w = w * keep
    return base + (tvs * w).sum(dim=0) / torch.sum(w, dim=0).clamp(min=1e-6)


register(
    MethodSpec(
        name="sce",
        fn=sce,
        params=(
            Param("select_topk", 1.0, description="fraction of highest-variance entries kept"),
            Param("int8_mask", False, kind=bool, description="accepted for compatibility (memory only)"),
        ),
        base="required",
        reference="https://arxiv.org/abs/2408.07990",
    )
)
