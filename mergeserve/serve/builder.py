"""The one place a Serve application is assembled (``serve.deployment(...).bind(...)``).

It follows ``ray.serve.llm.build_openai_app`` (one ``LLMServer`` deployment per model, one
OpenAI ingress routing by model name) with two additions Ray's builder has no hook for: ASGI
middlewares on the ingress's FastAPI app (bearer-token auth when a key is set, and a retry of
requests that fail before their first byte), and the LLM deployments use our ``LLMServer``
subclass, which sends a stream's first chunk without Ray's batching delay (see llm_server.py).
The OpenAI layer itself (routes, streaming, usage, 4xx on bad requests) is Ray's and vLLM's.
:func:`build_app` takes :class:`AppArgs`, or the same as a mapping, so ``serve deploy`` can call
it from a config file (``import_path: mergeserve.serve.builder:build_app``). Ray's internals it
needs are imported through :mod:`mergeserve.serve.ray_llm_adapter`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any

from pydantic import BaseModel, ConfigDict

OPEN_PATHS = ("/-/healthz", "/-/routes")


class BearerAuth:
    """ASGI middleware: 401 with an OpenAI-style error body unless the bearer token matches."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        got = dict(scope.get("headers") or []).get(b"authorization", b"")
        if hmac.compare_digest(got, self.expected):
            return await self.app(scope, receive, send)
        body = json.dumps({"error": {
            "message": "missing or invalid API key: send 'Authorization: Bearer <key>'",
            "type": "authentication_error", "param": None, "code": "invalid_api_key",
        }}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"), (b"content-length", str(len(body)).encode()),
        ]})
        await send({"type": "http.response.body", "body": body})


class RetryBeforeFirstByte:
    """ASGI middleware: re-send a POST whose response would start with a 5xx status.

    When a replica's engine dies, Serve replaces the replica after its next health check; until
    then requests routed to it fail at once, before any output. Such a request has produced
    nothing, so it is safe to send again: it is retried (once a second, within ``window_s``)
    and lands on the new replica. Requests that were already generating when the engine died
    still fail: their partial output cannot be taken back.
    """

    def __init__(self, app, window_s: float = 120.0):
        self.app = app
        self.window_s = window_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.window_s
        while True:
            state = {"replayed": False, "retry": False}

            async def replay(state=state):
                if not state["replayed"]:
                    state["replayed"] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # afterwards: the client's disconnect, when it comes

            async def capture(msg, state=state):
                if msg["type"] == "http.response.start" and msg["status"] >= 500 and loop.time() < deadline:
                    state["retry"] = True
                if not state["retry"]:
                    await send(msg)

            await self.app(scope, replay, capture)
            if not state["retry"]:
                return
            await asyncio.sleep(1.0)


class AppArgs(BaseModel):
    """The application: one ``ray.serve.llm`` LLMConfig (as a mapping) per model, and the API key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    llm_configs: list[dict[str, Any]]
    api_key: str | None = None


def build_app(args: AppArgs | dict[str, Any]):
    """``args`` (an :class:`AppArgs`, or its mapping from a config file) -> Serve Application."""
    from ray import serve
    from ray.serve.llm import LLMConfig, build_llm_deployment
    from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

    from mergeserve.serve.llm_server import LLMServer
    from mergeserve.serve.ray_llm_adapter import ingress_app, maybe_apply_llm_deployment_config_defaults, to_model_metadata

    args = AppArgs.model_validate(args)
    configs = [LLMConfig.model_validate(c) for c in args.llm_configs]
    names = [c.model_id for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    app = ingress_app()
    app.add_middleware(RetryBeforeFirstByte)
    if args.api_key:  # added last, so it runs first: unauthenticated requests are never retried
        app.add_middleware(BearerAuth, api_key=args.api_key)
    ingress = make_fastapi_ingress(OpenAiIngress, app=app)

    options = maybe_apply_llm_deployment_config_defaults(OpenAiIngress.get_deployment_options(configs), {})
    return serve.deployment(ingress, **options).bind(
        llm_deployments={c.model_id: build_llm_deployment(c, deployment_cls=LLMServer) for c in configs},
        model_cards={c.model_id: to_model_metadata(c.model_id, c) for c in configs},
        lora_paths={},
    )
