"""Hugging Face checkpoint directories -> Checkpoint. The one place that knows HF's names.

Reads config.json, model.safetensors (or shards listed in model.safetensors.index.json),
tokenizer.json, tokenizer_config.json, chat_template.jinja and generation_config.json.
"""
import json
import re
from pathlib import Path

import numpy as np
import tokenizers

from fastinfer.kernels import linear as K

from .checkpoint import REQUIRED, Checkpoint, ConfigReader
from .hf_fnet import fnet_canonical, fnet_config
from .safetensors_mmap import read_safetensors, unique_keys
from .tensors import from_f32, from_half_bits

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "fnet", "gemma3_text")

_LAYER_NAMES = {
    "input_layernorm.weight": "attention_norm", "post_attention_layernorm.weight": "ffn_norm",
    "self_attn.q_proj.weight": "wq", "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv", "self_attn.o_proj.weight": "wo",
    "self_attn.q_proj.bias": "bq", "self_attn.k_proj.bias": "bk", "self_attn.v_proj.bias": "bv",
    "mlp.gate_proj.weight": "w1", "mlp.down_proj.weight": "w2", "mlp.up_proj.weight": "w3",
    "self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm",  # Qwen3
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "tok_embeddings", "model.norm.weight": "norm",
                 "lm_head.weight": "output"}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")

# GPT-2: (canonical name, transpose?) -- its Conv1D projections are stored (in, out)
_GPT2_LAYER_NAMES = {
    "ln_1.weight": ("attention_norm", False), "ln_1.bias": ("attention_norm_bias", False),
    "attn.c_attn.weight": ("wqkv", True), "attn.c_attn.bias": ("bqkv", False),
    "attn.c_proj.weight": ("wo", True), "attn.c_proj.bias": ("bo", False),
    "ln_2.weight": ("ffn_norm", False), "ln_2.bias": ("ffn_norm_bias", False),
    "mlp.c_fc.weight": ("w1", True), "mlp.c_fc.bias": ("b1", False),
    "mlp.c_proj.weight": ("w2", True), "mlp.c_proj.bias": ("b2", False),
}
_GPT2_GLOBAL_NAMES = {"wte.weight": "tok_embeddings", "wpe.weight": "pos_embeddings", "ln_f.weight": "norm",
                      "ln_f.bias": "norm_bias"}
_GPT2_LAYER = re.compile(r"h\.(\d+)\.(.+)")


def _gpt2_canonical(name: str) -> tuple[str, bool] | None:
    name = name.removeprefix("transformer.")
    if name in _GPT2_GLOBAL_NAMES:
        return _GPT2_GLOBAL_NAMES[name], False
    if name == "lm_head.weight":  # GPT-2 always ties its head to wte
        return None
    m = _GPT2_LAYER.fullmatch(name)
    if m and m.group(2) in _GPT2_LAYER_NAMES:
        key, transpose = _GPT2_LAYER_NAMES[m.group(2)]
        return f"layers.{m.group(1)}.{key}", transpose
    if m and m.group(2) in ("attn.bias", "attn.masked_bias"):  # causal-mask buffers of old exports
        return None
    raise ValueError(f"unexpected tensor {name!r} for a GPT-2 checkpoint")


def _canonical(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    if name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved; recomputed
        return None
    raise ValueError(f"unexpected tensor {name!r} for a Llama-family checkpoint")


def _read_json(path: Path, required: bool = False) -> dict:
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path.parent}: missing {path.name}")
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not valid JSON ({str(e) or type(e).__name__})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} is not a JSON object")
    return value


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason})") from None


def _weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index}: expected a weight_map of tensor names to shard file names")
        files = sorted(set(weight_map.values()))
        # shards are files in the model folder itself: no path may lead out of it
        outside = [f for f in files if Path(f).name != f or f in (".", "..")]
        if outside:
            raise ValueError(f"{index}: shard {outside[0]!r} is not a file name in {d}")
        missing = [f for f in files if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{d}: shards listed in {index.name} are missing: {', '.join(missing)}")
        return [d / f for f in files]
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d}: no model.safetensors (or sharded *.safetensors with an index) found")
    return files


def _tensor(dtype: str, arr: np.ndarray, name: str, source: Path, transpose: bool = False):
    if transpose:
        arr = arr.T
    if arr.ndim == 1:
        return (arr.view(np.uint16).astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" \
            else np.asarray(arr, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{source}: tensor {name} has shape {arr.shape}; expected a vector or a matrix")
    if dtype == "F16":
        return from_half_bits(arr.view(np.uint16), K.F16)
    if dtype == "BF16":
        return from_half_bits(arr, K.BF16)
    if dtype in ("F32", "F64"):
        return from_f32(arr)
    raise ValueError(f"{source}: tensor {name} has dtype {dtype}; expected F32, F16 or BF16")




