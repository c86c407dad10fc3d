"""Tiny random FNet checkpoints in HF's layout, and a plain-NumPy FNetForMaskedLM forward pass.

Written from transformers' modeling_fnet.py (the definition), not from fastinfer's code: float64
throughout, the token mixing as numpy.fft.fftn over (sequence, hidden). Nothing here imports
`fastinfer`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

# hidden 24 is not a power of two (FFT length 2^3 * 3); vocab 150 odd-sized; 3 token types.
FNET_TINY_CFG = {
    "model_type": "fnet", "architectures": ["FNetForMaskedLM"], "vocab_size": 150, "hidden_size": 24,
    "num_hidden_layers": 2, "intermediate_size": 40, "hidden_act": "gelu_new", "hidden_dropout_prob": 0.1,
    "max_position_embeddings": 64, "type_vocab_size": 3, "initializer_range": 0.02, "layer_norm_eps": 1e-12,
    "use_tpu_fourier_optimizations": False, "tpu_short_seq_length": 512, "pad_token_id": 3, "bos_token_id": 1,
    "eos_token_id": 2, "tie_word_embeddings": True,
}


def random_fnet_weights(cfg: dict, seed: int = 0, prefix: str = "fnet.", head: bool = True,
                        extras: bool = False) -> dict[str, np.ndarray]:
    """HF FNetForMaskedLM state dict (float32), every tensor random (norm weights around 1).

    head=False gives a bare FNetModel (with its pooler). extras adds what other exports carry:
    the position_ids buffer and FNetForPreTraining's next-sentence head.
    """
    rng = np.random.default_rng(seed)
    d, h, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]

    def r(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    p = prefix
    w = {
        f"{p}embeddings.word_embeddings.weight": r(v, d, scale=1.0),
        f"{p}embeddings.position_embeddings.weight": r(cfg["max_position_embeddings"], d, scale=0.5),
        f"{p}embeddings.token_type_embeddings.weight": r(cfg["type_vocab_size"], d, scale=0.5),
        f"{p}embeddings.LayerNorm.weight": norm(d), f"{p}embeddings.LayerNorm.bias": r(d, scale=0.1),
        f"{p}embeddings.projection.weight": r(d, d), f"{p}embeddings.projection.bias": r(d, scale=0.1),
        f"{p}pooler.dense.weight": r(d, d), f"{p}pooler.dense.bias": r(d),
    }
    for i in range(cfg["num_hidden_layers"]):
        q = f"{p}encoder.layer.{i}."
        w.update({
            q + "fourier.output.LayerNorm.weight": norm(d), q + "fourier.output.LayerNorm.bias": r(d, scale=0.1),
            q + "intermediate.dense.weight": r(h, d), q + "intermediate.dense.bias": r(h, scale=0.1),
            q + "output.dense.weight": r(d, h), q + "output.dense.bias": r(d, scale=0.1),
            q + "output.LayerNorm.weight": norm(d), q + "output.LayerNorm.bias": r(d, scale=0.1),
        })
    if head:
        w.update({
            "cls.predictions.transform.dense.weight": r(d, d), "cls.predictions.transform.dense.bias": r(d),
            "cls.predictions.transform.LayerNorm.weight": norm(d),
            "cls.predictions.transform.LayerNorm.bias": r(d, scale=0.1),
            "cls.predictions.bias": r(v),
        })
        if not cfg.get("tie_word_embeddings", True):
            w["cls.predictions.decoder.weight"] = r(v, d, scale=1.0)
            w["cls.predictions.decoder.bias"] = r(v)
    if extras:
        w[f"{p}embeddings.position_ids"] = np.arange(cfg["max_position_embeddings"], dtype=np.int64)[None]
        w["cls.seq_relationship.weight"] = r(2, d)
        w["cls.seq_relationship.bias"] = r(2)
    return w


def stored(w: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """The float32 values a checkpoint saved in dtype holds (what both engines read back)."""
    if dtype == "float32":
        return w
    out = {}
    for k, a in w.items():
        if a.dtype != np.float32:
            out[k] = a
        elif dtype == "float16":
            out[k] = a.astype(np.float16).astype(np.float32)
        else:  # bfloat16 by truncation, as _bf16_bits writes it
            out[k] = ((a.view(np.uint32) >> 16) << 16).astype(np.uint32).view(np.float32)
    return out


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _save_bf16(tensors: dict[str, np.ndarray], path: Path) -> None:
    """safetensors.numpy cannot write bfloat16: write the file by hand (8-byte header length, JSON, data)."""
    header, chunks, off = {}, [], 0
    for k, a in tensors.items():
        if a.dtype == np.float32:
            raw, dt = _bf16_bits(a).tobytes(), "BF16"
        else:
            raw, dt = np.ascontiguousarray(a).tobytes(), {np.dtype(np.int64): "I64"}[a.dtype]
        header[k] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        chunks.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(chunks))


def write_fnet_dir(d: Path, cfg: dict, w: dict[str, np.ndarray], tokenizer=None, dtype: str = "float32") -> Path:
    """An HF checkpoint directory: config.json, model.safetensors (dtype), tokenizer.json."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({**cfg, "torch_dtype": dtype}))
    if dtype == "bfloat16":
        _save_bf16(w, d / "model.safetensors")
    else:
        np_dt = {"float32": np.float32, "float16": np.float16}[dtype]
        save_file({k: (a.astype(np_dt) if a.dtype == np.float32 else a) for k, a in w.items()},
                  str(d / "model.safetensors"), metadata={"format": "pt"})
    (tokenizer or tiny_unigram_tokenizer(cfg["vocab_size"])).save(str(d / "tokenizer.json"))
    return d


WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "fourier", "transform", "mixing", "token", "s", "ing"]


def tiny_unigram_tokenizer(vocab_size: int):
    """An ALBERT/FNet-style tokenizer: Unigram pieces with '▁' word starts, [CLS] x [SEP]."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors

    special = ["<pad>", "[CLS]", "[SEP]", "<unk>", "[MASK]"]
    pieces = [(s, 0.0) for s in special]
    pieces += [("▁" + wd, -2.0 - i * 0.1) for i, wd in enumerate(WORDS)]
    pieces += [(wd, -6.0) for wd in WORDS]
    letters = "abcdefghijklmnopqrstuvwxyz.,!?"
    pieces += [(c, -10.0) for c in letters] + [("▁", -8.0)]
    pieces = pieces[:vocab_size]
    tok = tokenizers.Tokenizer(models.Unigram(pieces, unk_id=3, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="[CLS]:0 $A:0 [SEP]:0",
                                                      special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tok.add_special_tokens(special)
    return tok


# ----------------------------------------------------------------------------------------------
# the forward pass, from modeling_fnet.py
# ----------------------------------------------------------------------------------------------

def _act(x: np.ndarray, name: str) -> np.ndarray:
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate", "gelu_python_tanh"):
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    if name in ("gelu", "gelu_python"):
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    if name == "relu":
        return np.maximum(x, 0.0)
    if name in ("silu", "swish"):
        return x / (1.0 + np.exp(-x))
    if name == "quick_gelu":
        return x / (1.0 + np.exp(-1.702 * x))
    if name == "tanh":
        return np.tanh(x)
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if name == "linear":
        return x
    if name == "relu6":
        return np.clip(x, 0.0, 6.0)
    if name == "relu2":
        return np.maximum(x, 0.0) ** 2
    if name == "gelu_10":
        return np.clip(_act(x, "gelu"), -10.0, 10.0)
    if name == "mish":
        return x * np.tanh(np.log1p(np.exp(x)))
    if name == "leaky_relu":
        return np.where(x >= 0, x, 0.01 * x)
    if name == "hardswish":
        return x * np.clip(x + 3.0, 0.0, 6.0) / 6.0
    if name == "laplace":
        return 0.5 * (1.0 + np.vectorize(math.erf)((x - 0.707107) / (0.282095 * math.sqrt(2.0))))
    raise ValueError(name)


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def fnet_forward(w: dict[str, np.ndarray], cfg: dict, ids, head: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(last hidden state (T, hidden), masked-LM logits (T, vocab) or None), float64."""
    g = {k.removeprefix("fnet."): np.asarray(a, np.float64) for k, a in w.items() if a.dtype != np.int64}
    eps, act = cfg["layer_norm_eps"], cfg["hidden_act"]
    ids = np.asarray(ids)
    T = len(ids)
    x = g["embeddings.word_embeddings.weight"][ids] + g["embeddings.token_type_embeddings.weight"][0]
    x = x + g["embeddings.position_embeddings.weight"][:T]
    x = _ln(x, g["embeddings.LayerNorm.weight"], g["embeddings.LayerNorm.bias"], eps)
    x = x @ g["embeddings.projection.weight"].T + g["embeddings.projection.bias"]
    for i in range(cfg["num_hidden_layers"]):
        q = f"encoder.layer.{i}."
        mixed = np.fft.fftn(x, axes=(0, 1)).real
        x = _ln(x + mixed, g[q + "fourier.output.LayerNorm.weight"], g[q + "fourier.output.LayerNorm.bias"], eps)
        hmid = _act(x @ g[q + "intermediate.dense.weight"].T + g[q + "intermediate.dense.bias"], act)
        y = hmid @ g[q + "output.dense.weight"].T + g[q + "output.dense.bias"]
        x = _ln(y + x, g[q + "output.LayerNorm.weight"], g[q + "output.LayerNorm.bias"], eps)
    if not head:
        return x, None
    hh = _act(x @ g["cls.predictions.transform.dense.weight"].T + g["cls.predictions.transform.dense.bias"], act)
    hh = _ln(hh, g["cls.predictions.transform.LayerNorm.weight"], g["cls.predictions.transform.LayerNorm.bias"], eps)
    # transformers 5: stored decoder tensors are used as they are; else the head is tied
    dec = g.get("cls.predictions.decoder.weight", g["embeddings.word_embeddings.weight"])
    bias = g.get("cls.predictions.decoder.bias", g["cls.predictions.bias"])
    return x, hh @ dec.T + bias
