"""The decode matvec over row-interleaved weights: out[t] = W[l] @ x[t] for T <= 8 tokens, with
every token's arithmetic the same whatever T is.

`repack` lays a Q8_0, Q4_0 or Q4_1 weight out in tiles of TILE = 16 rows. Within a tile each
32-element block is 16 rows x 32 values, stored so that one 64-byte vector holds 4 consecutive
values of all 16 rows, row r's in bytes 4r..4r+3:

    Q8_0  8 vectors per block; vector c: values 4c..4c+3 of each row (as q + 128, or q itself on
          the vpmaddubsw tiers, see kernels/isa.py)
    Q4    4 vectors of nibble pairs per block; vector c: low nibbles values 8c..8c+3, high
          nibbles 8c+4..8c+7

and the block's 16 scales (and Q4_1 offsets) follow as one 16-float vector per block
(st, mt: (L, tiles, blocks * 16)).

The kernel then needs no shuffle and no horizontal sum: for each token, one dot product
(vpdpbusd on the VNNI tiers, kernels/simd.dot_bytes) multiplies a weight vector by the token's 4
activation bytes broadcast to all 16 lanes, so the 16 int32 lanes are the 16 rows' partial sums.
A block's 8 products sum exactly in int32; then per block and token one convert and two
multiply-adds scale it into the row's float accumulator:

    acc[t, r] += float(isum[t, r, b]) * (s[r, b] * xd[t, b]);  acc[t, r] += mn[r, b] * xs[t, b]

with mn = m (Q4_1), s and xs * -8 (Q4_0), s and xs * -128 (Q8_0 as q + 128; no term when signed).
The float steps run in the same order for every token count, so a token's result is bit for bit
the same in a call of 1 token as in one of 8 (the point of this layout: prompt-lookup
verification computes exactly what a decode step does, for drafts up to 7 tokens). The integer
sums are split into independent chains when T is small, which changes no result.

Per token the float work is 4 operations per 16 rows x 32 values, against the row-major loop's 5
per row x 64 (kernels/qmatvec.py), and each unpacked weight vector serves every token: that
loop's 8 tokens cost ~5x one, here the dot products are most of the work at any T.
"""
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .formats import Q4_0, Q4_0T, Q4_1, Q4_1T, Q8_0, Q8_0T, QK, TILED
from .isa import TIER, Tier
from .jit import kernel
from .qmatvec import MAX_T, PREFETCH, STRICT, _c, _if, _load, _loop
from .simd import dot_bytes
from .simd import fma as fma_intrinsic

TILE = 16  # rows per tile: one int32 lane each
KINDS = (Q8_0, Q4_0, Q4_1)  # the formats that tile (as Q8_0T, Q4_0T, Q4_1T)

_i8, _i32, _i64, _f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
_v64i8, _v16i32, _v16f32 = ir.VectorType(_i8, 64), ir.VectorType(_i32, 16), ir.VectorType(_f32, 16)


