"""Strict checks of OpenAI requests before vLLM sees them: junk gets a 400, not a silent 200.

vLLM's request models accept what they do not know (extra fields are logged and ignored, so
``best_of=1000`` is "accepted"), coerce loosely (``add_generation_prompt: "yes"`` becomes True)
and take any message role. In front of vLLM's app, in each model's replica, this middleware
answers 400 with an OpenAI error body for:

- a body that is not a JSON object;
- a field vLLM's request model does not define (``best_of``, typos);
- a value of the wrong type, validated strictly (no string-to-bool or string-to-number coercion);
- a chat message whose role is not one of OpenAI's.

Bounds on ``n`` and ``logprobs`` are vLLM's own (``VLLM_MAX_N_SEQUENCES``, ``max_logprobs``,
set by serve/engine.py); the body's size is bounded before this (HAProxy and serve/auth.py).
"""

from __future__ import annotations

import json

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def _models() -> dict:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}


def problem(path: str, raw: bytes, models: dict) -> str | None:
    """Why the request body ``raw`` to ``path`` is refused, or None (then vLLM handles it)."""
    model = models.get(path)
    if model is None:
        return None
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        return f"the body is not valid JSON ({e})"
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    unknown = sorted(set(body) - set(model.model_fields))
    if unknown:
        return f"unknown field {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
    for i, m in enumerate(body.get("messages") or []):
        if isinstance(m, dict) and m.get("role") not in ROLES:
            return f"messages[{i}].role: {m.get('role')!r} is not one of {', '.join(sorted(ROLES))}"
    from pydantic import ValidationError

    try:
        model.model_validate(body, strict=True)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"{where}: {err['msg']}" if where else err["msg"]
    return None


class RequestCheck:
    """ASGI middleware around vLLM's app (see the module docstring)."""

    def __init__(self, app):
        self.app = app
        self.models = _models()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        root = scope.get("root_path", "")  # the model's route, /_m/<app>, as HAProxy forwarded it
        if root and path.startswith(root):
            path = path[len(root):]
        if scope["type"] != "http" or scope.get("method") != "POST" or path not in self.models:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        why = problem(path, raw, self.models)
        if why is not None:
            body = json.dumps({"error": {"message": why, "type": "invalid_request_error", "param": None, "code": 400}}).encode()
            await send({"type": "http.response.start", "status": 400, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()  # afterwards: the client's disconnect, when it comes

        await self.app(scope, replay, send)
