"""The task-arithmetic family: one parameterised function and eight named presets.

Task arithmetic (Ilharco et al., https://arxiv.org/abs/2212.04089) adds weighted task vectors
``d_i = x_i - base`` to the base. The presets differ only in how each ``d_i`` is sparsified and
whether a sign consensus (TIES, https://arxiv.org/abs/2306.01708) masks out disagreeing entries:

| preset           | sparsify            | consensus | normalize | rescale |
|------------------|---------------------|-----------|-----------|---------|
| task_arithmetic  | -                   | -         | False     | False   |
| ties             | magnitude           | sum       | True      | False   |
| dare_ties        | bernoulli (DARE)    | sum       | False     | True    |
| dare_linear      | bernoulli (DARE)    | -         | False     | True    |
| breadcrumbs      | magnitude_outliers  | -         | False     | False   |
| breadcrumbs_ties | magnitude_outliers  | sum       | False     | False   |
| della            | della_magprune      | sum       | True      | True    |
| della_linear     | della_magprune      | -         | False     | True    |

For inputs of shape ``S`` (n non-base models), with ``D`` the stacked deltas ``[n, *S]`` scaled
by their weights ``w`` and ``M`` the consensus mask (all ones without consensus):

    out = base + lambda * sum_i(D_i * M_i) / sum_i(w_i * M_i)     (division only if normalize)

Like mergekit 0.1.5 this runs in the loaded dtype (no float32 upcast), in the same order of
operations, so deterministic presets agree with it bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from mergeserve.merge.methods import sparsify as sp
from mergeserve.merge.methods.registry import MethodSpec, Param, register


def sign_consensus(deltas: torch.Tensor) -> torch.Tensor:
    """Bool mask ``[n, *S]``: entries whose sign agrees with the sign of the column sum (0 counts as +)."""
    sign = deltas.sign()
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    return sign == majority


def task_arithmetic(
    tensors: Sequence[torch.Tensor],
    base_index: int | None,
    *,
    weight: Sequence[float | None],
    density: Sequence[float | None],
    sparsify: str | None,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    int8_mask: bool = False,  # accepted for recipe compatibility; the mask is boolean either way
    gamma: Sequence[float | None] | None = None,
    epsilon: Sequence[float | None] | None = None,
    generator: torch.Generator | None = None,
    **extra: float,
) -> torch.Tensor:
    lam = extra.pop("lambda", 1.0)
    base = tensors[base_index]
    others = [i for i in range(len(tensors)) if i != base_index]
    if not others:
        return base
    deltas = base.new_empty((len(others), *base.shape))
    for row, i in enumerate(others):
        d = tensors[i] - base
        if sparsify == "magnitude":
            d = sp.magnitude(d, density[i], rescale)
        elif sparsify == "magnitude_outliers":
            d = sp.magnitude_outliers(d, density[i], rescale, gamma=gamma[i])
        elif sparsify == "bernoulli":
            d = sp.bernoulli(d, density[i], rescale, generator=generator)
        elif sparsify == "della_magprune":
            d = sp.della_magprune(d, density[i], epsilon[i], rescale, generator=generator)
        deltas[row] = d
    w = torch.tensor([weight[i] for i in others], dtype=deltas.dtype, device=deltas.device)
    w = w.reshape(-1, *([1] * base.dim()))
    deltas.mul_(w)
    if consensus:
        mask = sign_consensus(deltas)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)


_COMMON = (
    Param("weight", per_model=True, description="scale of each model's task vector"),
    Param("density", 1.0, per_model=True, description="fraction of each task vector kept"),
    Param("lambda", 1.0, description="scale of the merged task vector"),
    Param("int8_mask", False, kind=bool, description="use an int8 consensus mask (memory only)"),
)
_GAMMA = Param("gamma", 0.01, per_model=True, description="fraction of largest-magnitude outliers dropped")
_EPSILON = Param("epsilon", 0.15, per_model=True, description="half-width of DELLA's keep-probability range")

class Preset(NamedTuple):
    """One method of the task-arithmetic family: how it sparsifies and combines task vectors."""

    sparsify: str | None  # sparsify.py's method, or None to keep every entry
    consensus: bool  # TIES sign election
    normalize: bool  # default of the normalize parameter
    rescale: bool  # default of the rescale parameter
    paper: str


PRESETS = {
    "task_arithmetic": Preset(None, False, False, False, "https://arxiv.org/abs/2212.04089"),
    "ties": Preset("magnitude", True, True, False, "https://arxiv.org/abs/2306.01708"),
    "dare_ties": Preset("bernoulli", True, False, True, "https://arxiv.org/abs/2311.03099"),
    "dare_linear": Preset("bernoulli", False, False, True, "https://arxiv.org/abs/2311.03099"),
    "breadcrumbs": Preset("magnitude_outliers", False, False, False, "https://arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": Preset("magnitude_outliers", True, False, False, "https://arxiv.org/abs/2312.06795"),
    "della": Preset("della_magprune", True, True, True, "https://arxiv.org/abs/2406.11617"),
    "della_linear": Preset("della_magprune", False, False, True, "https://arxiv.org/abs/2406.11617"),
}
EXTRA_PARAMS = {"magnitude_outliers": (_GAMMA,), "della_magprune": (_EPSILON,)}  # by sparsify method
RANDOM_SPARSIFY = ("bernoulli", "della_magprune")

for _name, _p in PRESETS.items():
    register(
        MethodSpec(
            name=_name,
            fn=task_arithmetic,
            params=_COMMON
            + (
                Param("normalize", _p.normalize, kind=bool, description="divide by the sum of the kept weights"),
                Param("rescale", _p.rescale, kind=bool, description="rescale kept entries to the task vector's L1 norm"),
            )
            + EXTRA_PARAMS.get(_p.sparsify, ()),
            base="required",
            random=_p.sparsify in RANDOM_SPARSIFY,
            reference=_p.paper,
            fixed={"sparsify": _p.sparsify, "consensus": _p.consensus},
        )
    )
