"""Per-token operations of a transformer layer: norms, RoPE, activation, embedding, KV store.

Attention itself lives in kernels/attention.py."""
import math

import numpy as np

from .jit import kernel
from .linear import dequant_row


@kernel
def rmsnorm(out, x, w, eps):
    """x (T, n) -> out (T, n) = x / sqrt(mean(x^2) + eps) * w."""
    T, n = x.shape
    for t in range(T):
        ss = np.float32(0.0)
        for i in range(n):
            ss += x[t, i] * x[t, i]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(n) + np.float32(eps))
        for i in range(n):
            out[t, i] = x[t, i] * inv * w[i]


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


@kernel
def rope(x, cos, sin, positions):
    """Rotate x (T, heads, head_dim) in place, token t at position positions[t] (HF rotate-half).

    cos, sin (max_seq, head_dim // 2). Pair i is (x[i], x[i + head_dim // 2]).
    """
    T, H, hd = x.shape
    half = hd // 2
    for t in range(T):
        c = cos[positions[t]]
        s = sin[positions[t]]
        for h in range(H):
            v = x[t, h]
            for i in range(half):
                a = v[i]
                b = v[i + half]
                v[i] = a * c[i] - b * s[i]
                v[i + half] = b * c[i] + a * s[i]


@kernel
def swiglu(out, gate_up):
    """gate_up (T, 2n) = [gate | up] -> out (T, n) = silu(gate) * up."""
    T, n = out.shape
    for t in range(T):
        for i in range(n):
            g = gate_up[t, i]
            out[t, i] = g / (np.float32(1.0) + np.exp(-g)) * gate_up[t, n + i]


@kernel
def split_qkv(q, k, v, qkv, b):
    """qkv (T, dq + 2 dkv) = [q | k | v] plus bias b (dq + 2 dkv,) -> q (T, dq), k, v (T, dkv)."""
    T, dq = q.shape
    dkv = k.shape[1]
    for t in range(T):
        for i in range(dq):
            q[t, i] = qkv[t, i] + b[i]
        for i in range(dkv):
            k[t, i] = qkv[t, dq + i] + b[dq + i]
            v[t, i] = qkv[t, dq + dkv + i] + b[dq + dkv + i]


@kernel
def add_(x, y):
    """x += y, for (T, n) arrays."""
    T, n = x.shape
    for t in range(T):
        for i in range(n):
            x[t, i] += y[t, i]


@kernel
def embed(out, ids, w):
    """Rows ids (T,) of the embedding table w (layer 0 of a stacked weight) -> out (T, dim)."""
    for t in range(ids.shape[0]):
        dequant_row(out[t], w, 0, ids[t])


@kernel
def store_kv(k_cache, v_cache, k, v, l, slots):
    """k, v (T, kv_heads, head_dim) -> caches (L, kv_heads, slots_total, head_dim) at slots[t]."""
    T, Hkv, hd = k.shape
    for t in range(T):
        for h in range(Hkv):
            k_cache[l, h, slots[t], :] = k[t, h]
            v_cache[l, h, slots[t], :] = v[t, h]


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
