"""Plain-NumPy reference implementation that the engine's tests compare against.

Written from the architecture definitions, independently of the engine (nothing here imports
`fastinfer`):

* `dequantize` / `quantize`: the ggml block formats F32, F16, Q8_0, Q4_0 and Q4_1, after ggml's
  reference (`*_ref`) routines.
* `llama_forward`: Hugging Face `LlamaForCausalLM` on HF-named weights (split-half RoPE,
  `rotate_half`), optionally with Qwen2-style q/k/v biases and llama3 rope scaling.
* `llama_forward_gguf`: the same network run in llama.cpp's conventions straight from a GGUF
  file: GGUF tensor names, Q/K rows in the converter's permuted order and interleaved
  (adjacent-pair) RoPE. It shares no code path with `llama_forward` beyond the small numeric
  helpers, so agreement between the two checks the permutation and the rope conventions.

Activations are computed in float64; the logits are returned as float32.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

QK = 32  # elements per block, for every block format here
BLOCK_BYTES = {"Q8_0": 2 + QK, "Q4_0": 2 + QK // 2, "Q4_1": 4 + QK // 2}
ELEMENT_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
GGML_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")  # what the writers here produce (BF16 is read too)


def row_bytes(ggml_type: str, n_cols: int) -> int:
    """Bytes one row of `n_cols` elements takes in `ggml_type`."""
    if ggml_type in ELEMENT_BYTES:
        return ELEMENT_BYTES[ggml_type] * n_cols
    if ggml_type not in BLOCK_BYTES:
        raise ValueError(f"unsupported ggml type {ggml_type!r}")
    if n_cols % QK:
        raise ValueError(f"{ggml_type} needs a multiple of {QK} columns, got {n_cols}")
    return BLOCK_BYTES[ggml_type] * (n_cols // QK)


# ----------------------------------------------------------------------------------------------
# ggml block formats
# ----------------------------------------------------------------------------------------------

def _fp16_at(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The little-endian fp16 stored at byte `offset` of each block, as float32 (..., 1)."""
    two = np.ascontiguousarray(blocks[..., offset:offset + 2])
    return two.view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 packed bytes per block -> 32 values: element j is the low nibble of byte j, element
    j + 16 the high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def dequantize(raw: np.ndarray, ggml_type: str, n_cols: int) -> np.ndarray:
    """Decode `raw` (uint8, shape (rows, row_bytes)) in `ggml_type` to float32 (rows, n_cols)."""
    raw = np.ascontiguousarray(raw)
    if raw.dtype != np.uint8:
        raw = raw.view(np.uint8)
    raw = raw.reshape(raw.shape[0] if raw.ndim > 1 else 1, -1)
    rows = raw.shape[0]
    if raw.shape[1] != row_bytes(ggml_type, n_cols):
        raise ValueError(f"{ggml_type} row of {n_cols} values is {row_bytes(ggml_type, n_cols)} "
                         f"bytes, got {raw.shape[1]}")
    if ggml_type == "F32":
        return raw.view("<f4").astype(np.float32)
    if ggml_type == "F16":
        return raw.view("<f2").astype(np.float32)
    if ggml_type == "BF16":  # the high half of a float32
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)

    blocks = raw.reshape(rows, n_cols // QK, BLOCK_BYTES[ggml_type])
    d = _fp16_at(blocks, 0)
    if ggml_type == "Q8_0":
        q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).astype(np.float32)
        x = q * d
    elif ggml_type == "Q4_0":
        q = _nibbles(blocks[..., 2:]).astype(np.float32) - np.float32(8)
        x = q * d
    else:  # Q4_1
        m = _fp16_at(blocks, 2)
        q = _nibbles(blocks[..., 4:]).astype(np.float32)
        x = q * d + m
    return x.reshape(rows, n_cols).astype(np.float32, copy=False)


def _recip_or_zero(d: np.ndarray) -> np.ndarray:
    """ggml's `id = d ? 1.0f/d : 0.0f`, in float32."""
    safe = np.where(d == 0, np.float32(1), d)
    return np.where(d == 0, np.float32(0), np.float32(1) / safe).astype(np.float32)


