"""GPT-2 (HF GPT2LMHeadModel): arguments, weights and forward pass.

    x = wte[ids] + wpe[positions]
    for each layer:
        h = layernorm(x) ; q, k, v = h Wqkv + bqkv          (HF's fused c_attn)
        x += attention(q, K cache, V cache) Wo + bo
        h = layernorm(x) ; x += gelu_new(h W1 + b1) W2 + b2
    logits = layernorm(x) wte^T                               (the head is tied)

HF stores GPT-2's projections as Conv1D (in, out); the reader transposes them to (out, in) rows.
"""
from dataclasses import dataclass

import numpy as np

from fastinfer.kernels import attention as A
from fastinfer.kernels import linear as L
from fastinfer.kernels import ops
from fastinfer.kernels.jit import kernel
from fastinfer.weights.checkpoint import Checkpoint
from fastinfer.weights.tensors import QMatrix, check_matrix, check_vector, readonly, stack, to_f32

from . import KV_TYPES, Architecture, model_args
from .llama import lazy_zeros


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int
    vocab_size: int
    max_seq_len: int
    norm_eps: float = 1e-5
    arch: str = "gpt2"

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"n_embd ({self.dim}) must be a multiple of n_head ({self.n_heads})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads


@dataclass
class Weights:
    tok_embeddings: QMatrix       # (1, vocab, dim), also the output head
    pos_embeddings: np.ndarray    # (max_seq, dim)
    attention_norm: np.ndarray    # (L, dim) ln_1 weight
    attention_norm_bias: np.ndarray  # (L, dim) ln_1 bias
    wqkv: QMatrix                 # (L, 3 dim, dim)
    bqkv: np.ndarray              # (L, 3 dim)
    wo: QMatrix                   # (L, dim, dim)
    bo: np.ndarray                # (L, dim)
    ffn_norm: np.ndarray          # (L, dim) ln_2 weight
    ffn_norm_bias: np.ndarray     # (L, dim)
    w1: QMatrix                   # (L, hidden, dim) c_fc
    b1: np.ndarray                # (L, hidden)
    w2: QMatrix                   # (L, dim, hidden) mlp c_proj
    b2: np.ndarray                # (L, dim)
    norm: np.ndarray              # (dim,) ln_f weight
    norm_bias: np.ndarray         # (dim,)

    def args(self) -> tuple:
        ro = readonly
        return (self.tok_embeddings.args(), ro(self.pos_embeddings), ro(self.attention_norm),
                ro(self.attention_norm_bias), self.wqkv.args(), ro(self.bqkv), self.wo.args(), ro(self.bo),
                ro(self.ffn_norm), ro(self.ffn_norm_bias), self.w1.args(), ro(self.b1), self.w2.args(),
                ro(self.b2), ro(self.norm), ro(self.norm_bias))

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, (QMatrix, np.ndarray)))


def build(ckpt: Checkpoint, max_seq: int) -> tuple[ModelArgs, Weights]:
    """Stack a checkpoint's per-layer tensors (or take a converted checkpoint's stacks).

    max_seq is unused: GPT-2's positions are learned, all n_positions of them are kept."""
    args = model_args(ModelArgs, ckpt.config, ckpt.source, complete=ckpt.converted)
    t = ckpt.tensors
    n = args.n_layers

    def layer_stack(name):
        if name in t:
            return t[name]
        missing = [i for i in range(n) if f"layers.{i}.{name}" not in t]
        if missing:
            raise ValueError(f"{ckpt.source}: checkpoint lacks layers.{missing[0]}.{name}")
        got = [t[f"layers.{i}.{name}"] for i in range(n)]
        return stack(got) if isinstance(got[0], QMatrix) else np.stack(got).astype(np.float32)

    d, h = args.dim, args.hidden_dim
    shapes = {"wqkv": (3 * d, d), "wo": (d, d), "w1": (h, d), "w2": (d, h)}
    sizes = {"attention_norm": d, "attention_norm_bias": d, "bqkv": 3 * d, "bo": d, "ffn_norm": d,
             "ffn_norm_bias": d, "b1": h, "b2": d}
    parts = {}
    for name, shape in shapes.items():
        parts[name] = layer_stack(name)
        check_matrix(parts[name], name, (n, *shape), ckpt.source)
    for name, size in sizes.items():
        parts[name] = check_vector(layer_stack(name), name, (n, size), ckpt.source)
    for name in ("tok_embeddings", "pos_embeddings", "norm", "norm_bias"):
        if name not in t:
            raise ValueError(f"{ckpt.source}: checkpoint lacks {name}")
    emb, pos = t["tok_embeddings"], t["pos_embeddings"]
    check_matrix(emb, "token embeddings", (1, args.vocab_size, d), ckpt.source)
    if isinstance(pos, QMatrix):  # added per token: kept as f32
        check_matrix(pos, "position embeddings", (1, args.max_seq_len, d), ckpt.source)
        pos = to_f32(pos).f[0]
    pos = check_vector(pos, "position embeddings", (args.max_seq_len, d), ckpt.source)
    w = Weights(tok_embeddings=emb, pos_embeddings=pos, norm=check_vector(t["norm"], "the final norm", (d,), ckpt.source),
                norm_bias=check_vector(t["norm_bias"], "the final norm's bias", (d,), ckpt.source), **parts)
    return args, w


