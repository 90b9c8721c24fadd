"""From a validated recipe to a plan: frozen, picklable shard tasks as plain data.

A :class:`MergePlan` lists output shards; each :class:`ShardTask` holds whole layers and the
:class:`TensorTask` s that produce its tensors. A tensor task names its sources (model index +
tensor name), the method, and every parameter already resolved to numbers for that tensor
(gradients interpolated, filters applied, precedence settled). Executing a plan therefore needs
no config logic: the single-process executor and the Ray actors run the same tasks, and a plan
can be printed (``mergeserve merge --plan-only``) and tested without Ray.

Layer walk (mergekit 0.1.5 ``MergePlanner``): pre-layer tensors (embeddings) come from the first
slice's sources at t=0; each slice of N layers gives layer i the position ``t = i / (N - 1)``
(1 when N = 1); post-layer tensors (final norm, lm_head) come from the last slice's sources at
t=0. A ``models:`` recipe is one slice of every model's full layer range (base appended if absent).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergeserve.errors import ConfigError, InputError
from mergeserve.merge.config import DTYPE_ALIASES, MergeConfig, ModelRef
from mergeserve.merge.methods.registry import MethodSpec, get_method
from mergeserve.merge.options import DEFAULT_SHARD_SIZE
from mergeserve.merge.params import MISSING, resolve
from mergeserve.merge.quantize import BLOCK, FP8_BLOCK, fp8_scale_shape, is_fp8_target
from mergeserve.merge.reader import ST_DTYPES, TORCH_TO_ST, ModelFiles, TensorInfo, tensor_nbytes
from mergeserve.merge.transforms import InputPlanner, InputTransform
from mergeserve.merge.vocab import TokenizerPlan

LAYER_RE = re.compile(r"^(?P<prefix>.*?\blayers\.)(?P<idx>\d+)\.(?P<suffix>.+)$")
OUT_DTYPES = ("float32", "float16", "bfloat16", "fp8")


@dataclass(frozen=True)
class ModelInput:
    """One input model: how the recipe names it and where its files are."""

    ref: str
    path: str
    lora: str | None = None  # adapter directory for ``path+adapter`` references


@dataclass(frozen=True)
class TensorTask:
    """How to compute one output tensor (and, for FP8, its scale tensor)."""

    name: str
    sources: tuple[tuple[int, str], ...]  # (model index into MergePlan.models, source tensor name)
    base_index: int | None
    params: tuple[tuple[str, Any], ...]  # resolved shared scalars and per-model tuples
    shape: tuple[int, ...]
    compute_dtype: str  # inputs are cast to this before merging (safetensors code)
    out_dtype: str  # stored dtype code (F8_E4M3 for FP8 weights)
    quantize: str | None = None  # "fp8_block" or None
    layer: int | None = None  # output layer index, None for embeddings / final norm / lm_head
    seed: int | None = None  # per-tensor seed for random methods
    transform: InputTransform | None = None  # LoRA patches / vocabulary map applied when sources load

    @property
    def scale_name(self) -> str:
        return self.name.removesuffix(".weight") + ".weight_scale_inv"

    def outputs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype code, shape) of each tensor this task writes, in order."""
        out = [(self.name, self.out_dtype, self.shape)]
        if self.quantize == FP8_BLOCK:
            out.append((self.scale_name, "F32", fp8_scale_shape(self.shape)))
        return out

    @property
    def bytes_out(self) -> int:
        return sum(tensor_nbytes(dtype, shape) for _, dtype, shape in self.outputs())


