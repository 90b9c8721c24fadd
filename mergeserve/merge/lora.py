"""LoRA inputs (``model: base+path/to/adapter``): a PEFT adapter applied to its model's tensors.

mergekit 0.1.5 merges the adapter into the model first (``ModelReference.merged``: peft's
``merge_and_unload``, saved in the base checkpoint's dtype) and then reads the result like any
other model. Here the same arithmetic is an input transform: at planning time :func:`plan_adapter`
checks the adapter against the model's tensors and says, per model tensor, which adapter tensors
alter it (a :class:`LoraPatch`, frozen data in the plan); :meth:`LoraPatch.apply` runs when the
source tensor is loaded. Only the patched tensors are touched; the rest are read as stored.

What peft does, reproduced bit for bit (checked against mergekit 0.1.5 + peft 0.21):

- adapter weights are upcast to float32 when loaded (peft's ``autocast_adapter_dtype``);
- ``scaling = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``r`` and
  ``lora_alpha`` per module from ``rank_pattern`` / ``alpha_pattern`` (pattern ``(.*\\.)?KEY$``);
- linear layer ``W [out, in]``: ``W' = dtype(W + (B [out, r] @ A [r, in]) * scaling)``, the sum in
  float32; ``fan_in_fan_out`` transposes the delta only for Conv1D layers (GPT-2); peft overrides
  the flag for ``nn.Linear`` layers (with a warning), so it changes nothing for Llama-like models;
- embedding ``E [vocab, dim]``: ``E' = E + dtype((B [dim, r] @ A [r, vocab]).T * scaling)``;
- ``lora_bias``: ``bias' = dtype(bias + lora_B.bias * scaling)``;
- tensors saved whole in the adapter (``modules_to_save``, trained biases, ``base_layer.weight``
  of targeted embeddings) replace the model's, cast to its dtype.

Which modules an adapter alters follows peft's matching of ``target_modules`` (a list of names or
suffixes, a regular expression, or ``all-linear``), ``exclude_modules``, ``layers_to_transform``
/ ``layers_pattern``; an adapter tensor for a module those rules do not target is refused rather
than silently dropped, as are adapter kinds whose merge is not plain LoRA (DoRA and the others in
:data:`UNSUPPORTED_FIELDS`).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeserve.errors import InputError
from mergeserve.merge.reader import MAX_CONFIG_BYTES, TensorInfo, read_header
from mergeserve.merge.untrusted import model_file, parse_json, read_capped

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
# peft saves every key under the PeftModel wrapper's prefix.
KEY_PREFIX = "base_model.model."
# Model types whose projections are transformers' Conv1D (weight stored [in, out]): the only layers
# where peft honours fan_in_fan_out.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
# Adapter settings whose merge is not the plain LoRA sum above: refused when set (truthy).
UNSUPPORTED_FIELDS = (
    "use_dora", "use_qalora", "use_bdlora", "alora_invocation_tokens", "arrow_config", "velora_config",
    "monteclora_config", "kasa_config", "target_parameters", "trainable_token_indices", "layer_replication",
)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)$")


@dataclass(frozen=True)
class LoraPatch:
    """How one stored model tensor is altered by an adapter (names are keys in ``file``)."""

    file: str
    replace: str | None = None  # adapter tensor that replaces the stored one
    a: str | None = None  # lora_A.weight / lora_embedding_A
    b: str | None = None  # lora_B.weight / lora_embedding_B / lora_B.bias
    scaling: float = 1.0
    kind: str = "linear"  # "linear" | "embedding" | "bias"
    transpose: bool = False  # Conv1D layer with fan_in_fan_out

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (the stored tensor, any shape) -> the tensor mergekit's merged model holds."""
        dtype = t.dtype
        if self.replace is not None:
            t = adapter_tensor(self.file, self.replace).to(dtype)
        if self.b is None:
            return t
        b = adapter_tensor(self.file, self.b).to(torch.float32)
        if self.kind == "bias":
            return (t + b * self.scaling).to(dtype)
        a = adapter_tensor(self.file, self.a).to(torch.float32)
        if self.kind == "embedding":
            return t + ((b @ a).T * self.scaling).to(dtype)
        delta = b @ a
        if self.transpose:
            delta = delta.T
        return (t + delta * self.scaling).to(dtype)


@functools.lru_cache(maxsize=4)
def _pickled(file: str) -> dict[str, torch.Tensor]:
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def adapter_tensor(file: str, name: str) -> torch.Tensor:
    """One tensor of an adapter weights file (the planner has validated the file and the name)."""
    if file.endswith(".bin"):
        return _pickled(file)[name]
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        return f.get_tensor(name)


@dataclass
class _Adapter:
    path: Path
    file: Path
    config: dict
    tensors: dict[str, tuple[tuple[int, ...], str]]  # key -> (shape, dtype name)


