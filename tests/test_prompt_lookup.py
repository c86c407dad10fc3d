"""Prompt-lookup decoding's parts: the drafts (n-gram matches in the context), the sampling rule
for a draft token (it keeps the output's distribution), the adaptive draft length, and the options'
errors. The model-level checks (greedy output unchanged, bit-identical logits) are in
test_smollm2.py."""
import numpy as np
import pytest

import fastinfer
from fastinfer.generate import MAX_EXACT_DRAFT, PromptLookup
from fastinfer.sampling import SamplingParams, _distribution, sample
from tiny_models import TINY_CFG, gguf_tokenizer_fields, random_llama_weights, tiny_bpe_tokenizer, write_gguf


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    path = write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", TINY_CFG, random_llama_weights(TINY_CFG), "Q8_0",
                      tokenizer_vocab=gguf_tokenizer_fields(tiny_bpe_tokenizer()))
    return fastinfer.load(path, n_ctx=32)


def test_draft_follows_the_latest_earlier_ngram():
    lk = PromptLookup(3)
    ctx = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 4, 6, 7]
    assert lk.draft(ctx, 10) == [2, 3, 4]      # [6, 7] last seen before at 6..7, then 2 3 4
    assert lk.draft(ctx + [2], 10) == [3, 4, 6]  # [6, 7, 2] (three tokens) wins
    assert lk.draft(ctx + [2], 2) == [3, 4]     # no more than the room
    assert PromptLookup(3).draft([1, 2, 3, 4], 5) == []  # nothing repeats
    assert PromptLookup(10).cap == MAX_EXACT_DRAFT
    assert PromptLookup(10, exact=7).cap == 7 and PromptLookup(5, exact=7).cap == 5


def _scan(context, k, ngram):
    """The draft by definition: the longest tail n-gram (ngram down to 2) seen earlier with a token
    after it, its latest such occurrence, and up to k tokens that followed."""
    for n in range(min(ngram, len(context) - 1), 1, -1):
        tail = context[len(context) - n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start:start + n] == tail:
                return context[start + n:start + n + k]
    return []


def test_indexed_drafts_equal_a_scan_of_the_context():
    # The n-gram index, grown token by token (and rebuilt for a context it has not seen grow),
    # against scanning the whole context each time.
    rng = np.random.default_rng(3)
    for _ in range(20):
        ctx = list(rng.integers(0, 6, 80))
        lk = PromptLookup(7, exact=7)
        lk.k = 7
        for end in range(1, len(ctx) + 1):
            assert lk.draft(ctx[:end], 7) == _scan(ctx[:end], 7, PromptLookup.NGRAM)
        assert lk.draft(ctx[:10], 7) == _scan(ctx[:10], 7, PromptLookup.NGRAM)


def test_draft_length_adapts_and_pauses():
    lk = PromptLookup(7, exact=7)
    assert lk.k == PromptLookup.START
    lk.update(3, 3)  # taken whole: longer
    assert lk.k == min(7, PromptLookup.START + PromptLookup.GROW)
    lk.update(lk.k, 4)  # a miss after 4 taken: what was taken
    assert lk.k == 4
    lk.update(4, 1)  # a miss after 1 taken: not below START (copying goes on past a seam)
    assert lk.k == PromptLookup.START
    lk.update(lk.k, lk.k)
    assert lk.k == PromptLookup.START + PromptLookup.GROW
    for _ in range(PromptLookup.MISSES):  # misses in a row with nothing taken: drafting pauses
        lk.update(1, 0)
    assert lk.k == PromptLookup.START
    ctx = [1, 2, 3, 1, 2]
    assert all(lk.draft(ctx, 5) == [] for _ in range(PromptLookup.PAUSE))
    assert lk.draft(ctx, 5) == [3, 1, 2][:PromptLookup.START]  # what followed the latest [1, 2]
    assert (lk.steps, lk.accepted) == (4 + PromptLookup.MISSES, 3 + 4 + 1 + PromptLookup.START)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
                                    SamplingParams(temperature=0.7, top_k=4, top_p=0.9, min_p=0.0)])
@pytest.mark.parametrize("draft", [0, 2, 5])
def test_a_draft_token_keeps_the_distribution(params, draft):
    # 40,000 draws with the draft against the distribution without one: every probability within
    # 5 standard errors (a sampler that always took the draft, or never, fails by far).
    logits = np.log(np.array([0.30, 0.25, 0.2, 0.1, 0.08, 0.05, 0.02], np.float32))
    cand, probs = _distribution(logits, params)
    want = np.zeros(len(logits))
    want[cand] = probs
    rng = np.random.default_rng([draft, int(params.top_k)])
    n = 40_000
    got = np.bincount([sample(logits, params, rng, np.zeros(0, np.int64), draft) for _ in range(n)],
                      minlength=len(logits)) / n
    se = np.sqrt(want * (1 - want) / n) + 1e-12
    assert (np.abs(got - want) <= 5 * se + 1e-9).all(), (got, want)


