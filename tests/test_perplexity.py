"""`fastinfer.perplexity`: exact values on fake models whose probabilities are known, windows run
from an empty state on a tiny random model against the NumPy reference, and the CLI command."""
import gzip
import json
import math
import subprocess
import sys

import numpy as np
import pytest

import fastinfer
import reference
from fastinfer.perplexity import perplexity, perplexity_of_text, token_nll
from tiny_models import TINY_CFG, gguf_tokenizer_fields, random_llama_weights, tiny_bpe_tokenizer, write_gguf

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. The capital of France is Paris. The capital of Italy is Rome. "
        "One, two, three, four, five: 12345 67890. Hello world! How are you today? I am fine, thank you.\n")


# ----------------------------------------------------------------------------------------------
# fake models: probabilities known by construction
# ----------------------------------------------------------------------------------------------

class _Encoding:
    def __init__(self, ids):
        self.ids = ids


class _CharTokenizer:
    """One token per character, id = code point mod 64."""

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return _Encoding([ord(c) % 64 for c in text])


class FakeModel:
    """forward() returns float64 logits built from known probabilities and records each call's length.

    uniform: every token equally likely, so each scored token costs log(V) and ppl = V.
    counting: the token after id t is (t + 1) % V; at position j of a window (counted from the
    window's start, so a model that carried state across windows would be caught) the model gives
    it probability 1 / (j + 2), the rest spread evenly. A window of L such tokens then costs
    sum_{i=1}^{L-1} log(i + 1) = log(L!) in total."""

    def __init__(self, kind, vocab=11, n_ctx=16, offset=0.0):
        self.kind, self.vocab, self.n_ctx, self.offset = kind, vocab, n_ctx, offset
        self.tokenizer = _CharTokenizer()
        self.calls = []

    def forward(self, ids):
        self.calls.append(len(ids))
        assert len(ids) <= self.n_ctx
        V = self.vocab
        if self.kind == "uniform":
            return np.full((len(ids), V), self.offset)
        logits = np.empty((len(ids), V))
        for j, t in enumerate(ids):
            p = 1.0 / (j + 2)
            logits[j] = math.log((1 - p) / (V - 1))
            logits[j, (t + 1) % V] = math.log(p)
        return logits + self.offset


def _windows(n, ctx):
    return [min(ctx, n - s) for s in range(0, n, ctx)]


@pytest.mark.parametrize("ctx,lengths", [(2, [2] * 5), (3, [3, 3, 3, 1]), (4, [4, 4, 2]), (5, [5, 5]),
                                         (9, [9, 1]), (10, [10]), (16, [10])])
def test_counting_model_exact(ctx, lengths):
    assert _windows(10, ctx) == lengths
    model = FakeModel("counting")
    ids = [(7 + k) % model.vocab for k in range(10)]
    r = perplexity(model, ids, ctx)
    want_scored = sum(L - 1 for L in lengths)
    want_nll = sum(math.lgamma(L + 1) for L in lengths) / want_scored
    assert r.n_scored == want_scored == 10 - len(lengths)
    assert r.n_tokens == 10 and r.ctx == ctx
    assert r.nll == pytest.approx(want_nll, rel=1e-12)
    assert r.ppl == pytest.approx(math.exp(want_nll), rel=1e-12)
    assert model.calls == [L for L in lengths if L >= 2]  # one fresh forward per window; 1-token tails skipped


@pytest.mark.parametrize("ctx", [2, 3, 4, 7, 16])
@pytest.mark.parametrize("offset", [0.0, -3.5, 1e5])  # 1e5: exp overflows without the max shift
def test_uniform_model_is_vocab_size(ctx, offset):
    model = FakeModel("uniform", vocab=37, offset=offset)
    r = perplexity(model, list(range(23)), ctx)
    assert r.n_scored == 23 - len(_windows(23, ctx))
    assert r.ppl == pytest.approx(37.0, rel=1e-12)
    assert r.tokens_per_second > 0 and r.seconds >= 0


def test_counting_model_large_logits_stay_exact():
    model = FakeModel("counting", offset=1e4)
    ids = [(3 + k) % model.vocab for k in range(12)]
    want = math.exp((2 * math.lgamma(6) + math.lgamma(3)) / 9)  # windows 5, 5, 2: 4 + 4 + 1 scored
    assert perplexity(model, ids, 5).ppl == pytest.approx(want, rel=1e-9)


def test_token_nll_matches_direct_formula():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((300, 50)).astype(np.float32) * 5   # more rows than one block
    targets = rng.integers(0, 50, 300)
    x = logits.astype(np.float64)
    want = np.log(np.exp(x).sum(axis=1)) - x[np.arange(300), targets]
    np.testing.assert_allclose(token_nll(logits, targets), want, rtol=1e-12)


def test_text_takes_first_tokens_and_all_if_short():
    model = FakeModel("uniform", vocab=64)
    assert perplexity_of_text(model, "abcdefghij" * 3, ctx=4, n_tokens=10).n_tokens == 10
    r = perplexity_of_text(model, "abcdefghij", ctx=4, n_tokens=4096)
    assert r.n_tokens == 10 and r.n_scored == 7 and r.ppl == pytest.approx(64.0)


