"""8-bit activations in blocks of 32, the way llama.cpp feeds its integer dot products (Q8_1).

A matmul over 4- or 8-bit weight blocks can run on integers (AVX512-VNNI `vpdpbusd`: four
u8 x s8 products per int32 lane) if its input is quantized too. Each token's row is cut into
32-element blocks, and each block gets its own scale, so one outlier only coarsens its own block:

    xd[t, b] = max |x[t, 32b:32b+32]| / 127
    xq[t, i] = round(x[t, i] / xd[t, b])            int8 in [-127, 127], 0 where xd == 0
    xs[t, b] = xd[t, b] * sum of the block's xq     (for the weight blocks' minimum / offset)

A block whose xd would be subnormal (max |x| < 127 * FLT_MIN, 1.5e-36) counts as zero: 1 / xd would
overflow to inf, and rounding inf to int32 is undefined.
"""
import numpy as np
from numba import prange

from .formats import QK
from .jit import kernel
from .simd import bits_float, float_bits

PARALLEL_MIN_T = 16  # below this many tokens, one thread quantizes (a parallel region costs more)
FLT_MIN = np.float32(1.1754944e-38)  # the smallest normal float32; 1 / FLT_MIN = 8.5e37 is finite
# Rounding without a libm call, so the loops vectorize: adding 1.5 * 2^23 to |v| < 2^22 leaves
# round-to-nearest-even(v) in the low mantissa bits, read back as an integer by subtracting the
# constant's own bits. (fastmath may fuse x * inv + MAGIC into one FMA, which can break an exact
# .5 tie the other way: as np.rint of the rounded product may, within a few ulps.)
MAGIC = np.float32(12582912.0)
MAGIC_BITS = np.int32(0x4B400000)
ABS_BITS = np.int32(0x7FFFFFFF)


@kernel
def _quantize_row(xq, xd, xs, x):
    # x (n,) -> xq int8 (n,), xd, xs (n // 32,)
    for b in range(x.shape[0] // QK):
        o = b * QK
        # max |x| on the bits: a float's magnitude orders as its integer bits do, and an integer
        # max reduction vectorizes where a float one (without fastmath's no-NaN) does not
        m = np.int32(0)
        for i in range(QK):
            m = max(m, np.int32(float_bits(x[o + i]) & ABS_BITS))
        d = bits_float(m) / np.float32(127.0)
        if d < FLT_MIN:
            d = np.float32(0.0)
        inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
        total = np.int32(0)
        for i in range(QK):
            v = np.int32(float_bits(x[o + i] * inv + MAGIC) - MAGIC_BITS)
            xq[o + i] = np.int8(v)
            total += v
        xd[b] = d
        xs[b] = d * np.float32(total)


@kernel(parallel=True)
def _quantize_many(xq, xd, xs, x):
    for t in prange(x.shape[0]):
        _quantize_row(xq[t], xd[t], xs[t], x[t])


@kernel
def quantize(xq, xd, xs, x):
    """x f32 (T, n), n a multiple of 32 -> xq int8 (T, n), xd f32 (T, n // 32), xs f32 (T, n // 32)."""
    if x.shape[0] >= PARALLEL_MIN_T:
        _quantize_many(xq, xd, xs, x)
    else:
        for t in range(x.shape[0]):
            _quantize_row(xq[t], xd[t], xs[t], x[t])


@kernel(inline=True)
def _residual_row(xr, x, xq, xd):
    for b in range(x.shape[0] // QK):
        d = xd[b]
        for i in range(b * QK, (b + 1) * QK):
            xr[i] = x[i] - d * np.float32(xq[i])


@kernel(parallel=True)
def _residual_many(xr, x, xq, xd):
    for t in prange(x.shape[0]):
        _residual_row(xr[t], x[t], xq[t], xd[t])


@kernel
def residual(xr, x, xq, xd):
    """What 8-bit quantization missed: xr = x - xd xq, all (T, n) (xd per 32-block)."""
    if x.shape[0] >= PARALLEL_MIN_T:
        _residual_many(xr, x, xq, xd)
    else:
        for t in range(x.shape[0]):
            _residual_row(xr[t], x[t], xq[t], xd[t])


@kernel
def sums16(xs16, xq, xd):
    """xs16 f32 (T, n // 16) = xd of the 32-block times the sum of each 16 elements of xq: the
    activation sums that weights with an offset per 16 elements (Q6) multiply."""
    for t in range(xq.shape[0]):
        for g in range(xq.shape[1] // 16):
            total = np.int32(0)
            for i in range(g * 16, g * 16 + 16):
                total += np.int32(xq[t, i])
            xs16[t, g] = xd[t, g >> 1] * np.float32(total)
