"""vLLM engine settings for one merged checkpoint, as a ``ray.serve.llm`` LLMConfig (a plain dict).

Defaults follow the mission: a 4096-token context, FP8 weights where the checkpoint has them
(block-quantized e4m3, as ``mergeserve merge --out-dtype fp8`` writes), CPU or GPU chosen from
the cluster's resources, and engine memory set explicitly (``VLLM_CPU_KVCACHE_SPACE`` on CPU)
instead of vLLM's fraction-of-memory default, which on CPU means a fraction of all RAM.

Everything is checked before Ray starts: the directory, its ``config.json``, the weights (an FP8
checkpoint's scales against its weights), and whether this hardware can run FP8 at all: GPUs and
x86-64 CPUs can (AMX CPUs with vLLM's own kernels, the others with mergeserve's plugin,
:mod:`mergeserve.serve.fp8_cpu`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeserve.errors import InputError, UnsupportedError

MAX_MODEL_LEN = 4096
# Request bounds, checked by vLLM (400 with an OpenAI error body above them): parallel samples per
# request (`n`; a request of n=256 would take every sequence slot) and logprobs per token.
MAX_N = 16
MAX_LOGPROBS = 20
X86_MACHINES = ("x86_64", "amd64", "i686", "i386")
# What an engine process holds besides weights and KV cache (torch, vLLM, Ray's replica): about
# 1.5 GiB seen per CPU engine here; 2 GiB leaves room.
ENGINE_OVERHEAD_BYTES = 2 << 30
# Dequantize FP8 weights to bf16 only while that leaves a quarter of the available memory free.
FP8_MEMORY_SHARE = 0.75
# vLLM's own CPU FP8 block kernels (AMX); `--fp8-kernel mergeserve` disables them so that the
# plugin's kernel serves even on AMX machines (to compare, and to test the plugin there).
VLLM_CPU_FP8_KERNELS = ("CPUFp8W8A8BlockScaledMMKernel", "CPUFp8BlockScaledMMKernel")
FP8_KERNELS = ("auto", "mergeserve")
# Read by the plugin in each engine process: how it holds FP8 weights (see fp8_cpu_weights).
FP8_CPU_WEIGHTS_ENV = "MERGESERVE_FP8_CPU_WEIGHTS"
FP8_CPU_WEIGHT_MODES = ("bf16", "fp8")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    name: str
    fp8: bool  # block-FP8 weights (quantization_config.quant_method == "fp8")
    max_positions: int
    weight_bytes: int = 0  # of every tensor, as stored
    fp8_elements: int = 0  # FP8 weight elements (each becomes 2 bytes when dequantized to bf16)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"checkpoint {path.parent}: no {path.name} (is this a model directory?)") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable {what} ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: {what} must be a JSON object")
    return data


def _fp8_block(cfg: dict, cfg_path: Path) -> tuple[int, int]:
    block = (cfg.get("quantization_config") or {}).get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise InputError(f"{cfg_path}: quantization_config.weight_block_size must be two positive integers, got {block!r}")
    return block[0], block[1]


def _check_weights(p: Path, block: tuple[int, int] | None) -> tuple[int, int]:
    """Every shard's header; for FP8, each e4m3 weight's ``weight_scale_inv`` against its shape.
    Returns (bytes of all tensors, FP8 weight elements)."""
    from mergeserve.merge.reader import read_header

    tensors = {}
    for f in sorted(p.glob("*.safetensors")):
        tensors.update(read_header(f))
    total = sum(t.nbytes for t in tensors.values())
    fp8 = {n: t for n, t in tensors.items() if t.dtype == "F8_E4M3"}
    if block is None:
        if fp8:
            raise InputError(f"checkpoint {p}: tensor {next(iter(fp8))!r} is FP8 but config.json has no fp8 quantization_config")
        return total, 0
    for name, t in fp8.items():
        scale_name = name.removesuffix(".weight") + ".weight_scale_inv"
        scale = tensors.get(scale_name)
        if len(t.shape) != 2 or scale is None:
            raise InputError(f"checkpoint {p}: FP8 tensor {name!r} has no {scale_name!r} (or is not a 2-D weight)")
        want = (-(-t.shape[0] // block[0]), -(-t.shape[1] // block[1]))
        if scale.shape != want or scale.dtype not in ("F32", "BF16"):
            raise InputError(
                f"checkpoint {p}: {scale_name!r} is {scale.dtype}{list(scale.shape)}, expected float32 {list(want)} "
                f"for weight {list(t.shape)} in {block[0]}x{block[1]} blocks"
            )
    return total, sum(t.nbytes for t in fp8.values())


def inspect_checkpoint(path: str | Path, name: str | None = None) -> Checkpoint:
    """Validate a checkpoint directory; ``name`` defaults to the directory name."""
    p = Path(path).expanduser().absolute()
    if not p.is_dir():
        raise InputError(f"checkpoint {path}: not a directory")
    cfg_path = p / "config.json"
    cfg = _read_json(cfg_path, "model config")
    if not list(p.glob("*.safetensors")):
        raise InputError(f"checkpoint {path}: no *.safetensors weights")
    if not (p / "tokenizer.json").exists() and not (p / "tokenizer.model").exists():
        raise InputError(f"checkpoint {path}: no tokenizer (tokenizer.json or tokenizer.model)")
    q = cfg.get("quantization_config") or {}
    fp8 = isinstance(q, dict) and q.get("quant_method") == "fp8"
    total, fp8_elements = _check_weights(p, _fp8_block(cfg, cfg_path) if fp8 else None)
    positions = cfg.get("max_position_embeddings", MAX_MODEL_LEN)
    if not isinstance(positions, int) or isinstance(positions, bool) or positions < 1:
        raise InputError(f"{cfg_path}: max_position_embeddings must be a positive integer, got {positions!r}")
    return Checkpoint(p, name or p.name, fp8, positions, total, fp8_elements)


def is_x86() -> bool:
    import platform

    return platform.machine().lower() in X86_MACHINES


def check_fp8_support(ckpt: Checkpoint, accelerator: str, quantize: bool) -> None:
    """Refuse, with the reason, FP8 this hardware cannot run (instead of a crash in the engine).

    GPUs run it with vLLM's kernels; x86-64 CPUs with vLLM's AMX kernels or, without AMX, with
    mergeserve's plugin (serve/fp8_cpu.py). Other CPUs (Arm, POWER) have neither."""
    if accelerator == "gpu" or not (ckpt.fp8 or quantize) or is_x86():
        return
    import platform

    what = "its FP8 block weights" if ckpt.fp8 else "FP8 quantization on load"
    raise UnsupportedError(
        f"checkpoint {ckpt.name}: {what} cannot run on this {platform.machine()} CPU: FP8 serves on GPUs and x86-64 CPUs "
        "only. Serve a bf16 merge here (mergeserve merge without --out-dtype fp8)."
    )


