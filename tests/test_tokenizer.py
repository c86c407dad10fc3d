"""Tokenizers rebuilt from GGUF metadata: id-for-id parity with Hugging Face's conversion.

The reference is the tokenizer.json that Hugging Face's GGUF-to-tokenizers conversion makes
for the real SmolLM2 GGUF (tests/data/smollm2-tokenizer), run on three Jane Austen novels
(tests/data/corpus). Small synthetic vocabularies cover what SmolLM2 does not use.
"""
import gzip
import warnings
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from fastinfer.weights.gguf_meta import open_gguf, read_metadata
from fastinfer.weights.tokenizer import SUPPORTED_PRE_TOKENIZERS, tokenizer_from_gguf

DATA = Path(__file__).parent / "data"
CORPUS = sorted((DATA / "corpus").glob("*.txt.gz"))


def _read_gz(path: Path) -> str:
    return gzip.decompress(path.read_bytes()).decode("utf-8")


@pytest.fixture(scope="module")
def smollm2_meta(smollm2_gguf):
    return read_metadata(open_gguf(smollm2_gguf))


@pytest.fixture(scope="module")
def ours(smollm2_meta) -> Tokenizer:
    return tokenizer_from_gguf(smollm2_meta)


@pytest.fixture(scope="module")
def reference() -> Tokenizer:
    return Tokenizer.from_str(_read_gz(DATA / "smollm2-tokenizer" / "tokenizer.json.gz"))


def _assert_same_ids(ours: Tokenizer, reference: Tokenizer, text: str) -> None:
    """Same ids with and without add_special_tokens; on failure show where they diverge."""
    for kwargs in ({}, {"add_special_tokens": False}):
        got, want = ours.encode(text, **kwargs), reference.encode(text, **kwargs)
        if got.ids == want.ids:
            continue
        at = next(
            (i for i, (g, w) in enumerate(zip(got.ids, want.ids)) if g != w),
            min(len(got.ids), len(want.ids)),
        )
        raise AssertionError(
            f"ids differ ({kwargs or 'default'}) at token {at} of {len(want.ids)} "
            f"(text {text[:60]!r}...): ours {got.tokens[max(0, at - 3) : at + 4]} "
            f"vs reference {want.tokens[max(0, at - 3) : at + 4]}"
        )


def test_corpus_files_are_there():
    assert [p.name for p in CORPUS] == [
        "persuasion.txt.gz", "prideprejudice.txt.gz", "sensesensibility.txt.gz"
    ]


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name.split(".")[0])
def test_whole_file_matches_reference(ours, reference, path):
    text = _read_gz(path)
    _assert_same_ids(ours, reference, text)
    assert len(ours.encode(text).ids) > 100_000  # really compared a whole novel


def test_line_by_line_matches_reference(ours, reference):
    lines = _read_gz(CORPUS[0]).splitlines(keepends=True)
    for kwargs in ({}, {"add_special_tokens": False}):
        got = ours.encode_batch(lines, **kwargs)
        want = reference.encode_batch(lines, **kwargs)
        bad = [i for i, (g, w) in enumerate(zip(got, want)) if g.ids != w.ids]
        assert not bad, f"{len(bad)} lines differ, first {lines[bad[0]]!r}"
    assert len(lines) > 8000


SPECIAL_AND_TRICKY = [
    "<|im_start|>user\nHi<|im_end|>\n",
    "<|endoftext|>",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "mixed<|im_end|> <|im_start|>  <repo_name>x<file_sep>\n<|endoftext|><|endoftext|>",
    "<|im_start", "im_start|>", "<|IM_START|>", "< |im_end| >",
    "", " ", "  ", "\n", "\n\n\n", "\t", " leading space", "   three leading spaces",
    "trailing spaces   ", "\tTab\tseparated\tvalues\t", "line one\nline two\r\nline three\n\n",
    "Numbers: 0 1 22 333 4444 55555 3.14159 -42 1e-9 2024-11-24 1,000,000  7\n8",
    "It's, don't, I'LL, we've, they'RE, 'quoted'",
    "naïve café Straße Ελληνικά русский 中文 日本語 한국어 العربية हिन्दी",
    "emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ ²³ ½ ٣",
    "text\u00a0with\u2009odd\u200bspaces\u3000and\x00control\x01chars",
    "code:\n    def f(x):\n\treturn x ** 2  # comment\n",
]


@pytest.mark.parametrize("text", SPECIAL_AND_TRICKY)
def test_special_and_tricky_strings_match_reference(ours, reference, text):
    _assert_same_ids(ours, reference, text)


def test_every_added_token_matches_reference(ours, reference):
    added = [t.content for t in reference.get_added_tokens_decoder().values()]
    assert len(added) == 17
    for token in added:
        for text in (token, f"a{token}b", f" {token} ", f"\n{token}\n", f"{token}{token}"):
            _assert_same_ids(ours, reference, text)
    _assert_same_ids(ours, reference, " x ".join(added))


def test_added_tokens_are_the_reference_ones(ours, reference):
    assert ours.get_added_tokens_decoder() == reference.get_added_tokens_decoder()
    assert ours.get_vocab_size() == reference.get_vocab_size() == 49152


