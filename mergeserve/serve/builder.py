"""The Serve applications of ``mergeserve serve``: one per model, each model's LLMServer its own ingress.

Each model's replica serves vLLM's OpenAI app directly (Ray's direct ingress); HAProxy in front
(serve/haproxy.py) checks the key and routes each request by its ``model`` to that model's
application at ``/_m/<app>``. The OpenAI layer (routes, streaming, usage, 4xx for bad requests)
is vLLM's own. :func:`build_model_app` takes a plain dict so that ``serve deploy`` can call it
from a config file (``import_path: mergeserve.serve.builder:build_model_app``).
"""

from __future__ import annotations

from typing import Any


def build_model_app(args: dict[str, Any]):
    """``args``: ``{"llm_config": LLMConfig dict}`` -> the model's Serve Application."""
    from ray.serve.llm import LLMConfig

    from mergeserve.serve.ray_llm_adapter import direct_ingress_app

    return direct_ingress_app(LLMConfig.model_validate(args["llm_config"]))