class State:
    """KV cache and scratch buffers for one sequence, allocated once."""

    def __init__(self, args: ModelArgs, max_seq: int, chunk: int, threads: int, *, kv_type: str):
        d, hd = args.dim, args.head_dim
        self.max_seq, self.chunk = max_seq, chunk
        self.k_cache = lazy_zeros((args.n_layers, args.n_heads, max_seq, hd), KV_TYPES[kv_type])
        self.v_cache = lazy_zeros(self.k_cache.shape, self.k_cache.dtype)
        self.x = np.zeros((chunk, d), np.float32)
        self.xb = np.zeros((chunk, d), np.float32)
        self.qkv = np.zeros((chunk, 3 * d), np.float32)
        self.q = np.zeros((chunk, d), np.float32)
        self.k = np.zeros((chunk, d), np.float32)
        self.v = np.zeros((chunk, d), np.float32)
        self.att = np.zeros((chunk, d), np.float32)
        self.hb = np.zeros((chunk, args.hidden_dim), np.float32)
        self.logits = np.zeros((chunk, args.vocab_size), np.float32)
        self.lin_scratch = np.zeros((threads, L.scratch_size(max(d, args.hidden_dim))), np.float32)
        self.att_scratch = np.zeros((threads, A.scratch_size(hd, 1)), np.float32)  # one tile per thread

    def args(self) -> tuple:
        return (self.k_cache, self.v_cache, self.x, self.xb, self.qkv, self.q, self.k, self.v, self.att,
                self.hb, self.logits, self.lin_scratch, self.att_scratch)


@kernel
def forward(ids, positions, starts, slots, pattern, all_logits, w, st, n_heads, eps):
    """Run tokens ids (T,) through every layer, filling the KV cache.

    Token t sits at position positions[t] of its sequence, is stored in cache slot slots[t], and
    attends to slots starts[t]..slots[t], thinned by the block pattern `pattern`: one sequence
    (starts all 0, slots == positions) or several sharing the cache in separate stretches (batched
    decoding)."""
    (emb, pos_emb, ln1, ln1_b, wqkv, bqkv, wo, bo, ln2, ln2_b, w1, b1, w2, b2, norm, norm_b) = w
    (k_cache, v_cache, x_all, xb_all, qkv_all, q_all, k_all, v_all, att_all, hb_all, logits,
     lin, att_scratch) = st
    T = ids.shape[0]
    hd = k_cache.shape[3]
    x, xb, qkv, hb = x_all[:T], xb_all[:T], qkv_all[:T], hb_all[:T]
    q, k, v, att = q_all[:T], k_all[:T], v_all[:T], att_all[:T]
    q3 = q.reshape((T, n_heads, hd))
    k3 = k.reshape((T, n_heads, hd))
    v3 = v.reshape((T, n_heads, hd))
    att3 = att.reshape((T, n_heads, hd))
    zero = np.int64(0)  # not a literal 0: Numba would compile linear again for it
    ops.embed(x, ids, emb)
    for t in range(T):
        x[t] += pos_emb[positions[t]]
    for l in range(ln1.shape[0]):
        ops.layernorm(xb, x, ln1[l], ln1_b[l], eps)
        L.linear(qkv, xb, wqkv, l, lin)
        ops.split_qkv(q, k, v, qkv, bqkv[l])
        ops.store_kv(k_cache, v_cache, k3, v3, l, slots)
        A.attention(att3, q3, k_cache, v_cache, l, starts, slots, zero, pattern, att_scratch)
        L.linear(xb, att, wo, l, lin)
        ops.add_bias_(xb, bo[l])
        ops.add_(x, xb)
        ops.layernorm(xb, x, ln2[l], ln2_b[l], eps)
        L.linear(hb, xb, w1, l, lin)
        ops.add_bias_(hb, b1[l])
        ops.gelu_new_(hb)
        L.linear(xb, hb, w2, l, lin)
        ops.add_bias_(xb, b2[l])
        ops.add_(x, xb)
    if all_logits:
        ops.layernorm(xb, x, norm, norm_b, eps)
        L.linear(logits[:T], xb, emb, zero, lin)
    else:
        ops.layernorm(xb[T - 1:], x[T - 1:], norm, norm_b, eps)
        L.linear(logits[:1], xb[T - 1:], emb, zero, lin)


def run(args: ModelArgs, w: tuple, st: tuple, ids: np.ndarray, positions: np.ndarray, starts: np.ndarray,
        slots: np.ndarray, pattern: tuple, all_logits: bool) -> None:
    """`forward` with the model's own sizes filled in; pattern as kernels/attention.py describes."""
    forward(ids, positions, starts, slots, pattern, all_logits, w, st, args.n_heads, float(args.norm_eps))



ARCH = Architecture(name="gpt2", ModelArgs=ModelArgs, build=build, State=State, run=run)
