"""SentencePiece BPE over plain arrays (weights/spm_bpe.py, kernels/bpe.py) against two references:

* a plain-Python merge loop written from the definition (join the adjacent pair whose joined piece
  is a normal piece with the highest score; ties by that piece's id, then the left and right ids,
  then leftmost), on random vocabularies with tied scores;
* the `tokenizers` library running the same vocabulary as a BPE with ranked merges
  (`hf_tokenizer_from_gguf`), on those vocabularies and on the real Gemma 3 vocabulary over a
  whole novel.
"""
import gzip
from pathlib import Path

import numpy as np
import pytest

from fastinfer.weights.spm_bpe import SentencePieceBPE
from fastinfer.weights.tokenizer import hf_tokenizer_from_gguf, tokenizer_from_gguf

DATA = Path(__file__).parent / "data"
NORMAL, UNKNOWN, CONTROL, USER, BYTE = 1, 2, 3, 4, 6


def reference_bpe(text: str, tokens: list[str], types: list[int], scores: list[float],
                  unk_id: int | None) -> list[int]:
    """One stretch of normalized text, merged pair by pair from the definition."""
    ids = {t: i for i, t in enumerate(tokens)}
    syms: list[int] = []
    unk = False
    for ch in text:
        if ch in ids:
            if unk:
                syms.append(unk_id)
                unk = False
            syms.append(ids[ch])
        elif all(f"<0x{b:02X}>" in ids for b in ch.encode()):
            syms.extend(ids[f"<0x{b:02X}>"] for b in ch.encode())
        elif unk_id is not None:
            unk = True
    if unk:
        syms.append(unk_id)
    while True:
        best = None
        for k in range(len(syms) - 1):
            a, b = syms[k], syms[k + 1]
            p = ids.get(tokens[a] + tokens[b])
            if types[a] == types[b] == NORMAL and p is not None and types[p] == NORMAL:
                key = (-scores[p], p, a, b, k)
                best = key if best is None or key < best else best
        if best is None:
            return syms
        _, p, _, _, k = best
        syms[k:k + 2] = [p]


def _meta(tokens, types, scores, **extra):
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


def _random_vocab(rng, alphabet: str, n_pieces: int, with_bytes: bool):
    """Special tokens, (some) byte pieces, every letter, then random multi-letter pieces with
    scores drawn from a few values, so ties are common."""
    tokens = ["<unk>", "<s>", "</s>", "<ctl>", "@@"]
    types = [UNKNOWN, CONTROL, CONTROL, CONTROL, USER]
    if with_bytes:
        tokens += [f"<0x{b:02X}>" for b in range(256)]
        types += [BYTE] * 256
    letters = list(alphabet)
    tokens += letters
    types += [NORMAL] * len(letters)
    seen, fixed = set(tokens), len(tokens)
    while len(tokens) < fixed + n_pieces:
        piece = "".join(rng.choice(letters, size=int(rng.integers(2, 6))))
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(NORMAL if rng.random() > 0.05 else USER)
    scores = [0.0] * fixed + list(rng.choice([-1.0, -2.0, -3.0, -2.5], size=n_pieces))
    return tokens, types, [float(s) for s in scores]


@pytest.mark.parametrize("seed", range(6))
def test_random_vocabularies_match_the_definition_and_tokenizers(seed):
    rng = np.random.default_rng(seed)
    alphabet = "ab▁c" if seed % 2 else "abcdé▁"
    tokens, types, scores = _random_vocab(rng, alphabet, 60 + 40 * seed, with_bytes=seed % 3 != 2)
    space_prefix = seed % 2 == 0
    meta = _meta(tokens, types, scores, **{"tokenizer.ggml.add_space_prefix": space_prefix})
    ours, hf = tokenizer_from_gguf(meta), hf_tokenizer_from_gguf(meta)
    assert isinstance(ours, SentencePieceBPE)
    text_chars = list(alphabet.replace("▁", " ")) + [" ", "z", "€", "<ctl>", "@@", "</s>"]
    for _ in range(150):
        text = "".join(rng.choice(text_chars, size=int(rng.integers(0, 40))))
        got = ours.encode(text).ids
        assert got == hf.encode(text).ids, text
        assert ours.encode(text, add_special_tokens=False).ids == hf.encode(text, add_special_tokens=False).ids
        if not any(t in text for t in ("<ctl>", "@@", "</s>")):  # one stretch: the definition applies
            stretch = ("▁" if space_prefix and text else "") + text.replace(" ", "▁")
            assert got[1:] == reference_bpe(stretch, tokens, types, scores, 0), text
        for skip in (False, True):
            assert ours.decode(got, skip_special_tokens=skip) == hf.decode(got, skip_special_tokens=skip)


