"""Writers for tiny random Llama-family models, as Hugging Face directories and as GGUF files.

Independent of the engine (nothing here imports `fastinfer`). The GGUF writer follows what
llama.cpp's `convert_hf_to_gguf.py` does for `LlamaForCausalLM`: the `llama.*` hyperparameter
keys, GGUF tensor names, Q/K rows permuted by `LlamaModel.permute`, norms and biases in F32,
`rope_freqs` for llama3 rope scaling, and a byte-level BPE ("gpt2") vocabulary.

Typical use in a test:

    tok = tiny_bpe_tokenizer()
    cfg = dict(TINY_CFG)
    w = random_llama_weights(cfg, seed=0)
    write_hf_dir(tmp / "hf", cfg, w, tokenizer=tok, dtype="bfloat16")
    expected = reference.llama_forward(as_stored(w, "bfloat16"), cfg, ids)
    write_gguf(tmp / "m.gguf", cfg, w, "Q8_0", tokenizer_vocab=gguf_tokenizer_fields(tok))
    expected = reference.llama_forward(as_quantized(w, "Q8_0"), cfg, ids)
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

try:  # importable both as tests.tiny_models and, with tests/ on sys.path, as tiny_models
    from .reference import QK, dequantize, head_dim_of, quantize
except ImportError:
    from reference import QK, dequantize, head_dim_of, quantize

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as SmolLM2-Instruct's GGUF carries it.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_VOCAB = 300

# hidden 64 = 4 heads x 16; 2 kv heads (GQA); ffn 96 = 3 blocks of 32, so every 2-D weight
# quantizes; vocab 300 is not a power of two. Keys as in HF config.json.
TINY_CFG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": TINY_VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Variants that exercise the optional paths: tied embeddings; an explicit head_dim that is not
# hidden / heads plus llama3 rope scaling whose low/high wavelength band falls inside a short
# prompt; and Qwen2-style q/k/v biases.
TINY_CFG_TIED = {**TINY_CFG, "tie_word_embeddings": True}
TINY_CFG_LLAMA3 = {
    **TINY_CFG,
    "head_dim": 32,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}
TINY_CFG_BIAS = {**TINY_CFG, "attention_bias": True}


# ----------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------

def random_llama_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under HF names, scaled so activations stay O(1) and the logits
    are peaked enough that the argmax is stable. Includes q/k/v biases when
    cfg["attention_bias"] is true (Qwen2 style), and lm_head unless the embeddings are tied."""
    rng = np.random.default_rng(seed)
    d, ff, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H = cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    hd = head_dim_of(cfg)

    def mat(rows, cols, gain=1.0):
        return (rng.standard_normal((rows, cols)) * gain / math.sqrt(cols)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def bias(n):
        return (0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": (0.4 * rng.standard_normal((V, d))).astype(np.float32)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(d)
        w[p + "self_attn.q_proj.weight"] = mat(H * hd, d, 1.5)
        w[p + "self_attn.k_proj.weight"] = mat(KV * hd, d, 1.5)
        w[p + "self_attn.v_proj.weight"] = mat(KV * hd, d)
        w[p + "self_attn.o_proj.weight"] = mat(d, H * hd, 0.5)
        if cfg.get("attention_bias"):
            w[p + "self_attn.q_proj.bias"] = bias(H * hd)
            w[p + "self_attn.k_proj.bias"] = bias(KV * hd)
            w[p + "self_attn.v_proj.bias"] = bias(KV * hd)
        w[p + "post_attention_layernorm.weight"] = norm(d)
        w[p + "mlp.gate_proj.weight"] = mat(ff, d)
        w[p + "mlp.up_proj.weight"] = mat(ff, d)
        w[p + "mlp.down_proj.weight"] = mat(d, ff, 0.5)
    w["model.norm.weight"] = norm(d)
    if not cfg.get("tie_word_embeddings", False):
        w["lm_head.weight"] = mat(V, d, 3.0)
    return w


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even as torch does."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def as_stored(weights: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """The float32 values a loader sees after `write_hf_dir(..., dtype=dtype)`."""
    if dtype == "float32":
        return {k: v.astype(np.float32) for k, v in weights.items()}
    if dtype == "float16":
        return {k: v.astype(np.float16).astype(np.float32) for k, v in weights.items()}
    if dtype == "bfloat16":
        return {k: from_bf16_bits(to_bf16_bits(v)) for k, v in weights.items()}
    raise ValueError(f"unsupported dtype {dtype!r}")


# ----------------------------------------------------------------------------------------------
# Hugging Face directory
# ----------------------------------------------------------------------------------------------

_ST_DTYPES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}


def _tensor_bytes(arr: np.ndarray, dtype: str) -> bytes:
    if dtype == "float32":
        return np.ascontiguousarray(arr, dtype="<f4").tobytes()
    if dtype == "float16":
        return np.ascontiguousarray(arr.astype("<f2")).tobytes()
    return np.ascontiguousarray(to_bf16_bits(arr).astype("<u2")).tobytes()


def write_safetensors(path, tensors: dict[str, np.ndarray], dtype: str = "float32",
                      metadata: dict | None = None) -> int:
    """Write a .safetensors file by the spec (u64 LE header size, JSON header, data), storing
    every tensor in `dtype` ("float32", "float16" or "bfloat16"). Returns the data bytes."""
    st_dtype, _ = _ST_DTYPES[dtype]
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        blob = _tensor_bytes(tensors[name], dtype)
        header[name] = {"dtype": st_dtype, "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # data start 8-byte aligned, as safetensors itself pads
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
    return offset


def hf_config(cfg: dict, dtype: str = "float32") -> dict:
    """config.json contents for `cfg` (cfg's own keys win over these defaults)."""
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "max_position_embeddings": 2048,
        "pretraining_tp": 1,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "transformers_version": "4.46.0",
    }
    out.update(cfg)
    out.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    out["torch_dtype"] = dtype
    return out


def write_hf_dir(path, cfg: dict, weights: dict[str, np.ndarray], tokenizer=None,
                 dtype: str = "float32", shards: int = 1) -> Path:
    """A Hugging Face model directory: config.json, model.safetensors (or `shards` files
    model-0000k-of-0000n.safetensors plus model.safetensors.index.json), and, given a
    `tokenizers.Tokenizer`, tokenizer.json and tokenizer_config.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if dtype not in _ST_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}")
    (path / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=2) + "\n")

    names = list(weights)
    if shards <= 1:
        write_safetensors(path / "model.safetensors", weights, dtype)
    else:
        groups = [list(g) for g in np.array_split(np.array(names, dtype=object), shards)]
        weight_map, total = {}, 0
        for k, group in enumerate(groups, start=1):
            fname = f"model-{k:05d}-of-{shards:05d}.safetensors"
            total += write_safetensors(path / fname, {n: weights[n] for n in group}, dtype)
            weight_map.update({n: fname for n in group})
        index = {"metadata": {"total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    if tokenizer is not None:
        tokenizer.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps({
            "add_bos_token": False,
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|im_end|>",
            "unk_token": "<|endoftext|>",
            "chat_template": CHATML_TEMPLATE,
            "model_max_length": cfg.get("max_position_embeddings", 2048),
            "tokenizer_class": "GPT2Tokenizer",
        }, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------

_TRAIN_TEXT = """\
It is a truth universally acknowledged, that a single man in possession of a good fortune,
must be in want of a wife. However little known the feelings or views of such a man may be
on his first entering a neighbourhood, this truth is so well fixed in the minds of the
surrounding families, that he is considered the rightful property of some one or other of
their daughters. The capital of France is Paris. The capital of Italy is Rome. One, two,
three, four, five: 12345 67890. Hello world! How are you today? I am fine, thank you.
<|im_start|>user
What is the capital of France?<|im_end|>
<|im_start|>assistant
The capital of France is Paris.<|im_end|>
"""


def tiny_bpe_tokenizer(vocab_size: int = TINY_VOCAB):
    """A byte-level BPE `tokenizers.Tokenizer` of exactly `vocab_size` tokens, trained on a fixed
    text: ids 0, 1, 2 are <|endoftext|>, <|im_start|>, <|im_end|> (special), then the 256
    byte symbols, then the merges. GPT-2 pre-tokenization (ByteLevel with its regex)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    tok.train_from_iterator([_TRAIN_TEXT] * 3, trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tiny tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    return tok


def gguf_tokenizer_fields(tokenizer, vocab_size: int | None = None) -> dict:
    """The `tokenizer.ggml.*` fields the converter writes for a byte-level BPE tokenizer:
    tokens (by id, padded with [PAD{i}] up to vocab_size), token types (1 normal, 3 control
    for special added tokens, 5 unused for padding), merges ("a b"), special ids."""
    data = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    special = {}
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        special[added["id"]] = added.get("special", False)
    n = vocab_size or (max(vocab.values()) + 1)
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(5)
        else:
            tok = by_id[i]
            tokens.append(tok)
            looks_special = tok.startswith("<|") and tok.endswith("|>")
            types.append(3 if i in special and (special[i] or looks_special) else
                         4 if i in special else 1)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return {
        "model": "gpt2",
        "pre": "gpt-2",
        "tokens": tokens,
        "token_type": types,
        "merges": merges,
        "bos_token_id": vocab["<|im_start|>"],
        "eos_token_id": vocab["<|im_end|>"],
        "unknown_token_id": vocab["<|endoftext|>"],
        "padding_token_id": vocab["<|im_end|>"],
        "add_bos_token": False,
        "chat_template": CHATML_TEMPLATE,
    }


# ----------------------------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------------------------

_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}  # llama_ftype


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: within each head, rows (i, i + hd/2) of HF's
    split-half layout become adjacent rows (2i, 2i+1). Works on weights and biases."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def gguf_name(hf_name: str) -> str:
    """HF tensor name -> GGUF tensor name (llama)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    parts = hf_name.split(".")
    if parts[:2] != ["model", "layers"]:
        raise KeyError(hf_name)
    layer, rest = parts[2], ".".join(parts[3:])
    table = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    stem, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{table[stem]}.{suffix}"


def gguf_tensor_type(hf_name: str, shape: tuple, ggml_type: str) -> str:
    """The type the converter stores a tensor in: 1-D tensors, norms and biases F32; 2-D
    weights in ggml_type, falling back to F16 when a row does not fill whole blocks."""
    if len(shape) < 2 or not hf_name.endswith(".weight") or hf_name.endswith("norm.weight"):
        return "F32"
    if ggml_type in ("Q8_0", "Q4_0", "Q4_1") and shape[-1] % QK:
        return "F16"
    return ggml_type


def as_quantized(weights: dict[str, np.ndarray], ggml_type: str) -> dict[str, np.ndarray]:
    """The float32 HF-layout weights a GGUF written by `write_gguf(..., ggml_type)` holds.
    Quantization blocks run along rows, so the Q/K row permutation commutes with it."""
    out = {}
    for name, w in weights.items():
        t = gguf_tensor_type(name, w.shape, ggml_type)
        w2 = w.reshape(-1, w.shape[-1])
        out[name] = dequantize(quantize(w2, t), t, w.shape[-1]).reshape(w.shape)
    return out


def llama3_rope_factors(cfg: dict) -> np.ndarray | None:
    """rope_freqs.weight as the converter generates it for llama3 rope scaling, else None."""
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
    base = cfg.get("rope_theta", 10000.0)
    dim = head_dim_of(cfg)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = scaling.get("factor", 8.0)
    low = scaling.get("low_freq_factor", 1.0)
    high = scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings",
                          cfg.get("original_max_position_embeddings", 8192))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / float(freq)
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(path, cfg: dict, weights: dict[str, np.ndarray], ggml_type: str = "F32",
               tokenizer_vocab: dict | None = None, name: str = "tiny-llama") -> Path:
    """Write `weights` (HF names, float32) as a llama GGUF the way convert_hf_to_gguf.py does.

    `tokenizer_vocab` is a dict from `gguf_tokenizer_fields` (or None for no tokenizer)."""
    import gguf

    path = Path(path)
    if ggml_type not in _FILE_TYPE:
        raise ValueError(f"unsupported ggml type {ggml_type!r}")
    H = cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type("model")
    writer.add_name(name)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg.get("max_position_embeddings", 2048))
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(H)
    writer.add_head_count_kv(KV)
    writer.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if cfg.get("head_dim") is not None:
        writer.add_key_length(cfg["head_dim"])
        writer.add_value_length(cfg["head_dim"])
    writer.add_file_type(_FILE_TYPE[ggml_type])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_rope_dimension_count(head_dim_of(cfg))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    if tokenizer_vocab is not None:
        tv = tokenizer_vocab
        writer.add_tokenizer_model(tv.get("model", "gpt2"))
        writer.add_tokenizer_pre(tv.get("pre", "gpt-2"))
        tokens = list(tv["tokens"])
        types = list(tv["token_type"])
        for i in range(len(tokens), cfg["vocab_size"]):  # pad like the converter does
            tokens.append(f"[PAD{i}]")
            types.append(5)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(list(tv["merges"]))
        for key, add in (("bos_token_id", writer.add_bos_token_id),
                         ("eos_token_id", writer.add_eos_token_id),
                         ("unknown_token_id", writer.add_unk_token_id),
                         ("padding_token_id", writer.add_pad_token_id)):
            if tv.get(key) is not None:
                add(tv[key])
        if tv.get("add_bos_token") is not None:
            writer.add_add_bos_token(tv["add_bos_token"])
        if tv.get("chat_template"):
            writer.add_chat_template(tv["chat_template"])

    factors = llama3_rope_factors(cfg)
    if factors is not None:
        writer.add_tensor("rope_freqs.weight", factors)

    for hf_name, w in weights.items():
        if hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings", False):
            continue
        w = np.asarray(w, dtype=np.float32)
        if ".self_attn.q_proj." in hf_name:
            w = permute_qk(w, H)
        elif ".self_attn.k_proj." in hf_name:
            w = permute_qk(w, KV)
        t = gguf_tensor_type(hf_name, w.shape, ggml_type)
        name_out = gguf_name(hf_name)
        if t == "F32":
            writer.add_tensor(name_out, np.ascontiguousarray(w))
        elif t == "F16":
            writer.add_tensor(name_out, w.astype(np.float16))
        else:
            writer.add_tensor(name_out, quantize(w, t), raw_dtype=gguf.GGMLQuantizationType[t])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# Qwen3: QK-norm (q and k RMS-normed per head before RoPE), no biases, head_dim its own key
# (4 heads x 24 = 96 != hidden 64), tied embeddings as the small Qwen3 models have them.
TINY_CFG_QWEN3 = {**TINY_CFG, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "head_dim": 24,
                  "tie_word_embeddings": True, "rope_theta": 1000000.0, "attention_bias": False,
                  "use_sliding_window": False, "sliding_window": None, "max_window_layers": 3}
# Llama 3.2: llama3 RoPE scaling, tied embeddings, GQA
TINY_CFG_LLAMA32 = {**TINY_CFG, "tie_word_embeddings": True, "rope_theta": 500000.0,
                    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}


def add_qk_norms(cfg: dict, w: dict[str, np.ndarray], seed: int = 7) -> dict[str, np.ndarray]:
    """Qwen3's per-head q_norm / k_norm weights (head_dim,) added to Llama-named weights."""
    rng = np.random.default_rng(seed)
    hd = head_dim_of(cfg)
    for i in range(cfg["num_hidden_layers"]):
        for n in ("q_norm", "k_norm"):
            w[f"model.layers.{i}.self_attn.{n}.weight"] = (1.0 + 0.2 * rng.standard_normal(hd)).astype(np.float32)
    return w
