"""From a sweep spec to planned variants: axis values applied to the recipe, validated, planned,
de-duplicated and grouped into batches that read their sources together.

Everything here is pure (no Ray): a sweep's variants can be listed and checked before any work.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergeserve.errors import ConfigError, MergeServeError
from mergeserve.merge.config import MergeConfig, load_config, parse_config
from mergeserve.merge.methods.registry import get_method, method_names
from mergeserve.merge.multi import content_key, structure_key
from mergeserve.merge.options import MergeOptions
from mergeserve.merge.plan import MergePlan
from mergeserve.sweep.spec import Axis, SweepSpec, parse_path


@dataclass(frozen=True)
class Variant:
    """One point of the sweep: the axis values and the mergekit recipe they give."""

    name: str
    values: tuple[tuple[str, Any], ...]  # (axis label, value), in axis order
    recipe: dict = field(hash=False, compare=False)

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_fmt(v)}" for k, v in self.values)


@dataclass
class PlannedVariant:
    variant: Variant
    config: MergeConfig
    recipe_text: str
    plan: MergePlan
    content: str  # equal for identical checkpoints
    structure: str  # equal for variants that can share reads
    duplicate_of: str | None = None

    @property
    def name(self) -> str:
        return self.variant.name


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return str(v)


def load_recipe(spec: SweepSpec, root: Path) -> dict:
    """The base recipe as plain data (validated once as a whole recipe)."""
    if isinstance(spec.recipe, dict):
        parse_config(spec.recipe, "recipe")
        return copy.deepcopy(spec.recipe)
    path = Path(spec.recipe)
    path = path if path.is_absolute() else root / path
    _, text = load_config(path)
    return yaml.safe_load(text)  # the user's own mapping, so variants' recipes stay in mergekit's format


def _select(node: Any, sel: str, where: str) -> tuple[Any, Any]:
    """(container, key) of ``sel`` inside ``node``: a list index, or a filter entry's 'value'."""
    if isinstance(node, list) and sel.lstrip("-").isdigit():
        i = int(sel)
        if not -len(node) <= i < len(node):
            raise ValueError(f"{where}[{sel}]: index out of range (the list has {len(node)} entries)")
        return node, i
    if isinstance(node, list) and all(isinstance(x, dict) and "value" in x for x in node):
        want = None if sel in ("*", "") else sel
        for item in node:
            if item.get("filter") in ((None, "*") if want is None else (want,)):
                return item, "value"
        have = ", ".join(str(x.get("filter") or "*") for x in node)
        raise ValueError(f"{where}: no filter entry {sel!r} (entries: {have})")
    raise ValueError(f"{where}: [{sel}] needs a list or a filter list here, found {type(node).__name__}")


def apply_axis(recipe: dict, path: str, value: Any) -> dict:
    """A copy of ``recipe`` with ``value`` placed at ``path`` (raises ValueError naming the path)."""
    out = copy.deepcopy(recipe)
    parts = parse_path(path)
    container: Any = None
    key: Any = None
    node: Any = out
    where = ""
    for n, (name, sels) in enumerate(parts):
        where = f"{where}.{name}" if where else name
        if not isinstance(node, dict):
            raise ValueError(f"{where}: {where.rsplit('.', 1)[0]} is not a mapping")
        last = n == len(parts) - 1
        if name not in node:
            if last and not sels:
                container, key = node, name  # a new key: e.g. a parameter the recipe left at its default
                break
            raise ValueError(f"{where}: not in the recipe")
        container, key = node, name
        node = node[name]
        for sel in sels:
            container, key = _select(node, sel, where)
            node = container[key]
            where = f"{where}[{sel}]"
    container[key] = copy.deepcopy(value)
    return out


def _param_name(path: str) -> str | None:
    """The parameter an axis sets: the key after the last 'parameters' segment."""
    names = [name for name, _ in parse_path(path)]
    if "parameters" in names:
        i = len(names) - 1 - names[::-1].index("parameters")
        if i + 1 < len(names):
            return names[i + 1]
    return None


