"""The real SmolLM2-135M-Instruct against an independent NumPy forward pass and known facts."""
import numpy as np
import pytest

import fastinfer
import reference
from conftest import DATA

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "In 1815, the Duke of Wellington and Napoleon met at Waterloo; the battle",
    "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def f32(smollm2_gguf):
    return fastinfer.load(smollm2_gguf, dtype="f32", kv_type="f32")


@pytest.fixture(scope="module")
def auto(smollm2_gguf):
    """The file's own blocks with exact (f32) activations and KV cache."""
    return fastinfer.load(smollm2_gguf, activations="f32", kv_type="f32")


@pytest.fixture(scope="module")
def default(smollm2_gguf):
    """What `fastinfer.load()` gives: int8 activations on AVX2 and up."""
    return fastinfer.load(smollm2_gguf)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_f32_logits_match_numpy_reference(f32, smollm2_gguf, prompt):
    ids = f32.encode(prompt)
    got = f32.forward(ids)
    want = reference.llama_forward_gguf(smollm2_gguf, ids)
    assert got.shape == (len(ids), 49152) and got.dtype == np.float32
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    assert np.abs(got - want).max() <= 5e-3


def test_f32_greedy_continuation_matches_reference(f32, smollm2_gguf):
    ids = f32.encode("Once upon a time, in a small village,")
    got = f32.generate(ids, max_new_tokens=64, temperature=0)
    seq = list(ids)
    for _ in range(64):
        nxt = int(reference.llama_forward_gguf(smollm2_gguf, seq)[-1].argmax())
        if nxt in f32.eos_ids:
            break
        seq.append(nxt)
    assert got == seq[len(ids):]


def test_default_dtype_keeps_blocks_and_knows_paris(default):
    assert default.weights.wqkv.kind_name == "Q4_1" and default.weights.tok_embeddings.kind_name == "Q8_0"
    assert default.generate("The capital of France is", max_new_tokens=4, temperature=0).startswith(" Paris")


def test_default_activations_follow_the_cpu(default):
    # int8 on every tier with integer dot products (AVX2 and up), f32 on the generic one
    from fastinfer.kernels.isa import TIER
    assert default.activations == ("f32" if TIER.dot == "ir" else "int8")


def test_default_session_continues_a_conversation(default):
    # With 8-bit activations the one-token path (kernels/qmatvec.py) and the many-token path
    # (kernels/qgemm.py) round floats in different orders, and a flipped rounding of one activation
    # moves the logits by a quantization step: close, not equal (llama.cpp behaves the same).
    ids = default.encode(PROMPTS[0] + " Paris, and the capital of Italy is")
    s = default.session()
    last = s.prefill(ids[:-1])
    step = s.append(ids[-1:])
    full = default.forward(ids)
    np.testing.assert_allclose(last, full[-2], atol=1e-4)  # the same kernels on the same tokens
    assert step[0].argmax() == full[-1].argmax()
    assert np.abs(step[0] - full[-1]).max() < 0.05 * np.ptp(full[-1])


def test_quantized_logits_stay_close_to_f32(auto, f32):
    ids = auto.encode(PROMPTS[2])
    a, b = auto.forward(ids), f32.forward(ids)
    # both run the same Q4_1 values; only float summation order differs
    np.testing.assert_allclose(a, b, atol=2e-3, rtol=0)


def test_metadata_gives_special_tokens_and_template(auto):
    tok = auto.tokenizer
    assert auto.bos_id == tok.token_to_id("<|im_start|>")
    assert auto.eos_ids == [tok.token_to_id("<|im_end|>")]
    assert auto.chat_template == (DATA / "smollm2-tokenizer" / "chat_template.jinja").read_text()


