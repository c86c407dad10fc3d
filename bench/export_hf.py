"""Write a llama GGUF (SmolLM2-135M-Instruct Q4_1 by default) as a Hugging Face LlamaForCausalLM
folder in float32, so that engines which cannot read GGUF (HF transformers, CTranslate2) run the
very same weights as fastinfer and llama.cpp; optionally convert that folder for CTranslate2.

    python bench/export_hf.py                      # -> $FASTINFER_HOME/bench/SmolLM2-135M-Instruct-hf-f32
    python bench/export_hf.py --model X.gguf --out DIR [--force]
    python bench/export_hf.py --ct2 int8 float32   # also -> .../SmolLM2-135M-Instruct-ct2-int8 (and -float32)

The folder holds config.json, generation_config.json, model.safetensors (float32),
tokenizer.json, tokenizer_config.json and chat_template.jinja. It is written under a temporary
name and renamed into place, so a folder that exists is complete.

Weights are dequantized by the `gguf` package's own NumPy dequantizers, not by fastinfer's
kernels, so comparing fastinfer with HF transformers on this folder checks fastinfer's GGUF
reading and forward pass against an independent path. The one thing shared with fastinfer is the
row order that undoes llama.cpp's Q/K permutation (HF's rotate-half RoPE needs it undone).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

from fastinfer.weights.gguf import _llama_cpp_rope_order, read_gguf
from fastinfer.weights.gguf_meta import open_gguf

# GGUF tensor role -> HF name (within model.layers.{i}.)
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def cache_home() -> Path:
    return Path(os.environ.get("FASTINFER_HOME") or Path.home() / ".cache" / "fastinfer").expanduser()


def default_out(gguf: Path) -> Path:
    """$FASTINFER_HOME/bench/<model>-hf-f32, next to compare.py's other derived models."""
    return cache_home() / "bench" / (gguf.name.split(".")[0] + "-hf-f32")


def _f32(t) -> np.ndarray:
    """One GGUF tensor as float32 of its (rows, cols) or (n,) shape."""
    kind = T(t.tensor_type)
    if kind in (T.F32, T.F16):
        return np.asarray(t.data, np.float32).reshape(t.shape)
    return quants.dequantize(np.asarray(t.data), kind).astype(np.float32).reshape(t.shape)


