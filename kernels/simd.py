"""The LLVM IR pieces the hand-written kernels share, in the instructions of the ISA tier
(kernels/isa.py). Numba's disk cache is keyed on the target's features, which the tier follows,
so code chosen from the tier is safe to cache."""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .isa import TIER, Tier

_i8, _i16, _i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)

# The u8 x s8 dot-product intrinsics by register width in bytes: (vpdpbusd, vpmaddubsw, vpmaddwd)
_DOT_INTRINSICS = {
    64: ("llvm.x86.avx512.vpdpbusd.512", "llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"),
    32: ("llvm.x86.avx512.vpdpbusd.256", "llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"),
    16: ("llvm.x86.avx512.vpdpbusd.128", "llvm.x86.ssse3.pmadd.ub.sw.128", "llvm.x86.sse2.pmadd.wd"),
}


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


def fma(builder, vec_type, tier: Tier = TIER):
    """The fused multiply-add intrinsic for float vectors of vec_type: llvm.fma where the tier has
    FMA; elsewhere llvm.fmuladd, which LLVM may leave as a multiply and an add (llvm.fma on a CPU
    without FMA becomes a library call per element)."""
    name = "fma" if "fma" in tier.needs else "fmuladd"
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec_type, [vec_type] * 3),
                                          f"llvm.{name}.v{vec_type.count}f32")


def _lanes(builder, v, start, count):
    """Elements start .. start + count of vector v (a register-aligned part: free)."""
    if start == 0 and count == v.type.count:
        return v
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, count), list(range(start, start + count))))


def _concat(builder, parts):
    """One vector of the parts, in order (all the same type)."""
    while len(parts) > 1:
        n = parts[0].type.count
        parts = [builder.shuffle_vector(parts[i], parts[i + 1], ir.Constant(ir.VectorType(_i32, 2 * n), list(range(2 * n))))
                 for i in range(0, len(parts), 2)]
    return parts[0]


def dot_bytes(builder, acc, u, x, tier: Tier = TIER, signed: bool = False):
    """acc <n x i32> + sum_k u[4i+k] x[4i+k] in lane i (x signed bytes; u unsigned, or signed with
    signed=True). u and x are any vectors of 4n bytes.

    The tier's instruction, register by register: vpdpbusd (VNNI tiers), vpmaddubsw + vpmaddwd
    (AVX2, AVX-512), or widening multiplies in plain IR (generic). vpmaddubsw saturates at 2^15,
    so there unsigned u must stay below 129 and 8-bit weights come signed (isa.Tier.signed_q8):
    |u| against x negated where u < 0."""
    n = acc.type.count
    v8 = ir.VectorType(_i8, 4 * n)
    u, x = builder.bitcast(u, v8), builder.bitcast(x, v8)
    if signed:
        if tier.dot != "pmaddubsw":
            raise ValueError(f"signed 8-bit weights are for the vpmaddubsw tiers, not {tier.name}")
        neg = builder.icmp_signed("<", u, ir.Constant(v8, [0] * (4 * n)))
        zero = ir.Constant(v8, [0] * (4 * n))
        x = builder.select(neg, builder.sub(zero, x), x)
        u = builder.select(neg, builder.sub(zero, u), u)  # -(-128) wraps to 0x80: 128 unsigned
    if tier.dot == "ir":
        v32 = ir.VectorType(_i32, 4 * n)
        p = builder.mul(builder.zext(u, v32), builder.sext(x, v32))
        for k in range(4):
            acc = builder.add(acc, builder.shuffle_vector(p, p, ir.Constant(ir.VectorType(_i32, n), list(range(k, 4 * n, 4)))))
        return acc
    if tier.dot == "pmaddubsw":
        return builder.add(acc, widen_pairs(builder, pair_sums(builder, u, x, tier), tier))
    width = min(tier.vector_bits // 8, 4 * n)  # bytes per instruction
    vi32 = ir.VectorType(_i32, width // 4)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vi32, [vi32] * 3), _DOT_INTRINSICS[width][0])
    parts = []
    for c in range(4 * n // width):
        uc, xc = _lanes(builder, u, c * width, width), _lanes(builder, x, c * width, width)
        ac = _lanes(builder, acc, c * width // 4, width // 4)
        parts.append(builder.call(fn, [ac, builder.bitcast(uc, vi32), builder.bitcast(xc, vi32)]))
    return _concat(builder, parts)


def pair_sums(builder, u, x, tier: Tier = TIER):
    """vpmaddubsw: <2m x i16> lane j = u[2j] x[2j] + u[2j+1] x[2j+1] (u unsigned, x signed bytes,
    any vectors of 4m bytes), saturating at +-2^15. For a vpmaddubsw tier only."""
    nbytes = u.type.count * u.type.element.width // 8
    v8 = ir.VectorType(_i8, nbytes)
    u, x = builder.bitcast(u, v8), builder.bitcast(x, v8)
    width = min(tier.vector_bits // 8, nbytes)
    vi8, vi16 = ir.VectorType(_i8, width), ir.VectorType(_i16, width // 2)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vi16, [vi8, vi8]), _DOT_INTRINSICS[width][1])
    return _concat(builder, [builder.call(fn, [_lanes(builder, u, c, width), _lanes(builder, x, c, width)])
                             for c in range(0, nbytes, width)])


def widen_pairs(builder, p, tier: Tier = TIER):
    """vpmaddwd with ones: <2m x i16> -> <m x i32>, lane i = p[2i] + p[2i+1]."""
    m2 = p.type.count
    width = min(tier.vector_bits // 16, m2)  # i16 lanes per instruction
    vi16, vi32 = ir.VectorType(_i16, width), ir.VectorType(_i32, width // 2)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vi32, [vi16, vi16]),
                                        _DOT_INTRINSICS[2 * width][2])
    ones = ir.Constant(vi16, [1] * width)
    return _concat(builder, [builder.call(fn, [_lanes(builder, p, c, width), ones]) for c in range(0, m2, width)])


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
