"""Independent NumPy reference for HF GPT-2 (GPT2LMHeadModel) checkpoints.

Test-side only: deliberately does NOT import ``fastinfer``.

Layout of the real ``gpt2`` (openai-community/gpt2) ``model.safetensors``, which
this module mirrors by default (160 tensors for the 12-layer model, all F32):

    wte.weight                 (vocab, n_embd)
    wpe.weight                 (n_positions, n_embd)
    h.{i}.ln_1.weight / .bias  (n_embd,)
    h.{i}.attn.bias            (1, 1, n_positions, n_positions)  causal-mask buffer (tril of ones)
    h.{i}.attn.c_attn.weight   (n_embd, 3*n_embd)   Conv1D -> stored (in, out), y = x @ W + b
    h.{i}.attn.c_attn.bias     (3*n_embd,)
    h.{i}.attn.c_proj.weight   (n_embd, n_embd)
    h.{i}.attn.c_proj.bias     (n_embd,)
    h.{i}.ln_2.weight / .bias  (n_embd,)
    h.{i}.mlp.c_fc.weight      (n_embd, 4*n_embd)
    h.{i}.mlp.c_fc.bias        (4*n_embd,)
    h.{i}.mlp.c_proj.weight    (4*n_embd, n_embd)
    h.{i}.mlp.c_proj.bias      (n_embd,)
    ln_f.weight / ln_f.bias    (n_embd,)

No ``transformer.`` prefix, no ``lm_head.weight`` (tied to wte), and no
``attn.masked_bias`` in the real gpt2 file (HF's "newly initialized: [...masked_bias...,
lm_head.weight]" warning when loading ``gpt2`` confirms both).  Checkpoints saved by
recent ``GPT2LMHeadModel.save_pretrained`` instead use the ``transformer.`` prefix and
usually omit the ``attn.bias`` buffer; older conversions may carry ``attn.masked_bias``
(scalar, -1e4).  ``random_gpt2_weights`` exposes ``prefix`` / ``with_buffers`` /
``with_masked_bias`` / ``with_lm_head`` so tests can cover these variants.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

GPT2_TINY_CFG: dict = {
    "activation_function": "gelu_new",
    "architectures": ["GPT2LMHeadModel"],
    "attn_pdrop": 0.1,
    "bos_token_id": 0,
    "embd_pdrop": 0.1,
    "eos_token_id": 0,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2",
    "n_ctx": 128,
    "n_embd": 64,
    "n_head": 4,
    "n_inner": None,
    "n_layer": 3,
    "n_positions": 128,
    "resid_pdrop": 0.1,
    "summary_activation": None,
    "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True,
    "summary_type": "cls_index",
    "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
    "vocab_size": 300,
}

EOT = "<|endoftext|>"

# Fixed training text for the tiny byte-level BPE (must yield >= vocab_size - 257 merges).
TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. "
    "Hello world! Hello there, world. This is a tiny test of the GPT-2 tokenizer. "
    "The engine runs the model on the CPU and the test checks the logits. "
    "In the beginning the thing was there and then it was not there. "
    "Numbers 0123456789 and punctuation: ;:,.!? 'quoted' \"double\" (paren). "
    "Whitespace  double  spaces\tand tabs\nnewlines\n\nand more text to merge the "
    "common pairs: the the the and and and ing ing ing tion tion er er re re. "
) * 4


def _inner(cfg: dict) -> int:
    return cfg.get("n_inner") or 4 * cfg["n_embd"]


# ---------------------------------------------------------------- weights
def gpt2_weight_shapes(cfg: dict, prefix: str = "", with_buffers: bool = True,
                       with_masked_bias: bool = False, with_lm_head: bool = False) -> dict:
    """name -> shape, in the order of the real checkpoint."""
    d, n_inner, P, V = cfg["n_embd"], _inner(cfg), cfg["n_positions"], cfg["vocab_size"]
    s: dict = {f"{prefix}wte.weight": (V, d), f"{prefix}wpe.weight": (P, d)}
    for i in range(cfg["n_layer"]):
        h = f"{prefix}h.{i}."
        s[h + "ln_1.weight"] = (d,)
        s[h + "ln_1.bias"] = (d,)
        if with_buffers:
            s[h + "attn.bias"] = (1, 1, P, P)
        if with_masked_bias:
            s[h + "attn.masked_bias"] = ()
        s[h + "attn.c_attn.weight"] = (d, 3 * d)
        s[h + "attn.c_attn.bias"] = (3 * d,)
        s[h + "attn.c_proj.weight"] = (d, d)
        s[h + "attn.c_proj.bias"] = (d,)
        s[h + "ln_2.weight"] = (d,)
        s[h + "ln_2.bias"] = (d,)
        s[h + "mlp.c_fc.weight"] = (d, n_inner)
        s[h + "mlp.c_fc.bias"] = (n_inner,)
        s[h + "mlp.c_proj.weight"] = (n_inner, d)
        s[h + "mlp.c_proj.bias"] = (d,)
    s[f"{prefix}ln_f.weight"] = (d,)
    s[f"{prefix}ln_f.bias"] = (d,)
    if with_lm_head:
        s["lm_head.weight"] = (V, d)
    return s


def random_gpt2_weights(cfg: dict, seed: int = 0, prefix: str = "", with_buffers: bool = True,
                        with_masked_bias: bool = False, with_lm_head: bool = False) -> dict:
    """Random float32 weights with the exact names/shapes of the HF gpt2 checkpoint.

    Default (prefix="", with_buffers=True) mirrors openai-community/gpt2 model.safetensors.
    If with_lm_head, ``lm_head.weight`` (no prefix, as in HF) is a copy of wte (tied).
    """
    rng = np.random.default_rng(seed)
    d = cfg["n_embd"]
    L = cfg["n_layer"]
    out: dict = {}
    shapes = gpt2_weight_shapes(cfg, prefix, with_buffers, with_masked_bias, with_lm_head)
    for name, shape in shapes.items():
        base = name[len(prefix):] if name.startswith(prefix) else name
        if base.endswith("attn.bias") and not base.endswith("c_attn.bias"):
            P = shape[-1]
            a = np.tril(np.ones((P, P), dtype=np.float32)).reshape(shape)
        elif base.endswith("attn.masked_bias"):
            a = np.array(-1e4, dtype=np.float32)
        elif base == "lm_head.weight":
            continue  # filled below
        elif ".ln_" in base or base.startswith("ln_f"):
            if base.endswith(".weight"):
                a = 1.0 + 0.1 * rng.standard_normal(shape)
            else:
                a = 0.05 * rng.standard_normal(shape)
        elif base in ("wte.weight", "wpe.weight"):
            a = (0.1 if base == "wte.weight" else 0.05) * rng.standard_normal(shape)
        elif base.endswith(".weight"):
            fan_in = shape[0]
            std = 1.0 / math.sqrt(fan_in)
            if base.endswith("c_proj.weight"):
                std /= math.sqrt(2 * L)
            a = std * rng.standard_normal(shape)
        else:  # linear biases
            a = 0.02 * rng.standard_normal(shape)
        out[name] = np.array(a, dtype=np.float32, order="C")  # keeps 0-d shape
    if with_lm_head:
        out["lm_head.weight"] = out[f"{prefix}wte.weight"].copy()
    # keep d referenced for readability of scales
    assert out[f"{prefix}wte.weight"].shape[1] == d
    return out


# ---------------------------------------------------------------- tokenizer
def train_tiny_bpe(vocab_size: int, text: str = TRAIN_TEXT):
    """Byte-level BPE with exactly vocab_size entries, <|endoftext|> at id 0."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([text], vocab_size=vocab_size, min_frequency=1,
                            special_tokens=[EOT], show_progress=False)
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    assert tok.token_to_id(EOT) == 0
    return tok


