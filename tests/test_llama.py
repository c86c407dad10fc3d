"""The Llama graph end to end: tiny random checkpoints against the independent NumPy reference,
KV-cache consistency, and GGUF/HF agreement on the same weights."""
import numpy as np
import pytest

import fastinfer
import reference
from tiny_models import (TINY_CFG, TINY_CFG_BIAS, TINY_CFG_LLAMA3, TINY_CFG_TIED, as_quantized, as_stored,
                         gguf_tokenizer_fields, random_llama_weights, tiny_bpe_tokenizer, write_gguf,
                         write_hf_dir)

IDS = [5, 17, 42, 3, 250, 99, 7, 7, 128, 64, 1, 200, 33]
CFGS = {"base": TINY_CFG, "tied": TINY_CFG_TIED, "llama3": TINY_CFG_LLAMA3,
        "qwen2-bias": {**TINY_CFG_BIAS, "model_type": "qwen2"}}


@pytest.fixture(scope="module")
def tok():
    return tiny_bpe_tokenizer()


def _hf(tmp_path, cfg, tok, dtype="float32", shards=1, seed=0):
    w = random_llama_weights(cfg, seed=seed)
    d = write_hf_dir(tmp_path / f"hf-{dtype}-{shards}", cfg, w, tokenizer=tok, dtype=dtype, shards=shards)
    return d, w


def _gguf(tmp_path, cfg, tok, ggml_type, seed=0):
    w = random_llama_weights(cfg, seed=seed)
    path = write_gguf(tmp_path / f"m-{ggml_type}.gguf", cfg, w, ggml_type,
                      tokenizer_vocab=gguf_tokenizer_fields(tok))
    return path, w


@pytest.mark.parametrize("name", CFGS)
def test_hf_f32_matches_reference(tmp_path, tok, name):
    cfg = CFGS[name]
    d, w = _hf(tmp_path, cfg, tok)
    got = fastinfer.load(d, kv_type="f32").forward(IDS)
    want = reference.llama_forward(w, cfg, IDS)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)


@pytest.mark.parametrize("dtype,shards", [("float16", 1), ("bfloat16", 2), ("float32", 3)])
def test_hf_stored_dtypes_and_shards(tmp_path, tok, dtype, shards):
    d, w = _hf(tmp_path, TINY_CFG, tok, dtype, shards)
    got = fastinfer.load(d, kv_type="f32").forward(IDS)
    want = reference.llama_forward(as_stored(w, dtype), TINY_CFG, IDS)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)


