"""GGUF files -> Checkpoint. The Llama family's GGUF names live here; other architectures declare
theirs in their own module (fastinfer/models/__init__.py `Architecture`)."""
import math
from pathlib import Path

import numpy as np

from fastinfer.kernels import linear as K

from .checkpoint import Checkpoint, check_config
from .gguf_meta import ggml_type_name, open_gguf
from .kquants import BLOCKS as KQUANT_BLOCKS
from .tensors import GGML_BLOCKS, QMatrix, from_f32, from_ggml_blocks, from_half_bits, from_kquant_blocks, permute_rows
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
    """A tensor type fastinfer does not hold in blocks (IQ types; Q5_0 / Q5_1 rows of an odd
    number of blocks), widened by the gguf package."""
    from gguf import GGMLQuantizationType, quants
    return quants.dequantize(data, GGMLQuantizationType(ttype))


def _tensor(t, path: Path, reader=None):
    """One GGUF tensor -> QMatrix (2-D) or f32 vector (1-D); `reader` releases copied rows' pages."""
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
        raw = np.asarray(data).reshape(rows, -1)
        copied = None if reader is None else lambda lo, hi: reader.release(t, raw[lo:hi])
        return from_ggml_blocks(raw, kind, cols, copied)
    if kind in KQUANT_BLOCKS and cols % K.STRETCH == 0:  # held in their blocks (weights/kquants.py)
        return from_kquant_blocks(np.asarray(data).reshape(rows, -1), kind, cols)
    try:
        return from_f32(_dequantize(data, t.tensor_type).reshape(rows, cols))
    except (NotImplementedError, ValueError):
        raise ValueError(f"{path}: tensor {t.name} has GGML type {kind}, which fastinfer cannot read") from None


def _short(v) -> str:
    """A metadata value for an error message, at most ~60 characters."""
    r = repr(v.tolist() if isinstance(v, np.ndarray) else v)
    return r if len(r) <= 60 else r[:57] + "..."


def _token_id(meta: dict, key: str, vocab: int, path: Path) -> int | None:
    v = meta.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab:
        raise ValueError(f"{path}: GGUF metadata {key} = {_short(v)}; expected a token id below {vocab}")
    return v


def _spec_canonical(spec, gguf_name: str) -> str | None:
    """An architecture's GGUF tensor name -> canonical, from the tables it declares."""
    base, _, suffix = gguf_name.rpartition(".")
    if suffix != "weight":
        return None
    if base.startswith("blk."):
        _, i, role = base.split(".", 2)
        return f"layers.{i}.{spec.gguf_layer_names[role]}" if role in spec.gguf_layer_names else None
    return spec.gguf_global_names.get(base)