def _shortest(x: float) -> float:
    """A float32 metadata value as the short decimal HF configs use (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def hf_tensors(gguf: Path, cfg: dict) -> tuple[dict[str, np.ndarray], bool]:
    """HF-named float32 tensors and whether the output head is tied to the embeddings."""
    f = open_gguf(gguf)
    q_order = _llama_cpp_rope_order(cfg["n_heads"], cfg["head_dim"])
    k_order = _llama_cpp_rope_order(cfg["n_kv_heads"], cfg["head_dim"])
    out = {}
    for t in f.tensors:
        if t.name.startswith("blk."):
            _, i, role = t.name.split(".", 2)
            if role not in _LAYER_NAMES:
                raise ValueError(f"{gguf}: tensor {t.name} has no Hugging Face Llama counterpart")
            name = f"model.layers.{i}.{_LAYER_NAMES[role]}"
        elif t.name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[t.name]
        else:
            raise ValueError(f"{gguf}: tensor {t.name} has no Hugging Face Llama counterpart")
        a = _f32(t)
        if ".q_proj." in name:  # back from llama.cpp's interleaved RoPE rows to HF's rotate-half
            a = a[q_order]
        elif ".k_proj." in name:
            a = a[k_order]
        out[name] = np.ascontiguousarray(a)
    return out, "lm_head.weight" not in out


def hf_config(cfg: dict, tied: bool, biased: bool, bos: int | None, eos: list[int], pad: int | None) -> dict:
    if cfg.get("rope_scaling"):
        raise ValueError(f"RoPE scaling {cfg['rope_scaling']} is not exported (SmolLM2 has none)")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg["dim"],
        "intermediate_size": cfg["hidden_dim"],
        "num_hidden_layers": cfg["n_layers"],
        "num_attention_heads": cfg["n_heads"],
        "num_key_value_heads": cfg["n_kv_heads"],
        "head_dim": cfg["head_dim"],
        "vocab_size": cfg["vocab_size"],
        "max_position_embeddings": cfg["max_seq_len"],
        "rms_norm_eps": _shortest(cfg["norm_eps"]),
        "rope_theta": _shortest(cfg["rope_theta"]),
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": biased,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": bos,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder tmp to out; an old out is moved aside first, deleted last."""
    if out.exists():
        old = out.with_name(out.name + f".old{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def export(gguf: Path, out: Path, force: bool = False) -> Path:
    """Write the HF folder for `gguf` at `out` (through `out`.tmp, then a rename)."""
    from safetensors.numpy import save_file

    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; delete it or pass --force to replace it")
    ckpt = read_gguf(gguf)  # config, tokenizer and special ids, as fastinfer reads them
    cfg = ckpt.config
    tensors, tied = hf_tensors(gguf, cfg)
    biased = any(k.endswith("_proj.bias") for k in tensors)
    meta = open_gguf(gguf).metadata
    pad = meta.get("tokenizer.ggml.padding_token_id")
    tok = ckpt.tokenizer
    name = lambda i: None if i is None else tok.id_to_token(int(i))  # noqa: E731
    eos = ckpt.eos_ids or []
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(ckpt.bos_id), "eos_token": name(eos[0]) if eos else None,
        "unk_token": name(unk), "pad_token": name(pad),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_seq_len"],
    }
    gen_cfg = {"bos_token_id": ckpt.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
               "pad_token_id": pad, "do_sample": False}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        dump = lambda obj, fname: (tmp / fname).write_text(json.dumps(obj, indent=2) + "\n")  # noqa: E731
        dump(hf_config(cfg, tied, biased, ckpt.bos_id, eos, pad), "config.json")
        dump(gen_cfg, "generation_config.json")
        dump(tok_cfg, "tokenizer_config.json")
        (tmp / "tokenizer.json").write_text(tok.to_str())
        if ckpt.chat_template:
            (tmp / "chat_template.jinja").write_text(ckpt.chat_template)
        # "format": "pt" is what transformers' safetensors loader asks the metadata for.
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_ct2(hf_dir: Path, out: Path, quantization: str) -> Path:
    """Convert an HF folder with CTranslate2's own converter (what `ct2-transformers-converter
    --quantization Q` runs; it loads the model through transformers, so it needs torch)."""
    import ctranslate2
    import torch  # noqa: F401  (the converter catches these imports' failure and then dies of a NameError)
    import transformers  # noqa: F401

    if quantization not in CT2_QUANTIZATIONS:
        raise ValueError(f"CTranslate2 quantization must be one of {', '.join(CT2_QUANTIZATIONS)}; "
                         f"got {quantization!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(str(tmp), quantization=quantization,
                                                                          force=True)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# CTranslate2 storage types worth converting to on a CPU (bfloat16/float16 need AVX-512 or a GPU)
CT2_QUANTIZATIONS = ("int8", "float32")


def hf_model(gguf: Path) -> Path:
    """The HF folder for `gguf` in the bench cache, exported on first use."""
    out = default_out(gguf)
    return out if out.exists() else export(gguf, out)


def ct2_model(gguf: Path, quantization: str) -> Path:
    """The CTranslate2 model for `gguf` stored as `quantization`, converted on first use."""
    out = cache_home() / "bench" / (gguf.name.split(".")[0] + f"-ct2-{quantization}")
    return out if out.exists() else export_ct2(hf_model(gguf), out, quantization)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None,
                    help="the GGUF (default: $FASTINFER_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf)")
    ap.add_argument("--out", type=Path, default=None,
                    help="the folder to write (default: $FASTINFER_HOME/bench/<model>-hf-f32)")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    ap.add_argument("--ct2", nargs="*", default=[], choices=CT2_QUANTIZATIONS,
                    help="also convert the folder for CTranslate2 with these weight types (needs "
                         "ctranslate2, transformers and torch), into $FASTINFER_HOME/bench")
    args = ap.parse_args(argv)
    gguf = args.model or cache_home() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        ap.error(f"--model: {gguf} is not a file (expected a llama GGUF)")
    out = args.out or default_out(gguf)
    if args.ct2:
        try:
            import ctranslate2  # noqa: F401
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            ap.error(f"--ct2 converts with CTranslate2's converter, which needs ctranslate2, transformers "
                     f"and torch ({e})")
    try:
        if out.exists() and not args.force:
            print(f"{out} exists, kept (--force rewrites it)")
        else:
            print(export(gguf, out, force=args.force))
        for q in args.ct2:  # next to the HF folder, always rewritten
            print(export_ct2(out, out.with_name(out.name.removesuffix("-hf-f32") + f"-ct2-{q}"), q))
    except ValueError as e:
        ap.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
