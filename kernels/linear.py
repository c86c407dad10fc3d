"""Linear layers over stacked weights in every storage format: y = x @ W[l].T.

A weight is a tuple `(kind, q, s, m, f)` holding a stack of L matrices of shape (rows, cols):

    kind  one of the format codes below
    q     uint8 (L, rows, row_bytes)  packed values: f16/bf16 bits, int8, nibble pairs, bit planes
    s     f32   (L, rows, cols // G)  per-group scale d           (block formats; G = GROUP[kind])
    m     f32   (L, rows, cols // G)  per-group offset m          (Q4_1, Q5, Q6)
    f     f32   (L, rows, cols)       plain weights               (F32)

Arrays a format doesn't use are empty (shape (0, 0, 0)), so every weight has the same Numba type
and the model graph compiles once for all formats. The block formats are ggml's, with the fp16
block scales widened to f32 at load:

    Q8_0  x = d * q,        q int8
    Q4_0  x = d * (q - 8),  q in 0..15; byte j of a block holds element j (low) and j+16 (high)
    Q4_1  x = d * q + m,    same nibble order
    Q5    x = d * q + m,    q in 0..31: the low nibbles as Q4_1 (cols / 2 bytes), then the fifth
                            bits, bit e of the plane for element e (cols / 8 bytes)
    Q6    x = d * q + m,    q in 0..63, d and m per 16 elements: the low nibbles as Q4_1, then the
                            top two bits, 16 bytes per 64 elements: byte j holds elements j,
                            j + 16, j + 32, j + 48 in bits 0-1, 2-3, 4-5, 6-7 (cols / 4 bytes)

Q5 and Q6 hold ggml's 5-bit and K-quant types exactly (weights/kquants.py; Q4_K becomes Q4_1);
their rows are whole 64-element stretches.
"""
import numpy as np
from numba import get_thread_id, prange

from . import act8 as A8
from . import gemm as G
from . import qgemm as QG
from . import qmatvec as QV
from . import qtile as QT
from .jit import kernel

from .formats import (BF16, BLOCK_KINDS, F16, F32, GROUP, KIND_NAMES, Q4_0, Q4_0T, Q4_1, Q4_1T, Q5, Q6,  # noqa: F401
                      Q8_0, Q8_0T, QK, STRETCH, TILED, UNTILED, row_bytes)  # (re-exported)

