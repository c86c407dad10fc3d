"""FNet from HF folders: random checkpoints in the real layout against the NumPy reference."""
import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

import fastinfer
from fastinfer.convert import convert
from reference_fnet import FNET_TINY_CFG, fnet_forward, random_fnet_weights, stored, write_fnet_dir

IDS = [1, 5, 9, 22, 7, 100, 3, 2, 149, 0, 64, 64, 17]


def _close(got, want, tol=2e-5):
    """Logits within tol of the reference's scale, and the same top-1 token at every position."""
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max())
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("prefix,tied,act", [("fnet.", True, "gelu_new"), ("", True, "gelu"),
                                             ("fnet.", False, "relu"), ("", False, "gelu_pytorch_tanh")])
def test_logits_match_reference(tmp_path, prefix, tied, act):
    cfg = {**FNET_TINY_CFG, "tie_word_embeddings": tied, "hidden_act": act}
    w = random_fnet_weights(cfg, seed=1, prefix=prefix, extras=not tied)
    model = fastinfer.load(write_fnet_dir(tmp_path / "f", cfg, w))
    _close(model.forward(IDS), fnet_forward(w, cfg, IDS)[1])


@pytest.mark.parametrize("act", ["silu", "quick_gelu", "tanh", "sigmoid", "linear", "relu6", "relu2", "gelu_10",
                                 "mish", "leaky_relu", "hardswish", "laplace", "gelu_fast"])
def test_every_supported_activation(tmp_path, act):
    cfg = {**FNET_TINY_CFG, "hidden_act": act}
    w = random_fnet_weights(cfg, seed=11)
    model = fastinfer.load(write_fnet_dir(tmp_path / "f", cfg, w))
    _close(model.forward(IDS), fnet_forward(w, cfg, IDS)[1])


def test_unsupported_activation_is_a_clear_error(tmp_path):
    cfg = {**FNET_TINY_CFG, "hidden_act": "prelu"}
    with pytest.raises(ValueError, match="hidden_act 'prelu' is not supported"):
        fastinfer.load(write_fnet_dir(tmp_path / "f", cfg, random_fnet_weights(cfg)))


@pytest.mark.parametrize("T", [1, 2, 31, 64])
def test_every_length_up_to_the_positions(tmp_path, T):
    cfg = {**FNET_TINY_CFG, "layer_norm_eps": 1e-5, "type_vocab_size": 1}
    w = random_fnet_weights(cfg, seed=T)
    model = fastinfer.load(write_fnet_dir(tmp_path / "f", cfg, w))
    ids = np.random.default_rng(T).integers(0, cfg["vocab_size"], T).tolist()
    _close(model.forward(ids), fnet_forward(w, cfg, ids)[1])
    with pytest.raises(ValueError, match="context holds 64"):
        model.forward(ids + [5] * (65 - T))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints(tmp_path, dtype):
    w = random_fnet_weights(FNET_TINY_CFG, seed=2)
    model = fastinfer.load(write_fnet_dir(tmp_path / "f", FNET_TINY_CFG, w, dtype=dtype))
    assert model.weights.w1.kind_name == {"float16": "F16", "bfloat16": "BF16"}[dtype]
    _close(model.forward(IDS), fnet_forward(stored(w, dtype), FNET_TINY_CFG, IDS)[1])


def test_stored_decoder_tensors_win_over_tying(tmp_path):
    # transformers 5 loads cls.predictions.decoder.{weight,bias} from the file even when tied
    cfg = dict(FNET_TINY_CFG)
    w = random_fnet_weights(cfg, seed=3)
    rng = np.random.default_rng(9)
    w["cls.predictions.decoder.weight"] = rng.standard_normal((150, 24)).astype(np.float32)
    w["cls.predictions.decoder.bias"] = rng.standard_normal(150).astype(np.float32)
    model = fastinfer.load(write_fnet_dir(tmp_path / "f", cfg, w))
    _close(model.forward(IDS), fnet_forward(w, cfg, IDS)[1])


def test_tpu_dft_buffers_are_ignored(tmp_path):
    # use_tpu_fourier_optimizations saves complex64 DFT matrices; the transform is the same FFT
    cfg = {**FNET_TINY_CFG, "use_tpu_fourier_optimizations": True, "tpu_short_seq_length": len(IDS)}
    w = random_fnet_weights(cfg, seed=4)
    d = write_fnet_dir(tmp_path / "f", cfg, w)
    dft = {f"fnet.encoder.layer.{i}.fourier.self.dft_mat_{n}": np.fft.fft(np.eye(k)).astype(np.complex64)
           for i in range(2) for n, k in (("hidden", 24), ("seq", len(IDS)))}
    save_file({**w, **dft}, str(d / "model.safetensors"))
    _close(fastinfer.load(d).forward(IDS), fnet_forward(w, cfg, IDS)[1])


