"""Block-quantized FP8 (e4m3) weights, the format vLLM serves on both CPU and Hopper GPUs.

Layout (DeepSeek-V3 / vLLM ``quant_method: fp8`` with ``weight_block_size: [128, 128]``):

- ``W``: [rows, cols] -> ``q``: [rows, cols] float8_e4m3fn
- ``weight_scale_inv``: [ceil(rows / 128), ceil(cols / 128)] float32, one scale per block
- dequantized ``W ~= q * scale`` broadcast over each 128x128 block, with
  ``scale = amax(|block|) / 448`` (448 = largest finite e4m3 value).

Per-element error is at most half an e4m3 step of its block: e4m3 has 3 mantissa bits, so the
relative error of an element near the block's amax is <= 2**-4 (6.25%); smaller elements can lose
more relative precision, and elements below ``amax * 2**-9 / 448`` flush to zero. See the FP8
formats paper, https://arxiv.org/abs/2209.05433.
"""

from __future__ import annotations

import torch

FP8_BLOCK = "fp8_block"
BLOCK = 128
E4M3_MAX = 448.0


def fp8_scale_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    rows, cols = shape
    return (-(-rows // BLOCK), -(-cols // BLOCK))


def is_fp8_target(name: str, shape: tuple[int, ...], layer: int | None) -> bool:
    """Linear weights of decoder layers: 2-D ``*.weight`` inside a layer (norms are 1-D)."""
    return layer is not None and name.endswith(".weight") and len(shape) == 2


def quantize_fp8_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, cols] float tensor -> (float8_e4m3fn [rows, cols], float32 scales [R, C])."""
    rows, cols = w.shape
    R, C = fp8_scale_shape((rows, cols))
    pr, pc = R * BLOCK - rows, C * BLOCK - cols
    x = w.float()
    if pr or pc:
        x = torch.nn.functional.pad(x, (0, pc, 0, pr))
    blocks = x.view(R, BLOCK, C, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    q = q.view(R * BLOCK, C * BLOCK)[:rows, :cols].contiguous()
    return q, scale.contiguous()


def dequantize_fp8_block(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, block: tuple[int, int] = (BLOCK, BLOCK)
) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_block` (up to rounding): [rows, cols] e4m3 and
    [ceil(rows / bn), ceil(cols / bk)] float32 scales -> [rows, cols] ``dtype``, computed in float32."""
    rows, cols = q.shape
    bn, bk = block
    s = (scale.float() * E4M3_TO_BF16_BITS_SCALE).repeat_interleave(bn, 0)[:rows].repeat_interleave(bk, 1)[:, :cols]
    return (e4m3_bits_as_bf16(q).float() * s).to(dtype)


# e4m3_bits_as_bf16(q) reads as q * 2**-120: the exponent field keeps e4m3's bias of 7, bf16's is 127.
E4M3_TO_BF16_BITS_SCALE = 2.0**120


def e4m3_bits_as_bf16(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn [..] -> bf16 [..] equal to ``q * 2**-120`` exactly, by moving bits.

    e4m3 (sign, 4 exponent bits, 3 mantissa bits) fits inside bf16 (8 exponent bits, 7 mantissa
    bits): shifting the 7 low bits left by 4 keeps the mantissa, and the exponent field then reads
    120 too small, subnormals included. Integer shifts are vectorised in eager torch, where torch's
    own float8 cast converts element by element (tens of times slower on CPU). Multiply by
    ``E4M3_TO_BF16_BITS_SCALE`` in float32 to get ``q``. e4m3fn's NaN code does not map to NaN:
    merged checkpoints never hold one (the merge refuses non-finite tensors).
    """
    i = q.view(torch.uint8).to(torch.int16)
    return (((i & 0x80) << 8) | ((i & 0x7F) << 4)).view(torch.bfloat16)
