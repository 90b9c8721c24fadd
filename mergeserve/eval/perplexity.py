"""Perplexity of causal language models on held-out text, per token and per byte.

For a text of ``B`` UTF-8 bytes tokenized into ``N`` tokens, with ``NLL`` the summed negative
log-likelihood (natural log) of every one of those tokens given the ones before it (each window
starts with the BOS token, so the first text token is predicted too):

    ppl_token     = exp(NLL / N)
    ppl_byte      = exp(NLL / B)          (tokenizer-independent: comparable across vocabularies)
    bits_per_byte = NLL / (B * ln 2)

Texts longer than ``max_length - 1`` tokens are cut into consecutive non-overlapping windows
(``[BOS] + window``), the common "non-overlapping chunks" estimate (it slightly overstates the
perplexity of a sliding-window evaluation, identically for every variant being compared).
``max_tokens`` caps the evaluated prefix of each text; ``B`` counts the bytes of exactly that prefix.

Backends: :func:`score_model` (transformers, any torch device; used on CPU) and
:mod:`mergeserve.eval.vllm_backend` (vLLM prompt logprobs, for GPU clusters).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mergeserve.errors import ConfigError, InputError


@dataclass(frozen=True)
class TextScore:
    """One model on one text: summed NLL (nats) over ``tokens`` tokens spanning ``bytes`` bytes."""

    nll: float
    tokens: int
    bytes: int

    @property
    def ppl_token(self) -> float:
        return math.exp(self.nll / max(self.tokens, 1))

    @property
    def ppl_byte(self) -> float:
        return math.exp(self.nll / max(self.bytes, 1))

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (max(self.bytes, 1) * math.log(2))

    def as_dict(self) -> dict:
        return {**asdict(self), "ppl_token": self.ppl_token, "ppl_byte": self.ppl_byte, "bits_per_byte": self.bits_per_byte}


@dataclass(frozen=True)
class TokenizedText:
    """A text as windows of token ids, each to be scored after a BOS token."""

    name: str
    windows: tuple[tuple[int, ...], ...]
    bytes: int
    bos_id: int

    @property
    def tokens(self) -> int:
        return sum(len(w) for w in self.windows)


def read_texts(files: Mapping[str, str | Path]) -> dict[str, str]:
    """{name: text}; every unreadable or empty file is reported at once."""
    out, problems = {}, []
    for name, path in files.items():
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"eval.texts.{name}: cannot read {path}: {getattr(e, 'strerror', None) or e}")
            continue
        if not text.strip():
            problems.append(f"eval.texts.{name}: {path} is empty")
        out[name] = text
    if problems:
        raise ConfigError.from_problems(problems, "eval")
    return out


def tokenize_texts(texts: Mapping[str, str], tokenizer, max_length: int = 256, max_tokens: int | None = None) -> list[TokenizedText]:
    """Tokenize every text once (the same windows are then scored for every variant)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise InputError("tokenizer: has neither a BOS nor an EOS token to start evaluation windows with")
    if max_length < 2:
        raise ConfigError(f"eval.max_length: must be at least 2, got {max_length}")
    out = []
    for name, text in texts.items():
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        if max_tokens is not None and len(ids) > max_tokens:
            ids, offsets = ids[:max_tokens], offsets[:max_tokens]
            text = text[: offsets[-1][1]]
        step = max_length - 1
        windows = tuple(tuple(ids[i : i + step]) for i in range(0, len(ids), step))
        out.append(TokenizedText(name, windows, len(text.encode("utf-8")), bos))
    return out


@torch.no_grad()
def score_model(model: torch.nn.Module, texts: list[TokenizedText], batch_size: int = 16) -> dict[str, TextScore]:
    """NLL of every text under ``model`` (a transformers causal LM), in float32 on its device."""
    device = next(model.parameters()).device
    scores = {}
    for text in texts:
        nll = 0.0
        by_len: dict[int, list[tuple[int, ...]]] = {}
        for w in text.windows:  # equal-length windows share a batch: no padding, no masks
            by_len.setdefault(len(w), []).append(w)
        for ws in by_len.values():
            for i in range(0, len(ws), batch_size):
                ids = torch.tensor([(text.bos_id, *w) for w in ws[i : i + batch_size]], device=device)
                logits = model(input_ids=ids).logits.float()
                nll += float(
                    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
                )
        scores[text.name] = TextScore(nll, text.tokens, text.bytes)
    return scores


def model_from_tensors(config_json: str, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """A transformers model from a ``config.json`` text and its tensors (FP8 blocks dequantized)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mergeserve.merge.quantize import dequantize_fp8_block

    cfg = json.loads(config_json)
    cfg.pop("quantization_config", None)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    state = {}
    for name, t in tensors.items():
        if name.endswith(".weight_scale_inv"):
            continue
        scale = tensors.get(name.removesuffix(".weight") + ".weight_scale_inv")
        state[name] = dequantize_fp8_block(t, scale, dtype) if scale is not None else t.to(dtype)
    try:  # skip the random initialisation the tensors below overwrite anyway
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
        model.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise InputError(f"merged tensors do not fit {model_type}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise InputError(f"{model_dir}: cannot load a tokenizer for evaluation: {str(e).splitlines()[0]}") from None


def read_checkpoint(model_dir: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(config.json text, {name: tensor}) of a safetensors checkpoint directory."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors"))
    if not files or not (d / "config.json").exists():
        raise InputError(f"{d}: not a checkpoint (needs config.json and *.safetensors)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return (d / "config.json").read_text(), tensors


def score_checkpoint(model_dir: str | Path, texts: list[TokenizedText], device: str = "cpu") -> dict[str, TextScore]:
    """Score a checkpoint directory with transformers (FP8 checkpoints are dequantized first)."""
    config, tensors = read_checkpoint(model_dir)
    return score_model(model_from_tensors(config, tensors).to(device), texts)