def test_chat_renders_like_the_template(auto):
    text = auto.apply_chat_template([{"role": "user", "content": "Hi there"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    reply = auto.chat([{"role": "user", "content": "What is the capital of France?"}],
                      max_new_tokens=24, temperature=0)
    assert "Paris" in reply and "<|im_end|>" not in reply


def test_seeded_sampling_is_reproducible(auto):
    kw = dict(max_new_tokens=24, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = auto.generate("My favourite animal is", seed=7, **kw)
    assert a == auto.generate("My favourite animal is", seed=7, **kw)
    others = {auto.generate("My favourite animal is", seed=s, **kw) for s in (8, 9, 10)}
    assert others - {a}, "different seeds should give different text"


def test_stream_pieces_join_to_generate(auto):
    kw = dict(max_new_tokens=20, temperature=0)
    pieces = list(auto.stream("The three primary colours are", **kw))
    assert len(pieces) > 1
    assert "".join(pieces) == auto.generate("The three primary colours are", **kw)


def test_stop_string_truncates(auto):
    full = auto.generate("The capital of France is", max_new_tokens=20, temperature=0)
    assert "." in full
    cut = auto.generate("The capital of France is", max_new_tokens=20, temperature=0, stop=["."])
    assert cut == full[:full.index(".")]


def test_session_continues_a_conversation(auto):
    ids = auto.encode(PROMPTS[0])
    s = auto.session()
    last = s.prefill(ids[:-1])
    step = s.append(ids[-1:])
    full = auto.forward(ids)
    np.testing.assert_allclose(last, full[-2], atol=1e-4)
    np.testing.assert_allclose(step[0], full[-1], atol=1e-4)


# 8-bit activations flip more near ties than 8-bit weights do: 94-97% agreement, depending on the
# CPU with the same kernels (LLVM schedules float sums per CPU, and which ties flip follows the
# last bits)
@pytest.mark.parametrize("dtype,activations,agree", [("bf16", "f32", 0.97), ("int8", "f32", 0.97),
                                                     ("auto", "int8", 0.93)])
def test_lossy_dtypes_stay_close_to_f32(smollm2_gguf, f32, dtype, activations, agree):
    # On a 300-token passage of Austen: the next-token choice almost never changes, and the mean
    # log-likelihood of the true text moves by well under the 0.5% perplexity budget.
    import gzip
    text = gzip.decompress((DATA / "corpus" / "persuasion.txt.gz").read_bytes()).decode()[5000:7000]
    ids = f32.encode(text)[:300]
    model = fastinfer.load(smollm2_gguf, dtype=dtype, activations=activations)
    a, b = model.forward(ids), f32.forward(ids)
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= agree

    def nll(lg):
        lg = lg[:-1].astype(np.float64)
        lg -= lg.max(-1, keepdims=True)
        return float(np.mean(np.log(np.exp(lg).sum(-1)) - lg[np.arange(len(ids) - 1), ids[1:]]))
    assert abs(nll(a) - nll(b)) < 0.005  # exp(0.005) - 1 = 0.5% perplexity


def test_half_float_kv_cache(auto, smollm2_gguf):
    """The default cache, kv_type="f16", keeps half floats: half the bytes, logits within rounding
    of the f32 cache's over a 300-token prompt, and " Paris" still comes first."""
    half = fastinfer.load(smollm2_gguf, activations="f32")
    assert half.kv_type == "f16"
    s = half.session(n_ctx=512)
    assert s.state.k_cache.dtype == np.uint16 and s.state.k_cache.nbytes * 2 == auto.session(n_ctx=512).state.k_cache.nbytes
    ids = auto.encode(" ".join(PROMPTS) * 6)[:300]
    want = auto.session().prefill(ids)
    got = half.session().prefill(ids)
    assert got.argmax() == want.argmax() and np.abs(got - want).max() <= 0.05
    # prefill and decode steps read the same half floats, but a sum that differs in its last f32 bit
    # can round to the neighbouring half: steps agree with the prompt's logits to rounding, not 1e-4
    s = half.session()
    steps = np.array([s.append([t])[0] for t in ids[:40]])
    assert np.abs(steps - half.forward(ids[:40])).max() <= 0.05
    assert half.generate("The capital of France is", max_new_tokens=4, temperature=0).startswith(" Paris")
    with pytest.raises(ValueError, match="kv_type"):
        fastinfer.load(smollm2_gguf, kv_type="f8")


def test_a_few_tokens_at_once_give_each_its_decode_step_logits(default):
    # With 8-bit activations: a call of up to 1 + exact_draft tokens (prompt lookup's check)
    # computes every token's logits bit for bit as a one-token step does: 8 tokens, since every
    # matmul of the default model reads 16-row tiles (kernels/qtile.py).
    from fastinfer.generate import TILED_EXACT_DRAFT
    assert default.exact_draft == TILED_EXACT_DRAFT
    ids = default.encode("The quick brown fox jumps over the lazy dog, and then the fox jumps again over the dog.")
    s = default.session(n_ctx=64)
    s.prefill(ids[:6])
    one = [s.decode_step(t).copy() for t in ids[6:18]]
    for k in range(2, default.exact_draft + 2):
        s = default.session(n_ctx=64)
        s.prefill(ids[:6])
        many = []
        for a in range(6, 18, k):
            many.extend(s.verify(ids[a:min(a + k, 18)]).copy())
        for a, b in zip(one, many):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("task", ["copy", "story"])
def test_prompt_lookup_keeps_greedy_output(default, task):
    text = ("Mr. Bennet was so odd a mixture of quick parts, sarcastic humour, reserve, and caprice, "
            "that the experience of three and twenty years had been insufficient to make his wife "
            "understand his character.")
    content = f"Repeat this exactly:\n\n{text}" if task == "copy" else "Write a short story about a robot."
    ids = default.tokenizer.encode(default.apply_chat_template([{"role": "user", "content": content}]),
                                   add_special_tokens=False).ids
    plain = default.generate(ids, max_new_tokens=60, temperature=0)
    fast = default.generate(ids, max_new_tokens=60, temperature=0, prompt_lookup_num_tokens=3)
    assert fast == plain
    if task == "copy":
        assert default.last_lookup.accepted > 0  # drafts were taken, not just tried
    assert default.last_lookup.drafted > 0  # a story drafts too, and its refused drafts' rows are used
    assert "".join(default.stream_chat([{"role": "user", "content": content}], max_new_tokens=30, temperature=0,
                                       prompt_lookup_num_tokens=3)) == \
        default.chat([{"role": "user", "content": content}], max_new_tokens=30, temperature=0)