def test_bare_fnet_model_gives_embeddings_only(tmp_path):
    cfg = {**FNET_TINY_CFG, "architectures": ["FNetModel"]}
    w = random_fnet_weights(cfg, seed=5, prefix="", head=False)
    model = fastinfer.load(write_fnet_dir(tmp_path / "f", cfg, w))
    with pytest.raises(ValueError, match="no masked-LM head"):
        model.forward(IDS)
    ids = model.encode("the cat sat on the mat")
    hidden, _ = fnet_forward(w, cfg, ids, head=False)
    np.testing.assert_allclose(model.embed("the cat sat on the mat"), hidden.mean(0), atol=2e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    w = random_fnet_weights(FNET_TINY_CFG, seed=6)
    d = write_fnet_dir(tmp_path_factory.mktemp("fnet") / "f", FNET_TINY_CFG, w)
    return d, w, fastinfer.load(d)


def test_embed_is_the_mean_of_the_reference_hidden_states(tiny):
    d, w, model = tiny
    texts = ["the cat sat on the mat", "fourier mixing", "a dog"]
    got = model.embed(texts)
    assert got.shape == (3, 24) and got.dtype == np.float32
    for text, vec in zip(texts, got):
        ids = model.encode(text)
        assert ids[0] == 1 and ids[-1] == 2  # [CLS] ... [SEP]
        np.testing.assert_allclose(vec, fnet_forward(w, FNET_TINY_CFG, ids, head=False)[0].mean(0), atol=2e-5)
    one = model.embed("fourier mixing")
    assert one.shape == (24,)
    np.testing.assert_array_equal(one, got[1])


def test_embed_is_deterministic(tiny):
    _, _, model = tiny
    a = model.embed(["the cat sat on the mat", "a dog"])
    b = model.embed(["the cat sat on the mat", "a dog"])
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[0], a[1])


@pytest.mark.parametrize("bad", ["", "   \n", ["the cat", ""], []])
def test_empty_text_is_a_clear_error(tiny, bad):
    with pytest.raises(ValueError, match="empty|non-empty"):
        tiny[2].embed(bad)


def test_decoder_apis_refuse(tiny):
    model = tiny[2]
    for call in (lambda: model.generate("the cat"), lambda: model.generate([1, 5]), lambda: model.session(),
                 lambda: model.stream("the cat"), lambda: model.chat([{"role": "user", "content": "hi"}])):
        with pytest.raises(ValueError, match="needs a decoder model"):
            call()


@pytest.mark.parametrize("dtype,tol", [("auto", 0.0), ("f32", 0.0), ("bf16", 0.05), ("int8", 0.05)])
def test_convert_round_trip(tmp_path, tiny, dtype, tol):
    d, w, model = tiny
    out = convert(d, tmp_path / "c", dtype, progress=False).out
    converted = fastinfer.load(out)
    in_memory = fastinfer.load(d, dtype=dtype)
    np.testing.assert_array_equal(converted.forward(IDS), in_memory.forward(IDS))
    np.testing.assert_array_equal(converted.embed("a dog"), in_memory.embed("a dog"))
    want = fnet_forward(w, FNET_TINY_CFG, IDS)[1]
    if tol == 0.0:
        _close(converted.forward(IDS), want)
    else:  # quantized weights: logits near the float reference
        err = np.abs(converted.forward(IDS) - want).max() / np.abs(want).max()
        assert err < tol


def test_cli_embed_and_bench(tiny):
    d = str(tiny[0])
    r = subprocess.run([sys.executable, "-m", "fastinfer", "embed", "-m", d, "the cat", "a dog"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["dim"] == 24 and len(res["embeddings"]) == 2
    np.testing.assert_allclose(res["embeddings"], tiny[2].embed(["the cat", "a dog"]), atol=1e-5)
    r = subprocess.run([sys.executable, "-m", "fastinfer", "embed", "-m", d, ""], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 1 and "empty" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "fastinfer", "bench", "-m", d, "-p", "32", "-r", "2", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["pp"]["tokens"] == 32 and res["pp"]["mean"] > 0 and res["tg"] is None
