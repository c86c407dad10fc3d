"""Self-checks for tests/reference_gpt2.py (the independent GPT-2 reference).

No torch / transformers and no fastinfer import: these checks make the NumPy
reference trustworthy on its own.

Real-checkpoint layout source (see reference_gpt2 module docstring): the HF
openai-community/gpt2 model.safetensors stores un-prefixed names (``wte.weight``,
``h.0.attn.c_attn.weight`` ...), Conv1D weights as (in, out) e.g. c_attn (768, 2304),
c_fc (768, 3072), mlp.c_proj (3072, 768), one ``h.{i}.attn.bias`` causal buffer of
shape (1, 1, 1024, 1024) per layer, no ``attn.masked_bias`` and no ``lm_head.weight``
(160 tensors).  Cf. HF transformers issue #1419 (attn.bias [1,1,1024,1024]),
ggml-org/ggml PR #35 (variable listing with shapes) and the "newly initialized:
[h.*.attn.masked_bias, lm_head.weight]" warning when loading ``gpt2``.
"""
import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import reference_gpt2 as R  # noqa: E402

CFG = R.GPT2_TINY_CFG


@pytest.fixture(scope="module")
def weights():
    return R.random_gpt2_weights(CFG, seed=0)


def test_config_keys_like_real_gpt2():
    real_keys = {"activation_function", "architectures", "attn_pdrop", "bos_token_id",
                 "embd_pdrop", "eos_token_id", "initializer_range", "layer_norm_epsilon",
                 "model_type", "n_ctx", "n_embd", "n_head", "n_layer", "n_positions",
                 "resid_pdrop", "summary_activation", "summary_first_dropout",
                 "summary_proj_to_labels", "summary_type", "summary_use_proj",
                 "task_specific_params", "vocab_size"}
    assert real_keys <= set(CFG)
    assert CFG["model_type"] == "gpt2" and CFG["architectures"] == ["GPT2LMHeadModel"]
    assert CFG["activation_function"] == "gelu_new" and CFG["n_inner"] is None
    assert CFG["n_embd"] % CFG["n_head"] == 0


def test_real_gpt2_layout_shapes():
    # The real 12-layer gpt2 checkpoint: 13 tensors/layer + wte, wpe, ln_f.{weight,bias}.
    real = dict(CFG, n_embd=768, n_head=12, n_layer=12, n_positions=1024, vocab_size=50257)
    s = R.gpt2_weight_shapes(real)
    assert len(s) == 160
    assert s["wte.weight"] == (50257, 768)
    assert s["wpe.weight"] == (1024, 768)
    assert s["h.0.attn.bias"] == (1, 1, 1024, 1024)
    assert s["h.0.attn.c_attn.weight"] == (768, 2304)
    assert s["h.0.attn.c_attn.bias"] == (2304,)
    assert s["h.0.attn.c_proj.weight"] == (768, 768)
    assert s["h.11.mlp.c_fc.weight"] == (768, 3072)
    assert s["h.11.mlp.c_proj.weight"] == (3072, 768)
    assert s["ln_f.bias"] == (768,)
    assert not any(k.startswith("transformer.") for k in s)
    assert "lm_head.weight" not in s
    assert not any(k.endswith("masked_bias") for k in s)


def test_random_weights_names_shapes_and_variants(weights):
    d, L = CFG["n_embd"], CFG["n_layer"]
    assert set(weights) == set(R.gpt2_weight_shapes(CFG))
    assert len(weights) == 13 * L + 4
    for k, v in weights.items():
        assert v.dtype == np.float32, k
    assert weights["h.0.attn.c_attn.weight"].shape == (d, 3 * d)
    assert weights["h.2.mlp.c_proj.weight"].shape == (4 * d, d)
    assert weights["h.1.attn.bias"].shape == (1, 1, 128, 128)
    np.testing.assert_array_equal(weights["h.1.attn.bias"][0, 0], np.tril(np.ones((128, 128))))
    assert abs(weights["h.0.ln_1.weight"].mean() - 1) < 0.1

    p = R.random_gpt2_weights(CFG, seed=0, prefix="transformer.", with_buffers=False)
    assert all(k.startswith("transformer.") for k in p)
    assert not any(k.endswith("attn.bias") and "c_attn" not in k for k in p)
    assert len(p) == 12 * L + 4
    np.testing.assert_array_equal(p["transformer.wte.weight"], weights["wte.weight"])

    full = R.random_gpt2_weights(CFG, prefix="transformer.", with_masked_bias=True,
                                 with_lm_head=True)
    assert full["transformer.h.0.attn.masked_bias"].shape == ()
    np.testing.assert_array_equal(full["lm_head.weight"], full["transformer.wte.weight"])


