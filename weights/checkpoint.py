"""A checkpoint in fastinfer's vocabulary, whatever file it came from.

Readers (`gguf.py`, `hf.py`) translate their format's names into one set, the only place where
format-specific names appear:

    config   dict with: arch, dim, n_layers, n_heads, n_kv_heads, head_dim, hidden_dim,
             vocab_size, norm_eps, rope_theta, rope_scaling, max_seq_len
    tensors  tok_embeddings, norm, output (absent when tied),
             layers.{i}.attention_norm / ffn_norm        f32 vectors
             layers.{i}.wq wk wv wo w1 w2 w3             QMatrix (w1 gate, w2 down, w3 up)
             layers.{i}.bq bk bv                         f32 vectors, optional (Qwen2)
             rope_freqs                                  f32 (head_dim // 2,), optional
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from .tensors import QMatrix, to_f32

DTYPES = ("auto", "f32")


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


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return dtype


def open_checkpoint(source: str | Path, dtype: str = "auto") -> Checkpoint:
    """Read a GGUF file or an HF checkpoint directory into a Checkpoint."""
    check_dtype(dtype)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path} (expected a .gguf file or a checkpoint directory)")
    if path.is_dir():
        from .hf import read_hf_dir
        ckpt = read_hf_dir(path)
    else:
        from .gguf import read_gguf
        ckpt = read_gguf(path)
    if dtype == "f32":
        ckpt.tensors = {k: to_f32(v) if isinstance(v, QMatrix) else v for k, v in ckpt.tensors.items()}
    return ckpt
