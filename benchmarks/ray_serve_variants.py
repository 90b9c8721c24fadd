"""Ray Serve's own request paths for one checkpoint, for benchmarks/serve_bench.py to compare
against ``mergeserve serve`` and vLLM's own server (issue: which path is fastest).

    .venv/bin/python benchmarks/ray_serve_variants.py CHECKPOINT --port P --name NAME --mode MODE

Modes, all with Ray's public ``build_openai_app`` and the same engine settings as mergeserve:
- ``proxy``: Serve's Python HTTP proxy -> OpenAI ingress replica -> LLMServer replica (Ray's default);
- ``haproxy``: HAProxy in place of the Python proxy, same ingress and LLMServer (RAY_SERVE_ENABLE_HA_PROXY);
- ``haproxy-direct``: HAProxy -> Ray's request router -> LLMServer serving vLLM's app
  (RAY_SERVE_ENABLE_HA_PROXY + RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING: Ray's own fast path).
Runs until SIGTERM, then shuts Serve and Ray down.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import threading

MODES = {
    "proxy": {},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
    "haproxy-direct": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--mode", choices=sorted(MODES), required=True)
    a = ap.parse_args()
    from mergeserve.serve.ingress import free_port

    env = {**MODES[a.mode], "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
           "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()), "RAY_SERVE_HAPROXY_NBTHREAD": "1"}
    from mergeserve.serve.ingress import new_run_dir

    run = new_run_dir()  # short: HAProxy's socket paths are limited
    env.update({"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{run}/haproxy.cfg", "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{run}/admin.sock",
                "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": run, "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{run}/state",
                "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{run}/metrics.sock"})
    os.environ.update(env)
    import ray
    from ray import serve
    from ray.serve.llm import build_openai_app

    from mergeserve.serve.engine import inspect_checkpoint, llm_config

    cfg = llm_config(inspect_checkpoint(a.checkpoint, a.name), env={**env, "VLLM_CPU_KVCACHE_SPACE": "1"})
    stop = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.set())
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    for s in (signal.SIGINT, signal.SIGTERM):  # ray.init installs its own
        signal.signal(s, lambda *_: stop.set())
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": a.port})
        serve.run(build_openai_app({"llm_configs": [cfg]}), name="variant", route_prefix="/", blocking=False)
        print("started", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
