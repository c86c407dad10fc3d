"""FNet (HF FNetModel / FNetForMaskedLM): arguments, weights and forward pass.

    x = layernorm(word[ids] + type[0] + pos[t]) Wp + bp            (embeddings and projection)
    for each layer:
        x = layernorm(x + Re(FFT2(x)))                               (Fourier mixing over sequence and hidden)
        x = layernorm(x + act(x W1 + b1) W2 + b2)                    (post-norm feed-forward)
    hidden = x                                                       -> mean-pooled sentence embeddings
    logits = layernorm(act(x Wd + bd)) Wout + bout                   (masked-LM head, Wout tied to word)

An encoder: every token mixes with every other through the FFT, so a sequence runs in one call,
without a KV cache or sessions. Token types are all 0 (HF's default without token_type_ids).
"""
from dataclasses import dataclass

import numpy as np

from fastinfer.kernels import fft
from fastinfer.kernels import linear as L
from fastinfer.kernels import ops
from fastinfer.kernels.jit import kernel
from fastinfer.weights.checkpoint import Checkpoint
from fastinfer.weights.hf_fnet import ACTIVATIONS
from fastinfer.weights.tensors import QMatrix, check_matrix, check_vector, from_f32, readonly, stack, to_f32

from . import Architecture, model_args



@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    hidden_dim: int
    vocab_size: int
    max_seq_len: int
    type_vocab_size: int = 4
    norm_eps: float = 1e-12
    activation: str = "gelu_new"
    tied: bool = True
    has_head: bool = True   # False for a bare FNetModel: embeddings only
    arch: str = "fnet"

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unsupported FNet activation {self.activation!r}")


@dataclass
class Weights:
    tok_embeddings: QMatrix      # (1, vocab, dim)
    pos_embeddings: np.ndarray   # (max_seq, dim)
    type_embeddings: np.ndarray  # (type_vocab, dim)
    emb_norm: np.ndarray         # (dim,)
    emb_norm_bias: np.ndarray    # (dim,)
    emb_proj: QMatrix            # (1, dim, dim)
    emb_proj_bias: np.ndarray    # (dim,)
    mix_norm: np.ndarray         # (L, dim) after the Fourier mixing
    mix_norm_bias: np.ndarray    # (L, dim)
    w1: QMatrix                  # (L, hidden, dim)
    b1: np.ndarray               # (L, hidden)
    w2: QMatrix                  # (L, dim, hidden)
    b2: np.ndarray               # (L, dim)
    ffn_norm: np.ndarray         # (L, dim)
    ffn_norm_bias: np.ndarray    # (L, dim)
    head_dense: QMatrix          # (1, dim, dim); 0 rows without a head
    head_dense_bias: np.ndarray  # (dim,)
    head_norm: np.ndarray        # (dim,)
    head_norm_bias: np.ndarray   # (dim,)
    output: QMatrix              # (1, vocab, dim), the word table when tied
    output_bias: np.ndarray      # (vocab,)

    def args(self) -> tuple:
        ro = readonly
        return (self.tok_embeddings.args(), ro(self.pos_embeddings), ro(self.type_embeddings), ro(self.emb_norm),
                ro(self.emb_norm_bias), self.emb_proj.args(), ro(self.emb_proj_bias), ro(self.mix_norm),
                ro(self.mix_norm_bias), self.w1.args(), ro(self.b1), self.w2.args(), ro(self.b2), ro(self.ffn_norm),
                ro(self.ffn_norm_bias), self.head_dense.args(), ro(self.head_dense_bias), ro(self.head_norm),
                ro(self.head_norm_bias), self.output.args(), ro(self.output_bias))

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, (QMatrix, np.ndarray)))


_HEAD = ("head_dense", "head_dense_bias", "head_norm", "head_norm_bias")