def test_added_tokens_leftmost_then_longest():
    tokens = ["<unk>", "<s>", "</s>", "<a>", "<a><b>", "<b>", "a", "b", "<", ">"]
    types = [UNKNOWN, CONTROL, CONTROL, CONTROL, CONTROL, USER, NORMAL, NORMAL, NORMAL, NORMAL]
    meta = _meta(tokens, types, [0.0] * len(tokens), **{"tokenizer.ggml.add_space_prefix": False})
    ours, hf = tokenizer_from_gguf(meta), hf_tokenizer_from_gguf(meta)
    for text in ["<a><b>", "x<a><b>a", "<a>b<b>", "<<a>>", "<a><a><b><b>"]:
        assert ours.encode(text).ids == hf.encode(text).ids, text
    assert ours.encode("<a><b>", add_special_tokens=False).ids == [4]


def test_byte_fallback_decodes_like_tokenizers():
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "a"]
    types = [UNKNOWN, CONTROL, CONTROL, *[BYTE] * 256, NORMAL, NORMAL]
    meta = _meta(tokens, types, [0.0] * len(tokens))
    ours, hf = tokenizer_from_gguf(meta), hf_tokenizer_from_gguf(meta)
    byte = lambda b: 3 + b  # noqa: E731
    for ids in ([byte(0xE2), byte(0x82), byte(0xAC)],          # "€"
                [byte(0xE2), byte(0x82)],                      # cut short: one U+FFFD per byte
                [259, byte(0xFF), 260, byte(0x41), 1, 2],      # around normal and special pieces
                [259, 260, 259]):
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids


def test_without_byte_pieces_unknown_characters_fuse():
    tokens = ["<unk>", "<s>", "</s>", "▁", "a", "b", "ab"]
    types = [UNKNOWN, CONTROL, CONTROL, NORMAL, NORMAL, NORMAL, NORMAL]
    meta = _meta(tokens, types, [0.0, 0.0, 0.0, -1.0, -1.0, -1.0, -0.5])
    ours, hf = tokenizer_from_gguf(meta), hf_tokenizer_from_gguf(meta)
    for text in ["a€€b", "€", "ab€a€€€b", "€ €"]:
        assert ours.encode(text).ids == hf.encode(text).ids, text


def test_vocabulary_lookups():
    tokens = ["<unk>", "<s>", "</s>", "▁", "a"]
    tok = tokenizer_from_gguf(_meta(tokens, [UNKNOWN, CONTROL, CONTROL, NORMAL, NORMAL], [0.0] * 5))
    assert [tok.token_to_id(t) for t in tokens] == list(range(5))
    assert tok.token_to_id("zz") is None
    assert [tok.id_to_token(i) for i in range(5)] == tokens and tok.id_to_token(5) is None
    assert tok.get_vocab_size() == 5
    assert tok.encode("a a").tokens == ["<s>", "▁", "a", "▁", "a"]


def test_duplicate_tokens_are_a_clear_error():
    tokens = ["<unk>", "<s>", "</s>", "a", "a"]
    with pytest.raises(ValueError, match="duplicate"):
        tokenizer_from_gguf(_meta(tokens, [UNKNOWN, CONTROL, CONTROL, NORMAL, NORMAL], [0.0] * 5))


def test_to_hf_is_the_same_tokenizer(tmp_path):
    rng = np.random.default_rng(7)
    tokens, types, scores = _random_vocab(rng, "abc▁", 80, with_bytes=True)
    ours = tokenizer_from_gguf(_meta(tokens, types, scores))
    ours.save(str(tmp_path / "tokenizer.json"))
    from tokenizers import Tokenizer
    saved = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in ["abc cab", "a  b<ctl>c", "€ a"]:
        assert saved.encode(text).ids == ours.encode(text).ids


@pytest.fixture(scope="module")
def gemma_meta(gemma3_gguf):
    from fastinfer.weights.gguf_meta import open_gguf, read_metadata
    return read_metadata(open_gguf(gemma3_gguf))


def test_gemma3_novel_equals_tokenizers(gemma_meta):
    """Gemma 3's 262k pieces: every id of a whole novel, and each of its lines with BOS."""
    ours, hf = tokenizer_from_gguf(gemma_meta), hf_tokenizer_from_gguf(gemma_meta)
    text = gzip.decompress((DATA / "corpus" / "persuasion.txt.gz").read_bytes()).decode()
    got, want = ours.encode(text).ids, hf.encode(text).ids
    assert got == want
    for line in text.splitlines()[::7]:
        assert ours.encode(line).ids == hf.encode(line).ids, line
    assert ours.decode(got) == hf.decode(want)
    odd = "naïve café 東京 🤖\t\t  x\u200b<start_of_turn>user\n<unused7>\x00 \U0001F9D1\u200D\U0001F52C"
    assert ours.encode(odd).ids == hf.encode(odd).ids
    ids = ours.encode(odd).ids
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
