"""The tokenizer of a GGUF `llama` (SentencePiece BPE) vocabulary, held as plain arrays.

It encodes and decodes exactly as the `tokenizers` pipeline that `tokenizer.hf_tokenizer_from_gguf`
builds (Hugging Face's LlamaConverter):

* added tokens (control and unknown ones special, user-defined ones not) are cut out of the raw
  text first, leftmost and then longest;
* each stretch between them gets "▁" in front when the file asks for the space prefix, and every
  space becomes "▁";
* the stretch is one BPE word (`kernels.bpe.spm_bpe`), characters outside the vocabulary fall back
  to <0xXX> byte pieces;
* BOS and EOS go around the whole text as the file's add_bos_token / add_eos_token say.

That pipeline costs ~100 MB resident for Gemma 3's 262k pieces and ~300 MB to build; this one
holds ~4 MB and builds in well under a second. `to_hf()` still gives the `tokenizers` object,
which is what `convert` writes as tokenizer.json.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fastinfer.kernels import bpe

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4
_SPM_SPACE = "\u2581"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True)
class Encoding:
    """The part of `tokenizers.Encoding` that fastinfer reads: ids, and their pieces."""
    ids: list[int]
    pieces: Sequence[str]

    @property
    def tokens(self) -> list[str]:
        return [self.pieces[i] for i in self.ids]


class _Pieces(Sequence):
    """Piece strings decoded from the byte array when asked for, so none is held as an object."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self._data, self._offsets = data, offsets

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        lo, hi = self._offsets[i], self._offsets[i + 1]
        return self._data[lo:hi].tobytes().decode("utf-8")