def write_tokenizer_files(path, cfg: dict, tokenizer_json: bool = False) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tiny_bpe(cfg["vocab_size"])
    tok.save_model(str(path))  # vocab.json + merges.txt
    if tokenizer_json:
        tok.save(str(path / "tokenizer.json"))
    eot_id = tok.token_to_id(EOT)
    tcfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(eot_id): {"content": EOT, "lstrip": False, "normalized": True,
                          "rstrip": False, "single_word": False, "special": True}
        },
        "bos_token": EOT,
        "clean_up_tokenization_spaces": True,
        "eos_token": EOT,
        "errors": "replace",
        "model_max_length": cfg["n_positions"],
        "pad_token": None,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": EOT,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    (path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}, indent=2))


# ---------------------------------------------------------------- directory
def write_gpt2_dir(path, cfg: dict, weights: dict, dtype: str = "float32",
                   tokenizer_files: bool = True, tokenizer_json: bool = False) -> Path:
    """Write an HF-style gpt2 folder: config.json, generation_config.json,
    model.safetensors (all tensors cast to dtype), and optionally vocab.json,
    merges.txt, tokenizer_config.json, special_tokens_map.json (+ tokenizer.json)."""
    from safetensors.numpy import save_file

    if dtype not in ("float32", "float16"):
        raise ValueError(dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {"_from_model_config": True, "bos_token_id": cfg["bos_token_id"],
           "eos_token_id": cfg["eos_token_id"], "transformers_version": "4.26.0.dev0"}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    np_dtype = np.dtype(dtype)
    tensors = {k: np.array(v, dtype=np_dtype, order="C") for k, v in weights.items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_files:
        write_tokenizer_files(path, cfg, tokenizer_json=tokenizer_json)
    return path


def load_gpt2_dir_weights(path) -> dict:
    from safetensors.numpy import load_file

    return load_file(os.path.join(str(path), "model.safetensors"))


# ---------------------------------------------------------------- math
def gelu_new(x):
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x, w, b, eps):
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)  # biased variance
    return (x - mu) / np.sqrt(var + eps) * w + b