def test_forward_variants_agree(weights):
    ids = [5, 17, 0, 299, 42, 42, 7]
    ref = R.gpt2_forward(weights, CFG, ids)
    assert ref.shape == (len(ids), CFG["vocab_size"]) and ref.dtype == np.float32
    assert np.isfinite(ref).all()
    assert 0.05 < ref.std() < 10
    p = R.random_gpt2_weights(CFG, seed=0, prefix="transformer.", with_buffers=False,
                              with_masked_bias=True, with_lm_head=True)
    np.testing.assert_array_equal(R.gpt2_forward(p, CFG, ids), ref)
    other = R.random_gpt2_weights(CFG, seed=1)
    assert not np.allclose(R.gpt2_forward(other, CFG, ids), ref)


def test_causality(weights):
    rng = np.random.default_rng(3)
    ids = rng.integers(0, CFG["vocab_size"], size=20)
    ref = R.gpt2_forward(weights, CFG, ids)
    for t in (0, 5, 13):
        ids2 = ids.copy()
        ids2[t + 1:] = rng.integers(0, CFG["vocab_size"], size=len(ids) - t - 1)
        out = R.gpt2_forward(weights, CFG, ids2)
        np.testing.assert_allclose(out[: t + 1], ref[: t + 1], rtol=1e-6, atol=1e-6)
        assert not np.allclose(out[t + 1:], ref[t + 1:])
    # prefix property: forward of a prefix equals the prefix of the forward
    np.testing.assert_allclose(R.gpt2_forward(weights, CFG, ids[:9]), ref[:9], rtol=1e-6, atol=1e-6)
    # changing an earlier token does change later positions
    ids3 = ids.copy()
    ids3[0] = (ids3[0] + 1) % CFG["vocab_size"]
    assert not np.allclose(R.gpt2_forward(weights, CFG, ids3)[-1], ref[-1])


def _naive_forward(weights, cfg, ids):
    """Second, loop-based implementation (per head / per position, math module)."""
    W = {k.replace("transformer.", ""): np.asarray(v, np.float64) for k, v in weights.items()}
    d, H = cfg["n_embd"], cfg["n_head"]
    hd = d // H
    eps = cfg["layer_norm_epsilon"]

    def ln(v, g, b):
        mu = sum(v) / len(v)
        var = sum((e - mu) ** 2 for e in v) / len(v)
        return np.array([(e - mu) / math.sqrt(var + eps) for e in v]) * g + b

    def gelu(z):
        return np.array([0.5 * e * (1 + math.tanh(math.sqrt(2 / math.pi) * (e + 0.044715 * e ** 3)))
                         for e in z])

    xs = [W["wte.weight"][t] + W["wpe.weight"][pos] for pos, t in enumerate(ids)]
    for i in range(cfg["n_layer"]):
        p = f"h.{i}."
        qkv = [ln(x, W[p + "ln_1.weight"], W[p + "ln_1.bias"]) @ W[p + "attn.c_attn.weight"]
               + W[p + "attn.c_attn.bias"] for x in xs]
        new = []
        for t in range(len(xs)):
            heads = []
            for h in range(H):
                q = qkv[t][h * hd:(h + 1) * hd]
                sc = [float(q @ qkv[s][d + h * hd:d + (h + 1) * hd]) / math.sqrt(hd)
                      for s in range(t + 1)]
                mx = max(sc)
                ex = [math.exp(c - mx) for c in sc]
                z = sum(ex)
                heads.append(sum(ex[s] / z * qkv[s][2 * d + h * hd:2 * d + (h + 1) * hd]
                                 for s in range(t + 1)))
            o = np.concatenate(heads)
            x = xs[t] + o @ W[p + "attn.c_proj.weight"] + W[p + "attn.c_proj.bias"]
            m = ln(x, W[p + "ln_2.weight"], W[p + "ln_2.bias"])
            x = x + gelu(m @ W[p + "mlp.c_fc.weight"] + W[p + "mlp.c_fc.bias"]) \
                @ W[p + "mlp.c_proj.weight"] + W[p + "mlp.c_proj.bias"]
            new.append(x)
        xs = new
    return np.stack([ln(x, W["ln_f.weight"], W["ln_f.bias"]) @ W["wte.weight"].T for x in xs])


