"""mergekit-compatible merge recipes as validated pydantic models.

The YAML a user pastes from a model card (``slices`` / ``models``, ``merge_method``,
``base_model``, ``parameters`` with gradients and filters, ``dtype``, ``out_dtype``,
``tokenizer_source`` / ``tokenizer``, ``chat_template``) parses into :class:`MergeConfig`.
Structural problems are collected by pydantic; :func:`load_config` turns them all into ONE
:class:`~mergeserve.errors.ConfigError` whose message names every field. Semantic checks that
need the method registry or the input models' files are the planner's (:mod:`mergeserve.merge.plan`).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from mergeserve.errors import ConfigError

Scalar = bool | int | float | str
# A gradient: K values interpolated over the layers of a slice (numbers), or picked (bools/strings).
Gradient = list[Scalar]

DTYPES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {
    "fp32": "float32", "float": "float32", "float32": "float32",
    "fp16": "float16", "half": "float16", "float16": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FilteredValue(_Strict):
    """One item of a filter list: applies ``value`` to tensors whose name contains ``filter``."""

    filter: str | None = Field(None, description="Substring of the output tensor name; None or '*' matches all")
    value: Scalar | Gradient = Field(description="A scalar or a gradient (list of values)")

    @field_validator("value")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("empty gradient (a list needs at least one value)")
        return v


# A parameter setting: scalar, gradient, one filtered value, or a list of filtered values.
ParameterSetting = Scalar | Gradient | FilteredValue | list[FilteredValue]


def _check_settings(params: dict[str, Any] | None) -> dict[str, Any] | None:
    if params is None:
        return None
    for name, setting in params.items():
        if isinstance(setting, list) and not setting:
            # "@name:" lets the error formatter extend the location to parameters.<name>
            raise ValueError(f"@{name}: empty gradient (a list needs at least one value)")
    return params


class ModelRef(_Strict):
    """A model reference: ``path``, ``path@revision`` or ``path+lora_path``."""

    path: str = Field(description="Local directory or hub id")
    revision: str | None = Field(None, description="Hub revision after '@'")
    lora: str | None = Field(None, description="LoRA adapter after '+' (merged into the model first)")

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("empty model reference")
            base, _, lora = value.partition("+")
            if base.count("@") > 1:
                raise ValueError(f"model reference {value!r} has more than one '@'")
            path, _, rev = base.partition("@")
            return {"path": path, "revision": rev or None, "lora": lora or None}
        return value

    def __str__(self) -> str:
        s = self.path + (f"@{self.revision}" if self.revision else "")
        return s + (f"+{self.lora}" if self.lora else "")


class InputModel(_Strict):
    model: ModelRef = Field(description="The input model")
    parameters: dict[str, ParameterSetting] | None = Field(None, description="Per-model parameters")

    _params = field_validator("parameters")(classmethod(lambda cls, v: _check_settings(v)))


class InputSlice(_Strict):
    model: ModelRef = Field(description="The input model")
    layer_range: tuple[int, int] = Field(description="Half-open range [start, end) of layers taken")
    parameters: dict[str, ParameterSetting] | None = Field(None, description="Per-source parameters")

    _params = field_validator("parameters")(classmethod(lambda cls, v: _check_settings(v)))

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range {list(v)} must satisfy 0 <= start < end")
        return v


class OutputSlice(_Strict):
    sources: list[InputSlice] = Field(min_length=1, description="Layer ranges merged into this slice")
    base_model: ModelRef | None = Field(None, description="Overrides the top-level base_model for this slice")
    residual_weight: float | None = Field(None, description="Accepted for compatibility; unused by mergekit's planner")
    parameters: dict[str, ParameterSetting] | None = Field(None, description="Slice-level parameters")

    _params = field_validator("parameters")(classmethod(lambda cls, v: _check_settings(v)))

    @model_validator(mode="after")
    def _same_length(self) -> OutputSlice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            ranges = ", ".join(f"{s.model}: {list(s.layer_range)}" for s in self.sources)
            raise ValueError(f"sources' layer_range lengths differ ({ranges})")
        return self


class ModelTokenSource(_Strict):
    """``{kind: model_token, model, token | token_id}``: a row of one model's embedding."""

    kind: Literal["model_token"]
    model: ModelRef = Field(description="The model whose row is taken")
    token_id: int | None = Field(None, description="Row index in that model (its own vocabulary)")
    token: str | None = Field(None, description="Token whose row is taken, in that model's vocabulary")

    @model_validator(mode="after")
    def _one(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class ZeroSource(_Strict):
    kind: Literal["zero"]


def _source_tag(value: Any) -> str:
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return {"model_token": "ModelTokenSource", "zero": "ZeroSource"}.get(kind, "ModelRef")


# Dispatched on `kind`, so a mistake is reported against the kind the user meant, not every branch.
TokenSource = Annotated[
    Annotated[ModelTokenSource, Tag("ModelTokenSource")] | Annotated[ZeroSource, Tag("ZeroSource")] | Annotated[ModelRef, Tag("ModelRef")],
    Discriminator(_source_tag),
]


class TokenEmbedding(_Strict):
    source: TokenSource | None = Field(None, description="A model, {kind: model_token, ...} or {kind: zero}")
    force: bool = Field(False, description="Override an existing embedding")


class TokenizerSettings(_Strict):
    source: Literal["union", "base"] | ModelRef = Field("union", description="'base', 'union' or a model")
    tokens: dict[str, TokenEmbedding] | None = Field(None, description="Extra tokens and their embeddings")
    pad_to_multiple_of: int | None = Field(None, ge=1, description="Pad the vocabulary size")


class MergeConfig(_Strict):
    """A whole recipe, in mergekit's schema."""

    merge_method: str = Field(description="Registry name of the merge method, e.g. slerp")
    slices: list[OutputSlice] | None = Field(None, description="Output slices built from input layer ranges")
    models: list[InputModel] | None = Field(None, description="Whole models merged layer for layer")
    base_model: ModelRef | None = Field(None, description="The base model (t=0 end for slerp, delta origin)")
    parameters: dict[str, ParameterSetting] | None = Field(None, description="Top-level parameters")
    dtype: str | None = Field(None, description="Inputs are cast to this dtype when loaded")
    out_dtype: str | None = Field(None, description="The output is cast to this dtype when saved")
    tokenizer_source: Literal["union", "base"] | ModelRef | None = Field(None, description="Tokenizer to write")
    tokenizer: TokenizerSettings | None = Field(None, description="Tokenizer settings (instead of tokenizer_source)")
    chat_template: str | None = Field(None, description="'auto', a built-in template name, or Jinja text")
    name: str | None = Field(None, description="Accepted for compatibility (mergekit-moe / LazyMergekit)")

    _params = field_validator("parameters")(classmethod(lambda cls, v: _check_settings(v)))

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v not in DTYPE_ALIASES:
            raise ValueError(f"unknown dtype {v!r} (use one of {', '.join(DTYPES)})")
        return DTYPE_ALIASES[v]

    @model_validator(mode="after")
    def _shape(self) -> MergeConfig:
        if (self.slices is None) == (self.models is None):
            raise ValueError("exactly one of 'models' or 'slices' must be given")
        if self.models is not None and not self.models:
            raise ValueError("'models' is empty")
        if self.slices is not None and not self.slices:
            raise ValueError("'slices' is empty")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give 'tokenizer_source' or 'tokenizer', not both")
        return self

    # -- helpers used by the planner -------------------------------------------------------
    def referenced_models(self) -> list[ModelRef]:
        """Every model the recipe names, base first, in first-mention order (deterministic)."""
        seen: dict[str, ModelRef] = {}
        refs = [self.base_model] if self.base_model else []
        refs += [m.model for m in self.models or []]
        for s in self.slices or []:
            refs += ([s.base_model] if s.base_model else []) + [src.model for src in s.sources]
        for r in refs:
            seen.setdefault(str(r), r)
        return list(seen.values())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after[_shape()]",) or "function-" in str(part) or str(part).startswith(
            ("union[", "list[", "tuple[", "bool", "int", "float", "str", "FilteredValue", "ModelRef", "literal",
             "ModelTokenSource", "ZeroSource")
        ):
            continue  # pydantic's union-branch labels: noise for a user
        else:
            out += ("." if out else "") + str(part)
    return out or "config"