def _strip(weights: dict) -> dict:
    """Normalise names: drop 'transformer.' prefix; return float64 arrays."""
    out = {}
    for k, v in weights.items():
        if k.startswith("transformer."):
            k = k[len("transformer."):]
        out[k] = np.asarray(v, dtype=np.float64)
    return out


def gpt2_forward(weights: dict, cfg: dict, ids) -> np.ndarray:
    """Logits (T, vocab) float32 of HF GPT2LMHeadModel for token ids (T,), no cache.

    Computed in float64.  Names with or without 'transformer.' prefix are accepted;
    buffers (attn.bias / attn.masked_bias) and lm_head.weight are ignored (tied head).
    """
    W = _strip(weights)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    T = ids.shape[0]
    d, H = cfg["n_embd"], cfg["n_head"]
    hd = d // H
    eps = cfg["layer_norm_epsilon"]
    if T > cfg["n_positions"]:
        raise ValueError("sequence longer than n_positions")
    x = W["wte.weight"][ids] + W["wpe.weight"][np.arange(T)]
    causal = np.tril(np.ones((T, T), dtype=bool))
    for i in range(cfg["n_layer"]):
        p = f"h.{i}."
        a = layer_norm(x, W[p + "ln_1.weight"], W[p + "ln_1.bias"], eps)
        qkv = a @ W[p + "attn.c_attn.weight"] + W[p + "attn.c_attn.bias"]
        q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
        q = q.reshape(T, H, hd).transpose(1, 0, 2)
        k = k.reshape(T, H, hd).transpose(1, 0, 2)
        v = v.reshape(T, H, hd).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        s = np.where(causal[None], s, -np.inf)
        s = s - s.max(axis=-1, keepdims=True)
        e = np.exp(s)
        pr = e / e.sum(axis=-1, keepdims=True)
        o = (pr @ v).transpose(1, 0, 2).reshape(T, d)
        x = x + (o @ W[p + "attn.c_proj.weight"] + W[p + "attn.c_proj.bias"])
        m = layer_norm(x, W[p + "ln_2.weight"], W[p + "ln_2.bias"], eps)
        hmid = gelu_new(m @ W[p + "mlp.c_fc.weight"] + W[p + "mlp.c_fc.bias"])
        x = x + (hmid @ W[p + "mlp.c_proj.weight"] + W[p + "mlp.c_proj.bias"])
    x = layer_norm(x, W["ln_f.weight"], W["ln_f.bias"], eps)
    return (x @ W["wte.weight"].T).astype(np.float32)