def _gpt2_config(cfg: dict, d: Path) -> dict:
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{d}: GPT-2 activation {act!r:.40} is not supported (gelu_new is)")
    c = ConfigReader(cfg, d)
    dim = c.int("n_embd", REQUIRED)
    return {"arch": "gpt2", "dim": dim, "n_layers": c.int("n_layer", REQUIRED), "n_heads": c.int("n_head", REQUIRED),
            "hidden_dim": c.int("n_inner") or 4 * dim, "vocab_size": c.int("vocab_size", REQUIRED),
            "max_seq_len": c.int("n_positions") or c.int("n_ctx") or 1024,
            "norm_eps": c.float("layer_norm_epsilon", 1e-5)}


def _sliding_window(c: ConfigReader, model_type: str) -> dict:
    """Mistral: every layer sees the last `sliding_window` keys; Qwen2: only with
    use_sliding_window, and only layers from max_window_layers on (HF's layer_types rule)."""
    window = c.int("sliding_window", 0)
    if not window:
        return {}
    if model_type == "mistral":
        return {"sliding_window": window, "window_from_layer": 0}
    if model_type in ("qwen2", "qwen3") and c.cfg.get("use_sliding_window"):
        return {"sliding_window": window, "window_from_layer": c.int("max_window_layers", 0)}
    return {}


def _spec(model_type):
    """The Architecture that reads this model_type's names and config itself, or None."""
    from fastinfer.models import BY_HF_TYPE, architecture
    return architecture(BY_HF_TYPE[model_type]) if isinstance(model_type, str) and model_type in BY_HF_TYPE else None


def _spec_canonical(spec, name: str) -> str | None:
    """An architecture's HF tensor name -> canonical, from the tables it declares."""
    if name in spec.hf_global_names:
        return spec.hf_global_names[name]
    m = _LAYER.fullmatch(name)
    if m and m.group(2) in spec.hf_layer_names:
        return f"layers.{m.group(1)}.{spec.hf_layer_names[m.group(2)]}"
    if name.endswith("rotary_emb.inv_freq"):
        return None
    raise ValueError(f"unexpected tensor {name!r} for a {spec.name} checkpoint")


def _config(cfg: dict, d: Path) -> dict:
    if not isinstance(cfg, dict):
        raise ValueError(f"{d}/config.json is not a JSON object")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{d}: unsupported model_type {model_type!r:.40}; fastinfer reads "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    spec = _spec(model_type)
    if spec is not None:
        return spec.hf_config(ConfigReader(cfg, d), cfg, str(d))
    if model_type == "gpt2":
        return _gpt2_config(cfg, d)
    if model_type == "fnet":
        return fnet_config(cfg, d)
    c = ConfigReader(cfg, d)
    dim, n_heads = c.int("hidden_size", REQUIRED), c.int("num_attention_heads", REQUIRED)
    rope = cfg.get("rope_scaling") or None
    if rope is not None:
        kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else rope
        if kind == "default":
            rope = None
        elif kind not in ("llama3", "linear"):
            raise ValueError(f"{d}: unsupported rope_scaling type {kind!r:.40} (supported: llama3, linear)")
        else:
            rope = dict(rope, rope_type=kind)
    return {
        "arch": "llama",
        "dim": dim,
        "n_layers": c.int("num_hidden_layers", REQUIRED),
        "n_heads": n_heads,
        "n_kv_heads": c.int("num_key_value_heads") or n_heads,
        "head_dim": c.int("head_dim") or dim // max(n_heads, 1),
        "hidden_dim": c.int("intermediate_size", REQUIRED),
        "vocab_size": c.int("vocab_size", REQUIRED),
        "norm_eps": c.float("rms_norm_eps", 1e-6),
        "rope_theta": c.float("rope_theta", 10000.0),
        "rope_scaling": rope,
        "max_seq_len": c.int("max_position_embeddings", 2048),
        **_sliding_window(c, model_type),
        **({"qk_norm": True} if model_type == "qwen3" else {}),
    }


