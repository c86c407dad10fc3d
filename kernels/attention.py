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
task walks its visible keys KT at a time: scores, the online-softmax update (running max and sum
per row), O += P V. No T x T score matrix exists; a thread's scratch holds one tile,
O(QT group (KT + head_dim)) floats whatever the context length.

Everything is kept transposed, a task's query rows along the vector lanes (row c = head c // m,
token c % m, padded with zero queries to a whole number of vectors):

    S^T (keys, rows)  = K (keys, hd) Q^T (hd, rows)     Q^T packed once per task
    softmax           elementwise over rows: max, exp and sums run down the keys
    O^T (hd, rows)   += V^T (hd, keys) P^T (keys, rows)  V read in place from the cache

Both products go through one register block written in LLVM IR (`_micro_ir`, driven by `_gemm`):
a few rows of the left operand broadcast against a row of up to 4 vectors of the right one, up to
24 accumulators in registers, no horizontal sums (Numba's own loops become dot products here, one
horizontal sum each). The left operand is read through strides, so K and V come straight from the
cache. The softmax step is LLVM IR too (`_softmax_ir`), one vector of rows at a time in registers.

Decoding (at most 8 rows) would leave most lanes idle that way: `_tile_few` keeps the rows apart
and runs along head_dim and the keys instead. Its scores come from another IR block (`_scores`):
up to 3 query rows against 8 key rows at a time, each key vector loaded once for all rows, the
8 x 3 products summed across lanes by one transposing tree of shuffles (`_reduce8`) rather than
a horizontal sum per dot product; O += P V uses register blocks of exactly the rows there are.
Tasks are handed out first, last, second, second last... so that the even split over threads
balances the causal triangle (later tokens see more keys).
"""
import math

import numpy as np
from llvmlite import ir
from numba import get_thread_id, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .jit import kernel
from .isa import TIER
from .simd import bits_float, counted_loop, float_bits, kv_get
from .simd import fma as fma_intrinsic

QT = 16  # query tokens per task: enough rows to reuse each key tile, enough tasks to share out
KT = 64  # keys per tile
SPLIT_MIN = 256  # a decode step splits its keys into pieces of at least this many (flash-decoding)
SPLIT_MAX = 32   # pieces in all, over the kv heads

# Vector width in floats, from the ISA tier (kernels/isa.py): 16 with AVX-512 (32 registers),
# else 8 (16 registers). MR[nv] = left-operand rows per register block with nv vectors of
# columns: MR[nv] * nv accumulators plus nv loads and a broadcast fit.
VW = TIER.float_lanes
NV = 4  # at most 4 vectors of columns per block
MR = (0, 8, 8, 8, 6) if TIER.registers >= 32 else (0, 8, 6, 4, 3)

LOG2E = 1.4426950408889634
EXP_LO = -100.0  # exp clamps its argument here, where 2^n has underflowed to exactly 0 (-inf -> 0)


@kernel
def _rows(group):
    """Rows of a task (QT tokens x group heads), padded to whole vectors."""
    return -(-QT * group // VW) * VW


def scratch_size(head_dim: int, group: int) -> int:
    """Per-thread scratch floats `attention` needs for query heads sharing a kv head in `group`s:
    Q^T, O^T (hd, rows), S^T (KT, rows), five row vectors, KT exponents, a K and a V tile
    (KT, hd) widened from a half-float cache, and (used in row 0 only) the pieces of a split
    decode step, for up to FEW_TOKENS tokens."""
    R = _rows(group)
    return R * (2 * head_dim + KT + 5) + KT + 2 * KT * head_dim + SPLIT_MAX * FEW_TOKENS * (2 + head_dim) * group


def dense_pattern(slots_total: int) -> tuple[int, int, int, int]:
    """The pattern that covers every key: one block as long as the cache."""
    return (max(int(slots_total), 1), 0, 0, 0)


# ----------------------------------------------------------------------------------------------
# the register block
# ----------------------------------------------------------------------------------------------

def _micro_ir(vw: int, nv: int, mr: int, accumulate: bool):
    """c[i, :nv*vw] (+)= sum_k a[i*ars + k*aks] * b[k*ldb + :nv*vw] for i < mr (a and b float32, or
    half floats as uint16 bits: a KV cache, widened as loaded). Rows at or past
    `rows` repeat row rows-1 (same loads, same result, same address), so any 1 <= rows <= mr works
    with no tail code and no store outside the rows asked for."""
    def codegen(context, builder, sig, args):
        c_t, _, _, a_t, _, _, _, b_t = sig.args[:8]
        c_v, co, ldc, a_v, ao, ars, aks, b_v, bo, ldb, n, rows = args
        c = context.make_array(c_t)(context, builder, c_v)
        a = context.make_array(a_t)(context, builder, a_v)
        b = context.make_array(b_t)(context, builder, b_v)
        i64 = ir.IntType(64)
        f32 = ir.FloatType()
        vec = ir.VectorType(f32, vw)
        vptr = vec.as_pointer()
        fma = fma_intrinsic(builder, vec)
        zero = ir.Constant(vec, [0.0] * vw)
        undef_vec = ir.Constant(vec, ir.Undefined)
        mask0 = ir.Constant(ir.VectorType(ir.IntType(32), vw), [0] * vw)
        last = builder.sub(rows, ir.Constant(i64, 1))

        def row(i):
            ii = ir.Constant(i64, i)
            return builder.select(builder.icmp_signed("<", ii, last), ii, last)

        arow = [builder.gep(a.data, [builder.add(ao, builder.mul(row(i), ars))]) for i in range(mr)]
        crow = [builder.gep(c.data, [builder.add(co, builder.mul(row(i), ldc))]) for i in range(mr)]
        cvp = [[builder.bitcast(builder.gep(crow[i], [ir.Constant(i64, vw * v)]), vptr) for v in range(nv)]
               for i in range(mr)]
        if accumulate:
            init = [[builder.load(cvp[i][v], align=4) for v in range(nv)] for i in range(mr)]
        else:
            init = [[zero] * nv for _ in range(mr)]
        bbase = builder.gep(b.data, [bo])

        def step(k, acc):
            bp = builder.gep(bbase, [builder.mul(k, ldb)])
            if b_t.dtype == types.float32:
                w = [builder.load(builder.bitcast(builder.gep(bp, [ir.Constant(i64, vw * v)]), vptr), align=4)
                     for v in range(nv)]
            else:  # half bits (a uint16 KV cache): widen as loaded
                hptr = ir.VectorType(ir.IntType(16), vw).as_pointer()
                w = [builder.fpext(builder.bitcast(builder.load(builder.bitcast(
                    builder.gep(bp, [ir.Constant(i64, vw * v)]), hptr), align=2), ir.VectorType(ir.HalfType(), vw)),
                    vec) for v in range(nv)]
            ak = builder.mul(k, aks)
            new = []
            for i in range(mr):
                s = builder.load(builder.gep(arow[i], [ak]))
                if a_t.dtype != types.float32:  # half bits (a uint16 KV cache): widen
                    s = builder.fpext(builder.bitcast(s, ir.HalfType()), f32)
                bc = builder.shuffle_vector(builder.insert_element(undef_vec, s, ir.Constant(ir.IntType(32), 0)),
                                            undef_vec, mask0)
                new.append([builder.call(fma, [bc, w[v], acc[i][v]]) for v in range(nv)])
            return new

        result = counted_loop(builder, n, 1, init, step, "micro")
        for i in range(mr):
            for v in range(nv):
                builder.store(result[i][v], cvp[i][v], align=4)
        return context.get_dummy_value()
    return codegen


def _make_micro(vw: int, nv: int, accumulate: bool, mr: int = 0):
    mr = mr or MR[nv]

    @intrinsic
    def micro(typingctx, c, co, ldc, a, ao, ars, aks, b, bo, ldb, n, rows):
        arrays = (c, a, b)
        ok = (all(isinstance(x, types.Array) for x in arrays)
              and c.dtype == types.float32 and a.dtype in (types.float32, types.uint16)
              and b.dtype in (types.float32, types.uint16)
              and all(isinstance(x, types.Integer) for x in (co, ldc, ao, ars, aks, bo, ldb, n, rows)))
        if not ok:
            return None
        i64 = types.int64
        return types.void(c, i64, i64, a, i64, i64, i64, b, i64, i64, i64, i64), _micro_ir(vw, nv, mr, accumulate)
    return micro


_set1, _set2, _set3, _set4 = (_make_micro(VW, v, False) for v in range(1, NV + 1))
_add1, _add2, _add3, _add4 = (_make_micro(VW, v, True) for v in range(1, NV + 1))
# Decoding's O += P V has 1-4 rows: blocks of exactly that many rows, 4 vectors of columns (the
# blocks above repeat the last row up to MR, which would double a 3-row step's work).
_pv1, _pv2, _pv3, _pv4 = (_make_micro(VW, NV, True, r) for r in range(1, 5))


@kernel
def _gemm(c, co, ldc, a, ao, ars, aks, b, bo, ldb, m, cols, n, accumulate):
    """c[co + i ldc + j] (+)= sum_k a[ao + i ars + k aks] b[bo + k ldb + j] for i < m, j < cols
    (a multiple of VW), k < n: flat offsets into the data of c, a, b (a may be any view: the
    offsets count from its first element)."""
    for j0 in range(0, cols, NV * VW):
        nv = min(NV, (cols - j0) // VW)
        mr = MR[nv]
        for i0 in range(0, m, mr):
            r = min(mr, m - i0)
            cc = co + i0 * ldc + j0
            aa = ao + i0 * ars
            bb = bo + j0
            if accumulate:
                if nv == 4:
                    _add4(c, cc, ldc, a, aa, ars, aks, b, bb, ldb, n, r)
                elif nv == 3:
                    _add3(c, cc, ldc, a, aa, ars, aks, b, bb, ldb, n, r)
                elif nv == 2:
                    _add2(c, cc, ldc, a, aa, ars, aks, b, bb, ldb, n, r)
                else:
                    _add1(c, cc, ldc, a, aa, ars, aks, b, bb, ldb, n, r)
            else:
                if nv == 4:
                    _set4(c, cc, ldc, a, aa, ars, aks, b, bb, ldb, n, r)
                elif nv == 3:
                    _set3(c, cc, ldc, a, aa, ars, aks, b, bb, ldb, n, r)
                elif nv == 2:
                    _set2(c, cc, ldc, a, aa, ars, aks, b, bb, ldb, n, r)
                else:
                    _set1(c, cc, ldc, a, aa, ars, aks, b, bb, ldb, n, r)


@kernel
def _gemm_few(c, ldc, a, lda, b, bo, ldb, m, cols, n):
    """c[i ldc + j] += sum_k a[i lda + k] b[bo + k ldb + j] for i < m, j < cols (a multiple
    of NV * VW), k < n: decoding's O (rows, hd) += P (rows, keys) V (keys, hd), in blocks of
    exactly the rows there are (at most 4 at a time)."""
    for j0 in range(0, cols, NV * VW):
        for i0 in range(0, m, 4):
            r = min(4, m - i0)
            cc = i0 * ldc + j0
            aa = i0 * lda
            if r == 4:
                _pv4(c, cc, ldc, a, aa, lda, 1, b, bo + j0, ldb, n, r)
            elif r == 3:
                _pv3(c, cc, ldc, a, aa, lda, 1, b, bo + j0, ldb, n, r)
            elif r == 2:
                _pv2(c, cc, ldc, a, aa, lda, 1, b, bo + j0, ldb, n, r)
            else:
                _pv1(c, cc, ldc, a, aa, lda, 1, b, bo + j0, ldb, n, r)


# ----------------------------------------------------------------------------------------------
# decoding's scores: a few query rows against key rows, 8 keys at a time
# ----------------------------------------------------------------------------------------------

FEW_TOKENS = 8  # query tokens that still take `_tile_few`, whatever their heads (see _attend)
SJ = 8  # keys per step of `_scores`: SR rows x SJ keys accumulators in registers
SR = 3  # query rows per call at most


def _reduce8(builder, vecs):
    """Eight <16 x float> -> one <8 x float> of their horizontal sums, in order: a transposing
    tree of shuffles and adds (3 levels pair vectors up, a fourth adds neighbouring lanes), about
    3 instructions per key instead of a full horizontal sum each."""
    i32 = ir.IntType(32)
    labels = [[k] * 16 for k in range(8)]     # which key's partial sums each lane holds

    def level(pairs, h):
        out, lab = [], []
        for (x, lx), (y, ly) in pairs:
            lo_idx, hi_idx = [], []
            for base in range(0, 16, 2 * h):   # each 2h-lane group of x and of y keeps its low h
                lo_idx += list(range(base, base + h)) + list(range(16 + base, 16 + base + h))
                hi_idx += list(range(base + h, base + 2 * h)) + list(range(16 + base + h, 16 + base + 2 * h))
            lo = builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(i32, 16), lo_idx))
            hi = builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(i32, 16), hi_idx))
            out.append(builder.fadd(lo, hi))
            both = lx + ly
            lab.append([both[i] for i in lo_idx])
        return out, lab

    vs, lab = list(vecs), labels
    for h in (8, 4, 2):
        vs, lab = level([((vs[2 * p], lab[2 * p]), (vs[2 * p + 1], lab[2 * p + 1])) for p in range(len(vs) // 2)], h)
    v, lv = vs[0], lab[0]                      # lanes 2i, 2i+1 hold halves of the same key's sum
    swap = [i ^ 1 for i in range(16)]
    v = builder.fadd(v, builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, 16), swap)))
    order = [lv.index(k) for k in range(8)]
    assert all(lv[i] == lv[i ^ 1] for i in range(16))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, 8), order))


def _scores_ir(rows: int):
    """s[so + r lds + j] = sum_i q[qo + r ldq + i] k[ko + j ldk + i] for r < rows, j < n rounded
    up to SJ (key rows past n - 1 repeat row n - 1), i < hd (a multiple of 16); k float32 or half
    bits (widened as loaded). Each key vector is loaded once for all rows; SJ keys' products
    accumulate in SJ vectors per row, reduced by `_reduce8`."""
    def codegen(context, builder, sig, args):
        s_t, _, _, q_t, _, _, k_t = sig.args[:7]
        s_v, so, lds, q_v, qo, ldq, k_v, ko, ldk, hd, n = args
        s = context.make_array(s_t)(context, builder, s_v).data
        q = context.make_array(q_t)(context, builder, q_v).data
        k = context.make_array(k_t)(context, builder, k_v).data
        i64, f32 = ir.IntType(64), ir.FloatType()
        vec = ir.VectorType(f32, 16)
        half = k_t.dtype != types.float32
        kvec = ir.VectorType(ir.IntType(16), 16) if half else vec
        fma = fma_intrinsic(builder, vec)
        zero = ir.Constant(vec, [0.0] * 16)
        c = lambda x: ir.Constant(i64, x)  # noqa: E731
        last = builder.sub(n, c(1))
        with cgutils.for_range_slice(builder, c(0), n, c(SJ)) as (j0, _):
            kp = []
            for jj in range(SJ):
                j = builder.add(j0, c(jj))
                j = builder.select(builder.icmp_signed("<", j, last), j, last)
                kp.append(builder.gep(k, [builder.add(ko, builder.mul(j, ldk))]))
            qp = [builder.gep(q, [builder.add(qo, builder.mul(c(r), ldq))]) for r in range(rows)]

            def step(i, acc):
                qv = [builder.load(builder.bitcast(builder.gep(qp[r], [i]), vec.as_pointer()), align=4)
                      for r in range(rows)]
                new = [[None] * SJ for _ in range(rows)]
                for jj in range(SJ):
                    kv = builder.load(builder.bitcast(builder.gep(kp[jj], [i]), kvec.as_pointer()),
                                      align=2 if half else 4)
                    if half:
                        kv = builder.fpext(builder.bitcast(kv, ir.VectorType(ir.HalfType(), 16)), vec)
                    for r in range(rows):
                        new[r][jj] = builder.call(fma, [qv[r], kv, acc[r][jj]])
                return new

            sums = counted_loop(builder, hd, 16, [[zero] * SJ for _ in range(rows)], step, "scores")
            v8 = ir.VectorType(f32, SJ)
            for r in range(rows):
                out = builder.gep(s, [builder.add(builder.add(so, builder.mul(c(r), lds)), j0)])
                builder.store(_reduce8(builder, sums[r]), builder.bitcast(out, v8.as_pointer()), align=4)
        return context.get_dummy_value()
    return codegen


def _make_scores(rows: int):
    @intrinsic
    def scores(typingctx, s, so, lds, q, qo, ldq, k, ko, ldk, hd, n):
        ok = (all(isinstance(x, types.Array) for x in (s, q, k)) and s.dtype == types.float32
              and q.dtype == types.float32 and k.dtype in (types.float32, types.uint16)
              and all(isinstance(x, types.Integer) for x in (so, lds, qo, ldq, ko, ldk, hd, n)))
        if not ok:
            return None
        i64 = types.int64
        return types.void(s, i64, i64, q, i64, i64, k, i64, i64, i64, i64), _scores_ir(rows)
    return scores


_scores1, _scores2, _scores3 = (_make_scores(r) for r in range(1, SR + 1))


@kernel
def _scores(s, lds, q, ldq, k, ko, ldk, m, hd, n):
    """s[r lds + j] = q[r ldq:] . k[ko + j ldk:] (hd each, a multiple of 16) for r < m,
    j < n (and up to the next multiple of SJ, repeating key n - 1): decoding's scores, SR rows at
    a time. k is the cache's data (float32 or half bits) read in place."""
    for r0 in range(0, m, SR):
        r = min(SR, m - r0)
        if r == 3:
            _scores3(s, r0 * lds, lds, q, r0 * ldq, ldq, k, ko, ldk, hd, n)
        elif r == 2:
            _scores2(s, r0 * lds, lds, q, r0 * ldq, ldq, k, ko, ldk, hd, n)
        else:
            _scores1(s, r0 * lds, lds, q, r0 * ldq, ldq, k, ko, ldk, hd, n)


