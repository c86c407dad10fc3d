"""Plain-NumPy twins of the Numba kernels in `fastinfer.kernels.{linear,ops,attention}`.

Written from the kernels' docstrings, not their code. Every twin computes in float64 from the
float32 (or packed) inputs and returns float64, so the tests measure the kernels' float32 error
alone. Nothing here imports `fastinfer`.
"""
from __future__ import annotations

import numpy as np

import reference as R

# ----------------------------------------------------------------------------------------------
# weight formats: float32 matrix -> (packed form the engine loads, what that packed form decodes to)
# ----------------------------------------------------------------------------------------------

FLOAT_FORMATS = ("F32", "F16", "BF16")
BLOCK_FORMATS = ("Q8_0", "Q4_0", "Q4_1")
FORMATS = FLOAT_FORMATS + BLOCK_FORMATS


def f16_bits(a: np.ndarray) -> np.ndarray:
    """IEEE half bits (uint16) of float32 `a`, rounded to nearest by numpy."""
    return np.asarray(a, np.float32).astype(np.float16).view(np.uint16)


def f16_decode(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, np.uint16).view(np.float16).astype(np.float32)


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) of float32 `a`, truncated (the top half of the float32)."""
    return (np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def bf16_decode(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def encode(a: np.ndarray, fmt: str) -> np.ndarray:
    """float32 (rows, cols) -> the packed payload for `fmt`: float32 itself, uint16 half bits, or
    uint8 ggml block bytes (rows, row_bytes) from the independent reference quantizer."""
    a = np.ascontiguousarray(a, np.float32)
    if fmt == "F32":
        return a
    if fmt == "F16":
        return f16_bits(a)
    if fmt == "BF16":
        return bf16_bits(a)
    return R.quantize(a, fmt)


def decode(packed: np.ndarray, fmt: str, cols: int) -> np.ndarray:
    """The float32 matrix a packed payload from `encode` stands for."""
    if fmt == "F32":
        return np.asarray(packed, np.float32)
    if fmt == "F16":
        return f16_decode(packed)
    if fmt == "BF16":
        return bf16_decode(packed)
    return R.dequantize(packed, fmt, cols)


# ----------------------------------------------------------------------------------------------
# kernels/linear.py
# ----------------------------------------------------------------------------------------------

def offsets(packed: np.ndarray, fmt: str, cols: int) -> np.ndarray:
    """The additive per-block term of every element (rows, cols): -8 d for Q4_0, m for Q4_1,
    0 otherwise. A weight is w = d * q + offset."""
    rows = packed.shape[0]
    if fmt not in ("Q4_0", "Q4_1"):
        return np.zeros((rows, cols), np.float32)
    blocks = np.ascontiguousarray(packed).reshape(rows, cols // R.QK, R.BLOCK_BYTES[fmt])
    off = -8 * R._fp16_at(blocks, 0) if fmt == "Q4_0" else R._fp16_at(blocks, 2)
    return np.repeat(off[..., 0], R.QK, axis=1)


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x (T, n) @ w (rows, n).T -> (T, rows)."""
    return x.astype(np.float64) @ w.astype(np.float64).T


def linear_scale(x: np.ndarray, w: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """The yardstick of a dot product's float32 rounding error, per output: sum_i |x_i w_i|, with
    w_i = d q_i + offset_i counted as its two terms |d q_i| + |offset_i|, since a block-format dot
    product may sum d q x and offset x separately (they can cancel)."""
    w = w.astype(np.float64)
    offset = offset.astype(np.float64)
    return np.abs(x.astype(np.float64)) @ (np.abs(w - offset) + np.abs(offset)).T


# ----------------------------------------------------------------------------------------------
# kernels/ops.py
# ----------------------------------------------------------------------------------------------

def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w.astype(np.float64)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, pos0: int) -> np.ndarray:
    """HF rotate-half: pair i is (x[i], x[i + hd/2]), rotated by cos/sin row pos0 + t."""
    T, _, hd = x.shape
    half = hd // 2
    x = x.astype(np.float64)
    c = cos[pos0:pos0 + T, None, :].astype(np.float64)
    s = sin[pos0:pos0 + T, None, :].astype(np.float64)
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    g = gate.astype(np.float64)
    with np.errstate(over="ignore"):  # exp(-g) -> inf for very negative g: silu -> -0
        return g / (1.0 + np.exp(-g)) * up.astype(np.float64)


def embed(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    return table[ids]


def attention_mask(pos0: int, T: int, n_keys: int, window: int = 0, pattern=None) -> np.ndarray:
    """(T, n_keys) bool: the keys query pos0 + t sees. Causal (j <= i); window > 0 keeps
    i - j < window; pattern (block, global_blocks, local_blocks, stride) keeps key block kb for
    query block qb when kb < global_blocks, qb - kb <= local_blocks, or stride > 0 and
    (qb - kb) % stride == 0."""
    i = pos0 + np.arange(T)[:, None]
    j = np.arange(n_keys)[None, :]
    visible = j <= i
    if window > 0:
        visible &= i - j < window
    if pattern is not None:
        block, n_global, n_local, stride = pattern
        qb, kb = i // block, j // block
        keep = (kb < n_global) | (qb - kb <= n_local)
        if stride > 0:
            keep |= (qb - kb) % stride == 0
        visible &= keep
    return visible


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos0: int, window: int = 0,
              pattern=None) -> np.ndarray:
    """Causal GQA. q (T, H, hd) at positions pos0..; k/v_cache (KV, max_seq, hd) of one layer.

    Scores against every cache position, those `attention_mask` hides set to -inf, softmax,
    weighted sum of values: (T, H, hd) float64.
    """
    T, H, hd = q.shape
    KV, S, _ = k_cache.shape
    kv_of = np.arange(H) // (H // KV)
    k = k_cache.astype(np.float64)[kv_of]  # (H, S, hd)
    v = v_cache.astype(np.float64)[kv_of]
    scores = np.einsum("thd,hsd->ths", q.astype(np.float64), k) / np.sqrt(hd)
    visible = attention_mask(pos0, T, S, window, pattern)  # (T, S)
    scores = np.where(visible[:, None, :], scores, -np.inf)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("ths,hsd->thd", p, v)


# ----------------------------------------------------------------------------------------------
# kernels/act8.py
# ----------------------------------------------------------------------------------------------

def quantize_act8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x (T, n) -> (xq int64 (T, n), xd (T, n // 32), xs (T, n // 32), ratio (T, n)), float64.

    Per token and 32-element block b: xd = max |x[block]| / 127 as a float32, set to 0 when that
    is below the smallest normal float32; xq = round(x / xd) (0 where xd = 0); xs = xd * sum of the
    block's xq. ratio is the unrounded x / xd (0 where xd = 0), so a test can tell which elements
    sit near a rounding tie."""
    T, n = x.shape
    xb = x.astype(np.float64).reshape(T, n // R.QK, R.QK)
    xd = (np.abs(xb).max(axis=-1) / 127.0).astype(np.float32).astype(np.float64)
    xd[xd < np.finfo(np.float32).tiny] = 0.0
    safe = np.where(xd > 0, xd, 1.0)
    ratio = np.where(xd[..., None] > 0, xb / safe[..., None], 0.0)
    xq = np.rint(ratio).astype(np.int64)
    xs = xd * xq.sum(axis=-1)
    return xq.reshape(T, n), xd, xs, ratio.reshape(T, n)