def block_bytes(kind: int) -> int:
    """Bytes of one tile's block: 16 rows x 32 values."""
    return TILE * (QK if kind == Q8_0 else QK // 2)


SIGNED_Q8 = TIER.signed_q8  # how `repack` stores Q8_0 by default, and what the readers below expect


@kernel(inline=True)
def is_tiled(kind):
    """Whether a weight kind is one of the tiled ones."""
    return kind == Q8_0T or kind == Q4_0T or kind == Q4_1T


def repack(kind: int, q: np.ndarray, s: np.ndarray, m: np.ndarray, signed_q8: bool | None = None):
    """A stacked Q8_0 / Q4_0 / Q4_1 weight (q uint8 (L, rows, row_bytes), s, m f32 (L, rows,
    cols // 32)) -> (qt uint8 (L, tiles, blocks * block_bytes), st, mt f32 (L, tiles, blocks * 16)),
    rows padded with zeros to whole tiles. Q8_0 values are stored + 128 (unsigned) unless
    signed_q8 (default: the running tier's choice)."""
    if kind not in KINDS:
        raise ValueError(f"repack: weight kind {kind} has no tiled layout (Q8_0, Q4_0, Q4_1 do)")
    L, rows, _ = q.shape
    nb = s.shape[2]
    tiles = -(-rows // TILE)
    qt = np.empty((L, tiles, nb * block_bytes(kind)), np.uint8)
    st = np.empty((L, tiles, nb * TILE), np.float32)
    mt = np.empty((L, tiles, nb * TILE), np.float32) if kind == Q4_1 else np.zeros((0, 0, 0), np.float32)
    flip = 0 if (SIGNED_Q8 if signed_q8 is None else signed_q8) else 0x80
    _repack(qt, st, mt, q, s, m, kind == Q8_0, flip)
    return qt, st, mt


@kernel(parallel=True)
def _repack(qt, st, mt, q, s, m, q8, flip):
    """`repack`'s layout, written tile by tile: qt byte (b, c, 4 r + j) of tile g is value 4c + j
    (Q8_0, its byte XOR flip) or, for Q4, values 8c + j and 8c + 4 + j as low and high nibble
    (ggml's byte p holds values p and p + 16) of row 16 g + r in block b; rows past the weight's
    are zero (Q8_0: flip, the zero value)."""
    L, tiles, tb = qt.shape
    rows = q.shape[1]
    nb = st.shape[2] // TILE
    bb = tb // nb
    for lg in prange(L * tiles):
        l, g = lg // tiles, lg % tiles
        for r in range(TILE):
            row = g * TILE + r
            inside = row < rows
            for b in range(nb):
                st[l, g, b * TILE + r] = s[l, row, b] if inside else np.float32(0.0)
                if mt.shape[0] > 0:
                    mt[l, g, b * TILE + r] = m[l, row, b] if inside else np.float32(0.0)
                for c in range(bb // 64):
                    at = b * bb + 64 * c + 4 * r
                    for j in range(4):
                        if q8:
                            v = q[l, row, b * QK + 4 * c + j] ^ np.uint8(flip) if inside else np.uint8(flip)
                        elif inside:
                            lo, hi = 8 * c + j, 8 * c + 4 + j  # values; byte p holds p and p + 16
                            p = q[l, row, b * (QK // 2) + (lo & 15)]
                            ph = q[l, row, b * (QK // 2) + (hi & 15)]
                            v = ((p >> np.uint8(4 * (lo >> 4))) & np.uint8(15)) | \
                                (((ph >> np.uint8(4 * (hi >> 4))) & np.uint8(15)) << np.uint8(4))
                        else:
                            v = np.uint8(0)
                        qt[l, g, at + j] = v


def chunk(tier: Tier) -> int:
    """Tokens one pass of the tier's loop takes: all 8, except in plain IR (the generic tier),
    where every token count's loop compiled would take minutes; there tokens go one at a time,
    which changes no token's arithmetic."""
    return 1 if tier.dot == "ir" else MAX_T


CHUNK = chunk(TIER)


def _chains(T: int) -> int:
    """Independent int32 sums per token and tile: enough dot products in flight at small T."""
    return {1: 4, 2: 2}.get(T, 1)


def _tiles_ir(tier: Tier):
    """Codegen: tiles g0..g1 of W[l] times all T tokens (T = xq.shape[0], 1..chunk(tier); other
    counts do nothing) into out's rows 16 g - base.. (rows outside out are not stored)."""
    def codegen(context, builder, sig, args):
        arrs = [context.make_array(ty)(context, builder, v) for ty, v in zip(sig.args[:7], args[:7])]
        out, xq, xd, xs, qt, st, mt = arrs
        l, g0, g1, base, kind = args[7:]
        T, n = cgutils.unpack_tuple(builder, xq.shape, 2)
        rows = ldo = cgutils.unpack_tuple(builder, out.shape, 2)[1]
        _, tiles, tb = cgutils.unpack_tuple(builder, qt.shape, 3)
        ldd = cgutils.unpack_tuple(builder, xd.shape, 2)[1]
        nb = builder.sdiv(n, _c(_i64, QK))
        fma = fma_intrinsic(builder, _v16f32, tier)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32]), "llvm.prefetch.p0i8")
        low4 = _c(_v64i8, [15] * 64)
        zero_i, zero_f = _c(_v16i32, [0] * 16), _c(_v16f32, [0.0] * 16)
        splat = ir.Constant(ir.VectorType(_i32, 16), [0] * 16)

        def bcast(v, ty):
            return builder.shuffle_vector(builder.insert_element(ir.Constant(ty, ir.Undefined), v, _c(_i32, 0)),
                                          ir.Constant(ty, ir.Undefined), splat)

        def body_for(T_, kd):
            signed = kd == Q8_0 and tier.signed_q8
            bb = block_bytes(kd)
            nvec = bb // 64
            ch = _chains(T_)
            mconst = {Q4_0: -8.0, Q8_0: None if signed else -128.0}.get(kd)
            xq_rows = [builder.gep(xq.data, [builder.mul(_c(_i64, t), n)]) for t in range(T_)]

            def tile(g, _):
                wt = builder.add(builder.mul(l, tiles), g)
                qbase = builder.gep(qt.data, [builder.mul(wt, tb)])
                sbase = builder.gep(st.data, [builder.mul(wt, builder.mul(nb, _c(_i64, TILE)))])
                mbase = builder.gep(mt.data, [builder.mul(wt, builder.mul(nb, _c(_i64, TILE)))]) if kd == Q4_1 else None

                def block(b, accs):
                    qb = builder.gep(qbase, [builder.mul(b, _c(_i64, bb))])
                    isum = [[zero_i] * ch for _ in range(T_)]
                    for c in range(nvec):
                        vp = builder.gep(qb, [_c(_i64, 64 * c)])
                        if PREFETCH:
                            builder.call(prefetch, [builder.gep(vp, [_c(_i64, PREFETCH)]), _c(_i32, 0), _c(_i32, 3),
                                                    _c(_i32, 1)])
                        v = _load(builder, vp, _v64i8)
                        if kd == Q8_0:
                            parts = [(v, 4 * c)]
                        else:
                            hi = builder.lshr(builder.bitcast(v, ir.VectorType(_i64, 8)), _c(ir.VectorType(_i64, 8), [4] * 8))
                            parts = [(builder.and_(v, low4), 8 * c),
                                     (builder.and_(builder.bitcast(hi, _v64i8), low4), 8 * c + 4)]
                        for t in range(T_):
                            k = c % ch
                            for u, off in parts:
                                xp = builder.gep(xq_rows[t], [builder.add(builder.mul(b, _c(_i64, QK)), _c(_i64, off))])
                                x4 = builder.load(builder.bitcast(xp, _i32.as_pointer()), align=1)
                                isum[t][k] = dot_bytes(builder, isum[t][k], u, builder.bitcast(bcast(x4, ir.VectorType(_i32, 16)), _v64i8),
                                                       tier, signed)
                    sv = _load(builder, builder.gep(sbase, [builder.mul(b, _c(_i64, TILE))]), _v16f32)
                    mv = _load(builder, builder.gep(mbase, [builder.mul(b, _c(_i64, TILE))]), _v16f32) if kd == Q4_1 else sv
                    new = []
                    for t in range(T_):
                        parts = isum[t]
                        while len(parts) > 1:
                            parts = [builder.add(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
                        f = builder.sitofp(parts[0], _v16f32)
                        xdt = builder.load(builder.gep(xd.data, [builder.add(builder.mul(_c(_i64, t), ldd), b)]))
                        sd = builder.fmul(sv, bcast(xdt, _v16f32), flags=STRICT)
                        a = builder.call(fma, [f, sd, accs[t]])
                        if kd == Q4_1 or mconst is not None:
                            xst = builder.load(builder.gep(xs.data, [builder.add(builder.mul(_c(_i64, t), ldd), b)]))
                            if mconst is not None:
                                xst = builder.fmul(xst, _c(_f32, mconst), flags=STRICT)
                            a = builder.call(fma, [mv, bcast(xst, _v16f32), a])
                        new.append(a)
                    return new

                accs = _loop(builder, _c(_i64, 0), nb, [zero_f] * T_, block, "qt.block")
                r0 = builder.sub(builder.mul(g, _c(_i64, TILE)), base)  # out's row of the tile's first
                full = builder.and_(builder.icmp_signed(">=", r0, _c(_i64, 0)),
                                    builder.icmp_signed("<=", builder.add(r0, _c(_i64, TILE)), rows))

                def store_all(vals):
                    for t in range(T_):
                        p = builder.gep(out.data, [builder.add(builder.mul(_c(_i64, t), ldo), r0)])
                        builder.store(accs[t], builder.bitcast(p, _v16f32.as_pointer()), align=4)
                    return vals

                def store_some(vals):
                    for t in range(T_):
                        for r in range(TILE):
                            ri = builder.add(r0, _c(_i64, r))

                            def one(v, t=t, r=r, ri=ri):
                                builder.store(builder.extract_element(accs[t], _c(_i32, r)),
                                              builder.gep(out.data, [builder.add(builder.mul(_c(_i64, t), ldo), ri)]))
                                return v
                            inside = builder.and_(builder.icmp_signed(">=", ri, _c(_i64, 0)),
                                                  builder.icmp_signed("<", ri, rows))
                            _if(builder, inside, [], one, "qt.store1")
                    return vals
                _if(builder, full, [], store_all, "qt.full")
                _if(builder, builder.not_(full), [], store_some, "qt.part")
                return []

            _loop(builder, g0, g1, [], tile, "qt.tiles")

        done = builder.append_basic_block("qt.exit")
        by_t = builder.switch(T, done)
        for T_ in range(1, chunk(tier) + 1):
            tb_ = builder.append_basic_block(f"qt.t{T_}")
            by_t.add_case(_c(_i64, T_), tb_)
            builder.position_at_end(tb_)
            by_kind = builder.switch(kind, done)
            for kd in KINDS:
                kb = builder.append_basic_block(f"qt.t{T_}.k{kd}")
                by_kind.add_case(_c(_i64, TILED[kd]), kb)
                builder.position_at_end(kb)
                body_for(T_, kd)
                builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()
    return codegen


def make_tiles(tier: Tier):
    @intrinsic
    def tiles(typingctx, out, xq, xd, xs, qt, st, mt, l, g0, g1, base, kind):
        def arr(a, dtype, ndim):
            return isinstance(a, types.Array) and a.dtype == dtype and a.ndim == ndim and a.layout == "C"
        ok = (arr(out, types.float32, 2) and arr(xq, types.int8, 2) and arr(xd, types.float32, 2)
              and arr(xs, types.float32, 2) and arr(qt, types.uint8, 3) and arr(st, types.float32, 3)
              and arr(mt, types.float32, 3) and all(isinstance(v, types.Integer) for v in (l, g0, g1, base, kind)))
        if not ok:
            return None
        i64 = types.int64
        return types.void(out, xq, xd, xs, qt, st, mt, i64, i64, i64, i64, i64), _tiles_ir(tier)
    return tiles


_tiles = make_tiles(TIER)


@kernel(parallel=True)
def linear_a8_tiled(out, xq, xd, xs, w, l, base, tasks):
    """xq int8 (T, n) with block scales xd, xs f32 (T, n // 32) @ W[l, base:base + rows].T -> out
    f32 (T, rows), for a tiled weight w = (Q8_0T / Q4_0T / Q4_1T, qt, st, mt, -) from `repack`.
    T is 1..8. The tiles are split into `tasks` contiguous ranges run in parallel. Allocates
    nothing."""
    kind, qt, st, mt, f = w
    T = xq.shape[0]
    rows = out.shape[1]
    if T < 1 or T > MAX_T:
        raise ValueError("linear_a8_tiled: xq must hold 1..8 tokens")
    if not is_tiled(kind):
        raise ValueError("linear_a8_tiled: weight kind must be a tiled Q8_0, Q4_0 or Q4_1")
    if st.shape[2] * QK != xq.shape[1] * TILE or base < 0 or base + rows > qt.shape[1] * TILE:
        raise ValueError("linear_a8_tiled: the weight's shape does not match out, xq and base")
    g_lo = base // TILE
    ntiles = (base + rows + TILE - 1) // TILE - g_lo
    for task in prange(tasks):
        g0, g1 = g_lo + task * ntiles // tasks, g_lo + (task + 1) * ntiles // tasks
        for c in range(0, T, CHUNK):
            e = min(T, c + CHUNK)
            _tiles(out[c:e], xq[c:e], xd[c:e], xs[c:e], qt, st, mt, l, g0, g1, base, kind)



@kernel
def dequant_row(dst, kind, qt, st, mt, l, r):
    """Row r of matrix l of a tiled weight -> dst f32 (cols,): the value the untiled row gives."""
    g = r // TILE
    lane = r - g * TILE
    nb = dst.shape[0] // QK
    for b in range(nb):
        d = st[l, g, b * TILE + lane]
        if kind == Q8_0T:
            at = b * 512 + 4 * lane
            for c in range(8):
                for j in range(4):
                    v = qt[l, g, at + 64 * c + j]
                    x = np.int32(np.int8(v)) if SIGNED_Q8 else np.int32(v) - 128
                    dst[b * QK + 4 * c + j] = d * np.float32(x)
        else:
            at = b * 256 + 4 * lane
            mn = mt[l, g, b * TILE + lane] if kind == Q4_1T else np.float32(0.0)
            for c in range(4):
                for j in range(4):
                    v = qt[l, g, at + 64 * c + j]
                    lo, hi = np.float32(v & 15), np.float32(v >> 4)
                    if kind == Q4_1T:
                        dst[b * QK + 8 * c + j] = d * lo + mn
                        dst[b * QK + 8 * c + 4 + j] = d * hi + mn
                    else:
                        dst[b * QK + 8 * c + j] = d * (lo - np.float32(8.0))
                        dst[b * QK + 8 * c + 4 + j] = d * (hi - np.float32(8.0))


@kernel
def pack_panel(panel, sc, w, l, r0, nr, NRp):
    """kernels/qgemm.py's pack_panel for a tiled weight: rows r0 .. r0 + nr (nr <= NRp) of W[l] ->
    the VNNI panel [k/4][NRp rows][4 bytes] (rows past nr zero) and its scale vectors
    [b][d of NRp rows, mn of NRp rows]. Each 4-byte group of a tile is already a k-quad of one
    row (Q4: two, by nibble), so this only moves words."""
    kind, qt, st, mt, f = w
    n = panel.shape[0] // NRp
    nb = n // QK
    p4 = panel.view(np.uint32)
    q4 = qt.view(np.uint32)  # (L, tiles, block words)
    p4[:] = 0
    low = np.uint32(0x0F0F0F0F)
    for j in range(nr):
        g = (r0 + j) // TILE
        lane = r0 + j - g * TILE
        if kind == Q8_0T:
            for k in range(n // 4):  # k-quad k: block k // 8, vector k % 8
                p4[k * NRp + j] = q4[l, g, (k >> 3) * 128 + (k & 7) * 16 + lane]
        else:
            for b in range(nb):
                for c in range(4):  # vector c: k-quads 8b + 2c (low nibbles) and 8b + 2c + 1 (high)
                    v = q4[l, g, b * 64 + c * 16 + lane]
                    k = b * 8 + 2 * c
                    p4[k * NRp + j] = v & low
                    p4[(k + 1) * NRp + j] = (v >> np.uint32(4)) & low
    for b in range(nb):
        for j in range(NRp):
            d = np.float32(0.0)
            mn = np.float32(0.0)
            if j < nr:
                g = (r0 + j) // TILE
                lane = r0 + j - g * TILE
                d = st[l, g, b * TILE + lane]
                if kind == Q4_1T:
                    mn = mt[l, g, b * TILE + lane]
                elif kind == Q4_0T:
                    mn = np.float32(-8.0) * d
                elif not SIGNED_Q8:
                    mn = np.float32(-128.0) * d
            sc[b * 2 * NRp + j] = d
            sc[b * 2 * NRp + NRp + j] = mn