def fp8_cpu_weights(ckpts: list[Checkpoint], requested: str, kv_cache_gib: int, available_bytes: int | None = None) -> str:
    """How mergeserve's CPU kernel holds FP8 weights: ``bf16`` (dequantized at load: fastest)
    unless every engine's weights with bf16 for the FP8 ones, plus their KV caches and
    ``ENGINE_OVERHEAD_BYTES`` each, would not fit in ``FP8_MEMORY_SHARE`` of the available memory;
    then ``fp8`` (half the memory, slower). ``requested`` other than ``auto`` is kept."""
    if requested != "auto":
        return requested
    if available_bytes is None:
        import psutil

        available_bytes = psutil.virtual_memory().available
    need = sum(c.weight_bytes + c.fp8_elements + kv_cache_gib * 2**30 + ENGINE_OVERHEAD_BYTES for c in ckpts)
    return "bf16" if need <= FP8_MEMORY_SHARE * available_bytes else "fp8"


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
    fp8_weights: str = "bf16",
    fp8_kernel: str = "auto",
    max_n: int = MAX_N,
    max_logprobs: int = MAX_LOGPROBS,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The LLMConfig (as a dict: it also goes into ``--emit-config`` YAML) for one checkpoint.

    ``fp8_weights`` (bf16 | fp8) and ``fp8_kernel`` (auto | mergeserve) apply to FP8 on CPU;
    ``env``: Ray Serve's switches for the replica (serve/ingress.py)."""
    if max_model_len > ckpt.max_positions:
        raise InputError(f"checkpoint {ckpt.name}: --max-model-len {max_model_len} exceeds its {ckpt.max_positions} positions")
    engine: dict[str, Any] = {
        "max_model_len": max_model_len,
        "trust_remote_code": trust_remote_code,
        "enforce_eager": enforce_eager,
        "max_logprobs": max_logprobs,
        "disable_fastapi_docs": True,  # no /docs, /openapi.json on the replica's port
    }
    if not ckpt.fp8:
        engine["dtype"] = "bfloat16"
        if quantize:  # FP8 on load: per-block on CPU (the only FP8 path with a CPU kernel), per-tensor on GPU
            engine["quantization"] = "fp8" if accelerator == "gpu" else "fp8_per_block"
    env = {**(env or {}), "HF_HUB_OFFLINE": "1", "VLLM_MAX_N_SEQUENCES": str(max_n)}
    if accelerator == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib))  # vLLM parses an integer number of GiB
        if ckpt.fp8 or quantize:
            env[FP8_CPU_WEIGHTS_ENV] = fp8_weights
            if fp8_kernel == "mergeserve":
                env["VLLM_DISABLED_KERNELS"] = ",".join(VLLM_CPU_FP8_KERNELS)
    # A replica whose engine died ends itself (serve/ray_llm_adapter.py); the health check, every
    # 2 s rather than Serve's 10 s, is the backstop for a replica that could not.
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
        # a local directory: no per-node download step (see serve/ray_llm_adapter.py)
        "callback_config": {"callback_class": "mergeserve.serve.ray_llm_adapter:LocalCheckpoint"},
    }
