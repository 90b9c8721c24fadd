"""The locally trained tiny model family: architectures, tokenizer, domain perplexities, caching."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from mergeserve.tiny_models import build_tiny_family, heldout_texts, perplexity

CLASSES = {"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _names(d):
    with safe_open(d / "model.safetensors", "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


@pytest.mark.parametrize("arch", sorted(CLASSES))
def test_architecture_and_files(tiny_family, arch):
    for d in tiny_family[arch].values():
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["architectures"] == [CLASSES[arch]] and cfg["num_hidden_layers"] == 4 and cfg["max_position_embeddings"] == 4096
        names = _names(d)
        assert set(names.values()) == {"BF16"}
        n = sum(1 for _ in names)
        assert n > 30
        if arch == "qwen2":
            assert cfg["tie_word_embeddings"] and "lm_head.weight" not in names
            assert "model.layers.0.self_attn.q_proj.bias" in names
        else:
            assert not cfg["tie_word_embeddings"] and "lm_head.weight" in names
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            assert (d / f).exists()


def test_fine_tunes_share_the_base_layout_and_differ_from_it(tiny_family):
    fam = tiny_family["mistral"]
    with safe_open(fam["base"] / "model.safetensors", "pt") as b, safe_open(fam["code"] / "model.safetensors", "pt") as c:
        k = "model.layers.1.mlp.up_proj.weight"
        wb, wc = b.get_tensor(k).float(), c.get_tensor(k).float()
    assert wb.shape == wc.shape and not torch.equal(wb, wc)
    assert float((wb - wc).norm() / wb.norm()) < 0.5  # a fine-tune, not an unrelated model


def test_tokenizer_round_trip_and_chat_template(tiny_family):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_family["llama"]["base"])
    text = "def merge(a, b):\n    return (a + b) / 2  # the mean of two models"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok) == 4096
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "hi" in chat and chat.endswith("<|assistant|>\n")


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(CLASSES))
def test_each_fine_tune_is_best_on_its_own_domain(tiny_family, tiny_dir, arch):
    held = {d: t[:12] for d, t in heldout_texts(tiny_dir).items()}
    ppl = {role: {d: perplexity(p, held[d]) for d in held} for role, p in tiny_family[arch].items()}
    assert ppl["code"]["code"] < 0.85 * ppl["prose"]["code"], ppl
    assert ppl["prose"]["prose"] < 0.85 * ppl["code"]["prose"], ppl
    assert ppl["code"]["code"] < ppl["base"]["code"] and ppl["prose"]["prose"] < ppl["base"]["prose"], ppl


def test_second_build_is_cached(tiny_family, tiny_dir):
    before = {p: p.stat().st_mtime_ns for p in tiny_dir.rglob("*.safetensors")}
    again = build_tiny_family(tiny_dir, progress=False)
    assert again == tiny_family
    assert {p: p.stat().st_mtime_ns for p in tiny_dir.rglob("*.safetensors")} == before


# The family's cache key as it was before the ChatML member existed: adding members on demand
# must not change it, or every cached family would be rebuilt (with new bytes).
FAMILY_KEY = "c158fcafd6fd2699"


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_chatml_member_adds_the_pair_and_keeps_the_family(tiny_family, tiny_dir, arch):
    from transformers import AutoTokenizer

    from mergeserve.tiny_models import ARCHS, CHATML_TOKENS, _key, build_chatml_member

    assert _key(ARCHS) == FAMILY_KEY
    d = build_chatml_member(tiny_dir, arch)
    stamp = (d / "model.safetensors").stat().st_mtime_ns
    assert build_chatml_member(tiny_dir, arch) == d and (d / "model.safetensors").stat().st_mtime_ns == stamp  # cached
    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok) == 4098 and tok.convert_tokens_to_ids(list(CHATML_TOKENS)) == [4096, 4097]
    ids = tok("<|im_start|>user\nhi<|im_end|>")["input_ids"]
    assert ids[0] == 4096 and ids[-1] == 4097
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with safe_open(d / "model.safetensors", "pt") as f, safe_open(tiny_family[arch]["base"] / "model.safetensors", "pt") as b:
        emb = f.get_tensor("model.embed_tokens.weight")
        assert emb.shape == (4098, 256) and not emb[4096].equal(emb[4097])
        assert ("lm_head.weight" in f.keys()) == (arch != "qwen2")
        k = "model.layers.1.mlp.up_proj.weight"
        assert not f.get_tensor(k).equal(b.get_tensor(k))  # fine-tuned, not only grown
    assert json.loads((d / "config.json").read_text())["vocab_size"] == 4098
