"""Gemma 3 text decoder (HF Gemma3ForCausalLM, model_type gemma3_text; GGUF architecture gemma3).

    x = embed(ids) * sqrt(dim)
    for each layer (local: sliding window, RoPE base 10k; every 6th global: full, RoPE base 1M):
        h = rmsnorm(x) ; q, k, v = h [Wq Wk Wv] ; q, k = rmsnorm per head ; rope(q, k)
        x += rmsnorm(attention(q * query_pre_attn_scalar^-1/2 sqrt(head_dim), K, V) Wo)
        h = rmsnorm(x) ; x += rmsnorm((gelu_tanh(h W1) * (h W3)) W2)
    logits = rmsnorm(x) Wout                                          (tied to the embedding)

Gemma's RMSNorm multiplies by (1 + w): the weights are stored here with the 1 added (HF folders
hold w; llama.cpp's GGUF files already hold 1 + w). Local layers see the last `sliding_window`
keys; the cache keeps only those of theirs resident (`State.trim`).

This file is the whole architecture: config and tensor names from HF and GGUF, build, State and
the compiled forward (the contract is fastinfer/models/__init__.py `Architecture`).
"""
import math
import mmap
from dataclasses import dataclass, field

import numpy as np

from fastinfer.kernels import attention as A
from fastinfer.kernels import linear as L
from fastinfer.kernels import ops
from fastinfer.kernels.jit import kernel
from fastinfer.weights.checkpoint import Checkpoint
from fastinfer.weights.tensors import QMatrix, check_matrix, check_vector, readonly, stack_joined

from . import KV_TYPES, Architecture, model_args
from .llama import _check_rope_scaling, lazy_zeros, rope_tables

