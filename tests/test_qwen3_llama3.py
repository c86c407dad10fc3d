"""Qwen3 (QK-norm, no biases, head_dim of its own) and Llama 3.2 (llama3 RoPE scaling, tied
embeddings, GQA) from HF folders, on tiny random checkpoints: against the plain-NumPy reference
(tests/reference.py, written from the definitions) and HF transformers' own models."""
import numpy as np
import pytest

import fastinfer
import reference
from fastinfer.convert import convert
from tiny_models import TINY_CFG_LLAMA32, TINY_CFG_QWEN3, add_qk_norms, random_llama_weights, tiny_bpe_tokenizer, write_hf_dir

IDS = [5, 17, 250, 3, 99, 42, 42, 7, 180, 5, 66, 201, 9, 13, 150, 77, 299, 0, 64, 120, 33, 8]
CASES = {"qwen3": TINY_CFG_QWEN3, "llama3.2": TINY_CFG_LLAMA32}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    cfg = CASES[request.param]
    w = random_llama_weights(cfg, seed=3)
    if cfg["model_type"] == "qwen3":
        w = add_qk_norms(cfg, w)
    d = write_hf_dir(tmp_path_factory.mktemp(request.param) / "hf", cfg, w, tokenizer=tiny_bpe_tokenizer())
    return cfg, w, d, fastinfer.load(d, activations="f32", kv_type="f32")


def close(got, want, tol=2e-4):
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_matches_reference(case):
    cfg, w, _, m = case
    assert m.args.qk_norm == (cfg["model_type"] == "qwen3")
    close(m.forward(IDS), reference.llama_forward(w, cfg, IDS))


def test_decode_steps_equal_full_forward(case):
    *_, m = case
    s = m.session()
    got = np.stack([s.prefill(IDS[:4])] + [s.decode_step(t).copy() for t in IDS[4:]])
    close(got, m.forward(IDS)[3:], 1e-4)


def test_int8_weights_and_activations_close(case):
    cfg, w, d, _ = case
    m = fastinfer.load(d, dtype="int8", kv_type="f32")
    assert m.activations == "int8"
    want = reference.llama_forward(w, cfg, IDS)
    assert np.linalg.norm(m.forward(IDS) - want) / np.linalg.norm(want) < 0.03


def test_converted_round_trip(case, tmp_path):
    *_, d, m = case
    out = tmp_path / "conv"
    convert(d, out, progress=False)
    c = fastinfer.load(out, activations="f32", kv_type="f32")
    assert c.args.qk_norm == m.args.qk_norm
    np.testing.assert_array_equal(c.forward(IDS), m.forward(IDS))


def test_hf_transformers_parity(case):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg, _, d, m = case
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    assert type(ref).__name__ == cfg["architectures"][0]
    with torch.no_grad():
        want = ref(torch.tensor([IDS])).logits[0].numpy()
    close(m.forward(IDS), want)