class SentencePieceBPE:
    """Encode/decode with the subset of `tokenizers.Tokenizer`'s interface that fastinfer uses."""

    def __init__(self, tokens: Sequence[str], types: Sequence[int] | np.ndarray, scores, *,
                 unk_id: int | None, bos_id: int | None, eos_id: int | None,
                 add_space_prefix: bool, add_bos: bool, add_eos: bool):
        encoded = [t.encode("utf-8") for t in tokens]
        self._data = np.frombuffer(b"".join(encoded), np.uint8)
        self._offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        del encoded
        self._types = np.asarray(types, np.int32).reshape(-1)
        self._scores = np.asarray(scores, np.float32).reshape(-1)
        n = len(self._offsets) - 1
        if len(self._types) != n or len(self._scores) != n:
            raise ValueError(f"{len(self._types)} token types and {len(self._scores)} scores for {n} tokens")
        self._table = np.full(1 << max(4, (2 * n - 1).bit_length()), -1, np.int32)
        duplicate = bpe.piece_table(self._table, self._data, self._offsets)
        if duplicate >= 0:
            raise ValueError(f"GGUF tokenizer.ggml.tokens contains duplicate tokens ({tokens[duplicate]!r})")
        self.pieces = _Pieces(self._data, self._offsets)
        self._byte_ids = np.full(256, -1, np.int32)
        for b in range(256):
            i = self.token_to_id(f"<0x{b:02X}>")
            self._byte_ids[b] = -1 if i is None else i
        self._unk_id = -1 if unk_id is None else int(unk_id)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_space_prefix, self.add_bos, self.add_eos = add_space_prefix, add_bos, add_eos
        if (add_bos and bos_id is None) or (add_eos and eos_id is None):
            raise ValueError("GGUF sets tokenizer.ggml.add_bos_token/add_eos_token but has no such token id")

        # Added tokens, matched in the raw text: content -> id, and per first character the lengths
        # to try, longest first.
        self._added = {tokens[i]: i for i in np.flatnonzero(np.isin(self._types, (_UNKNOWN, _CONTROL, _USER_DEFINED)))
                       if tokens[i]}
        self.special_ids = {i for i in self._added.values() if self._types[i] != _USER_DEFINED}
        lengths: dict[str, set[int]] = {}
        for t in self._added:
            lengths.setdefault(t[0], set()).add(len(t))
        self._lengths = {c: sorted(ls, reverse=True) for c, ls in lengths.items()}
        self._starts = re.compile("[" + "".join(re.escape(c) for c in sorted(lengths)) + "]") if lengths else None

    # ---- tokenizers.Tokenizer's interface ----
    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return len(self._offsets) - 1

    def token_to_id(self, token: str) -> int | None:
        i = bpe.find_piece(self._table, self._data, self._offsets, np.frombuffer(token.encode("utf-8"), np.uint8))
        return None if i < 0 else int(i)

    def id_to_token(self, i: int) -> str | None:
        return self.pieces[i] if 0 <= i < len(self.pieces) else None

    def token_bytes(self, i: int) -> bytes:
        """What piece i stands for in the text: "▁" a space, <0xXX> its one byte."""
        piece = self.pieces[i]
        m = _BYTE_PIECE.fullmatch(piece) if len(piece) == 6 else None
        return bytes([int(m.group(1), 16)]) if m else piece.replace(_SPM_SPACE, " ").encode("utf-8")

    def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
        ids: list[int] = []
        if add_special_tokens and self.add_bos:
            ids.append(self.bos_id)
        for stretch, added in self._split(text):
            if added is not None:
                ids.append(added)
            else:
                ids.extend(self._bpe(stretch))
        if add_special_tokens and self.add_eos:
            ids.append(self.eos_id)
        return Encoding(ids, self.pieces)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        parts: list[str] = []
        run = bytearray()  # consecutive <0xXX> pieces become the text their bytes spell
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.pieces) or (skip_special_tokens and i in self.special_ids):
                continue
            piece = self.pieces[i].replace(_SPM_SPACE, " ")
            m = _BYTE_PIECE.fullmatch(piece) if len(piece) == 6 else None
            if m:
                run.append(int(m.group(1), 16))
                continue
            if run:
                parts.append(_bytes_text(run))
                run.clear()
            parts.append(piece)
        if run:
            parts.append(_bytes_text(run))
        text = "".join(parts)
        if self.add_space_prefix and text.startswith(" "):
            text = text[1:]
        return text

    def save(self, path: str) -> None:
        self.to_hf().save(path)

    def to_str(self) -> str:
        return self.to_hf().to_str()

    def to_hf(self):
        """The same tokenizer as a `tokenizers.Tokenizer` (for tokenizer.json)."""
        from .tokenizer import hf_tokenizer_from_gguf
        meta = {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": list(self.pieces),
            "tokenizer.ggml.token_type": self._types,
            "tokenizer.ggml.scores": self._scores,
            "tokenizer.ggml.add_space_prefix": self.add_space_prefix,
            "tokenizer.ggml.add_bos_token": self.add_bos,
            "tokenizer.ggml.add_eos_token": self.add_eos,
        }
        for key, value in (("unknown", self._unk_id if self._unk_id >= 0 else None),
                           ("bos", self.bos_id), ("eos", self.eos_id)):
            if value is not None:
                meta[f"tokenizer.ggml.{key}_token_id"] = value
        return hf_tokenizer_from_gguf(meta)

    # ---- the pipeline ----
    def _split(self, text: str):
        """(stretch, None) for text between added tokens, (token, id) for each added token."""
        start = 0
        if self._starts is not None:
            pos = 0
            while (m := self._starts.search(text, pos)) is not None:
                i = m.start()
                for n in self._lengths[text[i]]:
                    token_id = self._added.get(text[i:i + n])
                    if token_id is not None:
                        if i > start:
                            yield text[start:i], None
                        yield text[i:i + n], token_id
                        start = pos = i + n
                        break
                else:
                    pos = i + 1
        if start < len(text):
            yield text[start:], None

    def _bpe(self, stretch: str) -> list[int]:
        if self.add_space_prefix:
            stretch = _SPM_SPACE + stretch
        raw = np.frombuffer(stretch.replace(" ", _SPM_SPACE).encode("utf-8"), np.uint8)
        out = np.empty(len(raw), np.int32)
        n = bpe.spm_bpe(out, raw, self._table, self._data, self._offsets, self._types, self._scores,
                        self._byte_ids, self._unk_id)
        return out[:n].tolist()


def _bytes_text(run: bytearray) -> str:
    # `tokenizers`' ByteFallback: valid UTF-8 becomes its text, anything else one U+FFFD per byte.
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)