ROWS_PER_TASK = 48  # weight rows one thread takes at a time in prefill: three 16-row panels


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
        sr = s[l, r]
        for i in range(n):  # flat, scale looked up per element: vectorizes (see _dot_q8_0)
            dst[i] = sr[i >> 5] * np.float32(np.int8(qr[i]))
    elif kind == Q5 or kind == Q6:
        _dequant_q56(dst, kind, q[l, r], s[l, r], m[l, r])
    elif QT.is_tiled(kind):
        QT.dequant_row(dst, kind, q, s, m, l, r)
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
def _dequant_q56(dst, kind, qr, sr, mr):
    # A Q5 or Q6 row, 64-element stretch by stretch, in loops that vectorize: the nibbles as
    # floats, the high bits added (16 per unit), then scale and offset per group.
    n = dst.shape[0]
    h = n // 2
    for p in range(n // STRETCH):
        o = p * STRETCH
        for half in range(2):
            for j in range(16):
                v = np.int32(qr[p * 32 + half * 16 + j])
                dst[o + half * QK + j] = np.float32(v & 15)
                dst[o + half * QK + 16 + j] = np.float32(v >> 4)
        if kind == Q5:  # bit i of the row's plane byte k: element 8k + i
            for k in range(8):
                bits = np.int32(qr[h + p * 8 + k])
                for i in range(8):
                    dst[o + 8 * k + i] += np.float32(16 * ((bits >> i) & 1))
        else:  # byte j of the stretch's 16: elements j, j + 16, j + 32, j + 48
            for k in range(4):
                for j in range(16):
                    dst[o + 16 * k + j] += np.float32(16 * ((np.int32(qr[h + p * 16 + j]) >> (2 * k)) & 3))
    shift = 5 if kind == Q5 else 4
    for e in range(n):  # flat, the group's scale looked up per element: vectorizes (as _dot_q8_0)
        dst[e] = dst[e] * sr[e >> shift] + mr[e >> shift]


@kernel
def _dot(a, b):
    acc = np.float32(0.0)
    for i in range(a.shape[0]):
        acc += a[i] * b[i]
    return acc


@kernel
def _dot_q8_0(qr, sr, x):
    # One flat loop with the block scale looked up per element: LLVM vectorizes it across blocks,
    # where a loop per 32-element block (a horizontal sum per block) runs ~5x slower.
    acc = np.float32(0.0)
    for i in range(x.shape[0]):
        acc += np.float32(np.int8(qr[i])) * x[i] * sr[i >> 5]
    return acc


@kernel
def _prep_x4(xp, x):
    """x (n,) -> xp (n + n // 32) laid out for `_dot_q4`.

    Byte i of a 4-bit row holds lo (element e) and hi (element e + 16), e = (i // 16) * 32 + i % 16.
    Since the byte's value is v = lo + 16 hi,

        lo x[e] + hi x[e + 16] = lo (x[e] - x[e + 16] / 16) + v (x[e + 16] / 16),

    so the row loop converts the byte and its low nibble to float, and never shifts. xp[:n/2]
    holds x[e] - x[e + 16] / 16 and xp[n/2:n] holds x[e + 16] / 16, in byte order; xp[n:] holds
    the 32-element block sums of x.
    """
    n = x.shape[0]
    h = n // 2
    for i in range(h):
        e = (i >> 4) * QK + (i & 15)
        hi = x[e + QK // 2] * np.float32(1.0 / 16.0)
        xp[i] = x[e] - hi
        xp[h + i] = hi
    for b in range(n // QK):
        acc = np.float32(0.0)
        for i in range(b * QK, (b + 1) * QK):
            acc += x[i]
        xp[n + b] = acc


@kernel
def _dot_q4(kind, qr, sr, mr, xp, n):
    # sum_e (d_b q_e + mn_b) x_e = sum_i d_b (lo_i xa_i + v_i xb_i) + sum_b mn_b xsum_b,
    # with mn_b = m_b (Q4_1) or -8 d_b (Q4_0). int32 throughout: Numba's `>>` and `&` on uint8
    # with int literals widen to int64 lanes, which halves the vector width (1.55x slower).
    h = n // 2
    acc = np.float32(0.0)
    for i in range(h):
        v = np.int32(qr[i])
        acc += (np.float32(v & np.int32(15)) * xp[i] + np.float32(v) * xp[h + i]) * sr[i >> 4]
    if kind == Q4_1:
        for b in range(n // QK):
            acc += mr[b] * xp[n + b]
    else:
        for b in range(n // QK):
            acc -= np.float32(8.0) * sr[b] * xp[n + b]
    return acc


ROWS_PATH_MAX_T = 8  # up to this many tokens, packed rows are read directly (decode, batched decode)


@kernel(parallel=True)
def _linear_rows(out, x, w, l, scratch):
    # Few tokens: each weight row is read once, in its packed form, and used for every token while
    # it is in L1. One task per thread, so x is prepared once per thread, not once per row.
    kind, q, s, m, f = w
    T, n = x.shape
    rows = out.shape[1]
    width = n + n // QK
    tasks = scratch.shape[0]  # one per thread (get_num_threads() here would defeat the disk cache)
    for task in prange(tasks):
        xp = scratch[get_thread_id(), :T * width]
        r0 = task * rows // tasks
        r1 = (task + 1) * rows // tasks
        if kind == F32:
            for r in range(r0, r1):
                for t in range(T):
                    out[t, r] = _dot(f[l, r], x[t])
        elif kind == Q8_0:
            for r in range(r0, r1):
                for t in range(T):
                    out[t, r] = _dot_q8_0(q[l, r], s[l, r], x[t])
        elif kind == Q5 or kind == Q6:  # each row widened once into the thread's scratch
            wr = xp[:n]
            for r in range(r0, r1):
                _dequant_q56(wr, kind, q[l, r], s[l, r], m[l, r])
                for t in range(T):
                    out[t, r] = _dot(wr, x[t])
        else:
            for t in range(T):
                _prep_x4(xp[t * width:(t + 1) * width], x[t])
            for r in range(r0, r1):
                mr = m[l, r] if kind == Q4_1 else s[l, r]
                for t in range(T):
                    out[t, r] = _dot_q4(kind, q[l, r], s[l, r], mr, xp[t * width:(t + 1) * width], n)


@kernel(parallel=True)
def _linear_tiles(out, x, w, l, scratch):
    # Many tokens: expand a tile of rows to f32 once, packed k-major in 16-row panels, and run the
    # 6-token x 16-row register block (kernels/gemm.py) over it for every 6 tokens. A tile's last
    # panel, when rows run out, is padded with zero rows and written through a small buffer.
    T, n = x.shape
    rows = out.shape[1]
    NR, MR = G.NR, G.MR
    tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(tasks):
        buf = scratch[get_thread_id()]
        panel = buf[:NR * n]
        rowmajor = buf[NR * n:2 * NR * n]  # the panel's rows, before packing
        edge = buf[2 * NR * n:2 * NR * n + MR * NR].reshape((MR, NR))
        r0 = task * ROWS_PER_TASK
        nr = min(rows, r0 + ROWS_PER_TASK) - r0
        for g in range((nr + NR - 1) // NR):
            # dequantize 16 rows in order, then transpose them with sequential writes (scattering
            # each row straight into the panel touches a cache line per element: 1.5x slower)
            for j in range(NR):
                r = g * NR + j
                if r < nr:
                    dequant_row(rowmajor[j * n:(j + 1) * n], w, l, r0 + r)
                else:
                    rowmajor[j * n:(j + 1) * n] = 0.0
            for k in range(n):
                for j in range(NR):
                    panel[k * NR + j] = rowmajor[j * n + k]
            for t in range(0, T, MR):  # the panel stays in L1 while every token passes
                mr = min(MR, T - t)
                if (g + 1) * NR <= nr:
                    G.micro(out, t, x, t, panel, 0, n, r0 + g * NR, mr)
                else:
                    G.micro(edge, 0, x, t, panel, 0, n, 0, mr)
                    for i in range(mr):
                        for j in range(nr - g * NR):
                            out[t + i, r0 + g * NR + j] = edge[i, j]


@kernel
def linear(out, x, w, l, scratch):
    """x (T, n) @ W[l].T (n, rows) -> out (T, rows).

    scratch f32 (threads, scratch_size(n)) is per-thread working space, so the call allocates
    nothing.
    """
    kind = w[0]
    tiled = QT.is_tiled(kind)  # read row by row through dequant_row
    if x.shape[0] <= ROWS_PATH_MAX_T and kind != F16 and kind != BF16 and not tiled:
        _linear_rows(out, x, w, l, scratch)
    else:
        _linear_tiles(out, x, w, l, scratch)


def scratch_size(n_max: int) -> int:
    """Per-thread scratch floats `linear` needs for inputs of width <= n_max (any token count)."""
    return max(2 * G.NR * n_max + G.MR * G.NR, ROWS_PATH_MAX_T * (n_max + n_max // QK), QG.scratch_size(n_max),
               QV.scratch_size(n_max, ROWS_PATH_MAX_T))



@kernel(parallel=True)
def dequant_matrix(out, w, l):
    """Matrix l of a stacked weight -> out f32 (rows, cols)."""
    for r in prange(out.shape[0]):
        dequant_row(out[r], w, l, r)


# -- 8-bit activations (kernels/act8.py) over the block formats -------------------------------------
@kernel
def _a8(out, xq, xd, xs, w, l, base, scratch, row_loops):
    # out (T, rows) from the weight rows base..base + rows: the row loop for a few tokens (over
    # tiled weights the tiles' loop), the prefill's tiles beyond. row_loops None: no weight needs
    # the row loop (`needs_row_loops`), and Numba leaves it out of the compiled graph (the
    # prefill's tiles would compute any T correctly, only slower).
    kind = w[0]
    if QT.is_tiled(kind) and xq.shape[0] <= QT.MAX_T:
        QT.linear_a8_tiled(out, xq, xd, xs, w, l, base, scratch.shape[0])
        return
    if row_loops is not None:
        if xq.shape[0] <= ROWS_PATH_MAX_T:
            QV.linear_a8_rows(out, xq, xd, xs, w, l, scratch, base)
            return
    QG.linear_a8_tiles(out, xq, xd, xs, w, l, base, scratch)


def needs_float_path(kinds) -> bool:
    """Whether weights of these kinds need `linear_act`'s float path compiled alongside the
    integer one (a float format)."""
    return any(k not in BLOCK_KINDS for k in kinds)


def needs_row_loops(kinds) -> bool:
    """Whether weights of these kinds need the decode row loops of 8-bit activations
    (kernels/qmatvec.py) compiled: a block format the 16-row tiles do not take (Q5, Q6), or one
    left untiled. A quarter of the graph's compile time when none does."""
    return any(k in BLOCK_KINDS and k not in UNTILED for k in kinds)


@kernel(inline=True)
def _add_residual(out, o2, lo):
    # out[lo:] += o2: the residual pass's products for the last rows
    for r in range(o2.shape[0]):
        out[lo + r] += o2[r]


@kernel(parallel=True)
def _add_residual_many(out, o2, lo):
    for t in prange(out.shape[0]):
        _add_residual(out[t], o2[t], lo)


@kernel
def linear_act(out, x, w, l, lin, res_rows, floats):
    """`linear`, with 8-bit activations over block-format weights when lin carries their buffers.

    lin = (scratch, xq int8 (2 T_max n_max,), xd, xs f32 (2 T_max n_max // 32,), xr f32
    (T_max n_max,), o2 f32 (2 T_max rows2,), xs16 f32 (2 T_max n_max // 16,), row_loops) from
    `act_buffers`; empty xq buffers (or a float weight format) mean f32 activations. res_rows > 0
    quantizes what the 8-bit pass leaves, x - xd xq, as a second 8-bit input and adds its product
    to the last res_rows output rows: about 15 bits per activation for those rows (the K and V
    projections, whose input 8 bits hurt most; rows <= rows2). That pass runs over those rows
    only, except where both inputs fit one pass of the row loop (a token or two decoding): they
    ride along as extra tokens over every row, so the weights still stream once.

    floats: True, or None when lin carries buffers and no weight passed needs the float path
    (`needs_float_path`). Numba prunes `floats is not None` by type, so then the float path
    (`linear`, a third of the first run's compile time) is never compiled.
    """
    scratch, xq_buf, xd_buf, xs_buf, xr_buf, o2_buf, xs16_buf, row_loops = lin
    kind = w[0]
    T, n = x.shape
    if floats is not None:
        if xq_buf.shape[0] == 0 or not (kind == Q8_0 or kind == Q4_0 or kind == Q4_1 or kind == Q5 or kind == Q6
                                        or QT.is_tiled(kind)):
            linear(out, x, w, l, scratch)
            return
    nb = n // QK
    P = 2 * T if res_rows > 0 else T
    xq = xq_buf[:P * n].reshape((P, n))
    xd = xd_buf[:P * nb].reshape((P, nb))
    xs32 = xs_buf[:P * nb].reshape((P, nb))
    xs16 = xs16_buf[:P * 2 * nb].reshape((P, 2 * nb))
    A8.quantize(xq[:T], xd[:T], xs32[:T], x)
    xs = xs32  # the activation sums the weight's offsets multiply: per 16 elements for Q6
    if kind == Q6:
        A8.sums16(xs16[:T], xq[:T], xd[:T])
        xs = xs16
    if res_rows == 0:
        _a8(out, xq, xd, xs, w, l, 0, scratch, row_loops)
        return
    rows = out.shape[1]
    lo = rows - res_rows
    xr = xr_buf[:T * n].reshape((T, n))
    A8.residual(xr, x, xq[:T], xd[:T])
    A8.quantize(xq[T:], xd[T:], xs32[T:], xr)
    if kind == Q6:
        A8.sums16(xs16[T:], xq[T:], xd[T:])
    if P < QV.TOKEN_MAJOR_MIN_T or (QT.is_tiled(kind) and P <= QT.MAX_T):  # both inputs in one pass over the weights, every row
        o2 = o2_buf[:P * rows].reshape((P, rows))
        _a8(o2, xq, xd, xs, w, l, 0, scratch, row_loops)
        for t in range(T):
            for r in range(lo):
                out[t, r] = o2[t, r]
            for r in range(lo, rows):
                out[t, r] = o2[t, r] + o2[T + t, r]
        return
    # else the residual over its own rows (riding along, its tokens would change the row loop)
    _a8(out, xq[:T], xd[:T], xs[:T], w, l, 0, scratch, row_loops)
    o2 = o2_buf[:T * res_rows].reshape((T, res_rows))
    _a8(o2, xq[T:], xd[T:], xs[T:], w, l, lo, scratch, row_loops)
    if T >= A8.PARALLEL_MIN_T:
        _add_residual_many(out, o2, lo)
    else:
        for t in range(T):
            _add_residual(out[t], o2[t], lo)


def act_buffers(t_max: int, n_max: int, rows2: int, on: bool, row_loops: bool = True) -> tuple:
    """(xq, xd, xs, xr, o2, xs16, row_loops) for `linear_act`: sized for t_max tokens of width <=
    n_max, two passes over matrices of up to rows2 rows; or empty (off). row_loops: False when no
    weight needs the decode row loops (`needs_row_loops`), which then are not compiled."""
    size = t_max * n_max if on else 0
    return (np.zeros(2 * size, np.int8), np.zeros(2 * size // QK, np.float32), np.zeros(2 * size // QK, np.float32),
            np.zeros(size, np.float32), np.zeros(2 * t_max * rows2 if on else 0, np.float32),
            np.zeros(2 * size // 16, np.float32), True if row_loops else None)