def _load(adapter_dir: Path, allow_pickle: bool, label: str) -> _Adapter:
    """The adapter's config and its weights' header; every file resolved inside ``adapter_dir``
    (:func:`~.untrusted.model_file`), as a model's files are."""
    cfg_path = model_file(adapter_dir, ADAPTER_CONFIG)
    if cfg_path is None:
        raise InputError(f"adapter {label}: missing {adapter_dir / ADAPTER_CONFIG}")
    config = parse_json(read_capped(cfg_path, MAX_CONFIG_BYTES), str(adapter_dir / ADAPTER_CONFIG), strict=False)
    if not isinstance(config, dict):
        raise InputError(f"{adapter_dir / ADAPTER_CONFIG}: must be a JSON object, got {type(config).__name__}")
    st = model_file(adapter_dir, ADAPTER_SAFETENSORS)
    if st is not None:
        header: dict[str, TensorInfo] = read_header(st, adapter_dir / ADAPTER_SAFETENSORS)
        return _Adapter(adapter_dir, st, config, {k: (i.shape, i.dtype) for k, i in header.items()})
    pk = model_file(adapter_dir, ADAPTER_PICKLE)
    if pk is None:
        raise InputError(f"adapter {label}: neither {ADAPTER_SAFETENSORS} nor {ADAPTER_PICKLE} in {adapter_dir}")
    if not allow_pickle:
        raise InputError(f"{adapter_dir / ADAPTER_PICKLE}: pickle adapter weights are refused unless --allow-pickle is given")
    try:
        sd = _pickled(str(pk))
    except Exception as e:  # noqa: BLE001 - any failure means a corrupt file
        raise InputError(f"{adapter_dir / ADAPTER_PICKLE}: cannot load pickle adapter weights: {e}") from None
    return _Adapter(adapter_dir, pk, config, {k: (tuple(v.shape), str(v.dtype)) for k, v in sd.items()})


def _pattern_value(patterns: dict, module: str, default):
    """peft's ``get_pattern_key``: the first pattern key that ends ``module``'s dotted name."""
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


class _Targets:
    """peft's ``check_target_module_exists`` over module names (tensor names less the suffix)."""

    def __init__(self, cfg: dict, linear: set[str]):
        self.cfg = cfg
        tm = cfg.get("target_modules")
        self.all_linear = isinstance(tm, str) and tm.lower() == "all-linear"
        self.linear = linear

    def __call__(self, key: str) -> bool:
        cfg = self.cfg
        ex = cfg.get("exclude_modules")
        if ex and (re.fullmatch(ex, key) if isinstance(ex, str) else (key in ex or any(key.endswith(f".{e}") for e in ex))):
            return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in cfg.get("modules_to_save") or ()):
            return False
        tm = cfg.get("target_modules")
        if self.all_linear:
            return key in self.linear
        if isinstance(tm, str):
            return re.fullmatch(tm, key) is not None
        if key in tm:
            return True
        if not any(key.endswith(f".{t}") for t in tm):
            return False
        layers = cfg.get("layers_to_transform")
        if layers is None or (isinstance(layers, list) and not layers):
            return True
        pattern = cfg.get("layers_pattern")
        if not pattern:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            m = None
            for p in [pattern] if isinstance(pattern, str) else pattern:
                if m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key):
                    break
        if m is None:
            return False
        idx = int(m["idx"])
        return idx == layers if isinstance(layers, int) else idx in layers


OUTPUT_HEADS = ("lm_head", "embed_out")  # output layers: never targeted by all-linear (peft excludes them)


def _module_kinds(shapes: dict[str, tuple[int, ...]]) -> tuple[set[str], set[str]]:
    """(linear modules, embedding modules) of a model, from its 2-D ``.weight`` tensors."""
    linear, embedding = set(), set()
    for name, shape in shapes.items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        module = name.removesuffix(".weight")
        if "embed" in module.rsplit(".", 1)[-1] or module.rsplit(".", 1)[-1] == "wte":
            embedding.add(module)
        elif module.rsplit(".", 1)[-1] not in OUTPUT_HEADS:
            linear.add(module)
    return linear, embedding