def test_matches_naive_loop_implementation(weights):
    ids = [3, 250, 0, 9, 9, 120]
    np.testing.assert_allclose(R.gpt2_forward(weights, CFG, ids), _naive_forward(weights, CFG, ids),
                               rtol=1e-5, atol=1e-5)


def test_single_token_attention_is_value_passthrough(weights):
    # With T == 1 softmax is exactly 1, so attn output == v of the token.
    W = {k: v.astype(np.float64) for k, v in weights.items()}
    cfg1 = dict(CFG, n_layer=1)
    tok = 11
    d = CFG["n_embd"]
    x = W["wte.weight"][tok] + W["wpe.weight"][0]
    a = R.layer_norm(x, W["h.0.ln_1.weight"], W["h.0.ln_1.bias"], 1e-5)
    v = (a @ W["h.0.attn.c_attn.weight"] + W["h.0.attn.c_attn.bias"])[2 * d:]
    x = x + v @ W["h.0.attn.c_proj.weight"] + W["h.0.attn.c_proj.bias"]
    m = R.layer_norm(x, W["h.0.ln_2.weight"], W["h.0.ln_2.bias"], 1e-5)
    x = x + R.gelu_new(m @ W["h.0.mlp.c_fc.weight"] + W["h.0.mlp.c_fc.bias"]) \
        @ W["h.0.mlp.c_proj.weight"] + W["h.0.mlp.c_proj.bias"]
    logits = R.layer_norm(x, W["ln_f.weight"], W["ln_f.bias"], 1e-5) @ W["wte.weight"].T
    np.testing.assert_allclose(R.gpt2_forward(weights, cfg1, [tok])[0], logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("x", [-3.0, -1.0, -0.5, 0.0, 0.1, 0.5, 1.0, 2.0, 5.0])
def test_gelu_new_values(x):
    expected = 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    assert R.gelu_new(np.array([x]))[0] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_gelu_new_known_points():
    # gelu_new approximates exact GELU x*Phi(x) to ~1e-3; gelu(0) = 0; gelu(x)-gelu(-x) = x.
    xs = np.linspace(-4, 4, 33)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in xs])
    np.testing.assert_allclose(R.gelu_new(xs), exact, atol=1e-3)
    np.testing.assert_allclose(R.gelu_new(xs) - R.gelu_new(-xs), xs, atol=1e-12)
    assert R.gelu_new(np.array([1.0]))[0] == pytest.approx(0.8411919906082768, abs=1e-12)


