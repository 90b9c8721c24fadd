"""Ray Serve's internals that mergeserve/serve/ray_llm_adapter.py relies on are still where it
expects them (imports and signatures only, no cluster); each assertion names what moved."""

from __future__ import annotations

import inspect


def test_the_late_bound_ingress_hook_is_still_llmservers():
    from ray.serve.llm.deployment import LLMServer

    hook = getattr(LLMServer, "__serve_build_asgi_app__", None)
    assert hook is not None and inspect.iscoroutinefunction(hook), "ray.serve.llm.deployment.LLMServer.__serve_build_asgi_app__"


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