@dataclass(frozen=True)
class ShardTask:
    """One output file: whole layers, the tensors to compute and the bytes involved."""

    index: int
    filename: str
    tensors: tuple[TensorTask, ...]
    bytes_read: int
    bytes_written: int
    layers: tuple[int, ...] = ()

    def outputs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype code, shape) of every tensor of the file, in file order."""
        return [e for t in self.tensors for e in t.outputs()]


@dataclass(frozen=True)
class MergePlan:
    method: str
    models: tuple[ModelInput, ...]
    shards: tuple[ShardTask, ...]
    out_config: str  # config.json text for the output
    donor: int  # model index whose tokenizer/generation config are copied
    num_layers: int
    out_dtype: str
    seed: int
    fingerprint: str = ""  # hash of the recipe + plan, for --resume
    allow_pickle: bool = False  # the inputs may be pickle checkpoints (--allow-pickle): every reader honours it
    tokenizer: TokenizerPlan | None = None  # set when the recipe builds the output tokenizer

    @property
    def bytes_read(self) -> int:
        return sum(s.bytes_read for s in self.shards)

    @property
    def bytes_written(self) -> int:
        return sum(s.bytes_written for s in self.shards)

    @property
    def num_tensors(self) -> int:
        return sum(len(s.tensors) for s in self.shards)

    def describe(self) -> str:
        """A human-readable table of the plan (``--plan-only``)."""
        lines = [
            f"method {self.method}, {len(self.models)} input models, {self.num_layers} output layers, "
            f"{self.num_tensors} tensors, out dtype {self.out_dtype}",
            *(f"  model[{i}] {m.ref} -> {m.path}" + (f" + LoRA {m.lora}" if m.lora else "") for i, m in enumerate(self.models)),
            *([f"tokenizer: {self.tokenizer.source} (embeddings and lm_head remapped to it)"] if self.tokenizer else []),
            f"{len(self.shards)} shards, reads {self.bytes_read / 1e9:.3f} GB, writes {self.bytes_written / 1e9:.3f} GB",
        ]
        for s in self.shards:
            layers = f"layers {s.layers[0]}-{s.layers[-1]}" if s.layers else "no layers"
            lines.append(
                f"  {s.filename}: {len(s.tensors)} tensors, {layers}, read {s.bytes_read / 1e6:.1f} MB, "
                f"write {s.bytes_written / 1e6:.1f} MB"
            )
        return "\n".join(lines)


def _st_dtype(name: str) -> str:
    return {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[DTYPE_ALIASES[name]]


def resolve_model_path(ref: str, models_dir: str | Path | None = None) -> Path:
    """A model reference -> a local directory (local path, ``models_dir/ref``, or the HF cache)."""
    path = ref.split("@")[0].split("+")[0]
    cands = [Path(path).expanduser()]
    if models_dir is not None:
        cands.insert(0, Path(models_dir) / path)
    for c in cands:
        if c.is_dir():
            return c
    try:  # offline hub cache: real snapshots a user already downloaded
        from huggingface_hub import snapshot_download

        rev = ref.split("@")[1].split("+")[0] if "@" in ref else None
        return Path(snapshot_download(path, revision=rev, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not available offline"
        where = f" or {Path(models_dir) / path}" if models_dir else ""
        raise InputError(
            f"model {ref!r}: not a readable local directory ({cands[-1]}{where}) and not in the offline "
            "Hugging Face cache"
        ) from None


def resolve_adapter(ref: ModelRef, models_dir: str | Path | None = None) -> Path:
    """The directory of a ``model+adapter`` reference's LoRA adapter (resolved like a model)."""
    try:
        return resolve_model_path(ref.lora, models_dir)
    except InputError as e:
        raise InputError(f"model {str(ref)!r}: LoRA adapter {e.message.removeprefix('model ')}") from None


def layer_prefix(names) -> str | None:
    """The prefix of the layer tensors the planner walks: the first ``...layers.N.`` seen."""
    return next((m["prefix"] for n in names if (m := LAYER_RE.match(n))), None)


