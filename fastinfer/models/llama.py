"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2): arguments, weights and forward pass.

    x = embed(ids)
    for each layer:
        h = rmsnorm(x) ; q, k, v = h [Wq Wk Wv] + [bq bk bv] ; [q, k = rmsnorm per head (Qwen3)] ; rope(q, k)
        x += attention(q, K cache, V cache) Wo
        h = rmsnorm(x) ; x += (silu(h W1) * (h W3)) W2
    logits = rmsnorm(x) Wout

`forward` is one compiled call over all layers, for one token (decode) or a chunk (prefill).
"""
import math
import mmap
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fastinfer.kernels import attention as A
from fastinfer.kernels import linear as L
from fastinfer.kernels import ops
from fastinfer.kernels import prune
from fastinfer.kernels import spectral as S
from fastinfer.kernels.jit import kernel
from fastinfer.weights.checkpoint import Checkpoint
from fastinfer.weights.tensors import QMatrix, check_matrix, check_vector, readonly, stack_joined

from . import KV_TYPES, Architecture, model_args

KV_RESIDUAL = True  # with act8, the K and V projections get a second 8-bit pass over their input's
# residual (docs/design.md, "8-bit activations": the Q rows gained nothing from it)


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_seq_len: int = 2048
    sliding_window: int = 0       # > 0: layers from window_from_layer on attend to this many keys
    window_from_layer: int = 0
    qk_norm: bool = False         # Qwen3: q and k RMS-normed per head before RoPE
    arch: str = "llama"

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")


@dataclass
class Weights:
    tok_embeddings: QMatrix     # (1, vocab, dim)
    attention_norm: np.ndarray  # (L, dim)
    wqkv: QMatrix               # (L, (n_heads + 2 n_kv_heads) * head_dim, dim): Wq, Wk, Wv rows joined
    bqkv: np.ndarray            # (L, (n_heads + 2 n_kv_heads) * head_dim), zeros without biases
    q_norm: np.ndarray          # (L, head_dim) with qk_norm, else (L, 0)
    k_norm: np.ndarray          # (L, head_dim) with qk_norm, else (L, 0)
    wo: QMatrix                 # (L, dim, n_heads * head_dim)
    ffn_norm: np.ndarray        # (L, dim)
    w13: QMatrix                # (L, 2 * hidden_dim, dim): gate (W1) rows, then up (W3) rows
    w2: QMatrix                 # (L, dim, hidden_dim) down
    norm: np.ndarray            # (dim,)
    output: QMatrix             # (1, vocab, dim), the embedding table when tied
    cos: np.ndarray             # (max_seq, head_dim // 2)
    sin: np.ndarray             # (max_seq, head_dim // 2)
    windows: np.ndarray         # (L,) int64 attention window per layer, 0 = full

    def args(self) -> tuple:
        """Everything `forward` reads, as one tuple of arrays and weight tuples."""
        ro = readonly
        return (self.tok_embeddings.args(), ro(self.attention_norm), self.wqkv.args(), ro(self.bqkv),
                ro(self.q_norm), ro(self.k_norm), self.wo.args(), ro(self.ffn_norm), self.w13.args(), self.w2.args(),
                ro(self.norm), self.output.args(), ro(self.cos), ro(self.sin), ro(self.windows))

    @property
    def nbytes(self) -> int:
        """Bytes held, each array once (a tied head is the embedding table)."""
        held = {id(v): v for v in vars(self).values() if isinstance(v, (QMatrix, np.ndarray))}
        return sum(v.nbytes for v in held.values())


def rope_tables(args: ModelArgs, max_seq: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (max_seq, head_dim // 2), computed in float32 the way HF does."""
    hd = args.head_dim
    inv_freq = (1.0 / (args.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
                ).astype(np.float32)
    pos = np.arange(max_seq, dtype=np.float32)
    sc = args.rope_scaling or {}
    kind = sc.get("rope_type")
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old = sc.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = np.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv_freq = np.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled).astype(np.float32)
    elif kind == "linear":
        pos = pos / np.float32(sc["factor"])
    if "freq_factors" in sc:  # GGUF's rope_freqs tensor carries llama3 scaling precomputed
        inv_freq = (inv_freq / np.asarray(sc["freq_factors"], np.float32)).astype(np.float32)
    ang = np.outer(pos, inv_freq).astype(np.float32)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def build(ckpt: Checkpoint, max_seq: int) -> tuple[ModelArgs, Weights]:
    """Stack a checkpoint's per-layer tensors into the arrays `forward` reads.

    Q, K and V projections become one matrix, as do gate and up: one pass over the input each,
    and fewer parallel regions per decoded token.
    """
    args = model_args(ModelArgs, ckpt.config, ckpt.source, complete=ckpt.converted)
    t = ckpt.tensors
    qd, kvd = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    if "wqkv" in t:  # a converted checkpoint holds the roles stacked and joined already
        need = ("wqkv", "wo", "w13", "w2", "bqkv", "attention_norm", "ffn_norm") + (("q_norm", "k_norm") if args.qk_norm else ())
        missing = [n for n in need if n not in t]
        if missing:
            raise ValueError(f"{ckpt.source}: checkpoint lacks {', '.join(missing)}")
        mats = {n: t[n] for n in ("wqkv", "wo", "w13", "w2")}
        vec = {n: t[n] for n in ("bqkv", "attention_norm", "ffn_norm", "q_norm", "k_norm") if n in t}
    else:  # GGUF and HF: one tensor per layer and role, "layers.3.wq"
        mats, vec = _stack_layers(ckpt, args, qd, kvd)
    known = {"tok_embeddings", "norm", "output", "rope_freqs", "wqkv", "wo", "w13", "w2", "bqkv", "attention_norm",
             "ffn_norm"} | ({"q_norm", "k_norm"} if args.qk_norm else set())
    unknown = sorted(k for k in t if k not in known and not k.startswith("layers."))
    if unknown:
        raise ValueError(f"{ckpt.source}: unexpected tensors {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}")
    if "tok_embeddings" not in t or "norm" not in t:
        raise ValueError(f"{ckpt.source}: checkpoint lacks {'tok_embeddings' if 'tok_embeddings' not in t else 'norm'}")
    emb = t["tok_embeddings"]
    out = t.get("output", emb)
    L_, d, h = args.n_layers, args.dim, args.hidden_dim
    src = ckpt.source
    for name, m, shape in (("wqkv", mats["wqkv"], (L_, qd + 2 * kvd, d)), ("wo", mats["wo"], (L_, d, qd)),
                           ("w13", mats["w13"], (L_, 2 * h, d)), ("w2", mats["w2"], (L_, d, h)),
                           ("token embeddings", emb, (1, args.vocab_size, d)),
                           ("the output matrix", out, (1, args.vocab_size, d))):  # a row per logit
        check_matrix(m, name, shape, src)
    hn = args.head_dim if args.qk_norm else 0
    vec = {name: check_vector(vec.get(name, np.zeros((L_, 0), np.float32)), name, shape, src) for name, shape in (
        ("bqkv", (L_, qd + 2 * kvd)), ("attention_norm", (L_, d)), ("ffn_norm", (L_, d)),
        ("q_norm", (L_, hn)), ("k_norm", (L_, hn)))}
    norm = check_vector(t["norm"], "the final norm", (d,), src)
    if "rope_freqs" in t:
        factors = check_vector(t["rope_freqs"], "rope_freqs", (args.head_dim // 2,), src)
        if (factors <= 0).any():
            raise ValueError(f"{src}: rope_freqs holds values that are not positive")
        args.rope_scaling = dict(args.rope_scaling or {}, freq_factors=factors)
    _check_rope_scaling(args.rope_scaling, src, args.head_dim // 2)
    cos, sin = rope_tables(args, max_seq)
    w = Weights(tok_embeddings=emb, norm=norm, output=out,
                cos=cos, sin=sin, windows=_windows(args), **mats, **vec)
    return args, w


def _check_rope_scaling(sc: dict | None, source: str, half: int) -> None:
    """RoPE scaling as rope_tables reads it: a known type and finite positive factors (and
    freq_factors, one per rotated pair)."""
    if not sc:
        return
    if isinstance(sc, dict) and "freq_factors" in sc:
        try:
            f = np.asarray(sc["freq_factors"], np.float64)
        except (TypeError, ValueError):
            f = np.zeros(0)
        if f.shape != (half,) or not np.isfinite(f).all() or (f <= 0).any():
            raise ValueError(f"{source}: RoPE freq_factors must be {half} finite positive numbers")
    if not isinstance(sc, dict) or sc.get("rope_type") not in (None, "default", "llama3", "linear"):
        raise ValueError(f"{source}: unsupported RoPE scaling {sc!r:.80}")
    need = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "linear": ("factor",)}.get(sc.get("rope_type"), ())
    for key in need:
        v = sc.get(key, {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}.get(key))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{source}: RoPE scaling {key} = {v!r:.40}; expected a finite positive number")
    if sc.get("rope_type") == "llama3" and sc.get("low_freq_factor", 1.0) >= sc.get("high_freq_factor", 4.0):
        raise ValueError(f"{source}: RoPE scaling low_freq_factor must be below high_freq_factor")


def matmul_kinds(w: Weights) -> list[int]:
    """The formats of the matmuls' weights (which matmul paths the graph compiles, kernels/linear.py)."""
    return [m.kind for m in (w.wqkv, w.wo, w.w13, w.w2, w.output)]


def _windows(args: ModelArgs) -> np.ndarray:
    """Per-layer attention window (0 = full), int64 (n_layers,)."""
    w = np.zeros(args.n_layers, np.int64)
    w[args.window_from_layer:] = args.sliding_window
    return w


def _stack_layers(ckpt: Checkpoint, args: ModelArgs, qd: int, kvd: int) -> tuple[dict, dict]:
    t = ckpt.tensors
    names = ("attention_norm", "ffn_norm", "wq", "wk", "wv", "wo", "w1", "w2", "w3") + (
        ("q_norm", "k_norm") if args.qk_norm else ())
    missing = [n for n in ("tok_embeddings", "norm") if n not in t]
    missing += [f"layers.{i}.{n}" for i in range(args.n_layers) for n in names if f"layers.{i}.{n}" not in t]
    if missing:
        raise ValueError(f"{ckpt.source}: checkpoint lacks tensors: {', '.join(missing[:6])}"
                         f"{' ...' if len(missing) > 6 else ''}")
    expect = {"wq": (qd, args.dim), "wk": (kvd, args.dim), "wv": (kvd, args.dim), "wo": (args.dim, qd),
              "w1": (args.hidden_dim, args.dim), "w2": (args.dim, args.hidden_dim),
              "w3": (args.hidden_dim, args.dim)}
    sizes = {"attention_norm": args.dim, "ffn_norm": args.dim, "bq": qd, "bk": kvd, "bv": kvd,
             "q_norm": args.head_dim, "k_norm": args.head_dim}
    for i in range(args.n_layers):
        for name, shape in expect.items():
            check_matrix(t[f"layers.{i}.{name}"], f"layers.{i}.{name}", (1, *shape), ckpt.source)
        for name, size in sizes.items():
            if f"layers.{i}.{name}" in t:
                t[f"layers.{i}.{name}"] = check_vector(t[f"layers.{i}.{name}"], f"layers.{i}.{name}", (size,), ckpt.source)

    def joined(*names):
        """The roles' per-layer matrices, popped: stack_joined frees each layer once copied."""
        return stack_joined([[t.pop(f"layers.{i}.{n}") for n in names] for i in range(args.n_layers)])

    def vectors(name, size):
        got = [t.get(f"layers.{i}.{name}") for i in range(args.n_layers)]
        return np.stack([np.zeros(size, np.float32) if g is None else g for g in got]).astype(np.float32)

    mats = {"wqkv": joined("wq", "wk", "wv"), "wo": joined("wo"), "w13": joined("w1", "w3"), "w2": joined("w2")}
    vec = {"bqkv": np.concatenate([vectors("bq", qd), vectors("bk", kvd), vectors("bv", kvd)], axis=1),
           "attention_norm": vectors("attention_norm", args.dim), "ffn_norm": vectors("ffn_norm", args.dim)}
    if args.qk_norm:
        vec.update(q_norm=vectors("q_norm", args.head_dim), k_norm=vectors("k_norm", args.head_dim))
    return mats, vec


def lazy_zeros(shape: tuple, dtype=np.float32) -> np.ndarray:
    """Zeroed memory (f32 unless told) that the OS fills in page by page as it is written.

    numpy asks for transparent huge pages on big arrays, so the first write to each
    (layer, head) slab of the cache would fault in 2 MB at once and a short sequence would pay for
    the whole context. An anonymous mapping of our own uses normal pages: memory grows with use.
    """
    n, dtype = int(np.prod(shape)), np.dtype(dtype)
    buf = mmap.mmap(-1, max(n * dtype.itemsize, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buf, dtype, count=n).reshape(shape)  # the array keeps buf alive


class State:
    """Everything one sequence needs at run time, allocated once: KV cache and scratch buffers."""

    def __init__(self, args: ModelArgs, max_seq: int, chunk: int, threads: int, ring: int = 0,
                 act8: bool = False, float_path: bool = True, row_loops: bool = True, *, kv_type: str):
        qd, kvd = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.max_seq, self.chunk = max_seq, chunk
        # Mapped lazily, so a long context costs memory only as it fills.
        self.k_cache = lazy_zeros((args.n_layers, args.n_kv_heads, max_seq, args.head_dim), KV_TYPES[kv_type])
        self.v_cache = lazy_zeros(self.k_cache.shape, self.k_cache.dtype)
        self.x = np.zeros((chunk, args.dim), np.float32)          # residual stream
        self.xb = np.zeros((chunk, args.dim), np.float32)         # normed input / branch output
        self.qkv = np.zeros((chunk, qd + 2 * kvd), np.float32)  # joined projection output
        self.q = np.zeros((chunk, qd), np.float32)
        self.k = np.zeros((chunk, kvd), np.float32)
        self.v = np.zeros((chunk, kvd), np.float32)
        self.att = np.zeros((chunk, qd), np.float32)              # attention output per head
        self.h13 = np.zeros((chunk, 2 * args.hidden_dim), np.float32)  # [gate | up]
        self.hb = np.zeros((chunk, args.hidden_dim), np.float32)  # silu(gate) * up
        # (chunk, vocab) is 50 MB at a 256-token chunk, of which decoding writes one row: numpy's
        # huge pages would make that row cost 2 MB
        self.logits = lazy_zeros((chunk, args.vocab_size))
        widest = max(args.dim, qd, args.hidden_dim)  # the widest input a matmul reads
        self.lin_scratch = np.zeros((threads, L.scratch_size(widest)), np.float32)
        # 8-bit activations (act8): each matmul's input quantized in 32-blocks, (chunk, widest) at most
        self.act = L.act_buffers(chunk, widest, qd + 2 * kvd, act8, row_loops)
        # None: every matrix is 8/4-bit blocks and runs on integers, so the float matmul path is
        # left out of the compiled graph (kernels/linear.py linear_act)
        self.floats = None if act8 and not float_path else True
        group = args.n_heads // args.n_kv_heads
        self.att_scratch = np.zeros((threads, A.scratch_size(args.head_dim, group)), np.float32)  # one tile each
        # Pruning and eviction (fastinfer/prune.py): layer l holds drop[l] fewer rows than a dense
        # cache, so its token t goes to row slots[t] - drop[l] (layer_slots). The ring keeps the
        # last `ring` queries of every layer for the attention-mass score; 0 = off.
        self.drop = np.zeros(args.n_layers, np.int64)
        self.layer_slots = np.zeros(chunk, np.int64)
        self.q_ring = np.zeros((args.n_layers, ring, args.n_heads, args.head_dim), np.float32)
        self.ring_pos = np.full((args.n_layers, ring), -1, np.int64)

    def args(self) -> tuple:
        return (self.k_cache, self.v_cache, self.x, self.xb, self.qkv, self.q, self.k, self.v, self.att,
                self.h13, self.hb, self.logits, (self.lin_scratch, *self.act), self.att_scratch, self.drop, self.layer_slots,
                self.q_ring, self.ring_pos, self.floats)


@kernel
def forward(ids, positions, starts, slots, pattern, all_logits, w, st, n_heads, n_kv_heads, eps, l0, l1, research):
    """Run tokens ids (T,) through layers l0..l1-1, filling the KV cache.

    Token t sits at position positions[t] of its sequence, is stored in cache slot slots[t], and
    attends to slots starts[t]..slots[t], thinned by the block pattern `pattern`: one sequence
    (starts all 0, slots == positions) or several sharing the cache in separate stretches (batched
    decoding).

    Writes logits for every position (all_logits) or only the last one into st.logits[:T or 1].
    Pruned prefill runs a layer range: l0 > 0 starts from the residual stream already in st.x[:T],
    l1 < n_layers stops there (no logits), leaving it in st.x[:T].
    research: None for the plain model (the default: a compile-time constant, so the hooks below
    are not in its compiled code), or the spectral filter's arguments (see spectral_args; keep
    counts that filter nothing when only pruning is on) for the variant with the research hooks:
    pruned or evicted cache rows (a token goes to row slots[t] - drop[l] of layer l), the ring of
    recent queries that scores attention mass, and the spectral filter after each layer.
    """
    emb, attention_norm, wqkv, bqkv, q_norm, k_norm, wo, ffn_norm, w13, w2, norm, output, cos, sin, windows = w
    (k_cache, v_cache, x_all, xb_all, qkv_all, q_all, k_all, v_all, att_all, h13_all, hb_all, logits,
     lin, att_scratch, drop, layer_slots, q_ring, ring_pos, floats) = st
    T = ids.shape[0]
    hd = k_cache.shape[3]
    x, xb, qkv, h13, hb = x_all[:T], xb_all[:T], qkv_all[:T], h13_all[:T], hb_all[:T]
    q, k, v, att = q_all[:T], k_all[:T], v_all[:T], att_all[:T]
    q3 = q.reshape((T, n_heads, hd))
    k3 = k.reshape((T, n_kv_heads, hd))
    v3 = v.reshape((T, n_kv_heads, hd))
    att3 = att.reshape((T, n_heads, hd))
    sl = layer_slots[:T]
    # Constants passed to kernels as int64 values, not literals: Numba compiles a callee once per
    # literal argument, and the first run would compile the matmuls three times over.
    zero, kv_rows = np.int64(0), np.int64(2 * n_kv_heads * hd if KV_RESIDUAL else 0)
    if l0 == 0:
        ops.embed(x, ids, emb)
    for l in range(l0, l1):
        ops.rmsnorm(xb, x, attention_norm[l], eps)
        L.linear_act(qkv, xb, wqkv, l, lin, kv_rows, floats)
        ops.split_qkv(q, k, v, qkv, bqkv[l])
        if q_norm.shape[1] > 0:  # Qwen3
            ops.heads_rmsnorm_(q, q_norm[l], eps, n_heads)
            ops.heads_rmsnorm_(k, k_norm[l], eps, n_kv_heads)
        ops.rope(q3, cos, sin, positions)
        ops.rope(k3, cos, sin, positions)
        if research is None:
            ops.store_kv(k_cache, v_cache, k3, v3, l, slots)
            A.attention(att3, q3, k_cache, v_cache, l, starts, slots, windows[l], pattern, att_scratch)
        else:
            for t in range(T):
                sl[t] = slots[t] - drop[l]
            prune.store_queries(q_ring, ring_pos, q3, l, positions)
            ops.store_kv(k_cache, v_cache, k3, v3, l, sl)
            A.attention(att3, q3, k_cache, v_cache, l, starts, sl, windows[l], pattern, att_scratch)
        L.linear_act(xb, att, wo, l, lin, zero, floats)
        ops.add_(x, xb)
        ops.rmsnorm(xb, x, ffn_norm[l], eps)
        L.linear_act(h13, xb, w13, l, lin, zero, floats)
        ops.swiglu(hb, h13)
        L.linear_act(xb, hb, w2, l, lin, zero, floats)
        ops.add_(x, xb)
        if research is not None:
            S.spectral_filter_(x, research[0][l], research[1], research[2], research[3])
    if l1 < attention_norm.shape[0]:
        return
    if all_logits:
        ops.rmsnorm(xb, x, norm, eps)
        L.linear_act(logits[:T], xb, output, zero, lin, zero, floats)
    else:
        ops.rmsnorm(xb[T - 1:], x[T - 1:], norm, eps)
        L.linear_act(logits[:1], xb[T - 1:], output, zero, lin, zero, floats)


def run(args: ModelArgs, w: tuple, st: tuple, ids: np.ndarray, positions: np.ndarray, starts: np.ndarray,
        slots: np.ndarray, pattern: tuple, all_logits: bool, l0: int = 0, l1: int | None = None,
        spectral: tuple | None = None, pruned: bool = False) -> None:
    """`forward` with the model's own sizes filled in: pattern as kernels/attention.py describes,
    layers l0..l1-1 (default all), spectral as `spectral_args` builds it (default off); pruned:
    the cache rows are pruned or evicted (fastinfer/prune.py). Either runs the compiled variant
    with the research hooks; the default runs the plain model."""
    l1 = args.n_layers if l1 is None else l1
    research = spectral if spectral is not None else _spectral_off(args.n_layers, args.dim) if pruned else None
    forward(ids, positions, starts, slots, pattern, all_logits, w, st, args.n_heads, args.n_kv_heads,
            float(args.norm_eps), l0, l1, research)


# -- the spectral filter (an opt-in experiment: it costs time and saves nothing) ------------------
# After each chosen layer, every token's hidden state is transformed along the embedding dimension,
# all but its `keep` strongest frequencies are zeroed, and it is transformed back.

def spectral_args(args: ModelArgs, keep: float, layers=None) -> tuple:
    """The `spectral` argument of forward: (keep count per layer (L,) int64, DFT tables
    f64 (2, dim // 2 + 1, dim), spectrum and magnitude scratch f64 (2, dim // 2 + 1) each).

    keep: fraction of the dim // 2 + 1 real-DFT bins kept, in (0, 1]; layers: layer indices to
    filter after (default: all).
    """
    h = args.dim // 2 + 1
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise ValueError(f"spectral_keep must be a fraction in (0, 1]; got {keep!r}")
    chosen = range(args.n_layers) if layers is None else list(layers)
    bad = [i for i in chosen if not isinstance(i, (int, np.integer)) or not 0 <= i < args.n_layers]
    if bad:
        raise ValueError(f"spectral_layers must be layer indices 0..{args.n_layers - 1}; got {bad[0]!r}")
    counts = np.full(args.n_layers, h, np.int64)  # h = keep every bin: the filter does nothing
    counts[list(chosen)] = max(1, int(round(keep * h)))
    return counts, S.dft_tables(args.dim), np.zeros((2, h)), np.zeros((2, h))


@lru_cache(maxsize=8)
def _spectral_off(n_layers: int, dim: int) -> tuple:
    """The filter switched off, built once per shape so decoding allocates nothing."""
    h = dim // 2 + 1
    return np.full(n_layers, h, np.int64), np.zeros((2, 0, 0)), np.zeros((2, h)), np.zeros((2, h))


ARCH = Architecture(name="llama", ModelArgs=ModelArgs, build=build, State=State, run=run, act8=True, research=True,
                    spectral_args=spectral_args, matmul_kinds=matmul_kinds, derived=("cos", "sin", "windows"))
