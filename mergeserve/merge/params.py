"""Resolving a parameter for one tensor: filters, gradients and precedence.

mergekit's rules (see shared notes, "Gradients" and "Filters"):

- A gradient of K numbers is interpolated at the layer's position ``t`` in [0, 1]::

      s = t * (K - 1); i0 = floor(s); i1 = min(K - 1, i0 + 1); f = s - i0
      value = (1 - f) * v[i0] + f * v[i1]

  Lists of bools or strings are not interpolated: they pick ``v[int(t * (K - 1))]``.
- A filter list is scanned in order; the first item whose ``filter`` is a substring of the tensor
  name (or that has no filter / ``"*"``) wins. If none matches, the setting yields nothing and the
  next scope is consulted.
- Scopes, highest precedence first: per-source parameters (per-model parameters only), the
  output slice, the top level; then the method's default; else the parameter is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from mergeserve.merge.config import FilteredValue

_MISSING = object()


def interpolate_gradient(values: Sequence[Any], t: float) -> Any:
    """Value of a gradient ``values`` at position ``t`` in [0, 1] (mergekit's formula)."""
    if len(values) == 1:
        return values[0]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not numeric:
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def evaluate_setting(setting: Any, tensor_name: str, t: float, coerce: Callable[[Any], Any]) -> Any:
    """Evaluate one scope's setting for ``tensor_name`` at ``t``; returns _MISSING if it does not apply."""
    if isinstance(setting, FilteredValue):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(s, FilteredValue) for s in setting):
        for item in setting:
            if item.filter in (None, "*") or item.filter in tensor_name:
                return evaluate_setting(item.value, tensor_name, t, coerce)
        return _MISSING
    if isinstance(setting, list):
        if not setting:
            return _MISSING
        values = [coerce(v) for v in setting]
        return coerce(interpolate_gradient(values, t))
    return coerce(setting)


def resolve(
    name: str,
    scopes: Iterable[Mapping[str, Any] | None],
    tensor_name: str,
    t: float,
    coerce: Callable[[Any], Any],
    default: Any = _MISSING,
) -> Any:
    """First value found for ``name`` across ``scopes`` (highest precedence first), else default.

    Returns :data:`MISSING` when nothing applies and there is no default.
    """
    for scope in scopes:
        if scope and name in scope:
            value = evaluate_setting(scope[name], tensor_name, t, coerce)
            if value is not _MISSING:
                return value
    return default


MISSING = _MISSING
