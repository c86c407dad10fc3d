"""fastinfer.weights.quantize: f32 -> Q8_0 / Q4_1 / BF16 and `convert` between storage formats.

Every result is decoded by the kernels (`tensors.to_f32` runs the Numba `dequant_matrix`), so the
checks hold for the layout the model actually reads. Bounds, with `tiny` a few float32 ulps of the
values involved:
* Q8_0: |x - d q| <= d / 2 + tiny; values already on a Q8_0 grid come back bit for bit;
* Q4_1 (refine=False, ggml's min/max grid): |x - (d q + m)| <= d / 2 + tiny;
* Q4_1 (refine=True): each block's squared error <= the min/max grid's, and q is the nearest grid
  step of the stored (d, m) (so elements inside [m - d/2, m + 15.5 d] are within d / 2);
* BF16: round to nearest even, relative error <= 2**-8.
"""
from __future__ import annotations

import numba
import numpy as np
import pytest
from numpy.testing import assert_array_equal

import reference as R
from fastinfer.kernels import linear as K
from fastinfer.weights import quantize as Q
from fastinfer.weights import tensors as WT

EPS = np.float32(np.finfo(np.float32).eps)


def decode(w: WT.QMatrix) -> np.ndarray:
    """(L, rows, cols) float32 through the kernel path."""
    out = WT.to_f32(w).f
    assert out.shape == (w.n, w.rows, w.cols)
    return out


def blocks(a: np.ndarray) -> np.ndarray:
    return a.reshape(*a.shape[:-1], -1, K.QK)


def realistic(rng, shape, outliers=0.002, scale=0.02) -> np.ndarray:
    """Gaussian weights with a few large outliers, a Laplacian part and some exact zeros."""
    g = rng.standard_normal(shape) * scale
    lap = rng.laplace(size=shape) * scale
    a = np.where(rng.random(shape) < 0.5, g, lap)
    mask = rng.random(shape) < outliers
    a[mask] *= rng.uniform(8, 30, mask.sum())
    a[rng.random(shape) < 0.01] = 0.0
    return a.astype(np.float32)


