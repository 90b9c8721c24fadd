"""Merging models whose vocabularies differ: the output tokenizer and each model's row map.

mergekit 0.1.5 semantics (``tokenizer_source`` / the ``tokenizer:`` block), reproduced here:

- The output vocabulary is the base model's tokenizer (``base``), a named model's (``source:
  MODEL``), or the ``union``: the base tokenizer plus every other model's regular tokens it lacks
  (models in recipe order), then every model's added tokens (first settings win). The base is
  ``base_model`` or else the first model; tokens at ids >= a model's ``vocab_size`` (config.json)
  are ignored, and the base tokenizer is stripped of them. Tokens named under ``tokens:`` are
  added when missing.
- For each vocabulary tensor (embeddings, lm_head: rows are tokens) and each input model, output
  row ``i`` is the model's row for token ``i`` when it has that token. A token some model lacks
  gets a default row: from the one model that has it; else from the base model when it has it;
  else the average over the models that have it (summed in recipe order, then divided); zero
  when no model has it. A ``tokens:`` entry sets the default (``source``: a model, ``{kind:
  model_token, model, token | token_id}``, ``{kind: zero}``) and with ``force`` replaces the row
  in every model. Rows beyond the vocabulary (``pad_to_multiple_of``) are the mean of the rows.
- Arithmetic is in the tensor's compute dtype (inputs are cast first), as mergekit does.

The planner computes a :class:`VocabMap` per vocabulary tensor (frozen data in the plan); the
executor applies it to the loaded source tensors. Tokenizers are read with ``transformers`` (the
library mergekit uses), so the written ``tokenizer.json`` has the same vocabulary.

Known difference: mergekit walks the models in the order of a Python ``set`` (it depends on the
hash seed), so a union of three or more differing tokenizers, or a recipe without ``base_model``,
can order added tokens differently from run to run there; here the recipe order is used.
"""

from __future__ import annotations

import json
import tempfile
from array import array
from dataclasses import dataclass
from typing import Any

import torch

from mergeserve.errors import InputError, UnsupportedError
from mergeserve.merge.reader import CONFIG, MAX_CONFIG_BYTES
from mergeserve.merge.untrusted import model_file, parse_json, read_capped