# ----------------------------------------------------------------------------------------------
# the softmax, elementwise over rows
# ----------------------------------------------------------------------------------------------

def _exp_ir(builder, x, vw):
    """exp(x) for x <= 0 on a <vw x float> (no libm): exp(v) = 2^n e^f with n = round(v log2 e),
    f = v - n ln 2 in [-ln2/2, ln2/2], e^f from Cephes' expf polynomial (relative error ~1e-7), 2^n
    built as float bits. v is clamped at EXP_LO, where 2^n is exactly 0, so -inf gives 0; exp(0)
    is exactly 1."""
    f32, i32 = ir.FloatType(), ir.IntType(32)
    vec, ivec = ir.VectorType(f32, vw), ir.VectorType(i32, vw)

    def c(v):
        return ir.Constant(vec, [v] * vw)

    mul, add, sub = builder.fmul, builder.fadd, builder.fsub
    v = builder.select(builder.fcmp_ordered("<", x, c(EXP_LO)), c(EXP_LO), x)
    ni = builder.fptosi(sub(mul(v, c(LOG2E)), c(0.5)), ivec)  # v <= 0: truncation rounds to nearest
    k = builder.sitofp(ni, vec)
    f = add(sub(v, mul(k, c(0.693359375))), mul(k, c(2.12194440e-4)))
    p = c(1.9875691500e-4)
    for coef in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = add(mul(p, f), c(coef))
    e = add(add(mul(p, mul(f, f)), f), c(1.0))
    b = builder.add(ni, ir.Constant(ivec, [127] * vw))
    b = builder.select(builder.icmp_signed(">", b, ir.Constant(ivec, [0] * vw)), b, ir.Constant(ivec, [0] * vw))
    two_n = builder.bitcast(builder.shl(b, ir.Constant(ivec, [23] * vw)), vec)
    return mul(e, two_n)


