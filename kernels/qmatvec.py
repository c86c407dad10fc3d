"""The decode matvec with 8-bit activations: out[t] = W[l] @ x[t] for T <= 8 tokens, llama.cpp's way.

The activations come quantized per token per 32-element block (xq int8, scale xd, and
xs = xd * sum of the block's xq). Every weight kind is made unsigned (Q4: the nibble, 0..15;
Q8_0: the byte XOR 0x80, = q + 128), so one AVX512-VNNI `vpdpbusd` multiplies 64 unsigned weight
bytes by 64 signed activation bytes and sums each four products into an int32 lane:

    out[t, r] = sum_b s[r, b] xd[t, b] (sum_j u[r, 32b + j] xq[t, 32b + j])  +  sum_b mn[r, b] xs[t, b]

with mn = m (Q4_1), -8 s (Q4_0), -128 s (Q8_0). The integer sums are exact; only the per-block
float scaling rounds.

Each weight row is read once and used for every token while it is in L1, so the call streams the
weights at memory speed. The row loop is LLVM IR through a Numba `@intrinsic` (as in
kernels/gemm.py): per 64-element stretch (two blocks) it unpacks the weights to 64 bytes in
natural element order, then for each token does one vpdpbusd into a zeroed int32 vector (lanes
0-7 hold the first block, 8-15 the second), converts it to float and multiplies-adds it with
[s xd of block 0 x8, s xd of block 1 x8] into a float accumulator, reduced once per row. The min
term accumulates in a 2-float vector alongside; an odd last block runs the same step on a
zero-filled upper half. At T <= 2 two rows go together (ROWS_AT_ONCE). Every stretch prefetches
the weight bytes PREFETCH ahead.

The int32 lane sums come from the ISA tier's dot product (kernels/isa.py, simd.dot_bytes): one
vpdpbusd, two 256-bit {vex} vpdpbusd (AVX-VNNI), vpmaddubsw + vpmaddwd per register (AVX2 and
AVX-512 without VNNI; there Q8_0 bytes enter signed, as |q| against xq sign(q), with mn = 0,
since vpmaddubsw's int16 pair sums would saturate on q + 128), or plain widening multiplies.
The 64-byte stretches stay the unit on 256-bit tiers: LLVM splits each into two registers.
"""
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .formats import Q4_0, Q4_1, Q5, Q6, Q8_0, QK
from .jit import kernel
from .isa import TIER, Tier
from .simd import dot_bytes
from .simd import fma as fma_intrinsic

MAX_T = 8  # tokens per call
PASS_T = 4  # tokens per pass over the weights: one specialised row loop per count 1..PASS_T and
            # kind; 5..8 tokens take two passes (compiling 8 x 3 loops cost 7.6 s of the first run)
# Rows the row loop takes at a time, by token count: two rows share each activation load and
# overlap their accumulator chains (measured ~5-10% at T = 1, 2; nothing at T >= 4, where
# 2 x T accumulators start to crowd the 32 registers).
ROWS_AT_ONCE = {1: 2, 2: 2}
# Each row's weight bytes are prefetched this far ahead (a few rows on; a prefetch past the end
# never faults): where the hardware prefetcher alone cannot keep a core's stream busy, the decode
# matmuls ran 1.2-1.4x faster with it; 1 and 8 KB did no better.
PREFETCH = 4096

# Flags for every float instruction written here. Numba adds its fastmath flags (reassoc,
# contract, ...) to each float instruction that has none, the intrinsic's included, and LLVM then
# reordered the row sums differently in different compiles of the same kernel: the prange body
# compiled on its own and its copy inside the caller came out a last bit apart, which 8-bit
# activations turn into different logits (tests/test_jit_cache.py). nsz alone reorders nothing.
STRICT = ("nsz",)

_i8, _i32, _i64, _f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
_v64i8, _v32i8, _v16i8 = ir.VectorType(_i8, 64), ir.VectorType(_i8, 32), ir.VectorType(_i8, 16)
_v16i32, _v16f32, _v2f32 = ir.VectorType(_i32, 16), ir.VectorType(_f32, 16), ir.VectorType(_f32, 2)
_v4f32 = ir.VectorType(_f32, 4)


def _c(ty, v):
    return ir.Constant(ty, v)


def _mask(ix):
    return ir.Constant(ir.VectorType(_i32, len(ix)), list(ix))


