"""Per-token operations of a transformer layer: norms, RoPE, activation, embedding, KV store.

Attention itself lives in kernels/attention.py.

The ops a Llama layer runs on every token (rmsnorm, split_qkv, rope, store_kv, add_, swiglu,
embed) run their token loop inline for a few tokens (decoding: no parallel region to pay for) and
hand it to a `_..._many` twin, the same loop under prange, from PARALLEL_MIN_ELEMS elements on
(prefill chunks). Their inner loops vectorize; silu's exp is a polynomial, not a libm call.
"""
import math

import numpy as np
from numba import prange

from .jit import kernel
from .linear import dequant_row
from .simd import bits_float, kv_put

# When the token loop is split over threads. A parallel region costs about 2 us here (2 threads,
# bench/ops_kernels.py); a copy-like op (norm, add, split, rope, KV store) moves about 10 elements
# per ns on one thread, so it pays from ~32k elements (64 tokens of 576). SwiGLU's exp costs about
# four times a copy per element; the embedding lookup counts in tokens (a dequantized row each).
PARALLEL_MIN_ELEMS = 32768
SILU_COST = 4
PARALLEL_MIN_T = 16  # embed

LOG2E = 1.4426950408889634
EXP_MIN = -87.0  # exp(v) for v below this is taken as 0 (float32's normal range ends at exp(-87.3))


@kernel
def _exp_le0(v):
    """exp(v) for v <= 0 (0 below EXP_MIN), in plain float arithmetic that vectorizes (no libm).

    exp(v) = 2^n e^f with n = round(v log2 e), f = v - n ln 2 in [-ln2/2, ln2/2]; e^f from Cephes'
    expf polynomial (relative error ~1e-7), 2^n built from float bits (as attention._softmax_row).
    """
    w = max(v, np.float32(EXP_MIN))
    ni = np.int32(w * np.float32(LOG2E) - np.float32(0.5))  # w <= 0: truncation rounds to nearest
    k = np.float32(ni)
    f = w - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
    z = f * f
    p = ((((np.float32(1.9875691500e-4) * f + np.float32(1.3981999507e-3)) * f
           + np.float32(8.3334519073e-3)) * f + np.float32(4.1665795894e-2)) * f
         + np.float32(1.6666665459e-1)) * f + np.float32(5.0000001201e-1)
    e = (p * z + f + np.float32(1.0)) * bits_float((ni + np.int32(127)) << 23)
    return e if v >= np.float32(EXP_MIN) else np.float32(0.0)


@kernel
def silu(v):
    """v sigmoid(v) = v / (1 + exp(-v)), through e = exp(-|v|) <= 1 so nothing overflows:
    sigmoid(v) = 1 / (1 + e) for v >= 0, e / (1 + e) below. Within a few ulps for any v; the
    result is -0 where its size is below 1.5e-36 (v < -87)."""
    e = _exp_le0(-abs(v))
    num = np.float32(1.0) if v >= np.float32(0.0) else e
    return v * num / (np.float32(1.0) + e)


@kernel
def gelu_tanh(v):
    """0.5 v (1 + tanh(z)), z = sqrt(2/pi) (v + 0.044715 v^3) (PyTorch's gelu approximate="tanh"),
    as v sigmoid(2z) through the same overflow-free exp as silu: no libm call, so it vectorizes."""
    z = np.float32(2.0 * math.sqrt(2.0 / math.pi)) * (v + np.float32(0.044715) * v * v * v)
    e = _exp_le0(-abs(z))
    num = np.float32(1.0) if z >= np.float32(0.0) else e
    return v * num / (np.float32(1.0) + e)


# -- the public kernels: a serial token loop for little work, the same loop under prange in a
# `_..._many` twin from PARALLEL_MIN_ELEMS on. Both run one inlined per-token body (Numba IR
# inlining: no call and no per-token views, which cost as much as a decode step's row), with flat
# loops over the last axis for LLVM to vectorize. ---------------------------------------------------

