"""The only place that imports Ray Serve LLM's internals (``ray.llm._internal``), and why.

:mod:`mergeserve.serve.builder` assembles the OpenAI application as
``ray.serve.llm.build_openai_app`` does, with two additions that builder has no hook for (ASGI
middlewares on the ingress's FastAPI app, and our :class:`~mergeserve.serve.llm_server.LLMServer`).
Ray's public API (``ray.serve.llm``, ``.ingress``, ``.deployment``) gives the deployment classes
and builders; it does not export these, which its own builder uses:

- :func:`ingress_app`: the ingress's FastAPI app, with Ray's middlewares and lifespan, to add ours to;
- :func:`to_model_metadata`: the model cards that ``/v1/models`` lists;
- :func:`maybe_apply_llm_deployment_config_defaults`: the ingress deployment's default options;
- :class:`Batcher`: the stream batching of ``LLMServer``, whose first chunk our subclass sends at
  once (it overrides ``LLMServer._batch_output_stream``, a private method).

``tests/serve/test_ray_llm_adapter.py`` fails, naming the symbol, when a Ray upgrade moves one.
"""

from __future__ import annotations

from ray.llm._internal.common.dict_utils import maybe_apply_llm_deployment_config_defaults
from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
from ray.llm._internal.serve.core.ingress.ingress import init as ingress_app
from ray.llm._internal.serve.utils.batcher import Batcher

__all__ = ["Batcher", "ingress_app", "maybe_apply_llm_deployment_config_defaults", "to_model_metadata"]
