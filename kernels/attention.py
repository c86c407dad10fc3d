"""Causal attention over the KV cache, dense or block-sparse, in tiles with an online softmax.

A token's position is its cache slot counted from its stretch start (slot - starts[t]); positions
are cut into blocks of `block`. A query in block qb sees key block kb <= qb when

    kb < global_blocks                           the first blocks (sinks)
    qb - kb <= local_blocks                      its own block and the local_blocks before it
    stride > 0 and (qb - kb) % stride == 0       every stride-th block back (strided)

and inside the visible blocks exactly the causal keys (with window > 0 only the last `window`
of them: key j is seen from query i when i - j < window, Mistral's sliding window). Dense
attention is the pattern whose single block covers the whole cache: `dense_pattern(slots_total)`.

Work is split into tasks of (up to QT consecutive tokens of one sequence and query block, one kv
head with all the query heads that read it, so each key tile loaded serves QT * group rows). A
task walks its visible keys KT at a time: scores S = Q K^T for its rows, the
online-softmax update (running max and sum per row), O += P V. No T x T score matrix exists; a
thread's scratch holds one tile, O(QT (KT + head_dim)) floats whatever the context length.
"""
import math

import numpy as np
from numba import get_thread_id, prange

from .jit import kernel

QT = 16  # query tokens per task: enough rows to reuse each key tile, enough tasks to share out
KT = 64  # keys per tile

LOG2E = 1.4426950408889634
EXP_MIN = -87.0  # exp below this underflows float32; scores this far under the row max weigh nothing


def scratch_size(head_dim: int, group: int) -> int:
    """Per-thread scratch floats `attention` needs for query heads sharing a kv head in `group`s:
    Q, O (QT group, hd), S (QT group, KT), V^T (hd, KT), running max and sum, exponent bits."""
    rows = QT * group
    return rows * (2 * head_dim + KT + 2) + head_dim * KT + KT


def dense_pattern(slots_total: int) -> tuple[int, int, int, int]:
    """The pattern that covers every key: one block as long as the cache."""
    return (max(int(slots_total), 1), 0, 0, 0)


@kernel
def _tile_4x2(c, a, b, r, j, k):
    # c[r:r+4, j:j+2] += a[r:r+4, :k] . b[j:j+2, :k]^T: eight running sums, so every element
    # loaded feeds four (or two) multiply-adds (as linear._tile_4x2).
    a0, a1, a2, a3 = a[r], a[r + 1], a[r + 2], a[r + 3]
    b0, b1 = b[j], b[j + 1]
    s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = np.float32(0.0)
    for i in range(k):
        u = b0[i]
        v = b1[i]
        s00 += a0[i] * u
        s01 += a0[i] * v
        s10 += a1[i] * u
        s11 += a1[i] * v
        s20 += a2[i] * u
        s21 += a2[i] * v
        s30 += a3[i] * u
        s31 += a3[i] * v
    c[r, j] += s00
    c[r, j + 1] += s01
    c[r + 1, j] += s10
    c[r + 1, j + 1] += s11
    c[r + 2, j] += s20
    c[r + 2, j + 1] += s21
    c[r + 3, j] += s30
    c[r + 3, j + 1] += s31


@kernel
def _gemm_nt(c, a, b, m, n, k):
    # c[:m, :n] += a[:m, :k] @ b[:n, :k]^T, in 4x2 blocks, then the odd edges one dot at a time.
    m4 = m - m % 4
    n2 = n - n % 2
    for r in range(0, m4, 4):
        for j in range(0, n2, 2):
            _tile_4x2(c, a, b, r, j, k)
    for r in range(m):
        for j in range(n2 if r < m4 else 0, n):
            acc = np.float32(0.0)
            for i in range(k):
                acc += a[r, i] * b[j, i]
            c[r, j] += acc


@kernel
def _row_max(x, start):
    """max(start, x) in four independent chains (a single max chain waits on each step)."""
    b0 = b1 = b2 = b3 = start
    n = x.shape[0]
    n4 = n - n % 4
    for j in range(0, n4, 4):
        b0 = max(b0, x[j])
        b1 = max(b1, x[j + 1])
        b2 = max(b2, x[j + 2])
        b3 = max(b3, x[j + 3])
    for j in range(n4, n):
        b0 = max(b0, x[j])
    return max(max(b0, b1), max(b2, b3))


@kernel
def _softmax_row(x, best, bits):
    """x <- exp(x - best) for x <= best, returning the sum; flat loops that vectorize (no libm).

    exp(v) = 2^n e^f with n = round(v log2 e), f = v - n ln 2 in [-ln2/2, ln2/2]; e^f from Cephes'
    expf polynomial (relative error ~1e-7), 2^n built as float bits in `bits` (int32, len(x)).
    Loops run over range(len) so the indices are known non-negative and LLVM vectorizes them.
    """
    n = x.shape[0]
    for j in range(n):
        v = max(x[j] - best, np.float32(EXP_MIN))
        ni = np.int32(v * np.float32(LOG2E) - np.float32(0.5))  # v <= 0: truncation rounds to nearest
        k = np.float32(ni)
        f = v - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
        z = f * f
        p = ((((np.float32(1.9875691500e-4) * f + np.float32(1.3981999507e-3)) * f
               + np.float32(8.3334519073e-3)) * f + np.float32(4.1665795894e-2)) * f
             + np.float32(1.6666665459e-1)) * f + np.float32(5.0000001201e-1)
        x[j] = p * z + f + np.float32(1.0)
        bits[j] = (ni + np.int32(127)) << 23
    scale = bits.view(np.float32)
    total = np.float32(0.0)
    for j in range(n):
        e = x[j] * scale[j]
        x[j] = e
        total += e
    return total


