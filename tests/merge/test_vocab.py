"""Merging models with different vocabularies, against mergekit 0.1.5: every tokenizer mode.

Inputs: the tiny family's Mistral base and code fine-tune, its ChatML member (two added special
tokens, rows 4096-4097), a copy of that member with the two tokens' ids (and rows) swapped, and
the Qwen2 pair (tied embeddings: no lm_head). Each recipe must give the same tensors bit for bit,
the same tokenizer.json vocabulary and added tokens, config.json vocab_size and chat template.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from mergeserve.cli import main
from mergeserve.merge.api import merge
from mergeserve.tiny_models import CHATML_TOKENS, build_chatml_member
from tests.oracle import absolutize, compare, load_tensors, run_mergekit


def _swapped_copy(src: Path, base: Path, dst: Path) -> Path:
    """``src`` with its two added tokens' ids swapped: tokenizer and embedding rows both."""
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": list(reversed(CHATML_TOKENS))})
    tok.chat_template = AutoTokenizer.from_pretrained(src).chat_template
    tok.save_pretrained(dst)
    tensors = load_file(dst / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in tensors:
            t = tensors[name].clone()
            t[[-2, -1]] = t[[-1, -2]]
            tensors[name] = t
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def vocab_models(tiny_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab-models")
    for arch in ("mistral", "qwen2"):
        for role in ("base", "code"):
            (root / f"{arch}-{role}").symlink_to(tiny_family[arch][role])
        (root / f"{arch}-chatml").symlink_to(build_chatml_member(Path(tiny_family[arch]["base"]).parent, arch))
    _swapped_copy(root / "mistral-chatml", root / "mistral-base", root / "mistral-chatml-swapped")
    return root


def _models(method: str, weights: dict, **top) -> dict:
    models = [{"model": m, "parameters": {"weight": w}} if w is not None else {"model": m} for m, w in weights.items()]
    return {"merge_method": method, "dtype": "bfloat16", "models": models, **top}


RECIPES = {
    # base + ChatML fine-tune, union: base rows, new rows from the one model that has them
    "union": _models("linear", {"mistral-base": 0.5, "mistral-chatml": 0.5}, base_model="mistral-base", tokenizer_source="union"),
    # the base's tokenizer is the ChatML one: the code model gets the ChatML rows copied in
    "base-is-chatml": _models("task_arithmetic", {"mistral-code": 0.6, "mistral-chatml": 0.4}, base_model="mistral-chatml",
                              tokenizer_source="base"),
    # a named model's vocabulary with other ids: rows permuted; the base lacks the tokens, two
    # models have them, so its rows are their average
    "model-source-permuted": _models("linear", {"mistral-chatml": 0.4, "mistral-chatml-swapped": 0.3, "mistral-base": 0.3},
                                     base_model="mistral-base", tokenizer_source="mistral-chatml-swapped"),
    # the tokenizer block: every kind of token source, force, a new token, padding
    "tokens-and-padding": _models(
        "linear", {"mistral-base": 0.5, "mistral-chatml": 0.5}, base_model="mistral-base",
        tokenizer={"source": "union", "pad_to_multiple_of": 64, "tokens": {
            "<|im_start|>": {"source": {"kind": "model_token", "model": "mistral-base", "token": "<s>"}},
            "<|im_end|>": {"source": {"kind": "zero"}, "force": True},
            "<tool>": {"source": {"kind": "model_token", "model": "mistral-chatml", "token_id": 5}},
            "</s>": {"source": "mistral-chatml", "force": True},
        }},
    ),
    # the same vocabulary everywhere: nothing moves, but the tokenizer is re-saved as mergekit does
    "base-same-vocab": {
        "merge_method": "slerp", "base_model": "mistral-base", "dtype": "bfloat16", "tokenizer_source": "base",
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]},
        "slices": [{"sources": [{"model": "mistral-base", "layer_range": [0, 4]}, {"model": "mistral-code", "layer_range": [0, 4]}]}],
    },
    # tied embeddings (Qwen2: no lm_head) and a gradient over the layers
    "tied-union-slerp": {
        "merge_method": "slerp", "base_model": "qwen2-base", "dtype": "bfloat16", "tokenizer_source": "union",
        "parameters": {"t": [0.2, 0.8]},
        "slices": [{"sources": [{"model": "qwen2-base", "layer_range": [0, 4]}, {"model": "qwen2-chatml", "layer_range": [0, 4]}]}],
    },
    # chat template "auto": the plurality of the inputs' templates (two of three are the family's).
    # (Only one model adds tokens: with two, mergekit's order of their added tokens follows a
    # Python set's, which changes with the hash seed.)
    "union-auto-template": _models("linear", {"mistral-base": 0.2, "mistral-chatml": 0.4, "mistral-code": 0.4},
                                   base_model="mistral-base", tokenizer_source="union", chat_template="auto"),
    # a chat template without a tokenizer source: the donor's tokenizer re-saved with it
    "template-only": _models("linear", {"mistral-base": 0.5, "mistral-code": 0.5},
                             chat_template="{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"),
}


