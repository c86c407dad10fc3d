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
zero-filled upper half. Two rows go together (ROWS_AT_ONCE; Q8_0 rows only at T <= 2). Every
stretch prefetches the weight bytes PREFETCH ahead.

That costs a convert and two float operations per token per stretch beside its one dot product,
and on AVX-512 they share a port with it: 8 tokens cost 5.3x one. From TOKEN_MAJOR_MIN_T tokens
the loop is token-major instead: the activations are laid out (`prepare`) so that each 8-byte
weight group, broadcast from memory to 8 qword lanes, meets the 8 tokens' bytes of that group in
one vpdpbusd. A scale group's products then sum in int32 for all tokens at once, and one convert
and one multiply-add per stretch serve them all; two rows go together (TM_ROWS), sharing each
load of the tokens' bytes. 8 tokens cost ~0.6x what the row-major loop took for them. The two loops round differently (the integer sums are the same, the float
grouping is not), so a token's result can differ in the last bits between a call of <= 4 tokens
and one of 5..8; within each, a token's result does not depend on the others.

The int32 lane sums come from the ISA tier's dot product (kernels/isa.py, simd.dot_bytes): one
vpdpbusd, two 256-bit {vex} vpdpbusd (AVX-VNNI), vpmaddubsw + vpmaddwd per register (AVX2 and
AVX-512 without VNNI; there Q8_0 bytes enter signed, as |q| against xq sign(q), with mn = 0,
since vpmaddubsw's int16 pair sums would saturate on q + 128), or plain widening multiplies.
The 64-byte stretches stay the unit on 256-bit tiers: LLVM splits each into two registers.
"""
import numpy as np
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
TOKEN_MAJOR_MIN_T = 5  # from 5 tokens one token-major row loop (body_tm in _rows_ir), whose cost is
# the same for 5 to 8; below, row-major: 4 tokens took 2.6 ms there against 3.5 token-major (30 x
# 3072 x 576 Q4_1, bench/qmatvec.py)
# Rows the row loop takes at a time, by token count: two rows share each activation load and
# overlap their accumulator chains. At 1-2 tokens that gave ~5-10%; at 3-4 tokens 7-12% for the
# 4-bit kinds (30 x (3072 x 576) Q4_1, one thread: 4.9 -> 4.6 ms at 4 tokens, 4.1 -> 3.6 at 3)
# but 6% less for Q8_0, whose 64-byte rows leave fewer registers (bench/qmatvec.py --tokens T).
ROWS_AT_ONCE = {1: 2, 2: 2, 3: 2, 4: 2}
ROWS_AT_ONCE_Q8 = {1: 2, 2: 2}
# Rows the token-major loop takes at a time: each load of the tokens' bytes of a weight group
# then feeds two rows' dot products (30 x (3072 x 576) Q4_1, 8 tokens, one thread: 6.3 ms with one
# row, 5.3 with two; three or four rows did no better; bench/qmatvec.py --tokens 8).
TM_ROWS = 2
# Each row's weight bytes are prefetched this far ahead (a few rows on; a prefetch past the end
# never faults): where the hardware prefetcher alone cannot keep a core's stream busy, the decode
# matmuls ran 1.2-1.4x faster with it; 1 and 8 KB did no better.
PREFETCH = 4096

# Flags for every float instruction written here. Numba adds its fastmath flags (reassoc,
# contract, ...) to each float instruction that has none, the intrinsic's included, and LLVM then
# reordered the row sums differently in different compiles of the same kernel: the prange body
# compiled on its own and its copy inside the caller came out a last bit apart, which 8-bit
# activations turn into different logits (tests/test_isa.py, a cold cache). nsz alone reorders nothing.
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


def _rows_by(builder, r0, r1, R, rows_from, name):
    """rows_from(r, R) for r = r0, r0 + R, ... while R rows fit, then rows_from(r, 1) for the rest."""
    blocks = builder.sdiv(builder.sub(r1, r0), _c(_i64, R))
    _loop(builder, _c(_i64, 0), blocks, [], lambda i, _: rows_from(builder.add(r0, builder.mul(i, _c(_i64, R))), R),
          name + ".rows")
    if R > 1:
        _loop(builder, builder.add(r0, builder.mul(blocks, _c(_i64, R))), r1, [], lambda r, _: rows_from(r, 1),
              name + ".row")


def _hsum(builder, v):
    """Horizontal sum of a float vector (power-of-two length) by halving."""
    n = v.type.count
    while n > 1:
        n //= 2
        v = builder.fadd(builder.shuffle_vector(v, v, _mask(range(n))),
                         builder.shuffle_vector(v, v, _mask(range(n, 2 * n))), flags=STRICT)
    return builder.extract_element(v, _c(_i32, 0))


def _rows_ir(tier: Tier):
    """Codegen: rows r0..r1 of out, from rows base + r0.. of W[l], times all T tokens
    (T = xq.shape[0], 1..MAX_T)."""
    def codegen(context, builder, sig, args):
        arrs = [context.make_array(ty)(context, builder, v) for ty, v in zip(sig.args[:10], args[:10])]
        out, xq, xd, xs, xqT, xd16, xsT, q, s, m = arrs
        l, r0, r1, base, kind = args[10:]
        T, n = cgutils.unpack_tuple(builder, xq.shape, 2)
        ldo = cgutils.unpack_tuple(builder, out.shape, 2)[1]
        _, nrows, rb = cgutils.unpack_tuple(builder, q.shape, 3)
        gs = cgutils.unpack_tuple(builder, s.shape, 3)[2]  # scale groups per row
        ldd = cgutils.unpack_tuple(builder, xd.shape, 2)[1]
        lds = cgutils.unpack_tuple(builder, xs.shape, 2)[1]  # per 32, or per 16 for Q6
        ldt = cgutils.unpack_tuple(builder, xsT.shape, 2)[1]
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

        def stretch_weights(qrow, p, kd, signed):
            """Stretch p (64 elements) of a packed row as 64 unsigned bytes in element order (Q8_0
            signed on the vpmaddubsw tiers); its bytes PREFETCH ahead are prefetched."""
            b = builder.mul(p, _c(_i64, 2))
            qp = builder.gep(qrow, [builder.mul(b, _c(_i64, QK if kd == Q8_0 else QK // 2))])
            if PREFETCH:
                builder.call(prefetch, [builder.bitcast(builder.gep(qp, [_c(_i64, PREFETCH)]), _i8.as_pointer()),
                                        _c(_i32, 0), _c(_i32, 3), _c(_i32, 1)])
            if kd == Q8_0:
                v = _load(builder, qp, _v64i8)
                return v if signed else builder.xor(v, flip)
            v = _load(builder, qp, _v32i8)
            u = unpack_q4(builder.shuffle_vector(v, v, q4_lanes))
            if kd in (Q5, Q6):
                plane = builder.gep(qrow, [builder.add(half_n, builder.mul(p, _c(_i64, 8 if kd == Q5 else 16)))])
                u = unpack_high(u, kd, plane)
            return u

        def last_weights(qrow, b, kd, signed):
            """An odd last block b (Q8_0, Q4_0, Q4_1) as the lower half of a stretch, the upper zero."""
            if kd == Q8_0:
                v = _load(builder, builder.gep(qrow, [builder.mul(b, _c(_i64, QK))]), _v32i8)
                v = builder.shuffle_vector(v, _c(_v32i8, [0] * 32), half)
                return v if signed else builder.xor(v, flip)
            v = _load(builder, builder.gep(qrow, [builder.mul(b, _c(_i64, QK // 2))]), _v16i8)
            z = _c(_v16i8, [0] * 16)
            return unpack_q4(builder.shuffle_vector(v, z, _mask(list(range(16)) * 2 + [16] * 32)))

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
                bases = [builder.add(builder.mul(l, nrows), builder.add(base, builder.add(r, _c(_i64, i)))) for i in range(R)]
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
                        us.append(stretch_weights(qrow[i], p, kd, signed))
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
                        us.append(last_weights(qrow[i], b, kd, signed))
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

            _rows_by(builder, r0, r1, R, rows_from, "qmv")

        # a stretch's unpacked weights per row, re-read as broadcasts
        u_bufs = [cgutils.alloca_once(builder, _v64i8) for _ in range(TM_ROWS)]

        def body_tm(kd):
            """TOKEN_MAJOR_MIN_T..8 tokens (T), token-major: one pass serves 8 token lanes.

            Per stretch of a row, the 64 unpacked weight bytes go through its u_buf, and each 8-byte
            group k (elements 8k..8k+7) is broadcast to all 8 qword lanes (a load, no shuffle).
            xqT[p, k] holds the 8 tokens' bytes of that group, token t in qword lane t, so one dot
            product gives every token's two 4-element sums. The G groups' products (a scale
            group each: 32 elements, 16 for Q6) accumulate in G int32 vectors, exactly; pairs of
            groups then fold into one vector [group 2h: tokens 0-7 | group 2h + 1: tokens 0-7],
            converted once and scaled by s xd in one multiply-add for all tokens."""
            signed = kd == Q8_0 and tier.signed_q8
            offsets = kd in (Q4_1, Q5, Q6)
            mconst = None if offsets or signed else (-8.0 if kd == Q4_0 else -128.0)
            has_min = offsets or mconst is not None
            G = 4 if kd == Q6 else 2
            vmn = _v4f32 if G == 4 else _v2f32
            per = 8 // G  # qword groups per scale group
            v8i64 = ir.VectorType(_i64, 8)
            # The broadcasts must stay loads (vpbroadcastq from memory costs no shuffle): an empty
            # asm hands back a u_buf's address unseen, so LLVM cannot forward the store into
            # register shuffles (it made each a vpermq, which shares the port the folds need).
            launder = ir.InlineAsm(ir.FunctionType(_i64.as_pointer(), [_i64.as_pointer()]), "", "=r,0")
            u64s = [builder.bitcast(u, _i64.as_pointer()) for u in u_bufs]
            even = _mask(list(range(0, 16, 2)) + list(range(16, 32, 2)))
            oddl = _mask(list(range(1, 16, 2)) + list(range(17, 32, 2)))
            xdT_lo = _mask(list(range(8)) * 2)
            xdT_hi = _mask(list(range(8, 16)) * 2)

            def rows_from(r, R):
                """Rows r..r+R-1 together: each token-major activation load feeds R rows'
                products. accs[i * n_acc + j]: row i's j-th accumulator."""
                wrs = [builder.add(builder.mul(l, nrows), builder.add(base, builder.add(r, _c(_i64, i))))
                       for i in range(R)]
                qrow = [builder.gep(q.data, [builder.mul(wr, rb)]) for wr in wrs]
                srow = [builder.gep(s.data, [builder.mul(wr, gs)]) for wr in wrs]
                mrow = [builder.gep(m.data, [builder.mul(wr, gs)]) for wr in wrs] if offsets else None

                def step(p, accs, us, svs, mvs):
                    """Stretch p with row i's unpacked weights us[i], its G scales svs[i] and min
                    factors mvs[i]."""
                    new = list(accs)
                    u64ps = []
                    for i in range(R):
                        builder.store(us[i], u_bufs[i])
                        u64ps.append(builder.call(launder, [u64s[i]]))
                    xrow = builder.gep(xqT.data, [builder.mul(p, _c(_i64, 512))])
                    isums = [[] for _ in range(R)]
                    for g in range(G):
                        acc = [_c(_v16i32, [0] * 16)] * R
                        for k in range(g * per, (g + 1) * per):
                            xv = _load(builder, builder.gep(xrow, [_c(_i64, 64 * k)]), _v64i8)
                            for i in range(R):
                                w = builder.load(builder.gep(u64ps[i], [_c(_i64, k)]))
                                wv = builder.shuffle_vector(builder.insert_element(ir.Constant(v8i64, ir.Undefined), w,
                                                                                   _c(_i32, 0)),
                                                            ir.Constant(v8i64, ir.Undefined), _mask([0] * 8))
                                acc[i] = dot_bytes(builder, acc[i], builder.bitcast(wv, _v64i8), xv, tier, signed)
                        for i in range(R):
                            isums[i].append(acc[i])
                    xdv = _load(builder, builder.gep(xd16.data, [builder.mul(p, _c(_i64, 16))]), _v16f32)
                    for h in range(G // 2):
                        xd_h = xdv if G == 2 else builder.shuffle_vector(xdv, xdv, xdT_lo if h == 0 else xdT_hi)
                        xt = (_load(builder, builder.gep(xsT.data, [builder.add(builder.mul(p, ldt), _c(_i64, 16 * h))]),
                                    _v16f32) if has_min else None)
                        for i in range(R):
                            a, b = isums[i][2 * h], isums[i][2 * h + 1]
                            both = builder.add(builder.shuffle_vector(a, b, even), builder.shuffle_vector(a, b, oddl))
                            f = builder.sitofp(both, _v16f32)
                            sw = builder.shuffle_vector(svs[i], svs[i], _mask([2 * h] * 8 + [2 * h + 1] * 8))
                            j = i * n_acc + h
                            new[j] = builder.call(fma, [f, builder.fmul(sw, xd_h, flags=STRICT), new[j]])
                            if has_min:
                                mh = builder.shuffle_vector(mvs[i], mvs[i], _mask([2 * h] * 8 + [2 * h + 1] * 8))
                                new[j + G // 2] = builder.call(fma, [mh, xt, new[j + G // 2]])
                    return new

                def pair(p, accs):
                    g = builder.mul(p, _c(_i64, G))
                    us = [stretch_weights(qrow[i], p, kd, signed) for i in range(R)]
                    svs = [_load(builder, builder.gep(srow[i], [g]), vmn) for i in range(R)]
                    mvs = [_load(builder, builder.gep(mrow[i], [g]), vmn) for i in range(R)] if offsets else svs
                    return step(p, accs, us, svs, mvs)

                def last(accs):
                    # the odd last block: the upper half of u is zero (and so are xqT's, xd16's
                    # and xsT's upper halves for this stretch)
                    b = builder.sub(nb, _c(_i64, 1))
                    us = [last_weights(qrow[i], b, kd, signed) for i in range(R)]

                    def one(row_ptr):
                        return builder.insert_element(_c(_v2f32, [0.0] * 2), builder.load(builder.gep(row_ptr, [b])),
                                                      _c(_i32, 0))
                    s1 = [one(srow[i]) for i in range(R)]
                    m1 = [one(mrow[i]) for i in range(R)] if offsets else s1
                    return step(pairs, accs, us, s1, m1)

                accs = _loop(builder, _c(_i64, 0), pairs, [zero16] * (n_acc * R), pair, "qmv.tm.pair")
                if kd not in (Q5, Q6):
                    accs = _if(builder, odd, accs, last, "qmv.tm.last")

                def fold(vs):
                    """Token t's lanes t and 8 + t of each vector, summed: <8 x float>."""
                    lo = [builder.shuffle_vector(v, v, _mask(range(8))) for v in vs]
                    hi = [builder.shuffle_vector(v, v, _mask(range(8, 16))) for v in vs]
                    if len(vs) == 2:
                        lo = [builder.fadd(lo[0], lo[1], flags=STRICT)]
                        hi = [builder.fadd(hi[0], hi[1], flags=STRICT)]
                    return builder.fadd(lo[0], hi[0], flags=STRICT)

                for i in range(R):
                    mine = accs[i * n_acc:(i + 1) * n_acc]
                    sums = fold(mine[:G // 2])
                    if has_min:
                        mt = fold(mine[G // 2:])
                        if mconst is not None:
                            mt = builder.fmul(mt, _c(ir.VectorType(_f32, 8), [mconst] * 8), flags=STRICT)
                        sums = builder.fadd(sums, mt, flags=STRICT)
                    ri = builder.add(r, _c(_i64, i))
                    for t in range(MAX_T):
                        def store(vals, t=t, sums=sums, ri=ri):
                            builder.store(builder.extract_element(sums, _c(_i32, t)),
                                          builder.gep(out.data, [builder.add(builder.mul(_c(_i64, t), ldo), ri)]))
                            return vals
                        _if(builder, builder.icmp_signed("<", _c(_i64, t), T), [], store, "qmv.tm.store")
                return []

            n_acc = G // 2 * (2 if has_min else 1)
            _rows_by(builder, r0, r1, TM_ROWS, rows_from, "qmv.tm")

        # one specialized row loop per (T, kind), chosen once per call: row-major per token count,
        # one token-major loop for TOKEN_MAJOR_MIN_T..MAX_T
        done = builder.append_basic_block("qmv.exit")
        by_t = builder.switch(T, done)

        def per_kind(name, body):
            by_kind = builder.switch(kind, done)
            for kd in (Q8_0, Q4_0, Q4_1, Q5, Q6):
                kb = builder.append_basic_block(f"{name}.k{kd}")
                by_kind.add_case(_c(_i64, kd), kb)
                builder.position_at_end(kb)
                body(kd)
                builder.branch(done)

        for T_ in range(1, TOKEN_MAJOR_MIN_T):
            blk = builder.append_basic_block(f"qmv.t{T_}")
            by_t.add_case(_c(_i64, T_), blk)
            builder.position_at_end(blk)
            per_kind(f"qmv.t{T_}", lambda kd, T_=T_: body_for(T_, kd, (ROWS_AT_ONCE_Q8 if kd == Q8_0
                                                                        else ROWS_AT_ONCE).get(T_, 1)))
        tm = builder.append_basic_block("qmv.tm")
        for T_ in range(TOKEN_MAJOR_MIN_T, MAX_T + 1):
            by_t.add_case(_c(_i64, T_), tm)
        builder.position_at_end(tm)
        per_kind("qmv.tm", body_tm)
        builder.position_at_end(done)
        return context.get_dummy_value()
    return codegen


def make_rows(tier: Tier):
    @intrinsic
    def rows(typingctx, out, xq, xd, xs, xqT, xd16, xsT, q, s, m, l, r0, r1, base, kind):
        def arr(a, dtype, ndim):
            return isinstance(a, types.Array) and a.dtype == dtype and a.ndim == ndim and a.layout == "C"
        ok = (arr(out, types.float32, 2) and arr(xq, types.int8, 2) and arr(xd, types.float32, 2)
              and arr(xs, types.float32, 2) and arr(xqT, types.int8, 2) and arr(xd16, types.float32, 2)
              and arr(xsT, types.float32, 2) and arr(q, types.uint8, 3)
              and arr(s, types.float32, 3) and arr(m, types.float32, 3)
              and all(isinstance(v, types.Integer) for v in (l, r0, r1, base, kind)))
        if not ok:
            return None
        i64 = types.int64
        return types.void(out, xq, xd, xs, xqT, xd16, xsT, q, s, m, i64, i64, i64, i64, i64), _rows_ir(tier)
    return rows


_rows = make_rows(TIER)  # the tier's row loop; tests make the others' (make_rows(isa.by_name(...)))
_NO_I8 = np.zeros((0, 512), np.int8)  # the token-major inputs of a row-major call
_NO_F32 = np.zeros((0, 16), np.float32)


@kernel
def scratch_size(n, T):
    """Floats `linear_a8_rows` needs per task for T tokens of width n: the token-major layout
    of their activations (`prepare`); none below TOKEN_MAJOR_MIN_T tokens."""
    if T < TOKEN_MAJOR_MIN_T:
        return 0
    nst = (n // QK + 1) // 2
    return nst * (128 + 16 + 32)


@kernel
def prepare(buf, xq, xd, xs, groups):
    """xq's tokens token-major, as body_tm reads them, in buf f32 (>= scratch_size) -> (xqT,
    xdT, xsT) for stretches p (64 elements; an odd last block's upper half is zero in all three):
    xqT int8 (stretches, 512): byte group k (elements 8k..8k+7) of token t at 64 k + 8 t, tokens
    past T zero; xdT (1, stretches * 16): [block 2p's xd for tokens 0-7 | block 2p + 1's];
    xsT (stretches, groups * 8): each scale group's activation sums (xs (T, nb * groups // 2)) for
    tokens 0-7."""
    T = xq.shape[0]
    n = xq.shape[1]
    nb = xd.shape[1]
    nst = (nb + 1) // 2
    per = groups // 2  # sums per block
    xqT = buf[:nst * 128].view(np.int8).reshape((nst, 512))
    xdT = buf[nst * 128:nst * 144].reshape((1, nst * 16))
    xsT = buf[nst * 144:nst * (144 + groups * 8)].reshape((nst, groups * 8))
    xqT[:] = 0
    xdT[:] = 0.0
    xsT[:] = 0.0
    q8 = xqT.view(np.int64)  # (nst, 64): group k of token t at 8 k + t
    for t in range(T):
        x8 = xq[t].view(np.int64)
        for g in range(n // 8):
            q8[g >> 3, (g & 7) * 8 + t] = x8[g]
        for b in range(nb):
            xdT[0, (b >> 1) * 16 + (b & 1) * 8 + t] = xd[t, b]
        for g in range(nb * per):
            p = g // groups
            xsT[p, (g - p * groups) * 8 + t] = xs[t, g]
    return xqT, xdT, xsT


@kernel(parallel=True)
def linear_a8_rows(out, xq, xd, xs, w, l, scratch, base):
    """xq int8 (T, n) with block scales xd, xs f32 (T, n // 32) @ W[l, base:base + rows].T -> out
    f32 (T, rows).

    T is 1..8, W a Q8_0, Q4_0, Q4_1, Q5 or Q6 weight (kernels/linear.py); xs holds the sums per
    16 elements for Q6 (act8.sums16), per 32 for the others. Rows are split into scratch.shape[0]
    contiguous ranges run in parallel (one per thread), each with its row of scratch f32 (tasks,
    >= scratch_size(n)). Allocates nothing.
    """
    # W[l] (base + rows, n) @ xq (T, n) -> out (T, rows)
    kind, q, s, m, f = w
    T = xq.shape[0]
    rows = out.shape[1]
    tasks = scratch.shape[0]
    if T < 1 or T > MAX_T:
        raise ValueError("linear_a8_rows: xq must hold 1..8 tokens")
    if kind != Q8_0 and kind != Q4_0 and kind != Q4_1 and kind != Q5 and kind != Q6:
        raise ValueError("linear_a8_rows: weight kind must be Q8_0, Q4_0, Q4_1, Q5 or Q6")
    if tasks < 1 or scratch.shape[1] < scratch_size(xq.shape[1], T):
        raise ValueError("linear_a8_rows: scratch needs a row of scratch_size(n) floats per task")
    if base < 0 or base + rows > q.shape[1]:
        raise ValueError("linear_a8_rows: rows base..base + out.shape[1] must lie in the weight")
    groups = 4 if kind == Q6 else 2
    for task in prange(tasks):
        r0, r1 = task * rows // tasks, (task + 1) * rows // tasks
        if T >= TOKEN_MAJOR_MIN_T:
            xqT, xdT, xsT = prepare(scratch[task], xq, xd, xs, groups)
        else:
            xqT, xdT, xsT = _NO_I8, _NO_F32, _NO_F32
        _rows(out, xq, xd, xs, xqT, xdT, xsT, q, s, m, l, r0, r1, base, kind)
