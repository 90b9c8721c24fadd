"""Sparsifying a task vector (delta = model - base) before it is merged.

Each function takes a delta of any shape ``S`` and returns a tensor of shape ``S`` and the same
dtype, with the dropped entries zeroed and, when ``rescale`` is set, the survivors scaled so the
L1 norm matches the original (DARE's rescaling keeps the expected value of each entry).

- :func:`magnitude`: keep the ``k = max(1, int(density * n))`` largest |delta| (TIES,
  https://arxiv.org/abs/2306.01708).
- :func:`magnitude_outliers`: drop the top ``gamma`` fraction as outliers, then the smallest,
  keeping ``int(density * n)`` (Model Breadcrumbs, https://arxiv.org/abs/2312.06795).
- :func:`bernoulli`: keep each entry with probability ``density`` (DARE,
  https://arxiv.org/abs/2311.03099).
- :func:`della_magprune`: keep with a probability that rises with |delta|'s rank within its row,
  from ``density - epsilon`` to ``density + epsilon`` (DELLA, https://arxiv.org/abs/2406.11617).

The random ones draw from the ``generator`` they are given, so a seeded run is reproducible
wherever a tensor is computed. Ranks use ``torch.argsort`` / ``torch.sort`` exactly as mergekit
0.1.5 does so that ties between equal magnitudes break the same way.
"""

from __future__ import annotations

import torch

RESCALE_EPS = 1e-7


def _masked(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    kept = delta * mask
    if not rescale:
        return kept
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    # torch.bernoulli has no float16 CPU kernel; bf16 and accelerator tensors stay as they are.
    return t.dtype if t.device.type != "cpu" or t.dtype == torch.bfloat16 else torch.float32


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    w = delta.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[torch.argsort(w, descending=True)[:k]] = 1
    return _masked(delta, mask.reshape_as(delta), rescale)


def magnitude_outliers(delta: torch.Tensor, density: float, rescale: bool = False, gamma: float = 0.01) -> torch.Tensor:
    if density >= 1:
        return delta
    n = delta.numel()
    keep = int(density * n)
    # Fewer outliers are dropped when the kept fraction would not fit otherwise.
    low = max(0, n - keep - int(gamma * n))
    w = delta.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    order = torch.sort(w, descending=False).indices
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[low : low + keep]] = 1
    return _masked(delta, mask.reshape_as(delta), rescale)


def bernoulli(delta: torch.Tensor, density: float, rescale: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    if density >= 1:
        return delta
    wd = _work_dtype(delta)
    mask = torch.bernoulli(torch.full(delta.shape, density, dtype=wd, device=delta.device), generator=generator)
    return _masked(delta.to(wd), mask, rescale).to(delta.dtype)


def della_magprune(
    delta: torch.Tensor, density: float, epsilon: float, rescale: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"della: density {density} +/- epsilon {epsilon} must stay inside (0, 1)")
    wd = _work_dtype(delta)
    shape = delta.shape
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(wd) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    rank01 = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    mask = torch.bernoulli((density - epsilon) + rank01 * 2 * epsilon, generator=generator).to(wd)
    return _masked(rows.to(wd), mask, rescale).to(delta.dtype).reshape(shape)
