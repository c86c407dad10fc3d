"""GGUF files (architecture `llama`) -> Checkpoint. The one place that knows GGUF's names."""
from pathlib import Path

import numpy as np

from fastinfer.kernels import linear as K

from .checkpoint import Checkpoint, check_config
from .gguf_meta import ggml_type_name, open_gguf
from .tensors import GGML_BLOCKS, from_f32, from_ggml_blocks, from_half_bits, permute_rows
from .tokenizer import tokenizer_from_gguf

SUPPORTED_ARCHS = ("llama",)

_LAYER_NAMES = {
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
    "attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
    "ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3",
}
_GLOBAL_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output",
                 "rope_freqs": "rope_freqs"}


def _canonical(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if base.startswith("blk."):
        _, i, role = base.split(".", 2)
        if role not in _LAYER_NAMES:
            return None
        name = _LAYER_NAMES[role]
        if suffix == "bias":  # wq -> bq
            name = "b" + name[1:]
        return f"layers.{i}.{name}"
    return _GLOBAL_NAMES.get(base) if suffix == "weight" else None


def _llama_cpp_rope_order(n_heads: int, head_dim: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation.

    convert_hf_to_gguf stores head rows as (head, pair i, half j) so that RoPE can rotate adjacent
    pairs; HF's rotate-half pairs row i with row i + head_dim/2. HF row h*hd + j*hd/2 + i is GGUF
    row h*hd + 2*i + j.
    """
    half = head_dim // 2
    h, j, i = np.meshgrid(np.arange(n_heads), np.arange(2), np.arange(half), indexing="ij")
    return (h * head_dim + 2 * i + j).reshape(-1)


def _dequantize(data: np.ndarray, ttype: int) -> np.ndarray:
    """A tensor type fastinfer does not read itself (K-quants, IQ...), widened by the gguf package."""
    from gguf import GGMLQuantizationType, quants
    return quants.dequantize(data, GGMLQuantizationType(ttype))


def _tensor(t, path: Path):
    """One GGUF tensor -> QMatrix (2-D) or f32 vector (1-D)."""
    kind = ggml_type_name(t.tensor_type)
    shape = t.shape
    data = t.data
    if len(shape) == 1:
        if kind in ("F32", "F16"):
            return np.array(data, dtype=np.float32).reshape(shape)  # a copy: no view pins the mapping
        return _dequantize(data, t.tensor_type).astype(np.float32).reshape(shape)
    if len(shape) != 2:
        raise ValueError(f"{path}: tensor {t.name} has {len(shape)} dimensions; expected 1 or 2")
    rows, cols = shape
    if kind == "F32":
        return from_f32(np.asarray(data).reshape(rows, cols))
    if kind == "F16":
        return from_half_bits(np.asarray(data).view(np.uint16).reshape(rows, cols), K.F16)
    if kind == "BF16":
        return from_half_bits(np.asarray(data).view(np.uint16).reshape(rows, cols), K.BF16)
    if kind in GGML_BLOCKS:
        return from_ggml_blocks(np.asarray(data).reshape(rows, -1), kind, cols)
    try:
        return from_f32(_dequantize(data, t.tensor_type).reshape(rows, cols))
    except (NotImplementedError, ValueError):
        raise ValueError(f"{path}: tensor {t.name} has GGML type {kind}, which fastinfer cannot read") from None


def read_gguf(path: Path) -> Checkpoint:
    reader = open_gguf(path)
    meta = reader.metadata
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"{path}: unsupported architecture {arch!r}; fastinfer reads GGUF architectures "
                         f"{', '.join(SUPPORTED_ARCHS)}")

    def need(key):
        if f"{arch}.{key}" not in meta:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return meta[f"{arch}.{key}"]

    tokens = meta.get("tokenizer.ggml.tokens") or []
    dim, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
                   or dim // n_heads)
    config = {
        "arch": "llama",
        "dim": dim,
        "n_layers": int(need("block_count")),
        "n_heads": n_heads,
        "n_kv_heads": int(meta.get(f"{arch}.attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "hidden_dim": int(need("feed_forward_length")),
        "vocab_size": int(meta.get(f"{arch}.vocab_size") or len(tokens)),
        "norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_seq_len": int(meta.get(f"{arch}.context_length", 2048)),
    }
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    elif scaling not in (None, "none"):
        raise ValueError(f"{path}: unsupported RoPE scaling {scaling!r}")

    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"{path}: GGUF file has no tokenizer (tokenizer.ggml.tokens)")
    # Built before the weights are read: its Python vocabulary and merges (~25 MB, freed at once)
    # then add to a small process instead of to the peak beside every weight.
    tokenizer = tokenizer_from_gguf(meta)
    tensors = {}
    for t in reader.tensors:
        name = _canonical(t.name)
        if name is None:
            raise ValueError(f"{path}: unexpected tensor {t.name} for architecture {arch}")
        tensors[name] = _tensor(t, path)
        reader.release(t)  # copied (or, for plain floats, re-read on demand): keep RSS to one copy
    reader.release_all()

    check_config(config, tensors, str(path))  # before anything loops over the layers
    # Undo llama.cpp's Q/K row permutation so one rotate-half RoPE serves GGUF and HF weights.
    q_order = _llama_cpp_rope_order(config["n_heads"], head_dim)
    k_order = _llama_cpp_rope_order(config["n_kv_heads"], head_dim)
    for i in range(config["n_layers"]):
        for w, order in (("wq", q_order), ("wk", k_order)):
            if f"layers.{i}.{w}" in tensors:
                tensors[f"layers.{i}.{w}"] = permute_rows(tensors[f"layers.{i}.{w}"], order)
            b = f"layers.{i}.b{w[1]}"
            if b in tensors:
                tensors[b] = tensors[b][order]

    eos = [int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
           if k in meta]
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return Checkpoint(
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        bos_id=None if bos is None else int(bos),
        eos_ids=list(dict.fromkeys(eos)),
        chat_template=meta.get("tokenizer.chat_template"),
        source=str(path),
    )
