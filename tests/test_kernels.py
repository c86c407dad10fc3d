"""The Numba kernels (`fastinfer.kernels.linear`, `fastinfer.kernels.ops`) against the plain-NumPy
twins in tests/kernel_twins.py (attention: tests/test_attention.py).

Weights are built the way the engine builds them (`fastinfer.weights.tensors`, read-only
`QMatrix.args()` tuples); block-format bytes come from the independent quantizer in
tests/reference.py. Outputs and scratch buffers start out NaN, so an element a kernel forgets to
write, or a scratch value it reads before writing, shows up as a failure.

Tolerances:
* decoding a weight (dequant_row, dequant_matrix, embed) is exact: an fp16 block scale times a
  small integer (plus an fp16 minimum) fits a float32 mantissa, and half/bfloat16 widen exactly;
* a dot product is held to TOL[format] * sum_i |x_i w_i| per output, float32 accumulation error;
  for Q4_0 / Q4_1, whose offset (-8 d, m) the kernel may add separately as offset * sum(x), the
  sum counts |d q_i x_i| and |offset_i x_i| apart (see kernel_twins.linear_scale);
* the elementwise ops get a few float32 ulps.
"""
from __future__ import annotations

import zlib

import numba
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import kernel_twins as tw
import reference as R
from fastinfer.kernels import linear as L
from fastinfer.kernels import ops
from fastinfer.weights import tensors as WT

THREADS = numba.config.NUMBA_NUM_THREADS
KIND = {"F32": L.F32, "F16": L.F16, "BF16": L.BF16, "Q8_0": L.Q8_0, "Q4_0": L.Q4_0, "Q4_1": L.Q4_1}

# dot-product error allowed, as a fraction of sum_i |x_i w_i| (float32 eps is 1.2e-7; observed
# errors stay below 3.5e-7 for every format)
TOL = {"F32": 2e-6, "F16": 2e-6, "BF16": 2e-6, "Q8_0": 2e-6, "Q4_0": 2e-6, "Q4_1": 2e-6}

# (rows, cols): rows off the 16-row task size, odd widths for the float formats
FLOAT_SHAPES = [(37, 33), (1, 7), (17, 1), (100, 576)]
BLOCK_SHAPES = [(37, 32), (1, 96), (100, 576)]
LINEAR_CASES = [(f, r, c) for f in tw.FLOAT_FORMATS for r, c in FLOAT_SHAPES] + \
               [(f, r, c) for f in tw.BLOCK_FORMATS for r, c in BLOCK_SHAPES]
TOKENS = [1, 2, 3, 7, 64]  # T <= 2 reads packed rows (F32 and block formats); more expand a tile