def build(ckpt: Checkpoint, max_seq: int) -> tuple[ModelArgs, Weights]:
    """Stack an HF checkpoint's per-layer tensors (or take a converted checkpoint's stacks).

    max_seq is unused: positions are learned, all max_position_embeddings of them are kept."""
    cfg = dict(ckpt.config)
    t = ckpt.tensors
    cfg["has_head"] = cfg.get("has_head", all(k in t for k in _HEAD))
    args = model_args(ModelArgs, cfg, ckpt.source, complete=ckpt.converted)
    n, d, h = args.n_layers, args.dim, args.hidden_dim
    src = ckpt.source

    def vec(name, shape):
        if name not in t:
            raise ValueError(f"{src}: checkpoint lacks {name}")
        v = t[name]
        if isinstance(v, QMatrix):  # a table such as the position embeddings
            check_matrix(v, name, (1, *shape), src)
            v = to_f32(v).f[0]
        return check_vector(v, name, shape, src)

    def mat(name, shape, layers=1):
        m = t.get(name)
        if m is None:
            raise ValueError(f"{src}: checkpoint lacks {name}")
        check_matrix(m, name, (layers, *shape), src)
        return m

    def layer_stack(name, shape):
        if name in t:  # converted: stacked already
            return mat(name, shape, n) if len(shape) == 2 else vec(name, (n, *shape))
        missing = [i for i in range(n) if f"layers.{i}.{name}" not in t]
        if missing:
            raise ValueError(f"{src}: checkpoint lacks layers.{missing[0]}.{name}")
        got = [t[f"layers.{i}.{name}"] for i in range(n)]
        if len(shape) == 2:
            for i, g in enumerate(got):
                check_matrix(g, f"layers.{i}.{name}", (1, *shape), src)
            return stack(got)
        return np.stack([vec(f"layers.{i}.{name}", shape) for i in range(n)])

    parts = {"mix_norm": (d,), "mix_norm_bias": (d,), "w1": (h, d), "b1": (h,), "w2": (d, h), "b2": (d,),
             "ffn_norm": (d,), "ffn_norm_bias": (d,)}
    w = {k: layer_stack(k, s) for k, s in parts.items()}
    w["tok_embeddings"] = mat("tok_embeddings", (args.vocab_size, d))
    w["pos_embeddings"] = vec("pos_embeddings", (args.max_seq_len, d))
    w["type_embeddings"] = vec("type_embeddings", (args.type_vocab_size, d))
    for k in ("emb_norm", "emb_norm_bias", "emb_proj_bias"):
        w[k] = vec(k, (d,))
    w["emb_proj"] = mat("emb_proj", (d, d))
    if args.has_head:
        w["head_dense"] = mat("head_dense", (d, d))
        for k in ("head_dense_bias", "head_norm", "head_norm_bias"):
            w[k] = vec(k, (d,))
        # transformers 5: a stored decoder weight / bias wins over tying (see weights/hf_fnet.py)
        if "output" in t:
            w["output"] = mat("output", (args.vocab_size, d))
        elif args.tied:
            w["output"] = w["tok_embeddings"]
        else:
            raise ValueError(f"{src}: tie_word_embeddings is false but the checkpoint has no "
                             "cls.predictions.decoder.weight")
        w["output_bias"] = vec("output_bias" if "output_bias" in t else "head_bias", (args.vocab_size,))
    else:  # no masked-LM head: empty stand-ins keep one compiled signature
        w["head_dense"] = w["output"] = from_f32(np.zeros((0, d), np.float32))
        w["head_dense_bias"], w["head_norm"], w["head_norm_bias"] = (np.zeros(d, np.float32) for _ in range(3))
        w["output_bias"] = np.zeros(0, np.float32)
    return args, Weights(**w)


class State:
    """Buffers for one forward pass of T tokens (an encoder call allocates them per call)."""

    def __init__(self, args: ModelArgs, T: int, threads: int, head: bool):
        d = args.dim
        self.x = np.zeros((T, d), np.float32)
        self.hidden = np.zeros((T, d), np.float32)    # ends as the last hidden state
        self.hb = np.zeros((T, args.hidden_dim), np.float32)
        self.spec = np.zeros((T, d // 2 + 1), np.complex64)
        self.lin_scratch = np.zeros((threads, L.scratch_size(max(d, args.hidden_dim))), np.float32)
        self.logits = np.zeros((T if head else 0, args.vocab_size), np.float32)

    def args(self) -> tuple:
        return (self.x, self.hidden, self.hb, self.spec, self.lin_scratch, self.logits)


@kernel
def forward(ids, types, w, st, eps, act, nthreads, head):
    """Tokens ids (T,) with token types types (T,) at positions 0..T-1 -> st.hidden (T, dim), and
    st.logits (T, vocab) when head."""
    (emb, pos, typ, en, enb, proj, projb, mn, mnb, w1, b1, w2, b2, fn, fnb, hd, hdb, hn, hnb, out, outb) = w
    x, hid, hb, spec, lin, logits = st
    T, d = x.shape
    zero = np.int64(0)  # not a literal 0: Numba would compile linear again for it
    ops.embed(x, ids, emb)
    for t in range(T):
        for i in range(d):  # HF's order: (word + type) + position
            x[t, i] = (x[t, i] + typ[types[t], i]) + pos[t, i]
    ops.layernorm(x, x, en, enb, eps)
    L.linear(hid, x, proj, zero, lin)
    ops.add_bias_(hid, projb)
    for l in range(mn.shape[0]):
        fft.fourier_mix(x, hid, spec, nthreads)   # x = Re(FFT2(hidden))
        ops.add_(x, hid)
        ops.layernorm(hid, x, mn[l], mnb[l], eps)
        L.linear(hb, hid, w1, l, lin)
        ops.add_bias_(hb, b1[l])
        ops.activation_(hb, act)
        L.linear(x, hb, w2, l, lin)
        ops.add_bias_(x, b2[l])
        ops.add_(x, hid)
        ops.layernorm(hid, x, fn[l], fnb[l], eps)
    if head:
        L.linear(x, hid, hd, zero, lin)
        ops.add_bias_(x, hdb)
        ops.activation_(x, act)
        ops.layernorm(x, x, hn, hnb, eps)
        L.linear(logits, x, out, zero, lin)
        ops.add_bias_(logits, outb)


def run(args: ModelArgs, w: tuple, ids: np.ndarray, threads: int, head: bool) -> State:
    """One forward pass over ids (T,) int64; returns the State holding hidden and logits."""
    if head and not args.has_head:
        raise ValueError("this FNet checkpoint has no masked-LM head (cls.predictions.*): it gives "
                         "embeddings (Model.embed), not logits")
    st = State(args, len(ids), threads, head)
    types = np.zeros(len(ids), np.int64)
    forward(ids, types, w, st.args(), float(args.norm_eps), ACTIVATIONS[args.activation], threads, head)
    return st


# An encoder: the API offers forward / embed, not sessions or generation.
ARCH = Architecture(name="fnet", ModelArgs=ModelArgs, build=build, run=run, encoder=True)
