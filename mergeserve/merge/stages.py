"""Multi-stage recipes (mergekit-multi's format): several named merges, later ones using earlier.

A recipe file with several YAML documents is a graph of merges. Each document is a mergekit
recipe plus a ``name``; a model reference whose path is another document's name means that
stage's output. At most one document may be unnamed: it is the final merge, written to the
output directory. Without one, the final merge is the one stage that no other stage uses.

This module is pure: :func:`parse_stages` validates the whole graph before any work (every
stage's schema, duplicate names, several unnamed documents, self-references, cycles, an unclear
final stage: all problems in one :class:`~mergeserve.errors.ConfigError`) and orders the stages
topologically; :func:`stage_config` rewrites a stage's references to its inputs' directories.
Running the stages is :mod:`.stage_run`'s job.

Unlike mergekit-multi, which rewrites any string in a document that equals a stage name (a stage
named like a merge method would rewrite ``merge_method``), only model references are rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeserve.errors import ConfigError
from mergeserve.merge.config import MergeConfig, ModelRef, load_yaml_all, parse_config, read_text_file

FINAL = "(final)"  # display name of the unnamed document


@dataclass(frozen=True)
class Stage:
    name: str  # FINAL for the unnamed document
    config: MergeConfig
    deps: tuple[str, ...]  # names of the stages it reads, in first-mention order


@dataclass(frozen=True)
class StageGraph:
    stages: tuple[Stage, ...]  # topological order: every stage after the stages it reads
    final: str

    def __getitem__(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def describe(self) -> str:
        """The DAG (``mergeserve merge --plan-only`` on a multi-stage recipe)."""
        users = {s.name: [u.name for u in self.stages if s.name in u.deps] for s in self.stages}
        lines = [f"multi-stage recipe: {len(self.stages)} stages, final stage {self.final}"]
        for k, s in enumerate(self.stages):
            models = ", ".join(str(r) for r in s.config.referenced_models())
            lines.append(f"  {k + 1}. {s.name}: {s.config.merge_method} of {models}")
            lines.append(f"     reads stages: {', '.join(s.deps) or '-'}; used by: {', '.join(users[s.name]) or '-'}"
                         + ("; written to the output" if s.name == self.final else ""))
        return "\n".join(lines)


def load_stages(path: str | Path) -> StageGraph | None:
    """The stage graph of a multi-document recipe file; None for a plain (one-document) recipe."""
    docs = load_yaml_all(read_text_file(path), str(path))
    return graph_of(docs, str(path)) if len(docs) > 1 else None


def model_refs(config: MergeConfig) -> list[ModelRef]:
    """Every model reference in a recipe, including tokenizer sources (first-mention order)."""
    refs = list(config.referenced_models())
    tk = config.tokenizer
    src = tk.source if tk is not None else config.tokenizer_source
    if isinstance(src, ModelRef):
        refs.append(src)
    for emb in (tk.tokens or {}).values() if tk is not None else ():
        s = emb.source
        refs += [s] if isinstance(s, ModelRef) else [s.model] if getattr(s, "model", None) is not None else []
    return refs


def parse_stages(text: str, source: str = "recipe") -> StageGraph:
    """Parse and validate a multi-document recipe; one ConfigError lists every problem."""
    return graph_of(load_yaml_all(text, source), source)


def graph_of(docs: list[Any], source: str = "recipe") -> StageGraph:
    """Validate the documents of a multi-stage recipe; one ConfigError lists every problem."""
    problems: list[str] = []
    raw: dict[str, MergeConfig] = {}
    unnamed = 0
    for k, doc in enumerate(docs):
        if not isinstance(doc, dict):
            problems.append(f"document {k + 1}: a stage must be a YAML mapping, got {type(doc).__name__}")
            continue
        name = doc.get("name")
        if name is None:
            unnamed += 1
            name = FINAL
        elif not isinstance(name, str) or not name.strip() or name in (FINAL, ".", "..") or "/" in name or name.startswith("__"):
            problems.append(f"document {k + 1}: name must be a string usable as a directory name, got {name!r}")
            continue
        label = f"stage {name}" if name != FINAL else f"document {k + 1} (unnamed)"
        if name in raw and name != FINAL:
            problems.append(f"{label}: duplicate stage name {name!r}")
            continue
        try:
            raw[name] = parse_config(doc, label)
        except ConfigError as e:
            problems += [f"{label}: {p}" for p in e.problems]
    if unnamed > 1:
        problems.append(f"{unnamed} documents have no name: only the final merge may be unnamed")
    deps: dict[str, tuple[str, ...]] = {}
    for name, cfg in raw.items():
        used = [r.path for r in model_refs(cfg) if r.path in raw or r.path == name]
        if name in used:
            problems.append(f"stage {name}: refers to itself")
        deps[name] = tuple(dict.fromkeys(u for u in used if u != name))
    order = _toposort(deps, problems)
    final = _final(deps, unnamed > 0, problems) if raw else None
    if problems:
        raise ConfigError.from_problems(problems, source)
    return StageGraph(tuple(Stage(n, raw[n], deps[n]) for n in order), final)


def _toposort(deps: dict[str, tuple[str, ...]], problems: list[str]) -> list[str]:
    """Stages in document order, moved after their inputs; cycles are problems."""
    order: list[str] = []
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            cycle = path[path.index(name):] + [name]
            problems.append("stages form a cycle: " + " -> ".join(cycle))
            return
        state[name] = "open"
        for d in deps[name]:
            visit(d, path + [name])
        state[name] = "done"
        order.append(name)

    for name in deps:
        visit(name, [])
    return order


def _final(deps: dict[str, tuple[str, ...]], has_unnamed: bool, problems: list[str]) -> str | None:
    if has_unnamed:
        return FINAL
    used = {d for ds in deps.values() for d in ds}
    sinks = [n for n in deps if n not in used]
    if len(sinks) == 1:
        return sinks[0]
    problems.append(
        "no final merge: leave the final document unnamed, or make one stage the only one no other stage uses "
        f"(unused stages: {', '.join(sinks) or 'none'})"
    )
    return None


def stage_config(stage: Stage, outputs: dict[str, Path]) -> MergeConfig:
    """``stage``'s recipe with references to earlier stages replaced by their output directories."""

    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"path", "revision", "lora"} and node["path"] in outputs:
                return {**node, "path": str(outputs[node["path"]])}
            return {k: fix(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    data = fix(stage.config.model_dump(mode="json", exclude_none=False))
    data.pop("name", None)
    return MergeConfig.model_validate(data)
