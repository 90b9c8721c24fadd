"""The sweep spec (YAML): one mergekit recipe, the axes to vary, the search, the evaluation.

Example (``configs/sweeps/tiny-slerp-t.yaml``)::

    recipe: ../tiny/marcoro14-slerp.yaml     # a mergekit recipe file (relative to this file) or a mapping
    axes:
      - path: parameters.t[self_attn]        # the filter entry 'self_attn' of parameter t
        values: [0.0, 0.25, 0.5, 0.75, 1.0]  # a grid; a value may be a gradient (a list)
      - path: parameters.t[mlp]
        low: 0.0                             # or a range: for random / tpe / cmaes search,
        high: 1.0                            #   and a grid of `steps` points
        steps: 3
    search: {kind: grid}                     # grid | random (samples) | tpe | cmaes (budget)
    batch_size: 8                            # variants merged together: sources read once per batch
    output: none                             # none (scores only) | bfloat16 | float16 | float32 | fp8
    eval:
      texts: {code: heldout/code.txt, prose: heldout/prose.txt}
      backend: transformers                  # or vllm (prompt logprobs, for GPU clusters)

Axis paths address the recipe: dotted keys, list indexes (``slices[0].sources[1].parameters.weight``,
``models[1].parameters.density``), and ``name[FILTER]`` for the entry of a filter list whose
``filter`` is FILTER (``[*]`` for the entry without a filter). ``merge_method`` is an axis too.
In a multi-stage recipe (mergekit-multi's documents, in the file or as a list) a path starts with
the stage it sets: ``stages[pair].parameters.weight``, ``stages[(final)].parameters.t`` for the
unnamed final document.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mergeserve.errors import ConfigError
from mergeserve.merge.config import _errors_to_problems, load_yaml, read_text_file

AxisValue = bool | int | float | str | list[int | float]
PATH_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[[^\]]*\])*)")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Axis(_Strict):
    """One dimension of the sweep: a place in the recipe and the values it takes."""

    path: str = Field(description="Where in the recipe, e.g. parameters.t[self_attn] or merge_method")
    name: str | None = Field(None, description="Label in tables and plots (default: the path)")
    values: list[AxisValue] | None = Field(None, description="Explicit values (grid, or choices for random/adaptive search)")
    low: float | None = Field(None, description="Lower end of a numeric range")
    high: float | None = Field(None, description="Upper end of a numeric range")
    steps: int | None = Field(None, ge=2, description="Grid points over [low, high] for a grid search")

    @model_validator(mode="after")
    def _values_or_range(self) -> Axis:
        if self.values is not None and (self.low is not None or self.high is not None):
            raise ValueError("give either 'values' or 'low'/'high', not both")
        if self.values is None and (self.low is None or self.high is None):
            raise ValueError("needs 'values' or both 'low' and 'high'")
        if self.values is not None and not self.values:
            raise ValueError("'values' is empty: an axis needs at least one value")
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ValueError(f"'low' ({self.low}) must be below 'high' ({self.high})")
        if self.steps is not None and self.values is not None:
            raise ValueError("'steps' applies to a 'low'/'high' range only")
        parse_path(self.path)
        return self

    @property
    def label(self) -> str:
        return self.name or self.path

    def grid(self) -> list[Any]:
        if self.values is not None:
            return list(self.values)
        if self.steps is None:
            raise ValueError(f"axis {self.label}: a grid over a range needs 'steps'")
        return [round(self.low + (self.high - self.low) * i / (self.steps - 1), 12) for i in range(self.steps)]  # type: ignore[operator]


class Search(_Strict):
    kind: Literal["grid", "random", "tpe", "cmaes"] = Field("grid", description="How variants are chosen")
    samples: int | None = Field(None, description="random: number of variants drawn")
    budget: int | None = Field(None, description="tpe/cmaes: number of variants evaluated")
    seed: int = Field(0, description="Seed of random and adaptive sampling")
    objective: str = Field("mean", description="What adaptive search minimises: 'mean' (mean log-perplexity) or a text name")

    @model_validator(mode="after")
    def _counts(self) -> Search:
        if self.kind == "random" and (self.samples is None or self.samples < 1):
            raise ValueError(f"@samples: random search needs samples >= 1, got {self.samples}")
        if self.kind in ("tpe", "cmaes") and (self.budget is None or self.budget < 1):
            raise ValueError(f"@budget: {self.kind} search needs a budget >= 1, got {self.budget}")
        return self


class Eval(_Strict):
    texts: dict[str, str] = Field(default_factory=dict, description="Held-out text files by name (relative to the spec)")
    backend: Literal["transformers", "vllm"] = Field("transformers", description="transformers (CPU/GPU) or vllm (GPU clusters)")
    max_length: int = Field(256, ge=2, description="Tokens per evaluation window, BOS included")
    max_tokens: int | None = Field(4096, ge=1, description="Tokens evaluated per text (its prefix); null for all")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="lm-evaluation-harness tasks (needs lm-eval and its datasets)")


class SweepSpec(_Strict):
    """A whole sweep spec."""

    recipe: str | dict[str, Any] | list[dict[str, Any]] = Field(
        description="mergekit recipe: a file path (relative to the spec), a mapping, or a multi-stage recipe's documents"
    )
    axes: list[Axis] = Field(min_length=1, description="The dimensions varied")
    search: Search = Field(default_factory=Search, description="grid, random, tpe or cmaes")
    batch_size: int = Field(8, ge=1, description="Variants merged together; each source byte is read once per batch")
    output: Literal["none", "bfloat16", "float16", "float32", "fp8"] = Field("none", description="Checkpoint dtype, or none for scores only")
    eval: Eval = Field(default_factory=Eval, description="Evaluation of every variant")
    out_shard_size: str = Field("auto", description="Max bytes per output shard (e.g. 1B); auto: about two shards per CPU")
    models_dir: str | None = Field(None, description="Directory that model ids resolve under (relative to the spec)")
    seed: int = Field(0, description="Seed of random merge methods (dare, della)")


def parse_path(path: str) -> list[tuple[str, list[str]]]:
    """'slices[0].sources[1].parameters.t[mlp]' -> [('slices', ['0']), ('sources', ['1']), ('parameters', []), ('t', ['mlp'])]."""
    parts = []
    for part in path.split("."):
        m = PATH_RE.fullmatch(part)
        if not m:
            raise ValueError(f"path {path!r}: cannot parse {part!r} (use key, key[INDEX] or key[FILTER])")
        parts.append((m[1], re.findall(r"\[([^\]]*)\]", m[2])))
    return parts


def load_spec(path: str | Path) -> tuple[SweepSpec, Path]:
    """Read and validate a spec file; returns it and the directory its relative paths start from."""
    p = Path(path)
    data = load_yaml(read_text_file(p, "sweep spec"), str(p))
    return parse_spec(data, str(p)), p.parent.absolute()


def parse_spec(data: Any, source: str = "sweep") -> SweepSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the sweep spec must be a YAML mapping, got {type(data).__name__}")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError.from_problems(_errors_to_problems(err), source) from None