def _errors_to_problems(err: ValidationError) -> list[str]:
    problems: dict[str, str] = {}
    for e in err.errors():
        loc = _format_loc(tuple(e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if msg.startswith("@") and ": " in msg:  # a validator naming a key below its field
            key, msg = msg[1:].split(": ", 1)
            loc = f"{loc}.{key}"
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "missing":
            msg = "required field is missing"
        # A union reports one error per branch; keep the first per location.
        problems.setdefault(loc, f"{loc}: {msg}")
    return list(problems.values())


def parse_config(data: Any, source: str = "config") -> MergeConfig:
    """Validate a parsed YAML mapping; raise one ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError.from_problems(_errors_to_problems(err), source) from None


# A recipe is a few KB (a long inline chat template, tens of KB). The node budget counts every node
# as often as aliases repeat it: a few anchors in a real recipe stay far below it, while the
# 810-byte "billion laughs" (nine aliases of nine aliases...) would expand to 9^9 nodes.
MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


def read_text_file(path: str | Path, what: str = "recipe") -> str:
    """A UTF-8 text file of at most MAX_RECIPE_BYTES; ConfigError naming the file otherwise."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read {what}: {e.strerror or e}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise ConfigError(f"{p}: {what} larger than {MAX_RECIPE_BYTES:,} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: {what} is not valid UTF-8 (byte {e.start})") from None


def _expanded_size(root: yaml.Node, source: str) -> int:
    """Nodes in the document once every alias is expanded (memoised: linear in the distinct
    nodes); ConfigError past MAX_YAML_NODES or for a recursive alias."""
    size: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in size:
            continue
        kids = []
        if isinstance(node, yaml.SequenceNode):
            kids = node.value
        elif isinstance(node, yaml.MappingNode):
            kids = [n for pair in node.value for n in pair]
        if children_done:
            active.discard(key)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            if size[key] > MAX_YAML_NODES:
                raise ConfigError(f"{source}: the YAML expands to more than {MAX_YAML_NODES:,} nodes (aliases repeat too much)")
            continue
        if key in active:
            raise ConfigError(f"{source}: a YAML alias refers to a node that contains it")
        active.add(key)
        stack.append((node, True))
        for k in kids:
            if id(k) in active:
                raise ConfigError(f"{source}: a YAML alias refers to a node that contains it")
            stack.append((k, False))
    return size[id(root)]


@contextmanager
def _yaml_errors(source: str):
    """YAML syntax errors and runaway nesting as one ConfigError naming ``source``."""
    try:
        yield
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"{source}: the YAML is nested too deeply") from None


def _check_length(text: str, source: str) -> None:
    if len(text) > MAX_RECIPE_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_RECIPE_BYTES:,} characters")