def check_model_config(cfg: dict, files: ModelFiles) -> int:
    """The model's layer count, once its ``config.json`` agrees with its tensors: the fields the
    planner reads have their types (``architectures`` a list of strings, ``model_type`` a string,
    ``text_config`` an object), and ``num_hidden_layers`` (or ``text_config``'s), when given, is an
    integer equal to the number of layers the tensors hold, numbered 0..N-1. InputError otherwise."""
    where = f"{files.dir / 'config.json'}"
    arch = cfg.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        raise InputError(f"{where}: architectures must be a list of strings, got {arch!r}")
    if not isinstance(cfg.get("model_type", ""), str):
        raise InputError(f"{where}: model_type must be a string, got {cfg['model_type']!r}")
    text = cfg.get("text_config", {})
    if not isinstance(text, dict):
        raise InputError(f"{where}: text_config must be an object, got {type(text).__name__}")
    if "num_hidden_layers" in cfg:
        key, claimed = "num_hidden_layers", cfg["num_hidden_layers"]
    else:
        key, claimed = "text_config.num_hidden_layers", text.get("num_hidden_layers")
    prefix = layer_prefix(files.tensors)
    found = {int(m["idx"]) for k in files.tensors if (m := LAYER_RE.match(k)) and m["prefix"] == prefix}
    count = max(found) + 1 if found else 0
    if found != set(range(count)):
        gaps = sorted(set(range(count)) - found)
        raise InputError(f"model {files.label}: layer(s) {gaps[:5]} missing from the tensors ({prefix}0-{count - 1} otherwise present)")
    if claimed is None:
        return count
    if type(claimed) is not int or claimed < 0:
        raise InputError(f"{where}: {key} must be a non-negative integer, got {claimed!r}")
    if claimed != count:
        raise InputError(f"{where}: {key} is {claimed}, but the tensors hold {count} layers")
    return count


@dataclass
class _Slice:
    sources: list[tuple[int, int, dict | None]]  # (model index, layer start, per-source params)
    length: int
    base: int | None
    params: dict | None


