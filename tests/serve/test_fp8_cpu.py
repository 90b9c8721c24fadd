"""mergeserve's vLLM plugin for block-FP8 on CPUs without AMX (mergeserve/serve/fp8_cpu.py).

Unit level, without an engine: the bit conversion against torch's own cast, both ways of holding
the weights against dequantize-then-matmul, and vLLM's real kernel chooser picking the plugin's
kernel after its AMX kernels. The engine level (served FP8 against its dequantized bf16 copy) is
in test_serve.py. These tests also guard the adapter: they fail, naming the vLLM symbol, when
vLLM's kernel internals move.
"""

from __future__ import annotations

import pytest
import torch

from mergeserve.merge.quantize import (
    E4M3_TO_BF16_BITS_SCALE,
    dequantize_fp8_block,
    e4m3_bits_as_bf16,
    quantize_fp8_block,
)


def test_bit_conversion_equals_torchs_cast_for_every_code():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    q = codes.view(torch.float8_e4m3fn)
    ref = q.to(torch.float32)
    got = e4m3_bits_as_bf16(q).float() * E4M3_TO_BF16_BITS_SCALE
    finite = ~torch.isnan(ref)
    assert int(finite.sum()) == 254  # e4m3fn: one NaN code per sign
    assert torch.equal(got[finite], ref[finite])  # subnormals, zeros and both signs included


def test_dequantize_matches_the_definition():
    torch.manual_seed(0)
    w = torch.randn(300, 200) * 0.05
    q, s = quantize_fp8_block(w)
    ref = q.to(torch.float32) * s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    assert torch.equal(dequantize_fp8_block(q, s), ref)
    assert torch.equal(dequantize_fp8_block(q, s, torch.bfloat16), ref.to(torch.bfloat16))


@pytest.mark.parametrize("shape", [(256, 128), (384, 4096), (200, 300)])
def test_blockwise_matmul_equals_dequantize_then_matmul(shape):
    from mergeserve.serve.fp8_cpu import blockwise_fp8_linear

    torch.manual_seed(1)
    q, s = quantize_fp8_block(torch.randn(*shape) * 0.05)
    x = torch.randn(3, shape[1], dtype=torch.bfloat16)
    ref = x.float() @ dequantize_fp8_block(q, s, torch.bfloat16).float().t()
    got = blockwise_fp8_linear(x, q, s, (128, 128))
    assert got.shape == (3, shape[0]) and got.dtype == torch.bfloat16 and got.is_contiguous()
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)


def _layer_config():
    """vLLM's description of a block-FP8 linear layer, as Fp8LinearMethod builds it."""
    from vllm.model_executor.kernels.linear import FP8ScaledMMLinearLayerConfig
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        GroupShape,
        create_fp8_quant_key,
        kFp8Dynamic128Sym,
    )

    return FP8ScaledMMLinearLayerConfig(
        weight_quant_key=create_fp8_quant_key(static=True, group_shape=GroupShape(128, 128)),
        activation_quant_key=kFp8Dynamic128Sym, input_dtype=torch.bfloat16, out_dtype=torch.bfloat16,
        weight_shape=(256, 384),
    )


def test_plugin_registers_after_vllms_amx_kernels():
    from vllm.model_executor.kernels import linear
    from vllm.platforms import PlatformEnum

    from mergeserve.serve.fp8_cpu import register

    assert hasattr(linear, "_POSSIBLE_FP8_BLOCK_KERNELS"), "vLLM moved _POSSIBLE_FP8_BLOCK_KERNELS (serve/fp8_cpu.py)"
    register()
    register()  # vLLM may load plugins more than once per process
    names = [k.__name__ for k in linear._POSSIBLE_FP8_BLOCK_KERNELS[PlatformEnum.CPU]]
    assert names.count("MergeserveCpuFp8BlockKernel") == 1
    assert names.index("MergeserveCpuFp8BlockKernel") == len(names) - 1
    assert {"CPUFp8BlockScaledMMKernel", "CPUFp8W8A8BlockScaledMMKernel"} <= set(names[:-1]), names


