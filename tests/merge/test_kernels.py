"""The fused bfloat16 loops (merge/kernels.c) against the torch expressions they replace, bit for
bit; the slerp and linear that use them against mergekit 0.1.5's own code on tensors of several
chunks; and the torch fallback (no C compiler) against the loops."""

from __future__ import annotations

import pytest
import torch

from mergeserve.merge import kernels
from mergeserve.merge.methods.slerp import CHUNK, slerp_pair, slerp_pairs

# Odd sizes, so the compiled loops' vector bodies and scalar tails are both exercised.
N = 3 * CHUNK + 1237


def _bf16(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16()


def _specials() -> torch.Tensor:
    """Values where rounding to bfloat16 is delicate: ties, subnormals, infinities, NaN."""
    return torch.tensor([0.0, -0.0, 1e-40, -1e-40, 3.0e38, -3.0e38, float("inf"), float("-inf"), float("nan"),
                         1.00390625, 1.01171875, 65504.0], dtype=torch.float32).bfloat16()


def test_combine_equals_the_torch_expression_bit_for_bit():
    a, b = _bf16(N, 1), _bf16(N, 2, scale=3.0)
    a[:12], b[:12] = _specials(), _specials().flip(0)
    for ca, cb in [(0.3, 0.7), (0.123456789, -1.987654321), (1e30, 1e30), (0.5, 0.5)]:
        ca32, cb32 = torch.tensor(ca, dtype=torch.float32), torch.tensor(cb, dtype=torch.float32)
        want = (ca32 * a.float() + cb32 * b.float()).bfloat16()
        got = kernels.combine(a, b, ca32.item(), cb32.item(), torch.empty_like(a))
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (ca, cb)


def test_scaled_product_equals_the_torch_expression_bit_for_bit():
    a, b = _bf16(N, 3), _bf16(N, 4, scale=1e-3)
    a[:12] = _specials()
    na, nb = torch.tensor(1234.567, dtype=torch.float32), torch.tensor(0.0321, dtype=torch.float32)
    want = (a.float() / na) * (b.float() / nb)
    got = kernels.scaled_product(a, b, na.item(), nb.item(), torch.empty(N + 5))
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_only_contiguous_cpu_bfloat16_is_fusable():
    a = _bf16(64, 5).reshape(8, 8)
    assert kernels.library() is not None, "no C compiler here: the loops are untested"
    assert kernels.fusable(a, a)
    assert not kernels.fusable(a, a.t())
    assert not kernels.fusable(a, a.float())


@pytest.mark.parametrize("t", [0.0, 0.3, 0.75, 1.0])
def test_fused_slerp_equals_mergekit_on_tensors_of_several_chunks(t):
    from mergekit.merge_methods.slerp import slerp as mergekit_slerp

    a = _bf16(N, 6).reshape(1, -1)  # mergekit keeps a leading output axis: one row here
    b = (a.float() + 0.7 * _bf16(N, 7).float().reshape(1, -1)).bfloat16()
    want = mergekit_slerp(torch.tensor([t]), a, b).to(torch.bfloat16)
    assert torch.equal(slerp_pair(t, a, b).view(torch.int16), want.view(torch.int16))


def test_fused_slerp_takes_the_lerp_branch_on_near_colinear_inputs_as_mergekit_does():
    from mergekit.merge_methods.slerp import slerp as mergekit_slerp

    a = _bf16(N, 8).reshape(1, -1)
    b = (a.float() * 1.0001).bfloat16()
    want = mergekit_slerp(torch.tensor([0.4]), a, b).to(torch.bfloat16)
    assert torch.equal(slerp_pairs([0.4], a, b)[0].view(torch.int16), want.view(torch.int16))


def test_the_loops_copy_this_torch_so_they_are_used():
    """Fails loudly when torch changes how it sums a norm or fuses addcmul_: the merge would fall
    back to torch's slower op-by-op path (still bit-equal), and kernels.c would need updating."""
    assert kernels.matches_torch()
    a = _bf16(N, 9, scale=5.0)
    want = torch.stack([torch.linalg.vector_norm(a[s:s + CHUNK].float().reshape(1, -1), dim=1)[0] for s in range(0, N, CHUNK)])
    assert torch.equal(kernels.chunk_norms(a, CHUNK).view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("weights", [[0.6, 0.4], [0.2, -0.5, 1.3]])
@pytest.mark.parametrize("normalize", [True, False])
def test_fused_linear_equals_mergekits_addcmul_chain(weights, normalize):
    """mergekit 0.1.5's linear: float32 zeros, ``addcmul_`` per model in order, ``div_`` by the
    weights' sum, cast back. The loop takes over (matches_torch) and must give the same bits."""
    from mergeserve.merge.methods.linear import linear

    xs = [_bf16(N, 10 + i, scale=1 + i) for i, _ in enumerate(weights)]
    assert kernels.fusable(*xs)
    xs[0][:12] = _specials()
    w = torch.tensor(weights, dtype=torch.float32)
    acc = torch.zeros(N)
    for x, c in zip(xs, w.unbind(0)):
        acc.addcmul_(x, c)
    want = (acc.div_(w.sum()) if normalize else acc).bfloat16()
    got = linear(xs, None, weight=weights, normalize=normalize)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_without_the_loops_slerp_and_linear_give_the_same_bits(monkeypatch):
    """Where kernels.c cannot be built (no C compiler) the methods use torch's own ops."""
    from mergeserve.merge.methods.linear import linear

    a, b = _bf16(N, 11), _bf16(N, 12, scale=2.0)
    fused = slerp_pair(0.3, a, b), linear([a, b], None, weight=[0.7, 0.2])
    monkeypatch.setattr(kernels, "fusable", lambda *t: False)
    plain = slerp_pair(0.3, a, b), linear([a, b], None, weight=[0.7, 0.2])
    for x, y in zip(fused, plain):
        assert torch.equal(x.view(torch.int16), y.view(torch.int16))


def test_the_fp8_cast_equals_torchs_on_every_bfloat16_value_and_every_tie():
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.bfloat16).float()
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].sort().values
    ties = (grid[1:] + grid[:-1]) / 2  # halfway between neighbours: rounds to the even one
    x = torch.cat([x[torch.isfinite(x) & (x.abs() <= 448)], ties, -ties, torch.rand(100_000) * 896 - 448])
    want = x.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(kernels.e4m3_cast(x.contiguous()).view(torch.uint8), want)


@pytest.mark.parametrize("shape", [(256, 384), (300, 131), (1, 5), (129, 128)])
def test_fused_fp8_blocks_equal_the_torch_form(shape, monkeypatch):
    from mergeserve.merge.quantize import quantize_fp8_block, quantize_fp8_block_reference

    w = _bf16(shape[0] * shape[1], 13, scale=0.05).reshape(shape)
    w[:, : min(shape[1], 3)] = 0  # a column of blocks partly zero
    if shape[0] >= 129:
        w[128:, :] = 0  # a row of blocks all zero: scale 1
    k = min(12, w.numel())
    w.view(-1)[:k] = _specials().nan_to_num(nan=0.0, posinf=3e38, neginf=-3e38)[:k]
    assert kernels.fusable(w)
    got = quantize_fp8_block(w)
    want = quantize_fp8_block_reference(w)
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])
    monkeypatch.setattr(kernels, "fusable", lambda *t: False)
    tiled = quantize_fp8_block(w)  # the torch tiles, where the loops are off
    assert torch.equal(tiled[0].view(torch.uint8), got[0].view(torch.uint8)) and torch.equal(tiled[1], got[1])
