"""NearSwap: take the other model's value only where it is already close to the base's.

https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001

With base ``a`` and the other model ``b`` (shape ``S``), per entry
``w = clamp(t / max(|a - b|, 1e-6), 0, 1)`` and ``out = w b + (1 - w) a``. Runs in the loaded
dtype, as mergekit 0.1.5 does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergeserve.merge.methods.registry import MethodSpec, Param, register


def nearswap(tensors: Sequence[torch.Tensor], base_index: int | None, *, t: float) -> torch.Tensor:
    a, b = tensors[base_index], tensors[1 - base_index]
    w = (t / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return w * b + (1 - w) * a


register(
    MethodSpec(
        name="nearswap",
        fn=nearswap,
        params=(Param("t", description="distance below which the other model's value is taken"),),
        base="required",
        min_models=2,
        max_models=2,
        reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    )
)