def test_vllms_chooser_picks_the_plugin_without_amx_kernels(monkeypatch):
    """vLLM's own selection code, with its AMX kernels disabled as on a CPU without AMX."""
    from vllm.model_executor.kernels import linear

    from mergeserve.serve.engine import VLLM_CPU_FP8_KERNELS
    from mergeserve.serve.fp8_cpu import register

    register()
    monkeypatch.setenv("VLLM_DISABLED_KERNELS", ",".join(VLLM_CPU_FP8_KERNELS))
    chosen = linear.choose_scaled_mm_linear_kernel(
        config=_layer_config(), possible_kernels=linear._POSSIBLE_FP8_BLOCK_KERNELS, quantization="fp8_block_w8a8"
    )
    assert chosen.__name__ == "MergeserveCpuFp8BlockKernel"


@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_kernel_on_a_layer_equals_the_dequantized_weights(mode, monkeypatch):
    """process_weights_after_loading + apply_weights on a module laid out as Fp8LinearMethod lays
    it out (weight [N, K] e4m3, weight_scale_inv [N/128, K/128] float32)."""
    from vllm.config import VllmConfig, set_current_vllm_config

    from mergeserve.serve.engine import FP8_CPU_WEIGHTS_ENV
    from mergeserve.serve.fp8_cpu import _kernel_class

    monkeypatch.setenv(FP8_CPU_WEIGHTS_ENV, mode)
    torch.manual_seed(2)
    q, s = quantize_fp8_block(torch.randn(256, 384) * 0.05)
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(q, requires_grad=False)
    layer.weight_scale_inv = torch.nn.Parameter(s, requires_grad=False)
    layer.input_scale = None
    bias = torch.randn(256, dtype=torch.bfloat16)
    layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)  # vLLM may re-type it for its GEMM
    x = torch.randn(2, 5, 384, dtype=torch.bfloat16)
    with set_current_vllm_config(VllmConfig()):  # as inside an engine
        kernel = _kernel_class()(_layer_config())
        kernel.process_weights_after_loading(layer)
        got = kernel.apply_weights(layer, x, layer.bias)
    ref = torch.nn.functional.linear(x.float(), dequantize_fp8_block(q, s, torch.bfloat16).float(), bias.float())
    assert got.shape == (2, 5, 256) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=5e-2)
    if mode == "fp8":
        assert layer.weight.dtype == torch.float8_e4m3fn  # still half the memory of bf16


_ENGINE = """
import json, os, sys
os.environ["VLLM_DISABLED_KERNELS"] = "CPUFp8W8A8BlockScaledMMKernel,CPUFp8BlockScaledMMKernel"  # the plugin, even on AMX
os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
os.environ["MERGESERVE_FP8_CPU_WEIGHTS"] = sys.argv[2]
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], max_model_len=512, enforce_eager=True)
    outs = llm.generate(["def add(a, b):", "The quick brown", "import os\\n"], SamplingParams(max_tokens=12, temperature=0))
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


@pytest.mark.slow
def test_fp8_weights_kept_fp8_in_a_real_engine_give_the_tokens_of_bf16_weights(merged_tiny, tmp_path):
    """The engine with the plugin holding FP8 weights (dequantized slab by slab in the matmul)
    generates the greedy tokens it generates with the weights dequantized at load."""
    import json
    import subprocess
    import sys

    script = tmp_path / "engine.py"
    script.write_text(_ENGINE)
    tokens = {}
    for mode in ("fp8", "bf16"):
        p = subprocess.run([sys.executable, str(script), str(merged_tiny["fp8"]), mode], capture_output=True, text=True, timeout=600)
        lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        assert p.returncode == 0 and lines, p.stderr[-3000:]
        tokens[mode] = json.loads(lines[-1].removeprefix("RESULT "))
    assert tokens["fp8"] == tokens["bf16"] and all(len(t) == 12 for t in tokens["fp8"])