class Planner:
    """Builds a :class:`MergePlan`; collects every problem and raises them together."""

    def __init__(
        self,
        config: MergeConfig,
        *,
        models_dir: str | Path | None = None,
        out_dtype: str | None = None,
        shard_size: int = DEFAULT_SHARD_SIZE,
        seed: int = 0,
        allow_pickle: bool = False,
    ):
        self.config = config
        self.spec: MethodSpec = get_method(config.merge_method)
        self.shard_size = shard_size
        self.seed = seed
        self.allow_pickle = allow_pickle
        self.problems: list[str] = []
        self.out_dtype_arg = out_dtype or config.out_dtype
        if self.out_dtype_arg is not None and self.out_dtype_arg not in OUT_DTYPES and self.out_dtype_arg not in DTYPE_ALIASES:
            raise ConfigError(f"out_dtype: unknown dtype {self.out_dtype_arg!r} (use one of {', '.join(OUT_DTYPES)})")
        refs = config.referenced_models()
        self.models = tuple(
            ModelInput(str(r), str(resolve_model_path(str(r), models_dir)), str(resolve_adapter(r, models_dir)) if r.lora else None)
            for r in refs
        )
        self._index = {m.ref: i for i, m in enumerate(self.models)}
        self.files = [ModelFiles(m.path, allow_pickle=allow_pickle, label=m.ref) for m in self.models]
        self.model_configs = [f.config() for f in self.files]
        self.layer_counts = [check_model_config(c, f) for c, f in zip(self.model_configs, self.files, strict=True)]
        self.inputs = InputPlanner(
            config, self.models, self.files, self.model_configs, self.problems, allow_pickle=allow_pickle, models_dir=models_dir
        )

    # -- structure -------------------------------------------------------------------------
    def _num_layers(self, i: int) -> int:
        return self.layer_counts[i]

    def _slices(self) -> list[_Slice]:
        c = self.config
        base = self._index[str(c.base_model)] if c.base_model else None
        if c.models is not None:
            srcs = [(self._index[str(m.model)], 0, m.parameters) for m in c.models]
            if base is not None and base not in [s[0] for s in srcs]:
                srcs.append((base, 0, None))
            lengths = {self._num_layers(s[0]) for s in srcs}
            if len(lengths) > 1:
                self.problems.append(
                    "models: layer counts differ ("
                    + ", ".join(f"{self.models[s[0]].ref}: {self._num_layers(s[0])}" for s in srcs) + ")"
                )
            return [_Slice(srcs, min(lengths), base, None)]
        out = []
        for si, s in enumerate(c.slices or []):
            srcs = []
            for ji, src in enumerate(s.sources):
                mi = self._index[str(src.model)]
                a, b = src.layer_range
                n = self._num_layers(mi)
                if b > n:
                    self.problems.append(
                        f"slices[{si}].sources[{ji}].layer_range: [{a}, {b}] is out of bounds for {src.model} ({n} layers)"
                    )
                srcs.append((mi, a, src.parameters))
            sbase = self._index[str(s.base_model)] if s.base_model else base
            out.append(_Slice(srcs, s.sources[0].layer_range[1] - s.sources[0].layer_range[0], sbase, s.parameters))
        return out

    def _check_models(self) -> None:
        archs = {m.ref: tuple(cfg.get("architectures") or [cfg.get("model_type", "?")]) for m, cfg in zip(self.models, self.model_configs)}
        if len(set(archs.values())) > 1:
            self.problems.append("models have differing architectures: " + ", ".join(f"{k}: {v[0]}" for k, v in archs.items()))

    # -- parameters ------------------------------------------------------------------------
    def _params(self, sl: _Slice, out_name: str, src_names: list[str], t: float, base_index: int | None) -> tuple:
        spec, c = self.spec, self.config
        scopes_shared = [sl.params, c.parameters]
        resolved: list[tuple[str, Any]] = []
        for p in spec.shared_params:
            v = self._resolve_one(p, scopes_shared, out_name, t, None)
            resolved.append((p.name, v))
        for p in spec.model_params:
            vals = []
            for j, (mi, _, sparams) in enumerate(sl.sources):
                if j == base_index and not p.include_base:
                    vals.append(None)
                    continue
                vals.append(self._resolve_one(p, [sparams, sl.params, c.parameters], src_names[j], t, mi))
            resolved.append((p.name, tuple(vals)))
        return tuple(resolved)

    def _resolve_one(self, p, scopes, tensor_name: str, t: float, model: int | None) -> Any:
        def coerce(v):
            try:
                return p.coerce(v)
            except ValueError as e:
                raise ConfigError(f"parameters.{p.name}: {e} (tensor {tensor_name})") from None

        v = resolve(p.name, scopes, tensor_name, t, coerce)
        if v is MISSING:
            if p.required:
                who = f" for model {self.models[model].ref}" if model is not None else ""
                self.problems.append(f"parameters.{p.name}: required by {self.spec.name}{who}, missing (first at tensor {tensor_name})")
                return None
            return p.default
        return v

    # -- the walk --------------------------------------------------------------------------
    def _task(self, sl: _Slice, out_name: str, src_names: list[str], t: float, layer: int | None) -> TensorTask | None:
        """The task for one output tensor, or None (a problem noted, or an optional tensor absent)."""
        models = [s[0] for s in sl.sources]
        present = self._source_infos(models, out_name, src_names)
        if present is None:
            return None
        transform, new_shape = self.inputs.transform(models, src_names, [i.shape for i in present], sl.base, out_name, layer)
        if not self._same_shapes(models, out_name, present, rows_may_differ=new_shape is not None):
            return None
        base_index = models.index(sl.base) if sl.base is not None and sl.base in models else None
        if not self._method_accepts(len(models), base_index):
            return None
        shape = new_shape or present[0].shape
        compute, out, quant = self._dtypes(out_name, present, shape, layer)
        seed = None
        if self.spec.random:
            seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{out_name}".encode()).digest()[:8], "little") >> 1
        return TensorTask(
            name=out_name,
            sources=tuple(zip(models, src_names)),
            base_index=base_index,
            params=self._params(sl, out_name, src_names, t, base_index),
            shape=shape,
            compute_dtype=compute,
            out_dtype=out,
            quantize=quant,
            layer=layer,
            seed=seed,
            transform=transform,
        )

    def _source_infos(self, models: list[int], out_name: str, src_names: list[str]) -> list[TensorInfo] | None:
        """Every source tensor's header; None if the tensor is absent everywhere, an optional one
        (lm_head) is absent somewhere, or a problem was noted."""
        infos = [self.files[mi].info(sname) if sname in self.files[mi] else None for mi, sname in zip(models, src_names)]
        present = [i for i in infos if i is not None]
        if not present:
            return None
        if len(present) < len(infos):
            if out_name.startswith("lm_head"):  # tied to the embeddings in some inputs: optional
                return None
            missing = [self.models[m].ref for m, i in zip(models, infos) if i is None]
            self.problems.append(f"tensor {src_names[infos.index(None)]!r} is missing from {', '.join(missing)}")
            return None
        return present

    def _same_shapes(self, models: list[int], out_name: str, present: list[TensorInfo], rows_may_differ: bool) -> bool:
        """Whether the sources have one shape (but for their rows when a vocabulary map
        re-rows them); notes the problem if not."""
        if len({i.shape[1:] if rows_may_differ else i.shape for i in present}) > 1:
            desc = ", ".join(f"{self.models[m].ref}: {list(i.shape)}" for m, i in zip(models, present))
            self.problems.append(f"tensor {out_name!r}: shapes differ between models ({desc})")
            return False
        return True

    def _method_accepts(self, n: int, base_index: int | None) -> bool:
        """Whether the method takes ``n`` inputs with this base; notes the problem if not."""
        spec = self.spec
        if spec.base == "required" and base_index is None:
            self.problems.append(f"base_model: {spec.name} needs a base model among the sources")
            return False
        if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
            want = f"{spec.min_models}" + (f"-{spec.max_models}" if spec.max_models != spec.min_models else "")
            self.problems.append(f"merge_method: {spec.name} takes {want} input models, got {n}")
            return False
        nb = spec.non_base_models
        if nb is not None and n - (base_index is not None) != nb:
            self.problems.append(f"merge_method: {spec.name} takes exactly {nb} non-base models, got {n - (base_index is not None)}")
            return False
        return True

    def _dtypes(
        self, out_name: str, present: list[TensorInfo], shape: tuple[int, ...], layer: int | None
    ) -> tuple[str, str, str | None]:
        """(compute dtype, stored dtype, quantization) codes: the recipe's dtype or the inputs'
        promoted one for the math; out_dtype (FP8 for decoder linear weights) for storage."""
        if self.config.dtype:
            compute = _st_dtype(self.config.dtype)
        else:
            dt = present[0].torch_dtype
            for i in present[1:]:
                dt = torch.promote_types(dt, i.torch_dtype)
            compute = TORCH_TO_ST[dt]
        quant = None
        od = self.out_dtype_arg
        if od == "fp8":
            if is_fp8_target(out_name, shape, layer):
                quant, out = FP8_BLOCK, "F8_E4M3"
            else:
                out = "BF16"
        elif od:
            out = _st_dtype(od)
        else:
            out = compute
        if not ST_DTYPES[compute].torch.is_floating_point:
            out, quant = compute, None
        return compute, out, quant

    def plan(self) -> MergePlan:
        self._check_models()
        slices = self._slices()
        if self.problems:
            raise ConfigError.from_problems(self.problems, "recipe")
        donor = self._index[str(self.config.base_model)] if self.config.base_model else 0
        names = list(self.files[donor].tensors)
        layer_suffixes: list[str] = []
        prefix = layer_prefix(names)
        pre, post = [], []
        for n in names:
            m = LAYER_RE.match(n)
            if m:
                if m["suffix"] not in layer_suffixes:
                    layer_suffixes.append(m["suffix"])
            elif "embed" in n:
                pre.append(n)
            else:
                post.append(n)
        units: list[tuple[int | None, list[TensorTask]]] = []
        first, last = slices[0], slices[-1]
        units.append((None, [t for n in pre if (t := self._task(first, n, [n] * len(first.sources), 0.0, None))]))
        out_layer = 0
        for sl in slices:
            for i in range(sl.length):
                t = i / (sl.length - 1) if sl.length > 1 else 1.0
                tasks = []
                for suf in layer_suffixes:
                    out_name = f"{prefix}{out_layer}.{suf}"
                    src_names = [f"{prefix}{start + i}.{suf}" for (_, start, _) in sl.sources]
                    task = self._task(sl, out_name, src_names, t, out_layer)
                    if task:
                        tasks.append(task)
                units.append((out_layer, tasks))
                out_layer += 1
        units.append((None, [t for n in post if (t := self._task(last, n, [n] * len(last.sources), 0.0, None))]))
        if self.problems:
            raise ConfigError.from_problems(list(dict.fromkeys(self.problems)), "recipe")
        shards = self._shard(units)
        out_dtype = self.out_dtype_arg or self.config.dtype or shards[0].tensors[0].compute_dtype
        cfg = self._out_config(donor, out_layer)
        fp = hashlib.sha256(repr((self.config.model_dump(mode="json"), shards, self.models)).encode()).hexdigest()
        return MergePlan(
            method=self.spec.name,
            models=self.models,
            shards=shards,
            out_config=cfg,
            donor=donor,
            num_layers=out_layer,
            out_dtype=str(out_dtype),
            seed=self.seed,
            fingerprint=fp,
            allow_pickle=self.allow_pickle,
            tokenizer=self.inputs.tokenizer,
        )

    def _shard(self, units: list[tuple[int | None, list[TensorTask]]]) -> tuple[ShardTask, ...]:
        groups: list[list[tuple[int | None, list[TensorTask]]]] = [[]]
        size = 0
        for unit in units:
            ub = sum(t.bytes_out for t in unit[1])
            if groups[-1] and size + ub > self.shard_size:
                groups.append([])
                size = 0
            groups[-1].append(unit)
            size += ub
        groups = [g for g in groups if any(u[1] for u in g)]
        total = len(groups)
        shards = []
        for k, g in enumerate(groups):
            tasks = tuple(t for _, ts in g for t in ts)
            read = sum(self.files[m].info(n).nbytes for t in tasks for m, n in t.sources)
            name = "model.safetensors" if total == 1 else f"model-{k + 1:05d}-of-{total:05d}.safetensors"
            shards.append(
                ShardTask(k, name, tasks, read, sum(t.bytes_out for t in tasks), tuple(layer for layer, ts in g if layer is not None and ts))
            )
        return tuple(shards)

    def _out_config(self, donor: int, num_layers: int) -> str:
        cfg = dict(self.model_configs[donor])
        if "num_hidden_layers" in cfg:
            cfg["num_hidden_layers"] = num_layers
        self.inputs.set_vocab_size(cfg)
        od = self.out_dtype_arg or self.config.dtype
        if od == "fp8":
            cfg["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [BLOCK, BLOCK],
            }
            od = "bfloat16"
        if od:
            od = DTYPE_ALIASES[od]
            cfg["dtype"] = od
            if "torch_dtype" in cfg:
                cfg["torch_dtype"] = od
        # mergekit updates layer_types too when the layer count changes (Qwen2 sliding-window list).
        if isinstance(cfg.get("layer_types"), list) and len(cfg["layer_types"]) != num_layers:
            lt = cfg["layer_types"]
            cfg["layer_types"] = (lt * (num_layers // max(1, len(lt)) + 1))[:num_layers]
        return json.dumps(cfg, indent=2, sort_keys=True) + "\n"


def build_plan(config: MergeConfig, **kwargs: Any) -> MergePlan:
    """Validate inputs against the recipe and return the plan (raises ConfigError / InputError)."""
    planner = Planner(config, **kwargs)
    try:
        return planner.plan()
    finally:
        for f in planner.files:
            f.close()
