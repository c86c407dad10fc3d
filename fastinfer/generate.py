"""The generation loop: prefill, decode one token at a time, sample, detokenize, stop."""
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import tokenizers

from .beam import no_repeat_ngram_ban
from .sampling import SamplingParams, sample


@dataclass(frozen=True)
class GenerationOptions:
    """Everything that decides which tokens come out, resolved from a call, a config and defaults."""
    max_new_tokens: int
    sampling: SamplingParams
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0


def generate_ids(session, prompt: Sequence[int], max_new_tokens: int, params: SamplingParams,
                 eos_ids: Sequence[int], no_repeat_ngram_size: int = 0, min_new_tokens: int = 0) -> Iterator[int]:
    """Yield new token ids until max_new_tokens, an EOS token or the end of the context.

    As HF's processors on raw logits: no_repeat_ngram_size > 0 bans tokens that would repeat an
    n-gram of prompt + output; EOS is banned until min_new_tokens tokens have been generated.
    """
    rng = np.random.default_rng(params.seed)
    # The repetition penalty looks at the prompt and everything generated so far.
    seen = np.empty(len(prompt) + max_new_tokens, np.int64)
    seen[:len(prompt)] = prompt
    n_seen = len(prompt)
    logits = session.prefill(prompt)
    for i in range(max_new_tokens):
        if no_repeat_ngram_size > 0 or (i < min_new_tokens and len(eos_ids)):
            logits = np.array(logits, dtype=np.float32)
            if no_repeat_ngram_size > 0:
                banned = no_repeat_ngram_ban(seen[:n_seen], no_repeat_ngram_size)
                if banned:
                    logits[banned] = -np.inf
            if i < min_new_tokens and len(eos_ids):
                logits[list(eos_ids)] = -np.inf
        tok = sample(logits, params, rng, seen[:n_seen])
        if tok in eos_ids:
            return
        yield tok
        seen[n_seen] = tok
        n_seen += 1
        if i == max_new_tokens - 1 or session.pos >= session.max_seq:
            return
        logits = session.decode_step(tok)


class TextStream:
    """Turns token ids into text pieces, honouring stop strings.

    Text is re-decoded from all generated ids (BPE merges and multi-byte characters can change the
    tail), and any tail that could still grow into a stop string is held back until it can't.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False

    def push(self, tok: int) -> str:
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte
            return ""
        for s in self.stop:
            at = text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.stopped = True
                return self._emit(text, at)
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._emit(text, len(text) - hold)

    def flush(self) -> str:
        if self.stopped:
            return ""
        return self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=False), None)

    def _emit(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        piece = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece
