"""The prefill matmul on integers: 8-bit activations x 4/8-bit weight blocks (llama.cpp's method).

    out[t, r] = sum_b d[r,b] xd[t,b] (sum_j u[r,32b+j] xq[t,32b+j])  +  sum_b mn[r,b] xs[t,b]

Every weight kind is made unsigned, u in 0..255: the nibble for Q4_0/Q4_1, the 5-bit value for Q5,
byte ^ 0x80 (= q + 128) for Q8_0; the shift goes into the per-block offset mn = m (Q4_1, Q5),
-8 d (Q4_0), -128 d (Q8_0); Q6 (6-bit values, scale and offset per 16 elements) scales each half
block on its own and takes the activations' sums per 16.
Unsigned weight bytes times signed activation bytes is exactly AVX512-VNNI's vpdpbusd: four
u8 x s8 products summed into each of 16 int32 lanes. The integer block sums are exact; only the
float scaling (once per 32-element block) rounds.

A thread takes NR weight rows at a time (two vectors of int32 lanes: 32 rows with 512-bit
registers, 16 with 256-bit ones) and unpacks them once into the VNNI layout
[k/4][NR rows][4 bytes] (two vector loads per k-quad), with the block scales as vectors
[b][d of NR rows, mn of NR rows]. The register block (LLVM IR, below) then runs MR tokens x
NR rows over the whole panel for every MR tokens: 2 MR int32 accumulators per block, 2 MR f32
accumulators across blocks, 2 weight vectors; the activation operand is a broadcast of 4 bytes
of xq[t] (one i32). Per block and (token, vector): 8 dot-product steps, then convert, scale by
d xd, add mn xs: 4 float operations. MR is 6 with 32 registers (AVX-512) and 4 with 16, where
the float accumulators spill once per block rather than once per k-quad.

The lane sums come from the ISA tier's dot product (kernels/isa.py, simd.dot_bytes). On the
vpmaddubsw tiers, whose int16 pair sums would saturate on q + 128, Q8_0 panels hold the signed
bytes with mn = 0, and the block runs them through the signed form of the dot product.
"""
import numpy as np
from llvmlite import ir
from numba import get_thread_id, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import qtile as QT
from .formats import Q4_0, Q4_1, Q5, Q6, Q8_0, Q8_0T, QK
from .jit import kernel
from .isa import TIER, Tier
from .simd import counted_loop, dot_bytes, pair_sums, widen_pairs
from .simd import fma as fma_intrinsic

LANES = TIER.float_lanes  # int32 lanes per vector
NR = 2 * LANES  # weight rows per panel: two vectors
MR = 6 if TIER.registers >= 32 else 4  # tokens per register block: 2 MR int + 2 MR float accumulators
SIGNED_Q8 = TIER.signed_q8  # Q8_0 panels hold signed bytes (see above)
ALIGN = 64  # bytes: panels start on a cache line


def _micro_ir(mr: int, tier: Tier):
    """Codegen for mr tokens x 2 * tier.float_lanes rows over nb blocks."""
    lanes = tier.float_lanes
    nr, nv = 2 * lanes, 2

    def codegen(context, builder, sig, args):
        out_t, _, _, xq_t, xd_t, xs_t, _, panel_t, _, sc_t = sig.args[:10]
        out_v, o0, c0, xq_v, xd_v, xs_v, t0, panel_v, p0, sc_v, s0, nb, mode = args[:13]
        out = context.make_array(out_t)(context, builder, out_v)
        xq = context.make_array(xq_t)(context, builder, xq_v)
        xd = context.make_array(xd_t)(context, builder, xd_v)
        xs = context.make_array(xs_t)(context, builder, xs_v)
        panel = context.make_array(panel_t)(context, builder, panel_v)
        sc = context.make_array(sc_t)(context, builder, sc_v)
        i64, i32, f32 = ir.IntType(64), ir.IntType(32), ir.FloatType()
        ivec, fvec = ir.VectorType(i32, lanes), ir.VectorType(f32, lanes)
        c = lambda v: ir.Constant(i64, v)  # noqa: E731
        fma = fma_intrinsic(builder, fvec, tier)

        def splat(s, vt):
            u = ir.Constant(vt, ir.Undefined)
            return builder.shuffle_vector(builder.insert_element(u, s, ir.Constant(i32, 0)), u,
                                          ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))

        ldq = cgutils.unpack_tuple(builder, xq.shape, 2)[1]
        ldd = cgutils.unpack_tuple(builder, xd.shape, 2)[1]
        lds = cgutils.unpack_tuple(builder, xs.shape, 2)[1]
        ldo = cgutils.unpack_tuple(builder, out.shape, 2)[1]
        qrows, drows, srows = [], [], []
        for i in range(mr):
            t = builder.add(t0, c(i))
            qrows.append(builder.gep(xq.data, [builder.mul(t, ldq)]))
            drows.append(builder.gep(xd.data, [builder.mul(t, ldd)]))
            srows.append(builder.gep(xs.data, [builder.mul(t, lds)]))
        pbase = builder.gep(panel.data, [p0])
        sbase = builder.gep(sc.data, [s0])
        fzero = ir.Constant(fvec, [0.0] * lanes)

        def step(b, acc, signed_q8, widen, group):
            """One 32-element block: `group` k-quads per scale group (8, or 4 for Q6's groups of
            16). On the vpmaddubsw tiers pair sums add up in int16 for `widen` k-quads before one
            vpmaddwd widens them (at most 2 widen products u x 127 per lane: nibbles 8, 5-bit
            values 4, 6-bit values 2 stay below 2^15); widen None: every k-quad (signed Q8_0)."""
            pairs = tier.dot == "pmaddubsw" and widen is not None
            izero = ir.Constant(ivec, [0] * lanes)
            pzero = ir.Constant(ir.VectorType(ir.IntType(16), 2 * lanes), [0] * (2 * lanes))
            wblock = builder.gep(pbase, [builder.mul(b, c(QK * nr))])  # 32 k x nr rows bytes per block
            groups = QK // 4 // group
            for gi in range(groups):
                iacc = [[izero] * nv for _ in range(mr)]
                part = [[pzero] * nv for _ in range(mr)]
                for kq in range(gi * group, (gi + 1) * group):
                    w = [builder.load(builder.bitcast(builder.gep(wblock, [c(kq * 4 * nr + 4 * lanes * v)]),
                                                      ivec.as_pointer()), align=4 * lanes) for v in range(nv)]
                    for i in range(mr):
                        x4 = builder.load(builder.bitcast(builder.gep(qrows[i], [builder.add(builder.mul(b, c(QK)), c(4 * kq))]),
                                                          i32.as_pointer()), align=1)
                        xb = splat(x4, ivec)
                        for v in range(nv):
                            if pairs:
                                part[i][v] = builder.add(part[i][v], pair_sums(builder, w[v], xb, tier))
                            else:
                                iacc[i][v] = dot_bytes(builder, iacc[i][v], w[v], xb, tier, signed_q8)
                    if pairs and (kq + 1 - gi * group) % widen == 0:
                        iacc = [[builder.add(iacc[i][v], widen_pairs(builder, part[i][v], tier)) for v in range(nv)]
                                for i in range(mr)]
                        part = [[pzero] * nv for _ in range(mr)]
                g = builder.add(builder.mul(b, c(groups)), c(gi))  # the scale group
                srow = builder.gep(sbase, [builder.mul(g, c(2 * nr))])  # [d of nr rows, mn of nr rows]
                dv = [builder.load(builder.bitcast(builder.gep(srow, [c(lanes * v)]), fvec.as_pointer()), align=4)
                      for v in range(nv)]
                mv = [builder.load(builder.bitcast(builder.gep(srow, [c(nr + lanes * v)]), fvec.as_pointer()), align=4)
                      for v in range(nv)]
                new = []
                for i in range(mr):
                    xdb = splat(builder.load(builder.gep(drows[i], [b])), fvec)
                    xsb = splat(builder.load(builder.gep(srows[i], [g])), fvec)  # xs per group
                    row = []
                    for v in range(nv):
                        f = builder.sitofp(iacc[i][v], fvec)
                        a = builder.call(fma, [f, builder.fmul(dv[v], xdb), acc[i][v]])
                        row.append(builder.call(fma, [mv[v], xsb, a]))
                    new.append(row)
                acc = new
            return acc

        def run(signed_q8, widen, group):
            return counted_loop(builder, nb, 1, [[fzero] * nv for _ in range(mr)],
                                lambda b, acc: step(b, acc, signed_q8, widen, group), "qmicro")

        # one loop per panel mode (see make_micro): (signed Q8_0, k-quads per int16 pair sum, k-quads per group)
        if tier.dot == "pmaddubsw":
            modes = {0: (False, 8, 8), 1: (True, None, 8), 2: (False, 4, 8), 3: (False, 2, 4)}
        else:  # one dot product for every per-32 kind; Q6 scales every 16
            modes = {0: (False, None, 8), 3: (False, None, 4)}
        done = builder.append_basic_block("qmicro.modes")
        sw = builder.switch(mode, done)
        ends = []
        for m, (sgn, widen, group) in modes.items():
            blk = builder.append_basic_block(f"qmicro.mode{m}")
            sw.add_case(c(m), blk)
            if m == 0 and tier.dot != "pmaddubsw":
                sw.add_case(c(1), blk)
                sw.add_case(c(2), blk)
            builder.position_at_end(blk)
            ends.append((run(sgn, widen, group), builder.basic_block))
            builder.branch(done)
        builder.position_at_end(done)
        result = [[builder.phi(fvec) for _ in range(nv)] for _ in range(mr)]
        for i in range(mr):
            for v in range(nv):
                for res, blk in ends:
                    result[i][v].add_incoming(res[i][v], blk)
                result[i][v].add_incoming(fzero, sw.parent)  # no such mode: never taken
        for i in range(mr):
            orow = builder.gep(out.data, [builder.add(builder.mul(builder.add(o0, c(i)), ldo), c0)])
            for v in range(nv):
                builder.store(result[i][v], builder.bitcast(builder.gep(orow, [c(lanes * v)]), fvec.as_pointer()),
                              align=4)
        return context.get_dummy_value()
    return codegen


def _micro_sig(out, o0, c0, xq, xd, xs, t0, panel, p0, sc, s0, nb, signed, *rest):
    """The register block's Numba signature, or None for arguments of other types."""
    def arr(a, dt, nd):
        return isinstance(a, types.Array) and a.ndim == nd and a.dtype == dt and a.layout == "C"
    ok = (arr(out, types.float32, 2) and arr(xq, types.int8, 2) and arr(xd, types.float32, 2)
          and arr(xs, types.float32, 2) and arr(panel, types.uint8, 1) and arr(sc, types.float32, 1)
          and all(isinstance(v, types.Integer) for v in (o0, c0, t0, p0, s0, nb, signed, *rest)))
    if not ok:
        return None
    i64 = types.int64
    return types.void(out, i64, i64, xq, xd, xs, i64, panel, i64, sc, i64, i64, i64, *[i64] * len(rest))


def make_micro(mr: int, tier: Tier = TIER):
    """The register block for mr tokens as a Numba intrinsic:

    micro(out, o0, c0, xq, xd, xs, t0, panel, p0, sc, s0, nb, mode) sets out[o0 + i, c0 + j] for
    i < mr, j < 2 tier.float_lanes from tokens t0 + i of xq/xd/xs, the panel bytes from p0
    (ALIGN-aligned) and the scale vectors from sc[s0] (one [d, mn] pair of vectors per scale
    group); mode (`panel_mode`): 0 nibbles, 1 a signed Q8_0 panel (tier.signed_q8), 2 5-bit
    values, 3 6-bit values with scale groups of 16, whose xs holds the activations' sums per 16.
    Tests make other tiers' blocks to run them on the same CPU.
    """
    @intrinsic
    def micro(typingctx, out, o0, c0, xq, xd, xs, t0, panel, p0, sc, s0, nb, signed):
        sig = _micro_sig(out, o0, c0, xq, xd, xs, t0, panel, p0, sc, s0, nb, signed)
        return None if sig is None else (sig, _micro_ir(mr, tier))
    return micro


@intrinsic
def _micro_mr(typingctx, out, o0, c0, xq, xd, xs, t0, panel, p0, sc, s0, nb, signed, mr):
    """The register blocks for 1..MR tokens in one function: micro's arguments, then mr."""
    sig = _micro_sig(out, o0, c0, xq, xd, xs, t0, panel, p0, sc, s0, nb, signed, mr)
    if sig is None:
        return None

    def codegen(context, builder, sig_, args):
        done = builder.append_basic_block("qmicro.exit")
        by_mr = builder.switch(args[-1], done)
        for m in range(1, MR + 1):
            blk = builder.append_basic_block(f"qmicro.mr{m}")
            by_mr.add_case(ir.Constant(ir.IntType(64), m), blk)
            builder.position_at_end(blk)
            _micro_ir(m, TIER)(context, builder, sig_, args[:-1])
            builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _misalign(typingctx, a):
    """Elements to skip from a's start to reach an ALIGN-byte boundary."""
    if not (isinstance(a, types.Array) and a.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, args[0])
        i64 = ir.IntType(64)
        p = builder.ptrtoint(arr.data, i64)
        skip = builder.and_(builder.sub(ir.Constant(i64, 0), p), ir.Constant(i64, ALIGN - 1))
        return builder.udiv(skip, ir.Constant(i64, context.get_abi_sizeof(context.get_data_type(sig.args[0].dtype))))
    return types.int64(a), codegen


@kernel(inline=True)
def _spread4(b):
    """The low 4 bits of byte b as bit 4 of each byte of a word: 5-bit values' fifth bits."""
    v = np.uint32(b)
    return (((v & np.uint32(1)) | ((v & np.uint32(2)) << np.uint32(7)) | ((v & np.uint32(4)) << np.uint32(14))
             | ((v & np.uint32(8)) << np.uint32(21))) << np.uint32(4))


@kernel(inline=True)
def _tops(q4, l, r, h, k):
    """Q6: the top two bits of elements 4k..4k+3 (plane byte 16p + j of stretch p holds element
    64p + 16i + j in bits 2i, 2i + 1), moved to bits 4-5 of each byte of a word."""
    e = 4 * k
    word = q4[l, r, (h + 16 * (e >> 6) + (e & 15)) >> 2]
    return ((word >> np.uint32(2 * ((e & 63) >> 4))) & np.uint32(0x03030303)) << np.uint32(4)


@kernel
def panel_mode(kind):
    """The register block's mode for a panel of this kind (see make_micro)."""
    if (kind == Q8_0 or kind == Q8_0T) and SIGNED_Q8:
        return 1
    if kind == Q6:
        return 3
    return 2 if kind == Q5 else 0


@kernel
def pack_panel(panel, sc, w, l, r0, nr, NRp, signed_q8):
    """Rows r0 .. r0 + nr (nr <= NRp) of W[l] -> the VNNI panel of NRp rows and its scale vectors.

    panel uint8 (n * NRp,): [k/4][NRp rows][4 bytes] of the weights as the dot product takes them:
    unsigned nibbles, Q8_0 bytes + 128 or (signed_q8) as they are; rows past nr are 0.
    sc f32 (n // 32 * 2 * NRp,): [b][d of NRp rows, mn of NRp rows].
    """
    kind, q, s, m, f = w
    if QT.is_tiled(kind):  # a tiled weight (kernels/qtile.py), tiled for this tier's signedness
        QT.pack_panel(panel, sc, w, l, r0, nr, NRp)
        return
    n = panel.shape[0] // NRp  # panel: n bytes per row
    ng = sc.shape[0] // (2 * NRp)  # scale groups (n // 32, or n // 16 for Q6)
    p4 = panel.view(np.uint32)
    q4 = q.view(np.uint32)  # (L, rows, row_bytes // 4)
    p4[:] = 0  # rows past nr
    # Word i of a 4-bit row holds elements 4i'..4i'+3 of block i // 4 (i' = i % 4) in its low
    # nibbles and the 16 after them in its high nibbles: two k-quads of the panel, by masking,
    # with no byte shuffles. Rows go outer: each row is read in order (measured faster than rows
    # inner for n = 576; about even at 1536, where the 48 KB panel fills L1).
    if kind == Q8_0:
        flip = np.uint32(0) if signed_q8 else np.uint32(0x80808080)
        for j in range(nr):
            for k in range(n // 4):
                p4[k * NRp + j] = q4[l, r0 + j, k] ^ flip
    else:
        h = n // 2
        for j in range(nr):
            for i in range(n // 8):
                k = (i >> 2) * 8 + (i & 3)  # the low nibbles' k-quad; the high ones' is k + 4
                v = q4[l, r0 + j, i]
                lo = v & np.uint32(0x0F0F0F0F)
                hi = (v >> np.uint32(4)) & np.uint32(0x0F0F0F0F)
                if kind == Q5:  # the fifth bits of elements 4k.. and 4(k + 4).., one bit into each byte
                    lo |= _spread4(q[l, r0 + j, h + (k >> 1)] >> np.uint8(4 * (k & 1)))
                    hi |= _spread4(q[l, r0 + j, h + ((k + 4) >> 1)] >> np.uint8(4 * ((k + 4) & 1)))
                elif kind == Q6:  # the top two bits of elements 4k..: 4 consecutive plane bytes
                    lo |= _tops(q4, l, r0 + j, h, k)
                    hi |= _tops(q4, l, r0 + j, h, k + 4)
                p4[k * NRp + j] = lo
                p4[(k + 4) * NRp + j] = hi
    q8_mn = np.float32(0.0) if signed_q8 else np.float32(-128.0)
    for b in range(ng):
        for j in range(NRp):
            d = np.float32(0.0)
            mn = np.float32(0.0)
            if j < nr:
                d = s[l, r0 + j, b]
                if kind == Q4_1 or kind == Q5 or kind == Q6:
                    mn = m[l, r0 + j, b]
                elif kind == Q4_0:
                    mn = np.float32(-8.0) * d
                else:
                    mn = q8_mn * d
            sc[b * 2 * NRp + j] = d
            sc[b * 2 * NRp + NRp + j] = mn


@kernel(parallel=True)
def linear_a8_tiles(out, xq, xd, xs, w, l, r_lo, scratch):
    """xq int8 (T, n) with block scales xd f32 (T, n // 32) and sums xs f32 (T, n // 32; for Q6
    n // 16, act8.sums16) @ W[l][r_lo:r_lo + rows].T -> out f32 (T, rows): the weight rows from
    r_lo on, as many as out has columns.

    w is a Q8_0/Q4_0/Q4_1/Q5/Q6 weight (kernels/linear.py); scratch f32 (threads,
    scratch_size(n_max)) is per-thread working space, so the call allocates nothing.
    """
    T, n = xq.shape
    rows = out.shape[1]
    nb = n // QK
    ng = nb * 2 if w[0] == Q6 else nb  # scale groups
    tasks = (rows + NR - 1) // NR
    for task in prange(tasks):
        buf = scratch[get_thread_id()]
        a = _misalign(buf)
        panel = buf[a:a + NR * n // 4].view(np.uint8)
        sc = buf[a + NR * n // 4:a + NR * n // 4 + 2 * NR * ng]
        e0 = a + NR * n // 4 + 2 * NR * ng
        edge = buf[e0:e0 + MR * NR].reshape((MR, NR))
        r0 = task * NR
        nr = min(rows, r0 + NR) - r0
        pack_panel(panel, sc, w, l, r_lo + r0, nr, NR, SIGNED_Q8)
        mode = panel_mode(w[0])
        for t in range(0, T, MR):  # the panel stays in cache while every token passes
            mr = min(MR, T - t)
            if nr == NR:
                _micro_mr(out, t, r0, xq, xd, xs, t, panel, 0, sc, 0, nb, mode, mr)
            else:
                _micro_mr(edge, 0, 0, xq, xd, xs, t, panel, 0, sc, 0, nb, mode, mr)
                for i in range(mr):
                    for j in range(nr):
                        out[t + i, r0 + j] = edge[i, j]


def scratch_size(n_max: int) -> int:
    """Per-thread scratch floats `linear_a8_tiles` needs for inputs of width <= n_max."""
    return NR * n_max // 4 + 2 * NR * (n_max // 16) + MR * NR + ALIGN // 4  # scales: up to a group per 16
