"""The decode matvec over 16-row tiles (kernels/qtile.py): against the NumPy twin of the
8-bit-activation formula (tests/test_qmatvec.py) on Q8_0, Q4_0 and Q4_1, every token count 1..8,
partial last tiles, task splits, row offsets and every ISA tier; each token's result bit for bit
the same whatever else shares the call; and the other readers of a tiled weight (the embedding's
row lookup, the prefill GEMM's panels) giving exactly what the untiled weight gives."""
import numba
import numpy as np
import pytest
from test_qmatvec import quantize_x, random_weight, runnable, twin

from fastinfer.kernels import isa
from fastinfer.kernels import linear as L
from fastinfer.kernels import qgemm as QG
from fastinfer.kernels import qtile as QT
from fastinfer.kernels.formats import Q4_0, Q4_1, Q8_0, TILED

KINDS = [Q8_0, Q4_0, Q4_1]


def tile(w, signed_q8=None):
    kind, q, s, m, f = w
    return (TILED[kind],) + QT.repack(kind, q, s, m, signed_q8) + (f,)


def check(out, xq, xd, xs, w, l):
    # Integer block sums are exact; per block a row adds two rounded products (s xd rounded too)
    # in sequence: below (2 n/32 + 4) f32 ulps of the sum of the magnitudes.
    want, mag = twin(xq, xd, xs, w, l)
    err = np.abs(out - want)
    bound = 2.0 ** -24 * (2 * xq.shape[1] // 32 + 4) * mag
    assert (err <= bound).all(), (err / bound).max()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n", [32, 96, 576, 1536])
@pytest.mark.parametrize("tasks", [1, 3])
def test_matches_twin(kind, T, n, tasks):
    rng = np.random.default_rng([kind, T, n, tasks])
    rows, layers, l = 37, 3, 2  # 37 rows: two whole tiles and a partial one
    w = random_weight(kind, layers, rows, n, rng)
    x = rng.standard_normal((T, n)).astype(np.float32)
    x[0, :32] = 0  # an all-zero block: xd = 0
    xq, xd, xs = quantize_x(x)
    out = np.full((T, rows), np.nan, np.float32)
    QT.linear_a8_tiled(out, xq, xd, xs, tile(w), l, 0, tasks)
    check(out, xq, xd, xs, w, l)


@pytest.mark.parametrize("kind", KINDS)
def test_a_token_does_not_depend_on_the_others(kind):
    # Any 1..8 of eight tokens, in any order: each token's outputs are bit for bit those of the
    # token alone (what lets a prompt-lookup check of 8 tokens equal 8 decode steps).
    rng = np.random.default_rng([kind, 5])
    n, rows = 160, 41
    wt = tile(random_weight(kind, 1, rows, n, rng))
    xq, xd, xs = quantize_x(rng.standard_normal((QT.MAX_T, n)).astype(np.float32))
    alone = np.zeros((QT.MAX_T, rows), np.float32)
    for t in range(QT.MAX_T):
        QT.linear_a8_tiled(alone[t:t + 1], xq[t:t + 1], xd[t:t + 1], xs[t:t + 1], wt, 0, 0, 2)
    for T in range(1, QT.MAX_T + 1):
        pick = rng.permutation(QT.MAX_T)[:T]
        out = np.zeros((T, rows), np.float32)
        QT.linear_a8_tiled(out, xq[pick], xd[pick], xs[pick], wt, 0, 0, 2)
        np.testing.assert_array_equal(out, alone[pick])


@pytest.mark.parametrize("base", [11, 16])
@pytest.mark.parametrize("T", [1, 8])
def test_row_offset(base, T):
    # base selects the weight rows base..base + out.shape[1] (the K and V rows' residual pass),
    # also from inside a tile
    rng = np.random.default_rng([T, base])
    n, rows = 96, 45
    wt = tile(random_weight(Q4_1, 2, rows, n, rng))
    xq, xd, xs = quantize_x(rng.standard_normal((T, n)).astype(np.float32))
    whole = np.zeros((T, rows), np.float32)
    QT.linear_a8_tiled(whole, xq, xd, xs, wt, 1, 0, 2)
    part = np.full((T, rows - base), np.nan, np.float32)
    QT.linear_a8_tiled(part, xq, xd, xs, wt, 1, base, 2)
    np.testing.assert_array_equal(part, whole[:, base:])
    with pytest.raises(ValueError, match="does not match"):
        QT.linear_a8_tiled(np.zeros((T, rows), np.float32), xq, xd, xs, wt, 1, 48, 2)


def test_bad_calls_are_value_errors():
    rng = np.random.default_rng(1)
    w = random_weight(Q4_1, 1, 16, 64, rng)
    wt = tile(w)
    xq, xd, xs = quantize_x(rng.standard_normal((9, 64)).astype(np.float32))
    with pytest.raises(ValueError, match="1..8 tokens"):
        QT.linear_a8_tiled(np.zeros((9, 16), np.float32), xq, xd, xs, wt, 0, 0, 1)
    with pytest.raises(ValueError, match="tiled"):
        QT.linear_a8_tiled(np.zeros((1, 16), np.float32), xq[:1], xd[:1], xs[:1], w, 0, 0, 1)
    with pytest.raises(ValueError, match="no tiled layout"):
        QT.repack(L.Q6, w[1], w[2], w[3])


_TIER_TILES = {}


def tier_tiles(tier):
    """The tile loop in another ISA tier's instructions, compiled here (not cached)."""
    if tier.name not in _TIER_TILES:
        block = QT.make_tiles(tier)

        step = QT.chunk(tier)

        @numba.njit(cache=False)
        def call(out, xq, xd, xs, w, l):
            kind, q, s, m, f = w
            for c in range(0, xq.shape[0], step):
                e = min(xq.shape[0], c + step)
                block(out[c:e], xq[c:e], xd[c:e], xs[c:e], q, s, m, l, 0, (out.shape[1] + 15) // 16, 0, kind)
        _TIER_TILES[tier.name] = call
    return _TIER_TILES[tier.name]


@pytest.mark.parametrize("tier", isa.TIERS, ids=isa.TIER_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_tier(tier, kind):
    # Each tier's dot product (vpdpbusd 512 / 256, vpmaddubsw + vpmaddwd with Q8_0 signed, plain
    # IR), T = 1, 3, 8, on 21 rows (a partial tile) and 3 blocks; tokens still independent.
    call = tier_tiles(runnable(tier))
    rng = np.random.default_rng([kind, 7])
    n, rows = 96, 21
    w = random_weight(kind, 2, rows, n, rng)
    wt = tile(w, tier.signed_q8)
    xq, xd, xs = quantize_x(rng.standard_normal((8, n)).astype(np.float32))
    alone = np.zeros((8, rows), np.float32)
    for t in range(8):
        call(alone[t:t + 1], xq[t:t + 1], xd[t:t + 1], xs[t:t + 1], wt, 1)
    for T in (1, 3, 8):
        out = np.zeros((T, rows), np.float32)
        call(out, xq[:T], xd[:T], xs[:T], wt, 1)
        check(out, xq[:T], xd[:T], xs[:T], w, 1)
        np.testing.assert_array_equal(out, alone[:T])


@pytest.mark.parametrize("kind", KINDS)
def test_rows_read_back_exactly(kind):
    # The embedding lookup of a tiled table (dequant_row): every row as the untiled one gives it.
    rng = np.random.default_rng([kind, 3])
    n, rows = 96, 37
    w = random_weight(kind, 2, rows, n, rng)
    wt = tile(w)
    a, b = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for r in range(rows):
        L.dequant_row(a, w, 1, r)
        L.dequant_row(b, wt, 1, r)
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_reads_tiles_exactly(kind):
    # The prefill GEMM packs its panels from the tiles: its output equals the untiled weight's,
    # bit for bit, for a row range starting inside a tile.
    rng = np.random.default_rng([kind, 4])
    n, rows, T = 96, 53, 20
    w = random_weight(kind, 2, rows, n, rng)
    wt = tile(w)
    xq, xd, xs = quantize_x(rng.standard_normal((T, n)).astype(np.float32))
    scratch = np.zeros((numba.get_num_threads(), QG.scratch_size(n)), np.float32)
    for base in (0, 5):
        a = np.zeros((T, rows - base), np.float32)
        b = np.full((T, rows - base), np.nan, np.float32)
        QG.linear_a8_tiles(a, xq, xd, xs, w, 1, base, scratch)
        QG.linear_a8_tiles(b, xq, xd, xs, wt, 1, base, scratch)
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_decode_rows_equal_the_prefill_gemms(kind):
    # The tile loop and the prefill GEMM do the same arithmetic per token and row (exact int32
    # block sums, then per block one scale and one offset multiply-add in order): a token's
    # decode-step products are bit for bit its prefill products.
    rng = np.random.default_rng([kind, 6])
    n, rows, T = 576, 40, 8
    wt = tile(random_weight(kind, 1, rows, n, rng))
    xq, xd, xs = quantize_x(rng.standard_normal((T, n)).astype(np.float32))
    scratch = np.zeros((numba.get_num_threads(), QG.scratch_size(n)), np.float32)
    gemm = np.zeros((T, rows), np.float32)
    QG.linear_a8_tiles(gemm, xq, xd, xs, wt, 0, 0, scratch)
    dec = np.zeros((T, rows), np.float32)
    QT.linear_a8_tiled(dec, xq, xd, xs, wt, 0, 0, 2)
    np.testing.assert_array_equal(dec, gemm)