def rng_for(*key) -> np.random.Generator:
    """A generator seeded by the test's parameters: every case reproducible, cases independent."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


# ----------------------------------------------------------------------------------------------
# building weights
# ----------------------------------------------------------------------------------------------

# values each float format must carry through: signed zeros, subnormals, the largest magnitudes
EDGE_VALUES = {
    "F32": [0.0, -0.0, 1e-40, -3e-39, 1e6, -1e6],
    "F16": [0.0, -0.0, 6e-8, -6e-8, 3e-5, -1e-6, 60000.0, -60000.0, 65504.0],
    "BF16": [0.0, -0.0, 1e-40, -2e-39, 1e30, -1e30],
}


def weight_values(fmt: str, rows: int, cols: int, rng) -> np.ndarray:
    """Random float32 (rows, cols) with the format's edge cases mixed in.

    Float formats get EDGE_VALUES at random places. Block formats get, in their first blocks, an
    all-zero block (scale 0), a block of negative zeros, a constant block (Q4_1: d = 0, m = value)
    and a block with one large outlier."""
    a = rng.standard_normal((rows, cols)).astype(np.float32)
    if fmt in EDGE_VALUES:
        flat = a.reshape(-1)
        vals = np.array(EDGE_VALUES[fmt], np.float32)
        at = rng.choice(flat.size, size=min(flat.size, 2 * vals.size), replace=False)
        flat[at] = np.resize(vals, at.size)
    else:
        blocks = a.reshape(-1, L.QK)
        specials = [np.float32(0.0), np.float32(-0.0), np.float32(0.7)]
        for b, v in enumerate(specials[:blocks.shape[0]]):
            blocks[b] = v
        if blocks.shape[0] > 3:
            blocks[3, 5] = 1000.0
    return a


def random_block_bytes(fmt: str, rows: int, cols: int, rng) -> np.ndarray:
    """Block bytes with uniformly random codes (every int8 / nibble value, which a quantizer may
    never emit, e.g. int8 -128) and sane fp16 scales/minimums."""
    raw = rng.integers(0, 256, size=(rows, R.row_bytes(fmt, cols)), dtype=np.uint8)
    blk = raw.reshape(rows, cols // L.QK, R.BLOCK_BYTES[fmt])
    n_halves = 2 if fmt == "Q4_1" else 1
    halves = rng.uniform(-0.1, 0.1, size=blk.shape[:2] + (n_halves,)).astype(np.float16)
    blk[..., :2 * n_halves] = halves.view(np.uint8)
    return raw


def packed_weight(fmt: str, rows: int, cols: int, rng) -> np.ndarray:
    """The packed payload of a test matrix. Block formats: the reference quantizer's bytes, with
    the last row (when there are several) replaced by random codes."""
    packed = tw.encode(weight_values(fmt, rows, cols, rng), fmt)
    if fmt in tw.BLOCK_FORMATS and rows > 1:
        packed[-1] = random_block_bytes(fmt, 1, cols, rng)[0]
    return packed


def to_qmatrix(packed: np.ndarray, fmt: str, cols: int) -> WT.QMatrix:
    if fmt == "F32":
        return WT.from_f32(packed)
    if fmt in ("F16", "BF16"):
        return WT.from_half_bits(packed, KIND[fmt])
    return WT.from_ggml_blocks(packed, fmt, cols)


def make_weight(fmt: str, rows: int, cols: int, rng, layers: int = 1):
    """(QMatrix stacking `layers` matrices, their float32 values (layers, rows, cols), the
    per-element block offsets (layers, rows, cols), see kernel_twins.offsets)."""
    packs = [packed_weight(fmt, rows, cols, rng) for _ in range(layers)]
    qm = WT.stack([to_qmatrix(p, fmt, cols) for p in packs])
    assert (qm.kind, qm.rows, qm.cols, qm.n) == (KIND[fmt], rows, cols, layers)
    dense = np.stack([tw.decode(p, fmt, cols) for p in packs])
    return qm, dense, np.stack([tw.offsets(p, fmt, cols) for p in packs])


# ----------------------------------------------------------------------------------------------
# running the kernels
# ----------------------------------------------------------------------------------------------

def positions(start: int, n: int) -> np.ndarray:
    """Positions (or cache slots) start..start+n-1 of one sequence, as the kernels take them."""
    return np.arange(start, start + n, dtype=np.int64)


def nans(*shape) -> np.ndarray:
    return np.full(shape, np.nan, np.float32)


def run_linear(x: np.ndarray, w: tuple, l: int, rows: int) -> np.ndarray:
    T, n = x.shape
    out = nans(T, rows)
    L.linear(out, x, w, l, nans(THREADS, L.scratch_size(n)))
    return out


def activations(T: int, n: int, rng) -> np.ndarray:
    """Random tokens (T, n); when there are three or more, token 1 is all zeros and token 2 large."""
    x = rng.standard_normal((T, n)).astype(np.float32)
    if T >= 3:
        x[1] = 0.0
        x[2] *= 1000.0
    return x


def assert_dot_close(got: np.ndarray, x: np.ndarray, w: np.ndarray, offset: np.ndarray,
                     tol: float):
    """got ~ x @ w.T, each output within tol * sum_i |x_i w_i|. That sum is floored at 1e-30:
    products in float32's subnormal range (subnormal weights) keep only a few bits."""
    want = tw.linear(x, w)
    scale = np.maximum(tw.linear_scale(x, w, offset), 1e-30)
    assert np.isfinite(got).all(), "non-finite output"
    assert_allclose(got / scale, want / scale, rtol=0, atol=tol)


# ----------------------------------------------------------------------------------------------
# kernels/linear.py
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,rows,cols", LINEAR_CASES)
def test_dequant_row(fmt, rows, cols):
    qm, dense, _ = make_weight(fmt, rows, cols, rng_for("row", fmt, rows, cols), layers=2)
    w = qm.args()
    for l in range(2):
        for r in range(rows):
            dst = nans(cols)
            L.dequant_row(dst, w, l, r)
            assert_array_equal(dst, dense[l, r], err_msg=f"layer {l} row {r}")