def _load(builder, ptr, ty):
    """Unaligned load of a `ty` vector from an element pointer."""
    return builder.load(builder.bitcast(ptr, ty.as_pointer()), align=1)


def _loop(builder, start, stop, init, body, name):
    """for i in range(start, stop): vals = body(i, vals); returns the final vals (phis)."""
    pre = builder.basic_block
    loop = builder.append_basic_block(name)
    done = builder.append_basic_block(name + ".done")
    builder.cbranch(builder.icmp_signed("<", start, stop), loop, done)
    builder.position_at_end(loop)
    i = builder.phi(_i64)
    i.add_incoming(start, pre)
    vals = [builder.phi(v.type) for v in init]
    for p, v in zip(vals, init):
        p.add_incoming(v, pre)
    new = body(i, vals)
    i1 = builder.add(i, _c(_i64, 1))
    end = builder.basic_block
    i.add_incoming(i1, end)
    for p, v in zip(vals, new):
        p.add_incoming(v, end)
    builder.cbranch(builder.icmp_signed("<", i1, stop), loop, done)
    builder.position_at_end(done)
    return _join(builder, init, pre, new, end)


def _if(builder, cond, init, body, name):
    """vals = body(vals) if cond else vals."""
    pre = builder.basic_block
    then = builder.append_basic_block(name)
    done = builder.append_basic_block(name + ".done")
    builder.cbranch(cond, then, done)
    builder.position_at_end(then)
    new = body(init)
    end = builder.basic_block
    builder.branch(done)
    builder.position_at_end(done)
    return _join(builder, init, pre, new, end)


def _join(builder, init, pre, new, end):
    """Phis at the current block: each value is init's coming from block pre, new's from end."""
    out = [builder.phi(v.type) for v in init]
    for p, a, b in zip(out, init, new):
        p.add_incoming(a, pre)
        p.add_incoming(b, end)
    return out


def _hsum(builder, v):
    """Horizontal sum of a float vector (power-of-two length) by halving."""
    n = v.type.count
    while n > 1:
        n //= 2
        v = builder.fadd(builder.shuffle_vector(v, v, _mask(range(n))),
                         builder.shuffle_vector(v, v, _mask(range(n, 2 * n))), flags=STRICT)
    return builder.extract_element(v, _c(_i32, 0))