def unpack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 (..., cols // 2) -> (..., cols) values 0..15 in element order."""
    b = q.reshape(*q.shape[:-1], -1, K.QK // 2)
    return np.concatenate([b & 15, b >> 4], axis=-1).reshape(*q.shape[:-1], -1)


def check_layout(w: WT.QMatrix, kind: int, L: int, rows: int, cols: int) -> None:
    assert w.kind == kind and (w.n, w.rows, w.cols) == (L, rows, cols)
    nb = cols // K.QK
    if kind == K.Q8_0:
        assert w.q.dtype == np.uint8 and w.q.shape == (L, rows, cols)
        assert w.s.dtype == np.float32 and w.s.shape == (L, rows, nb)
        assert w.m is WT._NO_F32 and w.f is WT._NO_F32
    elif kind == K.Q4_1:
        assert w.q.dtype == np.uint8 and w.q.shape == (L, rows, cols // 2)
        assert w.s.dtype == np.float32 and w.s.shape == (L, rows, nb)
        assert w.m.dtype == np.float32 and w.m.shape == (L, rows, nb)
        assert w.f is WT._NO_F32
    elif kind == K.BF16:
        assert w.q.dtype == np.uint8 and w.q.shape == (L, rows, 2 * cols)
        assert w.s is WT._NO_F32 and w.m is WT._NO_F32 and w.f is WT._NO_F32
    for arr in (w.q, w.s, w.m, w.f):
        assert arr.flags.c_contiguous


def assert_q8_0_bound(x: np.ndarray, w: WT.QMatrix) -> None:
    x = x.reshape(w.n, w.rows, w.cols)
    err = np.abs(decode(w) - x)
    d = np.repeat(w.s, K.QK, axis=-1)
    tiny = 2 * EPS * np.abs(x) + np.float32(1e-44)
    assert (err <= d / 2 + tiny).all(), float((err - d / 2).max())
    q = w.q.view(np.int8)
    assert q.min() >= -127 and q.max() <= 127
    assert (w.s >= 0).all()


def q4_1_parts(w: WT.QMatrix):
    d = np.repeat(w.s, K.QK, axis=-1)
    m = np.repeat(w.m, K.QK, axis=-1)
    return unpack_nibbles(w.q).astype(np.float32), d, m


def q4_1_tiny(x, d, m):
    return 4 * EPS * (np.abs(x) + np.abs(m) + 15 * d) + np.float32(1e-44)


def block_sse(x: np.ndarray, w: WT.QMatrix) -> np.ndarray:
    e = (decode(w) - x.reshape(w.n, w.rows, w.cols)).astype(np.float64)
    return (blocks(e) ** 2).sum(-1)


def rms(e) -> float:
    return float(np.sqrt(np.mean(np.square(e, dtype=np.float64))))


# ----------------------------------------------------------------------------------------------
# Q8_0
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(37, 96), (3, 21, 64), (1, 1, 32)])
def test_q8_0_bound_and_layout(shape):
    x = realistic(np.random.default_rng(1), shape)
    w = Q.quantize_q8_0(x)
    L, rows, cols = (1, *shape) if len(shape) == 2 else shape
    check_layout(w, K.Q8_0, L, rows, cols)
    assert_q8_0_bound(x, w)
    # the largest magnitude of each block takes code +-127 and decodes to within an ulp
    amax = np.abs(blocks(x.reshape(L, rows, cols))).max(-1)
    assert_array_equal(np.abs(blocks(w.q.view(np.int8).astype(int))).max(-1), 127)
    np.testing.assert_allclose(np.abs(blocks(decode(w))).max(-1), amax, rtol=2 * EPS, atol=0)


def test_q8_0_hand_example():
    x = np.zeros((1, 96), np.float32)
    # block 0: d = 1; ties go to even (0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0, -2.5 -> -2)
    b0 = [127, -127, 0.5, 1.5, 2.5, -0.5, -2.5, 3.4, 3.6, -3.6, 126.6, -126.4]
    x[0, :len(b0)] = b0
    # block 1: on the grid of d = 0.25
    x[0, 32:64] = 0.25 * np.arange(-16, 16)
    x[0, 32] = -31.75  # -127 * 0.25
    # block 2: all zero (with a negative zero)
    x[0, 70] = -0.0
    w = Q.quantize_q8_0(x)
    assert_array_equal(w.s[0, 0], np.float32([1.0, 0.25, 0.0]))
    q = w.q[0, 0].view(np.int8)
    want0 = np.zeros(32, np.int8)
    want0[:len(b0)] = [127, -127, 0, 2, 2, 0, -2, 3, 4, -4, 127, -126]
    assert_array_equal(q[:32], want0)
    want1 = np.arange(-16, 16).astype(np.int8)
    want1[0] = -127
    assert_array_equal(q[32:64], want1)
    assert_array_equal(w.q[0, 0, 64:], 0)  # -0.0 stores as the int8 zero, not 0x80
    dec = decode(w)[0, 0]
    assert_array_equal(dec[32:64], x[0, 32:64])
    assert_array_equal(dec[64:], 0)


def test_q8_0_matches_ggml_reference_codes():
    """Where ggml's fp16 scale is exact (d a power of two), its q codes are ours: the rounding
    differs from ggml's (half away vs half even) only on exact ties, so avoid them."""
    rng = np.random.default_rng(2)
    d = np.float32(2.0) ** rng.integers(-8, 2, (6, 4))
    q = rng.integers(-126, 127, (6, 4, 32)).astype(np.float32)
    q[..., 5] = np.where(rng.random((6, 4)) < 0.5, 127, -127)
    x = (q + rng.uniform(-0.45, 0.45, q.shape).astype(np.float32)) * d[..., None]
    x[..., 5] = q[..., 5] * d
    x = x.reshape(6, 128).astype(np.float32)
    ref = R.dequantize(R.quantize(x, "Q8_0"), "Q8_0", 128)
    w = Q.quantize_q8_0(x)
    assert_array_equal(decode(w)[0], ref)
    ggml = WT.from_ggml_blocks(R.quantize(x, "Q8_0"), "Q8_0", 128)
    assert_array_equal(w.q, ggml.q)
    assert_array_equal(w.s, ggml.s)


def test_q8_0_on_grid_round_trips_exactly():
    rng = np.random.default_rng(3)
    L, rows, nb = 3, 300, 5
    q = rng.integers(-127, 128, (L, rows, nb, 32)).astype(np.int8)
    # one +-127 per block (so absmax / 127 recovers the scale), in a random place
    where = rng.integers(0, 32, (L, rows, nb))
    np.put_along_axis(q, where[..., None], np.where(rng.random((L, rows, nb)) < 0.5, 127, -127)
                      .astype(np.int8)[..., None], axis=-1)
    d = np.exp(rng.uniform(-14, 3, (L, rows, nb))).astype(np.float32)
    zero = rng.random((L, rows, nb)) < 0.05
    q[zero] = 0
    d[zero] = 0
    src = WT.QMatrix(K.Q8_0, q.view(np.uint8).reshape(L, rows, nb * 32), d, WT._NO_F32, WT._NO_F32,
                     rows, nb * 32)
    x = decode(src)
    w = Q.quantize_q8_0(x)
    assert_array_equal(w.q, src.q)
    assert_array_equal(w.s, src.s)
    assert_array_equal(decode(w), x)


def test_q8_0_zero_and_negative_zero_blocks():
    x = np.zeros((2, 64), np.float32)
    x[0, :32] = -0.0
    x[1, 32:] = -0.0
    x[1, 40] = 3.0
    x[1, 41] = -0.0
    w = Q.quantize_q8_0(x)
    assert_array_equal(w.s[0], [[0, 0], [0, np.float32(3) / np.float32(127)]])
    assert_array_equal(w.q[0, 0], 0)
    assert_array_equal(w.q[0, 1, :32], 0)
    dec = decode(w)[0]
    assert_array_equal(dec, x)  # == treats -0.0 as 0.0
    assert np.isfinite(dec).all()


# ----------------------------------------------------------------------------------------------
# Q4_1
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(37, 96), (3, 21, 64)])
def test_q4_1_plain_bound_and_layout(shape):
    x = realistic(np.random.default_rng(4), shape)
    w = Q.quantize_q4_1(x, refine=False)
    L, rows, cols = (1, *shape) if len(shape) == 2 else shape
    check_layout(w, K.Q4_1, L, rows, cols)
    x3 = x.reshape(L, rows, cols)
    q, d, m = q4_1_parts(w)
    err = np.abs(decode(w) - x3)
    assert (err <= d / 2 + q4_1_tiny(x3, d, m)).all()
    # ggml's grid: m is the block minimum, d the span / 15
    xb = blocks(x3)
    assert_array_equal(w.m, xb.min(-1))
    np.testing.assert_allclose(w.s, (xb.max(-1) - xb.min(-1)) / 15, rtol=2e-7)
    assert_array_equal(blocks(q).min(-1), 0)  # the minimum takes step 0


