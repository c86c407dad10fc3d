"""Attention (`fastinfer.kernels.attention`), dense and block-sparse, against the masked-softmax twin
in tests/kernel_twins.py; then the pattern through a model (tiny random checkpoints against
tests/reference.py) and the `BlockSparse` option.

Outputs and scratch start out NaN and unread cache slots hold +-1e4, so a value the kernel forgets
to write, or a key it should not see, shows up as a failure. Tolerance: a score's float32 rounding
moves its weight by the same relative amount, so the bound grows with the score size.
"""
from __future__ import annotations

import math
import zlib

import numba
import numpy as np
import pytest
from numpy.testing import assert_allclose

import fastinfer
import kernel_twins as tw
import reference
from fastinfer.kernels import attention as A
from fastinfer.kernels import ops
from tiny_models import TINY_CFG, random_llama_weights, tiny_bpe_tokenizer, write_hf_dir

THREADS = numba.config.NUMBA_NUM_THREADS
GARBAGE = np.float32(1e4)  # fills cache slots a kernel must not read: any read swamps the result
HEADS = [(4, 4), (9, 3), (8, 2)]  # (heads, kv_heads): group 1, 3, 4
DENSE = None


def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def nans(*shape) -> np.ndarray:
    return np.full(shape, np.nan, np.float32)


def filled_caches(rng, layers: int, kv: int, max_seq: int, hd: int, l: int, used: int):
    """Caches whose layer l holds random keys/values at slots 0..used-1; everything else is garbage."""
    k_cache = np.full((layers, kv, max_seq, hd), GARBAGE)
    v_cache = np.full((layers, kv, max_seq, hd), -GARBAGE)
    k_cache[l, :, :used] = rng.standard_normal((kv, used, hd))
    v_cache[l, :, :used] = rng.standard_normal((kv, used, hd))
    return k_cache.astype(np.float32), v_cache.astype(np.float32)


def half(cache):
    """A cache rounded to half floats: (the uint16 bits the kernel reads, the same values as f32 for
    the twin)."""
    h = cache.astype(np.float16)
    return h.view(np.uint16), h.astype(np.float32)