def _softmax_ir(vw: int):
    """The online-softmax step of a tile, vw rows at a time: see `_softmax`."""
    def codegen(context, builder, sig, args):
        st, mx, den, al, lo, hi = [context.make_array(t)(context, builder, v).data
                                   for t, v in zip(sig.args, args) if isinstance(t, types.Array)]
        n, R, j0, mask = args[1], args[2], args[8], args[9]
        i64, i32, f32 = ir.IntType(64), ir.IntType(32), ir.FloatType()
        vec, ivec = ir.VectorType(f32, vw), ir.VectorType(i32, vw)

        def ptr(base, i, t):
            return builder.bitcast(builder.gep(base, [i]), t.as_pointer())

        def splat(x, t):
            return builder.shuffle_vector(builder.insert_element(ir.Constant(t, ir.Undefined), x,
                                                                 ir.Constant(i32, 0)),
                                          ir.Constant(t, ir.Undefined), ir.Constant(ivec, [0] * vw))

        ninf = ir.Constant(vec, [float("-inf")] * vw)
        acc = cgutils.alloca_once(builder, vec)
        masked = builder.icmp_signed("!=", mask, ir.Constant(i64, 0))
        with cgutils.for_range_slice(builder, ir.Constant(i64, 0), R, ir.Constant(i64, vw)) as (cb, _):
            m_old = builder.load(ptr(mx, cb, vec), align=4)
            lov = builder.load(ptr(lo, cb, ivec), align=4)
            hiv = builder.load(ptr(hi, cb, ivec), align=4)
            builder.store(m_old, acc)
            with cgutils.for_range(builder, n) as loop:       # running max; masked keys -> -inf
                j = loop.index
                xp = ptr(st, builder.add(builder.mul(j, R), cb), vec)
                x = builder.load(xp, align=4)
                with builder.if_then(masked):
                    key = splat(builder.trunc(builder.add(j0, j), i32), ivec)
                    hidden = builder.or_(builder.icmp_signed("<=", key, lov), builder.icmp_signed(">", key, hiv))
                    x = builder.select(hidden, ninf, x)
                    builder.store(x, xp, align=4)
                x = builder.load(xp, align=4)
                b = builder.load(acc)
                builder.store(builder.select(builder.fcmp_ordered(">", x, b), x, b), acc)
            best = builder.load(acc)
            # a row that has seen no key yet keeps max -inf; its weights come out 0 against 0
            safe = builder.select(builder.fcmp_ordered("==", best, ninf), ir.Constant(vec, [0.0] * vw), best)
            alpha = _exp_ir(builder, builder.fsub(m_old, safe), vw)     # m_old = -inf at first: 0
            builder.store(alpha, ptr(al, cb, vec), align=4)
            builder.store(best, ptr(mx, cb, vec), align=4)
            dp = ptr(den, cb, vec)
            builder.store(builder.fmul(builder.load(dp, align=4), alpha), acc)
            with cgutils.for_range(builder, n) as loop:       # weights, and their sum
                xp = ptr(st, builder.add(builder.mul(loop.index, R), cb), vec)
                e = _exp_ir(builder, builder.fsub(builder.load(xp, align=4), safe), vw)
                builder.store(e, xp, align=4)
                builder.store(builder.fadd(builder.load(acc), e), acc)
            builder.store(builder.load(acc), dp, align=4)
        return context.get_dummy_value()
    return codegen