KV_RESIDUAL = True  # with 8-bit activations, K and V get a second 8-bit pass over their input's residual
# ... and so does every matmul input of the first RESIDUAL_LAYERS layers. With one 8-bit pass
# elsewhere the defaults cost Gemma 3 270M +0.4% to +0.7% perplexity on the test novels, most of
# it from its first layers (whose norms scale channels up to 70x); the second pass there brings it
# to +0.1-0.2% for about 15% of prefill (decoding reads the weights once either way). Measured in
# docs/performance.md ("Gemma 3"): 4 layers did as well as 6, the later layers' passes bought nothing.
RESIDUAL_LAYERS = 4


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0      # global layers
    rope_local_theta: float = 10_000.0   # local (sliding-window) layers
    rope_scaling: dict | None = None     # global layers only (linear, as Gemma 3 4B and up)
    max_seq_len: int = 32768
    sliding_window: int = 512
    layer_types: list = field(default_factory=list)  # "sliding_attention" / "full_attention" per layer
    query_pre_attn_scalar: float = 256.0
    arch: str = "gemma3"

    def __post_init__(self):
        if not self.layer_types:  # every 6th layer global, as HF and llama.cpp default
            self.layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                for i in range(self.n_layers)]
        if (not isinstance(self.layer_types, list) or len(self.layer_types) != self.n_layers
                or any(t not in ("sliding_attention", "full_attention") for t in self.layer_types)):
            raise ValueError(f"layer_types must list 'sliding_attention' or 'full_attention' for each of "
                             f"{self.n_layers} layers")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("sliding_window", "query_pre_attn_scalar", "rope_local_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e12:
                raise ValueError(f"{name} = {v!r:.40}; expected a positive number")

    @property
    def windows(self) -> np.ndarray:
        """Per-layer attention window, int64 (n_layers,): 0 = full."""
        return np.array([self.sliding_window if t == "sliding_attention" else 0 for t in self.layer_types], np.int64)


# -- names and config from the two file formats ---------------------------------------------------
# canonical per-layer names; norms hold 1 + w
_NORMS = ("attention_norm", "q_norm", "k_norm", "post_attention_norm", "ffn_norm", "post_ffn_norm")
_MATS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")

HF_TYPES = ("gemma3_text",)
HF_LAYER_NAMES = {
    "input_layernorm.weight": "attention_norm", "post_attention_layernorm.weight": "post_attention_norm",
    "pre_feedforward_layernorm.weight": "ffn_norm", "post_feedforward_layernorm.weight": "post_ffn_norm",
    "self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm",
    "self_attn.q_proj.weight": "wq", "self_attn.k_proj.weight": "wk", "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo", "mlp.gate_proj.weight": "w1", "mlp.down_proj.weight": "w2",
    "mlp.up_proj.weight": "w3",
}
HF_GLOBAL_NAMES = {"model.embed_tokens.weight": "tok_embeddings", "model.norm.weight": "norm",
                   "lm_head.weight": "output"}

GGUF_ARCH = "gemma3"
GGUF_LAYER_NAMES = {
    "attn_norm": "attention_norm", "post_attention_norm": "post_attention_norm", "ffn_norm": "ffn_norm",
    "post_ffw_norm": "post_ffn_norm", "attn_q_norm": "q_norm", "attn_k_norm": "k_norm",
    "attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
    "ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3",
}
GGUF_GLOBAL_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
# (llama.cpp's converter stores every Gemma norm as 1 + w already: nothing to add for GGUF)


def _rope_of(params: dict, where: str, source: str) -> tuple[float | None, dict | None]:
    """(theta, scaling) from one of HF's rope_parameters entries."""
    if params is None:
        return None, None
    if not isinstance(params, dict):
        raise ValueError(f"{source}: rope_parameters[{where!r}] is not a mapping")
    kind = params.get("rope_type", "default")
    theta = params.get("rope_theta")
    if kind in ("default", None):
        return theta, None
    if kind == "linear":
        return theta, {"rope_type": "linear", "factor": params.get("factor")}
    raise ValueError(f"{source}: unsupported RoPE scaling {kind!r:.40} for Gemma 3")


def hf_config(cfg, raw: dict, source: str) -> dict:
    """config.json (a ConfigReader over it, and the dict) -> ModelArgs fields."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if raw.get(key) is not None:
            raise ValueError(f"{source}: {key} is set; fastinfer's Gemma 3 does not soft-cap logits")
    if raw.get("use_bidirectional_attention"):
        raise ValueError(f"{source}: bidirectional attention (an embedding model) is not supported")
    act = raw.get("hidden_activation", raw.get("hidden_act", "gelu_pytorch_tanh"))
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"{source}: hidden_activation {act!r:.40} is not supported (Gemma 3 uses gelu_pytorch_tanh)")
    theta, local, scaling = cfg.float("rope_theta", 1e6), cfg.float("rope_local_base_freq", 1e4), raw.get("rope_scaling")
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ValueError(f"{source}: rope_parameters is not a mapping")
        g_theta, scaling = _rope_of(params.get("full_attention"), "full_attention", source)
        l_theta, l_scaling = _rope_of(params.get("sliding_attention"), "sliding_attention", source)
        if l_scaling is not None:
            raise ValueError(f"{source}: RoPE scaling on the sliding-window layers is not supported")
        theta = theta if g_theta is None else g_theta
        local = local if l_theta is None else l_theta
    elif scaling is not None:
        if not isinstance(scaling, dict) or scaling.get("rope_type", scaling.get("type")) != "linear":
            raise ValueError(f"{source}: unsupported RoPE scaling {scaling!r:.80}")
        scaling = {"rope_type": "linear", "factor": scaling.get("factor")}
    n_heads = cfg.int("num_attention_heads", None)
    layer_types = raw.get("layer_types")
    n_layers = cfg.int("num_hidden_layers", None)
    if layer_types is None and raw.get("sliding_window_pattern") is not None:
        every = cfg.int("sliding_window_pattern")
        layer_types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n_layers or 0)]
    return {
        "arch": "gemma3",
        "dim": cfg.int("hidden_size", None),
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": cfg.int("num_key_value_heads", n_heads),
        "head_dim": cfg.int("head_dim", 256),
        "hidden_dim": cfg.int("intermediate_size", None),
        "vocab_size": cfg.int("vocab_size", None),
        "norm_eps": cfg.float("rms_norm_eps", 1e-6),
        "rope_theta": float(theta),
        "rope_local_theta": float(local),
        "rope_scaling": scaling,
        "max_seq_len": cfg.int("max_position_embeddings", 32768),
        "sliding_window": cfg.int("sliding_window", 4096),
        "layer_types": list(layer_types) if isinstance(layer_types, list) else [],
        "query_pre_attn_scalar": cfg.float("query_pre_attn_scalar", 256.0),
    }


def gguf_config(value, meta: dict, source: str) -> dict:
    """GGUF metadata (value(key, type, default) reads `gemma3.key`) -> ModelArgs fields. llama.cpp
    fixes what the file does not say: every 6th layer global, local RoPE base 10k, and
    query_pre_attn_scalar = head_dim (dim / heads for the 27B)."""
    dim, n_heads = value("embedding_length", int), value("attention.head_count", int)
    head_dim = value("attention.key_length", int, dim // max(n_heads, 1))
    n_layers = value("block_count", int)
    scaling = meta.get(f"{GGUF_ARCH}.rope.scaling.type")
    rope_scaling = None
    if scaling == "linear":
        rope_scaling = {"rope_type": "linear", "factor": value("rope.scaling.factor", float)}
    elif scaling not in (None, "none"):
        raise ValueError(f"{source}: unsupported RoPE scaling {scaling!r:.40}")
    return {
        "arch": "gemma3",
        "dim": dim,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": value("attention.head_count_kv", int, n_heads),
        "head_dim": head_dim,
        "hidden_dim": value("feed_forward_length", int),
        "vocab_size": value("vocab_size", int, 0) or len(meta.get("tokenizer.ggml.tokens") or []),
        "norm_eps": value("attention.layer_norm_rms_epsilon", float),
        "rope_theta": value("rope.freq_base", float, 1_000_000.0),
        "rope_local_theta": 10_000.0,
        "rope_scaling": rope_scaling,
        "max_seq_len": value("context_length", int),
        "sliding_window": value("attention.sliding_window", int, 512),
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)],
        "query_pre_attn_scalar": float(dim // max(n_heads, 1) if n_layers == 62 else head_dim),
    }


# -- weights ---------------------------------------------------------------------------------------
@dataclass
class Weights:
    tok_embeddings: QMatrix       # (1, vocab, dim)
    attention_norm: np.ndarray    # (L, dim)   1 + w, as every norm below
    wq: QMatrix                   # (L, n_heads * head_dim, dim)
    wk: QMatrix                   # (L, n_kv_heads * head_dim, dim)
    wv: QMatrix                   # (L, n_kv_heads * head_dim, dim)
    q_norm: np.ndarray            # (L, head_dim), times sqrt(head_dim / query_pre_attn_scalar)
    k_norm: np.ndarray            # (L, head_dim)
    wo: QMatrix                   # (L, dim, n_heads * head_dim)
    post_attention_norm: np.ndarray  # (L, dim)
    ffn_norm: np.ndarray          # (L, dim)
    w13: QMatrix                  # (L, 2 * hidden_dim, dim): gate (W1) rows, then up (W3) rows
    w2: QMatrix                   # (L, dim, hidden_dim)
    post_ffn_norm: np.ndarray     # (L, dim)
    norm: np.ndarray              # (dim,)
    output: QMatrix               # (1, vocab, dim): the embedding table when tied
    cos: np.ndarray               # (max_seq, head_dim // 2) global layers
    sin: np.ndarray
    cos_local: np.ndarray         # (max_seq, head_dim // 2) local layers
    sin_local: np.ndarray
    windows: np.ndarray           # (L,) int64: 0 global, sliding_window local
    residual: np.ndarray          # (L,) int64: 1 where every matmul input gets the 8-bit residual pass

    def args(self) -> tuple:
        ro = readonly
        return (self.tok_embeddings.args(), ro(self.attention_norm), self.wq.args(), self.wk.args(), self.wv.args(),
                ro(self.q_norm), ro(self.k_norm), self.wo.args(), ro(self.post_attention_norm), ro(self.ffn_norm),
                self.w13.args(), self.w2.args(), ro(self.post_ffn_norm), ro(self.norm), self.output.args(),
                ro(self.cos), ro(self.sin), ro(self.cos_local), ro(self.sin_local), ro(self.windows), ro(self.residual))

    @property
    def nbytes(self) -> int:
        held = {id(v): v for v in vars(self).values() if isinstance(v, (QMatrix, np.ndarray))}
        return sum(v.nbytes for v in held.values())


DERIVED = ("cos", "sin", "cos_local", "sin_local", "windows", "residual")  # rebuilt from the config at load


def build(ckpt: Checkpoint, max_seq: int) -> tuple[ModelArgs, Weights]:
    """Stack a checkpoint's per-layer tensors into the arrays `forward` reads. Norm weights arrive
    as 1 + w (the readers add HF's 1)."""
    args = model_args(ModelArgs, ckpt.config, ckpt.source, complete=ckpt.converted)
    t, src = ckpt.tensors, ckpt.source
    L_, d, h, hd = args.n_layers, args.dim, args.hidden_dim, args.head_dim
    qd, kvd = args.n_heads * hd, args.n_kv_heads * hd
    shapes = {"wq": (qd, d), "wk": (kvd, d), "wv": (kvd, d), "wo": (d, qd), "w1": (h, d), "w2": (d, h), "w3": (h, d)}
    sizes = {"attention_norm": d, "post_attention_norm": d, "ffn_norm": d, "post_ffn_norm": d, "q_norm": hd, "k_norm": hd}
    stacked = "w13" in t  # a converted checkpoint holds the roles stacked already
    if stacked:
        want = ["wq", "wk", "wv", "wo", "w13", "w2", *sizes]
        missing = [n for n in want if n not in t]
    else:
        missing = [f"layers.{i}.{n}" for i in range(L_) for n in (*shapes, *sizes) if f"layers.{i}.{n}" not in t]
    missing = [n for n in ("tok_embeddings", "norm") if n not in t] + missing
    if missing:
        raise ValueError(f"{src}: checkpoint lacks tensors: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    known = {"tok_embeddings", "norm", "output", "w13", *shapes, *sizes}
    unknown = sorted(k for k in t if k not in known and not k.startswith("layers."))
    if unknown:
        raise ValueError(f"{src}: unexpected tensors {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}")
    if stacked:
        mats = {n: t[n] for n in ("wq", "wk", "wv", "wo", "w13", "w2")}
        vec = {n: t[n] for n in sizes}
    else:
        for i in range(L_):
            for name, shape in shapes.items():
                check_matrix(t[f"layers.{i}.{name}"], f"layers.{i}.{name}", (1, *shape), src)
            for name, size in sizes.items():
                t[f"layers.{i}.{name}"] = check_vector(t[f"layers.{i}.{name}"], f"layers.{i}.{name}", (size,), src)

        def role(*names):  # stack_joined frees each layer once copied
            return stack_joined([[t.pop(f"layers.{i}.{n}") for n in names] for i in range(L_)])

        mats = {"wq": role("wq"), "wk": role("wk"), "wv": role("wv"), "wo": role("wo"), "w13": role("w1", "w3"),
                "w2": role("w2")}
        vec = {n: np.stack([t.pop(f"layers.{i}.{n}") for i in range(L_)]) for n in sizes}
        # the attention kernel scales by 1/sqrt(head_dim); Gemma by query_pre_attn_scalar^-1/2
        if args.query_pre_attn_scalar != hd:
            vec["q_norm"] = (vec["q_norm"] * np.float32(math.sqrt(hd / args.query_pre_attn_scalar))).astype(np.float32)
    emb = t["tok_embeddings"]
    out = t.get("output", emb)
    for name, m, shape in (("wq", mats["wq"], (L_, qd, d)), ("wk", mats["wk"], (L_, kvd, d)),
                           ("wv", mats["wv"], (L_, kvd, d)), ("wo", mats["wo"], (L_, d, qd)),
                           ("w13", mats["w13"], (L_, 2 * h, d)), ("w2", mats["w2"], (L_, d, h)),
                           ("token embeddings", emb, (1, args.vocab_size, d)),
                           ("the output matrix", out, (1, args.vocab_size, d))):
        check_matrix(m, name, shape, src)
    vec = {n: check_vector(vec[n], n, (L_, size), src) for n, size in sizes.items()}
    norm = check_vector(t["norm"], "the final norm", (d,), src)
    _check_rope_scaling(args.rope_scaling, src, hd // 2)
    cos, sin = rope_tables(_rope_args(args, args.rope_theta, args.rope_scaling), max_seq)
    cos_l, sin_l = rope_tables(_rope_args(args, args.rope_local_theta, None), max_seq)
    residual = (np.arange(L_) < RESIDUAL_LAYERS).astype(np.int64)
    w = Weights(tok_embeddings=emb, output=out, norm=norm, cos=cos, sin=sin, cos_local=cos_l, sin_local=sin_l,
                windows=args.windows, residual=residual, **mats, **vec)
    return args, w


def _rope_args(args: ModelArgs, theta: float, scaling: dict | None):
    from .llama import ModelArgs as RopeArgs
    return RopeArgs(dim=args.dim, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=args.head_dim, hidden_dim=1,
                    vocab_size=1, rope_theta=theta, rope_scaling=scaling)


def matmul_kinds(w: Weights) -> list[int]:
    """The formats of the matmuls' weights (which matmul paths the graph compiles, kernels/linear.py)."""
    return [m.kind for m in (w.wq, w.wk, w.wv, w.wo, w.w13, w.w2, w.output)]


# -- run-time state ----------------------------------------------------------------------------------
class State:
    """One or more sequences' KV cache and scratch, allocated once."""

    def __init__(self, args: ModelArgs, max_seq: int, chunk: int, threads: int, act8: bool = False,
                 float_path: bool = True, row_loops: bool = True, *, kv_type: str):
        hd, qd, kvd = args.head_dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.max_seq, self.chunk = max_seq, chunk
        self.k_cache = lazy_zeros((args.n_layers, args.n_kv_heads, max_seq, hd), KV_TYPES[kv_type])
        self.v_cache = lazy_zeros(self.k_cache.shape, self.k_cache.dtype)
        self.x = np.zeros((chunk, args.dim), np.float32)
        self.xb = np.zeros((chunk, args.dim), np.float32)
        self.q = np.zeros((chunk, qd), np.float32)
        self.k = np.zeros((chunk, kvd), np.float32)
        self.v = np.zeros((chunk, kvd), np.float32)
        self.att = np.zeros((chunk, qd), np.float32)
        self.h13 = np.zeros((chunk, 2 * args.hidden_dim), np.float32)
        self.hb = np.zeros((chunk, args.hidden_dim), np.float32)
        self.logits = lazy_zeros((chunk, args.vocab_size))
        widest = max(args.dim, qd, args.hidden_dim)
        self.lin_scratch = np.zeros((threads, L.scratch_size(widest)), np.float32)
        self.act = L.act_buffers(chunk, widest, max(kvd, qd, args.dim, 2 * args.hidden_dim), act8,
                                  row_loops)
        self.floats = None if act8 and not float_path else True
        group = args.n_heads // args.n_kv_heads
        self.att_scratch = np.zeros((threads, A.scratch_size(hd, group)), np.float32)
        self._local = [i for i, t in enumerate(args.layer_types) if t == "sliding_attention"]
        self._window = args.sliding_window
        self._released = {}  # (layer, stretch base) -> slots already given back

    def args(self) -> tuple:
        return (self.k_cache, self.v_cache, self.x, self.xb, self.q, self.k, self.v, self.att, self.h13, self.hb,
                self.logits, (self.lin_scratch, *self.act), self.att_scratch, self.floats)

    def trim(self, base: int, pos: int) -> None:
        """Give back the memory of local layers' cache slots that no query will read again: those
        of the stretch from slot `base` older than its position `pos` minus the window and one
        chunk, a thousand or more at a time. The slots keep their addresses (the OS supplies
        zeros if they are touched again), so memory at long contexts grows with the global
        layers only."""
        stop = pos - self._window - self.chunk
        done = self._released.get(base, 0)
        if stop - done < 1024:
            return
        for cache in (self.k_cache, self.v_cache):
            buf, (_, heads, slots, hd) = cache, cache.shape
            while isinstance(buf, np.ndarray):  # the anonymous mapping under lazy_zeros' array
                buf = buf.base
            buf = buf.obj if isinstance(buf, memoryview) else buf
            row = hd * cache.itemsize
            if not isinstance(buf, mmap.mmap):
                continue
            for l in self._local:
                for h in range(heads):
                    first = (l * heads + h) * slots + base
                    start = -(-(first + done) * row // mmap.PAGESIZE) * mmap.PAGESIZE
                    end = (first + stop) * row // mmap.PAGESIZE * mmap.PAGESIZE
                    if end > start:
                        buf.madvise(mmap.MADV_DONTNEED, start, end - start)
        self._released[base] = stop

    def reset(self, base: int) -> None:
        """The stretch from slot `base` starts over: its slots may be written again."""
        self._released.pop(base, None)


@kernel
def forward(ids, positions, starts, slots, pattern, all_logits, w, st, n_heads, n_kv_heads, eps, embed_scale):
    """Run tokens ids (T,) through every layer, filling the KV cache (see llama.forward for
    positions, starts, slots and pattern); logits for every position (all_logits) or the last."""
    (emb, attention_norm, wq, wk, wv, q_norm, k_norm, wo, post_attention_norm, ffn_norm, w13, w2, post_ffn_norm,
     norm, output, cos, sin, cos_local, sin_local, windows, residual) = w
    k_cache, v_cache, x_all, xb_all, q_all, k_all, v_all, att_all, h13_all, hb_all, logits, lin, att_scratch, floats = st
    T = ids.shape[0]
    hd = k_cache.shape[3]
    x, xb, h13, hb = x_all[:T], xb_all[:T], h13_all[:T], hb_all[:T]
    q, k, v, att = q_all[:T], k_all[:T], v_all[:T], att_all[:T]
    q3 = q.reshape((T, n_heads, hd))
    k3 = k.reshape((T, n_kv_heads, hd))
    v3 = v.reshape((T, n_kv_heads, hd))
    att3 = att.reshape((T, n_heads, hd))
    zero, kv_rows = np.int64(0), np.int64(n_kv_heads * hd if KV_RESIDUAL else 0)
    ops.embed(x, ids, emb)
    for t in range(T):
        for i in range(x.shape[1]):
            x[t, i] *= embed_scale
    for l in range(attention_norm.shape[0]):
        ops.rmsnorm(xb, x, attention_norm[l], eps)
        # res_rows: the rows given the residual pass (all of them, or none)
        L.linear_act(q, xb, wq, l, lin, np.int64(q.shape[1]) * residual[l], floats)
        L.linear_act(k, xb, wk, l, lin, kv_rows, floats)
        L.linear_act(v, xb, wv, l, lin, kv_rows, floats)
        ops.heads_rmsnorm_(q, q_norm[l], eps, n_heads)
        ops.heads_rmsnorm_(k, k_norm[l], eps, n_kv_heads)
        if windows[l] > 0:
            ops.rope(q3, cos_local, sin_local, positions)
            ops.rope(k3, cos_local, sin_local, positions)
        else:
            ops.rope(q3, cos, sin, positions)
            ops.rope(k3, cos, sin, positions)
        ops.store_kv(k_cache, v_cache, k3, v3, l, slots)
        A.attention(att3, q3, k_cache, v_cache, l, starts, slots, windows[l], pattern, att_scratch)
        L.linear_act(xb, att, wo, l, lin, np.int64(xb.shape[1]) * residual[l], floats)
        ops.rmsnorm(xb, xb, post_attention_norm[l], eps)
        ops.add_(x, xb)
        ops.rmsnorm(xb, x, ffn_norm[l], eps)
        L.linear_act(h13, xb, w13, l, lin, np.int64(h13.shape[1]) * residual[l], floats)
        ops.geglu(hb, h13)
        L.linear_act(xb, hb, w2, l, lin, np.int64(xb.shape[1]) * residual[l], floats)
        ops.rmsnorm(xb, xb, post_ffn_norm[l], eps)
        ops.add_(x, xb)
    if all_logits:
        ops.rmsnorm(xb, x, norm, eps)
        L.linear_act(logits[:T], xb, output, zero, lin, zero, floats)
    else:
        ops.rmsnorm(xb[T - 1:], x[T - 1:], norm, eps)
        L.linear_act(logits[:1], xb[T - 1:], output, zero, lin, zero, floats)


def run(args: ModelArgs, w: tuple, st: tuple, ids: np.ndarray, positions: np.ndarray, starts: np.ndarray,
        slots: np.ndarray, pattern: tuple, all_logits: bool) -> None:
    """`forward` with the model's own sizes filled in."""
    forward(ids, positions, starts, slots, pattern, all_logits, w, st, args.n_heads, args.n_kv_heads,
            float(args.norm_eps), np.float32(math.sqrt(args.dim)))


ARCH = Architecture(
    name="gemma3", ModelArgs=ModelArgs, build=build, State=State, run=run, act8=True,
    matmul_kinds=matmul_kinds, derived=DERIVED, trims_cache=True,
    hf_types=HF_TYPES, hf_config=hf_config, hf_layer_names=HF_LAYER_NAMES, hf_global_names=HF_GLOBAL_NAMES,
    hf_norms=(*_NORMS, "norm"), gguf_arch=GGUF_ARCH, gguf_config=gguf_config, gguf_layer_names=GGUF_LAYER_NAMES,
    gguf_global_names=GGUF_GLOBAL_NAMES)
