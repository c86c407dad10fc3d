"""A checkpoint in fastinfer's vocabulary, whatever file it came from.

Readers (`gguf.py`, `hf.py`) translate their format's names into one set, the only place where
format-specific names appear:

    config   dict with arch ("llama" or "gpt2") and that architecture's ModelArgs fields
             (fastinfer/models/<arch>.py): dim, n_layers, n_heads, hidden_dim, vocab_size, ...

    Llama family:
    tensors  tok_embeddings, norm, output (absent when tied),
             layers.{i}.attention_norm / ffn_norm        f32 vectors
             layers.{i}.wq wk wv wo w1 w2 w3             QMatrix (w1 gate, w2 down, w3 up)
             layers.{i}.bq bk bv                         f32 vectors, optional (Qwen2)
             rope_freqs                                  f32 (head_dim // 2,), optional
    GPT-2:
    tensors  tok_embeddings, pos_embeddings, norm, norm_bias,
             layers.{i}.wqkv wo w1 w2                    QMatrix, already (out, in)
             layers.{i}.bqkv bo b1 b2, attention_norm(_bias), ffn_norm(_bias)   f32 vectors

Converted checkpoints hold the same roles already stacked over layers (no "layers.{i}." prefix).
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from .tensors import QMatrix

DTYPES = ("auto", "f32", "bf16", "int8", "int4")


@dataclass
class Checkpoint:
    config: dict[str, Any]
    tensors: dict[str, QMatrix | np.ndarray]
    tokenizer: tokenizers.Tokenizer
    bos_id: int | None
    eos_ids: list[int]
    chat_template: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    converted: bool = False  # a converted checkpoint: its config holds every field of the model's args


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return dtype


# Upper bounds on a config's counts: far above any model this engine runs, low enough that no
# loop or allocation sized by a hostile file runs away before the tensors are checked against it.
COUNT_LIMITS = {"dim": 1 << 16, "n_layers": 1 << 12, "n_heads": 1 << 12, "n_kv_heads": 1 << 12,
                "head_dim": 1 << 12, "hidden_dim": 1 << 20, "vocab_size": 1 << 24, "max_seq_len": 1 << 24}


REQUIRED = object()  # ConfigReader: the key has no default


class ConfigReader:
    """config.json's values, each checked for its type as it is read: a ValueError naming the key
    for a missing required one, a bool, a string, a list or a non-integral number where an
    integer belongs. Ranges are check_config's, the same for every format."""

    def __init__(self, cfg: dict, d: Path):
        self.cfg, self.d = cfg, d

    def _get(self, key, default):
        v = self.cfg.get(key)
        if v is None:
            if default is REQUIRED:
                raise ValueError(f"{self.d}/config.json lacks {key!r}")
            return default
        return v

    def int(self, key: str, default=None):
        v = self._get(key, default)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{self.d}/config.json: {key} = {v!r:.40}; expected an integer")
        return v

    def float(self, key: str, default=None):
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{self.d}/config.json: {key} = {v!r:.40}; expected a number")
        return float(v)


def check_config(config: dict[str, Any], tensors: dict, source: str) -> None:
    """A ValueError naming the value unless every count is an integer in range, eps and the RoPE
    base are finite and positive, the heads divide evenly, and the per-layer tensors are for
    exactly layers 0..n_layers-1."""
    import math
    import re
    if not isinstance(config, dict):
        raise ValueError(f"{source}: the model config is not a mapping")
    missing = [k for k in ("arch", "dim", "n_layers", "vocab_size", "max_seq_len") if k not in config]
    if missing:
        raise ValueError(f"{source}: the model config lacks {', '.join(missing)}")
    for key, limit in COUNT_LIMITS.items():
        v = config.get(key)
        if key in config and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= limit):
            raise ValueError(f"{source}: {key} = {v!r:.40}; expected an integer in 1..{limit}")
    for key in ("sliding_window", "window_from_layer", "type_vocab_size"):  # 0 allowed
        v = config.get(key)
        if key in config and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= 1 << 24):
            raise ValueError(f"{source}: {key} = {v!r:.40}; expected an integer in 0..{1 << 24}")
    # eps above 1 or a RoPE base below 1 (frequencies above one turn per token) is no model's
    for key, lo, hi in (("norm_eps", 0.0, 1.0), ("rope_theta", 1.0, 1e12)):
        v = config.get(key)
        in_range = (lambda v: lo < v <= hi) if key == "norm_eps" else (lambda v: lo <= v <= hi)
        if key in config and (isinstance(v, bool) or not isinstance(v, (int, float, np.number))
                              or not math.isfinite(v) or not in_range(v)):
            raise ValueError(f"{source}: {key} = {v!r:.40}; expected a number in {'(' if key == 'norm_eps' else '['}{lo:g}, {hi:g}]")
    if config.get("n_kv_heads") and config.get("n_heads", 0) % config["n_kv_heads"]:
        raise ValueError(f"{source}: {config['n_heads']} query heads do not divide into "
                         f"{config['n_kv_heads']} key/value heads")
    layers = {int(m.group(1)) for name in tensors if (m := re.match(r"layers\.(\d+)\.", name))}
    if layers and "n_layers" in config and layers != set(range(config["n_layers"])):
        raise ValueError(f"{source}: the config says {config['n_layers']} layers; the file holds layer "
                         f"tensors for {len(layers)} (numbered {min(layers)}..{max(layers)})")


def open_checkpoint(source: str | Path, dtype: str = "auto") -> Checkpoint:
    """Read a GGUF file, an HF checkpoint directory or a converted checkpoint into a Checkpoint.

    dtype: "auto" keeps the stored formats; "f32", "bf16", "int8" (Q8_0 blocks) and "int4"
    (Q4_1 blocks; 4-bit sources keep theirs) convert every weight matrix in memory.
    """
    check_dtype(dtype)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path} (expected a .gguf file or a checkpoint directory)")
    if path.is_dir():
        from .converted import is_converted, read_converted
        from .hf import read_hf_dir
        ckpt = read_converted(path) if is_converted(path) else read_hf_dir(path)
    else:
        from .gguf import read_gguf
        ckpt = read_gguf(path)
    check_config(ckpt.config, ckpt.tensors, ckpt.source)
    if dtype != "auto":
        from .quantize import convert
        done = {}  # a tied head and the embedding are one matrix: convert it once
        for k, v in ckpt.tensors.items():
            if isinstance(v, QMatrix):
                # int4 puts the embedding table (often also the output head) at 8 bits, as
                # llama.cpp's 4-bit mixes do: 4-bit embeddings cost far more quality than bytes.
                # One that is 4-bit already stays as it is.
                target = dtype
                if dtype == "int4" and k in ("tok_embeddings", "output") and v.kind_name not in ("Q4_0", "Q4_1"):
                    target = "int8"
                done.setdefault(id(v), convert(v, target))
                ckpt.tensors[k] = done[id(v)]
    return ckpt