@kernel(inline=True)
def _rmsnorm_row(out, x, w, eps, t):
    n = x.shape[1]
    ss = np.float32(0.0)
    for i in range(n):  # vectorizes: reassoc lets LLVM keep several partial sums
        ss += x[t, i] * x[t, i]
    inv = np.float32(1.0) / np.sqrt(ss / np.float32(n) + np.float32(eps))
    for i in range(n):
        out[t, i] = x[t, i] * inv * w[i]


@kernel
def rmsnorm(out, x, w, eps):
    """x (T, n) -> out (T, n) = x / sqrt(mean(x^2) + eps) * w."""
    T, n = x.shape
    if T * n >= PARALLEL_MIN_ELEMS:
        _rmsnorm_many(out, x, w, eps)
        return
    for t in range(T):
        _rmsnorm_row(out, x, w, eps, t)


@kernel(parallel=True)
def _rmsnorm_many(out, x, w, eps):
    for t in prange(x.shape[0]):
        _rmsnorm_row(out, x, w, eps, t)


@kernel
def heads_rmsnorm_(x, w, eps, heads):
    """x (T, heads * hd): each head's vector normed in place, times w (hd,) (QK-norm)."""
    T = x.shape[0]
    hd = w.shape[0]
    v = x.reshape((T * heads, hd))
    rmsnorm(v, v, w, eps)


@kernel
def layernorm(out, x, w, b, eps):
    """x (T, n) -> out (T, n) = (x - mean) / sqrt(var + eps) * w + b (biased variance)."""
    T, n = x.shape
    for t in range(T):
        mean = np.float32(0.0)
        for i in range(n):
            mean += x[t, i]
        mean /= np.float32(n)
        var = np.float32(0.0)
        for i in range(n):
            d = x[t, i] - mean
            var += d * d
        inv = np.float32(1.0) / np.sqrt(var / np.float32(n) + np.float32(eps))
        for i in range(n):
            out[t, i] = (x[t, i] - mean) * inv * w[i] + b[i]


@kernel
def gelu_new_(x):
    """x (T, n) <- 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in place (GPT-2's gelu_new)."""
    T, n = x.shape
    c = np.float32(math.sqrt(2.0 / math.pi))
    for t in range(T):
        for i in range(n):
            v = x[t, i]
            x[t, i] = np.float32(0.5) * v * (np.float32(1.0) + np.tanh(c * (v + np.float32(0.044715) * v * v * v)))


@kernel
def add_bias_(x, b):
    """x (T, n) += b (n,)."""
    T, n = x.shape
    for t in range(T):
        for i in range(n):
            x[t, i] += b[i]


@kernel(inline=True)
def _rope_row(x, cos, sin, positions, t):
    H, hd = x.shape[1], x.shape[2]
    half = hd // 2
    p = positions[t]
    for h in range(H):
        for i in range(half):
            a = x[t, h, i]
            b = x[t, h, half + i]
            x[t, h, i] = a * cos[p, i] - b * sin[p, i]
            x[t, h, half + i] = b * cos[p, i] + a * sin[p, i]


@kernel
def rope(x, cos, sin, positions):
    """Rotate x (T, heads, head_dim) in place, token t at position positions[t] (HF rotate-half).

    cos, sin (max_seq, head_dim // 2). Pair i is (x[i], x[i + head_dim // 2]).
    """
    T, H, hd = x.shape
    if T * H * hd >= PARALLEL_MIN_ELEMS:
        _rope_many(x, cos, sin, positions)
        return
    for t in range(T):
        _rope_row(x, cos, sin, positions, t)


@kernel(parallel=True)
def _rope_many(x, cos, sin, positions):
    for t in prange(x.shape[0]):
        _rope_row(x, cos, sin, positions, t)


@kernel(inline=True)
def _gated_row(out, gate_up, t, gelu):
    n = out.shape[1]
    if gelu:  # loop-invariant: each loop vectorizes on its own
        for i in range(n):
            out[t, i] = gelu_tanh(gate_up[t, i]) * gate_up[t, n + i]
    else:
        for i in range(n):
            out[t, i] = silu(gate_up[t, i]) * gate_up[t, n + i]