@pytest.mark.parametrize("ggml_type", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_matches_reference(tmp_path, tok, ggml_type):
    path, w = _gguf(tmp_path, TINY_CFG, tok, ggml_type)
    model = fastinfer.load(path, activations="f32", kv_type="f32")  # exact: the reference runs f32 activations
    got = model.forward(IDS)
    want = reference.llama_forward(as_quantized(w, ggml_type), TINY_CFG, IDS)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    # the second, convention-independent route: GGUF order and interleaved RoPE
    np.testing.assert_allclose(got, reference.llama_forward_gguf(path, IDS), atol=2e-4, rtol=0)
    # block formats stay packed unless f32 is asked for
    kinds = {model.weights.wqkv.kind_name, model.weights.w2.kind_name}
    assert kinds == {ggml_type}
    f32 = fastinfer.load(path, dtype="f32", kv_type="f32")
    assert f32.weights.wqkv.kind_name == "F32"
    np.testing.assert_allclose(f32.forward(IDS), got, atol=2e-4, rtol=0)


@pytest.mark.parametrize("name", ["base", "tied", "llama3"])
def test_gguf_and_hf_agree(tmp_path, tok, name):
    cfg = CFGS[name]
    d, _ = _hf(tmp_path, cfg, tok, seed=3)
    path, _ = _gguf(tmp_path, cfg, tok, "F32", seed=3)
    np.testing.assert_allclose(fastinfer.load(path).forward(IDS), fastinfer.load(d).forward(IDS), atol=1e-4)


@pytest.mark.parametrize("ggml_type", ["F32", "Q4_1"])
def test_session_steps_equal_full_forward(tmp_path, tok, ggml_type):
    path, _ = _gguf(tmp_path, TINY_CFG, tok, ggml_type)
    # f32 activations and an f32 KV cache: the cache and positions are under test here. With 8-bit
    # activations the two kernels can round a tie apart (tests/test_act8.py
    # test_model_steps_equal_full_forward), and a K or V element a last f32 bit apart can round to
    # neighbouring halves in an f16 cache (seen with 8-lane AVX2 sums: 1.3e-4)
    model = fastinfer.load(path, activations="f32", kv_type="f32")
    full = model.forward(IDS)
    s = model.session()
    # one token at a time reads packed rows, a batch expands tiles: float32 sums in another order
    first = s.prefill(IDS[:4])
    np.testing.assert_allclose(first, full[3], atol=5e-5)
    rows = [s.append([t])[0] for t in IDS[4:9]] + list(s.append(IDS[9:]))
    np.testing.assert_allclose(np.array(rows), full[4:], atol=5e-5)
    assert s.pos == len(IDS)


def test_prefill_longer_than_one_chunk(tmp_path, tok, monkeypatch):
    # 150 tokens cross 64-token prefill chunks; positions must carry across them
    monkeypatch.setattr(fastinfer.model, "PREFILL_CHUNK", 64)
    path, w = _gguf(tmp_path, TINY_CFG, tok, "F32")
    ids = [int(i) for i in np.random.default_rng(1).integers(0, 300, 150)]
    got = fastinfer.load(path, kv_type="f32").forward(ids)
    np.testing.assert_allclose(got, reference.llama_forward(w, TINY_CFG, ids), atol=3e-4, rtol=0)


def test_forward_keeps_no_state(tmp_path, tok):
    path, _ = _gguf(tmp_path, TINY_CFG, tok, "Q8_0")
    model = fastinfer.load(path)
    a = model.forward(IDS)
    model.forward(IDS[::-1])
    np.testing.assert_array_equal(model.forward(IDS), a)


def test_generate_ids_is_greedy_argmax(tmp_path, tok):
    path, w = _gguf(tmp_path, TINY_CFG, tok, "F32")
    model = fastinfer.load(path)
    new = model.generate(IDS[:5], max_new_tokens=6, temperature=0)
    seq = list(IDS[:5])
    for _ in range(6):
        nxt = int(np.argmax(reference.llama_forward(w, TINY_CFG, seq)[-1]))
        if nxt in model.eos_ids:
            break
        seq.append(nxt)
    assert new == seq[5:]


def test_results_do_not_depend_on_thread_count(tmp_path, tok):
    # every output element is summed by one thread in a fixed order, whatever the thread count
    path, _ = _gguf(tmp_path, TINY_CFG, tok, "Q8_0")
    one, two = fastinfer.load(path, threads=1), fastinfer.load(path, threads=2)
    np.testing.assert_array_equal(one.forward(IDS), two.forward(IDS))
    kw = dict(max_new_tokens=12, temperature=0.9, seed=3)
    assert one.generate(IDS[:4], **kw) == two.generate(IDS[:4], **kw)


def test_generation_defaults(tmp_path, tok):
    import json
    # GGUF: no generation config, llama.cpp's sampling defaults
    path, _ = _gguf(tmp_path, TINY_CFG, tok, "F32")
    o = fastinfer.load(path)._resolve(5)
    p = o.sampling
    assert (o.max_new_tokens, p.temperature, p.top_k, p.top_p, p.min_p, o.num_beams) == (256, 0.8, 40, 0.95, 0.05, 1)
    # HF folder without generation_config.json: HF's default, greedy
    d, _ = _hf(tmp_path, TINY_CFG, tok)
    (d / "generation_config.json").unlink(missing_ok=True)
    assert fastinfer.load(d)._resolve(5).sampling.temperature == 0
    # generation_config.json that samples and searches: its values, HF's defaults for the rest
    (d / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "max_length": 30,
                                                          "num_beams": 3, "no_repeat_ngram_size": 2}))
    m = fastinfer.load(d)
    o = m._resolve(5)
    assert (o.max_new_tokens, o.sampling.temperature, o.sampling.top_k, o.sampling.top_p) == (25, 0.6, 50, 1.0)
    assert (o.num_beams, o.no_repeat_ngram_size) == (3, 2)
    # explicit values win; max_length counts the prompt
    assert m._resolve(5, max_new_tokens=7, num_beams=1).max_new_tokens == 7
    assert m._resolve(5, max_length=12).max_new_tokens == 7
    with pytest.raises(ValueError, match="max_length"):
        m._resolve(5, max_length=5)
    with pytest.raises(ValueError, match="num_beams"):
        m._resolve(5, num_beams=0)