@pytest.mark.parametrize("fmt,rows,cols", LINEAR_CASES)
def test_dequant_matrix(fmt, rows, cols):
    qm, dense, _ = make_weight(fmt, rows, cols, rng_for("matrix", fmt, rows, cols), layers=3)
    for l in range(3):
        out = nans(rows, cols)
        L.dequant_matrix(out, qm.args(), l)
        assert_array_equal(out, dense[l], err_msg=f"layer {l}")


def test_f16_every_finite_value():
    """All 63488 finite half bit patterns (normals, subnormals, both zeros) decode bit-exactly."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    bits = bits[(bits & 0x7C00) != 0x7C00].reshape(62, 1024)  # drop inf / nan
    out = nans(*bits.shape)
    L.dequant_matrix(out, WT.from_half_bits(bits, L.F16).args(), 0)
    assert_array_equal(out.view(np.uint32), tw.f16_decode(bits).view(np.uint32))


def test_bf16_every_finite_value():
    """All 65280 finite bfloat16 bit patterns decode bit-exactly."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    bits = bits[(bits & 0x7F80) != 0x7F80].reshape(255, 256)  # drop inf / nan
    out = nans(*bits.shape)
    L.dequant_matrix(out, WT.from_half_bits(bits, L.BF16).args(), 0)
    assert_array_equal(out.view(np.uint32), tw.bf16_decode(bits).view(np.uint32))


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("fmt,rows,cols", LINEAR_CASES)
def test_linear(fmt, rows, cols, T):
    rng = rng_for("linear", fmt, rows, cols, T)
    qm, dense, offset = make_weight(fmt, rows, cols, rng)
    x = activations(T, cols, rng)
    out = run_linear(x, qm.args(), 0, rows)
    assert_dot_close(out, x, dense[0], offset[0], TOL[fmt])


@pytest.mark.parametrize("T", [1, 2, 7])
@pytest.mark.parametrize("fmt", tw.FORMATS)
def test_linear_picks_layer(fmt, T):
    rows, cols = 21, 64
    rng = rng_for("layers", fmt, T)
    qm, dense, offset = make_weight(fmt, rows, cols, rng, layers=3)
    x = activations(T, cols, rng)
    for l in range(3):
        out = run_linear(x, qm.args(), l, rows)
        assert_dot_close(out, x, dense[l], offset[l], TOL[fmt])


