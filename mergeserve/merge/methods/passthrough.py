"""Passthrough: copy one input tensor (optionally scaled). Stacking slices of one model each
builds a model with a different number of layers ("frankenmerges")."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergeserve.merge.methods.registry import MethodSpec, Param, register


def passthrough(tensors: Sequence[torch.Tensor], base_index: int | None, *, scale: Sequence[float | None] = (None,)) -> torch.Tensor:
    s = scale[0]
    return tensors[0] if s is None else tensors[0] * s


register(
    MethodSpec(
        name="passthrough",
        fn=passthrough,
        params=(Param("scale", None, per_model=True, include_base=True, description="optional factor applied to the tensor"),),
        base="unused",
        max_models=1,
        changes_layer_count=True,
    )
)