def test_q4_1_nibble_order_hand_example():
    # block 0: element j = j, element j + 16 = 15 - j  -> d = 1, m = 0; byte j = j | (15 - j) << 4
    # block 1: constant 2.5 -> d = 0, q = 0, m = 2.5
    x = np.zeros((1, 64), np.float32)
    x[0, :16] = np.arange(16)
    x[0, 16:32] = 15 - np.arange(16)
    x[0, 32:] = 2.5
    for refine in (False, True):
        w = Q.quantize_q4_1(x, refine=refine)
        assert_array_equal(w.s[0, 0], [1.0, 0.0])
        assert_array_equal(w.m[0, 0], [0.0, 2.5])
        j = np.arange(16, dtype=np.uint8)
        assert_array_equal(w.q[0, 0, :16], j | ((15 - j) << 4))
        assert_array_equal(w.q[0, 0, 16:], 0)
        assert_array_equal(decode(w)[0], x)


def test_q4_1_matches_ggml_reference_codes():
    """With fp16-exact d and min (d = 2**k, min a multiple of d), ggml's reference quantizer and
    our min/max grid produce the same codes, hence the same decoded values."""
    rng = np.random.default_rng(5)
    rows, nb = 8, 3
    d = np.float32(2.0) ** rng.integers(-6, 1, (rows, nb))
    mn = rng.integers(-40, 0, (rows, nb)) * d
    q = rng.integers(0, 16, (rows, nb, 32)).astype(np.float32)
    q[..., 0], q[..., 1] = 0, 15
    x = (q + rng.uniform(-0.45, 0.45, q.shape) * (q > 0) * (q < 15)) * d[..., None] + mn[..., None]
    x = x.reshape(rows, nb * 32).astype(np.float32)
    raw = R.quantize(x, "Q4_1")
    ref = WT.from_ggml_blocks(raw, "Q4_1", nb * 32)
    w = Q.quantize_q4_1(x, refine=False)
    assert_array_equal(w.q, ref.q)
    assert_array_equal(decode(w)[0], R.dequantize(raw, "Q4_1", nb * 32))


