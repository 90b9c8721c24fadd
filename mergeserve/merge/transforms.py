"""Input transforms: what happens to a source tensor between the file and the merge method.

Two things alter sources in mergekit 0.1.5 before a method sees them, in this order:

1. a LoRA adapter on the model reference (``model+adapter``: :mod:`.lora`), on the stored tensor;
2. the cast to the compute dtype (the executor's, as for every tensor);
3. the vocabulary map of embeddings and lm_head when the recipe asks for a tokenizer
   (``tokenizer_source`` / ``tokenizer:``: :mod:`.vocab`), across all sources of the tensor.

:class:`InputPlanner` decides both at planning time and hands each tensor task an
:class:`InputTransform` (frozen data, pickled with the plan); the executor calls
:meth:`InputTransform.patch` per loaded source and :meth:`InputTransform.remap` on the cast list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergeserve.merge.config import MergeConfig, ModelRef
from mergeserve.merge.lora import LoraPatch, plan_adapter
from mergeserve.merge.vocab import (
    BuiltTokenizer,
    TokenizerPlan,
    VocabMap,
    build_tokenizer,
    vocab_map,
)

# Tensors whose rows are tokens (mergekit's architecture files give these a vocabulary_axis of 0).
VOCAB_TENSOR = re.compile(r"(^|\.)(embed_tokens|lm_head|embed_out|wte|word_embeddings)\.weight$")


@dataclass(frozen=True)
class InputTransform:
    """Per-task input changes. ``source_shapes[k]`` is source k's stored shape (the file's)."""

    source_shapes: tuple[tuple[int, ...], ...]
    lora: tuple[LoraPatch | None, ...] = ()
    vocab: VocabMap | None = None

    def patch(self, k: int, t: torch.Tensor) -> torch.Tensor:
        """Source ``k`` as stored -> as mergekit's LoRA-merged model holds it (same dtype)."""
        p = self.lora[k] if self.lora else None
        return p.apply(t) if p is not None else t

    def remap(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The cast sources -> the same rows in the output vocabulary."""
        return self.vocab.apply(inputs) if self.vocab is not None else inputs


class InputPlanner:
    """Plans adapters and the output vocabulary for one recipe; appends problems to ``problems``."""

    def __init__(self, config: MergeConfig, models, files, model_configs, problems: list[str], *, allow_pickle: bool, models_dir=None):
        self.config = config
        self.refs = [m.ref for m in models]
        self.problems = problems  # the planner's list: every problem is reported together
        self.patches: list[dict[str, LoraPatch]] = []
        for m, f, cfg in zip(models, files, model_configs):
            if m.lora is None:
                self.patches.append({})
                continue
            shapes = {n: i.shape for n, i in f.tensors.items()}
            patches, problems = plan_adapter(m.lora, shapes, str(cfg.get("model_type", "")), allow_pickle=allow_pickle, label=m.ref)
            self.patches.append(patches)
            self.problems += [f"model {m.ref}: {p}" for p in problems]
        self.tokenizer: TokenizerPlan | None = None
        self.built: BuiltTokenizer | None = None
        tk = config.tokenizer
        source = tk.source if tk is not None else config.tokenizer_source
        if source is None:
            return
        base = self.refs.index(str(config.base_model)) if config.base_model else 0
        source_path = None
        if isinstance(source, ModelRef):
            ref = str(source)
            source_path = models[self.refs.index(ref)].path if ref in self.refs else str(_resolve(ref, models_dir))
        self.tokenizer = TokenizerPlan(
            source="model" if source_path else str(source),
            base=base,
            paths=tuple(m.path for m in models),
            source_path=source_path,
            add_tokens=tuple((tk.tokens or {}) if tk else ()),
            pad_to_multiple_of=tk.pad_to_multiple_of if tk else None,
        )
        self.built = build_tokenizer(self.tokenizer)

    @property
    def vocab_rows(self) -> int | None:
        """Rows of the output vocabulary tensors (config.json's vocab_size), when remapped."""
        return self.built.rows if self.built else None

    def transform(
        self, models: list[int], names: list[str], shapes: list[tuple[int, ...]], base: int | None, out_name: str, layer: int | None,
    ) -> tuple[InputTransform | None, tuple[int, ...] | None]:
        """The transform of one task (sources ``models``/``names`` with stored ``shapes``) and its
        output shape when the transform changes it (a remapped vocabulary), else None."""
        lora = tuple(self.patches[m].get(n) for m, n in zip(models, names))
        vocab = None
        if self.built is not None and layer is None and VOCAB_TENSOR.search(out_name) and all(len(s) == 2 for s in shapes):
            tokens = (self.config.tokenizer.tokens or {}) if self.config.tokenizer else {}
            vocab, problems = vocab_map(self.built, models, self.refs, base, tokens, [s[0] for s in shapes])
            self.problems += problems
        if vocab is None and not any(lora):
            return None, None
        xf = InputTransform(tuple(tuple(s) for s in shapes), lora if any(lora) else (), vocab)
        return xf, ((vocab.rows, *shapes[0][1:]) if vocab is not None else None)

    def set_vocab_size(self, cfg: dict[str, Any]) -> None:
        """Write the output vocabulary size into an output config.json mapping (as mergekit does)."""
        if self.built is None:
            return
        if "vocab_size" in cfg or "text_config" not in cfg:
            cfg["vocab_size"] = self.built.rows
        else:
            cfg["text_config"]["vocab_size"] = self.built.rows


def _resolve(ref: str, models_dir) -> Path:
    from mergeserve.merge.plan import resolve_model_path

    return resolve_model_path(ref, models_dir)