def load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` with a budget: at most MAX_RECIPE_BYTES of text and MAX_YAML_NODES nodes
    after alias expansion, checked on the composed node graph before any Python object is built."""
    _check_length(text, source)
    loader = yaml.SafeLoader(text)
    try:
        with _yaml_errors(source):
            node = loader.get_single_node()
            if node is None:
                return None
            _expanded_size(node, source)
            return loader.construct_document(node)
    finally:
        loader.dispose()


def load_yaml_all(text: str, source: str) -> list[Any]:
    """Every non-empty document of ``text`` (a mergekit-multi recipe has several), with
    :func:`load_yaml`'s budget for all of them together."""
    _check_length(text, source)
    loader = yaml.SafeLoader(text)
    docs, nodes = [], 0
    try:
        with _yaml_errors(source):
            while loader.check_node():
                node = loader.get_node()
                nodes += _expanded_size(node, source)
                if nodes > MAX_YAML_NODES:
                    raise ConfigError(f"{source}: the YAML expands to more than {MAX_YAML_NODES:,} nodes (aliases repeat too much)")
                doc = loader.construct_document(node)
                if doc is not None:
                    docs.append(doc)
    finally:
        loader.dispose()
    return docs


def load_config(path: str | Path) -> tuple[MergeConfig, str]:
    """Read and validate a recipe file; returns the config and its original text."""
    text = read_text_file(path)
    return parse_config(load_yaml(text, str(path)), str(path)), text