@kernel
def _gated(out, gate_up, gelu):
    T, n = out.shape
    if T * n * SILU_COST >= PARALLEL_MIN_ELEMS:
        _gated_many(out, gate_up, gelu)
        return
    for t in range(T):
        _gated_row(out, gate_up, t, gelu)


@kernel(parallel=True)
def _gated_many(out, gate_up, gelu):
    for t in prange(out.shape[0]):
        _gated_row(out, gate_up, t, gelu)


@kernel
def swiglu(out, gate_up):
    """gate_up (T, 2n) = [gate | up] -> out (T, n) = silu(gate) * up (Llama's MLP)."""
    _gated(out, gate_up, False)


@kernel
def geglu(out, gate_up):
    """gate_up (T, 2n) = [gate | up] -> out (T, n) = gelu_tanh(gate) * up (Gemma's MLP)."""
    _gated(out, gate_up, True)


@kernel(inline=True)
def _split_qkv_row(q, k, v, qkv, b, t):
    dq, dkv = q.shape[1], k.shape[1]
    for i in range(dq):
        q[t, i] = qkv[t, i] + b[i]
    for i in range(dkv):
        k[t, i] = qkv[t, dq + i] + b[dq + i]
        v[t, i] = qkv[t, dq + dkv + i] + b[dq + dkv + i]


@kernel
def split_qkv(q, k, v, qkv, b):
    """qkv (T, dq + 2 dkv) = [q | k | v] plus bias b (dq + 2 dkv,) -> q (T, dq), k, v (T, dkv)."""
    T, dq = q.shape
    if T * qkv.shape[1] >= PARALLEL_MIN_ELEMS:
        _split_qkv_many(q, k, v, qkv, b)
        return
    for t in range(T):
        _split_qkv_row(q, k, v, qkv, b, t)


@kernel(parallel=True)
def _split_qkv_many(q, k, v, qkv, b):
    for t in prange(q.shape[0]):
        _split_qkv_row(q, k, v, qkv, b, t)


@kernel(inline=True)
def _add_row(x, y, t):
    for i in range(x.shape[1]):
        x[t, i] += y[t, i]


@kernel
def add_(x, y):
    """x += y, for (T, n) arrays."""
    T, n = x.shape
    if T * n >= PARALLEL_MIN_ELEMS:
        _add_many(x, y)
        return
    for t in range(T):
        _add_row(x, y, t)


@kernel(parallel=True)
def _add_many(x, y):
    for t in prange(x.shape[0]):
        _add_row(x, y, t)


@kernel
def embed(out, ids, w):
    """Rows ids (T,) of the embedding table w (layer 0 of a stacked weight) -> out (T, dim)."""
    if ids.shape[0] >= PARALLEL_MIN_T:
        _embed_many(out, ids, w)
        return
    for t in range(ids.shape[0]):
        dequant_row(out[t], w, 0, ids[t])


@kernel(parallel=True)
def _embed_many(out, ids, w):
    for t in prange(ids.shape[0]):
        dequant_row(out[t], w, 0, ids[t])


@kernel(inline=True)
def _store_kv_row(k_cache, v_cache, k, v, l, slots, t):
    Hkv, hd = k.shape[1], k.shape[2]
    s = slots[t]
    for h in range(Hkv):  # element loops: a slice assignment per row costs more than the copy
        for i in range(hd):
            k_cache[l, h, s, i] = kv_put(k_cache, k[t, h, i])
        for i in range(hd):
            v_cache[l, h, s, i] = kv_put(v_cache, v[t, h, i])


