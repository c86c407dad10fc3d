"""The generation loop: prefill, decode one token at a time, sample, detokenize, stop."""
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import tokenizers

from .beam import process_scores
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
    grammar: str | None = None  # llguidance's grammar of a JSON schema (fastinfer/structured.py)
    prompt_lookup: int = 0  # longest draft of prompt-lookup decoding; 0: off


class TokenChooser:
    """One sequence's next-token rule: HF's processors on raw logits, then sampling.

    no_repeat_ngram_size > 0 bans tokens that would repeat an n-gram of prompt + output; EOS is
    banned until min_new_tokens tokens exist; the repetition penalty sees prompt + output.
    """

    def __init__(self, prompt: Sequence[int], max_new_tokens: int, params: SamplingParams,
                 eos_ids: Sequence[int], no_repeat_ngram_size: int = 0, min_new_tokens: int = 0,
                 constraint=None):
        self.params, self.eos_ids, self.constraint = params, list(eos_ids), constraint
        self._work = None
        self.max_new_tokens, self.ngram, self.min_new = max_new_tokens, no_repeat_ngram_size, min_new_tokens
        self.rng = np.random.default_rng(params.seed)
        self.seen = np.empty(len(prompt) + max_new_tokens, np.int64)
        self.seen[:len(prompt)] = prompt
        self.n_seen, self.n_new = len(prompt), 0

    @property
    def done(self) -> bool:
        """No token may follow: the budget is spent, or a constraint's value is complete."""
        return self.n_new >= self.max_new_tokens or self.finished

    @property
    def finished(self) -> bool:
        return self.constraint is not None and self.constraint.finished

    def take_forced(self, room: int) -> list[int]:
        """Tokens a constraint forces next (at most `room`, and within the budget), counted as
        generated: the caller feeds them without sampling."""
        if self.constraint is None:
            return []
        ff = self.constraint.forced(min(room, self.max_new_tokens - self.n_new))
        for tok in ff:
            self.seen[self.n_seen] = tok
            self.n_seen += 1
        self.n_new += len(ff)
        return ff

    def choose(self, logits: np.ndarray, draft: int | None = None) -> int | None:
        """The next token for these logits (vocab,), or None when the sequence ends with EOS.
        A draft token (prompt lookup) is accepted by `sample`'s rule, which keeps the output's
        distribution."""
        check_finite(logits)
        processed = self.ngram > 0 or (self.n_new < self.min_new and self.eos_ids)
        if processed or self.constraint is not None:
            # One work row for the whole sequence: a fresh 1 MB array per token (Gemma's vocabulary)
            # is a fresh mapping to fault in, ~0.3 ms.
            if self._work is None or self._work.shape != logits.shape:
                self._work = np.empty(logits.shape, np.float32)
            np.copyto(self._work, logits)
            logits = self._work
        if processed:
            # the repetition penalty is left to `sample`, which applies it for every strategy
            process_scores(logits, self.seen[:self.n_seen], self.n_new, self.eos_ids,
                           no_repeat_ngram_size=self.ngram, min_new_tokens=self.min_new)
        if self.constraint is not None:
            self.constraint.mask(logits)
        tok = sample(logits, self.params, self.rng, self.seen[:self.n_seen], draft)
        if tok in self.eos_ids:
            return None
        if self.constraint is not None:
            self.constraint.accept(tok)
        self.seen[self.n_seen] = tok
        self.n_seen += 1
        self.n_new += 1
        return tok


def check_finite(logits: np.ndarray) -> None:
    """A ValueError unless every logit is finite: a NaN or an infinity (weights that overflow
    float32) would otherwise pick a token silently. (6 us for 49,152 logits; a float64 sum took 26.)"""
    if not np.isfinite(logits).all():
        raise ValueError("the model computed non-finite logits (its weights overflow float32 arithmetic)")


