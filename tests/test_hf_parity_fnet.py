"""fastinfer's FNet against HF transformers' FNetForMaskedLM, on random checkpoints in HF's layout.

torch and transformers come with the test extras (docs/performance.md, "FNet", has the figures).
"""
import numpy as np
import pytest

import fastinfer
from reference_fnet import FNET_TINY_CFG, random_fnet_weights, write_fnet_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = {**FNET_TINY_CFG, "vocab_size": 500, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 3,
        "max_position_embeddings": 512}
CASES = {
    "tied-prefixed-f32-T512": ({}, "fnet.", "float32", 512),
    "untied-bare-f16-gelu": ({"tie_word_embeddings": False, "hidden_act": "gelu"}, "", "float16", 100),
    "bf16-relu-eps1e-5-1type": ({"hidden_act": "relu", "layer_norm_eps": 1e-5, "type_vocab_size": 1},
                                "fnet.", "bfloat16", 37),
    "odd-width-short": ({"hidden_size": 30, "max_position_embeddings": 40}, "fnet.", "float32", 1),
}


def _hf_logits(d, ids):
    hf = transformers.FNetForMaskedLM.from_pretrained(str(d), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].double().numpy()


def _check(got, want):
    print(f"max |dlogit| {np.abs(got - want).max():.2e} (logits up to {np.abs(want).max():.1f})")
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_hf(tmp_path, name):
    over, prefix, dtype, T = CASES[name]
    cfg = {**BASE, **over}
    w = random_fnet_weights(cfg, seed=len(name), prefix=prefix, extras=True)
    d = write_fnet_dir(tmp_path / "f", cfg, w, dtype=dtype)
    ids = np.random.default_rng(T).integers(0, cfg["vocab_size"], T).tolist()
    _check(fastinfer.load(d).forward(ids), _hf_logits(d, ids))


def test_checkpoint_saved_by_hf(tmp_path):
    cfg = transformers.FNetConfig(vocab_size=300, hidden_size=40, num_hidden_layers=2, intermediate_size=64,
                                  max_position_embeddings=128, type_vocab_size=2, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    hf = transformers.FNetForMaskedLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():  # HF's init is near-degenerate (LayerNorm 1/0, biases 0)
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 and p.shape[0] == 40 else 0.0))
    hf.save_pretrained(str(tmp_path / "h"))
    write_fnet_dir(tmp_path / "tok", FNET_TINY_CFG, {})  # only for its tokenizer.json
    (tmp_path / "h" / "tokenizer.json").write_bytes((tmp_path / "tok" / "tokenizer.json").read_bytes())
    ids = np.random.default_rng(1).integers(0, 300, 128).tolist()
    _check(fastinfer.load(tmp_path / "h").forward(ids), _hf_logits(tmp_path / "h", ids))


@pytest.mark.parametrize("act", ["gelu_fast", "gelu_pytorch_tanh", "gelu_python", "silu", "quick_gelu", "tanh",
                                 "sigmoid", "linear", "relu6", "relu2", "gelu_10", "mish", "leaky_relu",
                                 "hardswish", "laplace"])
def test_activations_match_hf(tmp_path, act):
    cfg = {**BASE, "hidden_act": act, "num_hidden_layers": 2}
    w = random_fnet_weights(cfg, seed=3, prefix="fnet.")
    d = write_fnet_dir(tmp_path / "f", cfg, w)
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], 50).tolist()
    _check(fastinfer.load(d).forward(ids), _hf_logits(d, ids))
