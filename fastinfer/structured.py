"""Structured output: generation constrained to a JSON schema, through llguidance.

llguidance (MIT, no dependencies of its own) turns a JSON schema into a grammar and, at every step,
into the set of tokens that keep the output inside it. `JsonConstraint.mask` sets every other
token's logit to -inf before sampling; `accept` advances the grammar by the sampled token. Once
the value is complete the grammar admits only EOS, so generation ends there.

The grammar needs every token's bytes: a `tokenizers.Tokenizer` is handed over as its JSON; a GGUF
SentencePiece vocabulary as its pieces ("▁" for a space, <0xXX> for one byte).
"""
from __future__ import annotations

import json
import numpy as np

from .kernels.ops import mask_tokens

# Compact JSON with the usual separators: flexible whitespace lets a small model pad its output
# with newlines until the token budget runs out.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ValueError('JSON-schema output needs llguidance: pip install "fastinfer[server]" '
                         "(or pip install llguidance)") from None
    return llguidance


class _Pieces:
    """What llguidance's TokenizerWrapper reads from a tokenizer: token bytes, EOS/BOS, specials."""

    def __init__(self, model):
        from .weights.spm_bpe import SentencePieceBPE
        tok = model.tokenizer
        assert isinstance(tok, SentencePieceBPE)
        self._tok = tok
        self.eos_token_id = model.eos_ids[0] if model.eos_ids else None
        self.bos_token_id = model.bos_id
        self.special_token_ids = sorted(tok.special_ids)
        self.tokens = [tok.token_bytes(i) for i in range(tok.get_vocab_size())]

    def __call__(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids


def grammar_tokenizer(model):
    """The model's llguidance tokenizer, built once (about a second) and kept on the model."""
    cached = getattr(model, "_grammar_tokenizer", None)
    if cached is not None:
        return cached
    llg = _llguidance()
    from .weights.spm_bpe import SentencePieceBPE
    eos = list(model.eos_ids) or None
    if isinstance(model.tokenizer, SentencePieceBPE):
        from llguidance._tokenizer import TokenizerWrapper
        lt = llg.LLTokenizer(TokenizerWrapper(_Pieces(model)), n_vocab=model.args.vocab_size, eos_token=eos)
    else:
        lt = llg.LLTokenizer(model.tokenizer.to_str(), n_vocab=model.args.vocab_size, eos_token=eos)
    model._grammar_tokenizer = lt
    return lt


def json_schema_grammar(schema: dict | str | bool | None) -> str:
    """llguidance's grammar for a JSON schema (None or True: any JSON object). ValueError if invalid."""
    llg = _llguidance()
    if schema is None or schema is True:
        schema = {"type": "object"}
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ValueError(f"the JSON schema is not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object; got {type(schema).__name__}")
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except ValueError as e:
        raise ValueError(f"invalid JSON schema ({e})") from None
    bad, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if bad:
        raise ValueError(f"unsupported JSON schema: {messages[0] if messages else 'rejected'}")
    return grammar


class JsonConstraint:
    """One sequence's grammar state: mask the logits, accept the sampled token."""

    def __init__(self, model, grammar: str):
        llg = _llguidance()
        self.vocab = model.args.vocab_size
        self.matcher = llg.LLMatcher(grammar_tokenizer(model), grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"invalid grammar: {self.matcher.get_error()}")
        self._words = np.zeros((self.vocab + 31) // 32, np.int32)

    def mask(self, logits: np.ndarray) -> None:
        """In place: -inf for every token the grammar does not allow next."""
        self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        mask_tokens(logits, self._words)

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ValueError(f"the grammar rejected token {token}: {self.matcher.get_error()}")

    def forced(self, limit: int) -> list[int]:
        """Up to `limit` tokens the grammar allows alone from here (a JSON key and its quote and
        colon, say), accepted: they are fed to the model without sampling."""
        if limit <= 0:
            return []
        ff = list(self.matcher.compute_ff_tokens())[:limit]
        if ff and not self.matcher.consume_tokens(ff):
            raise ValueError(f"the grammar rejected its own forced tokens: {self.matcher.get_error()}")
        return ff

    @property
    def finished(self) -> bool:
        """The value is complete: only EOS may follow."""
        return self.matcher.is_stopped()

