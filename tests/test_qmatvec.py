"""The 8-bit-activation decode matvec (kernels/qmatvec.py) against a NumPy twin of its formula,
on every weight kind, token counts 1..8 (the row-major loop and the token-major one), odd row
counts, task splits, odd block counts, a row offset and a stacked layer l > 0; plus its distance
from the plain f32 matvec of the dequantized weights."""
import numba
import numpy as np
import pytest

from fastinfer.kernels import isa
from fastinfer.kernels import qmatvec as Q
from fastinfer.kernels.linear import Q4_0, Q4_1, Q8_0

QK = 32


def quantize_x(x):
    """x f32 (T, n) -> xq int8 (T, n), xd, xs f32 (T, n // 32): the activation format."""
    T, n = x.shape
    blocks = x.reshape(T, n // QK, QK)
    xd = (np.abs(blocks).max(axis=2) / 127).astype(np.float32)
    safe = np.where(xd == 0, 1, xd)[..., None]
    xq = np.where(xd[..., None] == 0, 0, np.rint(blocks / safe)).astype(np.int8)
    xs = (xd * xq.astype(np.float32).sum(axis=2)).astype(np.float32)
    return xq.reshape(T, n), xd, xs


def random_weight(kind, L, rows, n, rng):
    """(kind, q, s, m, f) from random bytes and scales, as kernels/linear.py stores them."""
    nb = n // QK
    q = rng.integers(0, 256, (L, rows, n if kind == Q8_0 else n // 2), dtype=np.uint8)
    s = rng.uniform(0.001, 0.02, (L, rows, nb)).astype(np.float32)
    m = rng.uniform(-0.2, 0.0, (L, rows, nb)).astype(np.float32) if kind == Q4_1 else np.zeros((0, 0, 0), np.float32)
    return kind, q, s, m, np.zeros((0, 0, 0), np.float32)


def unpack(kind, qr):
    """Packed rows (..., row_bytes) -> integer values (..., n) in element order: the nibble
    (0..15) for Q4 kinds, the signed byte for Q8_0."""
    if kind == Q8_0:
        return qr.view(np.int8).astype(np.int64)
    blocks = qr.reshape(*qr.shape[:-1], -1, QK // 2).astype(np.int64)
    return np.concatenate([blocks & 15, blocks >> 4], axis=-1).reshape(*qr.shape[:-1], -1)


def dequantize(w, l):
    """W[l] f32 (rows, n) by the format definitions (Q8_0 d q, Q4_0 d (q - 8), Q4_1 d q + m)."""
    kind, q, s, m, _ = w
    v = unpack(kind, q[l]).astype(np.float64)
    d = np.repeat(s[l].astype(np.float64), QK, axis=1)
    if kind == Q4_1:
        return d * v + np.repeat(m[l].astype(np.float64), QK, axis=1)
    return d * (v - 8) if kind == Q4_0 else d * v


def twin(xq, xd, xs, w, l):
    """The kernel's formula in float64: sum_b s xd (u . xq) + sum_b mn xs. Also returns the sum of
    the magnitudes of everything summed, which bounds the f32 rounding error."""
    kind, q, s, m, _ = w
    v = unpack(kind, q[l])
    u = v + 128 if kind == Q8_0 else v
    rows, n = u.shape
    T = xq.shape[0]
    isum = np.einsum("rbj,tbj->trb", u.reshape(rows, -1, QK), xq.astype(np.int64).reshape(T, -1, QK))
    sd = s[l].astype(np.float64)
    mn = m[l].astype(np.float64) if kind == Q4_1 else (-8 if kind == Q4_0 else -128) * sd
    sdx = np.einsum("rb,tb->trb", sd, xd.astype(np.float64))
    terms_m = np.einsum("rb,tb->trb", mn, xs.astype(np.float64))
    # the kernel may sum a block's products in any grouping, so bound by sum_j |u_j xq_j|
    abs_isum = np.einsum("rbj,tbj->trb", u.reshape(rows, -1, QK), np.abs(xq.astype(np.int64)).reshape(T, -1, QK))
    return (isum * sdx).sum(2) + terms_m.sum(2), (abs_isum * np.abs(sdx)).sum(2) + np.abs(terms_m).sum(2)


def check(out, xq, xd, xs, w, l):
    # The integer lane sums are exact (and exact as f32, below 2**24); each scaled lane term is
    # rounded about three times (s xd, the product, the add) and each of the 16 f32 lanes adds n/64
    # terms in sequence before a 4-level horizontal sum: an error below (n/64 + 8) f32 ulps of the
    # sum of the magnitudes.
    want, mag = twin(xq, xd, xs, w, l)
    n = xq.shape[1]
    err = np.abs(out - want)
    bound = 2.0 ** -24 * (n // 64 + 8) * mag
    assert (err <= bound).all(), (err / bound).max()


KINDS = [Q8_0, Q4_0, Q4_1]


def scratch(tasks, n, T=Q.MAX_T):
    """linear_a8_rows' working rows: one per task."""
    return np.zeros((tasks, max(1, Q.scratch_size(n, T))), np.float32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1, 2, 3, 8])
@pytest.mark.parametrize("n", [32, 64, 96, 576, 1536])
@pytest.mark.parametrize("tasks", [1, 2, 3])
def test_matches_twin(kind, T, n, tasks):
    rng = np.random.default_rng([kind, T, n, tasks])
    rows, L, l = 37, 3, 2
    w = random_weight(kind, L, rows, n, rng)
    x = rng.standard_normal((T, n)).astype(np.float32)
    x[0, :QK] = 0  # an all-zero block: xd = 0
    xq, xd, xs = quantize_x(x)
    out = np.full((T, rows), np.nan, np.float32)
    Q.linear_a8_rows(out, xq, xd, xs, w, l, scratch(tasks, n), 0)
    check(out, xq, xd, xs, w, l)


@pytest.mark.parametrize("kind", KINDS)
def test_every_token_count_and_layer(kind):
    rng = np.random.default_rng(kind)
    n, rows, L = 160, 19, 2
    w = random_weight(kind, L, rows, n, rng)
    for T in range(1, Q.MAX_T + 1):
        for l in range(L):
            xq, xd, xs = quantize_x(rng.standard_normal((T, n)).astype(np.float32))
            out = np.zeros((T, rows), np.float32)
            Q.linear_a8_rows(out, xq, xd, xs, w, l, scratch(2, n), 0)
            check(out, xq, xd, xs, w, l)


@pytest.mark.parametrize("kind", KINDS)
def test_a_token_does_not_depend_on_the_others(kind):
    # Within each loop (row-major below TOKEN_MAJOR_MIN_T tokens, token-major from it) a token's
    # result is bit for bit the same whatever tokens share the call, and wherever it sits.
    rng = np.random.default_rng([kind, 5])
    n, rows = 96, 23
    w = random_weight(kind, 1, rows, n, rng)
    xq, xd, xs = quantize_x(rng.standard_normal((Q.MAX_T, n)).astype(np.float32))
    full = np.zeros((Q.MAX_T, rows), np.float32)
    Q.linear_a8_rows(full, xq, xd, xs, w, 0, scratch(2, n), 0)
    first = np.zeros((1, rows), np.float32)
    Q.linear_a8_rows(first, xq[:1], xd[:1], xs[:1], w, 0, scratch(2, n), 0)
    for T in range(1, Q.MAX_T + 1):
        pick = rng.permutation(Q.MAX_T)[:T]
        out = np.zeros((T, rows), np.float32)
        Q.linear_a8_rows(out, xq[pick], xd[pick], xs[pick], w, 0, scratch(2, n), 0)
        for i, t in enumerate(pick):
            if T >= Q.TOKEN_MAJOR_MIN_T:
                np.testing.assert_array_equal(out[i], full[t])
            elif t == 0:
                np.testing.assert_array_equal(out[i], first[0])


@pytest.mark.parametrize("T", [1, 3, 8])
def test_row_offset(T):
    # base selects the weight rows base..base + out.shape[1]: the K and V rows' residual pass
    rng = np.random.default_rng([T, 9])
    n, rows, base = 96, 29, 11
    w = random_weight(Q4_1, 2, rows, n, rng)
    xq, xd, xs = quantize_x(rng.standard_normal((T, n)).astype(np.float32))
    whole = np.zeros((T, rows), np.float32)
    Q.linear_a8_rows(whole, xq, xd, xs, w, 1, scratch(2, n), 0)
    part = np.zeros((T, rows - base), np.float32)
    Q.linear_a8_rows(part, xq, xd, xs, w, 1, scratch(2, n), base)
    np.testing.assert_array_equal(part, whole[:, base:])
    with pytest.raises(ValueError, match="must lie in the weight"):
        Q.linear_a8_rows(part, xq, xd, xs, w, 1, scratch(2, n), base + 1)


_TIER_ROWS = {}


def tier_rows(tier):
    """linear_a8_rows' row loop in another ISA tier's instructions, compiled here (not cached)."""
    if tier.name not in _TIER_ROWS:
        block = Q.make_rows(tier)

        @numba.njit(cache=False)
        def call(out, xq, xd, xs, w, l):
            kind, q, s, m, f = w
            if xq.shape[0] >= Q.TOKEN_MAJOR_MIN_T:  # the token-major loop reads a prepared layout
                buf = np.zeros(Q.scratch_size(xq.shape[1], xq.shape[0]), np.float32)
                xqT, xdT, xsT = Q.prepare(buf, xq, xd, xs, 4 if kind == Q.Q6 else 2)
            else:
                xqT, xdT, xsT = np.zeros((0, 512), np.int8), np.zeros((0, 16), np.float32), np.zeros((0, 16), np.float32)
            block(out, xq, xd, xs, xqT, xdT, xsT, q, s, m, l, 0, out.shape[1], 0, kind)
        _TIER_ROWS[tier.name] = call
    return _TIER_ROWS[tier.name]


def runnable(tier):
    """Skip a tier whose instructions this CPU (or Numba's target) lacks, naming them."""
    lacks = isa.missing(tier)
    if lacks:
        pytest.skip(f"{tier.name}: the CPU lacks {', '.join(lacks)}")
    return tier


@pytest.mark.parametrize("tier", isa.TIERS, ids=isa.TIER_NAMES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [96, 576])
def test_every_tier(tier, kind, n):
    # Each tier's instructions (vpdpbusd 512 / 256, vpmaddubsw + vpmaddwd with Q8_0 signed, plain
    # IR), on an odd block count (96: 3 blocks) and the model's width, T = 1, 3 (two rows at once
    # and one), 8 (token-major), 21 rows (an odd last row).
    rows = tier_rows(runnable(tier))
    rng = np.random.default_rng([kind, n, 7])
    w = random_weight(kind, 2, 21, n, rng)
    for T in (1, 3, 8):
        xq, xd, xs = quantize_x(rng.standard_normal((T, n)).astype(np.float32))
        out = np.zeros((T, 21), np.float32)
        rows(out, xq, xd, xs, w, 1)
        check(out, xq, xd, xs, w, 1)


@pytest.mark.parametrize("tier", isa.TIERS, ids=isa.TIER_NAMES)
def test_every_tier_at_the_extremes(tier):
    # The largest products each way: Q8_0 bytes -128 and 127 against activations +-127, where
    # vpmaddubsw's int16 pair sums would saturate on q + 128 (the signed form must not), and Q4
    # nibbles 15 against -127.
    rows = tier_rows(runnable(tier))
    n = 96
    for kind, T in [(k, T) for k in KINDS for T in (2, Q.MAX_T)]:
        w = random_weight(kind, 1, 4, n, np.random.default_rng(1))
        q = w[1]
        q[0, 0], q[0, 1] = 0x80, 0x7F  # Q8_0: -128, 127; Q4: nibbles 0/8 and 15/7
        q[0, 2], q[0, 3] = 0xFF, 0x00
        xq = np.full((T, n), 127, np.int8)
        xq[1::2, ::2] = -127
        xd = np.full((T, n // QK), 0.01, np.float32)
        xs = (xd * xq.reshape(T, -1, QK).astype(np.float32).sum(axis=2)).astype(np.float32)
        out = np.zeros((T, 4), np.float32)
        rows(out, xq, xd, xs, w, 0)
        check(out, xq, xd, xs, w, 0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1, 4, 8])
def test_close_to_f32_matvec(kind, T):
    # Quantizing the activations to 8 bits per 32-block costs ~0.5-1% relative error.
    rng = np.random.default_rng([kind, T, 11])
    n, rows = 576, 301
    w = random_weight(kind, 2, rows, n, rng)
    x = rng.standard_normal((T, n)).astype(np.float32)
    xq, xd, xs = quantize_x(x)
    out = np.zeros((T, rows), np.float32)
    Q.linear_a8_rows(out, xq, xd, xs, w, 1, scratch(2, n), 0)
    want = x.astype(np.float64) @ dequantize(w, 1).T
    rel = np.linalg.norm(out - want) / np.linalg.norm(want)
    assert rel < 0.015, rel


def test_rejects_token_counts_outside_1_to_8():
    w = random_weight(Q4_1, 1, 4, 64, np.random.default_rng(0))
    xq, xd, xs = quantize_x(np.ones((9, 64), np.float32))
    with pytest.raises(ValueError, match="1..8 tokens"):
        Q.linear_a8_rows(np.zeros((9, 4), np.float32), xq, xd, xs, w, 0, scratch(1, 64), 0)


def test_rejects_a_short_scratch():
    w = random_weight(Q4_1, 1, 4, 64, np.random.default_rng(0))
    xq, xd, xs = quantize_x(np.ones((8, 64), np.float32))
    with pytest.raises(ValueError, match="scratch_size"):
        Q.linear_a8_rows(np.zeros((8, 4), np.float32), xq, xd, xs, w, 0, np.zeros((2, 8), np.float32), 0)