def test_q4_1_constant_and_negative_zero_blocks():
    x = np.zeros((3, 96), np.float32)
    x[0] = -0.0
    x[1, :32] = 7.25
    x[1, 32:64] = -1e-3
    x[2, :32] = 1.0
    x[2, 40] = -0.0
    x[2, 41] = 0.5
    for refine in (False, True):
        w = Q.quantize_q4_1(x, refine=refine)
        assert_array_equal(w.s[0, :2], 0)
        assert_array_equal(w.q[0, :2], 0)
        assert_array_equal(w.m[0, 1, :3], np.float32([7.25, -1e-3, 0.0]))
        dec = decode(w)[0]
        assert_array_equal(dec[:2], x[:2])
        assert_array_equal(dec[2, :32], 1.0)
        assert np.isfinite(dec).all()
        assert (np.abs(dec[2] - x[2]) <= 0.5 / 15 + 1e-6).all()


@pytest.mark.parametrize("seed", [6, 7])
def test_q4_1_refined_never_worse_and_nearest(seed):
    rng = np.random.default_rng(seed)
    x = realistic(rng, (3, 40, 192))
    plain = Q.quantize_q4_1(x, refine=False)
    w = Q.quantize_q4_1(x)
    check_layout(w, K.Q4_1, 3, 40, 192)
    sse, sse0 = block_sse(x, w), block_sse(x, plain)
    assert (sse <= sse0 * (1 + 1e-5) + 1e-30).all()
    # q is the nearest grid step of the stored (d, m): inside the grid's reach within d / 2,
    # outside it clipped to the end step
    q, d, m = q4_1_parts(w)
    err = np.abs(decode(w) - x)
    tiny = q4_1_tiny(x, d, m)
    inside = (x >= m - d / 2) & (x <= m + 15.5 * d)
    assert (err[inside] <= d[inside] / 2 + tiny[inside]).all()
    assert (q[(x < m - d / 2 - tiny)] == 0).all()
    assert (q[(x > m + 15.5 * d + tiny)] == 15).all()


def test_q4_1_refine_lowers_rms_error():
    """The refit is kept because it measurably helps: ~9% lower RMS on these distributions."""
    rng = np.random.default_rng(8)
    cases = {
        "gaussian": (rng.standard_normal((256, 576)) * 0.02).astype(np.float32),
        "laplacian": (rng.laplace(size=(256, 576)) * 0.02).astype(np.float32),
        "outliers": realistic(rng, (256, 576)),
    }
    for name, x in cases.items():
        e0 = rms(decode(Q.quantize_q4_1(x, refine=False))[0] - x)
        e1 = rms(decode(Q.quantize_q4_1(x))[0] - x)
        assert e1 < 0.95 * e0, (name, e0, e1)


# ----------------------------------------------------------------------------------------------
# BF16
# ----------------------------------------------------------------------------------------------

