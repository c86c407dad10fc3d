"""The int8-activation prefill matmul (kernels/qgemm.py) against a float64 NumPy twin of its
formula, on every weight kind, odd token counts, tail rows and stacked weights; against the f32
matmul of the dequantized weights (the error the activation quantization costs); and the register
block in every ISA tier's instructions that the CPU can run.

Twin and weights are built here from the format definitions (kernels/linear.py's docstring),
not from the kernel: Q4_0/Q4_1 byte j of block b holds element 32b+j (low nibble) and 32b+j+16
(high nibble); Q8_0 bytes are int8.
"""
import numba
import numpy as np
import pytest

from fastinfer.kernels import isa
from fastinfer.kernels import qgemm as Q

KINDS = {"Q8_0": 3, "Q4_0": 4, "Q4_1": 5}
EPS32 = np.finfo(np.float32).eps


def random_weight(kind: str, L: int, rows: int, n: int, rng) -> tuple:
    """Random bytes and random block scales (and minima for Q4_1) as a stacked weight tuple."""
    nb = n // 32
    empty = np.zeros((0, 0, 0), np.float32)
    q = rng.integers(0, 256, (L, rows, n if kind == "Q8_0" else n // 2), dtype=np.uint8)
    s = rng.uniform(1e-3, 2e-2, (L, rows, nb)).astype(np.float32)
    m = rng.uniform(-0.15, 0.05, (L, rows, nb)).astype(np.float32) if kind == "Q4_1" else empty
    return (KINDS[kind], q, s, m, empty)


def unpack(w: tuple, l: int):
    """-> (u int64 (rows, n) unsigned weights, d, mn float64 (rows, nb)) of matrix l."""
    kind, q, s, m, _ = w
    rows = q.shape[1]
    d = s[l].astype(np.float64)
    if kind == KINDS["Q8_0"]:
        return q[l].view(np.int8).astype(np.int64) + 128, d, -128.0 * d
    blocks = q[l].astype(np.int64).reshape(rows, -1, 16)
    u = np.concatenate([blocks & 15, blocks >> 4], axis=2).reshape(rows, -1)
    mn = m[l].astype(np.float64) if kind == KINDS["Q4_1"] else -8.0 * d
    return u, d, mn


def dequantize(w: tuple, l: int) -> np.ndarray:
    """The float64 matrix (rows, n) a weight stands for: d q (Q8_0), d (q - 8) (Q4_0), d q + m (Q4_1)."""
    kind, q, s, m, _ = w
    rows = q.shape[1]
    d = np.repeat(s[l].astype(np.float64), 32, axis=1)
    if kind == KINDS["Q8_0"]:
        return d * q[l].view(np.int8)
    blocks = q[l].astype(np.int64).reshape(rows, -1, 16)
    v = np.concatenate([blocks & 15, blocks >> 4], axis=2).reshape(rows, -1)
    return d * v + np.repeat(m[l].astype(np.float64), 32, axis=1) if kind == KINDS["Q4_1"] else d * (v - 8)


def quantize_activations(x: np.ndarray):
    """x f32 (T, n) -> xq int8 (T, n), xd, xs f32 (T, n // 32): d = max|block| / 127,
    q = round(x / d) (0 where d = 0), xs = d * sum(q)."""
    T, n = x.shape
    xb = x.reshape(T, n // 32, 32)
    xd = (np.abs(xb).max(axis=-1) / np.float32(127)).astype(np.float32)
    safe = np.where(xd > 0, xd, 1).astype(np.float32)
    xq = np.where(xd[..., None] > 0, np.round(xb / safe[..., None]), 0).astype(np.int8)
    xs = (xd * xq.astype(np.float32).sum(axis=-1)).astype(np.float32)
    return xq.reshape(T, n), xd, xs


def twin(xq, xd, xs, w, l):
    """out[t, r] = sum_b d[r,b] xd[t,b] sum_j u[r,32b+j] xq[t,32b+j] + sum_b mn[r,b] xs[t,b],
    integer sums exact, the rest in float64. Also returns the yardstick of float32 rounding:
    the same sum with every term's magnitude."""
    u, d, mn = unpack(w, l)
    T, n = xq.shape
    rows, nb = d.shape
    isum = np.einsum("rbj,tbj->trb", u.reshape(rows, nb, 32), xq.astype(np.int64).reshape(T, nb, 32))
    term1 = isum * d[None] * xd.astype(np.float64)[:, None, :]
    term2 = mn[None] * xs.astype(np.float64)[:, None, :]
    return (term1 + term2).sum(-1), (np.abs(term1) + np.abs(term2)).sum(-1)


def run(xq, xd, xs, w, l):
    T, n = xq.shape
    out = np.full((T, w[1].shape[1]), np.nan, np.float32)  # every element must be written
    scratch = np.zeros((numba.config.NUMBA_NUM_THREADS, Q.scratch_size(n)), np.float32)
    Q.linear_a8_tiles(out, xq, xd, xs, w, l, 0, scratch)
    return out


def check_against_twin(out, want, scale, nb):
    # Per block: d*xd, the fma with the converted int sum and the mn*xs fma round once each; the
    # nb-term accumulation adds one rounding per step, each bounded by the running magnitude.
    err = np.abs(out.astype(np.float64) - want)
    bound = (nb + 3) * EPS32 * scale + 1e-30
    assert np.all(err <= bound), f"max err/bound {np.max(err / bound):.3g}"
    np.testing.assert_allclose(out, want, rtol=0, atol=float(((nb + 3) * EPS32 * scale).max()))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("T", [1, 5, 7, 37])
@pytest.mark.parametrize("rows,n", [(50, 32), (50, 96), (70, 576), (32, 96)])
def test_matches_twin(kind, T, rows, n):
    rng = np.random.default_rng(T * 1000 + rows + n + KINDS[kind])
    w = random_weight(kind, 3, rows, n, rng)
    x = rng.standard_normal((T, n)).astype(np.float32) * rng.uniform(0.1, 10, (T, 1)).astype(np.float32)
    x[0, :32] = 0.0  # a block of zeros: d = 0, q = 0
    xq, xd, xs = quantize_activations(x)
    for l in (0, 2):
        want, scale = twin(xq, xd, xs, w, l)
        check_against_twin(run(xq, xd, xs, w, l), want, scale, n // 32)


@pytest.mark.parametrize("T", [2, 3, 4, 6, 12])
def test_every_token_block_size(T):
    rng = np.random.default_rng(T)
    w = random_weight("Q4_1", 1, 96, 128, rng)
    xq, xd, xs = quantize_activations(rng.standard_normal((T, 128)).astype(np.float32))
    want, scale = twin(xq, xd, xs, w, 0)
    check_against_twin(run(xq, xd, xs, w, 0), want, scale, 4)


def test_extreme_bytes():
    """Every weight byte 255 against activations of +-127: the largest int32 block sums."""
    rng = np.random.default_rng(1)
    for kind in KINDS:
        w = random_weight(kind, 1, 40, 64, rng)
        w[1][:] = 255 if kind != "Q8_0" else 127  # Q8_0 byte 127: u = 255
        xq = np.where(rng.random((9, 64)) < 0.5, 127, -127).astype(np.int8)
        xq[3] = 127
        xd = rng.uniform(0.01, 1, (9, 2)).astype(np.float32)
        xs = (xd * xq.astype(np.float32).reshape(9, 2, 32).sum(-1)).astype(np.float32)
        want, scale = twin(xq, xd, xs, w, 0)
        check_against_twin(run(xq, xd, xs, w, 0), want, scale, 2)


@pytest.mark.parametrize("kind", list(KINDS))
def test_approximates_f32_matmul(kind):
    """Against x @ dequant(W).T in float64: only the activation quantization differs. Rounding to
    the nearest of 255 levels per 32-block errs by at most max|block| / 254 per element; for
    Gaussian activations that is a relative error of the output around 0.5%."""
    rng = np.random.default_rng(7)
    T, rows, n = 37, 50, 576
    w = random_weight(kind, 2, rows, n, rng)
    x = rng.standard_normal((T, n)).astype(np.float32)
    ref = x.astype(np.float64) @ dequantize(w, 1).T
    out = run(*quantize_activations(x), w, 1)
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel < 1.5e-2, rel
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("tier", isa.TIERS, ids=isa.TIER_NAMES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_register_block_every_tier(tier, kind):
    """The register block alone in each ISA tier's instructions (vpdpbusd 512 / 256, vpmaddubsw
    with Q8_0 panels signed, plain IR), where this CPU can run them; on a panel packed by
    pack_panel with 19 of 32 rows (11 of 16 on 256-bit tiers), 3 tokens from the third on, 3 blocks, written
    into the middle of a larger output."""
    lacks = isa.missing(tier)
    if lacks:
        pytest.skip(f"{tier.name}: the CPU lacks {', '.join(lacks)}")
    NR = 2 * tier.float_lanes
    mr, T, n, nr = 3, 6, 96, NR - 13 if NR == 32 else NR - 5
    block = Q.make_micro(mr, tier)
    signed = int(tier.signed_q8 and kind == "Q8_0")

    @numba.njit(cache=False)  # compiled here with the tier's IR
    def call(out, xq, xd, xs, panel, sc, nb):
        block(out, 1, 4, xq, xd, xs, 2, panel, 0, sc, 0, nb, signed)

    rng = np.random.default_rng(3)
    w = random_weight(kind, 1, nr, n, rng)
    w[1][0, 0, :4] = [0x80, 0x7F, 0x80, 0x81]  # extreme Q8_0 bytes (-128, 127, ...)
    raw = np.zeros(NR * n + Q.ALIGN, np.uint8)
    start = -raw.ctypes.data % Q.ALIGN
    panel = raw[start:start + NR * n]  # the block loads the panel with aligned vector loads
    sc = np.zeros(n // 32 * 2 * NR, np.float32)
    Q.pack_panel(panel, sc, w, 0, 0, nr, NR, tier.signed_q8)
    xq, xd, xs = quantize_activations(rng.standard_normal((T, n)).astype(np.float32))
    xq[2, :4] = [-127, -127, 127, -127]
    xd[2], xs[2] = xd[2], (xd[2] * xq[2].reshape(-1, 32).astype(np.float32).sum(axis=1)).astype(np.float32)
    out = np.full((5, 40), 7.0, np.float32)
    call(out, xq, xd, xs, panel, sc, n // 32)
    want, scale = twin(xq[2:2 + mr], xd[2:2 + mr], xs[2:2 + mr], w, 0)
    expect = np.full((5, 40), 7.0)
    expect[1:1 + mr, 4:4 + NR] = 0.0  # the panel's padding rows give 0
    expect[1:1 + mr, 4:4 + nr] = want
    yard = np.zeros((5, 40))
    yard[1:1 + mr, 4:4 + nr] = scale
    check_against_twin(out, expect, yard, n // 32)


def test_scratch_size_covers_alignment():
    # panel (NR n bytes) + scales (2 NR nb floats) + edge tile (MR NR) + up to ALIGN bytes skipped
    n = 576
    assert Q.scratch_size(n) * 4 >= Q.NR * n + 2 * Q.NR * (n // 32) * 4 + Q.MR * Q.NR * 4 + Q.ALIGN - 4


@pytest.mark.parametrize("tier", isa.TIERS, ids=isa.TIER_NAMES)
def test_register_block_at_the_extremes(tier):
    """The largest block sums each tier must hold: nibbles all 15 (and Q8_0 bytes all -128 or 127)
    against activations all +-127. On the vpmaddubsw tiers a block's nibble pair sums add up in
    int16 to 16 x 15 x 127 = 30480 per lane before widening: no saturation allowed."""
    lacks = isa.missing(tier)
    if lacks:
        pytest.skip(f"{tier.name}: the CPU lacks {', '.join(lacks)}")
    NR, n, mr = 2 * tier.float_lanes, 64, 2
    block = Q.make_micro(mr, tier)
    for kind, byte in (("Q4_0", 0xFF), ("Q4_1", 0xFF), ("Q8_0", 0x80), ("Q8_0", 0x7F)):
        signed = int(tier.signed_q8 and kind == "Q8_0")

        @numba.njit(cache=False)
        def call(out, xq, xd, xs, panel, sc, nb):
            block(out, 0, 0, xq, xd, xs, 0, panel, 0, sc, 0, nb, signed)

        w = random_weight(kind, 1, NR, n, np.random.default_rng(0))
        w[1][:] = byte
        raw = np.zeros(NR * n + Q.ALIGN, np.uint8)
        start = -raw.ctypes.data % Q.ALIGN
        panel = raw[start:start + NR * n]
        sc = np.zeros(n // 32 * 2 * NR, np.float32)
        Q.pack_panel(panel, sc, w, 0, 0, NR, NR, tier.signed_q8)
        xq = np.full((mr, n), 127, np.int8)
        xq[1] = -127
        xd = np.full((mr, n // 32), 0.01, np.float32)
        xs = (xd * xq.reshape(mr, -1, 32).astype(np.float32).sum(axis=2)).astype(np.float32)
        out = np.zeros((mr, NR), np.float32)
        call(out, xq, xd, xs, panel, sc, n // 32)
        want, scale = twin(xq, xd, xs, w, 0)
        check_against_twin(out, want, scale, n // 32)