@kernel
def store_kv(k_cache, v_cache, k, v, l, slots):
    """k, v (T, kv_heads, head_dim) -> caches (L, kv_heads, slots_total, head_dim) at slots[t]
    (float32, or half floats as uint16 bits: kernels/simd.py's kv_put)."""
    T, Hkv, hd = k.shape
    if 2 * T * Hkv * hd >= PARALLEL_MIN_ELEMS:
        _store_kv_many(k_cache, v_cache, k, v, l, slots)
        return
    for t in range(T):
        _store_kv_row(k_cache, v_cache, k, v, l, slots, t)


@kernel(parallel=True)
def _store_kv_many(k_cache, v_cache, k, v, l, slots):
    for t in prange(k.shape[0]):
        _store_kv_row(k_cache, v_cache, k, v, l, slots, t)


# Activation codes for `activation_` (HF hidden_act names map onto these in weights/hf_fnet.py).
(GELU_TANH, GELU_ERF, RELU, SILU, QUICK_GELU, TANH, SIGMOID, LINEAR, RELU6, RELU2, GELU_10, MISH, LEAKY_RELU,
 HARDSWISH, LAPLACE) = range(15)


@kernel
def activation_(x, kind):
    """x (T, n) <- act(x) in place; kind is one of the codes above (GELU_TANH is gelu_new)."""
    T, n = x.shape
    c = np.float32(math.sqrt(2.0 / math.pi))
    for t in range(T):
        for i in range(n):
            v = x[t, i]
            if kind == GELU_TANH:
                v = np.float32(0.5) * v * (np.float32(1.0) + np.tanh(c * (v + np.float32(0.044715) * v * v * v)))
            elif kind == GELU_ERF:
                v = np.float32(0.5) * v * (np.float32(1.0) + np.float32(math.erf(v / math.sqrt(2.0))))
            elif kind == RELU:
                v = max(v, np.float32(0.0))
            elif kind == SILU:
                v = v / (np.float32(1.0) + np.exp(-v))
            elif kind == QUICK_GELU:
                v = v / (np.float32(1.0) + np.exp(np.float32(-1.702) * v))
            elif kind == TANH:
                v = np.tanh(v)
            elif kind == SIGMOID:
                v = np.float32(1.0) / (np.float32(1.0) + np.exp(-v))
            elif kind == RELU6:
                v = min(max(v, np.float32(0.0)), np.float32(6.0))
            elif kind == RELU2:
                v = max(v, np.float32(0.0)) * max(v, np.float32(0.0))
            elif kind == GELU_10:  # erf gelu clipped to [-10, 10]
                g = np.float32(0.5) * v * (np.float32(1.0) + np.float32(math.erf(v / math.sqrt(2.0))))
                v = min(max(g, np.float32(-10.0)), np.float32(10.0))
            elif kind == MISH:  # x tanh(softplus(x)); softplus as torch: linear above 20
                sp = v if v > np.float32(20.0) else np.log1p(np.exp(v))
                v = v * np.tanh(sp)
            elif kind == LEAKY_RELU:
                v = v if v >= np.float32(0.0) else np.float32(0.01) * v
            elif kind == HARDSWISH:
                v = v * min(max(v + np.float32(3.0), np.float32(0.0)), np.float32(6.0)) / np.float32(6.0)
            elif kind == LAPLACE:  # MEGA's: 0.5 (1 + erf((x - 0.707107) / (0.282095 sqrt 2)))
                v = np.float32(0.5) * (np.float32(1.0) + np.float32(
                    math.erf((v - 0.707107) / (0.282095 * math.sqrt(2.0)))))
            x[t, i] = v


@kernel
def mask_tokens(logits, words):
    # logits (vocab,) f32, words ((vocab + 31) // 32,) int32: bit j of word w allows token 32 w + j.
    # Every token not allowed gets -inf (a grammar's mask, in place; words of all ones are skipped).
    vocab = logits.shape[0]
    for w in range(words.shape[0]):
        bits = words[w]
        if bits == -1:
            continue
        base = 32 * w
        for j in range(min(32, vocab - base)):
            if (bits >> j) & 1 == 0:
                logits[base + j] = -np.inf
