"""The spectral filter (kernels/spectral.py): the kernel against a numpy.fft twin in float64, and
wired into the Llama forward against the NumPy reference with the twin applied after the chosen
layers."""
import numpy as np
import pytest

import fastinfer
import reference
from fastinfer.kernels import spectral as K
from reference_gpt2 import GPT2_TINY_CFG, random_gpt2_weights, write_gpt2_dir
from tiny_models import TINY_CFG, random_llama_weights, tiny_bpe_tokenizer, write_hf_dir

def spectral_filter_twin(x: np.ndarray, keep: int) -> np.ndarray:
    """From the definition: per row, real DFT; zero the bins below the keep-th largest |X|; inverse."""
    d = x.shape[1]
    X = np.fft.rfft(x.astype(np.float64), axis=1)
    for row in X:
        mag = np.abs(row)
        if keep < len(mag):
            thresh = np.sort(mag)[len(mag) - keep] if keep > 0 else np.inf
            row[mag < thresh] = 0
    return np.fft.irfft(X, n=d, axis=1)


@pytest.mark.parametrize("T,d", [(1, 8), (3, 9), (4, 64), (2, 576), (5, 17)])
@pytest.mark.parametrize("frac", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_spectral_filter_matches_twin(T, d, frac):
    rng = np.random.default_rng(d)
    x = rng.standard_normal((T, d)).astype(np.float32)
    h = d // 2 + 1
    keep = int(round(frac * h))
    want = spectral_filter_twin(x, keep)
    got = x.copy()
    K.spectral_filter_(got, keep, K.dft_tables(d), np.zeros((2, h)), np.zeros((2, h)))
    np.testing.assert_allclose(got, want, atol=2e-6 * max(1.0, np.abs(x).max()))
    if keep >= h:
        np.testing.assert_array_equal(got, x)  # nothing to drop: untouched


def test_spectral_filter_keeps_the_strongest_bins():
    # a row made of 3 known cosines plus small noise: keeping 3 bins returns the cosines
    d = 64
    t = np.arange(d)
    clean = 3 * np.cos(2 * np.pi * 5 * t / d) + 2 * np.cos(2 * np.pi * 11 * t / d) + 1.0
    noisy = (clean + 0.01 * np.random.default_rng(0).standard_normal(d)).astype(np.float32)[None]
    K.spectral_filter_(noisy, 3, K.dft_tables(d), np.zeros((2, 33)), np.zeros((2, 33)))
    assert np.abs(noisy[0] - clean).max() < 0.02


IDS = [5, 17, 42, 3, 250, 99, 7, 7, 128, 64, 1, 200, 33]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    w = random_llama_weights(TINY_CFG, seed=3)
    d = write_hf_dir(tmp_path_factory.mktemp("spec") / "hf", TINY_CFG, w, tokenizer=tiny_bpe_tokenizer())
    return fastinfer.load(d, kv_type="f32"), w


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