def test_bf16_round_to_nearest_even():
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0xBF808000, 0xBF818000,
                     0x00000000, 0x80000000, 0x7F7FFFFF, 0x3F800000], np.uint32)
    want = np.array([0x3F80, 0x3F82, 0x3F81, 0x3F80, 0xBF80, 0xBF82,
                     0x0000, 0x8000, 0x7F80, 0x3F80], np.uint16)
    x = bits.view(np.float32).reshape(1, -1)
    w = Q.to_bf16(x)
    check_layout(w, K.BF16, 1, 1, bits.size)
    assert_array_equal(w.q[0, 0].view(np.uint16), want)
    assert_array_equal(decode(w)[0, 0].view(np.uint32), want.astype(np.uint32) << 16)


@pytest.mark.parametrize("shape", [(5, 7), (3, 17, 33), (1, 1)])
def test_bf16_relative_error_and_stacks(shape):
    rng = np.random.default_rng(9)
    x = realistic(rng, shape)
    x.flat[0] = 1e30
    keep = x.copy()
    w = Q.to_bf16(x)
    assert_array_equal(x, keep)  # the input is left alone
    L, rows, cols = (1, *shape) if len(shape) == 2 else shape
    check_layout(w, K.BF16, L, rows, cols)
    dec = decode(w).reshape(x.shape)
    assert (np.abs(dec - x) <= np.abs(x) * 2.0 ** -8).all()
    # already-bfloat16 values are kept exactly
    assert_array_equal(decode(Q.to_bf16(dec)), decode(w))


# ----------------------------------------------------------------------------------------------
# shared behaviour
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [Q.quantize_q8_0, Q.quantize_q4_1, Q.to_bf16])
def test_chunking_does_not_change_results(fn, monkeypatch):
    x = realistic(np.random.default_rng(10), (2, 50, 128))
    whole = fn(x)
    monkeypatch.setattr(Q, "CHUNK_ELEMS", 3 * 128)  # 3 rows per chunk, a ragged last chunk
    parts = fn(x)
    for name in ("q", "s", "m", "f"):
        assert_array_equal(getattr(parts, name), getattr(whole, name))


@pytest.mark.parametrize("fn", [Q.quantize_q8_0, Q.quantize_q4_1, Q.to_bf16])
def test_other_input_dtypes_and_layouts(fn):
    x = realistic(np.random.default_rng(11), (16, 64))
    want = fn(x)
    for variant in (x.astype(np.float64), np.asfortranarray(x), x.astype(np.float16).astype(np.float32)):
        got = fn(variant)
        if variant.dtype == np.float64 or variant.flags.f_contiguous:
            assert_array_equal(got.q, want.q)
            assert_array_equal(got.s, want.s)
        assert got.q.flags.c_contiguous


def test_errors():
    with pytest.raises(ValueError, match=r"\(4, 40\)"):
        Q.quantize_q8_0(np.zeros((4, 40), np.float32))
    with pytest.raises(ValueError, match=r"\(2, 4, 48\)"):
        Q.quantize_q4_1(np.zeros((2, 4, 48), np.float32))
    with pytest.raises(ValueError, match="shape"):
        Q.quantize_q8_0(np.zeros(64, np.float32))
    bad = np.zeros((2, 64), np.float32)
    bad[1, 3] = np.nan
    for fn in (Q.quantize_q8_0, Q.quantize_q4_1):
        with pytest.raises(ValueError, match="inf or nan"):
            fn(bad)
    bad[1, 3] = np.inf
    with pytest.raises(ValueError, match="inf or nan"):
        Q.quantize_q4_1(bad)


# ----------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------

KINDS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]