def test_no_bos_added_for_smollm2(ours, smollm2_meta):
    assert smollm2_meta["tokenizer.ggml.add_bos_token"] is False
    text = "Hello there"
    assert ours.encode(text).ids == ours.encode(text, add_special_tokens=False).ids


def test_decode_round_trips(ours, reference):
    samples = [*SPECIAL_AND_TRICKY, _read_gz(CORPUS[1])[:50_000]]
    for text in samples:
        ids = ours.encode(text).ids
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids) == reference.decode(ids)


# ---- bad metadata ----


def test_missing_tokens_key_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no tokenizer metadata \(tokenizer\.ggml\.tokens\)"):
        tokenizer_from_gguf({"general.architecture": "llama"})


def test_unknown_model_type_is_named():
    meta = {"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a", "b"]}
    with pytest.raises(ValueError, match=r"unsupported .*model type 't5'"):
        tokenizer_from_gguf(meta)


def test_gpt2_without_merges_is_a_clear_error():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"]}
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.merges"):
        tokenizer_from_gguf(meta)


def test_token_type_length_mismatch_is_an_error():
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b"],
        "tokenizer.ggml.token_type": [1],
    }
    with pytest.raises(ValueError, match="token_type"):
        tokenizer_from_gguf(meta)


# ---- tiny synthetic vocabularies ----


def _tiny_gpt2_meta(**extra):
    tokens = ["<|bos|>", "<tool>", "h", "e", "l", "o", "Ġ", "w", "r", "d", "1", "2",
              "he", "ll", "hell", "hello", "Ġw", "or", "Ġwor", "Ċ"]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 4] + [1] * (len(tokens) - 2),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 0,
        **extra,
    }


def test_tiny_gpt2_vocabulary():
    tok = tokenizer_from_gguf(_tiny_gpt2_meta())
    assert tok.encode("hello world").tokens == ["hello", "Ġwor", "l", "d"]
    # The control token is special; the user-defined one is matched whole but not special.
    enc = tok.encode("<|bos|>hello<tool>12")
    assert enc.ids == [0, 15, 1, 10, 11]
    assert tok.decode(enc.ids) == "hello<tool>12"
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|bos|>hello<tool>12"


def test_tiny_gpt2_add_bos_token():
    tok = tokenizer_from_gguf(_tiny_gpt2_meta(**{"tokenizer.ggml.add_bos_token": True}))
    assert tok.encode("hello").ids == [0, 15]
    assert tok.encode("hello", add_special_tokens=False).ids == [15]
    assert tok.encode("hello", "hello").ids == [0, 15, 0, 15]


def test_tiny_gpt2_llama3_pre_tokenizer_splits_digits_in_threes():
    tok = tokenizer_from_gguf(_tiny_gpt2_meta(**{"tokenizer.ggml.pre": "llama-bpe"}))
    words = [w for w, _ in tok.pre_tokenizer.pre_tokenize_str("hello 12121")]
    assert words == ["hello", "Ġ", "121", "21"]
    # llama3 adds BOS unless the file says otherwise.
    assert tok.encode("hello").ids == [0, 15]


@pytest.mark.parametrize("pre", SUPPORTED_PRE_TOKENIZERS)
def test_every_supported_pre_tokenizer_builds_and_round_trips(pre):
    tok = tokenizer_from_gguf(_tiny_gpt2_meta(**{"tokenizer.ggml.pre": pre}))
    text = "hello world 12 hello\n\nhe  ll"
    assert tok.decode(tok.encode(text).ids) == text


def test_tiny_gpt2_unknown_pre_tokenizer_warns_and_uses_gpt2():
    with pytest.warns(UserWarning, match="unknown GGUF pre-tokenizer 'mystery'"):
        tok = tokenizer_from_gguf(_tiny_gpt2_meta(**{"tokenizer.ggml.pre": "mystery"}))
    assert tok.encode("hello world").tokens == ["hello", "Ġwor", "l", "d"]


def _tiny_llama_meta(**extra):
    pieces = ["▁", "h", "e", "l", "o", "he", "ll", "hell", "hello", "▁hello"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces)]
    # SentencePiece scores: longer pieces win, so "▁hello" is built before anything else.
    scores = [0.0] * (3 + 256) + [-float(len(pieces) - len(p)) for p in pieces]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        **extra,
    }


def test_tiny_llama_vocabulary():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok = tokenizer_from_gguf(_tiny_llama_meta())
    enc = tok.encode("hello €")
    # BOS by default, the prefix space joins "hello", and "€" falls back to its UTF-8 bytes.
    assert enc.tokens == ["<s>", "▁hello", "▁", "<0xE2>", "<0x82>", "<0xAC>"]
    assert tok.decode(enc.ids) == "hello €"
    assert tok.encode("</s>hello", add_special_tokens=False).tokens == ["</s>", "▁hello"]


def test_tiny_llama_without_space_prefix_or_bos():
    meta = _tiny_llama_meta(
        **{"tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.add_bos_token": False}
    )
    tok = tokenizer_from_gguf(meta)
    enc = tok.encode("hello hello")
    assert enc.tokens == ["hello", "▁hello"]
    assert tok.decode(enc.ids) == "hello hello"


def test_llama_without_scores_is_a_clear_error():
    meta = _tiny_llama_meta()
    del meta["tokenizer.ggml.scores"]
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.scores"):
        tokenizer_from_gguf(meta)
