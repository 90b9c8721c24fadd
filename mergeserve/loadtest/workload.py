"""What a load test sends, and when: prompts (synthetic or from JSONL) and arrival schedules.

Synthetic prompts follow vLLM's ``random`` dataset: random token ids from the model's vocabulary
(special tokens excluded), decoded to text, re-encoded and trimmed or extended until the text
encodes to exactly ``input_len`` tokens *with* the special tokens the tokenizer adds (BOS), so
the server's usage report counts ``input_len`` prompt tokens. The tokenizer is the served
model's own, loaded from a local directory (never from a hub: ``local_files_only``). The same
seed gives the same prompts for every model that shares a tokenizer.

Arrival schedules (offsets in seconds from the start of a run):

- constant rate ``R``: one request every ``1/R`` s;
- Poisson rate ``R`` with burstiness ``b``: gaps drawn from a Gamma(shape=b, scale=1/(R*b))
  distribution, mean ``1/R`` (b=1 is a Poisson process; b<1 burstier, b>1 more regular), as
  vLLM's client draws them;
- fixed concurrency: no schedule; ``N`` workers each send their next request when the last ends.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergeserve.errors import ConfigError, InputError


@dataclass(frozen=True)
class Prompt:
    text: str
    output_len: int
    input_tokens: int | None = None  # as counted locally (synthetic prompts only)


def load_tokenizer(path: str | Path):
    """The served model's tokenizer, from its local checkpoint directory only."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any load failure is the same user problem
        raise InputError(f"tokenizer {path}: cannot load it locally ({type(e).__name__}: {str(e)[:200]})") from None


def _fit_to_length(tok, ids: list[int], target: int, rng: np.random.Generator, allowed: np.ndarray) -> tuple[str, int]:
    """Decode ``ids``; re-encode; trim or extend until the text encodes to ``target`` tokens."""
    text, n = "", 0
    for _ in range(20):
        text = tok.decode(ids)
        ids = tok.encode(text, add_special_tokens=False)
        n = len(ids)
        if n == target:
            break
        ids = ids[:target] if n > target else ids + allowed[rng.integers(0, len(allowed), target - n)].tolist()
    return text, n


def synthetic_prompts(tokenizer, n: int, input_len: int, output_len: int, seed: int = 0) -> list[Prompt]:
    """``n`` prompts of exactly ``input_len`` tokens (specials included) where the tokenizer allows."""
    special = int(tokenizer.num_special_tokens_to_add()) if hasattr(tokenizer, "num_special_tokens_to_add") else 0
    target = input_len - special
    if target < 1:
        raise ConfigError(f"--input-len {input_len}: must exceed the {special} special token(s) the tokenizer adds")
    rng = np.random.default_rng(seed)
    vocab = int(tokenizer.vocab_size)
    allowed = np.setdiff1d(np.arange(vocab), np.asarray(tokenizer.all_special_ids or [], dtype=int))
    out = []
    for _ in range(n):
        best = None
        for _ in range(10):  # a draw whose decode/re-encode will not settle on the length is redrawn
            text, got = _fit_to_length(tokenizer, allowed[rng.integers(0, len(allowed), target)].tolist(), target, rng, allowed)
            if best is None or abs(got - target) < abs(best[1] - target):
                best = (text, got)
            if got == target:
                break
        out.append(Prompt(best[0], output_len, best[1] + special))
    return out


def jsonl_prompts(path: str | Path, output_len: int) -> list[Prompt]:
    """Lines of ``{"prompt": str, "output_len": int (optional; also "max_tokens")}``.

    Every bad line is named at once, before any request is sent."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--prompts {p}: no such file")
    prompts, problems = [], []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {i}: not JSON ({e.msg})")
            continue
        if not isinstance(d, dict) or not isinstance(d.get("prompt"), str) or not d["prompt"]:
            problems.append(f"line {i}: expected an object with a non-empty string 'prompt'")
            continue
        n = d.get("output_len", d.get("max_tokens", output_len))
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            problems.append(f"line {i}: output_len must be a positive integer, got {n!r}")
            continue
        prompts.append(Prompt(d["prompt"], n))
    if not prompts and not problems:
        problems.append("no prompts in the file")
    if problems:
        raise ConfigError.from_problems(problems[:20], f"--prompts {p}")
    return prompts


def pick(prompts: list[Prompt], n: int, seed: int) -> list[Prompt]:
    """``n`` prompts: the file's order cycled when it has fewer, a seeded sample when more."""
    if len(prompts) >= n:
        idx = np.sort(np.random.default_rng(seed).choice(len(prompts), n, replace=False))
        return [prompts[i] for i in idx]
    return [prompts[i % len(prompts)] for i in range(n)]


def arrival_offsets(n: int, rate: float, poisson: bool = False, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (s from the start) of ``n`` requests at ``rate`` requests/s.

    Constant: ``i / rate``. Poisson/Gamma: cumulative gaps ~ Gamma(burstiness, 1/(rate*burstiness)),
    the first request at 0. An infinite rate sends everything at once."""
    if n <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    if not poisson:
        return [i / rate for i in range(n)]
    gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]