def test_greedy_ignores_the_draft():
    logits = np.array([0.1, 3.0, 0.2], np.float32)
    p = SamplingParams(temperature=0)
    assert sample(logits, p, np.random.default_rng(0), np.zeros(0, np.int64), 2) == 1


def test_options_are_checked(tiny_decoder):
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens must be an integer"):
        tiny_decoder.generate([1, 2, 3], max_new_tokens=2, prompt_lookup_num_tokens=-1)
    with pytest.raises(ValueError, match="does not combine"):
        tiny_decoder.generate([1, 2, 3], max_new_tokens=2, prompt_lookup_num_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match="one prompt at a time"):
        tiny_decoder.generate([[1, 2], [3, 4]], max_new_tokens=2, prompt_lookup_num_tokens=2)


class _Markov:
    """A stand-in session whose logits depend only on the last two tokens fed (so its output soon
    repeats itself, and drafts are found, taken and refused), recording what its cache holds."""
    V = 23

    def __init__(self, max_seq=200):
        self.seq, self.max_seq = [], max_seq

    @property
    def pos(self):
        return len(self.seq)

    @pos.setter
    def pos(self, n):
        del self.seq[n:]

    def _logits(self):
        a, b = (self.seq[-2:] + [0, 0])[:2] if len(self.seq) >= 2 else (0, 0)
        return np.random.default_rng([a, b, 7]).standard_normal(self.V).astype(np.float32)

    def prefill(self, ids):
        self.seq.extend(ids)
        return self._logits()

    def decode_step(self, tok):
        return self.prefill([tok])

    def verify(self, ids):
        rows = []
        for t in ids:
            self.seq.append(t)
            rows.append(self._logits())
        return np.array(rows)


def test_drafts_taken_and_refused_leave_greedy_output_and_cache_as_plain_decoding():
    from fastinfer.generate import generate_ids
    greedy = SamplingParams(temperature=0)
    taken = refused = 0
    for seed in range(12):
        prompt = [int(t) for t in np.random.default_rng(seed).integers(3, 23, 12)]
        plain_s, fast_s = _Markov(), _Markov()
        plain = list(generate_ids(plain_s, prompt, 60, greedy, [1]))
        lk = PromptLookup(3)
        fast = list(generate_ids(fast_s, prompt, 60, greedy, [1], lookup=lk))
        assert fast == plain, seed
        # the cache holds the prompt and every token fed (all but the last one yielded)
        assert fast_s.seq == plain_s.seq == (prompt + plain)[:len(plain_s.seq)], seed
        taken += lk.accepted
        refused += lk.drafted - lk.accepted
    assert taken > 0 and refused > 0  # both ways through the check were walked


def test_drafts_under_sampling_stay_reproducible_with_a_seed():
    from fastinfer.generate import generate_ids
    prompt = [5, 6, 7, 5, 6, 7, 5, 6]
    p = SamplingParams(temperature=0.8, top_k=0, top_p=1.0, min_p=0.0, seed=11)
    a = list(generate_ids(_Markov(), prompt, 40, p, [1], lookup=PromptLookup(3)))
    b = list(generate_ids(_Markov(), prompt, 40, p, [1], lookup=PromptLookup(3)))
    assert a == b and len(a) == 40


def test_copied_share_counts_the_tokens_inside_ngrams_of_the_prompt():
    from fastinfer.lookup_bench import copied_share
    prompt = [1, 2, 3, 4, 5, 6, 7]
    assert copied_share(prompt, [9, 2, 3, 4, 5, 8]) == 4 / 6      # one 4-gram of the prompt
    assert copied_share(prompt, [2, 3, 4, 9, 5, 6, 7]) == 0.0      # 3-grams only
    assert copied_share(prompt, [3, 4, 5, 6, 7, 1, 2, 3, 4]) == 1.0  # two overlapping stretches
    assert copied_share(prompt, []) == 0.0


def test_bench_mode_reports_identical_outputs(smollm2_gguf):
    import json
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "fastinfer", "bench", "--model", str(smollm2_gguf), "--prompt-lookup", "3",
                        "-n", "24", "-r", "1", "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["prompt_lookup"] == 3 and {p["set"] for p in res["prompts"]} == {"grounded", "open"}
    assert all(p["identical"] for p in res["prompts"])
    assert sum(p["taken"] for p in res["prompts"]) > 0
    assert all(0.0 <= p["copied"] <= 1.0 for p in res["prompts"])
    assert "| grounded | copy |" in r.stdout
