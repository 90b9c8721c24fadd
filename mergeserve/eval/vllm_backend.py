"""Perplexity with vLLM: the prompt log-probabilities of each evaluation window (GPU clusters).

Each window ``[BOS] + tokens`` is sent as a prompt with ``prompt_logprobs=0`` and
``max_tokens=1``; vLLM returns, for every prompt position after the first, the log-probability
of the token actually there (plus the top-0 alternatives), so the window's NLL is minus their
sum: the same quantity :func:`mergeserve.eval.perplexity.score_model` computes with transformers,
at the engine's precision (bf16 by default, so expect agreement to about 1%, not bit for bit).
"""

from __future__ import annotations

import os
from pathlib import Path

from mergeserve.eval.perplexity import TextScore, TokenizedText


def score_checkpoint_vllm(
    model_dir: str | Path, texts: list[TokenizedText], device: str = "cpu", max_model_len: int | None = None
) -> dict[str, TextScore]:
    """Score a checkpoint directory with a vLLM engine started for the purpose (and shut down)."""
    if device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    longest = max((len(w) + 1 for t in texts for w in t.windows), default=2)
    llm = LLM(model=str(model_dir), max_model_len=max_model_len or max(longest + 1, 256), enforce_eager=True,
              trust_remote_code=False, dtype="bfloat16")
    try:
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        scores = {}
        for text in texts:
            prompts = [TokensPrompt(prompt_token_ids=[text.bos_id, *w]) for w in text.windows]
            nll = 0.0
            for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
                ids = prompt["prompt_token_ids"]
                for pos, lp in enumerate(out.prompt_logprobs or []):
                    if pos == 0 or lp is None:
                        continue  # nothing predicts the BOS token
                    nll -= lp[ids[pos]].logprob
            scores[text.name] = TextScore(nll, text.tokens, text.bytes)
        return scores
    finally:
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown:
            shutdown()
        del llm