def read_gguf(path: Path) -> Checkpoint:
    from fastinfer.models import BY_GGUF_ARCH, architecture
    reader = open_gguf(path)
    meta = reader.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in SUPPORTED_ARCHS + tuple(BY_GGUF_ARCH):
        raise ValueError(f"{path}: unsupported architecture {_short(arch)}; fastinfer reads GGUF architectures "
                         f"{', '.join(SUPPORTED_ARCHS + tuple(BY_GGUF_ARCH))}")
    spec = architecture(BY_GGUF_ARCH[arch]) if arch in BY_GGUF_ARCH else None

    def value(key, kind, default=None):
        """Metadata `arch.key` as an int or float; a missing required key or a value of another
        type (a string, an array) is a ValueError naming it. Ranges are check_config's."""
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}")
        ok = isinstance(v, int) if kind is int else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok:
            raise ValueError(f"{path}: GGUF metadata {arch}.{key} = {_short(v)}; expected "
                             f"{'an integer' if kind is int else 'a number'}")
        return kind(v)

    dim, n_heads = value("embedding_length", int), value("attention.head_count", int)
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"{path}: GGUF file has no tokenizer (tokenizer.ggml.tokens, a list of strings)")
    n_tokens = len(tokens)
    head_dim = value("attention.key_length", int, -1)
    head_dim = dim // max(n_heads, 1) if head_dim == -1 else head_dim
    for key in ("attention.value_length", "rope.dimension_count"):  # fastinfer rotates whole heads
        if value(key, int, head_dim) != head_dim:
            raise ValueError(f"{path}: GGUF metadata {arch}.{key} = {meta[f'{arch}.{key}']} differs from the "
                             f"head size {head_dim}; fastinfer supports neither partial RoPE nor V heads of "
                             f"another size")
    config = spec.gguf_config(value, meta, str(path)) if spec is not None else {
        "arch": "llama",
        "dim": dim,
        "n_layers": value("block_count", int),
        "n_heads": n_heads,
        "n_kv_heads": value("attention.head_count_kv", int, n_heads),
        "head_dim": head_dim,
        "hidden_dim": value("feed_forward_length", int),
        "vocab_size": value("vocab_size", int, 0) or n_tokens,
        "norm_eps": value("attention.layer_norm_rms_epsilon", float),  # required, as in llama.cpp
        "rope_theta": value("rope.freq_base", float, 10000.0),
        "rope_scaling": None,
        "max_seq_len": value("context_length", int),
    }
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling is not None and not isinstance(scaling, str):
        raise ValueError(f"{path}: GGUF metadata {arch}.rope.scaling.type = {_short(scaling)}; expected a string")
    if spec is None and scaling == "linear":
        factor = value("rope.scaling.factor", float)
        if not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"{path}: {arch}.rope.scaling.factor = {factor}; expected a finite positive number")
        config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    elif spec is None and scaling not in (None, "none"):
        raise ValueError(f"{path}: unsupported RoPE scaling {_short(scaling)}")
    check_config(config, {}, str(path))  # before any loop over layers; open_checkpoint checks the tensors

    if n_tokens != config["vocab_size"]:
        raise ValueError(f"{path}: the tokenizer has {n_tokens} tokens; the model's vocabulary is "
                         f"{config['vocab_size']}")
    # Built before the weights are read: its Python vocabulary and merges (~25 MB, freed at once)
    # then add to a small process instead of to the peak beside every weight.
    try:
        tokenizer = tokenizer_from_gguf(meta)
    except Exception as e:  # the tokenizers library raises bare Exceptions ("Error while initializing BPE")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: its tokenizer cannot be built ({first})") from None
    tensors = {}
    for t in reader.tensors:
        name = _canonical(t.name) if spec is None else _spec_canonical(spec, t.name)
        if name is None:
            raise ValueError(f"{path}: unexpected tensor {t.name!r} for architecture {arch}")
        tensors[name] = _tensor(t, path, reader)
        reader.release(t)  # copied (or, for plain floats, re-read on demand): keep RSS to one copy
    reader.release_all()

    # Undo llama.cpp's Q/K row permutation so one rotate-half RoPE serves GGUF and HF weights
    # (the Llama family only: llama.cpp permutes no other architecture's rows).
    q_order = _llama_cpp_rope_order(config["n_heads"], head_dim)
    k_order = _llama_cpp_rope_order(config["n_kv_heads"], head_dim)
    for i in range(config["n_layers"] if spec is None else 0):
        for w, order in (("wq", q_order), ("wk", k_order)):
            for name in (f"layers.{i}.{w}", f"layers.{i}.b{w[1]}"):
                if name not in tensors:
                    continue
                t = tensors[name]
                rows = t.rows if isinstance(t, QMatrix) else t.shape[0]
                if rows != len(order) or (not isinstance(t, QMatrix) and t.ndim != 1):
                    raise ValueError(f"{path}: {name} has {rows} rows; expected {len(order)} from the model's config")
                tensors[name] = permute_rows(t, order) if isinstance(t, QMatrix) else t[order]
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{path}: GGUF metadata tokenizer.chat_template = {_short(template)}; expected a string")

    eos = [_token_id(meta, k, config["vocab_size"], path)
           for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    bos = _token_id(meta, "tokenizer.ggml.bos_token_id", config["vocab_size"], path)
    return Checkpoint(
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        bos_id=None if bos is None else int(bos),
        eos_ids=list(dict.fromkeys(eos)),
        chat_template=template,
        source=str(path),
    )
