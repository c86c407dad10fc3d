"""fastinfer against HF transformers itself, on random GPT-2 checkpoints in the real layout.

torch and transformers come with the test extras. fastinfer runs with an f32 KV cache here (the
f16 default rounds keys and values): logits within 1e-4 of transformers', greedy and beam-search
tokens identical.
"""
import numpy as np
import pytest

import fastinfer
from reference_gpt2 import GPT2_TINY_CFG, random_gpt2_weights, write_gpt2_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IDS = [5, 17, 42, 3, 250, 99, 7, 7, 128, 64, 1, 200]


@pytest.fixture(scope="module", params=[(1, ""), (2, "transformer.")])
def pair(request, tmp_path_factory):
    seed, prefix = request.param
    w = random_gpt2_weights(GPT2_TINY_CFG, seed=seed, prefix=prefix, with_buffers=not prefix)
    d = write_gpt2_dir(tmp_path_factory.mktemp("hf") / "g", GPT2_TINY_CFG, w)
    return fastinfer.load(d, kv_type="f32"), transformers.GPT2LMHeadModel.from_pretrained(str(d)).eval()


def _hf_generate(hf, ids, **kw):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), do_sample=False, pad_token_id=0, **kw)
    return out[0, len(ids):].tolist()


def test_logits(pair):
    ours, hf = pair
    with torch.no_grad():
        want = hf(torch.tensor([IDS])).logits[0].numpy()
    got = ours.forward(IDS)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    assert np.abs(got - want).max() < 1e-4


def test_greedy_with_no_repeat_ngram(pair):
    ours, hf = pair
    kw = dict(max_length=40, no_repeat_ngram_size=2, early_stopping=True)
    assert ours.generate(IDS[:4], **kw) == _hf_generate(hf, IDS[:4], **kw)


def test_beam_search_with_no_repeat_ngram(pair):
    ours, hf = pair
    kw = dict(num_beams=5, no_repeat_ngram_size=2, max_length=60, early_stopping=True)
    assert ours.generate(IDS[:4], **kw) == _hf_generate(hf, IDS[:4], **kw)
