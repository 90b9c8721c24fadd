"""Linear merge (model soup): a weighted average of the inputs.

Wortsman et al., "Model soups", https://arxiv.org/abs/2203.05482

    out = sum_i w_i * x_i / sum_i w_i        (the division only when ``normalize``)

Every input has the same shape ``S``; the result has shape ``S`` and the inputs' dtype. The sum
runs in float32 (float64 for float64 inputs) in the recipe's model order, one fused
multiply-add per input, which is the order mergekit 0.1.5 uses, so results agree bit for bit.
The base model, if any, is just another input here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergeserve.merge import kernels
from mergeserve.merge.methods.registry import MethodSpec, Param, register


def linear(tensors: Sequence[torch.Tensor], base_index: int | None, *, weight: Sequence[float], normalize: bool = True) -> torch.Tensor:
    first = tensors[0]
    acc = torch.float64 if first.dtype == torch.float64 else torch.float32
    w = torch.tensor([float(x) for x in weight], dtype=torch.float32).to(acc)
    if kernels.fusable(*tensors) and all(x.shape == first.shape for x in tensors):
        den = w.sum().item() if normalize else 1.0  # one pass, same bits (see kernels.py)
        out = torch.empty(first.shape, dtype=first.dtype)
        kernels.weighted_sum([x.reshape(-1) for x in tensors], w, den, out.reshape(-1))
        return out
    out = torch.zeros(first.shape, dtype=acc, device=first.device)
    for x, c in zip(tensors, w.to(first.device).unbind(0)):
        out.addcmul_(x, c)
    if normalize:
        out.div_(w.sum().to(first.device))
    return out.to(first.dtype)


register(
    MethodSpec(
        name="linear",
        fn=linear,
        params=(
            Param("weight", per_model=True, include_base=True, description="mixing weight of each model"),
            Param("normalize", True, kind=bool, description="divide by the sum of the weights"),
        ),
        base="unused",
        reference="https://arxiv.org/abs/2203.05482",
    )
)
