"""The strict request checks (mergeserve/serve/requests.py) on vLLM's real request models; over
HTTP they are tested against the served app in test_hostile_requests.py."""

from __future__ import annotations

import json

import pytest

from mergeserve.serve.requests import _models, problem

MODELS = _models()
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def _why(path: str, body) -> str | None:
    return problem(path, body if isinstance(body, bytes) else json.dumps(body).encode(), MODELS)


def test_what_clients_send_passes():
    assert _why(COMPLETIONS, {"model": "m", "prompt": "x", "max_tokens": 16, "temperature": 0, "stream": True,
                              "stream_options": {"include_usage": True}, "logprobs": 5, "ignore_eos": True}) is None
    assert _why(CHAT, {"model": "m", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                       "temperature": 0.7, "top_p": 0.95, "seed": 0, "repetition_penalty": 1.3, "max_tokens": 8}) is None
    assert _why("/v1/models", b"anything") is None  # not a body this checks


@pytest.mark.parametrize("path, body, words", [
    (COMPLETIONS, {"model": "m", "prompt": "x", "best_of": 1000}, "unknown field 'best_of'"),
    (COMPLETIONS, {"model": "m", "prompt": "x", "max_tokenz": 5}, "unknown field 'max_tokenz'"),
    (CHAT, {"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role: 'wizard'"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}], "add_generation_prompt": "yes"}, "add_generation_prompt"),
    (COMPLETIONS, {"model": "m", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    (COMPLETIONS, [1, 2], "JSON object"),
    (COMPLETIONS, b"{not json", "not valid JSON"),
])
def test_junk_is_refused_with_the_reason(path, body, words):
    why = _why(path, body)
    assert why is not None and words in why, why