def check_axes(spec: SweepSpec, recipe: dict) -> list[str]:
    """Problems with the axes themselves: paths that do not resolve, unknown parameters or methods."""
    problems = []
    methods = {recipe.get("merge_method")}
    for i, ax in enumerate(spec.axes):
        if ax.path == "merge_method":
            methods = set()
            known = method_names()
            for v in ax.values or []:
                if v not in known:
                    problems.append(f"axes[{i}].values: unknown merge method {v!r} (known: {', '.join(known)})")
                methods.add(v)
    for i, ax in enumerate(spec.axes):
        if ax.path == "merge_method":
            continue
        if spec.search.kind == "grid" and ax.values is None and ax.steps is None:
            problems.append(f"axes[{i}]: a grid search needs 'values' or 'steps' for the range [{ax.low}, {ax.high}]")
        try:
            apply_axis(recipe, ax.path, (ax.values or [ax.low])[0])
        except ValueError as e:
            problems.append(f"axes[{i}].path: {e}")
            continue
        pname = _param_name(ax.path)
        if pname is not None:
            for m in sorted(x for x in methods if x):
                try:
                    spec_m = get_method(m)
                except MergeServeError:
                    continue
                if spec_m.param(pname) is None:
                    known = ", ".join(p.name for p in spec_m.params) or "none"
                    problems.append(f"axes[{i}].path: {pname!r} is not a parameter of {m} (its parameters: {known})")
    return problems


def make_variant(index: int, recipe: dict, axes: Sequence[Axis], values: Sequence[Any]) -> Variant:
    out = recipe
    for ax, v in zip(axes, values):
        out = apply_axis(out, ax.path, v)
    return Variant(f"v{index:03d}", tuple((ax.label, v) for ax, v in zip(axes, values)), out)


def grid_variants(spec: SweepSpec, recipe: dict, start: int = 0) -> list[Variant]:
    import itertools

    grids = [ax.grid() for ax in spec.axes]
    return [make_variant(start + i, recipe, spec.axes, combo) for i, combo in enumerate(itertools.product(*grids))]


def random_variants(spec: SweepSpec, recipe: dict, start: int = 0) -> list[Variant]:
    rng = random.Random(spec.search.seed)
    out = []
    for i in range(spec.search.samples or 0):
        vals = [rng.choice(ax.values) if ax.values is not None else rng.uniform(ax.low, ax.high) for ax in spec.axes]  # type: ignore[arg-type]
        out.append(make_variant(start + i, recipe, spec.axes, vals))
    return out


def plan_variants(variants: Sequence[Variant], options: MergeOptions, known: dict[str, str] | None = None) -> list[PlannedVariant]:
    """Validate and plan every variant with ``options``; one ConfigError naming each invalid variant.

    ``known``: content key -> name of variants already merged (earlier batches, --resume), so
    that a repeated variant is marked a duplicate instead of merged again.
    """
    from mergeserve.merge.api import plan_merge

    problems, planned = [], []
    seen = dict(known or {})
    for v in variants:
        try:
            cfg = parse_config(v.recipe, f"variant {v.name}")
            cfg, _, plan = plan_merge(cfg, options)
            text = yaml.safe_dump(v.recipe, sort_keys=False)
        except MergeServeError as e:
            msg = str(e).removeprefix(f"variant {v.name}: ")
            problems.append(f"variant {v.name} ({v.label}): {msg}")
            continue
        ck = content_key(plan)
        pv = PlannedVariant(v, cfg, text, plan, ck, structure_key(plan), seen.get(ck))
        seen.setdefault(ck, v.name)
        planned.append(pv)
    if problems:
        raise ConfigError.from_problems(problems, "sweep")
    return planned


def batches(planned: Sequence[PlannedVariant], batch_size: int) -> list[list[PlannedVariant]]:
    """Unique variants grouped by structure, in chunks of ``batch_size`` (order kept within groups)."""
    groups: dict[str, list[PlannedVariant]] = {}
    for pv in planned:
        if pv.duplicate_of is None:
            groups.setdefault(pv.structure, []).append(pv)
    return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def variant_record(pv: PlannedVariant) -> dict:
    """JSON-able description of a variant (results files, --resume)."""
    return {
        "name": pv.name,
        "label": pv.variant.label,
        "values": {k: v for k, v in pv.variant.values},
        "content": pv.content,
        "duplicate_of": pv.duplicate_of,
        "recipe": json.loads(json.dumps(pv.variant.recipe)),
    }