def make_source(kind: str, x: np.ndarray) -> WT.QMatrix:
    """One matrix per layer of x (L, rows, cols), built the way the checkpoint readers build them."""
    layers = []
    for a in x:
        if kind == "F32":
            layers.append(WT.from_f32(a))
        elif kind == "F16":
            layers.append(WT.from_half_bits(a.astype(np.float16).view(np.uint16), K.F16))
        elif kind == "BF16":
            layers.append(WT.from_half_bits((a.view(np.uint32) >> 16).astype(np.uint16), K.BF16))
        else:
            layers.append(WT.from_ggml_blocks(R.quantize(a, kind), kind, a.shape[1]))
    w = WT.stack(layers)
    assert w.kind_name == kind
    return w


EXPECTED = {  # (source, dtype) -> result kind; "same" = the very same object
    "auto": {k: "same" for k in KINDS},
    "f32": {k: "F32" for k in KINDS},
    "bf16": {**{k: "BF16" for k in KINDS}, "BF16": "same"},
    "int8": {**{k: "Q8_0" for k in KINDS}, "Q8_0": "same"},
    "int4": {**{k: "Q4_1" for k in KINDS}, "Q4_0": "same", "Q4_1": "same"},
}


@pytest.mark.parametrize("dtype", list(EXPECTED))
@pytest.mark.parametrize("kind", KINDS)
def test_convert(kind, dtype):
    x = realistic(np.random.default_rng(12), (3, 24, 96))
    src = make_source(kind, x)
    srcf = decode(src)  # what the source holds
    got = Q.convert(src, dtype)
    want = EXPECTED[dtype][kind]
    if want == "same":
        assert got is src
        return
    assert got.kind_name == want and (got.n, got.rows, got.cols) == (3, 24, 96)
    check_layout(got, got.kind, 3, 24, 96)
    dec = decode(got)
    if want == "F32":
        assert_array_equal(dec, srcf)
    elif want == "BF16":
        assert (np.abs(dec - srcf) <= np.abs(srcf) * 2.0 ** -8).all()
    elif want == "Q8_0":
        assert_q8_0_bound(srcf, got)
        assert rms(dec - srcf) < 0.02 * rms(srcf)
    else:  # Q4_1 from a finer source: no block worse than ggml's grid on the decoded source
        assert (block_sse(srcf, got) <= block_sse(srcf, Q.quantize_q4_1(srcf, refine=False)) * (1 + 1e-5)
                + 1e-30).all()
        assert rms(dec - srcf) < 0.12 * rms(srcf)


def test_convert_int4_keeps_4bit_arrays():
    x = realistic(np.random.default_rng(13), (2, 8, 64))
    for kind in ("Q4_0", "Q4_1"):
        src = make_source(kind, x)
        got = Q.convert(src, "int4")
        assert got is src and got.q is src.q and got.s is src.s and got.m is src.m


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_convert_odd_width_warns_and_keeps(kind, dtype):
    x = realistic(np.random.default_rng(14), (1, 5, 40))
    src = make_source(kind, x)
    with pytest.warns(UserWarning, match=r"\(5, 40\)"):
        got = Q.convert(src, dtype)
    assert got is src


def test_convert_bad_dtype():
    w = WT.from_f32(np.zeros((2, 32), np.float32))
    with pytest.raises(ValueError, match="auto, f32, bf16, int8, int4"):
        Q.convert(w, "q4_k")


def test_converted_weights_run_in_linear():
    """The converted stacks are kernel-ready: `linear` on them matches x @ decoded.T."""
    rng = np.random.default_rng(15)
    x = realistic(rng, (2, 48, 64))
    inp = rng.standard_normal((3, 64)).astype(np.float32)
    scratch = np.full((numba.config.NUMBA_NUM_THREADS, K.scratch_size(64)), np.nan, np.float32)
    for dtype in ("bf16", "int8", "int4"):
        w = WT.stack([Q.convert(WT.from_f32(x[0]), dtype), Q.convert(WT.from_f32(x[1]), dtype)])
        dec = decode(w)
        for layer in range(2):
            for T in (1, 3):  # the packed-row path and the f32-tile path
                out = np.full((T, 48), np.nan, np.float32)
                K.linear(out, inp[:T], w.args(), layer, scratch)
                np.testing.assert_allclose(out, inp[:T] @ dec[layer].T, rtol=1e-4, atol=1e-5)
