"""Rebuild a Hugging Face `tokenizers.Tokenizer` from the tokenizer metadata of a GGUF file.

A GGUF file carries the vocabulary, BPE merges, token types and flags, but no tokenizer.json,
so the tokenizer is reassembled from those pieces:

* `gpt2` vocabularies become byte-level BPE. The pre-tokenizer follows `tokenizer.ggml.pre`
  with the split regexes llama.cpp uses for that name, except "smollm", which follows
  Hugging Face's conversion (see `_PRE_TOKENIZERS`).
* `llama` (SentencePiece) vocabularies become BPE with byte fallback over `▁`-escaped text,
  with merges ranked by the piece scores, like Hugging Face's LlamaConverter. For running a
  model the same pipeline is `spm_bpe.SentencePieceBPE` over plain arrays (tokenizers' BPE would
  hold ~100 MB for a 262k vocabulary); the `tokenizers` object is what tokenizer.json stores.

Control tokens become special added tokens and user-defined tokens plain added tokens, so
they are matched whole in the input text instead of being split by BPE.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors

from .spm_bpe import SentencePieceBPE

__all__ = ["SUPPORTED_PRE_TOKENIZERS", "hf_tokenizer_from_gguf", "tokenizer_from_gguf"]

# Values of tokenizer.ggml.token_type (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4

# SentencePiece's stand-in for a space.
_SPM_SPACE = "\u2581"

# Split regexes, as llama.cpp applies them: each regex in turn cuts every piece so far into
# its matches and the text between them. The GPT-2 pattern is what ByteLevel(use_regex=True)
# applies by itself.
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Llama 3's pattern with the case-insensitive contractions spelled out, as llama.cpp has it.
_LLAMA3_RE = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 differs from Llama 3 only in taking digits one at a time.
_QWEN2_RE = _LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")
_GPT4O_RE = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_RE = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTokenizer:
    """How llama.cpp pre-tokenizes one family of `tokenizer.ggml.pre` names."""

    splits: tuple[str, ...] | None  # None: ByteLevel's own GPT-2 regex
    ignore_merges: bool = False  # a word that is itself a token is not run through merges
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token


_BYTE_LEVEL = _PreTokenizer(None)
_LLAMA3 = _PreTokenizer((_LLAMA3_RE,), ignore_merges=True, add_bos=True)
_QWEN2 = _PreTokenizer((_QWEN2_RE,))
_STARCODER = _PreTokenizer((r"\p{N}", _GPT2_RE))

_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    # llama.cpp (like SmolLM2's original tokenizer.json) first isolates each digit for smollm;
    # we follow Hugging Face's own GGUF conversion, the parity reference, which does not. The
    # two differ only around digits: whitespace before one ("a  1", " \n2") and non-ASCII
    # numerals ("a ²²").
    "smollm": _BYTE_LEVEL,
    **dict.fromkeys(
        ["gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "jina-es", "jina-de", "jina-v1-en",
         "jina-v2-es", "jina-v2-de", "jina-v2-code", "roberta-bpe", "gigachat", "a.x-4.0",
         "mellum", "exaone4", "trillion", "granite-docling"],
        _BYTE_LEVEL,
    ),
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
         "lfm2"],
        _LLAMA3,
    ),
    # Same regex as Llama 3, without its ignore_merges and BOS defaults.
    **dict.fromkeys(["dbrx", "smaug-bpe", "glm4", "chatglm-bpe"], _PreTokenizer((_LLAMA3_RE,))),
    **dict.fromkeys(
        ["qwen2", "deepseek-r1-qwen", "kormo", "stablelm2", "megrez", "hunyuan"], _QWEN2
    ),
    **dict.fromkeys(
        ["starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"], _STARCODER
    ),
    **dict.fromkeys(["gpt-4o", "llama4"], _PreTokenizer((_GPT4O_RE,))),
    "tekken": _PreTokenizer((_TEKKEN_RE,), ignore_merges=True, add_bos=True),
    "falcon": _PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_RE, r"[0-9][0-9][0-9]")),
    # llama.cpp's own splitting for the name "default".
    "default": _PreTokenizer(
        (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]")
    ),
}

# tokenizer.ggml.pre names understood for gpt2 vocabularies; any other name gets GPT-2
# splitting and a warning.
SUPPORTED_PRE_TOKENIZERS = tuple(sorted(_PRE_TOKENIZERS))


def tokenizer_from_gguf(meta: Mapping[str, Any]) -> Tokenizer | SentencePieceBPE:
    """Build the tokenizer described by GGUF metadata (`gguf_meta.open_gguf(path).metadata`).

    A `llama` (SentencePiece) vocabulary becomes a `SentencePieceBPE`, which encodes as
    `hf_tokenizer_from_gguf` would in a fraction of its memory; a `gpt2` one the `tokenizers` BPE.
    Raises ValueError if the metadata has no tokenizer, an unsupported `tokenizer.ggml.model`,
    or inconsistent tokenizer arrays.
    """
    tokens, types = _tokens_and_types(meta)
    if meta.get("tokenizer.ggml.model") != "llama":
        return hf_tokenizer_from_gguf(meta)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return SentencePieceBPE(
        tokens, types, _scores(meta, tokens),
        unk_id=meta.get("tokenizer.ggml.unknown_token_id"),
        bos_id=None if bos is None else int(bos), eos_id=None if eos is None else int(eos),
        add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )


def hf_tokenizer_from_gguf(meta: Mapping[str, Any]) -> Tokenizer:
    """The tokenizer described by GGUF metadata as a `tokenizers.Tokenizer` (what tokenizer.json holds)."""
    tokens, types = _tokens_and_types(meta)
    model = meta.get("tokenizer.ggml.model")
    if model == "gpt2":
        tokenizer, add_bos_default = _byte_level_bpe(meta, tokens)
    elif model == "llama":
        tokenizer, add_bos_default = _sentencepiece_bpe(meta, tokens, types), True
    else:
        raise ValueError(
            f"unsupported GGUF tokenizer model type {model!r} (tokenizer.ggml.model); "
            "supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece BPE)"
        )
    _add_special_and_user_tokens(tokenizer, tokens, types)
    tokenizer.post_processor = _bos_eos_processor(meta, tokens, add_bos_default)
    return tokenizer


def _tokens_and_types(meta: Mapping[str, Any]) -> tuple[Sequence[str], list[int]]:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ValueError("GGUF file has no tokenizer metadata (tokenizer.ggml.tokens) or it is not a list of strings")
    types = meta.get("tokenizer.ggml.token_type")
    types = [_NORMAL] * len(tokens) if types is None else [int(t) for t in np.asarray(types).reshape(-1)]
    if len(types) != len(tokens):
        raise ValueError(
            f"GGUF tokenizer.ggml.token_type has {len(types)} entries "
            f"for {len(tokens)} tokens"
        )
    model = meta.get("tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        raise ValueError(
            f"unsupported GGUF tokenizer model type {model!r} (tokenizer.ggml.model); "
            "supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece BPE)"
        )
    return tokens, types


def _scores(meta: Mapping[str, Any], tokens: Sequence[str]):
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ValueError("GGUF llama tokenizer needs one score per token (tokenizer.ggml.scores)")
    return scores


def _vocab(tokens: Sequence[str]) -> dict[str, int]:
    """Token string -> id; duplicates would silently renumber tokens, so they are an error."""
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF tokenizer.ggml.tokens contains duplicate tokens")
    return vocab


def _split_merge(merge: str) -> tuple[str, str]:
    """'a b' -> ('a', 'b'); searching from index 1 keeps a leading space in the left part."""
    cut = merge.find(" ", 1)
    if cut < 0:
        raise ValueError(f"malformed GGUF merge {merge!r} (expected 'left right')")
    return merge[:cut], merge[cut + 1 :]


def _byte_level_bpe(meta: Mapping[str, Any], tokens: Sequence[str]) -> tuple[Tokenizer, bool]:
    """GPT-2 style byte-level BPE; returns it with llama.cpp's default for adding BOS."""
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise ValueError("GGUF gpt2 tokenizer has no merges (tokenizer.ggml.merges)")
    name = meta.get("tokenizer.ggml.pre", "")
    pre = _PRE_TOKENIZERS.get(name)
    if pre is None:
        warnings.warn(
            f"unknown GGUF pre-tokenizer {name!r} (tokenizer.ggml.pre); "
            "using GPT-2 byte-level splitting, ids may differ from llama.cpp",
            stacklevel=3,
        )
        pre = _BYTE_LEVEL
    # ignore_merges only exists in tokenizers >= 0.19; pass it just where it is needed.
    extra = {"ignore_merges": True} if pre.ignore_merges else {}
    tokenizer = Tokenizer(
        models.BPE(_vocab(tokens), [_split_merge(m) for m in merges], **extra)
    )
    if pre.splits is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, pre.add_bos


