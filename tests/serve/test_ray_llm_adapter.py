"""Ray Serve's internals that mergeserve/serve/ray_llm_adapter.py relies on are still where it
expects them (imports and signatures only, no cluster); each assertion names what moved."""

from __future__ import annotations

import inspect


def test_the_late_bound_ingress_hook_is_still_llmservers():
    from ray.serve.llm.deployment import LLMServer

    hook = getattr(LLMServer, "__serve_build_asgi_app__", None)
    assert hook is not None and inspect.iscoroutinefunction(hook), "ray.serve.llm.deployment.LLMServer.__serve_build_asgi_app__"


def test_the_engine_still_has_an_async_health_check():
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

    check = getattr(VLLMEngine, "check_health", None)
    assert check is not None and inspect.iscoroutinefunction(check), "VLLMEngine.check_health (serve/ray_llm_adapter.py EngineGate)"


def test_the_replica_imports_add_port_to_grpc_server_by_name():
    from ray.serve._private import replica

    assert callable(getattr(replica, "add_port_to_grpc_server", None)), "ray.serve._private.replica.add_port_to_grpc_server"
    source = inspect.getsource(replica)
    assert 'add_port_to_grpc_server(self._server, "[::]:0")' in source, "the replica's inter-deployment gRPC bind moved"


def test_the_loopback_binding_rewrites_only_the_all_interfaces_address(monkeypatch):
    from ray.serve._private import replica

    from mergeserve.serve import ray_llm_adapter

    seen = []
    monkeypatch.setattr(replica, "add_port_to_grpc_server", lambda server, address: seen.append(address) or 1)
    ray_llm_adapter._bind_replica_grpc_to_loopback()
    replica.add_port_to_grpc_server(None, "[::]:0")
    replica.add_port_to_grpc_server(None, "10.0.0.1:5")
    assert seen == ["127.0.0.1:0", "10.0.0.1:5"]


def test_a_model_app_builds_without_a_cluster(tiny_family):
    from ray.serve import Application

    from mergeserve.serve.builder import build_model_app
    from mergeserve.serve.engine import inspect_checkpoint, llm_config

    cfg = llm_config(inspect_checkpoint(tiny_family["mistral"]["code"], "m"))
    assert isinstance(build_model_app({"llm_config": cfg}), Application)


def test_the_checkpoint_callback_skips_rays_download_step(tiny_family):
    import asyncio

    from ray.llm._internal.common.callbacks.base import CallbackCtx
    from ray.llm._internal.common.utils.import_utils import load_class
    from ray.serve.llm import LLMConfig

    from mergeserve.serve.engine import inspect_checkpoint, llm_config
    from mergeserve.serve.ray_llm_adapter import LocalCheckpoint

    cfg = llm_config(inspect_checkpoint(tiny_family["mistral"]["code"], "m"))
    assert load_class(cfg["callback_config"]["callback_class"]) is LocalCheckpoint
    assert hasattr(CallbackCtx(), "run_init_node"), "ray.llm CallbackCtx.run_init_node is gone: update serve/ray_llm_adapter.py"
    callback = LocalCheckpoint(llm_config=LLMConfig.model_validate(cfg))
    asyncio.run(callback.on_before_node_init())
    assert callback.ctx.run_init_node is False


class _ReplicaEnded(BaseException):
    """Stands in for the end of the replica's process (os._exit), which would end pytest too."""


def _gate_run(engine_dead_after: int, app_status: int, monkeypatch) -> tuple[list, bool]:
    """One request through EngineGate around an ASGI app answering ``app_status``; the engine
    reads as dead from the ``engine_dead_after``-th question on. Returns (messages sent, ended)."""
    import asyncio

    from mergeserve.serve import ray_llm_adapter

    def end(reason):
        raise _ReplicaEnded(reason)

    monkeypatch.setattr(ray_llm_adapter, "end_replica", end)
    calls = []

    async def engine_dead():
        calls.append(1)
        return RuntimeError("EngineCore died") if len(calls) >= engine_dead_after else None

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": app_status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    gate = ray_llm_adapter.EngineGate(app, engine_dead)
    try:
        asyncio.run(gate({"type": "http", "method": "POST", "path": "/v1/completions"}, receive, send))
    except _ReplicaEnded:
        return sent, True
    return sent, False


def test_a_dead_engine_ends_the_replica_before_it_answers(monkeypatch):
    """The engine cannot be killed inside a unit test without vLLM, so whether it is dead is a
    stand-in here; the end of the process is too (see _ReplicaEnded). tests/serve/test_serve.py
    kills a real engine."""
    assert _gate_run(1, 200, monkeypatch) == ([], True)  # dead before the request: no answer at all
    assert _gate_run(2, 500, monkeypatch) == ([], True)  # died during it: vLLM's 500 never goes out
    sent, ended = _gate_run(99, 500, monkeypatch)  # alive: its own 5xx answers pass through
    assert not ended and sent[0]["status"] == 500
    sent, ended = _gate_run(2, 200, monkeypatch)  # a 2xx is never held back
    assert not ended and [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


def test_a_replica_that_serve_stops_does_not_count_its_engine_as_dead():
    """Serve's shutdown (``__del__``) shuts the engine down, after which vLLM's health check fails
    too: that must not end the process as a death would. The engine is a stand-in (no vLLM)."""
    import asyncio

    from mergeserve.serve.ray_llm_adapter import LLMServer

    class DeadEngine:
        async def check_health(self):
            raise RuntimeError("engine is shut down")

        async def shutdown(self):
            pass

    server = LLMServer.__new__(LLMServer)  # no Ray replica around it: only the two methods are used
    server.engine = DeadEngine()
    assert isinstance(asyncio.run(server._engine_dead()), RuntimeError)
    asyncio.run(server.__del__())  # what Serve awaits when it stops the replica
    assert server._stopping and asyncio.run(server._engine_dead()) is None