def test_beam_search_through_the_api(tmp_path, tok):
    from fastinfer.beam import beam_search
    path, _ = _gguf(tmp_path, TINY_CFG, tok, "F32")
    model = fastinfer.load(path)
    kw = dict(num_beams=3, no_repeat_ngram_size=2, length_penalty=1.0, early_stopping=True)
    got = model.generate(IDS[:5], max_new_tokens=10, **kw)
    assert got == beam_search(model.session, IDS[:5], 3, 10, model.eos_ids, length_penalty=1.0,
                              early_stopping=True, no_repeat_ngram_size=2)
    text = model.generate(model.decode(IDS[:5]), max_new_tokens=10, **kw)
    assert isinstance(text, str)


@pytest.mark.parametrize("ggml_type", ["F32", "Q4_1"])
def test_batch_equals_one_by_one(tmp_path, tok, ggml_type):
    # prompts of different lengths, decoded together, give what each gives alone
    path, _ = _gguf(tmp_path, TINY_CFG, tok, ggml_type)
    model = fastinfer.load(path)
    prompts = [IDS[:3], IDS[:9], IDS[2:4], IDS]
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=11),
               dict(temperature=0, no_repeat_ngram_size=2, min_new_tokens=3)):
        alone = [model.generate(p, max_new_tokens=9, **kw) for p in prompts]
        assert model.generate(prompts, max_new_tokens=9, **kw) == alone
    texts = ["hello there", "a b c d e f"]
    assert model.generate(texts, max_new_tokens=5, temperature=0) == \
        [model.generate(t, max_new_tokens=5, temperature=0) for t in texts]


def test_batch_decode_logits_match_sessions(tmp_path, tok):
    from fastinfer.model import Batch
    path, _ = _gguf(tmp_path, TINY_CFG, tok, "F32")
    model = fastinfer.load(path, kv_type="f32")  # exact: f16 rounds last-bit differences apart (8e-5 on AVX2)
    batch = Batch(model, 2, 32)
    a, b = IDS[:4], IDS[5:12]
    batch.sessions[0].prefill(a)
    batch.sessions[1].prefill(b)
    rows = batch.decode([0, 1], [7, 8]).copy()
    np.testing.assert_allclose(rows[0], model.forward(a + [7])[-1], atol=5e-5)
    np.testing.assert_allclose(rows[1], model.forward(b + [8])[-1], atol=5e-5)


@pytest.mark.parametrize("cfg", [
    {**TINY_CFG, "model_type": "mistral", "sliding_window": 4},
    {**TINY_CFG_BIAS, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 3,
     "max_window_layers": 1},
    {**TINY_CFG, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": 3},
], ids=["mistral", "qwen2-swa", "qwen2-off"])
def test_sliding_window_models(tmp_path, tok, cfg):
    # exact sliding-window attention as the config asks, full sequence and step by step
    d, w = _hf(tmp_path, cfg, tok)
    model = fastinfer.load(d, kv_type="f32")
    ids = IDS + IDS[::-1]
    want = reference.llama_forward(w, cfg, ids)
    full = model.forward(ids)
    np.testing.assert_allclose(full, want, atol=2e-4, rtol=0)
    s = model.session()
    steps = [s.append([t])[0] for t in ids]
    np.testing.assert_allclose(np.array(steps), full, atol=5e-5, rtol=0)
    if cfg.get("sliding_window") and (cfg["model_type"] == "mistral" or cfg.get("use_sliding_window")):
        full_cfg = {**cfg, "sliding_window": None}
        assert np.abs(reference.llama_forward(w, full_cfg, ids) - want).max() > 1e-3  # the window matters
