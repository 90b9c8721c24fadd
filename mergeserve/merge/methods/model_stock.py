"""Model Stock: interpolate between the base and the fine-tunes' average by their geometry.

Jang et al., "Model Stock", https://arxiv.org/abs/2403.19522

With base ``w0`` and k >= 2 fine-tunes ``w_i`` (shape ``S``; flattened, or per row with
``filter_wise``), ``cos`` is the mean pairwise cosine between the offsets ``w_i - w0`` and

    t   = k cos / (1 + (k - 1) cos)        (0 where the denominator is ~0: keep the base)
    out = t * mean(w_i) + (1 - t) * w0

Runs in the loaded dtype, as mergekit 0.1.5 does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergeserve.merge.methods.registry import MethodSpec, Param, register


def model_stock(tensors: Sequence[torch.Tensor], base_index: int | None, *, filter_wise: bool = False) -> torch.Tensor:
    w0 = tensors[base_index]
    ws = [x for i, x in enumerate(tensors) if i != base_index]
    shape = w0.shape
    if not filter_wise:
        w0, ws = w0.reshape(-1), [x.reshape(-1) for x in ws]
    elif w0.dim() == 1:
        w0, ws = w0.unsqueeze(0), [x.unsqueeze(0) for x in ws]
    offsets = [x - w0 for x in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            denom = (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6)
            cosines.append(((a * b).sum(dim=-1) / denom).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    denom = 1 + (k - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), (k * cos) / torch.where(singular, torch.ones_like(denom), denom))
    return (t * (sum(ws) / k) + (1 - t) * w0).reshape(shape)


register(
    MethodSpec(
        name="model_stock",
        fn=model_stock,
        params=(Param("filter_wise", False, kind=bool, description="one interpolation ratio per row instead of per tensor"),),
        base="required",
        min_models=3,
        reference="https://arxiv.org/abs/2403.19522",
    )
)