@kernel
def _tile(kc, vc, j0, n, rows, m, p0, window, qs, s, o, vt, mx, den, bits):
    """One tile: query rows 0..rows-1 (row r is token r % m, at position p0 + r % m) against keys
    j0..j0+n-1 of one kv head's cache kc, vc (slots, hd), folded into the running max mx, sum
    den and output o."""
    hd = kc.shape[1]
    for r in range(rows):
        s[r, :n] = 0.0
    _gemm_nt(s, qs, kc[j0:j0 + n], rows, n, hd)         # s = (scaled q) k^T
    for r in range(rows):
        p = p0 + r % m
        hi = min(n, p - j0 + 1)                          # causal: keys up to the query itself
        lo = max(0, p - window + 1 - j0) if window > 0 else 0
        row = s[r]
        if hi <= lo:                                     # nothing visible from this row here
            row[:n] = 0.0
            continue
        vis = row[lo:hi]
        best = _row_max(vis, mx[r])
        total = _softmax_row(vis, best, bits[:hi - lo])
        row[:lo] = 0.0
        row[hi:n] = 0.0
        if best == mx[r]:                                # the usual case once a row has run a while
            den[r] += total
        else:
            alpha = np.exp(mx[r] - best)                 # mx = -inf at first: alpha = 0
            den[r] = den[r] * alpha + total
            mx[r] = best
            for i in range(hd):
                o[r, i] *= alpha
    if rows >= 4:   # o += p v as dot products against v^T, in 4x2 blocks
        for i in range(hd):
            vti = vt[i]
            for j in range(n):
                vti[j] = vc[j0 + j, i]
        _gemm_nt(o, s, vt, rows, hd, n)
    else:           # one to three rows (decoding): add the value rows straight in
        for r in range(rows):
            for j in range(n):
                pj = s[r, j]
                vj = vc[j0 + j]
                for i in range(hd):
                    o[r, i] += pj * vj[i]


@kernel
def _attend(out, q, kc, vc, t0, m, kv, group, p0, window, pattern, buf):
    """Tokens t0..t0+m-1 (one sequence, one query block, positions p0..) over the cache kc, vc
    (slots of that sequence from its start, hd) of kv head kv, for the `group` query heads that
    read it: row r is head kv * group + r // m, token t0 + r % m. -> out[t, h]."""
    block, n_global, n_local, stride = pattern
    hd = q.shape[2]
    rows = m * group
    R = QT * group
    qs = buf[:R * hd].reshape((R, hd))
    o = buf[R * hd:2 * R * hd].reshape((R, hd))
    at = 2 * R * hd
    s = buf[at:at + R * KT].reshape((R, KT))
    at += R * KT
    vt = buf[at:at + hd * KT].reshape((hd, KT))
    at += hd * KT
    mx = buf[at:at + R]
    den = buf[at + R:at + 2 * R]
    bits = buf[at + 2 * R:at + 2 * R + KT].view(np.int32)
    scale = np.float32(1.0 / math.sqrt(hd))
    for r in range(rows):
        h = kv * group + r // m
        t = t0 + r % m
        for i in range(hd):
            qs[r, i] = q[t, h, i] * scale
            o[r, i] = 0.0
        mx[r] = -np.inf
        den[r] = 0.0
    last = p0 + m - 1
    first_key = max(0, p0 - window + 1) if window > 0 else 0
    qb = p0 // block
    for kb in range(first_key // block, qb + 1):
        d = qb - kb
        if not (kb < n_global or d <= n_local or (stride > 0 and d % stride == 0)):
            continue
        k0 = max(kb * block, first_key)
        k1 = min((kb + 1) * block, last + 1)
        for j0 in range(k0, k1, KT):
            _tile(kc, vc, j0, min(KT, k1 - j0), rows, m, p0, window, qs, s, o, vt, mx, den, bits)
    for r in range(rows):
        h = kv * group + r // m
        t = t0 + r % m
        inv = np.float32(1.0) / den[r]
        for i in range(hd):
            out[t, h, i] = o[r, i] * inv


@kernel(parallel=True)
def attention(out, q, k_cache, v_cache, l, starts, slots, window, pattern, scratch):
    """Grouped-query causal attention of each token over its own stretch of the cache.

    q (T, heads, head_dim); caches (L, kv_heads, slots_total, head_dim), layer l; token t attends
    to slots starts[t]..slots[t] (several sequences share one cache in separate stretches), thinned
    by `pattern` = (block, global_blocks, local_blocks, stride) as the module docstring says, and
    to the last `window` of them when window > 0. Query head h reads kv head h // (heads // kv_heads).
    out (T, heads, head_dim). scratch f32 (threads, >= scratch_size(head_dim)).
    """
    T, H, hd = q.shape
    KV = k_cache.shape[1]
    group = H // KV
    block = pattern[0]
    groups = (T + QT - 1) // QT
    for task in prange(groups * KV):
        g0 = (task // KV) * QT
        g1 = min(T, g0 + QT)
        kv = task % KV
        buf = scratch[get_thread_id()]
        t = g0
        while t < g1:  # split the group into runs: one sequence, consecutive slots, one block
            base = starts[t]
            qb = (slots[t] - base) // block
            e = t + 1
            while (e < g1 and starts[e] == base and slots[e] == slots[e - 1] + 1
                   and (slots[e] - base) // block == qb):
                e += 1
            _attend(out, q, k_cache[l, kv, base:], v_cache[l, kv, base:], t, e - t, kv, group,
                    slots[t] - base, window, pattern, buf)
            t = e
