"""Perplexity per token and per byte: formulas against hand-computed values, the transformers
backend against an independent loss computation, in-memory models against loaded checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from mergeserve.errors import ConfigError
from mergeserve.eval.perplexity import (
    TextScore,
    load_tokenizer,
    model_from_tensors,
    read_checkpoint,
    read_texts,
    score_checkpoint,
    score_model,
    tokenize_texts,
)


def test_score_formulas_by_hand():
    s = TextScore(nll=8 * math.log(2), tokens=4, bytes=8)
    assert s.bits_per_byte == pytest.approx(1.0)  # 8 bits of surprise over 8 bytes
    assert s.ppl_byte == pytest.approx(2.0)
    assert s.ppl_token == pytest.approx(4.0)  # 2 nats... per token: exp(2 ln 2)
    d = s.as_dict()
    assert d["tokens"] == 4 and d["ppl_token"] == pytest.approx(4.0)


def test_read_texts_reports_every_bad_file_at_once(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ConfigError) as e:
        read_texts({"gone": tmp_path / "missing.txt", "blank": tmp_path / "empty.txt"})
    msg = str(e.value)
    assert "eval.texts.gone" in msg and "missing.txt" in msg and "eval.texts.blank" in msg and "empty" in msg


def test_tokenize_windows_and_byte_counts(tiny_family):
    tok = load_tokenizer(tiny_family["mistral"]["code"])
    text = "def f(x):\n    return x * 2  # é\n" * 40
    full = tokenize_texts({"t": text}, tok, max_length=16)[0]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert [i for w in full.windows for i in w] == ids
    assert all(len(w) == 15 for w in full.windows[:-1]) and full.bytes == len(text.encode())
    cut = tokenize_texts({"t": text}, tok, max_length=16, max_tokens=20)[0]
    assert cut.tokens == 20
    # the bytes are those of exactly the evaluated prefix: decoding its tokens gives them back
    assert cut.bytes == len(tok.decode(ids[:20]).encode())


def test_transformers_backend_matches_the_models_own_loss(tiny_family):
    d = tiny_family["llama"]["prose"]
    tok = load_tokenizer(d)
    text = open(d.parent / "heldout" / "prose.txt").read()[:6000]
    texts = tokenize_texts({"prose": text}, tok, max_length=64, max_tokens=500)
    got = score_checkpoint(d, texts)["prose"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    nll = 0.0
    with torch.no_grad():  # one window at a time through the model's own (mean) loss
        for w in texts[0].windows:
            ids = torch.tensor([[tok.bos_token_id, *w]])
            nll += float(model(input_ids=ids, labels=ids).loss) * len(w)
    assert got.tokens == 500
    assert got.nll == pytest.approx(nll, rel=1e-4)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])  # qwen2: tied embeddings, q/k/v biases
def test_model_from_tensors_equals_from_pretrained(tiny_family, arch):
    from transformers import AutoModelForCausalLM

    d = tiny_family[arch]["base"]
    cfg, tensors = read_checkpoint(d)
    mine = model_from_tensors(cfg, tensors)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        assert torch.equal(mine(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_fp8_checkpoint_scores_close_to_bf16(tiny_dir, tmp_path):
    from mergeserve.merge.api import merge

    recipe = "configs/tiny/marcoro14-slerp.yaml"
    bf16 = merge(recipe, tmp_path / "bf16", models_dir=tiny_dir, progress=False).out_dir
    fp8 = merge(recipe, tmp_path / "fp8", models_dir=tiny_dir, out_dtype="fp8", progress=False).out_dir
    tok = load_tokenizer(bf16)
    texts = tokenize_texts({"code": open(tiny_dir / "heldout" / "code.txt").read()}, tok, max_tokens=2000)
    a, b = score_checkpoint(bf16, texts)["code"], score_checkpoint(fp8, texts)["code"]
    assert a.ppl_token != b.ppl_token  # really dequantized FP8 weights, not the bf16 ones
    assert abs(math.log(b.ppl_token / a.ppl_token)) < 0.05  # within 5% perplexity


def test_score_model_batches_equal_one_at_a_time(tiny_family):
    d = tiny_family["mistral"]["code"]
    cfg, tensors = read_checkpoint(d)
    model = model_from_tensors(cfg, tensors)
    texts = tokenize_texts({"c": open(d.parent / "heldout" / "code.txt").read()[:8000]}, load_tokenizer(d), max_length=32)
    batched = score_model(model, texts, batch_size=16)["c"]
    single = score_model(model, texts, batch_size=1)["c"]
    assert batched.tokens == single.tokens and batched.nll == pytest.approx(single.nll, rel=1e-5)