class PromptLookup:
    """Draft tokens for prompt-lookup decoding: where the last n tokens of the context (n = NGRAM
    down to 2) occurred before, the tokens that followed them, latest occurrence first.

    The draft length adapts: it starts at START, grows by GROW after a draft taken whole and falls
    to what was taken, but not below START, after a miss (text that copies its context misses at
    its seams - a changed indentation, the end of a quotation - and goes on copying after them, so
    a draft of 1 would only ramp up again); after MISSES drafts in a row with nothing taken, drafting
    pauses for PAUSE tokens, so that text that does not copy its context pays for few failed
    drafts. (On the default model a check of 2-4 tokens costs 1.1-1.8 decode steps and one of 8
    1.8-2.9, more at longer contexts: long drafts only where short ones were taken whole.)

    The n-grams seen are indexed as the context grows, so a draft costs a few dictionary lookups
    however long the context is."""
    NGRAM = 4
    START = 3
    GROW = 2
    MISSES = 3
    PAUSE = 8

    def __init__(self, max_tokens: int, exact: int = None):
        """Drafts of up to max_tokens, and never more than `exact` (the model's `exact_draft`:
        the longest draft its verification computes bit for bit as decode steps)."""
        self.cap = min(int(max_tokens), MAX_EXACT_DRAFT if exact is None else exact)
        self.k, self.misses, self.paused = min(self.cap, self.START), 0, 0
        self.drafted = self.accepted = self.steps = 0
        self._seen: list[dict] = [{} for _ in range(self.NGRAM + 1)]  # n -> {n-gram: latest start}
        self._upto = 0  # context positions whose following token is indexed

    def _index(self, context: list[int]) -> None:
        """Index every n-gram of context that a token follows (start s, s + n < len(context))."""
        if len(context) < self._upto:  # not the context this lookup has seen grow
            self._seen, self._upto = [{} for _ in range(self.NGRAM + 1)], 0
        for end in range(self._upto, len(context) - 1):  # the n-grams ending at `end`
            for n in range(2, self.NGRAM + 1):
                if end + 1 >= n:
                    self._seen[n][tuple(context[end + 1 - n:end + 1])] = end + 1 - n
        self._upto = max(self._upto, len(context) - 1)

    def draft(self, context: list[int], room: int) -> list[int]:
        self._index(context)
        if self.paused > 0:
            self.paused -= 1
            return []
        k = min(self.k, room)
        if k < 1:
            return []
        n_ctx = len(context)
        for n in range(min(self.NGRAM, n_ctx - 1), 1, -1):
            start = self._seen[n].get(tuple(context[n_ctx - n:]))
            if start is not None:
                return context[start + n:start + n + k]
        return []

    def update(self, drafted: int, accepted: int) -> None:
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        if accepted == drafted:
            self.k, self.misses = min(self.cap, self.k + self.GROW), 0
        else:
            self.k = max(min(self.cap, self.START), accepted)
            self.misses = self.misses + 1 if accepted == 0 else 0
            if self.misses >= self.MISSES:
                self.paused, self.misses = self.PAUSE, 0


# A verification pass of up to 1 + MAX_EXACT_DRAFT tokens computes each token's logits bit for bit
# as a one-token step does (the row-major matmul loop, attention's few-rows tile), so prompt lookup
# changes no greedy output. Longer passes round differently (kernels/qmatvec.py token-major loop).
MAX_EXACT_DRAFT = 3
# A model whose matmuls all read 16-row tiles (kernels/qtile.py: every token's arithmetic the same
# for 1 to 8 tokens; attention's few-rows tile holds up to 8) verifies drafts this long exactly.
TILED_EXACT_DRAFT = 7


