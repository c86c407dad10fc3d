"""The prefill matmul's register block, written in LLVM IR: out[t, r] = x[t] . W[r] for up to 6
tokens and 16 weight rows at once.

Numba's loops leave LLVM to find the vectors, and for a matmul it finds dot products: one
horizontal sum per (token, row), and no way to keep a 6 x 16 block of sums in registers across
the k loop. This is the classic AVX2 GEMM kernel instead (as in BLIS and OpenBLAS): the weight
tile is packed k-major in 16-row panels, each k step loads two 8-float vectors of the panel,
broadcasts one activation per token and does twelve fused multiply-adds into twelve accumulator
registers, so no reduction is needed and every loaded weight feeds six tokens.

`micro(out, o0, x, t0, panel, p0, n, r0, mr)` calls a Numba intrinsic: it compiles into the calling
kernel, and with the disk cache like any other code.
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .jit import kernel
from .simd import fma as fma_intrinsic

NR = 16  # weight rows per panel: two 8-float AVX2 vectors
MR = 6   # tokens per block: 12 accumulators + 2 weight vectors + 1 broadcast fill 15 of 16 registers


def _micro_ir(mr: int):
    """Codegen for mr (1..MR) tokens."""
    def codegen(context, builder, sig, args):
        out_t, _, x_t, _, panel_t = sig.args[:5]
        out_v, o0, x_v, t0, panel_v, p0, n, r0 = args
        out = context.make_array(out_t)(context, builder, out_v)
        x = context.make_array(x_t)(context, builder, x_v)
        panel = context.make_array(panel_t)(context, builder, panel_v)
        i64 = ir.IntType(64)
        f32 = ir.FloatType()
        vec = ir.VectorType(f32, 8)
        vptr = vec.as_pointer()
        ldx = cgutils.unpack_tuple(builder, x.shape, 2)[1]
        ldo = cgutils.unpack_tuple(builder, out.shape, 2)[1]
        fma = fma_intrinsic(builder, vec)
        zero = ir.Constant(vec, [0.0] * 8)
        undef_vec = ir.Constant(vec, ir.Undefined)
        mask0 = ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8)
        rows = [builder.gep(x.data, [builder.mul(builder.add(t0, ir.Constant(i64, i)), ldx)]) for i in range(mr)]
        pbase = builder.gep(panel.data, [p0])

        entry = builder.basic_block
        loop = builder.append_basic_block("micro.loop")
        done = builder.append_basic_block("micro.done")
        has_work = builder.icmp_signed(">", n, ir.Constant(i64, 0))
        builder.cbranch(has_work, loop, done)

        builder.position_at_end(loop)
        k = builder.phi(i64)
        k.add_incoming(ir.Constant(i64, 0), entry)
        acc = [[builder.phi(vec) for _ in range(2)] for _ in range(mr)]
        for a in acc:
            for p in a:
                p.add_incoming(zero, entry)
        wp = builder.gep(pbase, [builder.mul(k, ir.Constant(i64, NR))])
        w0 = builder.load(builder.bitcast(wp, vptr), align=4)
        w1 = builder.load(builder.bitcast(builder.gep(wp, [ir.Constant(i64, 8)]), vptr), align=4)
        new = []
        for i in range(mr):
            s = builder.load(builder.gep(rows[i], [k]))
            b = builder.shuffle_vector(builder.insert_element(undef_vec, s, ir.Constant(ir.IntType(32), 0)),
                                       undef_vec, mask0)
            new.append([builder.call(fma, [b, w0, acc[i][0]]), builder.call(fma, [b, w1, acc[i][1]])])
        k1 = builder.add(k, ir.Constant(i64, 1))
        body_end = builder.basic_block
        k.add_incoming(k1, body_end)
        for i in range(mr):
            for j in range(2):
                acc[i][j].add_incoming(new[i][j], body_end)
        builder.cbranch(builder.icmp_signed("<", k1, n), loop, done)

        builder.position_at_end(done)
        result = [[builder.phi(vec) for _ in range(2)] for _ in range(mr)]  # phis first in a block
        for i in range(mr):
            for j in range(2):
                result[i][j].add_incoming(zero, entry)
                result[i][j].add_incoming(new[i][j], body_end)
        for i in range(mr):
            res = result[i]
            orow = builder.gep(out.data, [builder.add(builder.mul(builder.add(o0, ir.Constant(i64, i)), ldo), r0)])
            builder.store(res[0], builder.bitcast(orow, vptr), align=4)
            builder.store(res[1], builder.bitcast(builder.gep(orow, [ir.Constant(i64, 8)]), vptr), align=4)
        return context.get_dummy_value()
    return codegen


def _make_micro(mr: int):
    @intrinsic
    def micro(typingctx, out, o0, x, t0, panel, p0, n, r0):
        ok = (isinstance(out, types.Array) and out.ndim == 2 and out.dtype == types.float32 and out.layout == "C"
              and isinstance(x, types.Array) and x.ndim == 2 and x.dtype == types.float32 and x.layout == "C"
              and isinstance(panel, types.Array) and panel.dtype == types.float32 and panel.layout == "C"
              and all(isinstance(v, types.Integer) for v in (o0, t0, p0, n, r0)))
        if not ok:
            return None
        i64 = types.int64
        sig = types.void(out, i64, x, i64, panel, i64, i64, i64)
        return sig, _micro_ir(mr)
    return micro


_micro1, _micro2, _micro3, _micro4, _micro5, _micro6 = (_make_micro(m) for m in range(1, MR + 1))


@kernel
def micro(out, o0, x, t0, panel, p0, n, r0, mr):
    """out[o0 + i, r0 + j] = sum_k x[t0 + i, k] * panel[p0 + 16 k + j] for i < mr (1..6), j < 16.

    out and x f32 2-D C-contiguous; panel f32 holds 16 rows k-major from p0.
    """
    if mr == 6:
        _micro6(out, o0, x, t0, panel, p0, n, r0)
    elif mr == 5:
        _micro5(out, o0, x, t0, panel, p0, n, r0)
    elif mr == 4:
        _micro4(out, o0, x, t0, panel, p0, n, r0)
    elif mr == 3:
        _micro3(out, o0, x, t0, panel, p0, n, r0)
    elif mr == 2:
        _micro2(out, o0, x, t0, panel, p0, n, r0)
    else:
        _micro1(out, o0, x, t0, panel, p0, n, r0)


def pack_panels(w: np.ndarray) -> np.ndarray:
    """W (rows, n), rows a multiple of 16 -> panels, k-major within each 16-row panel (for tests)."""
    rows, n = w.shape
    return np.ascontiguousarray(w.reshape(rows // NR, NR, n).transpose(0, 2, 1)).ravel()
