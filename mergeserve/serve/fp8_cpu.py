"""A vLLM plugin: block-FP8 checkpoints served on any x86 CPU, not only on AMX ones.

vLLM 0.32 serves ``quant_method: fp8`` checkpoints with 128x128 weight blocks (what
``mergeserve merge --out-dtype fp8`` writes) on CPU only through AMX kernels (Sapphire Rapids and
newer). This module adds a W8A16 kernel after them in vLLM's kernel choice, so AMX machines keep
vLLM's own kernels and every other x86 CPU (Ice Lake, AMD EPYC) gets this one. The math is that
of vLLM's AMX W8A16 kernel: FP8 e4m3 weights times their float32 block scales, multiplied with
bf16 activations (no activation quantization).

Two ways to hold the weights (``MERGESERVE_FP8_CPU_WEIGHTS``, read in each engine process):

- ``bf16`` (default): dequantize once at load, then run vLLM's own CPU bf16 GEMM. Fastest, and
  numerically the same as serving the dequantized bf16 checkpoint; weights take bf16's memory.
- ``fp8``: keep the FP8 weights (half the memory) and dequantize one slab of rows at a time
  inside the matmul. Slower (each token dequantizes every weight again), so it pays only when
  bf16 weights would not fit: ``mergeserve serve`` picks it then (see engine.fp8_cpu_weights).

Registered as the entry point ``mergeserve-fp8-cpu`` in the ``vllm.general_plugins`` group, so
every vLLM process (Ray Serve replicas, vLLM's own server, offline ``LLM``) loads it. This is the
project's one adapter onto vLLM's kernel internals (``_POSSIBLE_FP8_BLOCK_KERNELS`` and
``Fp8BlockScaledMMLinearKernel``): tests/serve/test_fp8_cpu.py fails loudly if they move.
"""

from __future__ import annotations

import logging
import os
import platform

import torch

from mergeserve.merge.quantize import (
    E4M3_TO_BF16_BITS_SCALE,
    dequantize_fp8_block,
    e4m3_bits_as_bf16,
)
from mergeserve.serve.engine import FP8_CPU_WEIGHT_MODES, FP8_CPU_WEIGHTS_ENV, is_x86

logger = logging.getLogger("vllm.mergeserve_fp8_cpu")  # under vLLM's logger, so its handlers print it
# In ``fp8`` mode each matmul dequantizes this many weight elements at a time: a slab's float32
# copy (4 MiB) stays in a core's L2 cache while it is scaled, cast and multiplied.
SLAB_ELEMENTS = 1 << 20


_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


def weights_mode() -> str:
    mode = os.environ.get(FP8_CPU_WEIGHTS_ENV, "bf16").strip().lower() or "bf16"
    if mode not in FP8_CPU_WEIGHT_MODES:
        raise ValueError(f"{FP8_CPU_WEIGHTS_ENV}={mode!r}: expected one of {', '.join(FP8_CPU_WEIGHT_MODES)}")
    return mode


def blockwise_fp8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``x @ dequant(q, scale).T`` with the FP8 weights dequantized one slab of rows at a time.

    x: [M, K] bf16 activations; q: [N, K] float8_e4m3fn; scale: [ceil(N/bn), ceil(K/bk)] float32
    (block (bn, bk)); returns [M, N] in x's dtype. Peak extra memory: one slab, not the layer.
    """
    n, k = q.shape
    bn, bk = block
    rows = max(bn, SLAB_ELEMENTS // max(1, k) // bn * bn)
    s = (scale.float() * E4M3_TO_BF16_BITS_SCALE).repeat_interleave(bk, 1)[:, :k]  # [N/bn, K], expanded once
    out = torch.empty(n, x.shape[0], dtype=x.dtype)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w = e4m3_bits_as_bf16(q[r0:r1]).float()
        w.mul_(s[r0 // bn : -(-r1 // bn)].repeat_interleave(bn, 0)[: r1 - r0])
        torch.mm(w.to(x.dtype), x.t(), out=out[r0:r1])
    return out.t().contiguous()  # vLLM's attention splits q/k/v out of it as contiguous views


def _kernel_class():
    """Built on first use: vLLM's kernel modules import only inside a vLLM process."""
    from vllm.model_executor.kernels.linear.scaled_mm.BlockScaledMMLinearKernel import (
        Fp8BlockScaledMMLinearKernel,
    )
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.model_executor.utils import replace_parameter
    from vllm.platforms import current_platform

    class MergeserveCpuFp8BlockKernel(Fp8BlockScaledMMLinearKernel):
        """W8A16 block-FP8 linear for x86 CPUs without AMX (see the module docstring)."""

        apply_input_quant = False  # bf16 activations, as in vLLM's AMX W8A16 kernel

        @classmethod
        def is_supported(cls, compute_capability: int | None = None) -> tuple[bool, str | None]:
            if not current_platform.is_cpu():
                return False, "requires the CPU platform."
            if not is_x86():
                return False, f"requires an x86-64 CPU (this one is {platform.machine()})."
            return True, None

        @classmethod
        def can_implement(cls, config) -> tuple[bool, str | None]:
            ok, reason = super().can_implement(config)
            if not ok:
                return ok, reason
            gs = config.weight_quant_key.scale.group_shape
            if gs.row <= 0 or gs.col <= 0:
                return False, f"needs 2-D weight blocks, got {gs.row}x{gs.col}."
            if config.out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
                return False, f"cannot output {config.out_dtype}."
            return True, None

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            params = self._get_layer_params(layer)
            block = (self.weight_group_shape.row, self.weight_group_shape.col)
            self.mode = weights_mode()
            if self.mode == "bf16":
                w = dequantize_fp8_block(params.weight.data, params.block_scale.data.float(), self.config.out_dtype, block)
                replace_parameter(layer, params.WEIGHT, torch.nn.Parameter(w, requires_grad=False))
                # vLLM's own CPU GEMM for bf16 weights: the same math as serving a bf16 checkpoint.
                dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
            else:
                scale = params.block_scale.data.float().contiguous()
                replace_parameter(layer, params.block_scale_attr, torch.nn.Parameter(scale, requires_grad=False))
                self.block = block
            _log_once(f"mergeserve: block-FP8 linear layers served by {type(self).__name__} (weights held as {self.mode})")

        def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
            if self.mode == "bf16":
                return layer.cpu_linear(x, layer.weight, bias)
            params = self._get_layer_params(layer)
            x2 = x.reshape(-1, x.shape[-1])
            out = blockwise_fp8_linear(x2, params.weight, params.block_scale, self.block)
            if bias is not None:
                out = out + bias
            return out.to(self.config.out_dtype).reshape(*x.shape[:-1], out.shape[-1])

        def apply_block_scaled_mm(self, A, B, As, Bs):  # noqa: N803 - vLLM's names
            raise NotImplementedError("MergeserveCpuFp8BlockKernel overrides apply_weights")

    return MergeserveCpuFp8BlockKernel


def register() -> None:
    """Entry point (``vllm.general_plugins``): append the kernel to vLLM's CPU FP8 block kernels."""
    from vllm.model_executor.kernels import linear
    from vllm.platforms import PlatformEnum

    kernels = linear._POSSIBLE_FP8_BLOCK_KERNELS.setdefault(PlatformEnum.CPU, [])
    if not any(k.__name__ == "MergeserveCpuFp8BlockKernel" for k in kernels):
        kernels.append(_kernel_class())
