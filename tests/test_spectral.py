"""The spectral filter wired into the Llama forward, against the NumPy reference with the filter's
twin applied after the chosen layers."""
import numpy as np
import pytest

import fastinfer
import reference
from reference_gpt2 import GPT2_TINY_CFG, random_gpt2_weights, write_gpt2_dir
from test_fft import spectral_filter_twin
from tiny_models import TINY_CFG, random_llama_weights, tiny_bpe_tokenizer, write_hf_dir

IDS = [5, 17, 42, 3, 250, 99, 7, 7, 128, 64, 1, 200, 33]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    w = random_llama_weights(TINY_CFG, seed=3)
    d = write_hf_dir(tmp_path_factory.mktemp("spec") / "hf", TINY_CFG, w, tokenizer=tiny_bpe_tokenizer())
    return fastinfer.load(d), w


@pytest.mark.parametrize("keep,layers", [(0.5, None), (0.25, [1]), (0.9, [0, 2])])
def test_filtered_logits_match_reference(tiny, keep, layers):
    model, w = tiny
    h = TINY_CFG["hidden_size"] // 2 + 1
    count = max(1, int(round(keep * h)))
    chosen = range(TINY_CFG["num_hidden_layers"]) if layers is None else layers

    def filt(i, x):
        return spectral_filter_twin(x, count) if i in chosen else x
    want = reference.llama_forward(w, TINY_CFG, IDS, after_layer=filt)
    got = model.session(spectral_keep=keep, spectral_layers=layers).append(IDS)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    dense = model.forward(IDS)
    assert np.abs(got - dense).max() > 1e-2  # the filter did change something


def test_filter_is_per_token_so_decode_steps_agree(tiny):
    model, _ = tiny
    full = model.session(spectral_keep=0.5).append(IDS)
    s = model.session(spectral_keep=0.5)
    np.testing.assert_allclose(s.prefill(IDS[:6]), full[5], atol=5e-5)
    rows = [s.decode_step(t).copy() for t in IDS[6:]]
    np.testing.assert_allclose(np.array(rows), full[6:], atol=5e-5)


def test_keep_everything_is_dense(tiny):
    model, _ = tiny
    np.testing.assert_array_equal(model.session(spectral_keep=1.0).append(IDS), model.forward(IDS))


@pytest.mark.parametrize("opts,msg", [({"spectral_keep": 0.0}, "spectral_keep"), ({"spectral_keep": 1.5}, "spectral_keep"),
                                      ({"spectral_keep": "half"}, "spectral_keep"),
                                      ({"spectral_keep": 0.5, "spectral_layers": [3]}, "spectral_layers")])
def test_bad_options(tiny, opts, msg):
    with pytest.raises(ValueError, match=msg):
        tiny[0].session(**opts)


def test_other_architectures_refuse(tmp_path):
    d = write_gpt2_dir(tmp_path / "g", GPT2_TINY_CFG, random_gpt2_weights(GPT2_TINY_CFG, seed=1))
    with pytest.raises(ValueError, match="Llama-family"):
        fastinfer.load(d).session(spectral_keep=0.5)
