"""The Ray Serve LLM internals behind mergeserve/serve/ray_llm_adapter.py are still where it expects
them. Imports only (no engine is started); each assertion names the symbol that moved."""

from __future__ import annotations

import importlib
import inspect

import pytest

ADAPTER = "mergeserve/serve/ray_llm_adapter.py"
INTERNALS = [
    ("ray.llm._internal.common.dict_utils", "maybe_apply_llm_deployment_config_defaults"),
    ("ray.llm._internal.serve.core.configs.openai_api_models", "to_model_metadata"),
    ("ray.llm._internal.serve.core.ingress.ingress", "init"),
    ("ray.llm._internal.serve.utils.batcher", "Batcher"),
]


@pytest.mark.parametrize("module,name", INTERNALS, ids=[n for _, n in INTERNALS])
def test_internal_symbol_is_still_there(module, name):
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"{module} no longer imports ({e}): update {ADAPTER}")
    assert hasattr(mod, name), f"{module}.{name} is gone: update {ADAPTER}"


def test_llm_server_still_batches_its_stream_in_the_overridden_method():
    from ray.serve.llm.deployment import LLMServer

    assert callable(getattr(LLMServer, "_batch_output_stream", None)), (
        f"ray.serve.llm.deployment.LLMServer._batch_output_stream is gone: mergeserve/serve/llm_server.py overrides it ({ADAPTER})"
    )
    assert callable(getattr(LLMServer, "_get_batch_interval_ms", None)), (
        "ray.serve.llm.deployment.LLMServer._get_batch_interval_ms is gone: mergeserve/serve/llm_server.py calls it"
    )


def test_batcher_still_streams_batches_of_a_generator():
    from mergeserve.serve.ray_llm_adapter import Batcher

    params = inspect.signature(Batcher).parameters
    assert "interval_ms" in params and callable(getattr(Batcher, "stream", None)), (
        f"ray.llm._internal.serve.utils.batcher.Batcher(generator, interval_ms).stream() changed: update {ADAPTER}"
    )


def test_ingress_app_takes_middlewares():
    from mergeserve.serve.ray_llm_adapter import ingress_app

    assert callable(getattr(ingress_app(), "add_middleware", None)), (
        f"ray.llm._internal.serve.core.ingress.ingress.init() no longer returns a FastAPI app: update {ADAPTER}"
    )
