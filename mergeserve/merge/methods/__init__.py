"""Merge methods: one short file per method, each registering itself once in :mod:`.registry`.

Importing this package imports every method file, which fills :data:`.registry.METHODS`.
"""

from mergeserve.merge.methods import (  # noqa: F401  (imported for their registration)
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    sce,
    slerp,
    task_arithmetic,
)
from mergeserve.merge.methods.registry import METHODS, MethodSpec, Param, get_method, method_names

__all__ = ["METHODS", "MethodSpec", "Param", "get_method", "method_names"]