# A model's tokenizer files: copied into a checkpoint as they are, or read by transformers.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
# What else AutoTokenizer may open in a model directory (other tokenizer classes' files).
_OTHER_TOKENIZER_FILES = ("config.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


@dataclass(frozen=True)
class TokenizerPlan:
    """What the output tokenizer is built from; rebuilt identically when the checkpoint is written."""

    source: str  # "base" | "union" | "model"
    base: int  # index of the model whose tokenizer is the base
    paths: tuple[str, ...]  # each input model's directory (tokenizer files, config.json)
    source_path: str | None = None  # the tokenizer's directory for source "model"
    add_tokens: tuple[str, ...] = ()
    pad_to_multiple_of: int | None = None


@dataclass(frozen=True)
class VocabMap:
    """Rows of one vocabulary tensor, per source, in the output vocabulary.

    ``take[k]`` holds int32 [tokens]: source ``k``'s row for each output token, or -1 (absent, or
    forced to its default). ``fills`` give the default rows: (output row, how, ((source, row), ...))
    with how "copy" (one source row), "average" (sum in order, then divide) or "zero".
    """

    rows: int  # output rows, vocabulary padded to a multiple
    tokens: int  # vocabulary size
    take: tuple[bytes, ...]
    fills: tuple[tuple[int, str, tuple[tuple[int, int], ...]], ...]

    def apply(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Source tensors [their rows, *rest] (compute dtype) -> [self.rows, *rest] each."""
        dtype = inputs[0].dtype
        for x in inputs[1:]:
            dtype = torch.promote_types(dtype, x.dtype)
        rest, device = inputs[0].shape[1:], inputs[0].device
        defaults: dict[int, torch.Tensor] = {}
        for row, how, refs in self.fills:
            if how == "zero":
                defaults[row] = torch.zeros(rest, dtype=dtype, device=device)
            elif how == "copy":
                k, r = refs[0]
                defaults[row] = inputs[k][r]
            else:
                acc = torch.zeros(rest, dtype=dtype, device=device)
                for k, r in refs:
                    acc = acc + inputs[k][r]
                acc /= len(refs)
                defaults[row] = acc
        fill_rows = torch.tensor(list(defaults), dtype=torch.long)
        fill_values = torch.stack(list(defaults.values())) if defaults else None
        out = []
        for k, x in enumerate(inputs):
            take = torch.frombuffer(bytearray(self.take[k]), dtype=torch.int32).to(torch.long)
            y = torch.zeros((self.rows, *rest), dtype=dtype, device=device)
            have = (take >= 0).nonzero().squeeze(1)
            y[have.to(device)] = x[take[have].to(device)].to(dtype)
            if fill_values is not None:  # a default only where this model has no row of its own
                use = (take[fill_rows] < 0).nonzero().squeeze(1)
                y[fill_rows[use].to(device)] = fill_values[use.to(device)]
            if self.rows > self.tokens:
                y[self.tokens :] = torch.mean(y[: self.tokens], dim=0)
            out.append(y)
        return out


# -- tokenizers -------------------------------------------------------------------------------


def load_tokenizer(path: str, required: bool = True):
    """The tokenizer of the model at ``path``, loaded by transformers as mergekit does, once every
    file it may read resolves inside the model (:func:`~.untrusted.model_file`: a tokenizer file
    linking outside the model is refused, not read)."""
    from transformers import AutoTokenizer

    for name in TOKENIZER_FILES + _OTHER_TOKENIZER_FILES:
        model_file(path, name)
    try:
        return AutoTokenizer.from_pretrained(path, use_fast=True)
    except Exception as e:  # noqa: BLE001 - any failure: this directory has no usable tokenizer
        if not required:
            return None
        raise InputError(f"{path}: cannot load its tokenizer for the vocabulary merge: {str(e).splitlines()[0] if str(e) else e}") from None


def config_vocab_size(path: str) -> int | None:
    """``vocab_size`` from a model's config.json (top level, else ``text_config``), or None."""
    f = model_file(path, CONFIG)
    cfg = parse_json(read_capped(f, MAX_CONFIG_BYTES), str(f), strict=False) if f else None
    if not isinstance(cfg, dict):
        return None
    text = cfg.get("text_config")
    v = cfg.get("vocab_size", text.get("vocab_size") if isinstance(text, dict) else None)
    if v is not None and (type(v) is not int or v < 0):
        raise InputError(f"{f}: vocab_size must be a non-negative integer, got {v!r}")
    return v


def _strip_unused(tok, vocab_size: int | None, path: str):
    """The tokenizer without tokens at ids >= ``vocab_size`` (ids the model has no row for)."""
    if vocab_size is None:
        return tok
    unused = {t for t, i in tok.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tok
    data = json.loads(tok._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise UnsupportedError(
            f"{path}: its tokenizer has tokens beyond vocab_size {vocab_size} and is not BPE; only BPE ones can be trimmed"
        )
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < vocab_size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def keep(m) -> bool:
        pair = m.split(" ") if isinstance(m, str) else m
        return not any(p in unused for p in pair)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    from tokenizers import Tokenizer

    tok._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tok


def _union(base_tok, toks: list, sizes: list[int | None]):
    """The base tokenizer plus the other tokenizers' regular tokens, then all added tokens."""
    from transformers import AutoTokenizer

    regular: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, size in zip(toks, sizes):
        size = size or tok.vocab_size
        decoder = tok.added_tokens_decoder
        added_names = {info.content for info in decoder.values()}
        for t, i in tok.get_vocab().items():
            if i < size and t not in added_names:
                regular.setdefault(t, None)
        for i, info in decoder.items():
            if i < size:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as d:  # a private copy: base_tok itself stays as loaded
        base_tok.save_pretrained(d)
        out = AutoTokenizer.from_pretrained(d, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in regular:
        if t not in added and t not in base_vocab:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


@dataclass
class BuiltTokenizer:
    tokenizer: Any  # transformers tokenizer, the one written with the checkpoint
    vocab: dict[str, int]  # output vocabulary
    model_vocabs: list[dict[str, int]]  # each model's vocabulary (plan.models order)
    perms: list[dict[int, int]]  # each model: output id -> its row (tokens it has)
    rows: int  # output vocabulary rows, padded


def build_tokenizer(tp: TokenizerPlan) -> BuiltTokenizer:
    """The output tokenizer and every model's token -> row permutation (mergekit's BuildTokenizer)."""
    sizes = [config_vocab_size(p) for p in tp.paths]
    base = _strip_unused(load_tokenizer(tp.paths[tp.base]), sizes[tp.base], tp.paths[tp.base])
    # A model whose tokenizer cannot be loaded is taken to share the base's (as mergekit does).
    toks = [base if i == tp.base else load_tokenizer(p, required=False) for i, p in enumerate(tp.paths)]
    if tp.source == "model":
        out = load_tokenizer(tp.source_path)
    elif tp.source == "base":
        out = base
    else:
        order = [tp.base] + [i for i in range(len(toks)) if i != tp.base and toks[i] is not None]
        out = _union(base, [toks[i] for i in order], [sizes[i] for i in order])
    have = set(out.get_vocab())
    for t in tp.add_tokens:
        if t not in have:
            out.add_tokens(t)
            have.add(t)
    vocab = out.get_vocab()
    model_vocabs = [(t or base).get_vocab() for t in toks]
    perms = []
    for mv, size in zip(model_vocabs, sizes):
        size = size if size is not None else len(mv)
        perms.append({i: mv[t] for t, i in vocab.items() if t in mv and mv[t] < size})
    rows = len(vocab)
    m = tp.pad_to_multiple_of
    if m and rows % m:
        rows += m - rows % m
    return BuiltTokenizer(out, vocab, model_vocabs, perms, rows)


# -- one vocabulary tensor ----------------------------------------------------------------------


def _source_kind(source: Any) -> tuple[str, Any]:
    """A ``tokens:`` entry's source -> ("none" | "zero" | "model" | "model_token", detail)."""
    if source is None:
        return "none", None
    kind = getattr(source, "kind", None)
    if kind == "zero":
        return "zero", None
    if kind == "model_token":
        return "model_token", source
    return "model", str(source)


def vocab_map(
    built: BuiltTokenizer,
    models: list[int],
    refs: list[str],
    base: int | None,
    tokens: dict[str, Any],
    src_rows: list[int],
) -> tuple[VocabMap, list[str]]:
    """The :class:`VocabMap` of one tensor whose sources are ``models`` (indices into the plan's
    models; ``refs`` names every plan model, ``src_rows[k]`` is source k's row count).

    Returns the map and the problems (each naming ``tokenizer.tokens.<token>``).
    """
    vocab, perms = built.vocab, [built.perms[m] for m in models]
    problems: list[str] = []
    configs = dict(tokens)
    averaged: set[str] = set()
    auto: dict[str, tuple[str, Any]] = {}
    base_k = models.index(base) if base is not None and base in models else None
    for tok, i in vocab.items():  # defaults for tokens the recipe does not configure
        if tok in configs:
            continue
        present = [k for k, p in enumerate(perms) if i in p]
        if len(present) == 1:
            auto[tok] = ("source", present[0])
        elif not present:
            auto[tok] = ("zero", None)
        elif base_k is not None and i in perms[base_k]:
            auto[tok] = ("source", base_k)
        else:
            averaged.add(tok)
    fills = []
    forced = set()
    for tok, i in vocab.items():
        cfg = configs.get(tok)
        force = bool(cfg is not None and cfg.force)
        if force:
            forced.add(i)
        if not force and all(i in p for p in perms):
            continue
        if tok in averaged:
            fills.append((i, "average", tuple((k, p[i]) for k, p in enumerate(perms) if i in p)))
        elif tok in auto:
            how, k = auto[tok]
            fills.append((i, "zero", ()) if how == "zero" else (i, "copy", ((k, perms[k][i]),)))
        elif cfg is not None:
            fill = _configured_fill(tok, i, cfg, models, refs, perms, built, src_rows)
            if isinstance(fill, str):
                problems.append(f"tokenizer.tokens.{tok}: {fill}")
            else:
                fills.append(fill)
    take = []
    for p in perms:
        rows = array("i", [-1]) * len(vocab)
        for i, r in p.items():
            if i not in forced:
                rows[i] = r
        take.append(rows.tobytes())
    return VocabMap(built.rows, len(vocab), tuple(take), tuple(fills)), problems


def _configured_fill(tok: str, i: int, cfg: Any, models, refs, perms, built: BuiltTokenizer, src_rows) -> tuple | str:
    """The default row a ``tokens:`` entry asks for, or a problem."""
    kind, detail = _source_kind(cfg.source)
    if kind == "zero":
        return (i, "zero", ())
    if kind == "none":
        if not any(i in p for p in perms):
            return "the token is in no input model's vocabulary: give a source (a model, a model_token or {kind: zero})"
        return "the token is missing from some input (or force is set) and no source is given"
    ref = detail if kind == "model" else str(detail.model)
    if ref not in [refs[m] for m in models]:
        return f"source model {ref} is not an input of this tensor ({', '.join(refs[m] for m in models)})"
    k = [refs[m] for m in models].index(ref)
    if kind == "model":
        if i not in perms[k]:
            return f"source model {ref} does not have the token"
        return (i, "copy", ((k, perms[k][i]),))
    row = detail.token_id
    if row is None:
        row = built.model_vocabs[models[k]].get(detail.token)
        if row is None:
            return f"token {detail.token!r} is not in {ref}'s vocabulary"
    if not 0 <= row < src_rows[k]:
        return f"token_id {row} is out of range for {ref} ({src_rows[k]} rows)"
    return (i, "copy", ((k, row),))