@pytest.fixture(scope="module")
def mergekit_outputs(vocab_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("oracle-vocab")
    run_mergekit([(absolutize(r, vocab_models), work / f"mk-{k}") for k, r in RECIPES.items()], work)
    return work


def _tokenizer(d: Path) -> dict:
    return json.loads((d / "tokenizer.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_tokenizer_mode_matches_mergekit(name, vocab_models, mergekit_outputs):
    ours = merge(RECIPES[name], mergekit_outputs / f"ours-{name}", models_dir=vocab_models, progress=False).out_dir
    mk = mergekit_outputs / f"mk-{name}"
    stats = compare(load_tensors(ours), load_tensors(mk))
    assert stats["bitwise_tensors"] == stats["tensors"], stats
    a, b = _tokenizer(ours), _tokenizer(mk)
    assert a["model"]["vocab"] == b["model"]["vocab"] and a["added_tokens"] == b["added_tokens"]
    cfg_a, cfg_b = (json.loads((d / "config.json").read_text()) for d in (ours, mk))
    assert cfg_a["vocab_size"] == cfg_b["vocab_size"] and cfg_a.get("tie_word_embeddings") == cfg_b.get("tie_word_embeddings")
    tpl_a, tpl_b = ((d / "chat_template.jinja").read_text() if (d / "chat_template.jinja").exists() else None for d in (ours, mk))
    assert tpl_a == tpl_b


def test_vocabulary_rows_and_sizes(vocab_models, mergekit_outputs):
    """What the recipes above do, in numbers (so the parity checks cannot pass vacuously)."""
    out = merge(RECIPES["tokens-and-padding"], mergekit_outputs / "rows", models_dir=vocab_models, progress=False).out_dir
    t = load_tensors(out)
    emb, head = t["model.embed_tokens.weight"], t["lm_head.weight"]
    assert emb.shape[0] == head.shape[0] == 4160  # 4096 + 2 + <tool> = 4099, padded to 64
    vocab = _tokenizer(out)["model"]["vocab"] | {a["content"]: a["id"] for a in _tokenizer(out)["added_tokens"]}
    assert vocab["<tool>"] == 4098 and not emb[vocab["<|im_end|>"]].any()  # forced to zero
    assert emb[4099:].float().std(dim=0).max() == 0  # padding rows: all the same (the mean row)
    permuted = load_tensors(merge(RECIPES["model-source-permuted"], mergekit_outputs / "perm", models_dir=vocab_models,
                                  progress=False).out_dir)
    chatml = load_file(vocab_models / "mistral-chatml" / "model.safetensors")["model.embed_tokens.weight"]
    assert not permuted["model.embed_tokens.weight"][4096].equal(chatml[4096].to(permuted["model.embed_tokens.weight"].dtype))


@pytest.mark.parametrize(
    "tokens, expect",
    [
        ({"<brand-new>": {}}, "tokenizer.tokens.<brand-new>: the token is in no input model's vocabulary"),
        ({"<x>": {"source": {"kind": "model_token", "model": "mistral-base", "token": "<nope>"}}},
         "tokenizer.tokens.<x>: token '<nope>' is not in mistral-base's vocabulary"),
        ({"<x>": {"source": "mistral-code"}}, "tokenizer.tokens.<x>: source model mistral-code is not an input"),
        ({"<x>": {"source": {"kind": "model_token", "model": "mistral-base", "token_id": 99999}}}, "token_id 99999 is out of range"),
    ],
    ids=["in-no-source", "unknown-source-token", "source-not-an-input", "token-id-out-of-range"],
)
def test_bad_token_override_is_refused_before_any_work(tokens, expect, vocab_models, tmp_path, capsys):
    recipe = _models("linear", {"mistral-base": 0.5, "mistral-chatml": 0.5}, base_model="mistral-base",
                     tokenizer={"source": "union", "tokens": tokens})
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(recipe))
    code = main(["merge", str(p), str(tmp_path / "out"), "--local", "-q", "--models-dir", str(vocab_models)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expect in err, err
    assert not list(tmp_path.glob("*out*"))