def test_linear_scratch_size_covers_both_paths():
    for n, T in [(32, 1), (576, 2), (33, 64), (64, 1000)]:
        # a 16-row panel, packed and unpacked, + the 6 x 16 edge block, or x regrouped + block sums
        # for each token of the packed-rows path
        need = max(2 * 16 * n + 6 * 16, L.ROWS_PATH_MAX_T * (n + n // L.QK))
        assert L.scratch_size(n) >= need


# ----------------------------------------------------------------------------------------------
# kernels/ops.py: elementwise
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T,n", [(1, 1), (1, 7), (4, 33), (2, 576)])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_rmsnorm(T, n, eps):
    rng = rng_for("rmsnorm", T, n, eps)
    x = rng.standard_normal((T, n)).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    edge_rows = [np.zeros(n), np.full(n, 1e-20), np.full(n, 3e4), np.eye(1, n).ravel()]
    x = np.concatenate([x, np.array(edge_rows, np.float32)])
    out = nans(*x.shape)
    ops.rmsnorm(out, x, w, eps)
    assert_allclose(out, tw.rmsnorm(x, w, eps), rtol=2e-6, atol=1e-6 * np.abs(w).max())
    assert_array_equal(out[T], 0.0)  # an all-zero token stays zero


def rope_tables(max_seq: int, hd: int, base: float = 10000.0):
    inv_freq = base ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(max_seq)[:, None] * inv_freq[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


@pytest.mark.parametrize("T,H,hd", [(1, 1, 2), (3, 4, 8), (5, 3, 64)])
@pytest.mark.parametrize("pos0", [0, 9])
def test_rope(T, H, hd, pos0):
    rng = rng_for("rope", T, H, hd, pos0)
    cos, sin = rope_tables(32, hd)
    x = rng.standard_normal((T, H, hd)).astype(np.float32)
    want = tw.rope(x, cos, sin, pos0)
    ops.rope(x, cos, sin, positions(pos0, T))  # in place
    assert_allclose(x, want, rtol=1e-6, atol=1e-6)


def test_rope_position_zero_is_identity():
    rng = rng_for("rope0")
    cos, sin = rope_tables(4, 16)
    x = rng.standard_normal((1, 2, 16)).astype(np.float32)
    before = x.copy()
    ops.rope(x, cos, sin, positions(0, 1))
    assert_array_equal(x, before)


SILU_EDGES = [0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, 20.0, -20.0, 88.0, -88.0, 89.0, -89.0,
              1000.0, -1000.0, 1e30, -1e30]


@pytest.mark.parametrize("T,n", [(1, 1), (3, 37), (2, 576)])
def test_swiglu(T, n):
    rng = rng_for("silu", T, n)
    gate = (rng.standard_normal((T, n)) * 4).astype(np.float32)
    up = rng.standard_normal((T, n)).astype(np.float32)
    flat = gate.reshape(-1)
    flat[:len(SILU_EDGES)] = SILU_EDGES[:flat.size]
    want = tw.silu_mul(gate, up)
    out = nans(T, n)
    ops.swiglu(out, np.ascontiguousarray(np.concatenate([gate, up], axis=1)))
    assert np.isfinite(out).all()
    assert_allclose(out, want, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("T,dq,dkv", [(1, 8, 4), (3, 64, 32), (2, 576, 192), ("parallel", 576, 192),
                                       ("parallel", 64, 32)])
def test_split_qkv(T, dq, dkv):
    rng = rng_for("split", T, dq)
    if T == "parallel":  # enough tokens for the prange twin
        T = parallel_tokens(dq + 2 * dkv)
    qkv = rng.standard_normal((T, dq + 2 * dkv)).astype(np.float32)
    b = rng.standard_normal(dq + 2 * dkv).astype(np.float32)
    q, k, v = nans(T, dq), nans(T, dkv), nans(T, dkv)
    ops.split_qkv(q, k, v, qkv, b)
    want = qkv + b
    assert_array_equal(q, want[:, :dq])
    assert_array_equal(k, want[:, dq:dq + dkv])
    assert_array_equal(v, want[:, dq + dkv:])


@pytest.mark.parametrize("T,n", [(1, 1), (3, 37), (2, 576)])
def test_add(T, n):
    rng = rng_for("add", T, n)
    x = rng.standard_normal((T, n)).astype(np.float32)
    y = rng.standard_normal((T, n)).astype(np.float32)
    want = x + y  # one float32 rounding, same as the kernel
    ops.add_(x, y)
    assert_array_equal(x, want)


@pytest.mark.parametrize("fmt", tw.FORMATS)
def test_embed(fmt):
    vocab, dim = 37, (96 if fmt in tw.BLOCK_FORMATS else 33)
    rng = rng_for("embed", fmt)
    qm, dense, _ = make_weight(fmt, vocab, dim, rng)
    for ids in ([0], [36], [0, 36, 5, 5, 17, 36]):
        ids = np.array(ids, np.int64)
        out = nans(len(ids), dim)
        ops.embed(out, ids, qm.args())
        assert_array_equal(out, tw.embed(ids, dense[0]))


# ----------------------------------------------------------------------------------------------
# kernels/ops.py: KV cache (attention: tests/test_attention.py)
# ----------------------------------------------------------------------------------------------

GARBAGE = np.float32(1e4)  # fills cache slots a kernel must not read: any read swamps the result


def garbage_caches(layers: int, kv: int, max_seq: int, hd: int):
    return np.full((layers, kv, max_seq, hd), GARBAGE), np.full((layers, kv, max_seq, hd), -GARBAGE)


@pytest.mark.parametrize("T,pos0", [(3, 5), (1, 0), (1, 15), (16, 0)])
def test_store_kv(T, pos0):
    Lyr, KV, S, hd, l = 3, 2, 16, 8, 1
    rng = rng_for("store", T, pos0)
    k_cache, v_cache = (c.astype(np.float32) for c in garbage_caches(Lyr, KV, S, hd))
    k = rng.standard_normal((T, KV, hd)).astype(np.float32)
    v = rng.standard_normal((T, KV, hd)).astype(np.float32)
    want_k, want_v = k_cache.copy(), v_cache.copy()
    want_k[l, :, pos0:pos0 + T] = k.transpose(1, 0, 2)
    want_v[l, :, pos0:pos0 + T] = v.transpose(1, 0, 2)
    ops.store_kv(k_cache, v_cache, k, v, l, positions(pos0, T))
    assert_array_equal(k_cache, want_k)
    assert_array_equal(v_cache, want_v)


# ----------------------------------------------------------------------------------------------
# kernels/ops.py: GPT-2's layer norm, gelu_new and bias (twins from tests/reference_gpt2.py)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T,n", [(1, 1), (3, 37), (2, 576)])
def test_layernorm(T, n):
    from reference_gpt2 import layer_norm
    rng = rng_for("layernorm", T, n)
    x = (rng.standard_normal((T, n)) * 3 + 5).astype(np.float32)  # an offset the mean must remove
    w = rng.standard_normal(n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    out = nans(T, n)
    ops.layernorm(out, x, w, b, 1e-5)
    want = layer_norm(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), 1e-5)
    assert_allclose(out, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("T,n", [(1, 1), (3, 37), (2, 576)])
def test_gelu_new(T, n):
    from reference_gpt2 import gelu_new
    rng = rng_for("gelu", T, n)
    x = (rng.standard_normal((T, n)) * 4).astype(np.float32)
    flat = x.reshape(-1)
    flat[:4] = np.array([0.0, -0.0, 30.0, -30.0], np.float32)[:flat.size]
    want = gelu_new(x.astype(np.float64))
    ops.gelu_new_(x)
    assert_allclose(x, want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("T,n", [(1, 1), (3, 37)])
def test_add_bias(T, n):
    rng = rng_for("bias", T, n)
    x = rng.standard_normal((T, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    want = x + b
    ops.add_bias_(x, b)
    assert_array_equal(x, want)


# ----------------------------------------------------------------------------------------------
# kernels/ops.py: the threaded token loops (prefill) and silu at extreme inputs
# ----------------------------------------------------------------------------------------------

def parallel_tokens(per_token: int, cost: int = 1) -> int:
    """An odd token count just above the size at which an op hands its loop to the prange twin."""
    return (ops.PARALLEL_MIN_ELEMS // (per_token * cost) + 2) | 1


@pytest.mark.parametrize("n", [576, 77])
def test_rmsnorm_parallel(n):
    T = parallel_tokens(n)
    rng = rng_for("rmsnorm-par", n)
    x = rng.standard_normal((T, n)).astype(np.float32)
    x[3] = 0.0
    x[T - 1] = 3e4
    w = rng.standard_normal(n).astype(np.float32)
    out = nans(T, n)
    ops.rmsnorm(out, x, w, 1e-5)
    assert_allclose(out, tw.rmsnorm(x, w, 1e-5), rtol=2e-6, atol=1e-6 * np.abs(w).max())
    assert_array_equal(out[3], 0.0)


@pytest.mark.parametrize("H,hd", [(9, 64), (3, 10)])
def test_rope_parallel(H, hd):
    T, pos0 = parallel_tokens(H * hd), 9
    rng = rng_for("rope-par", H, hd)
    cos, sin = rope_tables(pos0 + T, hd)
    x = rng.standard_normal((T, H, hd)).astype(np.float32)
    want = tw.rope(x, cos, sin, pos0)
    ops.rope(x, cos, sin, positions(pos0, T))
    assert_allclose(x, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [1536, 37])
def test_swiglu_parallel(n):
    T = parallel_tokens(n, ops.SILU_COST)
    rng = rng_for("silu-par", n)
    gate = (rng.standard_normal((T, n)) * 4).astype(np.float32)
    up = rng.standard_normal((T, n)).astype(np.float32)
    gate.reshape(-1)[:len(SILU_EDGES)] = SILU_EDGES
    out = nans(T, n)
    ops.swiglu(out, np.ascontiguousarray(np.concatenate([gate, up], axis=1)))
    assert np.isfinite(out).all()
    assert_allclose(out, tw.silu_mul(gate, up), rtol=2e-6, atol=1e-30)


def test_silu_extremes():
    # silu(x) = x / (1 + exp(-x)) through exp(-|x|): no overflow for large |x|, and a few ulps
    # everywhere the result is a normal float (below 1.5e-36, x < -87, it flushes to zero)
    grid = np.linspace(-110, 110, 200_001, dtype=np.float32)
    edges = np.array([100.0, -100.0, 1e30, -1e30, 88.7, -88.7, 87.0, -87.0, 1e-30, -1e-30, 0.0, -0.0,
                      1e-45, -1e-45, 3e38, -3e38], np.float32)
    gate = np.concatenate([grid, edges])
    T = 3
    gate = np.resize(gate, (T, -(-gate.size // T)))  # a few tokens, serial path
    for tokens in (gate, np.tile(gate, (5, 1))):     # and the threaded one
        up = np.ones_like(tokens)
        out = nans(*tokens.shape)
        ops.swiglu(out, np.ascontiguousarray(np.concatenate([tokens, up], axis=1)))
        want = tw.silu_mul(tokens, up)
        assert np.isfinite(out).all()
        assert_allclose(out, want, rtol=5e-7, atol=1.5e-36)
    at = dict(zip(tokens.ravel().tolist(), out.ravel().tolist()))
    for g in (100.0, 1e30, 3e38):
        g = float(np.float32(g))
        assert at[g] == g and at[-g] == 0.0


def test_add_parallel():
    n = 576
    T = parallel_tokens(n)
    rng = rng_for("add-par")
    x = rng.standard_normal((T, n)).astype(np.float32)
    y = rng.standard_normal((T, n)).astype(np.float32)
    want = x + y
    ops.add_(x, y)
    assert_array_equal(x, want)


def test_store_kv_parallel():
    Lyr, KV, hd, l = 2, 3, 64, 1
    T = parallel_tokens(2 * KV * hd)
    S = T + 9
    rng = rng_for("store-par")
    k_cache, v_cache = (c.astype(np.float32) for c in garbage_caches(Lyr, KV, S, hd))
    k = rng.standard_normal((T, KV, hd)).astype(np.float32)
    v = rng.standard_normal((T, KV, hd)).astype(np.float32)
    slots = rng.permutation(S)[:T].astype(np.int64)  # any slots, not only a run
    want_k, want_v = k_cache.copy(), v_cache.copy()
    want_k[l][:, slots] = k.transpose(1, 0, 2)
    want_v[l][:, slots] = v.transpose(1, 0, 2)
    ops.store_kv(k_cache, v_cache, k, v, l, slots)
    assert_array_equal(k_cache, want_k)
    assert_array_equal(v_cache, want_v)


@pytest.mark.parametrize("fmt", ["F32", "Q8_0", "Q4_1"])
def test_embed_parallel(fmt):
    vocab, dim = 37, 96
    rng = rng_for("embed-par", fmt)
    qm, dense, _ = make_weight(fmt, vocab, dim, rng)
    ids = rng.integers(0, vocab, ops.PARALLEL_MIN_T + 3).astype(np.int64)
    out = nans(len(ids), dim)
    ops.embed(out, ids, qm.args())
    assert_array_equal(out, tw.embed(ids, dense[0]))


@pytest.mark.parametrize("T,n", [(1, 37), (3, 576), (64, 1536)])  # serial and threaded token loops
def test_geglu(T, n):
    """gelu_tanh(gate) * up, with gelu_tanh as PyTorch's approximate="tanh" (float64 here), through
    the vectorizable sigmoid form; large |gate| neither overflows nor loses the linear tail."""
    rng = rng_for("geglu", T, n)
    gate = (rng.standard_normal((T, n)) * 4).astype(np.float32)
    gate.reshape(-1)[:len(SILU_EDGES)] = SILU_EDGES[:gate.size]
    up = rng.standard_normal((T, n)).astype(np.float32)
    g = gate.astype(np.float64)
    z = np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)
    # 0.5 (1 + tanh z) = 1 / (1 + exp(-2z)): float64's tanh rounds to -1 below z = -19, losing
    # the tail (1e-20 and less) that the sigmoid form keeps
    with np.errstate(over="ignore"):
        want = g / (1 + np.exp(-2 * z)) * up
    out = nans(T, n)
    ops.geglu(out, np.ascontiguousarray(np.concatenate([gate, up], axis=1)))
    assert np.isfinite(out).all()
    # z in float32 carries ~|z| ulps of absolute error into exp(-2z): 1e-5 relative in the far tail
    assert_allclose(out, want, rtol=1e-5, atol=1e-30)
