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
- ``add_port_to_grpc_server`` as imported by ``ray.serve._private.replica``: every replica opens
  an inter-deployment gRPC port on all interfaces (``[::]:0``), with no option to change it. On a
  one-machine server (``MERGESERVE_LOOPBACK_ONLY=1``) it is bound to 127.0.0.1 instead, when the
  replica imports this module (the deployment class is pickled by reference).

tests/serve/test_ray_llm_adapter.py fails, naming the symbol, when a Ray upgrade moves one.
"""

from __future__ import annotations

import os

from ray import serve
from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.serve.llm import build_llm_deployment
from ray.serve.llm.deployment import LLMServer as RayLLMServer

from mergeserve.serve.ingress import LOOPBACK_ENV


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



class LLMServer(RayLLMServer):
    """Ray's LLMServer with strict request checks in front of vLLM's app. Defined at module level
    so that the replica imports this module (the class is pickled by reference)."""

    async def __serve_build_asgi_app__(self):
        from mergeserve.serve.requests import RequestCheck

        app = await super().__serve_build_asgi_app__()
        app.middleware_stack = None  # vLLM built the stack already; Starlette rebuilds it on first use
        app.add_middleware(RequestCheck)
        return app


def direct_ingress_app(llm_config):
    """An application whose ingress is the model's LLMServer serving vLLM's OpenAI app."""
    return build_llm_deployment(llm_config, deployment_cls=serve.ingress()(LLMServer))