def test_layer_norm_constant_plus_noise():
    rng = np.random.default_rng(0)
    n = 64
    noise = 1e-2 * rng.standard_normal(n)
    x = 7.0 + noise
    g = np.ones(n)
    b = np.zeros(n)
    y = R.layer_norm(x, g, b, 1e-5)
    c = noise - noise.mean()
    var = (c ** 2).mean()  # biased
    np.testing.assert_allclose(y, c / math.sqrt(var + 1e-5), rtol=1e-9)
    # eps matters here (var ~ 1e-4 vs eps 1e-5): unbiased variance or no-eps would differ
    assert not np.allclose(y, c / math.sqrt(var))
    assert not np.allclose(y, c / math.sqrt(c.var(ddof=1) + 1e-5))
    # pure constant -> all zeros then bias
    bb = np.arange(n, dtype=np.float64)
    np.testing.assert_allclose(R.layer_norm(np.full(n, 3.0), 2 * g, bb, 1e-5), bb)
    # scale/shift
    y2 = R.layer_norm(x, 2 * g, b + 0.5, 1e-5)
    np.testing.assert_allclose(y2, 2 * y + 0.5)
    assert abs(y.mean()) < 1e-12


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_dir_round_trip(tmp_path, weights, dtype):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    d = R.write_gpt2_dir(tmp_path / "m", CFG, weights, dtype=dtype, tokenizer_files=False)
    assert sorted(os.listdir(d)) == ["config.json", "generation_config.json", "model.safetensors"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg == json.loads(json.dumps(CFG)) and cfg["n_inner"] is None
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["bos_token_id"] == CFG["bos_token_id"] and gen["eos_token_id"] == CFG["eos_token_id"]
    back = load_file(str(d / "model.safetensors"))
    assert set(back) == set(weights)
    for k, v in weights.items():
        assert back[k].dtype == np.dtype(dtype), k
        assert back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v.astype(dtype))
    with safe_open(str(d / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
    if dtype == "float16":
        # fp16 logits close to fp32 logits; exactly equal to forward on the fp16 values
        ids = [1, 2, 3, 4]
        np.testing.assert_allclose(R.gpt2_forward(back, CFG, ids), R.gpt2_forward(weights, CFG, ids),
                                   atol=0.02)


def test_tokenizer_files(tmp_path, weights):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    d = R.write_gpt2_dir(tmp_path / "m", CFG, weights, tokenizer_files=True)
    files = set(os.listdir(d))
    assert {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"} <= files
    assert "tokenizer.json" not in files
    vocab = json.loads((d / "vocab.json").read_text())
    assert len(vocab) == CFG["vocab_size"] and vocab["<|endoftext|>"] == 0
    assert sorted(vocab.values()) == list(range(CFG["vocab_size"]))
    merges = [ln for ln in (d / "merges.txt").read_text().splitlines()
              if ln and not ln.startswith("#version")]
    assert len(merges) == CFG["vocab_size"] - 257
    stm = json.loads((d / "special_tokens_map.json").read_text())
    assert stm == {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>"}
    tc = json.loads((d / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "GPT2Tokenizer" and tc["eos_token"] == "<|endoftext|>"

    tok = Tokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    for text in ["Hello world! The quick brown fox.", "  spaces\tand\nnewlines", "héllo ünïcode ✓ 123"]:
        ids = tok.encode(text).ids
        assert all(0 <= i < CFG["vocab_size"] for i in ids)
        assert tok.decode(ids) == text
    # merges are actually used on in-domain text
    assert len(tok.encode("the the the").ids) < len("the the the")
    # forward accepts tokenizer output
    assert R.gpt2_forward(weights, CFG, tok.encode("Hello world").ids).shape[1] == CFG["vocab_size"]


def test_tokenizer_json_flag(tmp_path, weights):
    from tokenizers import Tokenizer

    d = R.write_gpt2_dir(tmp_path / "m", CFG, weights, tokenizer_json=True)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert tok.get_vocab_size() == CFG["vocab_size"]
    text = "Hello there, world."
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.token_to_id("<|endoftext|>") == 0


def test_masked_bias_variant_round_trip(tmp_path):
    from safetensors.numpy import load_file

    w = R.random_gpt2_weights(CFG, prefix="transformer.", with_masked_bias=True, with_lm_head=True)
    d = R.write_gpt2_dir(tmp_path / "m", CFG, w, dtype="float16", tokenizer_files=False)
    back = load_file(str(d / "model.safetensors"))
    assert back["transformer.h.2.attn.masked_bias"].shape == ()
    assert back["lm_head.weight"].dtype == np.float16