def run(q, k_cache, v_cache, l, pos0, window=0, pattern=DENSE, starts=None, slots=None):
    T, H, hd = q.shape
    out = nans(T, H, hd)
    slots = np.arange(pos0, pos0 + T, dtype=np.int64) if slots is None else slots
    starts = np.zeros(T, np.int64) if starts is None else starts
    pat = A.dense_pattern(k_cache.shape[2]) if pattern is None else pattern
    scratch = nans(THREADS, A.scratch_size(hd, H // k_cache.shape[1]))
    A.attention(out, q, k_cache, v_cache, l, starts, slots, window, pat, scratch)
    return out


def assert_close(got, q, k_cache, v_cache, l, pos0, window=0, pattern=None, score_scale=1.0):
    want = tw.attention(q, k_cache[l], v_cache[l], pos0, window, pattern)
    vmax = np.abs(v_cache[l, :, :pos0 + q.shape[0]]).max()
    tol = 2e-6 * score_scale
    assert_allclose(got, want, rtol=tol, atol=tol * vmax)


# ----------------------------------------------------------------------------------------------
# the kernel against the masked-softmax twin
# ----------------------------------------------------------------------------------------------

STEPS = [(1, 0), (1, 13), (7, 0), (5, 11), (37, 0), (20, 70)]  # (T, pos0): decode, prefill, chunks


@pytest.mark.parametrize("q_scale", [1.0, 30.0])
@pytest.mark.parametrize("T,pos0", STEPS)
@pytest.mark.parametrize("hd", [64, 8])
@pytest.mark.parametrize("H,KV", HEADS)
def test_dense(H, KV, hd, T, pos0, q_scale):
    Lyr, l, S = 2, 1, 100  # max_seq well past the positions in use
    rng = rng_for("dense", H, KV, hd, T, pos0, q_scale)
    k_cache, v_cache = filled_caches(rng, Lyr, KV, S, hd, l, used=pos0 + T)
    q = (rng.standard_normal((T, H, hd)) * q_scale).astype(np.float32)
    out = run(q, k_cache, v_cache, l, pos0)
    assert_close(out, q, k_cache, v_cache, l, pos0, score_scale=q_scale)


@pytest.mark.parametrize("pattern", [None, (4, 1, 2, 3)])
@pytest.mark.parametrize("T,pos0", [(1, 0), (1, 13), (1, 300), (3, 150), (37, 0), (20, 70)])
@pytest.mark.parametrize("H,KV", [(9, 3), (8, 2)])
def test_half_float_cache(H, KV, T, pos0, pattern):
    """A uint16 (half-float) cache gives what the twin gives on the same values widened to f32."""
    rng = rng_for("half", H, KV, T, pos0, pattern)
    hd = 64
    k_cache, v_cache = filled_caches(rng, 2, KV, pos0 + T + 5, hd, 1, pos0 + T)
    (kh, kf), (vh, vf) = half(k_cache), half(v_cache)
    q = rng.standard_normal((T, H, hd)).astype(np.float32)
    assert_close(run(q, kh, vh, 1, pos0, pattern=pattern), q, kf, vf, 1, pos0, pattern=pattern)


def test_max_row_is_the_float_maximum():
    """The integer-bits maximum decoding's softmax uses orders every float as comparison does."""
    rng = np.random.default_rng(7)
    cases = [rng.standard_normal(n).astype(np.float32) * 10 for n in (1, 7, 16, 63, 64, 1000)]
    cases += [np.array(v, np.float32) for v in ([-3, -1, -2], [-np.inf, 2.5, 0.0, -0.0], [np.inf, 1],
                                                 [-np.inf], [-0.0, -1e-40], [1e-40, 0.0], [-5e30, -6e30])]
    for x in cases:
        got = A._max_row(x)
        assert got == x.max() and np.signbit(got) == np.signbit(x.max()), x
    assert A._max_row(np.zeros(0, np.float32)) == -np.inf


@pytest.mark.parametrize("cache", ["f32", "f16"])
@pytest.mark.parametrize("hd", [64, 128, 48])
@pytest.mark.parametrize("H,KV,T", [(1, 1, 1), (2, 1, 1), (3, 1, 1), (4, 1, 1), (9, 3, 2), (5, 1, 1),
                                    (8, 2, 2), (4, 1, 2), (7, 1, 1), (2, 1, 4)])
@pytest.mark.parametrize("pos0,window", [(0, 0), (5, 0), (70, 0), (131, 0), (131, 37)])
def test_decode_rows(H, KV, T, hd, pos0, window, cache):
    """Steps of at most 8 query rows per kv head (1-8: every size of the scores block, 3 rows at
    a time, and of O += P V, 4 at a time), key counts off the 8-key step, windows, head sizes
    that are and are not a multiple of 64 and of 16."""
    rng = rng_for("rows", H, KV, T, hd, pos0, window, cache)
    k_cache, v_cache = filled_caches(rng, 2, KV, pos0 + T + 9, hd, 1, pos0 + T)
    kf, vf = k_cache, v_cache
    if cache == "f16":
        (k_cache, kf), (v_cache, vf) = half(k_cache), half(v_cache)
    q = (2 * rng.standard_normal((T, H, hd))).astype(np.float32)
    got = run(q, k_cache, v_cache, 1, pos0, window=window)
    assert_close(got, q, kf, vf, 1, pos0, window=window, score_scale=2.0)


@pytest.mark.parametrize("cache", ["f32", "f16"])
@pytest.mark.parametrize("window,pattern", [(0, None), (0, (64, 1, 3, 0)), (0, (50, 2, 1, 4)), (300, None)])
@pytest.mark.parametrize("pos0", [600, 1537])
@pytest.mark.parametrize("H,KV", HEADS)
def test_split_decode_step(H, KV, pos0, window, pattern, cache):
    """A decode step over many keys is cut into pieces that threads share (flash-decoding); the
    merged result is the twin's."""
    if KV == 3:  # where 2 threads share 3 kv heads, the keys are split (see the next test)
        assert A._decode_pieces(pos0 + 1, KV, THREADS) > 1 or THREADS == 1
    rng = rng_for("split", H, KV, pos0, window, pattern)
    hd = 64
    k_cache, v_cache = filled_caches(rng, 1, KV, pos0 + 9, hd, 0, pos0 + 1)
    kf, vf = k_cache, v_cache
    if cache == "f16":
        (k_cache, kf), (v_cache, vf) = half(k_cache), half(v_cache)
    q = (3 * rng.standard_normal((1, H, hd))).astype(np.float32)
    got = run(q, k_cache, v_cache, 0, pos0, window=window, pattern=pattern)
    assert_close(got, q, kf, vf, 0, pos0, window=window, pattern=pattern, score_scale=3.0)


@pytest.mark.parametrize("KV", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("threads", [1, 2, 3, 4, 8])
def test_decode_pieces_keep_the_busiest_thread_least_loaded(KV, threads):
    """A decode step's pieces: at least SPLIT_MIN keys each, at most 4 tasks a thread; among those,
    the busiest thread reads the fewest keys (rounds of tasks times the keys of one), the fewest
    pieces on a tie."""
    for n_keys in (100, 511, 512, 800, 1100, 2000, 9000):
        allowed = range(1, max(1, min(-(-4 * threads // KV), n_keys // A.SPLIT_MIN, A.SPLIT_MAX // KV)) + 1)
        load = {p: math.ceil(KV * p / threads) / p for p in allowed}
        got = A._decode_pieces(n_keys, KV, threads)
        assert got == min(allowed, key=lambda p: (load[p], p)), (n_keys, got, load)
    assert A._decode_pieces(800, 3, 2) == 2  # 6 tasks of 400 keys, not 9 of 267 (5 on one thread)


def test_store_kv_rounds_to_nearest_half():
    """kv_put rounds as numpy's float16 does (to nearest, ties to even), overflow to inf included."""
    rng = np.random.default_rng(7)
    k = (rng.standard_normal((5, 2, 8)) * np.logspace(-8, 5, 8)).astype(np.float32)
    k[0, 0, :4] = [65519.0, 65520.0, 1e6, 2.0 ** -25]     # largest half, rounds to inf, inf, ties to 0
    v = -k
    kc, vc = np.zeros((2, 2, 9, 8), np.uint16), np.zeros((2, 2, 9, 8), np.uint16)
    slots = np.array([3, 0, 8, 1, 5], np.int64)
    ops.store_kv(kc, vc, k, v, 1, slots)
    with np.errstate(over="ignore"):  # the values past the largest half
        want_k, want_v = k.astype(np.float16).view(np.uint16), v.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(kc[1][:, slots].transpose(1, 0, 2), want_k)
    np.testing.assert_array_equal(vc[1][:, slots].transpose(1, 0, 2), want_v)


@pytest.mark.parametrize("window", [0, 70])
@pytest.mark.parametrize("H,KV", [(10, 2), (8, 1), (3, 3)])
def test_wide_groups_long_prefill(H, KV, window):
    """Groups of 5 and 8 heads (a task's rows span several column blocks of the register block)
    and group 1, over a prefill that crosses many query tasks and key tiles."""
    hd, T, pos0, S, l = 32, 90, 130, 240, 0
    rng = rng_for("wide", H, KV, window)
    k_cache, v_cache = filled_caches(rng, 1, KV, S, hd, l, used=pos0 + T)
    q = (rng.standard_normal((T, H, hd)) * 3).astype(np.float32)
    out = run(q, k_cache, v_cache, l, pos0, window=window)
    assert_close(out, q, k_cache, v_cache, l, pos0, window=window, score_scale=3.0)


# (block, global_blocks, local_blocks, stride): odd blocks leave tail blocks; blocks longer and
# shorter than the kernel's 64-key tiles and 16-token query tasks
PATTERNS = [(4, 1, 1, 0), (3, 0, 0, 0), (5, 2, 0, 3), (7, 0, 2, 2), (1, 1, 2, 4), (80, 0, 0, 0), (70, 1, 0, 0),
            (16, 1, 0, 0)]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("T,pos0", [(1, 0), (1, 57), (37, 0), (23, 41), (3, 150)])
@pytest.mark.parametrize("H,KV", [(9, 3), (8, 2)])
def test_block_sparse(H, KV, T, pos0, pattern):
    hd, S, l = 16, 200, 0
    rng = rng_for("sparse", H, KV, T, pos0, pattern)
    k_cache, v_cache = filled_caches(rng, 1, KV, S, hd, l, used=pos0 + T)
    q = (rng.standard_normal((T, H, hd)) * 3).astype(np.float32)
    out = run(q, k_cache, v_cache, l, pos0, pattern=pattern)
    assert_close(out, q, k_cache, v_cache, l, pos0, pattern=pattern, score_scale=3.0)
    if pos0 + T > 2 * pattern[0] * (pattern[1] + pattern[2] + 2):  # long enough for the pattern to hide keys
        assert np.abs(out - tw.attention(q, k_cache[l], v_cache[l], pos0)).max() > 1e-3


@pytest.mark.parametrize("window", [1, 3, 50, 100])
@pytest.mark.parametrize("pattern", [None, (8, 1, 1, 0), (5, 0, 3, 2)])
def test_sliding_window(window, pattern):
    """With a window, query i sees keys i - window + 1 .. i (within the pattern's blocks)."""
    H, KV, hd, S, T, pos0 = 4, 2, 8, 120, 25, 60
    rng = rng_for("window", window, pattern)
    k_cache, v_cache = filled_caches(rng, 1, KV, S, hd, 0, used=pos0 + T)
    q = (rng.standard_normal((T, H, hd)) * 2).astype(np.float32)
    out = run(q, k_cache, v_cache, 0, pos0, window=window, pattern=pattern)
    assert_close(out, q, k_cache, v_cache, 0, pos0, window=window, pattern=pattern, score_scale=2.0)
    if pattern is None and window < 50:  # and by hand: the same as a cache holding only those keys
        for t in (0, T - 1):
            i = pos0 + t
            lo = max(0, i - window + 1)
            want = tw.attention(q[t:t + 1], k_cache[0, :, lo:i + 1], v_cache[0, :, lo:i + 1], i - lo)
            assert_allclose(out[t:t + 1], want, rtol=4e-6, atol=4e-6 * 5)


@pytest.mark.parametrize("pattern", [(4, 0, 100, 0), (4, 100, 0, 0), (4, 0, 0, 1), (3, 1, 1, 1)])
def test_covering_pattern_is_dense(pattern):
    H, KV, hd, T, pos0, S = 9, 3, 64, 40, 90, 130
    rng = rng_for("cover", pattern)
    k_cache, v_cache = filled_caches(rng, 1, KV, S, hd, 0, used=pos0 + T)
    q = (rng.standard_normal((T, H, hd)) * 3).astype(np.float32)
    assert_allclose(run(q, k_cache, v_cache, 0, pos0, pattern=pattern), run(q, k_cache, v_cache, 0, pos0),
                    rtol=1e-5, atol=1e-5)


def test_own_key_only():
    """block 1 with nothing else visible, or window 1: each query sees only its own key, so the
    output is exactly that key's value (every other tile has nothing visible)."""
    H, KV, hd, T, pos0, S = 8, 2, 16, 30, 50, 90
    rng = rng_for("own")
    k_cache, v_cache = filled_caches(rng, 1, KV, S, hd, 0, used=pos0 + T)
    q = (rng.standard_normal((T, H, hd)) * 5).astype(np.float32)
    want = v_cache[0][np.arange(H) // (H // KV)][:, pos0:pos0 + T].transpose(1, 0, 2)
    for kw in (dict(pattern=(1, 0, 0, 0)), dict(window=1)):
        assert_allclose(run(q, k_cache, v_cache, 0, pos0, **kw), want, rtol=1e-6, atol=0)


def test_first_position_returns_its_value():
    rng = rng_for("attn0")
    H, KV, hd = 6, 2, 8
    k_cache, v_cache = filled_caches(rng, 1, KV, 4, hd, 0, used=1)
    q = rng.standard_normal((1, H, hd)).astype(np.float32) * 30
    assert_allclose(run(q, k_cache, v_cache, 0, 0)[0], v_cache[0, np.arange(H) // (H // KV), 0], rtol=1e-6, atol=0)


def test_extreme_scores():
    """Scores hundreds apart: the softmax is one-hot on the largest (no overflow, no NaN), and
    keys far below it weigh exactly nothing."""
    H, KV, hd, T, S = 4, 2, 8, 70, 80
    rng = rng_for("extreme")
    k_cache, v_cache = filled_caches(rng, 1, KV, S, hd, 0, used=T)
    q = (rng.standard_normal((T, H, hd)) * 1000).astype(np.float32)
    out = run(q, k_cache, v_cache, 0, 0)
    assert np.isfinite(out).all()
    assert_close(out, q, k_cache, v_cache, 0, 0, score_scale=1000.0)


def test_ties_average_values():
    rng = rng_for("ties")
    H, KV, hd, T = 4, 2, 8, 70
    k_cache, v_cache = filled_caches(rng, 1, KV, 80, hd, 0, used=T)
    k_cache[0, :, :T] = k_cache[0, :, :1]
    q = rng.standard_normal((T, H, hd)).astype(np.float32) * 30
    out = run(q, k_cache, v_cache, 0, 0)
    for t in (0, 1, 63, 64, T - 1):  # across the 64-key tile edge
        mean = v_cache[0, np.arange(H) // (H // KV), :t + 1].mean(axis=1)
        assert_allclose(out[t], mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pattern", [None, (4, 1, 1, 2), (16, 0, 1, 0)])
@pytest.mark.parametrize("H,KV", HEADS)
def test_decode_equals_prefill(H, KV, pattern):
    """Filling the cache with store_kv and attending one token at a time, in uneven chunks, or all
    at once gives the same outputs."""
    Lyr, l, S, T, hd = 2, 1, 90, 75, 16
    rng = rng_for("decode", H, KV, pattern)
    q = (rng.standard_normal((T, H, hd)) * 3).astype(np.float32)
    k = rng.standard_normal((T, KV, hd)).astype(np.float32)
    v = rng.standard_normal((T, KV, hd)).astype(np.float32)

    def chunked(chunks):
        k_cache = np.full((Lyr, KV, S, hd), GARBAGE, np.float32)
        v_cache = np.full((Lyr, KV, S, hd), -GARBAGE, np.float32)
        outs, pos = [], 0
        for n in chunks:
            slots = np.arange(pos, pos + n, dtype=np.int64)
            ops.store_kv(k_cache, v_cache, k[pos:pos + n], v[pos:pos + n], l, slots)
            outs.append(run(q[pos:pos + n], k_cache, v_cache, l, pos, pattern=pattern))
            pos += n
        return np.concatenate(outs), k_cache, v_cache

    prefill, k_cache, v_cache = chunked([T])
    assert_close(prefill, q, k_cache, v_cache, l, 0, pattern=pattern, score_scale=3.0)
    for chunks in ([1] * T, [4, 5, 30, 36]):
        got, _, _ = chunked(chunks)
        assert_allclose(got, prefill, rtol=2e-6, atol=2e-6, err_msg=f"chunks {chunks}")


@pytest.mark.parametrize("pattern", [None, (3, 1, 0, 2)])
@pytest.mark.parametrize("H,KV", HEADS)
def test_sequences_in_separate_stretches(H, KV, pattern):
    """Sequences sharing one cache, each in its own stretch: each token sees only its own
    sequence, with blocks counted from its stretch start, as if it had the cache to itself."""
    hd, S, l = 8, 30, 0
    rng = rng_for("stretch", H, KV, pattern)
    lens = (4, 27, 13)
    k_cache = np.full((1, KV, 3 * S, hd), GARBAGE, np.float32)
    v_cache = np.full((1, KV, 3 * S, hd), -GARBAGE, np.float32)
    for b, n in enumerate(lens):
        k_cache[l, :, b * S:b * S + n] = rng.standard_normal((KV, n, hd))
        v_cache[l, :, b * S:b * S + n] = rng.standard_normal((KV, n, hd))
    # the last token of the first two sequences, the last five of the third, in one call
    slots = np.array([lens[0] - 1, S + lens[1] - 1] + [2 * S + lens[2] - 5 + i for i in range(5)], np.int64)
    starts = np.array([0, S] + [2 * S] * 5, np.int64)
    q = rng.standard_normal((len(slots), H, hd)).astype(np.float32)
    out = run(q, k_cache, v_cache, l, 0, pattern=pattern, starts=starts, slots=slots)
    for rows, b in ((slice(0, 1), 0), (slice(1, 2), 1), (slice(2, 7), 2)):
        alone_k, alone_v = k_cache[l, :, b * S:(b + 1) * S], v_cache[l, :, b * S:(b + 1) * S]
        pos0 = int(slots[rows][0] - starts[rows][0])
        want = tw.attention(q[rows], alone_k, alone_v, pos0, pattern=pattern)
        assert_allclose(out[rows], want, rtol=2e-6, atol=2e-6 * np.abs(alone_v[:, :lens[b]]).max())


# ----------------------------------------------------------------------------------------------
# through a model: tiny random checkpoints against tests/reference.py
# ----------------------------------------------------------------------------------------------

IDS = [5, 17, 42, 3, 250, 99, 7, 7, 128, 64, 1, 200, 33, 9, 18, 77, 120, 4, 4, 60, 31, 2, 240, 11, 90, 14]


@pytest.fixture(scope="module")
def tok():
    return tiny_bpe_tokenizer()


def _tiny(tmp_path, tok, cfg):
    w = random_llama_weights(cfg, seed=3)
    return fastinfer.load(write_hf_dir(tmp_path / "hf", cfg, w, tokenizer=tok), kv_type="f32"), w


@pytest.mark.parametrize("cfg", [TINY_CFG, {**TINY_CFG, "model_type": "mistral", "sliding_window": 7}],
                         ids=["llama", "mistral-window"])
@pytest.mark.parametrize("sparse", [fastinfer.BlockSparse(block=3, global_blocks=1, local_blocks=1, stride=3, dense_last=0),
                                    fastinfer.BlockSparse(block=4, global_blocks=0, local_blocks=0, dense_last=0)])
def test_model_block_sparse_matches_reference(tmp_path, tok, cfg, sparse):
    """A session with a pattern equals the reference forward with that block mask (and the
    checkpoint's sliding window, written by the test); step by step equals all at once."""
    model, w = _tiny(tmp_path, tok, cfg)
    pattern = (sparse.block, sparse.global_blocks, sparse.local_blocks, sparse.stride or 0)
    want = reference.llama_forward(w, cfg, IDS, block_sparse=pattern)
    full = model.session(attention=sparse).append(IDS)
    assert_allclose(full, want, atol=2e-4, rtol=0)
    assert np.abs(full - reference.llama_forward(w, cfg, IDS)).max() > 1e-3  # the pattern matters
    s = model.session(attention=sparse)
    steps = [s.append([t])[0] for t in IDS]
    assert_allclose(np.array(steps), full, atol=5e-5, rtol=0)
    s = model.session(attention=sparse)
    s.prefill(IDS[:11])
    assert_allclose(s.append(IDS[11:]), full[11:], atol=5e-5, rtol=0)


def test_dense_last_tokens_of_each_call_see_everything(tmp_path, tok):
    """BlockSparse(dense_last=k): the last k tokens of every call attend densely (over a cache the
    earlier tokens filled under the pattern), and so does every generated token."""
    model, w = _tiny(tmp_path, tok, TINY_CFG)
    sparse = fastinfer.BlockSparse(block=3, global_blocks=1, local_blocks=0, dense_last=5)
    pattern = (3, 1, 0, 0)
    full = model.session(attention=sparse).append(IDS)
    n = len(IDS)
    want = _reference_mixed(w, pattern, lambda i: i >= n - 5)
    assert_allclose(full, want, atol=2e-4, rtol=0)
    assert np.abs(full - reference.llama_forward(w, TINY_CFG, IDS, block_sparse=pattern)).max() > 1e-3
    assert np.abs(full - reference.llama_forward(w, TINY_CFG, IDS)).max() > 1e-3
    # two calls: each call's own last 5 are dense; a call of one token (a decode step) is dense
    s = model.session(attention=sparse)
    s.prefill(IDS[:12])
    got = s.append(IDS[12:])
    assert_allclose(got, _reference_mixed(w, pattern, lambda i: 7 <= i < 12 or i >= n - 5)[12:], atol=2e-4, rtol=0)
    s = model.session(attention=sparse)
    s.prefill(IDS[:12])
    steps = [s.decode_step(t).copy() for t in IDS[12:]]
    assert_allclose(np.array(steps), _reference_mixed(w, pattern, lambda i: i >= 7)[12:], atol=2e-4, rtol=0)


def _reference_mixed(w, pattern, dense):
    """The reference forward over IDS where query i attends densely when dense(i), else under pattern."""
    mask = np.array([bool(dense(i)) for i in range(len(IDS))])
    return reference.llama_forward(w, TINY_CFG, IDS, block_sparse=pattern + (mask,))


def test_model_covering_pattern_equals_dense(tmp_path, tok):
    model, _ = _tiny(tmp_path, tok, TINY_CFG)
    dense = model.forward(IDS)
    for sparse in (fastinfer.BlockSparse(block=2, global_blocks=0, local_blocks=len(IDS)),
                   fastinfer.BlockSparse(block=5, global_blocks=1, local_blocks=0, stride=1)):
        # the same keys in other tiles: f32 sums in another order (1.0e-5 seen with 8-float vectors)
        assert_allclose(model.session(attention=sparse).append(IDS), dense, atol=2e-5, rtol=0)


def test_generate_and_batch_take_the_pattern(tmp_path, tok):
    model, w = _tiny(tmp_path, tok, TINY_CFG)
    sparse = fastinfer.BlockSparse(block=2, global_blocks=1, local_blocks=0, dense_last=0)
    ids = IDS[:15]
    got = model.generate(ids, max_new_tokens=6, temperature=0, attention=sparse)
    seq = list(ids)
    for _ in range(6):  # greedy under the reference with the same mask
        seq.append(int(np.argmax(reference.llama_forward(w, TINY_CFG, seq, block_sparse=(2, 1, 0, 0))[-1])))
    assert got == seq[len(ids):]
    both = model.generate([ids, IDS[3:20]], max_new_tokens=6, temperature=0, attention=sparse)
    assert both[0] == got
    assert both[1] == model.generate(IDS[3:20], max_new_tokens=6, temperature=0, attention=sparse)


def test_smollm2_covering_pattern_matches_dense(smollm2_gguf):
    """The real model: a pattern that covers everything gives dense logits within 1e-3."""
    from conftest import DATA
    import gzip
    model = fastinfer.load(smollm2_gguf, n_ctx=320)
    text = gzip.open(DATA / "corpus" / "persuasion.txt.gz", "rt", encoding="utf-8").read()[:4000]
    ids = model.encode(text)[:300]
    dense = model.forward(ids)
    # dense_last=0: one call of the pattern alone. (A last token run as a call of its own would
    # take int8 activations' few-token path, whose rounding may flip against the batched one.)
    cover = model.session(attention=fastinfer.BlockSparse(block=64, global_blocks=0, local_blocks=4,
                                                          dense_last=0)).append(ids)
    assert np.abs(cover - dense).max() < 1e-3
    sparse = model.session(attention=fastinfer.BlockSparse(block=32, global_blocks=1, local_blocks=1,
                                                           dense_last=0)).append(ids)
    assert np.abs(sparse - dense).max() > 1e-2  # and one that hides keys does change them


# ----------------------------------------------------------------------------------------------
# the option
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,msg", [
    (dict(block=0), "block must be an integer >= 1"),
    (dict(block=2.5), "block must be an integer >= 1"),
    (dict(global_blocks=-1), "global_blocks must be an integer >= 0"),
    (dict(local_blocks=True), "local_blocks must be an integer >= 0"),
    (dict(stride=0), "stride must be None"),
    (dict(stride="4"), "stride must be None"),
    (dict(dense_last=-1), "dense_last must be an integer >= 0"),
])
def test_block_sparse_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        fastinfer.BlockSparse(**kw)


def test_block_sparse_is_frozen_and_defaults():
    b = fastinfer.BlockSparse()
    with pytest.raises(Exception):
        b.block = 3
    assert b.block >= 1 and b.stride is None or b.stride >= 1


def test_attention_option_errors(tmp_path, tok):
    model, _ = _tiny(tmp_path, tok, TINY_CFG)
    for bad in ("sparse", (4, 1, 1, 0), 3):
        with pytest.raises(ValueError, match="attention must be None"):
            model.session(attention=bad)
        with pytest.raises(ValueError, match="attention must be None"):
            model.generate("hello", max_new_tokens=2, attention=bad)


@pytest.mark.parametrize("H,KV", [(9, 3), (4, 1), (6, 6)])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("pos0", [40, 1500, 1532])
def test_a_few_tokens_attend_bit_for_bit_as_each_alone(H, KV, window, pos0):
    # Up to FEW_TOKENS tokens (a prompt-lookup draft's check) a token's attention does not depend
    # on the tokens beside it, also where a decode step splits its keys: prompt lookup then
    # changes no greedy output. At pos0 1500 the tokens' keys are cut into the same pieces and
    # go through one split call together; at 1532 the pieces of the later tokens are longer
    # (whole tiles of a third of 1,537 keys and more), so those calls take each token alone.
    rng = np.random.default_rng([H, KV, window, pos0])
    hd = 64
    k_cache, v_cache = filled_caches(rng, 1, KV, pos0 + 8, hd, 0, pos0 + A.FEW_TOKENS)
    for T in range(2, A.FEW_TOKENS + 1):
        slots = np.arange(pos0, pos0 + T, dtype=np.int64)
        together = A._split_alike(np.zeros(T, np.int64), slots, window, A.dense_pattern(pos0 + 8), KV, THREADS)
        if THREADS == 2 and window == 0 and KV == 3:
            assert (together > 1) == (pos0 == 1500 or pos0 == 1532 and T <= 4), (pos0, T, together)
        q = rng.standard_normal((T, H, hd)).astype(np.float32)
        many = run(q, k_cache, v_cache, 0, pos0, window)
        for t in range(T):
            one = run(q[t:t + 1], k_cache, v_cache, 0, pos0 + t, window)
            np.testing.assert_array_equal(many[t], one[0])
        assert_close(many, q, k_cache, v_cache, 0, pos0, window)
