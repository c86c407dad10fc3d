"""HF FNet checkpoints (FNetModel, FNetForMaskedLM, FNetForPreTraining): config and tensor names.

The one place that knows FNet's HF names; `hf.read_hf_dir` dispatches here on model_type "fnet".
Names may carry the `fnet.` prefix (the task models) or not (a bare FNetModel).

Head tying follows transformers 5: the decoder's weight is the word embedding table and its bias
is cls.predictions.bias *unless the file holds cls.predictions.decoder.{weight,bias} itself*, in
which case the stored tensors are used (checked against transformers 5.24).
"""
import re

from .checkpoint import ConfigReader

# HF activation name -> fastinfer.kernels.ops activation code
ACTIVATIONS = {
    "gelu_new": 0, "gelu_pytorch_tanh": 0, "gelu_fast": 0, "gelu_accurate": 0, "gelu_python_tanh": 0,
    "gelu": 1, "gelu_python": 1, "relu": 2, "silu": 3, "swish": 3, "quick_gelu": 4, "tanh": 5,
    "sigmoid": 6, "linear": 7, "relu6": 8, "relu2": 9, "gelu_10": 10, "mish": 11, "leaky_relu": 12,
    "hardswish": 13, "laplace": 14,
}

# (canonical name, transpose?) -- FNet's Linear layers are stored (out, in) already
_GLOBAL = {
    "embeddings.word_embeddings.weight": "tok_embeddings",
    "embeddings.position_embeddings.weight": "pos_embeddings",
    "embeddings.token_type_embeddings.weight": "type_embeddings",
    "embeddings.LayerNorm.weight": "emb_norm", "embeddings.LayerNorm.bias": "emb_norm_bias",
    "embeddings.projection.weight": "emb_proj", "embeddings.projection.bias": "emb_proj_bias",
    "cls.predictions.transform.dense.weight": "head_dense",
    "cls.predictions.transform.dense.bias": "head_dense_bias",
    "cls.predictions.transform.LayerNorm.weight": "head_norm",
    "cls.predictions.transform.LayerNorm.bias": "head_norm_bias",
    "cls.predictions.decoder.weight": "output",
    "cls.predictions.decoder.bias": "output_bias",
    "cls.predictions.bias": "head_bias",
}
_LAYER_NAMES = {
    "fourier.output.LayerNorm.weight": "mix_norm", "fourier.output.LayerNorm.bias": "mix_norm_bias",
    "intermediate.dense.weight": "w1", "intermediate.dense.bias": "b1",
    "output.dense.weight": "w2", "output.dense.bias": "b2",
    "output.LayerNorm.weight": "ffn_norm", "output.LayerNorm.bias": "ffn_norm_bias",
}
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
# Parts of the task models fastinfer does not run, and buffers (older exports saved position_ids;
# use_tpu_fourier_optimizations saves its DFT matrices: the same transform, computed by FFT here).
_IGNORED = re.compile(r"(pooler\..*|cls\.seq_relationship\..*|embeddings\.(position_ids|token_type_ids)"
                      r"|encoder\.layer\.\d+\.fourier\.self\.dft_mat_(hidden|seq))")


def fnet_canonical(name: str) -> str | None:
    """HF tensor name -> fastinfer name (None: ignored). Unknown names are an error."""
    bare = name.removeprefix("fnet.")
    if bare in _GLOBAL:
        return _GLOBAL[bare]
    m = _LAYER.fullmatch(bare)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    if _IGNORED.fullmatch(bare):
        return None
    raise ValueError(f"unexpected tensor {name!r} for an FNet checkpoint")


def fnet_config(cfg: dict, d) -> dict:
    act = cfg.get("hidden_act", "gelu_new")
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise ValueError(f"{d}: FNet hidden_act {act!r:.40} is not supported (supported: {', '.join(ACTIVATIONS)})")
    # A missing key takes FNetConfig's default, as transformers does.
    c = ConfigReader(cfg, d)
    return {"arch": "fnet", "dim": c.int("hidden_size", 768), "n_layers": c.int("num_hidden_layers", 12),
            "hidden_dim": c.int("intermediate_size", 3072), "vocab_size": c.int("vocab_size", 32000),
            "max_seq_len": c.int("max_position_embeddings", 512),
            "type_vocab_size": c.int("type_vocab_size", 4),
            "norm_eps": c.float("layer_norm_eps", 1e-12), "activation": act,
            "tied": bool(cfg.get("tie_word_embeddings", True))}
