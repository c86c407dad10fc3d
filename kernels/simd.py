"""What the CPU's vector units offer, and the LLVM IR pieces the hand-written kernels share.

Read once at import; Numba's disk cache is keyed on the CPU, so code chosen from these flags is
safe to cache."""
import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_FEATURES = llvm.get_host_cpu_features()
AVX512 = bool(_FEATURES.get("avx512f", False))
VNNI = bool(_FEATURES.get("avx512vnni", False))

_I32X16 = ir.VectorType(ir.IntType(32), 16)
_I8X64 = ir.VectorType(ir.IntType(8), 64)
_I32X64 = ir.VectorType(ir.IntType(32), 64)


@intrinsic
def float_bits(typingctx, v):
    """The bits of a float32 as an int32 (a bitcast, which the loop vectorizer keeps in vectors)."""
    if v != types.float32:
        return None
    return types.int32(types.float32), lambda context, builder, sig, args: builder.bitcast(args[0], ir.IntType(32))


@intrinsic
def bits_float(typingctx, i):
    """The float32 whose bits are the low 32 bits of integer i (the inverse of float_bits; a
    bitcast, which vectorizes)."""
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if i.bitwidth != 32:
            v = builder.trunc(v, ir.IntType(32)) if i.bitwidth > 32 else builder.sext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())
    return types.float32(i), codegen


def dpbusd(builder, acc, u, x, vnni: bool):
    """acc <16 x i32> + the four products u[4i+k] x[4i+k] (u unsigned, x signed bytes) per lane i.

    u and x are any 512-bit vectors, read as 64 bytes. With vnni this is AVX512-VNNI's vpdpbusd;
    without, the same integer sums from widening multiplies in plain IR."""
    if vnni:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32X16, [_I32X16] * 3),
                                            "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [acc, builder.bitcast(u, _I32X16), builder.bitcast(x, _I32X16)])
    p = builder.mul(builder.zext(builder.bitcast(u, _I8X64), _I32X64),
                    builder.sext(builder.bitcast(x, _I8X64), _I32X64))
    for k in range(4):
        acc = builder.add(acc, builder.shuffle_vector(p, p, ir.Constant(_I32X16, list(range(k, 64, 4)))))
    return acc


# The KV cache holds float32, or IEEE half floats as their uint16 bits (Numba has no float16 on
# the CPU). kv_get / kv_put convert one element either way; in a loop over a row LLVM turns them
# into vcvtph2ps / vcvtps2ph. For float32 caches both are the identity, so the same kernel source
# compiles for either cache type.

def _is_half_bits(t) -> bool:
    return isinstance(t, types.Integer) and t.bitwidth == 16 and not t.signed


@intrinsic
def kv_get(typingctx, x):
    """A KV-cache element as a float32: half bits (uint16) widen exactly, a float32 is itself."""
    if _is_half_bits(x):
        def codegen(context, builder, sig, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return types.float32(x), codegen
    if x == types.float32:
        return types.float32(x), lambda context, builder, sig, args: args[0]
    return None


@intrinsic
def kv_put(typingctx, cache, x):
    """The float32 x as an element of the array `cache`: half bits (round to nearest even) for a
    uint16 cache, x itself for a float32 one."""
    if not isinstance(cache, types.Array) or x != types.float32:
        return None
    if _is_half_bits(cache.dtype):
        def codegen(context, builder, sig, args):
            return builder.bitcast(builder.fptrunc(args[1], ir.HalfType()), ir.IntType(16))
        return types.uint16(cache, x), codegen
    if cache.dtype == types.float32:
        return types.float32(cache, x), lambda context, builder, sig, args: args[1]
    return None


def counted_loop(builder, stop, step, init, body, name: str):
    """Emit `for k in range(0, stop, step)` (k, stop: i64 values; step an int) carrying the values
    `init` (a list of lists, e.g. vector accumulators) in phis. body(k, acc) emits one iteration
    and returns the new values, shaped like init. Returns the values after the loop: init when
    stop <= 0. The register blocks' loops, so that their accumulators stay in registers."""
    i64 = ir.IntType(64)
    entry = builder.basic_block
    loop = builder.append_basic_block(f"{name}.loop")
    done = builder.append_basic_block(f"{name}.done")
    builder.cbranch(builder.icmp_signed(">", stop, ir.Constant(i64, 0)), loop, done)
    builder.position_at_end(loop)
    k = builder.phi(i64)
    k.add_incoming(ir.Constant(i64, 0), entry)
    acc = [[builder.phi(v.type) for v in row] for row in init]
    for phis, row in zip(acc, init):
        for p, v in zip(phis, row):
            p.add_incoming(v, entry)
    new = body(k, acc)
    k1 = builder.add(k, ir.Constant(i64, step))
    end = builder.basic_block
    k.add_incoming(k1, end)
    for phis, row in zip(acc, new):
        for p, v in zip(phis, row):
            p.add_incoming(v, end)
    builder.cbranch(builder.icmp_signed("<", k1, stop), loop, done)
    builder.position_at_end(done)
    out = [[builder.phi(v.type) for v in row] for row in init]
    for phis, a, b in zip(out, init, new):
        for p, v0, v1 in zip(phis, a, b):
            p.add_incoming(v0, entry)
            p.add_incoming(v1, end)
    return out