def _sentencepiece_bpe(
    meta: Mapping[str, Any], tokens: Sequence[str], types: Sequence[int]
) -> Tokenizer:
    """SentencePiece BPE: merges from scores, byte fallback, `▁` for spaces."""
    scores = _scores(meta, tokens)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(
        models.BPE(
            _vocab(tokens),
            _merges_from_scores(tokens, types, scores),
            unk_token=tokens[unk_id] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    # llama.cpp's default is to add the prefix space; Prepend runs once per stretch of text
    # between added tokens, which is also where llama.cpp adds it.
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend(_SPM_SPACE), normalizers.Replace(" ", _SPM_SPACE)]
        )
        strip_prefix = [decoders.Strip(" ", 1, 0)]
    else:
        tokenizer.normalizer = normalizers.Replace(" ", _SPM_SPACE)
        strip_prefix = []
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip_prefix]
    )
    return tokenizer


def _merges_from_scores(
    tokens: Sequence[str], types: Sequence[int], scores: Sequence[float]
) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven merging.

    SentencePiece joins the adjacent pair whose concatenation is the highest-scoring piece, so
    every split of a normal piece into two normal pieces is a merge, ranked by the score of
    the joined piece (ties by id, as Hugging Face's SentencePieceExtractor orders them).
    """
    ids = {token: i for i, token in enumerate(tokens) if types[i] == _NORMAL}
    ranked = []
    for piece, i in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], i, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_special_and_user_tokens(
    tokenizer: Tokenizer, tokens: Sequence[str], types: Sequence[int]
) -> None:
    """Make control/unknown tokens special added tokens and user-defined ones plain added tokens.

    They are matched in the raw text (normalized=False), like llama.cpp does; their ids are
    already in the model vocabulary, so adding them does not renumber anything.
    """
    special = [i for i, t in enumerate(types) if t in (_CONTROL, _UNKNOWN)]
    user = [i for i, t in enumerate(types) if t == _USER_DEFINED]
    tokenizer.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i in special]
    )
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])


def _bos_eos_processor(
    meta: Mapping[str, Any], tokens: Sequence[str], add_bos_default: bool
) -> processors.TemplateProcessing | None:
    """Post-processor adding BOS/EOS as the file's add_bos_token/add_eos_token ask, else None."""
    added: dict[str, tuple[str, int]] = {}  # "bos"/"eos" -> (token, id)
    for which, default in (("bos", add_bos_default), ("eos", False)):
        if meta.get(f"tokenizer.ggml.add_{which}_token", default):
            token_id = meta.get(f"tokenizer.ggml.{which}_token_id")
            if token_id is None:
                raise ValueError(
                    f"GGUF sets tokenizer.ggml.add_{which}_token but has no "
                    f"tokenizer.ggml.{which}_token_id"
                )
            added[which] = (tokens[token_id], token_id)
    if not added:
        return None

    def template(seq: str, type_id: int) -> list[str]:
        pieces = [f"{seq}:{type_id}"]
        if "bos" in added:
            pieces.insert(0, f"{added['bos'][0]}:{type_id}")
        if "eos" in added:
            pieces.append(f"{added['eos'][0]}:{type_id}")
        return pieces

    return processors.TemplateProcessing(
        single=template("$A", 0),
        pair=template("$A", 0) + template("$B", 1),
        special_tokens=list(added.values()),
    )