@pytest.mark.parametrize("call,needle", [
    (lambda m: perplexity(m, range(10), ctx=1), "ctx"),
    (lambda m: perplexity(m, range(10), ctx=0), "ctx"),
    (lambda m: perplexity(m, range(10), ctx=17), r"context of 16 tokens.*n_ctx=17"),
    (lambda m: perplexity(m, [3], ctx=4), "at least 2 tokens"),
    (lambda m: perplexity(m, [], ctx=4), "at least 2 tokens"),
    (lambda m: perplexity_of_text(m, "abcdef", ctx=4, n_tokens=1), "n_tokens"),
    (lambda m: perplexity_of_text(m, "a", ctx=4, n_tokens=100), "1 token long"),
    (lambda m: perplexity_of_text(m, "", ctx=4, n_tokens=100), "0 tokens long"),
])
def test_bad_input(call, needle):
    with pytest.raises(ValueError, match=needle):
        call(FakeModel("uniform"))


# ----------------------------------------------------------------------------------------------
# a tiny random model against the NumPy reference
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppl")
    tok = tiny_bpe_tokenizer()
    w = random_llama_weights(TINY_CFG, seed=5)
    path = write_gguf(d / "tiny.gguf", TINY_CFG, w, "F32", tokenizer_vocab=gguf_tokenizer_fields(tok))
    return path, w, tok


def _reference_ppl(w, ids, ctx):
    total, n = 0.0, 0
    for s in range(0, len(ids), ctx):
        window = ids[s:s + ctx]
        if len(window) < 2:
            continue
        x = reference.llama_forward(w, TINY_CFG, window)[:-1].astype(np.float64)
        m = x.max(axis=1, keepdims=True)
        logp = x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
        total -= logp[np.arange(len(window) - 1), window[1:]].sum()
        n += len(window) - 1
    return math.exp(total / n), n


@pytest.mark.parametrize("n,ctx", [(50, 16), (49, 16), (33, 16), (40, 40)])
def test_windows_match_reference(tiny, n, ctx):
    path, w, tok = tiny
    model = fastinfer.load(path, n_ctx=ctx, kv_type="f32")
    ids = tok.encode(TEXT * 3, add_special_tokens=False).ids[:n]
    assert len(ids) == n
    want, want_scored = _reference_ppl(w, ids, ctx)
    r = perplexity(model, ids, ctx)
    assert r.n_scored == want_scored
    np.testing.assert_allclose(r.ppl, want, rtol=1e-5)
    np.testing.assert_allclose(perplexity_of_text(model, TEXT * 3, ctx, n).ppl, want, rtol=1e-5)


def test_windows_do_not_see_each_other(tiny):
    # the same tokens scored with the whole sequence as context give a different number
    path, w, tok = tiny
    ids = tok.encode(TEXT * 3, add_special_tokens=False).ids[:48]
    windowed = perplexity(fastinfer.load(path, n_ctx=16, kv_type="f32"), ids, 16).ppl
    np.testing.assert_allclose(windowed, _reference_ppl(w, ids, 16)[0], rtol=1e-5)
    assert abs(windowed - _reference_ppl(w, ids, 48)[0]) > 1e-3 * windowed


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------

def _cli(*args, stdin=b""):
    return subprocess.run([sys.executable, "-m", "fastinfer", "perplexity", *args], input=stdin,
                          capture_output=True, timeout=600)


def test_cli_json(tiny, tmp_path):
    path, w, tok = tiny
    f = tmp_path / "text.txt"
    f.write_text(TEXT * 5, encoding="utf-8")
    r = _cli(str(f), "-m", str(path), "--ctx", "16", "--tokens", "100", "--json", "--kv-type", "f32")  # exact
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, err
    lines = out.strip().splitlines()
    res = json.loads(lines[-1])
    assert set(res) == {"model", "dtype", "ctx", "tokens", "scored", "perplexity", "tokens_per_second"}
    assert (res["dtype"], res["ctx"], res["tokens"], res["scored"]) == ("auto", 16, 100, 100 - 7)
    ids = tok.encode(TEXT * 5, add_special_tokens=False).ids[:100]
    np.testing.assert_allclose(res["perplexity"], _reference_ppl(w, ids, 16)[0], rtol=1e-5)
    assert lines[-2].startswith(f"perplexity {res['perplexity']:.2f} over 93 tokens (ctx 16) · ")
    assert "tokens/s" in lines[-2] and res["tokens_per_second"] > 0


def test_cli_stdin_gzip_and_short_text(tiny):
    path, w, tok = tiny
    r = _cli("-", "-m", str(path), "--ctx", "16", "--tokens", "100000", "--json", "--kv-type", "f32",
             stdin=gzip.compress(TEXT.encode("utf-8")))
    assert r.returncode == 0, r.stderr.decode()
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    res = json.loads(r.stdout.decode().strip().splitlines()[-1])
    assert res["tokens"] == len(ids) and "note:" in r.stderr.decode()
    np.testing.assert_allclose(res["perplexity"], _reference_ppl(w, ids, 16)[0], rtol=1e-5)


@pytest.mark.parametrize("args,needle", [
    (["--ctx", "1"], "ctx"),
    (["--tokens", "1"], "tokens"),
    (["--file-is", "missing"], "no-such-file.txt"),
])
def test_cli_errors_are_one_line(tiny, tmp_path, args, needle):
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    if args[0] == "--file-is":
        f, args = tmp_path / "no-such-file.txt", []
    r = _cli(str(f), "-m", str(tiny[0]), *args)
    err = r.stderr.decode()
    assert r.returncode == 1 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("fastinfer: error:")]
    assert len(lines) == 1 and needle in lines[0]


def test_cli_not_utf8(tiny, tmp_path):
    f = tmp_path / "bin.txt"
    f.write_bytes(b"abc\xff\xfe")
    r = _cli(str(f), "-m", str(tiny[0]))
    assert r.returncode == 1 and "not UTF-8" in r.stderr.decode() and "Traceback" not in r.stderr.decode()
