"""The project's one adapter onto Ray Serve's serving internals (Ray 2.60), and why each is used.

A model's application is its ``LLMServer`` as the ingress (``serve.ingress()`` without an app:
Serve calls ``__serve_build_asgi_app__`` once the engine has started), so that its replica serves
vLLM's own OpenAI app with no Python hop in front (Ray's "direct streaming"). Ray's public
``build_openai_app`` does this for one model only, always puts its request-router deployment in
front (a Python hop per request) and sets a request router class that Serve refuses behind
HAProxy; mergeserve routes by model in HAProxy (serve/haproxy.py) and builds the application with
the public ``ray.serve.llm.build_llm_deployment`` instead. What is not public:

- ``LLMServer.__serve_build_asgi_app__`` (a hook of Serve's late-bound ingress that Ray's
  LLMServer implements): overridden to put mergeserve's request checks (serve/requests.py) in
  front of vLLM's app. The subclass keeps the name, so Serve's deployment and metric names stay
  ``LLMServer:<model>``.
- ``CallbackBase`` (``ray.llm._internal.common.callbacks``), named by the LLMConfig's public
  ``callback_config``: before the engine starts, Ray runs a task on every node of the replica to
  "download" the model, which for a local checkpoint directory finds nothing to do but costs a
  new worker process (about half a minute of a start-up on a small machine).
  :class:`LocalCheckpoint` tells Ray to skip it: mergeserve serves local directories only, on a
  filesystem every node sees.
- ``LLMServer.engine.check_health()`` (what Ray's own ``check_health`` calls): polled, and asked
  before each request, so that a replica whose engine died ends its own process at once (see
  :class:`EngineGate`) instead of answering 500 until Serve's health check gives up on it (three
  failed checks in a row, not configurable).
- ``add_port_to_grpc_server`` as imported by ``ray.serve._private.replica``: every replica opens
  an inter-deployment gRPC port on all interfaces (``[::]:0``), with no option to change it. On a
  one-machine server (``MERGESERVE_LOOPBACK_ONLY=1``) it is bound to 127.0.0.1 instead, when the
  replica imports this module (the deployment class is pickled by reference).

tests/serve/test_ray_llm_adapter.py fails, naming the symbol, when a Ray upgrade moves one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from ray import serve
from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.serve.llm import build_llm_deployment
from ray.serve.llm.deployment import LLMServer as RayLLMServer

from mergeserve.serve.ingress import LOOPBACK_ENV

logger = logging.getLogger("ray.serve")
# How often a replica asks its engine whether it is alive, besides before each request: the
# engine's own monitor thread notices a dead engine process at once, this only picks that up.
ENGINE_POLL_S = 0.2


def _bind_replica_grpc_to_loopback() -> None:
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server
    if getattr(original, "_mergeserve_loopback", False):
        return

    def loopback(server, address: str):
        return original(server, "127.0.0.1:0" if address == "[::]:0" else address)

    loopback._mergeserve_loopback = True
    replica.add_port_to_grpc_server = loopback


if os.environ.get(LOOPBACK_ENV) == "1":  # in the replica, where Ray imports this module with the deployment
    _bind_replica_grpc_to_loopback()


class LocalCheckpoint(CallbackBase):
    """The LLMConfig callback for a local checkpoint directory: no per-node download step."""

    async def on_before_node_init(self) -> None:
        self.ctx.run_init_node = False



def end_replica(reason: BaseException) -> None:
    """End this replica's process now. Serve sees its actor die and starts a replacement at once
    (a failing health check would take three periods); HAProxy sees the connections close with
    no answer and sends those requests again (``retry-on empty-response conn-failure``, with
    ``option redispatch``: serve/ingress.py), to another replica or to Serve's fallback proxy,
    which holds them until the replacement runs. So no client is told 500 for a request that the
    replacement can answer."""
    message = f"mergeserve: the engine of this replica died ({reason!r}); ending the replica so that Serve replaces it"
    logger.error(message)
    print(message, file=sys.stderr, flush=True)  # Serve's log handlers may buffer; this is the last word
    os._exit(1)


class EngineGate:
    """ASGI middleware, outermost around vLLM's app: a request that meets a dead engine is never
    answered by this replica. Before a request goes in, and when a 5xx answer is about to go out,
    ``engine_dead()`` is asked; if the engine is dead the process ends (:func:`end_replica`), so
    the request is retried by HAProxy instead of answered with vLLM's 500. A response whose
    status already went out (a stream) is cut, as it must be: it cannot be sent again."""

    def __init__(self, app, engine_dead):
        self.app = app
        self.engine_dead = engine_dead  # async () -> the engine's error, or None while it is alive

    async def _end_if_dead(self) -> None:
        error = await self.engine_dead()
        if error is not None:
            end_replica(error)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        await self._end_if_dead()

        async def send_unless_dead(message):
            if message["type"] == "http.response.start" and message["status"] >= 500:
                await self._end_if_dead()
            await send(message)

        await self.app(scope, receive, send_unless_dead)


class LLMServer(RayLLMServer):
    """Ray's LLMServer with strict request checks in front of vLLM's app, and a replica that ends
    itself when its engine dies (:class:`EngineGate`). Defined at module level so that the replica
    imports this module (the class is pickled by reference)."""

    _stopping = False  # Serve is stopping this replica: its engine shuts down, which is no death

    async def __serve_build_asgi_app__(self):
        from mergeserve.serve.requests import RequestCheck

        app = await super().__serve_build_asgi_app__()
        app.middleware_stack = None  # vLLM built the stack already; Starlette rebuilds it on first use
        app.add_middleware(RequestCheck)
        app.add_middleware(EngineGate, engine_dead=self._engine_dead)  # added last: outermost
        self._engine_watch = asyncio.get_running_loop().create_task(self._end_when_engine_dies())
        return app

    async def _engine_dead(self) -> BaseException | None:
        if self._stopping or self.engine is None:
            return None
        try:
            await self.engine.check_health()  # raises once vLLM's monitor saw the engine process die
        except Exception as e:  # noqa: BLE001 - any failure of the engine's health means dead
            return e
        return None

    async def _end_when_engine_dies(self) -> None:
        """Also with no request coming: Serve then replaces the replica before the next one."""
        while True:
            await asyncio.sleep(ENGINE_POLL_S)
            error = await self._engine_dead()
            if error is not None:
                end_replica(error)

    async def __del__(self) -> None:  # Serve's shutdown hook for the replica (Ray's LLMServer's is async too)
        self._stopping = True
        watch = getattr(self, "_engine_watch", None)
        if watch is not None:
            watch.cancel()
        await super().__del__()


def direct_ingress_app(llm_config):
    """An application whose ingress is the model's LLMServer serving vLLM's OpenAI app."""
    return build_llm_deployment(llm_config, deployment_cls=serve.ingress()(LLMServer))
