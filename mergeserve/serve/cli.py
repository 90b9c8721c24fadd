"""``mergeserve serve``: registered into the main CLI by ``mergeserve.cli``."""

from __future__ import annotations

import argparse
import os
import sys

from mergeserve.serve.engine import (
    FP8_CPU_WEIGHT_MODES,
    FP8_KERNELS,
    MAX_LOGPROBS,
    MAX_N,
)
from mergeserve.serve.haproxy import MAX_BODY_BYTES


def _replicas(v: str) -> int | str:
    if v == "auto":
        return v
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {v!r}")
    return n


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve merged checkpoints with Ray Serve + vLLM (OpenAI-compatible API)")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="merged model directories")
    p.add_argument("--name", action="append", dest="names", help="model name per checkpoint (default: directory name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("MERGESERVE_API_KEY"), help="require this bearer token (default $MERGESERVE_API_KEY)")
    p.add_argument("--replicas", type=_replicas, default=1, help="replicas per model, or 'auto' (autoscaling 1-4)")
    p.add_argument("--address", help="join this Ray cluster ('auto' or ray://host:port) instead of starting a local one")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="default: GPU if the cluster has one")
    p.add_argument("--max-model-len", type=int, default=4096, help="context length (default 4096)")
    p.add_argument("--quantize-fp8", action="store_true", help="quantize bf16 weights to FP8 on load (where supported)")
    p.add_argument("--fp8-weights", choices=("auto", *FP8_CPU_WEIGHT_MODES), default="auto",
                   help="FP8 on a CPU without AMX: hold weights as bf16 (dequantized at load, fastest) or fp8 (half the "
                        "memory, slower); auto: bf16 when it fits in memory")
    p.add_argument("--fp8-kernel", choices=FP8_KERNELS, default="auto",
                   help="FP8 on CPU: auto = vLLM's AMX kernels where the CPU has AMX, else mergeserve's plugin; "
                        "mergeserve = the plugin everywhere")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="KV cache per engine on CPU (VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint (off by default)")
    p.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (faster start, slower decode)")
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics port of a local Ray (default 8080)")
    p.add_argument("--no-engine-metrics", dest="engine_metrics", action="store_false",
                   help="do not export vLLM's engine metrics (tokens, TTFT) through Ray: less overhead")
    p.add_argument("--max-body-kib", type=int, default=MAX_BODY_BYTES >> 10, metavar="KIB",
                   help=f"refuse request bodies over this size with 413 (default {MAX_BODY_BYTES >> 10})")
    p.add_argument("--max-n", type=int, default=MAX_N, help=f"most completions per request, n (default {MAX_N})")
    p.add_argument("--max-logprobs", type=int, default=MAX_LOGPROBS, help=f"most logprobs per token (default {MAX_LOGPROBS})")
    p.add_argument("--emit-config", metavar="FILE", help="write a Ray Serve config for `serve deploy` and exit")
    p.set_defaults(handler=_cmd_serve)


def _cmd_serve(a: argparse.Namespace) -> int:
    from mergeserve.serve.server import ServeOptions, emit_config, serve_forever

    opts = ServeOptions(
        checkpoints=a.checkpoints, names=a.names, host=a.host, port=a.port, api_key=a.api_key, replicas=a.replicas,
        address=a.address, device=a.device, max_model_len=a.max_model_len, quantize_fp8=a.quantize_fp8,
        kv_cache_gib=a.kv_cache_gib, trust_remote_code=a.trust_remote_code, enforce_eager=a.enforce_eager,
        metrics_port=a.metrics_port, engine_metrics=a.engine_metrics,
        fp8_weights=a.fp8_weights, fp8_kernel=a.fp8_kernel, max_body_bytes=a.max_body_kib << 10, max_n=a.max_n,
        max_logprobs=a.max_logprobs,
    )
    if a.emit_config:
        print(f"wrote {emit_config(opts, a.emit_config)} (deploy with: serve deploy {a.emit_config})")
        return 0
    serve_forever(opts, on_ready=lambda msg: print(msg, flush=True))
    print("stopped", file=sys.stderr)
    return 0
