"""Linear layers over stacked weights in every storage format: y = x @ W[l].T.

A weight is a tuple `(kind, q, s, m, f)` holding a stack of L matrices of shape (rows, cols):

    kind  one of the format codes below
    q     uint8 (L, rows, row_bytes)  packed values: f16/bf16 bits, int8, or 4-bit nibble pairs
    s     f32   (L, rows, cols // 32) per-block scale d           (block formats)
    m     f32   (L, rows, cols // 32) per-block minimum m         (Q4_1)
    f     f32   (L, rows, cols)       plain weights               (F32)

Arrays a format doesn't use are empty (shape (0, 0, 0)), so every weight has the same Numba type
and the model graph compiles once for all formats. The block formats are ggml's, with the fp16
block scales widened to f32 at load:

    Q8_0  x = d * q,        q int8
    Q4_0  x = d * (q - 8),  q in 0..15; byte j of a block holds element j (low) and j+16 (high)
    Q4_1  x = d * q + m,    same nibble order
"""
import numpy as np
from numba import get_thread_id, prange

from .jit import kernel

F32, F16, BF16, Q8_0, Q4_0, Q4_1 = 0, 1, 2, 3, 4, 5
KIND_NAMES = {F32: "F32", F16: "F16", BF16: "BF16", Q8_0: "Q8_0", Q4_0: "Q4_0", Q4_1: "Q4_1"}
QK = 32  # elements per quantization block

ROWS_PER_TASK = 16  # weight rows one thread takes at a time; their f32 tile stays in L1/L2


@kernel
def _half_bits_to_f32(dst, h):
    # h uint16 (n,) IEEE half bits -> dst f32 (n,). Shifting the 15 magnitude bits into a float's
    # exponent/mantissa and scaling by 2**112 rebases the exponent, exact for normals and
    # subnormals alike, without a branch per element. (Weights hold no inf/nan.)
    u = dst.view(np.uint32)
    for i in range(h.shape[0]):
        u[i] = np.uint32(h[i] & 0x7FFF) << 13
    scale = np.float32(2.0 ** 112)
    for i in range(h.shape[0]):
        v = dst[i] * scale
        dst[i] = -v if h[i] & 0x8000 else v


@kernel
def dequant_row(dst, w, l, r):
    """Row r of matrix l of weight w -> dst f32 (cols,)."""
    kind, q, s, m, f = w
    n = dst.shape[0]
    if kind == F32:
        dst[:] = f[l, r]
    elif kind == F16:
        _half_bits_to_f32(dst, q[l, r].view(np.uint16))
    elif kind == BF16:
        h = q[l, r].view(np.uint16)
        u = dst.view(np.uint32)
        for i in range(n):
            u[i] = np.uint32(h[i]) << 16
    elif kind == Q8_0:
        qr = q[l, r]
        for b in range(n // QK):
            d = s[l, r, b]
            for i in range(QK):
                dst[b * QK + i] = d * np.float32(np.int8(qr[b * QK + i]))
    else:  # Q4_0, Q4_1
        qr = q[l, r]
        for b in range(n // QK):
            d = s[l, r, b]
            mn = m[l, r, b] if kind == Q4_1 else np.float32(-8.0) * d
            for j in range(QK // 2):
                v = qr[b * (QK // 2) + j]
                dst[b * QK + j] = d * np.float32(v & 15) + mn
                dst[b * QK + QK // 2 + j] = d * np.float32(v >> 4) + mn


@kernel
def _dot_block_row(kind, q, s, m, l, r, x, xsum, acc):
    # Row r of a block-format matrix . x, without expanding the row. acc f32 (32,) is scratch:
    # one lane per block position, so the inner loop has no horizontal sum and vectorizes.
    acc[:] = 0.0
    qr = q[l, r]
    nb = x.shape[0] // QK
    extra = np.float32(0.0)
    if kind == Q8_0:
        for b in range(nb):
            d = s[l, r, b]
            for i in range(QK):
                acc[i] += d * (np.float32(np.int8(qr[b * QK + i])) * x[b * QK + i])
    else:
        for b in range(nb):
            d = s[l, r, b]
            for j in range(QK // 2):
                v = qr[b * (QK // 2) + j]
                acc[j] += d * (np.float32(v & 15) * x[b * QK + j])
                acc[j + QK // 2] += d * (np.float32(v >> 4) * x[b * QK + QK // 2 + j])
            # the offset term: sum_i mn * x_i over the block = mn * xsum[b]
            mn = m[l, r, b] if kind == Q4_1 else np.float32(-8.0) * d
            extra += mn * xsum[b]
    total = extra
    for i in range(QK):
        total += acc[i]
    return total


@kernel
def _dot(a, b):
    acc = np.float32(0.0)
    for i in range(a.shape[0]):
        acc += a[i] * b[i]
    return acc


@kernel
def _dot_sum(a):
    acc = np.float32(0.0)
    for i in range(a.shape[0]):
        acc += a[i]
    return acc


@kernel(parallel=True)
def linear(out, x, w, l, scratch):
    """x (T, n) @ W[l].T (n, rows) -> out (T, rows).

    scratch f32 (threads, ROWS_PER_TASK * n + 64 + n // 32 * T) per-thread working space, so the
    call allocates nothing. Few tokens read each weight row in its packed form; many tokens
    expand a tile of rows to f32 once and reuse it from cache for every token.
    """
    kind, q, s, m, f = w
    T, n = x.shape
    rows = out.shape[1]
    nb = n // QK
    tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    block = kind == Q8_0 or kind == Q4_0 or kind == Q4_1
    for task in prange(tasks):
        ws = scratch[get_thread_id()]
        acc = ws[:QK]
        r0 = task * ROWS_PER_TASK
        r1 = min(rows, r0 + ROWS_PER_TASK)
        if T <= 2 and (block or kind == F32):
            xsum = ws[64:64 + nb * T]
            for t in range(T):
                if block:
                    for b in range(nb):
                        xsum[t * nb + b] = _dot_sum(x[t, b * QK:(b + 1) * QK])
            for r in range(r0, r1):
                for t in range(T):
                    if kind == F32:
                        out[t, r] = _dot(f[l, r], x[t])
                    else:
                        out[t, r] = _dot_block_row(kind, q, s, m, l, r, x[t], xsum[t * nb:(t + 1) * nb], acc)
        else:
            tile = ws[64:64 + ROWS_PER_TASK * n]
            for r in range(r0, r1):
                dequant_row(tile[(r - r0) * n:(r - r0 + 1) * n], w, l, r)
            for t in range(T):
                xt = x[t]
                for r in range(r0, r1):
                    out[t, r] = _dot(tile[(r - r0) * n:(r - r0 + 1) * n], xt)


def scratch_size(n_max: int, t_max: int) -> int:
    """Per-thread scratch floats `linear` needs for inputs of width <= n_max and <= t_max tokens."""
    return 64 + max(ROWS_PER_TASK * n_max, (n_max // QK) * t_max)



@kernel(parallel=True)
def dequant_matrix(out, w, l):
    """Matrix l of a stacked weight -> out f32 (rows, cols)."""
    for r in prange(out.shape[0]):
        dequant_row(out[r], w, l, r)