def _make_softmax(vw: int):
    @intrinsic
    def softmax(typingctx, st, n, R, mx, den, alpha, lo, hi, j0, mask):
        f = (st, mx, den, alpha)
        ok = (all(isinstance(x, types.Array) and x.dtype == types.float32 for x in f)
              and all(isinstance(x, types.Array) and x.dtype == types.int32 for x in (lo, hi))
              and all(isinstance(x, (types.Integer, types.Boolean)) for x in (n, R, j0, mask)))
        if not ok:
            return None
        i64 = types.int64
        return types.void(st, i64, i64, mx, den, alpha, lo, hi, i64, i64), _softmax_ir(vw)
    return softmax


_softmax_vw = _make_softmax(VW)


@kernel
def _softmax(st, n, R, mx, den, alpha, lo, hi, j0, mask):
    """The online softmax over scores st (n keys, R rows) flat, keys j0..: hide key j from row c
    unless lo[c] < j <= hi[c] (when mask), then per row new max M = max(mx, scores),
    alpha = exp(mx - M), st <- exp(st - M), den <- den alpha + sum of st, mx <- M. R is a
    multiple of VW."""
    _softmax_vw(st, n, R, mx, den, alpha, lo, hi, j0, 1 if mask else 0)


@kernel
def _widen(dst, src, j0, n):
    """dst[:n * hd] (n, hd) flat <- rows j0..j0+n-1 of a half-float cache src (slots, hd), as f32."""
    hd = src.shape[1]
    for j in range(n):
        row = src[j0 + j]
        o = j * hd
        for i in range(hd):
            dst[o + i] = kv_get(row[i])