def _tokenizer(d: Path) -> tokenizers.Tokenizer:
    """tokenizer.json, or else GPT-2's vocab.json + merges.txt as a byte-level BPE."""
    try:
        if (d / "tokenizer.json").is_file():
            return tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        if (d / "spiece.model").is_file():  # FNet/ALBERT ship a SentencePiece model
            from .sentencepiece import albert_tokenizer
            tcfg = _read_json(d / "tokenizer_config.json")
            return albert_tokenizer(d / "spiece.model", do_lower_case=tcfg.get("do_lower_case", True),
                                    keep_accents=tcfg.get("keep_accents", False))
        vocab, merges = d / "vocab.json", d / "merges.txt"
        if not (vocab.is_file() and merges.is_file()):
            raise FileNotFoundError(f"{d}: no tokenizer: expected tokenizer.json, spiece.model, or vocab.json "
                                    "and merges.txt")
        tok = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(vocab), str(merges)))
    except (FileNotFoundError, ValueError):
        raise
    except Exception as e:  # tokenizers raises a bare Exception on unreadable files
        raise ValueError(f"{d}: the tokenizer files are not valid ({e})") from None
    # What HF's GPT2TokenizerFast does with the same two files: byte-level, no prefix space.
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    special = _read_json(d / "special_tokens_map.json")
    names = {v["content"] if isinstance(v, dict) else v for v in special.values() if isinstance(v, (str, dict))}
    names |= {"<|endoftext|>"} if tok.token_to_id("<|endoftext|>") is not None else set()
    tok.add_special_tokens(sorted(n for n in names if tok.token_to_id(n) is not None))
    return tok


def _in(f: Path, canonical, name: str):
    """canonical(name), its ValueError naming the file."""
    try:
        return canonical(name)
    except ValueError as e:
        raise ValueError(f"{f}: {e}") from None


def read_hf_dir(d: Path) -> Checkpoint:
    cfg = _read_json(d / "config.json", required=True)
    config = _config(cfg, d)
    gpt2 = config["arch"] == "gpt2"
    spec = _spec(cfg.get("model_type"))
    tensors = {}
    for f in _weight_files(d):
        for name, (dtype, arr) in read_safetensors(f).items():
            if spec is not None:
                key, transpose = _in(f, lambda n: _spec_canonical(spec, n), name), False
            elif gpt2:
                key, transpose = _in(f, _gpt2_canonical, name) or (None, False)
            elif config["arch"] == "fnet":
                key, transpose = _in(f, fnet_canonical, name), False
            else:
                key, transpose = _in(f, _canonical, name), False
            if key is not None:
                if key in tensors:
                    raise ValueError(f"{f}: tensor {name} appears twice in the checkpoint")
                tensors[key] = _tensor(dtype, arr, name, f, transpose)

    if cfg.get("tie_word_embeddings", False) and config["arch"] != "fnet":  # HF ties even when a stale lm_head was saved
        tensors.pop("output", None)
    elif config["arch"] in ("llama", "gemma3") and "output" not in tensors:
        raise ValueError(f"{d}: the checkpoint lacks lm_head.weight and config.json does not tie it to "
                         f"the embeddings (tie_word_embeddings is false)")

    if spec is not None:  # norms stored as w for a (1 + w) RMSNorm: held as 1 + w
        for key in [k for k in tensors if k.rsplit(".", 1)[-1] in spec.hf_norms]:
            if isinstance(tensors[key], np.ndarray):
                tensors[key] = (np.float32(1.0) + tensors[key].astype(np.float32)).astype(np.float32)
    tok = _tokenizer(d)

    tcfg = _read_json(d / "tokenizer_config.json")
    gen = _read_json(d / "generation_config.json")
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if (d / "chat_template.jinja").is_file():
        template = _read_text(d / "chat_template.jinja")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{d}/tokenizer_config.json: chat_template is not a string")

    def token_id(value):
        if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config files
            value = value.get("content")
        return tok.token_to_id(value) if isinstance(value, str) else None

    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    if eos is None:
        eos = token_id(tcfg.get("eos_token"))
    eos_ids = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    if bos is None:
        bos = token_id(tcfg.get("bos_token"))
    vocab = config["vocab_size"]
    for v in eos_ids + ([] if bos is None else [bos]):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab:
            raise ValueError(f"{d}: a BOS/EOS token id is {v!r:.40}; expected a token id below {vocab}")
    generation = {k: gen[k] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                      "do_sample", "max_new_tokens", "max_length", "num_beams", "no_repeat_ngram_size",
                                      "length_penalty", "early_stopping", "min_new_tokens") if k in gen}
    generation.setdefault("do_sample", False)  # HF's default: greedy unless the folder says otherwise
    return Checkpoint(config=config, tensors=tensors, tokenizer=tok,
                      bos_id=None if bos is None else int(bos), eos_ids=eos_ids,
                      chat_template=template, generation=generation, source=str(d))