def generate_ids(session, prompt: Sequence[int], max_new_tokens: int, params: SamplingParams,
                 eos_ids: Sequence[int], no_repeat_ngram_size: int = 0, min_new_tokens: int = 0,
                 constraint=None, lookup: PromptLookup | None = None, cached: int = 0) -> Iterator[int]:
    """Yield new token ids until max_new_tokens, an EOS token, the end of the context or the end
    of a constrained value. With `lookup`, drafts from the context are verified in one call.
    The session's cache may hold the prompt's first `cached` tokens already (a chat's earlier
    turns): only the rest is prefilled."""
    max_new_tokens = min(max_new_tokens, session.max_seq - len(prompt) + 1)  # no more fit in the context
    chooser = TokenChooser(prompt, max_new_tokens, params, eos_ids, no_repeat_ngram_size, min_new_tokens,
                           constraint)
    if lookup is not None and constraint is None:
        yield from _lookup_ids(session, list(prompt), chooser, lookup, cached)
        return
    forced = chooser.take_forced(session.max_seq - len(prompt) - 1)  # a grammar's opening, say '{"name":'
    yield from forced
    if chooser.done:
        return
    logits = session.prefill(list(prompt)[cached:] + forced)
    while True:
        tok = chooser.choose(logits)
        if tok is None:
            return
        yield tok
        if chooser.done or session.pos >= session.max_seq:
            return
        # Tokens the grammar forces after this one ride along in one call instead of a step each.
        forced = chooser.take_forced(session.max_seq - session.pos - 2)
        yield from forced
        if chooser.done:
            return
        logits = session.prefill([tok] + forced) if forced else session.decode_step(tok)


def _lookup_ids(session, context: list[int], chooser: TokenChooser, lookup: PromptLookup,
                cached: int = 0) -> Iterator[int]:
    """generate_ids with prompt-lookup decoding: after each token, a draft of the tokens that
    followed the same n-gram earlier in the context goes through the model with it in one call
    (`Session.verify`); each draft token is then checked with the logits before it, as a decode
    step would have produced them, and the first one not chosen ends the draft (the cache is cut
    back to the tokens taken)."""
    tok = chooser.choose(session.prefill(context[cached:]))
    corrected = False  # tok replaces a refused draft token: it goes through a plain step
    while tok is not None:  # tok: chosen, not yet fed
        yield tok
        context.append(tok)
        if chooser.done or session.pos >= session.max_seq:
            return
        room = min(chooser.max_new_tokens - chooser.n_new - 1, session.max_seq - session.pos - 2)
        draft = [] if corrected else lookup.draft(context, room)
        corrected = False
        if not draft:
            tok = chooser.choose(session.decode_step(tok))
            continue
        start = session.pos
        rows = session.verify([tok] + draft)  # rows[i]: the logits after tok and draft[:i]
        taken = 0
        for d in draft:
            tok = chooser.choose(rows[taken], d)
            if tok != d:  # the model's own token (or EOS) where the draft went wrong
                break
            taken += 1
            yield d
            context.append(d)
            if chooser.done:
                lookup.update(len(draft), taken)
                return
        else:  # the whole draft taken: the last row gives the next token
            tok = chooser.choose(rows[taken])
        corrected = taken < len(draft)
        lookup.update(len(draft), taken)
        session.pos = start + 1 + taken  # the cache keeps tok and the draft tokens taken


def generate_batch(batch, prompts: Sequence[Sequence[int]], max_new_tokens: int, params: SamplingParams,
                   eos_ids: Sequence[int], no_repeat_ngram_size: int = 0, min_new_tokens: int = 0) -> list[list[int]]:
    """New token ids for several prompts, decoded together: one compiled step per token for all
    unfinished sequences, so every weight is read once per step for the whole batch.

    Each sequence gets its own chooser (and, with a seed, its own generator seeded alike), so the
    result equals generating each prompt alone.
    """
    choosers = [TokenChooser(p, min(max_new_tokens, s.max_seq - len(p) + 1), params, eos_ids, no_repeat_ngram_size,
                             min_new_tokens) for s, p in zip(batch.sessions, prompts)]
    out: list[list[int]] = [[] for _ in prompts]
    logits = [s.prefill(p) for s, p in zip(batch.sessions, prompts)]
    active = list(range(len(prompts)))
    while active:
        still, tokens = [], []
        for b, lg in zip(active, logits):
            tok = choosers[b].choose(lg)
            if tok is None:
                continue
            out[b].append(tok)
            s = batch.sessions[b]
            if not choosers[b].done and s.pos < s.max_seq:
                still.append(b)
                tokens.append(tok)
        active = still
        if active:
            logits = list(batch.decode(active, tokens))
    return out


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