def plan_adapter(
    adapter_dir: str | Path, shapes: dict[str, tuple[int, ...]], model_type: str, *, allow_pickle: bool = False, label: str = "",
) -> tuple[dict[str, LoraPatch], list[str]]:
    """Check an adapter against its model's tensor shapes; returns (tensor name -> patch, problems).

    Every problem names the adapter file and the field or tensor; file-level failures (missing or
    unreadable files, pickle without --allow-pickle) raise :class:`InputError` at once.
    """
    ad = _load(Path(adapter_dir), allow_pickle, label or str(adapter_dir))
    cfg = ad.config
    problems: list[str] = []
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        return {}, [f"{ad.path / ADAPTER_CONFIG}: peft_type {cfg.get('peft_type')!r} is not LORA"]
    bad = [f for f in UNSUPPORTED_FIELDS if cfg.get(f)]
    if bad:
        return {}, [f"{ad.path / ADAPTER_CONFIG}: {', '.join(bad)}: not plain LoRA, cannot be applied"]
    tm = cfg.get("target_modules")
    if not tm:
        return {}, [f"{ad.path / ADAPTER_CONFIG}: target_modules is missing"]
    r0, alpha0 = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r0, int) or r0 <= 0 or not isinstance(alpha0, (int, float)):
        return {}, [f"{ad.path / ADAPTER_CONFIG}: r must be a positive integer and lora_alpha a number (got r={r0!r}, lora_alpha={alpha0!r})"]
    linear, embedding = _module_kinds(shapes)
    targets = _Targets(cfg, linear)
    modules = {n.rsplit(".", 1)[0] for n in shapes}
    if not any(targets(m) for m in modules | linear | embedding):
        problems.append(f"{ad.path / ADAPTER_CONFIG}: target_modules {tm!r} match no module of the model")
    transpose = model_type in CONV1D_MODEL_TYPES and bool(cfg.get("fan_in_fan_out"))
    file = str(ad.file)
    patches: dict[str, LoraPatch] = {}
    lora: dict[str, dict[str, str]] = {}
    for key, (shape, _) in ad.tensors.items():
        if not key.startswith(KEY_PREFIX):
            problems.append(f"{ad.file}: tensor {key!r} is not a PEFT key (no {KEY_PREFIX!r} prefix)")
            continue
        name = key[len(KEY_PREFIX):]
        if m := _LORA_KEY.match(name):
            lora.setdefault(m["module"], {})[m["kind"]] = key
            continue
        target = name.replace(".base_layer.", ".")
        if target not in shapes:
            problems.append(f"{ad.file}: tensor {key!r} names {target!r}, which the model does not have")
        elif tuple(shape) != tuple(shapes[target]):
            problems.append(f"{ad.file}: tensor {key!r} has shape {list(shape)}, the model's {target!r} has {list(shapes[target])}")
        else:
            patches[target] = LoraPatch(file, replace=key)
    for module, kinds in sorted(lora.items()):
        p = _plan_module(ad, module, kinds, shapes, embedding, targets, transpose)
        if isinstance(p, str):
            problems.append(p)
            continue
        for tensor, patch in p.items():
            old = patches.get(tensor)
            patches[tensor] = LoraPatch(file, replace=old.replace if old else None, a=patch.a, b=patch.b,
                                        scaling=patch.scaling, kind=patch.kind, transpose=patch.transpose)
    return patches, problems


def _plan_module(ad: _Adapter, module: str, kinds: dict[str, str], shapes, embedding, targets, transpose) -> dict[str, LoraPatch] | str:
    """The patches one module's lora_A/lora_B pair makes, or a problem naming the tensor."""
    cfg, file = ad.config, str(ad.file)
    weight = f"{module}.weight"
    if weight not in shapes:
        return f"{ad.file}: LoRA tensors for {module!r}, which the model does not have"
    if not targets(module):
        return f"{ad.file}: LoRA tensors for {module!r}, which target_modules {cfg.get('target_modules')!r} do not target"
    is_emb = module in embedding
    a_kind, b_kind = ("lora_embedding_A", "lora_embedding_B") if is_emb else ("lora_A.weight", "lora_B.weight")
    if set(kinds) - {a_kind, b_kind, "lora_B.bias"}:
        wrong = min(set(kinds) - {a_kind, b_kind, "lora_B.bias"})
        return f"{ad.file}: {module!r} is {'an embedding' if is_emb else 'a linear layer'} but the adapter has {wrong}"
    if a_kind not in kinds or b_kind not in kinds:
        return f"{ad.file}: {module!r} has only one of {a_kind} / {b_kind}"
    r = _pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
    a_shape, b_shape = ad.tensors[kinds[a_kind]][0], ad.tensors[kinds[b_kind]][0]
    w = tuple(shapes[weight])
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != r or b_shape[1] != r:
        return (f"{ad.file}: {module!r} has rank {a_shape[0] if a_shape else '?'} (A {list(a_shape)}, B {list(b_shape)}), "
                f"adapter_config.json says r={r}")
    if is_emb:
        want = (w[1], w[0])  # delta (B @ A).T is [vocab, dim]
    else:
        want = (w[1], w[0]) if transpose else w
    if (b_shape[0], a_shape[1]) != want:
        return (f"{ad.file}: {module!r}: adapter shapes A {list(a_shape)}, B {list(b_shape)} do not fit the model's "
                f"{weight} {list(w)}")
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    out = {weight: LoraPatch(file, a=kinds[a_kind], b=kinds[b_kind], scaling=scaling,
                             kind="embedding" if is_emb else "linear", transpose=transpose)}
    if "lora_B.bias" in kinds:
        bias = f"{module}.bias"
        if bias not in shapes or not cfg.get("lora_bias"):
            return f"{ad.file}: {module!r} has a lora_B bias but the model has no {bias!r} or lora_bias is off"
        out[bias] = LoraPatch(file, b=kinds["lora_B.bias"], scaling=scaling, kind="bias")
    return out
