"""The one registry of merge methods.

A merge method is a plain tensor function with this signature::

    fn(tensors: Sequence[Tensor], base_index: int | None, *, generator=None, **params) -> Tensor

- ``tensors``: one tensor per input model for ONE output tensor, all the same shape and dtype
  (already cast to the recipe's ``dtype``), in the recipe's model order.
- ``base_index``: position of the base model in ``tensors`` (None when the recipe has none).
- shared parameters arrive as scalars (``t=0.3``); per-model parameters arrive as lists aligned
  with ``tensors`` (``weight=[0.7, 0.3]``); an entry is None where mergekit gives the base no
  value (e.g. task-arithmetic ``weight`` of the base model).
- ``generator``: a seeded ``torch.Generator`` for random methods (DARE, DELLA), derived from the
  recipe seed and the tensor name, so a run is reproducible wherever the tensor is computed.
- returns the merged tensor in the inputs' dtype (the executor applies ``out_dtype``).

A method may also give ``many``: the same function for several parameter sets over the same
inputs (``many(tensors, base_index, [params, ...]) -> [Tensor, ...]``), each result bit-identical
to a separate call, for merge sweeps that share work across variants (slerp's norms and angle).

Each method file registers its methods with :func:`register` (a :class:`MethodSpec` each; the
task-arithmetic family registers its presets in a loop); a name registered twice is an error,
and there is no second registration path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mergeserve.errors import ConfigError


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

MethodFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Param:
    """One parameter a method reads from the recipe.

    ``per_model``: read per input model (``models[i].parameters``), passed as a list.
    ``include_base``: per-model value is also resolved for the base model (mergekit's
    ``ParameterScope.INPUT``); otherwise the base's entry is None.
    """

    name: str
    default: Any = REQUIRED
    kind: type = float
    per_model: bool = False
    include_base: bool = False
    description: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def coerce(self, value: Any) -> Any:
        """Validate a resolved scalar into ``kind``; raises ValueError with a short reason."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise ValueError(f"expected a boolean, got {value!r}")
        if self.kind in (float, int):
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            try:
                out = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"expected a number, got {value!r}") from None
            if out != out or out in (float("inf"), float("-inf")):
                raise ValueError(f"expected a finite number, got {value!r}")
            return int(out) if self.kind is int else out
        if self.kind is str:
            return str(value)
        return value


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function, parameters and input contract."""

    name: str
    fn: MethodFn
    params: tuple[Param, ...] = ()
    base: Literal["required", "optional", "unused"] = "optional"
    min_models: int = 1
    max_models: int | None = None
    non_base_models: int | None = None  # exact count of non-base inputs, where the method fixes it
    random: bool = False
    # passthrough may stack slices into a different layer count; other methods merge 1:1.
    changes_layer_count: bool = False
    reference: str = ""
    fixed: dict[str, Any] = field(default_factory=dict)
    many: Callable[..., list[torch.Tensor]] | None = None  # several parameter sets, shared work

    @property
    def shared_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)

    @property
    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def __call__(
        self,
        tensors: Sequence[torch.Tensor],
        base_index: int | None,
        *,
        generator: torch.Generator | None = None,
        **params: Any,
    ) -> torch.Tensor:
        kwargs = dict(self.fixed)
        # Defaults for parameters the caller left out (the planner always passes every one).
        for p in self.params:
            if p.name not in params and not p.required:
                kwargs[p.name] = [p.default] * len(tensors) if p.per_model else p.default
        kwargs.update(params)
        if self.random:
            kwargs["generator"] = generator
        return self.fn(tensors, base_index, **kwargs)


    def call_many(
        self,
        tensors: Sequence[torch.Tensor],
        base_index: int | None,
        param_sets: Sequence[dict[str, Any]],
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> list[torch.Tensor]:
        """One result per parameter set; uses ``many`` where the method has one (not random) and
        there are several sets."""
        gens = generators or [None] * len(param_sets)
        if len(param_sets) == 1:
            return [self(tensors, base_index, generator=gens[0], **param_sets[0])]
        if self.many is not None and not self.random and not self.fixed:
            return self.many(tensors, base_index, list(param_sets))
        return [self(tensors, base_index, generator=g, **p) for p, g in zip(param_sets, gens)]


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method by name; a duplicate name is a programming error."""
    if spec.name in METHODS:
        raise ValueError(f"merge method {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    from mergeserve.merge import methods as _load_all  # noqa: F401  (imports every method file)

    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise ConfigError(f"merge_method: unknown method {name!r} (known: {known})") from None


def method_names() -> list[str]:
    from mergeserve.merge import methods as _load_all  # noqa: F401

    return sorted(METHODS)