def _roundf(x: np.ndarray) -> np.ndarray:
    """C `roundf`: round half away from zero (exact: float32 + 0.5 is exact in float64)."""
    x = x.astype(np.float64)
    return np.trunc(x + np.copysign(0.5, x))


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    q = q.astype(np.uint8)
    return q[..., :QK // 2] | (q[..., QK // 2:] << 4)


def quantize(w: np.ndarray, ggml_type: str) -> np.ndarray:
    """Encode float32 `w` (rows, cols) as `ggml_type`; returns uint8 (rows, row_bytes).

    Follows ggml's quantize_row_{q8_0,q4_0,q4_1}_ref, computing in float32 as they do."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim == 1:
        w = w[None, :]
    rows, cols = w.shape
    if ggml_type == "F32":
        return np.ascontiguousarray(w.astype("<f4")).view(np.uint8).reshape(rows, -1)
    if ggml_type == "F16":
        return np.ascontiguousarray(w.astype("<f2")).view(np.uint8).reshape(rows, -1)
    row_bytes(ggml_type, cols)  # validates the type and the column count
    x = w.reshape(rows, cols // QK, QK)

    if ggml_type == "Q8_0":
        amax = np.abs(x).max(axis=-1, keepdims=True)
        d = (amax / np.float32(127)).astype(np.float32)
        q = _roundf(x * _recip_or_zero(d)).astype(np.int8).view(np.uint8)
        parts = [d, q]
    elif ggml_type == "Q4_0":
        # the value of largest magnitude, sign kept (the first one on ties)
        at = np.abs(x).argmax(axis=-1)[..., None]
        vmax = np.take_along_axis(x, at, axis=-1)
        d = (vmax / np.float32(-8)).astype(np.float32)
        q = np.trunc(x * _recip_or_zero(d) + np.float32(8.5))
        parts = [d, _pack_nibbles(np.clip(q, 0, 15))]
    elif ggml_type == "Q4_1":
        vmin = x.min(axis=-1, keepdims=True)
        vmax = x.max(axis=-1, keepdims=True)
        d = ((vmax - vmin) / np.float32(15)).astype(np.float32)
        q = np.trunc((x - vmin) * _recip_or_zero(d) + np.float32(0.5))
        parts = [d, vmin, _pack_nibbles(np.clip(q, 0, 15))]
    else:
        raise ValueError(f"unsupported ggml type {ggml_type!r}")

    out = []
    for p in parts:
        if p.dtype == np.float32:  # a per-block scale: stored as fp16
            p = np.ascontiguousarray(p.astype("<f2")).view(np.uint8)
        out.append(p)
    return np.concatenate(out, axis=-1).reshape(rows, -1)


# ----------------------------------------------------------------------------------------------
# shared numerics
# ----------------------------------------------------------------------------------------------

def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x * rsqrt(mean(x^2) + eps) * w, along the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, window: int = 0,
                     block_sparse: tuple | None = None) -> np.ndarray:
    """q (T, H, hd), k/v (T, KV, hd) -> (T, H * hd); query head h reads kv head h // (H / KV).

    window > 0: HF's sliding-window mask, query i sees key j only when i - j < window.
    block_sparse (block, global_blocks, local_blocks, stride): with blocks qb = i // block and
    kb = j // block, key j is kept only when kb < global_blocks, qb - kb <= local_blocks, or
    stride and (qb - kb) % stride == 0. An optional fifth entry, a boolean array (T,): the queries
    marked True keep every causal key (BlockSparse's dense_last)."""
    T, H, hd = q.shape
    rep = H // k.shape[1]
    k = np.repeat(k, rep, axis=1)
    v = np.repeat(v, rep, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    visible = (j <= i) & ((i - j < window) if window else True)
    if block_sparse is not None:
        block, n_global, n_local, stride = block_sparse[:4]
        dense = np.asarray(block_sparse[4])[:, None] if len(block_sparse) > 4 else False
        qb, kb = i // block, j // block
        visible = visible & ((kb < n_global) | (qb - kb <= n_local) | ((qb - kb) % stride == 0 if stride else False)
                             | dense)
    scores = np.where(visible, scores, -np.inf)
    out = np.einsum("hts,shd->thd", softmax(scores), v)
    return out.reshape(T, H * hd)


def _linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    y = x @ w.T.astype(np.float64)
    return y if b is None else y + b


# ----------------------------------------------------------------------------------------------
# Hugging Face LlamaForCausalLM
# ----------------------------------------------------------------------------------------------

def head_dim_of(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def hf_inv_freq(cfg: dict) -> np.ndarray:
    """LlamaRotaryEmbedding's inverse frequencies (head_dim / 2,), with llama3 scaling."""
    dim = head_dim_of(cfg)
    base = cfg.get("rope_theta", 10000.0)
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind != "llama3":
        raise NotImplementedError(f"rope_scaling type {kind!r}")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
    return np.where(medium, smoothed, scaled)


def rope_split_half(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """HF `apply_rotary_pos_emb`: x * cos + rotate_half(x) * sin; x is (T, heads, head_dim)."""
    ang = positions[:, None].astype(np.float64) * inv_freq[None, :]  # (T, hd/2)
    emb = np.concatenate([ang, ang], axis=-1)[:, None, :]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.cos(emb) + rotated * np.sin(emb)


def layer_window(cfg: dict, layer: int) -> int:
    """HF's sliding-window rule: Mistral windows every layer; Qwen2 only with use_sliding_window,
    from layer max_window_layers on (transformers' default layer_types); 0 = full attention."""
    window = cfg.get("sliding_window") or 0
    if cfg.get("model_type") == "mistral":
        return window
    if cfg.get("model_type") == "qwen2" and cfg.get("use_sliding_window"):
        return window if layer >= cfg.get("max_window_layers", 0) else 0
    return 0


def llama_forward(weights: dict[str, np.ndarray], cfg: dict, ids: list[int],
                  block_sparse: tuple | None = None, after_layer=None) -> np.ndarray:
    """Logits (T, vocab) float32 of HF LlamaForCausalLM for the token ids `ids` at positions
    0..T-1. `weights` are float32 arrays under HF names; `lm_head.weight` may be absent when the
    embeddings are tied. q/k/v `.bias` entries (Qwen2, attention_bias) are used when present, and
    per-head `self_attn.q_norm` / `k_norm` (Qwen3).
    block_sparse: the block mask of `causal_attention`, in every layer (not HF's: fastinfer's
    approximation, written here from its definition). after_layer(i, x) -> x, when given,
    rewrites the residual stream (T, dim) after layer i."""
    H, KV = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd, eps = head_dim_of(cfg), cfg["rms_norm_eps"]
    n_layers = cfg.get("num_hidden_layers")
    if n_layers is None:
        n_layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("model.layers."))
    ids = np.asarray(ids, dtype=np.int64)
    T = len(ids)
    positions = np.arange(T)
    inv_freq = hf_inv_freq(cfg)

    x = weights["model.embed_tokens.weight"][ids].astype(np.float64)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        h = rms_norm(x, weights[p + "input_layernorm.weight"], eps)
        a = p + "self_attn."
        q = _linear(h, weights[a + "q_proj.weight"], weights.get(a + "q_proj.bias"))
        k = _linear(h, weights[a + "k_proj.weight"], weights.get(a + "k_proj.bias"))
        v = _linear(h, weights[a + "v_proj.weight"], weights.get(a + "v_proj.bias"))
        q, k = q.reshape(T, H, hd), k.reshape(T, KV, hd)
        if a + "q_norm.weight" in weights:  # Qwen3: RMSNorm over each head before RoPE
            q = rms_norm(q, weights[a + "q_norm.weight"], eps)
            k = rms_norm(k, weights[a + "k_norm.weight"], eps)
        q = rope_split_half(q, positions, inv_freq)
        k = rope_split_half(k, positions, inv_freq)
        attn = causal_attention(q, k, v.reshape(T, KV, hd), layer_window(cfg, i), block_sparse)
        x = x + _linear(attn, weights[a + "o_proj.weight"], weights.get(a + "o_proj.bias"))

        h = rms_norm(x, weights[p + "post_attention_layernorm.weight"], eps)
        m = p + "mlp."
        gate = silu(_linear(h, weights[m + "gate_proj.weight"]))
        g = gate * _linear(h, weights[m + "up_proj.weight"])
        x = x + _linear(g, weights[m + "down_proj.weight"])
        if after_layer is not None:
            x = after_layer(i, x)

    x = rms_norm(x, weights["model.norm.weight"], eps)
    head = weights.get("lm_head.weight")
    if head is None or cfg.get("tie_word_embeddings", False):
        head = weights["model.embed_tokens.weight"]
    return _linear(x, head).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# GGUF, in llama.cpp's conventions
# ----------------------------------------------------------------------------------------------

_BIG_TOKENIZER_FIELDS = {f"tokenizer.ggml.{k}" for k in ("tokens", "merges", "token_type",
                                                          "scores")}


def read_gguf(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, tensors) of a GGUF file: metadata as plain Python values (token lists left
    out), tensors dequantized to float32 with `dequantize`, in numpy order (rows, cols)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {}
    for key in reader.fields:
        if key in _BIG_TOKENIZER_FIELDS:
            continue
        try:
            meta[key] = reader.fields[key].contents()
        except Exception:  # noqa: BLE001 (a field this reader cannot decode is not needed here)
            pass
    tensors = {}
    for t in reader.tensors:
        shape = [int(s) for s in t.shape]  # ggml order: [cols, rows, ...]
        n_cols = shape[0]
        n_rows = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        raw = np.asarray(t.data).view(np.uint8).reshape(n_rows, -1)
        tensors[t.name] = dequantize(raw, t.tensor_type.name, n_cols).reshape(shape[::-1])
    return meta, tensors


_GGUF_CACHE: OrderedDict = OrderedDict()
_GGUF_CACHE_SIZE = 2


def load_gguf(path) -> tuple[dict, dict[str, np.ndarray]]:
    """`read_gguf`, cached for the last few files (keyed by path, size and mtime)."""
    path = Path(path).resolve()
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _GGUF_CACHE:
        _GGUF_CACHE.move_to_end(key)
        return _GGUF_CACHE[key]
    value = read_gguf(path)
    _GGUF_CACHE[key] = value
    while len(_GGUF_CACHE) > _GGUF_CACHE_SIZE:
        _GGUF_CACHE.popitem(last=False)
    return value


def rope_interleaved(x: np.ndarray, positions: np.ndarray, n_rot: int, base: float,
                     freq_factors: np.ndarray | None = None) -> np.ndarray:
    """ggml's "normal" rope mode: dims (2i, 2i+1) are rotated by pos * base^(-2i/n_rot)
    (divided by freq_factors[i] when given); dims from n_rot on pass through. x: (T, heads, hd)."""
    theta = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    if freq_factors is not None:
        theta = theta / freq_factors
    ang = positions[:, None, None].astype(np.float64) * theta[None, None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    out = x.copy()
    x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
    out[..., 0:n_rot:2] = x0 * cos - x1 * sin
    out[..., 1:n_rot:2] = x0 * sin + x1 * cos
    return out


def llama_forward_gguf(path, ids: list[int]) -> np.ndarray:
    """Logits (T, vocab) float32 of a llama-architecture GGUF for `ids` at positions 0..T-1,
    run the way llama.cpp runs it (permuted Q/K rows, interleaved RoPE)."""
    meta, w = load_gguf(path)
    arch = meta.get("general.architecture", "llama")
    if arch != "llama":
        raise NotImplementedError(f"reference GGUF forward handles 'llama', not {arch!r}")

    def hp(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise KeyError(f"{arch}.{key}")
        return value

    n_embd = int(hp("embedding_length"))
    n_layers = int(hp("block_count"))
    H = int(hp("attention.head_count"))
    KV = int(hp("attention.head_count_kv", H))
    hd = int(hp("attention.key_length", n_embd // H))
    n_rot = int(hp("rope.dimension_count", hd))
    base = float(hp("rope.freq_base", 10000.0))
    eps = float(hp("attention.layer_norm_rms_epsilon"))
    freq_factors = w.get("rope_freqs.weight")

    ids = np.asarray(ids, dtype=np.int64)
    T = len(ids)
    positions = np.arange(T)
    x = w["token_embd.weight"][ids].astype(np.float64)
    for i in range(n_layers):
        b = f"blk.{i}."
        h = rms_norm(x, w[b + "attn_norm.weight"], eps)
        q = _linear(h, w[b + "attn_q.weight"], w.get(b + "attn_q.bias"))
        k = _linear(h, w[b + "attn_k.weight"], w.get(b + "attn_k.bias"))
        v = _linear(h, w[b + "attn_v.weight"], w.get(b + "attn_v.bias"))
        q = rope_interleaved(q.reshape(T, H, hd), positions, n_rot, base, freq_factors)
        k = rope_interleaved(k.reshape(T, KV, hd), positions, n_rot, base, freq_factors)
        attn = causal_attention(q, k, v.reshape(T, KV, hd))
        x = x + _linear(attn, w[b + "attn_output.weight"], w.get(b + "attn_output.bias"))

        h = rms_norm(x, w[b + "ffn_norm.weight"], eps)
        g = silu(_linear(h, w[b + "ffn_gate.weight"])) * _linear(h, w[b + "ffn_up.weight"])
        x = x + _linear(g, w[b + "ffn_down.weight"])

    x = rms_norm(x, w["output_norm.weight"], eps)
    head = w.get("output.weight", w["token_embd.weight"])
    return _linear(x, head).astype(np.float32)
