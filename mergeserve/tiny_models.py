"""The tiny model family: real, trained, mergeable models made locally in about two minutes.

No model hub is reachable here, and tests and the demo must still merge and serve real models
whose merges have a measurable effect. This module builds, from text found on every Python
installation:

- a byte-level BPE tokenizer (4096 tokens) trained on two domains: Python source (the standard
  library's ``*.py`` files) and English prose (the language reference topics in
  ``pydoc_data/topics.py``), saved as a ``transformers`` fast tokenizer with a chat template;
- for each of the Mistral, Llama and Qwen2 architectures (Qwen2: attention biases, tied
  embeddings): a ``base`` model (about 4.4M parameters: hidden 256, 4 layers, 4 heads, 2 KV
  heads, MLP 512) trained on both domains, and two fine-tunes of that base, ``code`` and
  ``prose``, trained further on one domain each. Each fine-tune ends with clearly lower
  perplexity on held-out text of its own domain, so a merge of the two lands measurably between.

Layout under ``OUT``: ``tokenizer/``, ``heldout/{code,prose}.txt`` and ``{arch}-{role}/`` (HF
directories: config.json, model.safetensors in bf16, tokenizer files, generation_config.json).
``family.json`` records the build settings; a build with the same settings is reused, and the
family appears atomically (built in a sibling directory, then renamed).

:func:`build_chatml_member` adds, on demand, ``{arch}-chatml``: the base with the ChatML pair
(``<|im_start|>``, ``<|im_end|>``) added to its tokenizer, embeddings and lm_head grown by two rows
and briefly trained on ChatML-formatted text (seconds). It is keyed separately (``chatml.json``),
so the other members' settings and bytes do not change. The tests merge it with its base to
exercise vocabulary unions.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import sysconfig
from pathlib import Path

ARCHS = ("mistral", "llama", "qwen2")
ROLES = ("base", "code", "prose")
SETTINGS = {
    "version": 1, "vocab": 4096, "hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 512,
    "seq": 64, "batch": 16, "base_steps": 150, "finetune_steps": 60, "lr": 3e-3, "heldout_fraction": 0.05,
}
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _corpora() -> dict[str, str]:
    """{"code": Python source, "prose": English reference text}, deterministic on one Python."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py")))
    from pydoc_data.topics import topics

    prose = "\n\n".join(topics[k] for k in sorted(topics))
    return {"code": code, "prose": prose}


def _split(text: str, fraction: float) -> tuple[str, str]:
    cut = int(len(text) * (1 - fraction))
    return text[:cut], text[cut:]


def _train_tokenizer(texts: list[str], out: Path):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=SETTINGS["vocab"], special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        chat_template=CHAT_TEMPLATE, model_max_length=4096,
    )
    fast.save_pretrained(out)
    return fast


def _config(arch: str, tok):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    s = SETTINGS
    common = dict(
        vocab_size=len(tok), hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], max_position_embeddings=4096,
        rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    if arch == "mistral":
        return MistralConfig(sliding_window=None, tie_word_embeddings=False, **common)
    if arch == "llama":
        return LlamaConfig(tie_word_embeddings=False, **common)
    return Qwen2Config(tie_word_embeddings=True, **common)  # Qwen2 has q/k/v biases by design


def _batches(ids, steps: int, seed: int):
    """``steps`` batches [batch, seq] of random windows of the token stream ``ids``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n, seq, bs = ids.numel(), SETTINGS["seq"], SETTINGS["batch"]
    for _ in range(steps):
        starts = torch.randint(0, n - seq - 1, (bs,), generator=g)
        yield torch.stack([ids[s : s + seq] for s in starts.tolist()])


def _train(model, streams: list, steps: int, seed: int, bar=None) -> None:
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=SETTINGS["lr"], weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )
    gens = [_batches(s, steps, seed + k) for k, s in enumerate(streams)]
    for step in range(steps):
        x = next(gens[step % len(gens)])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if bar is not None:
            bar.update(1)
    model.eval()


def _save(model, tok, out: Path) -> None:
    import torch
    from transformers import GenerationConfig

    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    tok.save_pretrained(out)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(out)


def _key(archs: tuple[str, ...]) -> str:
    return hashlib.sha256(json.dumps([SETTINGS, sorted(archs)], sort_keys=True).encode()).hexdigest()[:16]


def _paths(out: Path, archs) -> dict[str, dict[str, Path]]:
    return {a: {r: out / f"{a}-{r}" for r in ROLES} for a in archs}


@contextlib.contextmanager
def _build_lock(target: Path):
    """One builder of the family at ``target`` (members included) at a time across processes
    (concurrent test sessions share the cache); the others wait, then find it built."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _recorded(meta: Path, key: str) -> bool:
    try:
        return json.loads(meta.read_text()).get("key") == key
    except (OSError, ValueError):
        return False  # missing or unreadable record: build


def build_tiny_family(out, archs=ARCHS, force: bool = False, progress: bool = True) -> dict[str, dict[str, Path]]:
    """Build (or reuse) the family under ``out``; returns ``{arch: {"base"|"code"|"prose": Path}}``."""
    out = Path(out).absolute()
    archs = tuple(archs)
    # Concurrent builders (test sessions, the demo) share one staging directory: the lock makes
    # the later ones wait and then reuse what the first built.
    with _build_lock(out):
        if not force and _recorded(out / "family.json", _key(archs)):
            return _paths(out, archs)
        return _build_family(out, archs, progress)