def _rows_ir(tier: Tier):
    """Codegen: rows r0..r1 of W[l] times all T tokens (T = xq.shape[0], 1..PASS_T)."""
    def codegen(context, builder, sig, args):
        arrs = [context.make_array(ty)(context, builder, v) for ty, v in zip(sig.args[:7], args[:7])]
        out, xq, xd, xs, q, s, m = arrs
        l, r0, r1, kind = args[7:]
        T, n = cgutils.unpack_tuple(builder, xq.shape, 2)
        ldo = cgutils.unpack_tuple(builder, out.shape, 2)[1]
        _, nrows, rb = cgutils.unpack_tuple(builder, q.shape, 3)
        gs = cgutils.unpack_tuple(builder, s.shape, 3)[2]  # scale groups per row
        ldd = cgutils.unpack_tuple(builder, xd.shape, 2)[1]
        lds = cgutils.unpack_tuple(builder, xs.shape, 2)[1]  # per 32, or per 16 for Q6
        half_n = builder.sdiv(n, _c(_i64, 2))  # where Q5 / Q6 rows' high-bit planes start
        nb = builder.sdiv(n, _c(_i64, QK))
        pairs = builder.sdiv(nb, _c(_i64, 2))
        odd = builder.icmp_signed("!=", builder.srem(nb, _c(_i64, 2)), _c(_i64, 0))
        fma, fma2 = fma_intrinsic(builder, _v16f32, tier), fma_intrinsic(builder, _v2f32, tier)
        fma4 = fma_intrinsic(builder, _v4f32, tier)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32]), "llvm.prefetch.p0i8")
        zero16, zero2 = _c(_v16f32, [0.0] * 16), _c(_v2f32, [0.0] * 2)
        lo_hi = [0] * 8 + [1] * 8
        # Q4: [blk0, blk0, blk1, blk1] 128-bit lanes; the 2nd and 4th lanes take the high nibbles
        q4_lanes = _mask(list(range(16)) * 2 + list(range(16, 32)) * 2)
        q4_shift = _c(ir.VectorType(_i64, 8), [0, 0, 4, 4, 0, 0, 4, 4])
        q6_shift = _c(ir.VectorType(_i64, 8), [0, 0, 2, 2, 4, 4, 6, 6])
        low4 = _c(_v64i8, [15] * 64)
        flip = _c(_v64i8, [0x80] * 64)
        half = _mask(list(range(32)) + list(range(32, 64)))  # <32 x i8>, zeros -> <64 x i8>

        def unpack_q4(v64):
            w = builder.lshr(builder.bitcast(v64, ir.VectorType(_i64, 8)), q4_shift)
            return builder.and_(builder.bitcast(w, _v64i8), low4)

        def unpack_high(v64, kd, plane):
            """Q5: OR the fifth bits (8 bytes: bit e, element e) into bit 4 of the 64 values;
            Q6: the top two bits (16 bytes: byte j bits 2k, element 16k + j) into bits 4-5."""
            if kd == Q5:
                bits = builder.bitcast(builder.load(builder.bitcast(plane, _i64.as_pointer()), align=1),
                                       ir.VectorType(ir.IntType(1), 64))
                return builder.or_(v64, builder.shl(builder.zext(bits, _v64i8), _c(_v64i8, [4] * 64)))
            v = _load(builder, plane, _v16i8)
            w = builder.bitcast(builder.shuffle_vector(v, v, _mask(list(range(16)) * 4)), ir.VectorType(_i64, 8))
            w = builder.bitcast(builder.lshr(w, q6_shift), _v64i8)
            return builder.or_(v64, builder.shl(builder.and_(w, _c(_v64i8, [3] * 64)), _c(_v64i8, [4] * 64)))

        def body_for(T_, kd, R):
            signed = kd == Q8_0 and tier.signed_q8  # 8-bit weights enter signed: no +128 to undo
            mn_const = {Q4_0: -8.0, Q8_0: 0.0 if signed else -128.0}.get(kd)
            per16 = kd == Q6  # scales, offsets and activation sums per 16 elements: 4 a stretch
            vmn = _v4f32 if per16 else _v2f32
            xq_rows = [builder.gep(xq.data, [builder.mul(_c(_i64, t), n)]) for t in range(T_)]
            xd_rows = [builder.gep(xd.data, [builder.mul(_c(_i64, t), ldd)]) for t in range(T_)]
            xs_rows = [builder.gep(xs.data, [builder.mul(_c(_i64, t), lds)]) for t in range(T_)]

            def rows_from(r, R):
                """Rows r..r+R-1: every activation load feeds R rows. accs[(i * T_ + t) * 2 + {0, 1}]
                are row i, token t's block-term and min-term accumulators."""
                bases = [builder.add(builder.mul(l, nrows), builder.add(r, _c(_i64, i))) for i in range(R)]
                qrow = [builder.gep(q.data, [builder.mul(bs, rb)]) for bs in bases]
                srow = [builder.gep(s.data, [builder.mul(bs, gs)]) for bs in bases]
                mrow = [builder.gep(m.data, [builder.mul(bs, gs)]) for bs in bases] if kd in (Q4_1, Q5, Q6) else None

                def step(b, accs, us, s2s, mn2s, xload, width):
                    """One stretch of `width` blocks (2, or 1 for an odd last block) at block b."""
                    new = list(accs)
                    for t in range(T_):
                        xv = xload(builder.gep(xq_rows[t], [builder.mul(b, _c(_i64, QK))]))
                        if per16:
                            xd_ = _load(builder, builder.gep(xd_rows[t], [b]), _v2f32)
                            xd_ = builder.shuffle_vector(xd_, xd_, _mask([0, 0, 1, 1]))
                            xs_ = _load(builder, builder.gep(xs_rows[t], [builder.mul(b, _c(_i64, 2))]), _v4f32)
                        elif width == 2:
                            xd_ = _load(builder, builder.gep(xd_rows[t], [b]), _v2f32)
                            xs_ = _load(builder, builder.gep(xs_rows[t], [b]), _v2f32)
                        else:
                            xd_ = builder.load(builder.gep(xd_rows[t], [b]))
                            xs_ = builder.load(builder.gep(xs_rows[t], [b]))
                        for i in range(R):
                            k = (i * T_ + t) * 2
                            dp = builder.sitofp(dot_bytes(builder, _c(_v16i32, [0] * 16), us[i], xv, tier, signed),
                                                _v16f32)
                            sd = builder.fmul(s2s[i], xd_, flags=STRICT)
                            if per16:
                                sc = builder.shuffle_vector(sd, sd, _mask([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4))
                                new[k + 1] = builder.call(fma4, [mn2s[i], xs_, accs[k + 1]])
                            elif width == 2:
                                sc = builder.shuffle_vector(sd, sd, _mask(lo_hi))
                                new[k + 1] = builder.call(fma2, [mn2s[i], xs_, accs[k + 1]])
                            else:  # lanes 8-15 of dp are zero: xq's upper half was zero-filled
                                sd = builder.insert_element(_c(_v16f32, ir.Undefined), sd, _c(_i32, 0))
                                sc = builder.shuffle_vector(sd, sd, _mask([0] * 16))
                                mx = builder.insert_element(zero2, builder.fmul(mn2s[i], xs_, flags=STRICT), _c(_i32, 0))
                                new[k + 1] = builder.fadd(accs[k + 1], mx, flags=STRICT)
                            new[k] = builder.call(fma, [dp, sc, accs[k]])
                    return new

                def pair(p, accs):
                    b = builder.mul(p, _c(_i64, 2))
                    us, s2s, mn2s = [], [], []
                    for i in range(R):
                        qp = builder.gep(qrow[i], [builder.mul(b, _c(_i64, QK if kd == Q8_0 else QK // 2))])
                        if PREFETCH:
                            builder.call(prefetch, [builder.bitcast(builder.gep(qp, [_c(_i64, PREFETCH)]), _i8.as_pointer()),
                                                    _c(_i32, 0), _c(_i32, 3), _c(_i32, 1)])
                        if kd == Q8_0:
                            v = _load(builder, qp, _v64i8)
                            us.append(v if signed else builder.xor(v, flip))
                        else:
                            v = _load(builder, qp, _v32i8)
                            u = unpack_q4(builder.shuffle_vector(v, v, q4_lanes))
                            if kd in (Q5, Q6):
                                plane = builder.gep(qrow[i], [builder.add(half_n, builder.mul(p, _c(_i64, 8 if kd == Q5 else 16)))])
                                u = unpack_high(u, kd, plane)
                            us.append(u)
                        g = builder.mul(b, _c(_i64, 2)) if per16 else b
                        s2s.append(_load(builder, builder.gep(srow[i], [g]), vmn))
                        if kd in (Q4_1, Q5, Q6):
                            mn2s.append(_load(builder, builder.gep(mrow[i], [g]), vmn))
                        else:
                            mn2s.append(builder.fmul(s2s[i], _c(_v2f32, [mn_const] * 2), flags=STRICT))
                    return step(b, accs, us, s2s, mn2s, lambda ptr: _load(builder, ptr, _v64i8), 2)

                def last(accs):
                    b = builder.sub(nb, _c(_i64, 1))
                    us, s1s, mn1s = [], [], []
                    for i in range(R):
                        if kd == Q8_0:
                            v = _load(builder, builder.gep(qrow[i], [builder.mul(b, _c(_i64, QK))]), _v32i8)
                            v = builder.shuffle_vector(v, _c(_v32i8, [0] * 32), half)
                            us.append(v if signed else builder.xor(v, flip))
                        else:
                            v = _load(builder, builder.gep(qrow[i], [builder.mul(b, _c(_i64, QK // 2))]), _v16i8)
                            z = _c(_v16i8, [0] * 16)
                            us.append(unpack_q4(builder.shuffle_vector(v, z, _mask(list(range(16)) * 2 + [16] * 32))))
                        s1s.append(builder.load(builder.gep(srow[i], [b])))
                        mn1s.append(builder.load(builder.gep(mrow[i], [b])) if kd == Q4_1
                                    else builder.fmul(s1s[i], _c(_f32, mn_const), flags=STRICT))
                    zx = _c(_v32i8, [0] * 32)
                    return step(b, accs, us, s1s, mn1s,
                                lambda ptr: builder.shuffle_vector(_load(builder, ptr, _v32i8), zx, half), 1)

                accs = _loop(builder, _c(_i64, 0), pairs, [zero16, _c(vmn, [0.0] * vmn.count)] * (R * T_), pair,
                             "qmv.pair")
                if kd not in (Q5, Q6):  # their rows are whole 64-element stretches
                    accs = _if(builder, odd, accs, last, "qmv.last")
                for i in range(R):
                    ri = builder.add(r, _c(_i64, i))
                    for t in range(T_):
                        k = (i * T_ + t) * 2
                        total = builder.fadd(_hsum(builder, accs[k]), _hsum(builder, accs[k + 1]), flags=STRICT)
                        builder.store(total, builder.gep(out.data, [builder.add(builder.mul(_c(_i64, t), ldo), ri)]))
                return []

            blocks = builder.sdiv(builder.sub(r1, r0), _c(_i64, R))
            _loop(builder, _c(_i64, 0), blocks, [],
                  lambda i, _: rows_from(builder.add(r0, builder.mul(i, _c(_i64, R))), R), "qmv.rows")
            if R > 1:
                _loop(builder, builder.add(r0, builder.mul(blocks, _c(_i64, R))), r1, [],
                      lambda r, _: rows_from(r, 1), "qmv.row")

        # one specialized row loop per (T, kind), chosen once per call
        done = builder.append_basic_block("qmv.exit")
        by_t = builder.switch(T, done)
        for T_ in range(1, PASS_T + 1):
            blk = builder.append_basic_block(f"qmv.t{T_}")
            by_t.add_case(_c(_i64, T_), blk)
            builder.position_at_end(blk)
            by_kind = builder.switch(kind, done)
            for kd in (Q8_0, Q4_0, Q4_1, Q5, Q6):
                kb = builder.append_basic_block(f"qmv.t{T_}.k{kd}")
                by_kind.add_case(_c(_i64, kd), kb)
                builder.position_at_end(kb)
                body_for(T_, kd, ROWS_AT_ONCE.get(T_, 1))
                builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()
    return codegen


def make_rows(tier: Tier):
    @intrinsic
    def rows(typingctx, out, xq, xd, xs, q, s, m, l, r0, r1, kind):
        def arr(a, dtype, ndim):
            return isinstance(a, types.Array) and a.dtype == dtype and a.ndim == ndim and a.layout == "C"
        ok = (arr(out, types.float32, 2) and arr(xq, types.int8, 2) and arr(xd, types.float32, 2)
              and arr(xs, types.float32, 2) and arr(q, types.uint8, 3) and arr(s, types.float32, 3)
              and arr(m, types.float32, 3) and all(isinstance(v, types.Integer) for v in (l, r0, r1, kind)))
        if not ok:
            return None
        i64 = types.int64
        return types.void(out, xq, xd, xs, q, s, m, i64, i64, i64, i64), _rows_ir(tier)
    return rows


_rows = make_rows(TIER)  # the tier's row loop; tests make the others' (make_rows(isa.by_name(...)))


@kernel(parallel=True)
def linear_a8_rows(out, xq, xd, xs, w, l, tasks):
    """xq int8 (T, n) with block scales xd, xs f32 (T, n // 32) @ W[l].T -> out f32 (T, rows).

    T is 1..8, W a Q8_0, Q4_0, Q4_1, Q5 or Q6 weight (kernels/linear.py); xs holds the sums per
    16 elements for Q6 (act8.sums16), per 32 for the others. Rows are split into `tasks`
    contiguous ranges run in parallel (pass the thread count). Allocates nothing.
    """
    # W[l] (rows, n) @ xq (T, n) -> out (T, rows)
    kind, q, s, m, f = w
    T = xq.shape[0]
    rows = out.shape[1]
    if T < 1 or T > MAX_T:
        raise ValueError("linear_a8_rows: xq must hold 1..8 tokens")
    if kind != Q8_0 and kind != Q4_0 and kind != Q4_1 and kind != Q5 and kind != Q6:
        raise ValueError("linear_a8_rows: weight kind must be Q8_0, Q4_0, Q4_1, Q5 or Q6")
    if tasks < 1:
        raise ValueError("linear_a8_rows: tasks must be at least 1")
    for task in prange(tasks):
        r0, r1 = task * rows // tasks, (task + 1) * rows // tasks
        for t0 in range(0, T, PASS_T):
            t1 = min(T, t0 + PASS_T)
            _rows(out[t0:t1], xq[t0:t1], xd[t0:t1], xs[t0:t1], q, s, m, l, r0, r1, kind)
