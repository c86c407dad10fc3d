"""ggml's 5-bit and K-quant types held natively (weights/kquants.py; kernel kinds Q4_1, Q5, Q6).

References are independent of the repacking: the `gguf` package's dequantizers give the values a
block stands for, and every matmul is checked against float64 NumPy over those values (with the
activations' 8-bit quantization written out here from its definition for the integer paths). The
row loops and register blocks run in every ISA tier's instructions this CPU can execute.
"""
import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from fastinfer.kernels import isa
from fastinfer.kernels import linear as L
from fastinfer.kernels import qgemm as QG
from fastinfer.weights.kquants import BLOCKS, TARGET
from test_qmatvec import runnable, tier_rows  # skip a tier the CPU lacks; the decode row loop in a tier's instructions
from fastinfer.weights.tensors import QMatrix, check_matrix, from_kquant_blocks, stack_joined, to_f32, to_q6

TYPES = list(BLOCKS)
# where each type's f16 super-scales sit in its block (byte offsets): random bytes there could be
# inf or NaN, so the tests write sane values
_SCALES = {"Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q3_K": (108,),
           "Q2_K": (80, 82)}


def random_blocks(kind: str, rows: int, cols: int, rng) -> np.ndarray:
    """uint8 (rows, row_bytes): random ggml blocks of type kind with finite super-scales."""
    per, nbytes, _ = BLOCKS[kind]
    blk = rng.integers(0, 256, (rows, cols // per, nbytes), dtype=np.uint8)
    for off in _SCALES[kind]:
        val = rng.uniform(2e-3, 2e-2, blk.shape[:2]).astype(np.float16)
        if kind == "Q5_1" and off == 2:
            val = (-val * 8).astype(np.float16)  # a block minimum
        blk[:, :, off:off + 2] = val.view(np.uint8).reshape(*blk.shape[:2], 2)
    return blk.reshape(rows, -1)


def reference(raw: np.ndarray, kind: str, cols: int) -> np.ndarray:
    """float64 (rows, cols): the gguf package's dequantization."""
    return quants.dequantize(raw, GGMLQuantizationType[kind]).reshape(raw.shape[0], cols).astype(np.float64)


def weight(kind: str, rows: int, cols: int, seed) -> tuple[QMatrix, np.ndarray]:
    raw = random_blocks(kind, rows, cols, np.random.default_rng(seed))
    return from_kquant_blocks(raw, kind, cols), reference(raw, kind, cols)


def quantize_x(x: np.ndarray):
    """8-bit activations from their definition: per 32-block d = max|x| / 127, q = round(x / d)."""
    T, n = x.shape
    xb = x.reshape(T, n // 32, 32)
    xd = (np.abs(xb).max(axis=-1) / np.float32(127)).astype(np.float32)
    xq = np.round(xb / np.where(xd > 0, xd, 1)[..., None]).astype(np.int8)
    xs = (xd * xq.astype(np.float32).sum(-1)).astype(np.float32)
    xs16 = (np.repeat(xd, 2, axis=1) * xq.reshape(T, n // 16, 16).astype(np.float32).sum(-1)).astype(np.float32)
    return xq.reshape(T, n), xd, xs, xs16


def dequantized_x(xq, xd):
    T, n = xq.shape
    return (xq.reshape(T, n // 32, 32).astype(np.float64) * xd[..., None].astype(np.float64)).reshape(T, n)


def check(out, want, yard, n):
    """out within float32 rounding of want: a few ulps of the terms' magnitudes per group."""
    err = np.abs(out.astype(np.float64) - want)
    assert (err <= 4 * np.finfo(np.float32).eps * (yard + np.abs(want)) * np.sqrt(n) + 1e-30).all(), err.max()


@pytest.mark.parametrize("kind", TYPES)
def test_held_exactly(kind):
    """Repacked into the kernels' kinds, every value is the gguf package's, to float32 rounding."""
    w, ref = weight(kind, 7, 512, [1, TYPES.index(kind)])
    assert w.kind == TARGET[kind]
    check_matrix(w, kind, (1, 7, 512), "test")
    got = to_f32(w).f[0].astype(np.float64)
    np.testing.assert_allclose(got, ref, rtol=2e-7, atol=1e-9)


@pytest.mark.parametrize("kind", TYPES)
def test_memory_stays_in_blocks(kind):
    """No widening: at most 10 bits a weight (Q6 with f32 scales), far below f32's 32."""
    w, _ = weight(kind, 4, 1024, 2)
    assert w.nbytes * 8 / (4 * 1024) <= 10.0
    assert w.f.size == 0


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("T", [1, 3, 9, 20])
def test_f32_activations(kind, T):
    """`linear` (rows path for decoding, tiles for prefill) equals x @ W.T."""
    w, ref = weight(kind, 37, 768, [3, T])
    x = np.random.default_rng(T).standard_normal((T, 768)).astype(np.float32)
    out = np.zeros((T, 37), np.float32)
    scratch = np.zeros((numba.get_num_threads(), L.scratch_size(768)), np.float32)
    L.linear(out, x, w.args(), 0, scratch)
    want = x.astype(np.float64) @ ref.T
    check(out, want, np.abs(x.astype(np.float64)) @ np.abs(ref).T, 768)


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("T", [1, 2, 5, 8, 20])
def test_int8_activations(kind, T):
    """`linear_act` with activation buffers: the dequantized 8-bit activations times W, to float32
    rounding (integer sums exact); decoding on the row loop, prefill on the register block."""
    n, rows = 512, 45
    w, ref = weight(kind, rows, n, [4, T])
    x = np.random.default_rng([T, 9]).standard_normal((T, n)).astype(np.float32)
    lin = (np.zeros((numba.get_num_threads(), L.scratch_size(n)), np.float32), *L.act_buffers(32, n, rows, True))
    out = np.zeros((T, rows), np.float32)
    L.linear_act(out, x, w.args(), 0, lin, 0, True)
    xq, xd, _, _ = quantize_x(x)
    xf = dequantized_x(xq, xd)
    check(out, xf @ ref.T, np.abs(xf) @ np.abs(ref).T, n)


@pytest.mark.parametrize("tier", isa.TIERS, ids=isa.TIER_NAMES)
@pytest.mark.parametrize("kind", ["Q5_0", "Q5_K", "Q6_K", "Q3_K"])
def test_decode_row_loop_every_tier(tier, kind):
    """Q5 and Q6 decode rows in each tier's instructions, T = 1, 3 (two rows at once, one) and 6
    (token-major), 21 rows (an odd last row), values at their extremes in the first row."""
    rows_fn = tier_rows(runnable(tier))
    n = 256
    w, _ = weight(kind, 21, n, [5, isa.TIERS.index(tier)])
    w.q[0, 0, :] = 0xFF  # every bit set: u = 31 or 63
    ref = to_f32(w).f[0].astype(np.float64)
    rng = np.random.default_rng(6)
    for T in (1, 3, 6):
        x = rng.standard_normal((T, n)).astype(np.float32)
        x[0, ::2] = 50.0  # activations at +127 and -127 in places
        x[0, 1::2] = -50.0
        xq, xd, xs, xs16 = quantize_x(x)
        out = np.zeros((T, 21), np.float32)
        rows_fn(out, xq, xd, xs16 if w.kind == L.Q6 else xs, w.args(), 0)
        xf = dequantized_x(xq, xd)
        check(out, xf @ ref.T, np.abs(xf) @ np.abs(ref).T, n)


@pytest.mark.parametrize("tier", isa.TIERS, ids=isa.TIER_NAMES)
@pytest.mark.parametrize("kind", ["Q5_0", "Q6_K"])
def test_register_block_every_tier(tier, kind):
    """The prefill register block on Q5 (mode 2) and Q6 (mode 3: scale groups of 16, the
    activations' sums per 16) panels in each tier's instructions, with the first rows' values all
    at their largest (31, 63) against activations of +-127: where the vpmaddubsw tiers add pair
    sums up in int16 before widening, 5-bit values may do so for 4 k-quads and 6-bit ones for 2."""
    runnable(tier)
    NR, n, mr = 2 * tier.float_lanes, 256, 3
    block = QG.make_micro(mr, tier)
    mode = 2 if kind == "Q5_0" else 3

    @numba.njit(cache=False)
    def call(out, xq, xd, xs, panel, sc, nb):
        block(out, 0, 0, xq, xd, xs, 0, panel, 0, sc, 0, nb, mode)

    w, _ = weight(kind, NR, n, [8, mode])
    w.q[0, :3] = 0xFF
    ref = to_f32(w).f[0].astype(np.float64)
    raw = np.zeros(NR * n + QG.ALIGN, np.uint8)
    start = -raw.ctypes.data % QG.ALIGN
    panel = raw[start:start + NR * n]
    sc = np.zeros(n // 16 * 2 * NR, np.float32)
    QG.pack_panel(panel, sc[:n // (16 if mode == 3 else 32) * 2 * NR], w.args(), 0, 0, NR, NR, tier.signed_q8)
    x = np.random.default_rng(9).standard_normal((mr, n)).astype(np.float32)
    x[0] = 3.0
    x[1] = -3.0
    xq, xd, xs, xs16 = quantize_x(x)
    out = np.zeros((mr, NR), np.float32)
    call(out, xq, xd, xs16 if mode == 3 else xs, panel, sc, n // 32)
    xf = dequantized_x(xq, xd)
    check(out, xf @ ref.T, np.abs(xf) @ np.abs(ref).T, n)


def test_mixed_layers_stack_as_q6():
    """A role whose layers come in different 4- to 6-bit types (Q4_K here, Q6_K there, as Q4_K_M
    mixes do) stacks as Q6 with every value kept, not widened to f32."""
    a, ra = weight("Q4_K", 16, 256, 10)
    b, rb = weight("Q6_K", 16, 256, 11)
    c, rc = weight("Q5_0", 16, 256, 12)
    s = stack_joined([[a], [b], [c]])
    assert s.kind == L.Q6 and s.f.size == 0
    got = to_f32(s).f.astype(np.float64)
    for layer, ref in enumerate((ra, rb, rc)):
        np.testing.assert_allclose(got[layer], ref, rtol=2e-7, atol=1e-9)
    assert to_q6(s) is s


def test_q6_of_q4_0_keeps_values():
    raw = random_blocks("Q5_0", 4, 128, np.random.default_rng(13))
    w = from_kquant_blocks(raw, "Q5_0", 128)
    np.testing.assert_allclose(to_f32(to_q6(w)).f, to_f32(w).f, rtol=2e-7, atol=1e-9)


def test_q8_0_beside_q5_0_stacks_as_q8_0():
    """attn_v in Q4_K_M files: Q8_0 in some layers, Q5_0 in others. Q5_0's values u - 16 fit a
    signed byte under the same scale, so the stack is Q8_0 with every value kept."""
    from gguf import GGMLQuantizationType, quants
    from fastinfer.weights.tensors import from_ggml_blocks
    rng = np.random.default_rng(14)
    a = rng.standard_normal((8, 256)).astype(np.float32)
    raw8 = quants.quantize(a, GGMLQuantizationType.Q8_0)
    w8 = from_ggml_blocks(raw8, "Q8_0", 256)
    w5, r5 = weight("Q5_0", 8, 256, 15)
    s = stack_joined([[w8], [w5]])
    assert s.kind == L.Q8_0
    got = to_f32(s).f.astype(np.float64)
    np.testing.assert_allclose(got[0], quants.dequantize(raw8, GGMLQuantizationType.Q8_0).reshape(8, 256), rtol=1e-7)
    np.testing.assert_allclose(got[1], r5, rtol=2e-7, atol=1e-9)
    w51, _ = weight("Q5_1", 8, 256, 16)  # an offset of its own: no exact Q8_0, so f32
    assert stack_joined([[w8], [w51]]).kind == L.F32
