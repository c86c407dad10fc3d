"""Plain-NumPy Gemma 3 text decoder, written from the architecture's definition (Hugging Face
`Gemma3ForCausalLM`), independent of the engine (nothing here imports `fastinfer`).

    x = embed(ids) * sqrt(hidden_size)
    per layer: h = norm(x); q, k, v = h Wq, h Wk, h Wv; q, k = norm per head; RoPE (base
               rope_local_base_freq on sliding layers, rope_theta on full ones); attention scaled
               by query_pre_attn_scalar^-1/2, causal, the last sliding_window keys on sliding
               layers; x += norm(att Wo); x += norm(down(gelu_tanh(gate(norm(x))) * up(norm(x))))
    logits = norm(x) embed^T
    norm(v) = v / sqrt(mean(v^2) + eps) * (1 + w)

Activations in float64; HF-named weights (`model.layers.{i}.self_attn.q_proj.weight`, ...) as
float arrays (out, in).
"""
from __future__ import annotations

import math

import numpy as np


def _norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + w.astype(np.float64))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _rope(x: np.ndarray, positions: np.ndarray, theta: float, factor: float = 1.0) -> np.ndarray:
    """x (T, heads, hd), rotate-half pairs (i, i + hd/2)."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = np.outer(positions / factor, inv)[:, None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    a, b = x[..., :hd // 2], x[..., hd // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def layer_types(cfg: dict) -> list[str]:
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])
    every = cfg.get("sliding_window_pattern", 6)
    return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(cfg["num_hidden_layers"])]


def gemma3_forward(w: dict[str, np.ndarray], cfg: dict, ids: list[int]) -> np.ndarray:
    """Logits (T, vocab) float32 for ids, every position."""
    f = {k: np.asarray(v, np.float64) for k, v in w.items()}
    T = len(ids)
    H, KV, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg.get("rms_norm_eps", 1e-6)
    emb = f["model.embed_tokens.weight"]
    x = emb[ids] * float(np.float32(math.sqrt(cfg["hidden_size"])))
    pos = np.arange(T, dtype=np.float64)
    scale = cfg.get("query_pre_attn_scalar", hd) ** -0.5
    window = cfg.get("sliding_window", 4096)
    scaling = cfg.get("rope_scaling") or {}
    factor = scaling.get("factor", 1.0) if scaling.get("rope_type", scaling.get("type")) == "linear" else 1.0
    for i, kind in enumerate(layer_types(cfg)):
        p = f"model.layers.{i}."
        h = _norm(x, f[p + "input_layernorm.weight"], eps)
        q = (h @ f[p + "self_attn.q_proj.weight"].T).reshape(T, H, hd)
        k = (h @ f[p + "self_attn.k_proj.weight"].T).reshape(T, KV, hd)
        v = (h @ f[p + "self_attn.v_proj.weight"].T).reshape(T, KV, hd)
        q = _norm(q, f[p + "self_attn.q_norm.weight"], eps)
        k = _norm(k, f[p + "self_attn.k_norm.weight"], eps)
        local = kind == "sliding_attention"
        theta = cfg.get("rope_local_base_freq", 10000.0) if local else cfg.get("rope_theta", 1e6)
        q = _rope(q, pos, theta, 1.0 if local else factor)
        k = _rope(k, pos, theta, 1.0 if local else factor)
        att = np.zeros((T, H, hd))
        for hh in range(H):
            kv = hh // (H // KV)
            s = q[:, hh] @ k[:, kv].T * scale  # (T, T)
            qi, kj = np.arange(T)[:, None], np.arange(T)[None, :]
            visible = kj <= qi
            if local:
                visible &= qi - kj < window
            s = np.where(visible, s, -np.inf)
            s = np.exp(s - s.max(axis=1, keepdims=True))
            att[:, hh] = (s / s.sum(axis=1, keepdims=True)) @ v[:, kv]
        o = att.reshape(T, H * hd) @ f[p + "self_attn.o_proj.weight"].T
        x = x + _norm(o, f[p + "post_attention_layernorm.weight"], eps)
        h = _norm(x, f[p + "pre_feedforward_layernorm.weight"], eps)
        m = _gelu_tanh(h @ f[p + "mlp.gate_proj.weight"].T) * (h @ f[p + "mlp.up_proj.weight"].T)
        x = x + _norm(m @ f[p + "mlp.down_proj.weight"].T, f[p + "post_feedforward_layernorm.weight"], eps)
    head = f.get("lm_head.weight", emb)
    return (_norm(x, f["model.norm.weight"], eps) @ head.T).astype(np.float32)