def _build_family(out: Path, archs: tuple[str, ...], progress: bool) -> dict[str, dict[str, Path]]:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar for the whole build, not one per saved file
    stage = out.parent / f".{out.name}.building"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    try:
        train, held = {}, {}
        for dom, text in _corpora().items():
            train[dom], held[dom] = _split(text, SETTINGS["heldout_fraction"])
        (stage / "heldout").mkdir()
        for dom, text in held.items():
            (stage / "heldout" / f"{dom}.txt").write_text(text)
        tok = _train_tokenizer([train["code"], train["prose"]], stage / "tokenizer")
        ids = {d: torch.tensor(tok(t)["input_ids"], dtype=torch.long) for d, t in train.items()}
        s = SETTINGS
        total = len(archs) * (s["base_steps"] + 2 * s["finetune_steps"])
        with tqdm(total=total, desc="training the tiny family", unit="step", disable=not progress) as bar:
            for k, arch in enumerate(archs):
                torch.manual_seed(1000 + k)
                model = AutoModelForCausalLM.from_config(_config(arch, tok), dtype=torch.float32)
                _train(model, [ids["code"], ids["prose"]], s["base_steps"], seed=10 * k, bar=bar)
                _save(model, tok, stage / f"{arch}-base")
                base_state = {n: p.detach().clone() for n, p in model.state_dict().items()}
                for j, dom in enumerate(("code", "prose")):
                    model.load_state_dict(base_state)
                    _train(model, [ids[dom]], s["finetune_steps"], seed=10 * k + j + 1, bar=bar)
                    _save(model, tok, stage / f"{arch}-{dom}")
        (stage / "family.json").write_text(json.dumps({"key": _key(archs), "settings": SETTINGS, "archs": list(archs)}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    return _paths(out, archs)


CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_SETTINGS = {"version": 1, "steps": 8, "turn_chars": 160, "text_chars": 40_000, "init_noise": 0.02, "seed": 77}


def _chatml_text(prose: str) -> str:
    """Prose cut into user/assistant turns in ChatML markup (training text for the new tokens)."""
    n, turns = CHATML_SETTINGS["turn_chars"], []
    text = prose[: CHATML_SETTINGS["text_chars"]]
    for k, i in enumerate(range(0, len(text), n)):
        role = "user" if k % 2 == 0 else "assistant"
        turns.append(f"{CHATML_TOKENS[0]}{role}\n{text[i : i + n]}{CHATML_TOKENS[1]}\n")
    return "".join(turns)


def build_chatml_member(family_dir, arch: str = "mistral", force: bool = False) -> Path:
    """Build (or reuse) ``{arch}-chatml`` next to the family's ``{arch}-base``; returns its path.

    The base's tokenizer gains the ChatML pair as special tokens (ids 4096, 4097) and the ChatML
    chat template; embed_tokens (and lm_head unless tied) gain two rows, each the mean of the
    existing rows plus seeded noise (so the two differ); then a short fine-tune on ChatML-formatted
    prose. Deterministic given the base.
    """
    family = Path(family_dir).absolute()
    base, out = family / f"{arch}-base", family / f"{arch}-chatml"
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: build the tiny family first (build_tiny_family)")
    key = hashlib.sha256(json.dumps([CHATML_SETTINGS, SETTINGS, arch], sort_keys=True).encode()).hexdigest()[:16]
    meta = out / "chatml.json"
    if not force and _recorded(meta, key):
        return out
    with _build_lock(family):  # the family's lock: a rebuild of the family replaces this directory too
        if not force and _recorded(meta, key):
            return out
        stage = family / f".{out.name}.building"
        shutil.rmtree(stage, ignore_errors=True)
        try:
            _build_chatml(base, stage)
            (stage / "chatml.json").write_text(json.dumps({"key": key, "settings": CHATML_SETTINGS, "from": base.name}, indent=2))
            if out.exists():
                shutil.rmtree(out)
            os.rename(stage, out)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    return out


def _build_chatml(base: Path, stage: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    threads = torch.get_num_threads()
    try:
        torch.manual_seed(CHATML_SETTINGS["seed"])
        tok = AutoTokenizer.from_pretrained(base)
        tok.add_special_tokens({"additional_special_tokens": list(CHATML_TOKENS)})
        tok.chat_template = CHATML_TEMPLATE
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        old = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        gen = torch.Generator().manual_seed(CHATML_SETTINGS["seed"])
        with torch.no_grad():
            for layer in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}.values():
                noise = torch.randn(layer.weight[old:].shape, generator=gen) * CHATML_SETTINGS["init_noise"]
                layer.weight[old:] = layer.weight[:old].mean(dim=0) + noise
        train, _ = _split(_corpora()["prose"], SETTINGS["heldout_fraction"])
        ids = torch.tensor(tok(_chatml_text(train), verbose=False)["input_ids"], dtype=torch.long)
        _train(model, [ids], CHATML_SETTINGS["steps"], seed=CHATML_SETTINGS["seed"])
        _save(model, tok, stage)
    finally:
        torch.set_num_threads(threads)


def heldout_texts(out) -> dict[str, list[str]]:
    """Held-out text per domain (never trained on), in blocks of about 2,000 characters."""
    res = {}
    for dom in ("code", "prose"):
        text = (Path(out) / "heldout" / f"{dom}.txt").read_text()
        res[dom] = [text[i : i + 2000] for i in range(0, len(text), 2000)]
    return res


def perplexity(model_dir, texts, max_length: int = 256) -> float:
    """Token-weighted perplexity of the model in ``model_dir`` over ``texts`` (float32, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            if ids.shape[1] < 2:
                continue
            loss = model(input_ids=ids, labels=ids).loss
            nll += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(nll / max(count, 1))
