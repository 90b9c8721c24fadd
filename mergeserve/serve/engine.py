"""vLLM engine settings for one merged checkpoint, as a ``ray.serve.llm`` LLMConfig (a plain dict).

Defaults follow the mission: a 4096-token context, FP8 weights where the checkpoint has them
(block-quantized e4m3, as ``mergeserve merge --out-dtype fp8`` writes), CPU or GPU chosen from
the cluster's resources, and engine memory set explicitly (``VLLM_CPU_KVCACHE_SPACE`` on CPU)
instead of vLLM's fraction-of-memory default, which on CPU means a fraction of all RAM.

Everything is checked before Ray starts: the directory, its ``config.json``, the weights, and
whether this hardware can run FP8 at all (vLLM 0.32's CPU FP8 kernels need Intel AMX).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeserve.errors import InputError, UnsupportedError

MAX_MODEL_LEN = 4096
# Ray Serve LLM sends a stream's tokens in batches, one message per interval per hop (LLM
# replica -> ingress -> proxy). Ray's default is 50 ms; on a 2-core CPU host each message costs
# the engine CPU: at 16 streams, 200 ms gave 55% of vLLM's own server's tokens/s where 50 ms
# gave 38% (benchmarks/serve_bench.py, side by side). The first chunk is not delayed
# (llm_server.py), so time to first token does not depend on it; a stream's later text arrives
# up to this much later, in larger pieces.
STREAM_INTERVAL_MS = 200.0


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    name: str
    fp8: bool  # block-FP8 weights (quantization_config.quant_method == "fp8")
    max_positions: int


def inspect_checkpoint(path: str | Path, name: str | None = None) -> Checkpoint:
    """Validate a checkpoint directory; ``name`` defaults to the directory name."""
    p = Path(path).expanduser().absolute()
    if not p.is_dir():
        raise InputError(f"checkpoint {path}: not a directory")
    cfg_path = p / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise InputError(f"checkpoint {path}: no config.json (is this a model directory?)") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{cfg_path}: unreadable ({e})") from None
    if not list(p.glob("*.safetensors")):
        raise InputError(f"checkpoint {path}: no *.safetensors weights")
    if not (p / "tokenizer.json").exists() and not (p / "tokenizer.model").exists():
        raise InputError(f"checkpoint {path}: no tokenizer (tokenizer.json or tokenizer.model)")
    q = cfg.get("quantization_config") or {}
    return Checkpoint(p, name or p.name, q.get("quant_method") == "fp8", int(cfg.get("max_position_embeddings", MAX_MODEL_LEN)))


def cpu_has_amx() -> bool:
    """vLLM's CPU FP8 matmul kernels (block FP8, online fp8_per_block) need AMX tiles.

    Asks torch the way vLLM does (``torch.cpu._is_amx_tile_supported``), so that our refusal
    and vLLM's kernel choice agree; /proc/cpuinfo is the fallback.
    """
    try:
        import torch

        return bool(torch.cpu._is_amx_tile_supported())
    except (ImportError, AttributeError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            return any("amx_tile" in line for line in f if line.startswith("flags"))
    except OSError:
        return False


def check_fp8_support(ckpt: Checkpoint, accelerator: str, quantize: bool) -> None:
    """Refuse, with the reason, FP8 this hardware cannot run (instead of a crash in the engine)."""
    if accelerator == "gpu" or not (ckpt.fp8 or quantize):
        return
    if not cpu_has_amx():
        what = "its FP8 block weights" if ckpt.fp8 else "FP8 quantization on load"
        raise UnsupportedError(
            f"checkpoint {ckpt.name}: {what} cannot run on this CPU: vLLM's CPU FP8 kernels need Intel AMX "
            "(Sapphire Rapids or newer) and this CPU has none. Serve a bf16 merge here (mergeserve merge "
            "without --out-dtype fp8), or serve this checkpoint on an AMX CPU or a GPU."
        )


def llm_config(
    ckpt: Checkpoint,
    *,
    accelerator: str = "cpu",
    max_model_len: int = MAX_MODEL_LEN,
    quantize: bool = False,
    kv_cache_gib: int = 1,
    replicas: int | str = 1,
    trust_remote_code: bool = False,
    enforce_eager: bool = False,
    engine_metrics: bool = True,
    stream_interval_ms: float = STREAM_INTERVAL_MS,
) -> dict[str, Any]:
    """The LLMConfig (as a dict: it also goes into ``--emit-config`` YAML) for one checkpoint."""
    if not stream_interval_ms >= 0:  # also NaN
        raise InputError(f"--stream-interval-ms must be >= 0 milliseconds, got {stream_interval_ms}")
    if max_model_len > ckpt.max_positions:
        raise InputError(f"checkpoint {ckpt.name}: --max-model-len {max_model_len} exceeds its {ckpt.max_positions} positions")
    engine: dict[str, Any] = {
        "max_model_len": max_model_len,
        "trust_remote_code": trust_remote_code,
        "enforce_eager": enforce_eager,
    }
    if not ckpt.fp8:
        engine["dtype"] = "bfloat16"
        if quantize:  # FP8 on load: per-block on CPU (the only FP8 path with a CPU kernel), per-tensor on GPU
            engine["quantization"] = "fp8" if accelerator == "gpu" else "fp8_per_block"
    env = {"HF_HUB_OFFLINE": "1"}
    if accelerator == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib))  # vLLM parses an integer number of GiB
    # A replica whose engine died is found by its health check and replaced: check every 2 s
    # rather than Serve's 10 s, so fewer requests meet a dead engine.
    deployment: dict[str, Any] = {"health_check_period_s": 2, "health_check_timeout_s": 30}
    if replicas == "auto":
        deployment["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}
    else:
        deployment["num_replicas"] = int(replicas)
    return {
        "model_loading_config": {"model_id": ckpt.name, "model_source": str(ckpt.path)},
        "accelerator_config": {"kind": accelerator},
        "engine_kwargs": engine,
        "runtime_env": {"env_vars": env},
        "deployment_config": deployment,
        "log_engine_metrics": engine_metrics,
        "experimental_configs": {"stream_batching_interval_ms": stream_interval_ms},
    }
