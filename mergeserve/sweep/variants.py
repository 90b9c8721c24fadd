"""From a sweep spec to planned variants: axis values applied to the recipe, validated, planned,
de-duplicated and grouped into batches that read their sources together.

A multi-stage recipe (mergekit-multi's documents) is held as ``{"stages": [document, ...]}``, and
an axis addresses a stage by name (``stages[pair].parameters.weight``; the unnamed final document
is ``stages[(final)]``). Its variants are split (:func:`stage_variants`): every stage but the
final, each distinct one merged once for the whole sweep (content-addressed under
``OUT/stages``), and each variant's final stage, reading them, as the variant's plain recipe.

Everything here is pure (no Ray): a sweep's variants can be listed and checked before any work.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergeserve.errors import ConfigError, MergeServeError
from mergeserve.merge.config import MergeConfig, load_yaml_all, parse_config, read_text_file
from mergeserve.merge.methods.registry import get_method, method_names
from mergeserve.merge.multi import content_key, structure_key
from mergeserve.merge.options import MergeOptions
from mergeserve.merge.plan import MergePlan
from mergeserve.merge.stage_run import QueuedStage
from mergeserve.merge.stages import FINAL, graph_of, stage_config
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


STAGES = "stages"  # the key holding a multi-stage recipe's documents


def load_recipe(spec: SweepSpec, root: Path) -> dict:
    """The base recipe as plain data (validated once as a whole recipe): the user's own mapping,
    so variants' recipes stay in mergekit's format; ``{"stages": [...]}`` for a multi-stage one."""
    if isinstance(spec.recipe, str):
        path = Path(spec.recipe)
        path = path if path.is_absolute() else root / path
        docs = load_yaml_all(read_text_file(path), str(path))
        source = str(path)
    else:
        docs = spec.recipe if isinstance(spec.recipe, list) else [spec.recipe]
        source = "recipe"
    if len(docs) > 1:
        graph_of(docs, source)
        return {STAGES: copy.deepcopy(docs)}
    parse_config(docs[0] if docs else None, source)
    return copy.deepcopy(docs[0])


def is_multi_stage(recipe: dict) -> bool:
    return STAGES in recipe and isinstance(recipe[STAGES], list)


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
    if isinstance(node, list) and all(isinstance(x, dict) for x in node) and where == STAGES:
        names = [x.get("name", FINAL) for x in node]
        if sel in names:
            return node, names.index(sel)
        raise ValueError(f"{where}: no stage named {sel!r} (stages: {', '.join(names)})")
    raise ValueError(f"{where}: [{sel}] needs a list or a filter list here, found {type(node).__name__}")


def apply_axis(recipe: dict, path: str, value: Any) -> dict:
    """A copy of ``recipe`` with ``value`` placed at ``path`` (raises ValueError naming the path)."""
    out = copy.deepcopy(recipe)
    container, key = _locate(out, path)
    container[key] = copy.deepcopy(value)
    return out


def _locate(recipe: dict, path: str) -> tuple[Any, Any]:
    """(container, key) of ``path`` inside ``recipe``; the key may be new (a parameter the recipe
    left at its default). ValueError naming the path if it does not resolve."""
    parts = parse_path(path)
    container: Any = None
    key: Any = None
    node: Any = recipe
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
    return container, key


def _param_name(path: str) -> str | None:
    """The parameter an axis sets: the key after the last 'parameters' segment."""
    names = [name for name, _ in parse_path(path)]
    if "parameters" in names:
        i = len(names) - 1 - names[::-1].index("parameters")
        if i + 1 < len(names):
            return names[i + 1]
    return None


def _scope(recipe: dict, path: str) -> tuple[str, dict]:
    """(prefix, recipe document) an axis path acts on: ``("", recipe)``, or for a multi-stage
    recipe ``("stages[NAME].", that stage's document)``. ValueError if the path names no stage."""
    if not is_multi_stage(recipe):
        return "", recipe
    name, sels = parse_path(path)[0]
    if name != STAGES or len(sels) != 1:
        names = ", ".join(d.get("name", FINAL) for d in recipe[STAGES] if isinstance(d, dict))
        raise ValueError(f"the recipe has several stages: start the path with {STAGES}[NAME] (stages: {names})")
    container, key = _locate(recipe, f"{STAGES}[{sels[0]}]")
    return f"{STAGES}[{sels[0]}].", container[key]


def check_axes(spec: SweepSpec, recipe: dict) -> list[str]:
    """Problems with the axes themselves: paths that do not resolve (or, in a multi-stage recipe,
    name no stage), unknown parameters or methods of the stage an axis sets."""
    problems = []
    scopes: dict[int, str] = {}
    methods: dict[str, set] = {}  # scope -> the merge methods its document may have
    for i, ax in enumerate(spec.axes):
        try:
            prefix, doc = _scope(recipe, ax.path)
        except ValueError as e:
            problems.append(f"axes[{i}].path: {e}")
            continue
        scopes[i] = prefix
        methods.setdefault(prefix, {doc.get("merge_method")})
    for i, ax in enumerate(spec.axes):
        if i in scopes and ax.path == scopes[i] + "merge_method":
            known = method_names()
            methods[scopes[i]] = set()
            for v in ax.values or []:
                if v not in known:
                    problems.append(f"axes[{i}].values: unknown merge method {v!r} (known: {', '.join(known)})")
                methods[scopes[i]].add(v)
    for i, ax in enumerate(spec.axes):
        if i not in scopes or ax.path == scopes[i] + "merge_method":
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
            for m in sorted(x for x in methods[scopes[i]] if x):
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


def stage_variants(variants: Sequence[Variant], stages_dir: Path) -> tuple[list[QueuedStage], list[Variant]]:
    """Multi-stage variants split for merging: every stage but the final, each distinct one once
    (named ``NAME-HASH`` after its recipe with its inputs resolved, so identical stages of
    different variants are one), to be merged into ``stages_dir``; and each variant with its
    final stage, reading them, as its recipe. One ConfigError names every invalid variant."""
    problems: list[str] = []
    queued: dict[str, QueuedStage] = {}
    finals = []
    for v in variants:
        try:
            graph = graph_of(v.recipe[STAGES], f"variant {v.name}")
        except ConfigError as e:
            problems.append(f"variant {v.name} ({v.label}): {str(e).removeprefix(f'variant {v.name}: ')}")
            continue
        dirs: dict[str, Path] = {}
        names: dict[str, str] = {}
        for st in graph.stages:
            if st.name == graph.final:
                continue
            cfg = stage_config(st, dirs)  # its inputs' directories already name their contents
            names[st.name] = f"{st.name}-{hashlib.sha256(cfg.to_yaml().encode()).hexdigest()[:12]}"
            dirs[st.name] = stages_dir / names[st.name]
            queued.setdefault(names[st.name], QueuedStage(names[st.name], cfg, tuple(names[d] for d in st.deps), dirs[st.name]))
        final = yaml.safe_load(stage_config(graph[graph.final], dirs).to_yaml())
        finals.append(Variant(v.name, v.values, final))
    if problems:
        raise ConfigError.from_problems(problems, "sweep")
    return list(queued.values()), finals


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
