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

from mergeserve.merge import kernels

FP8_BLOCK = "fp8_block"
BLOCK = 128
E4M3_MAX = 448.0


def fp8_scale_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    rows, cols = shape
    return (-(-rows // BLOCK), -(-cols // BLOCK))


def is_fp8_target(name: str, shape: tuple[int, ...], layer: int | None) -> bool:
    """Linear weights of decoder layers: 2-D ``*.weight`` inside a layer (norms are 1-D)."""
    return layer is not None and name.endswith(".weight") and len(shape) == 2


# Columns of one tile of the quantizer: 128 rows x 2048 float32 columns = 1 MiB, cache-resident.
TILE_COLS = 16 * BLOCK


def quantize_fp8_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, cols] float tensor -> (float8_e4m3fn [rows, cols], float32 scales [R, C]).

    A contiguous bfloat16 tensor on the CPU goes through :func:`mergeserve.merge.kernels.quantize_e4m3_blocks`
    (the same bits). Otherwise: one pass per tile of 128 rows x TILE_COLS columns (whole 128 x 128 blocks), in two reused
    float32 buffers that stay in cache: upcast, |x|, each block's amax and scale, divide, clamp,
    cast into the output. These are the operations of the whole-tensor form (upcast, pad with
    zeros, amax, divide, clamp, cast), element by element in the same order, so the bits are the
    same (tests/merge/test_outputs.py); it costs about a third of the CPU, without the five
    tensor-sized temporaries.
    """
    if kernels.fusable(w):  # one read per block for the amax, one to scale and cast (kernels.c)
        return kernels.quantize_e4m3_blocks(w)
    rows, cols = w.shape
    R, C = fp8_scale_shape((rows, cols))
    q = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=w.device)
    scale = torch.empty((R, C), dtype=torch.float32, device=w.device)
    width = min(TILE_COLS, C * BLOCK)
    x = torch.empty((BLOCK, width), dtype=torch.float32, device=w.device)
    ax = torch.empty_like(x)
    for r in range(R):
        r0, r1 = r * BLOCK, min(rows, (r + 1) * BLOCK)
        for c0 in range(0, C * BLOCK, width):
            c1 = min(cols, c0 + width)
            nb = -(-(c1 - c0) // BLOCK)  # blocks in this tile
            tile, absd = x[: r1 - r0, : nb * BLOCK], ax[: r1 - r0, : nb * BLOCK]
            tile[:, : c1 - c0].copy_(w[r0:r1, c0:c1])
            if c1 - c0 < nb * BLOCK:
                tile[:, c1 - c0 :].zero_()  # the padding of the last block column
            amax = torch.abs(tile, out=absd).view(r1 - r0, nb, BLOCK).amax(dim=(0, 2))
            s = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
            scale[r, c0 // BLOCK : c0 // BLOCK + nb] = s
            tile.view(r1 - r0, nb, BLOCK).div_(s[None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX)
            q[r0:r1, c0:c1].copy_(tile[:, : c1 - c0])
    return q, scale


def quantize_fp8_block_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole-tensor form of :func:`quantize_fp8_block` (the tests hold the two equal)."""
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