@kernel
def _tile(kc, vc, j0, n, R, lo, hi, mask, qt, st, ot, mx, den, alpha, kw, vw):
    """Keys j0..j0+n-1 of one kv head's cache kc, vc (slots, hd) against the task's R rows: scores
    into st (n, R) flat, masked where mask (row c sees keys lo[c] < j <= hi[c]), folded into the
    running max mx, sum den and output ot (hd, R) flat. A half-float cache is widened into the
    f32 tiles kw, vw (KT * hd) first, once per tile rather than once per use."""
    hd = kc.shape[1]
    if kc.itemsize == 2:
        _widen(kw, kc, j0, n)
        _widen(vw, vc, j0, n)
        _gemm(st, 0, R, kw, 0, hd, 1, qt, 0, R, n, R, hd, False)         # S^T = K (Q scaled)^T
    else:
        _gemm(st, 0, R, kc, j0 * (kc.strides[0] // 4), kc.strides[0] // 4, 1, qt, 0, R, n, R, hd, False)
    _softmax(st, n, R, mx, den, alpha, lo, hi, j0, mask)
    rescale = False
    for c in range(R):
        rescale |= alpha[c] != np.float32(1.0)
    if rescale:   # some row's max moved: its output scales by exp(old max - new max)
        for i in range(hd):
            o = i * R
            for c in range(R):
                ot[o + c] *= alpha[c]
    if kc.itemsize == 2:
        _gemm(ot, 0, R, vw, 0, 1, hd, st, 0, R, hd, R, n, True)       # O^T += V^T P^T
    else:
        vs = vc.strides[0] // 4
        _gemm(ot, 0, R, vc, j0 * vs, 1, vs, st, 0, R, hd, R, n, True)


@kernel
def _exp_row(x, bits):
    """x <- exp(x) for x <= 0, returning the sum: `_exp_ir` as a flat loop LLVM vectorizes, 2^n
    built in `bits` (int32, len(x))."""
    n = x.shape[0]
    for j in range(n):
        v = max(x[j], np.float32(EXP_LO))
        ni = np.int32(v * np.float32(LOG2E) - np.float32(0.5))
        k = np.float32(ni)
        f = v - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
        p = ((((np.float32(1.9875691500e-4) * f + np.float32(1.3981999507e-3)) * f
               + np.float32(8.3334519073e-3)) * f + np.float32(4.1665795894e-2)) * f
             + np.float32(1.6666665459e-1)) * f + np.float32(5.0000001201e-1)
        x[j] = p * (f * f) + f + np.float32(1.0)
        bits[j] = max(ni + np.int32(127), np.int32(0)) << 23
    scale = bits.view(np.float32)
    total = np.float32(0.0)
    for j in range(n):
        e = x[j] * scale[j]
        x[j] = e
        total += e
    return total


@kernel
def _max_row(x):
    """The largest of x (no NaN; -inf if empty) as an integer reduction, which vectorizes (a float
    max does not without fastmath's no-NaN flag): a float's bits, its magnitude bits flipped when
    negative, order as signed integers do."""
    m = np.int32(-2139095041)   # -inf's bits 0xff800000 so mapped: an empty x gives -inf
    for j in range(x.shape[0]):
        i = float_bits(x[j])
        m = max(m, i ^ ((i >> 31) & np.int32(0x7FFFFFFF)))
    return bits_float(m ^ ((m >> 31) & np.int32(0x7FFFFFFF)))


@kernel
def few_scores(s, lds, qs, ldq, kc, j0, m, n):
    """s[r lds + j] = qs[r ldq:r ldq + hd] . kc[j0 + j] for r < m, j < n: a few query rows (flat qs)
    against key rows of a cache (keys, hd), float32 or half bits. With AVX-512 the IR scores block
    (`_scores`), which also writes j up to the next multiple of SJ (so lds must leave room); else
    four rows per pass of the keys, each key row loaded once (`dot4`)."""
    hd = kc.shape[1]
    if VW == 16 and hd % 16 == 0:
        ks = kc.strides[0] // kc.itemsize
        _scores(s, lds, qs, ldq, kc, j0 * ks, ks, m, hd, n)
        return
    for c0 in range(0, m, 4):
        c1 = min(c0 + 4, m)
        q0 = qs[c0 * ldq:c0 * ldq + hd]
        q1 = qs[min(c0 + 1, c1 - 1) * ldq:min(c0 + 1, c1 - 1) * ldq + hd]   # past the last row: repeat it
        q2 = qs[min(c0 + 2, c1 - 1) * ldq:min(c0 + 2, c1 - 1) * ldq + hd]
        q3 = qs[min(c0 + 3, c1 - 1) * ldq:min(c0 + 3, c1 - 1) * ldq + hd]
        r0 = s[c0 * lds:c0 * lds + n]
        r1 = s[min(c0 + 1, c1 - 1) * lds:min(c0 + 1, c1 - 1) * lds + n]
        r2 = s[min(c0 + 2, c1 - 1) * lds:min(c0 + 2, c1 - 1) * lds + n]
        r3 = s[min(c0 + 3, c1 - 1) * lds:min(c0 + 3, c1 - 1) * lds + n]
        for j in range(n):
            s0, s1, s2, s3 = dot4(kc[j0 + j], q0, q1, q2, q3)
            r3[j] = s3  # the repeated rows write the same value to the same place, last row last
            r2[j] = s2
            r1[j] = s1
            r0[j] = s0


@kernel(inline=True)
def dot4(k, q0, q1, q2, q3):
    """The dot products of one key row k (float32 or half bits) with four query rows, k loaded
    (and widened) once for all four."""
    s0 = np.float32(0.0)
    s1 = np.float32(0.0)
    s2 = np.float32(0.0)
    s3 = np.float32(0.0)
    for i in range(k.shape[0]):
        x = kv_get(k[i])
        s0 += q0[i] * x
        s1 += q1[i] * x
        s2 += q2[i] * x
        s3 += q3[i] * x
    return s0, s1, s2, s3


@kernel
def _tile_few(kc, vc, j0, n, rows, lo, hi, qs, s, o, mx, den, bits):
    """`_tile` for a few rows (decoding, FEW_TOKENS tokens), where rows along the vector lanes would leave most
    lanes idle: everything runs along head_dim or the keys instead (`few_scores`, the softmax
    along each row, O += P V), with qs, o (rows, hd) and s (rows, KT) flat."""
    hd = kc.shape[1]
    b = 0
    for c in range(rows):  # scores from the tile's first key to the last any row sees
        b = max(b, min(n, hi[c] + 1 - j0))
    if b > 0:
        few_scores(s, KT, qs, hd, kc, j0, rows, b)
    for c in range(rows):
        row = s[c * KT:c * KT + n]
        a = max(0, lo[c] + 1 - j0)                       # visible keys j0 + a .. j0 + b - 1
        b = min(n, hi[c] + 1 - j0)
        if b <= a:
            row[:] = 0.0
            continue
        row[:a] = 0.0
        row[b:] = 0.0
        best = max(mx[c], _max_row(row[a:b]))
        vis = row[a:b]
        for j in range(b - a):
            vis[j] -= best
        total = _exp_row(vis, bits[:b - a])
        if best == mx[c]:
            den[c] += total
        else:
            alpha = np.exp(mx[c] - best)                 # mx = -inf at first: alpha = 0
            den[c] = den[c] * alpha + total
            mx[c] = best
            oc = o[c * hd:(c + 1) * hd]
            for i in range(hd):
                oc[i] *= alpha
    if hd % (NV * VW) == 0:  # O (rows, hd) += P (rows, keys) V (keys, hd): register blocks of the rows
        vs = vc.strides[0] // vc.itemsize
        _gemm_few(o, hd, s, KT, vc, j0 * vs, vs, rows, hd, n)
        return
    if hd % VW == 0:
        vs = vc.strides[0] // vc.itemsize
        _gemm(o, 0, hd, s, 0, KT, 1, vc, j0 * vs, vs, rows, hd, n, True)
        return
    for j in range(n):
        vj = vc[j0 + j]
        for c in range(rows):
            p = s[c * KT + j]
            oc = o[c * hd:(c + 1) * hd]
            for i in range(hd):
                oc[i] += p * kv_get(vj[i])


@kernel
def _attend(out, q, kc, vc, t0, m, kv, group, p0, window, pattern, buf, ka, kz, part, few_ok):
    """Tokens t0..t0+m-1 (one sequence, one query block, positions p0..) over the cache kc, vc
    (slots of that sequence from its start, hd) of kv head kv, for the `group` query heads that
    read it: row c is head kv * group + c // m, token t0 + c % m. -> out[t, h].

    Only keys ka <= j < kz count (a piece of a split decode step). With part.size > 0 the result
    stays unnormalized in part: the rows' running max, their sums, then O (rows, hd).
    few_ok: up to FEW_TOKENS tokens may take the few-rows tile (see `_attention_rows`)."""
    block, n_global, n_local, stride = pattern
    hd = q.shape[2]
    used = m * group
    # Decoding, and chunks of up to FEW_TOKENS tokens (a draft's verification): rows along
    # head_dim instead (`_tile_few`). Each row's arithmetic there does not depend on how many
    # rows there are, so a token's attention is then bit for bit what it is decoded alone.
    few = few_ok and m <= FEW_TOKENS
    R = -(-used // 8) * 8 if few else -(-used // VW) * VW
    Rmax = _rows(group)
    qt = buf[:hd * R]                               # Q^T (hd, R) scaled by 1/sqrt(hd); Q (R, hd) if few
    ot = buf[hd * Rmax:hd * Rmax + hd * R]          # O^T (hd, R); O (R, hd) if few
    at = 2 * hd * Rmax
    st = buf[at:at + KT * R]                        # S^T (keys, R), then P^T
    at += KT * Rmax
    mx = buf[at:at + R]                             # running max, sum, last rescale per row
    den = buf[at + Rmax:at + Rmax + R]
    alpha = buf[at + 2 * Rmax:at + 2 * Rmax + R]
    lo = buf[at + 3 * Rmax:at + 3 * Rmax + R].view(np.int32)   # row c sees keys lo < j <= hi
    hi = buf[at + 4 * Rmax:at + 4 * Rmax + R].view(np.int32)
    bits = buf[at + 5 * Rmax:at + 5 * Rmax + KT].view(np.int32)    # exp's 2^n (few rows)
    at += 5 * Rmax + KT
    kw = buf[at:at + KT * hd]                       # K and V tiles widened from a half-float cache
    vw = buf[at + KT * hd:at + 2 * KT * hd]
    scale = np.float32(1.0 / math.sqrt(hd))
    for c in range(R):
        p = p0 + c % m
        hi[c] = p
        lo[c] = p - window if window > 0 else -1
        mx[c] = -np.inf
        den[c] = 0.0
    for i in range(hd):
        for c in range(R):
            qt[i * R + c] = 0.0
            ot[i * R + c] = 0.0
    for c in range(used):
        h = kv * group + c // m
        t = t0 + c % m
        for i in range(hd):
            if few:
                qt[c * hd + i] = q[t, h, i] * scale
            else:
                qt[i * R + c] = q[t, h, i] * scale
    last = p0 + m - 1
    first_key = max(0, p0 - window + 1) if window > 0 else 0
    qb = p0 // block
    for kb in range(first_key // block, qb + 1):
        d = qb - kb
        if not (kb < n_global or d <= n_local or (stride > 0 and d % stride == 0)):
            continue
        k0 = max(kb * block, first_key, ka)
        k1 = min((kb + 1) * block, last + 1, kz)
        for j0 in range(k0, k1, KT):
            n = min(KT, k1 - j0)
            # mask unless every row sees every key: causal edge, or the window's far edge
            mask = j0 + n - 1 > p0 or (window > 0 and j0 <= last - window)
            if few:
                _tile_few(kc, vc, j0, n, used, lo, hi, qt, st, ot, mx, den, bits)
            else:
                _tile(kc, vc, j0, n, R, lo, hi, mask, qt, st, ot, mx, den, alpha, kw, vw)
    if part.shape[0] > 0:
        for c in range(used):
            part[c] = mx[c]
            part[used + c] = den[c]
            o = 2 * used + c * hd
            for i in range(hd):
                part[o + i] = ot[c * hd + i] if few else ot[i * R + c]
        return
    for c in range(used):
        h = kv * group + c // m
        t = t0 + c % m
        inv = np.float32(1.0) / den[c]
        for i in range(hd):
            out[t, h, i] = (ot[c * hd + i] if few else ot[i * R + c]) * inv


@kernel
def _decode_pieces(n_keys, KV, threads):
    """How many pieces to cut one decode step's keys into, per kv head: up to 4 tasks a thread, at
    least SPLIT_MIN keys per piece, SPLIT_MAX pieces in all; of those, the fewest pieces whose
    tasks keep the busiest thread's share of the keys smallest (3 kv heads on 2 threads: 2 pieces,
    6 tasks of half the keys, where 3 pieces would leave one thread 5 of 9 tasks)."""
    most = max(1, min(-(-4 * threads // KV), n_keys // SPLIT_MIN, SPLIT_MAX // KV))
    best = 1
    for p in range(2, most + 1):
        # the busiest thread's keys, in units of n_keys / (p * best): rounds of tasks times their size
        if -(-KV * p // threads) * best < -(-KV * best // threads) * p:
            best = p
    return best


@kernel(parallel=True)
def _decode_split(out, q, k_cache, v_cache, l, base, slot, window, pattern, scratch, pieces):
    # m = len(q) tokens at slots slot..slot+m-1 of one sequence from base (a decode step, or a
    # draft's check), their keys cut into `pieces` contiguous ranges per kv head so that all
    # threads work (a step has only KV tasks otherwise). Each piece leaves its rows' running max,
    # sum and unnormalized output in the tail of scratch row 0 (flash-decoding); then they merge.
    # The pieces are those of the first token's decode step: the caller checks that they are every
    # token's (`_split_alike`), so each token's result is bit for bit its decode step's, the keys a
    # later token adds being masked out for the earlier ones.
    m, H, hd = q.shape
    KV = k_cache.shape[1]
    group = H // KV
    n_keys = slot - base + 1
    size = (2 + hd) * group * m
    tail = scratch.shape[1] - SPLIT_MAX * FEW_TOKENS * (2 + hd) * group
    per = _piece_keys(n_keys, pieces)
    for task in prange(KV * pieces):
        kv = task // pieces
        p = task % pieces
        part = scratch[0, tail + task * size:tail + (task + 1) * size]
        _attend(out, q, k_cache[l, kv, base:], v_cache[l, kv, base:], 0, m, kv, group, n_keys - 1, window,
                pattern, scratch[get_thread_id()], p * per, min(n_keys + m - 1, (p + 1) * per), part, True)
    used = group * m
    for kv in range(KV):
        for c in range(used):  # row c: head kv * group + c // m, token c % m
            best = -np.inf
            for p in range(pieces):
                best = max(best, scratch[0, tail + (kv * pieces + p) * size + c])
            t = c % m
            h = kv * group + c // m
            for i in range(hd):
                out[t, h, i] = 0.0
            den = np.float32(0.0)
            for p in range(pieces):
                part = scratch[0, tail + (kv * pieces + p) * size:tail + (kv * pieces + p + 1) * size]
                if part[c] == -np.inf:   # no key of this piece is visible
                    continue
                w = np.exp(part[c] - best)
                den += part[used + c] * w
                o = 2 * used + c * hd
                for i in range(hd):
                    out[t, h, i] += part[o + i] * w
            inv = np.float32(1.0) / den
            for i in range(hd):
                out[t, h, i] *= inv


@kernel
def _piece_keys(n_keys, pieces):
    """Keys per piece of a split decode step: whole tiles."""
    per = -(-n_keys // pieces)
    return -(-per // KT) * KT


@kernel
def _split_alike(starts, slots, window, pattern, KV, threads):
    """Pieces (> 1) that split tokens 0..T-1's keys as each one's decode step does, or 0: one
    sequence at consecutive slots, one query block, a window that hides no key, and the same
    pieces of the same length for every token."""
    T = slots.shape[0]
    base = starts[0]
    n0 = slots[0] - base + 1
    pieces = _decode_pieces(n0, KV, threads)
    if pieces < 2:
        return 0
    for t in range(T):
        n = slots[t] - base + 1
        if (starts[t] != base or slots[t] != slots[0] + t or (n - 1) // pattern[0] != (n0 - 1) // pattern[0]
                or (window > 0 and n > window) or _decode_pieces(n, KV, threads) != pieces
                or _piece_keys(n, pieces) != _piece_keys(n0, pieces)):
            return 0
    return pieces


@kernel
def attention(out, q, k_cache, v_cache, l, starts, slots, window, pattern, scratch):
    """Grouped-query causal attention of each token over its own stretch of the cache.

    q (T, heads, head_dim); caches (L, kv_heads, slots_total, head_dim), float32 or half bits
    (uint16), layer l; token t attends
    to slots starts[t]..slots[t] (several sequences share one cache in separate stretches), thinned
    by `pattern` = (block, global_blocks, local_blocks, stride) as the module docstring says, and
    to the last `window` of them when window > 0. Query head h reads kv head h // (heads // kv_heads).
    out (T, heads, head_dim). scratch f32 (threads, >= scratch_size(head_dim, group)).
    """
    T, H, hd = q.shape
    KV = k_cache.shape[1]
    if T <= FEW_TOKENS:
        # A decode step over many keys splits them into pieces (flash-decoding). A few tokens at
        # once (a prompt-lookup draft's check) take exactly the path each would take alone, so
        # their results are bit for bit their decode steps': together when their pieces are
        # alike (each key read once for all of them), else one by one.
        pieces = _split_alike(starts, slots, window, pattern, KV, scratch.shape[0])
        if pieces > 1:
            _decode_split(out, q, k_cache, v_cache, l, starts[0], slots[0], window, pattern, scratch, pieces)
            return
        split = False
        for t in range(T):
            if _decode_pieces(slots[t] - starts[t] + 1, KV, scratch.shape[0]) > 1:  # a scratch row per thread
                split = True
        if split:
            for t in range(T):
                pieces = _decode_pieces(slots[t] - starts[t] + 1, KV, scratch.shape[0])
                if pieces > 1:
                    _decode_split(out[t:t + 1], q[t:t + 1], k_cache, v_cache, l, starts[t], slots[t], window,
                                  pattern, scratch, pieces)
                else:
                    _attention_rows(out[t:t + 1], q[t:t + 1], k_cache, v_cache, l, starts[t:t + 1],
                                    slots[t:t + 1], window, pattern, scratch)
            return
    _attention_rows(out, q, k_cache, v_cache, l, starts, slots, window, pattern, scratch)


@kernel(parallel=True)
def _attention_rows(out, q, k_cache, v_cache, l, starts, slots, window, pattern, scratch):
    # `attention` without a split: groups of up to QT tokens x a kv head, one task each
    T, H, hd = q.shape
    KV = k_cache.shape[1]
    group = H // KV
    block = pattern[0]
    # A few tokens (a draft's check) in two groups: twice as many tasks as kv heads to share out
    # (3 kv heads on 2 threads would leave one idle a third of the time); each key tile is then
    # read twice, from cache.
    qt = QT if T > FEW_TOKENS else (T + 1) // 2
    groups = (T + qt - 1) // qt
    for task in prange(groups * KV):
        # Later tokens see more keys: order the groups first, last, second, second to last...
        # so that the even split of the tasks over threads gives each a similar share of work.
        i = task // KV
        g = i // 2 if i % 2 == 0 else groups - 1 - i // 2
        g0 = g * qt
        g1 = min(T, g0 + qt)
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
            # The few-rows tile takes a call of up to FEW_TOKENS tokens (decoding, a draft's
            # check), or a sequence's every token in a longer call (batched decoding). A prefill's
            # last group of a few tokens does not: then a prompt's rows come out the same however
            # it is cut into chunks longer than FEW_TOKENS (a server's reused prefix).
            whole = (t == 0 or starts[t - 1] != base) and (e == T or starts[e] != base)
            _attend(out, q, k_cache[l, kv, base:], v_cache[l, kv, base:], t, e - t, kv, group,
                    slots[t] - base, window, pattern, buf, 0, slots[e - 1] - base + 1, buf[:0],
                    T <= FEW_TOKENS or whole)
            t = e
