"""The compiled loops behind :mod:`mergeserve.merge.kernels` (numba; no torch here, so that
:func:`warm` can load them on a thread while the main thread imports torch).

IEEE semantics hold: no fastmath (no reassociation, no FMA contraction); ``error_model="numpy"``
only drops Python's ZeroDivisionError check, which would stop the loops from vectorising.
Compiled code is cached next to this file (``cache=True``): only a first run pays the ~1 s
compile, later ones ~0.3 s to load it. ``nogil=True`` lets the merge threads run them side by side.
Arrays of bfloat16 are handled as their uint16 bits.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_JIT = {"nogil": True, "cache": True, "error_model": "numpy"}

# torch's float32 -> bfloat16 cast rounds to nearest, ties to even, and turns every NaN into
# all ones (its vectorised CPU path; measured on torch 2.13).
_BF16_NAN = 0xFFFF


@intrinsic
def _f32_from_bits(typingctx, u):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _bits_from_f32(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


# torch's CPU L2 norm over a contiguous last dimension (ReduceOpsKernel.cpp, the p == 2 path of
# norm_kernel_tensor_iterator_impl): acc += x * x in one Vectorized<float> of this many lanes,
# the lanes then summed left to right, the leftover elements added one by one, then sqrt.
NORM_LANES = 8


@intrinsic
def _lane_sumsq(typingctx, arr, start, rows):
    """Per-lane sums of squares of ``arr[start : start + rows * NORM_LANES]`` (bfloat16 bits),
    accumulated row by row in one LLVM float vector: what torch's loop does, vectorised."""
    sig = types.UniTuple(types.float32, NORM_LANES)(arr, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        f32v = ir.VectorType(ir.FloatType(), NORM_LANES)
        i32v = ir.VectorType(ir.IntType(32), NORM_LANES)
        rows_ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.VectorType(ir.IntType(16), NORM_LANES).as_pointer())
        acc = cgutils.alloca_once_value(builder, ir.Constant(f32v, [0.0] * NORM_LANES))
        with cgutils.for_range(builder, args[2]) as loop:
            raw = builder.load(builder.gep(rows_ptr, [loop.index]), align=2)
            x = builder.bitcast(builder.shl(builder.zext(raw, i32v), ir.Constant(i32v, [16] * NORM_LANES)), f32v)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(x, x)), acc)
        total = builder.load(acc)
        lanes = [builder.extract_element(total, ir.Constant(ir.IntType(32), j)) for j in range(NORM_LANES)]
        return context.make_tuple(builder, sig.return_type, lanes)

    return sig, codegen


@njit(**_JIT)
def _chunk_norms(a, chunk, out):  # pragma: no cover - compiled
    n = a.shape[0]
    for c in range(out.shape[0]):
        start = c * chunk
        m = min(chunk, n - start)
        body = m - m % NORM_LANES
        lanes = _lane_sumsq(a, start, body // NORM_LANES)
        total = lanes[0]
        for j in range(1, NORM_LANES):
            total = total + lanes[j]
        for i in range(start + body, start + m):
            x = _f32_from_bits(np.uint32(a[i]) << 16)
            total += x * x
        out[c] = np.sqrt(total)


@njit(**_JIT)
def _scaled_product(a, b, na, nb, out):  # pragma: no cover - compiled
    for i in range(a.shape[0]):
        x = _f32_from_bits(np.uint32(a[i]) << 16)
        y = _f32_from_bits(np.uint32(b[i]) << 16)
        out[i] = (x / na) * (y / nb)


@njit(**_JIT, inline="always")
def _bf16_bits(v):  # pragma: no cover - compiled
    """float32 -> bfloat16 bits as torch casts: nearest, ties to even, NaN to _BF16_NAN."""
    u = _bits_from_f32(v)
    r = (u + (((u >> 16) & np.uint32(1)) + np.uint32(0x7FFF))) >> 16
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        r = np.uint32(_BF16_NAN)
    return np.uint16(r)


@njit(**_JIT)
def _combine(a, b, ca, cb, out):  # pragma: no cover - compiled
    for i in range(a.shape[0]):
        x = _f32_from_bits(np.uint32(a[i]) << 16)
        y = _f32_from_bits(np.uint32(b[i]) << 16)
        out[i] = _bf16_bits(x * ca + y * cb)


@intrinsic
def _fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (LLVM's llvm.fma.f32)."""
    f32 = ir.FloatType()

    def codegen(context, builder, sig, args):
        return builder.call(builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32] * 3)), args)

    return types.float32(types.float32, types.float32, types.float32), codegen


_BLOCK = 4096  # elements of the float32 accumulator of _weighted_sum: 16 KB, stays in L1


# The inner loops are functions of their own, called on slices: inlined into _weighted_sum's
# block loop, LLVM left them scalar (about 2x slower).
@njit(**_JIT)
def _fma_into(acc, x, w):  # pragma: no cover - compiled
    for i in range(x.shape[0]):
        acc[i] = _fma(_f32_from_bits(np.uint32(x[i]) << 16), w, acc[i])


@njit(**_JIT)
def _divide_into(out, acc, den):  # pragma: no cover - compiled
    for i in range(out.shape[0]):
        out[i] = _bf16_bits(acc[i] / den)


@njit(**_JIT)
def _weighted_sum(xs, w, den, out):  # pragma: no cover - compiled
    acc = np.empty(_BLOCK, np.float32)
    n = out.shape[0]
    for s in range(0, n, _BLOCK):
        m = min(_BLOCK, n - s)
        acc[:m] = 0
        for k in range(len(xs)):
            _fma_into(acc, xs[k][s:s + m], w[k])
        _divide_into(out[s:s + m], acc, den)


def warm() -> None:
    """Load (or compile) every loop, on tiny arrays."""
    u, f = np.zeros(NORM_LANES + 1, np.uint16), np.zeros(NORM_LANES + 1, np.float32)
    _chunk_norms(u, NORM_LANES, np.zeros(2, np.float32))
    _scaled_product(u, u, np.float32(1), np.float32(1), f)
    _combine(u, u, np.float32(1), np.float32(1), u.copy())
    _weighted_sum((u, u), f, np.float32(1), u.copy())
