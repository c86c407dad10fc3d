"""Continuous batching: many requests over one model, one compiled step per token for all of them.

An `Engine` owns `parallel` slots, each a stretch of one shared KV cache (`model.Batch`), and a
thread that loops:

1. admit queued requests into free slots. A slot keeps the tokens its cache holds after its last
   request, so a prompt that starts with them (a chat's earlier turns) skips prefilling them;
2. prefill one chunk of one admitted prompt, so a long prompt never stalls the running streams for
   more than a chunk;
3. run one decode step for every slot that is generating, in a single batched call, then sample
   each slot's next token and hand its text to the request.

Requests join and leave between steps; a cancelled request (a client gone) frees its slot before
the next step. Everything a request sees arrives through its `emit` callback, called on the engine
thread: ("text", piece, token id) per token and ("done", finish_reason) at the end, or ("error",
message[, HTTP status]) when it cannot finish (a failed step, the server shutting down).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .generate import PromptLookup, TextStream, TokenChooser
from .model import Batch, Model
from .sampling import SamplingParams


@dataclass
class Request:
    """One completion: prompt ids in, text pieces out through `emit`."""
    ids: list[int]
    max_tokens: int
    params: SamplingParams
    emit: Callable[[tuple], None]
    stop: Sequence[str] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    cache_prompt: bool = True  # reuse a prefix held in a slot's cache (see Engine._reusable)
    grammar: str | None = None  # output constrained to a JSON schema (fastinfer/structured.py)
    logprobs: int | None = None  # with each token: its log-probability and this many alternatives
    lookup: int = 0  # prompt-lookup decoding: drafts of up to this many tokens (see Engine._lookup_step)
    # Filled in by the engine:
    cached_tokens: int = 0
    completion_tokens: int = 0
    drafted_tokens: int = 0   # prompt lookup: tokens drafted, and of them taken
    accepted_tokens: int = 0
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop generating (from any thread); the slot is free before the next step."""
        self.cancelled = True


@dataclass
class _Slot:
    index: int
    tokens: list[int] = field(default_factory=list)  # what this slot's cache holds, position by position
    request: Request | None = None
    todo: list[int] = field(default_factory=list)    # prompt ids still to prefill
    pending: int | None = None                       # sampled, not yet fed
    chooser: TokenChooser | None = None
    stream: TextStream | None = None
    counts: dict[int, int] = field(default_factory=dict)  # generated token -> times, for the penalties
    lookup: PromptLookup | None = None
    corrected: bool = False  # pending replaces a refused draft token: it goes through a plain step


@dataclass
class Stats:
    """Counters for /metrics."""
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_seconds: float = 0.0
    drafted_tokens: int = 0   # prompt lookup
    accepted_tokens: int = 0


class Engine:
    """Serve requests on `model` with up to `parallel` of them decoding together, each holding up
    to `n_ctx` tokens (prompt and completion).

    The loop runs on a thread of its own (`background=True`), or on the caller's when it calls
    `run()`. Kernels are fastest when one thread calls them all: each calling thread gets its own
    OpenMP team, and with more team threads than cores, libgomp stops spinning between parallel
    regions, which costs several milliseconds a token. So `fastinfer serve` loads the model and
    runs the loop on its main thread and answers HTTP on another.
    """

    def __init__(self, model: Model, parallel: int = 4, n_ctx: int | None = None, background: bool = True):
        if model.is_encoder:
            raise ValueError(f"{model.source} is an encoder: it has no completions to serve")
        if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
            raise ValueError(f"parallel must be an integer >= 1; got {parallel!r}")
        self.model, self.parallel = model, parallel
        self.n_ctx = model.n_ctx if n_ctx is None else n_ctx
        self.batch = Batch(model, parallel, self.n_ctx)  # checks n_ctx against the model's
        self.slots = [_Slot(i) for i in range(parallel)]
        self.queue: deque[Request] = deque()
        self.stats = Stats()
        self._wake = threading.Condition()
        self._stopping = False
        # Called on the engine thread after every step (and after the final events): a consumer
        # that buffers `emit`s hands them over here, once a step rather than once a token.
        self.after_step: list[Callable[[], None]] = []
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self.run, name="fastinfer-engine", daemon=True)
            self._thread.start()

    # -- the outside ---------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request; its prompt must leave room for one generated token."""
        if not request.ids:
            raise ValueError("the prompt is empty")
        if len(request.ids) >= self.n_ctx:
            raise ValueError(f"the prompt has {len(request.ids)} tokens; the context holds {self.n_ctx} "
                             f"(prompt and completion together)")
        with self._wake:
            self.queue.append(request)
            self.stats.requests += 1
            self._wake.notify()

    def busy_slots(self) -> int:
        return sum(s.request is not None for s in self.slots)

    def close(self) -> None:
        """End the loop (from any thread); queued and running requests end with an error event
        (status 503: the server is shutting down), as they did not finish."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    # -- the engine thread ---------------------------------------------------------------------
    def run(self) -> None:
        """The loop: admit, prefill a chunk, decode a step; returns after `close()`."""
        while True:
            with self._wake:
                while not self._stopping and not self.queue and self.busy_slots() == 0:
                    self._wake.wait()
                if self._stopping:
                    for r in [*self.queue, *(s.request for s in self.slots if s.request)]:
                        r.emit(("error", "the server is shutting down; the request did not finish", 503))
                    self._after_step()
                    return
            try:
                self._step()
            except Exception as e:  # a bug must not leave clients waiting forever
                for s in self.slots:
                    if s.request is not None:
                        s.request.emit(("error", f"{type(e).__name__}: {e}"))
                        self._release(s)
                    s.tokens = []  # what the cache holds is no longer known
            self._after_step()

    def _after_step(self) -> None:
        for hook in self.after_step:
            hook()

    def _step(self) -> None:
        for s in self.slots:
            if s.request is not None and s.request.cancelled:
                self._release(s)
        self._admit()
        prefilling = [s for s in self.slots if s.request is not None and s.todo]
        if prefilling:
            self._prefill_chunk(prefilling[0])
        decoding = [s for s in self.slots if s.request is not None and not s.todo and s.pending is not None]
        if len(decoding) == 1 and decoding[0].lookup is not None and self._lookup_step(decoding[0]):
            return
        if decoding:
            t0 = time.perf_counter()
            logits = self.batch.decode([s.index for s in decoding], [s.pending for s in decoding])
            self.stats.decode_seconds += time.perf_counter() - t0
            self.stats.decode_steps += 1
            for s, row in zip(decoding, logits):
                s.tokens.append(s.pending)
                s.pending = None
                self._next(s, row)

    def _admit(self) -> None:
        with self._wake:
            while self.queue:
                free = [s for s in self.slots if s.request is None]
                if not free:
                    return
                r = self.queue.popleft()
                if r.cancelled:
                    continue
                slot, keep = max(((s, self._reusable(s, r)) for s in free), key=lambda p: p[1])
                self._start(slot, r, keep)

    def _reusable(self, s: _Slot, r: Request) -> int:
        """How many leading prompt tokens slot s's cache already holds, and may keep.

        With 8-bit activations a position's cache entry depends on how it was computed (in a
        prefill chunk of some length, or one token at a time), within the rounding of 8-bit
        activations; so a reused prefix can change sampled text as a fresh prefill would not (as
        in llama.cpp). Requests that must reproduce a seeded result exactly set cache_prompt=False.
        """
        ids = r.ids
        if not r.cache_prompt:
            return 0
        n = 0
        limit = min(len(s.tokens), len(ids) - 1)  # the last prompt token runs again, for its logits
        while n < limit and s.tokens[n] == ids[n]:
            n += 1
        # A sliding-window model gives back cache pages behind the window plus one chunk
        # (State.trim): going back further than a chunk would read pages that are gone.
        if self.model.arch.trims_cache and len(s.tokens) - n > self.batch.state.chunk:
            return 0
        return n

    def _start(self, s: _Slot, r: Request, keep: int) -> None:
        session = self.batch.sessions[s.index]
        if keep == 0:
            session.reset()
        else:
            session.pos = keep
        s.tokens = s.tokens[:keep]
        s.request, s.todo, s.pending, s.counts = r, list(r.ids[keep:]), None, {}
        constraint = None
        if r.grammar is not None:
            from .structured import JsonConstraint
            constraint = JsonConstraint(self.model, r.grammar)
        s.chooser = TokenChooser(r.ids, r.max_tokens, r.params, self.model.eos_ids, constraint=constraint)
        s.lookup = PromptLookup(r.lookup, self.model.exact_draft) if r.lookup > 0 and constraint is None else None
        s.corrected = False
        s.stream = TextStream(self.model.tokenizer, list(r.stop))
        r.cached_tokens = keep
        # A grammar's opening ('{"name":') is fed with the prompt, not sampled a token at a time.
        forced = self._forced(s, self.n_ctx - len(r.ids) - 1)
        s.todo.extend(forced)
        for tok in forced:
            self._emit(s, tok, None)
        if (reason := self._ended(s)) is not None:
            self._finish(s, reason)
        self.stats.prompt_tokens += len(r.ids)
        self.stats.cached_tokens += keep

    def _prefill_chunk(self, s: _Slot) -> None:
        session = self.batch.sessions[s.index]
        part = s.todo[:session.state.chunk]
        logits = session.prefill(part)
        s.tokens.extend(part)
        del s.todo[:len(part)]
        if not s.todo:
            self._next(s, logits)

    def _next(self, s: _Slot, logits: np.ndarray) -> None:
        """Sample slot s's next token from logits (vocab,), hand over its text, or finish."""
        self._chosen(s, s.chooser.choose(self._adjusted(s, logits)), logits)

    def _adjusted(self, s: _Slot, logits: np.ndarray) -> np.ndarray:
        """logits with the request's logit bias and presence/frequency penalties applied."""
        r = s.request
        if r.logit_bias or ((r.presence_penalty or r.frequency_penalty) and s.counts):
            logits = np.array(logits, dtype=np.float32)
            for tok, bias in r.logit_bias.items():
                logits[tok] += bias
            if s.counts:
                toks = np.fromiter(s.counts, np.int64, len(s.counts))
                n = np.fromiter(s.counts.values(), np.float32, len(s.counts))
                logits[toks] -= r.frequency_penalty * n + r.presence_penalty
        return logits

    def _chosen(self, s: _Slot, tok: int | None, raw: np.ndarray) -> None:
        """Hand over tok, chosen from raw's row, and leave it pending (or finish)."""
        if tok is None:
            return self._finish(s, "stop")
        self._emit(s, tok, raw)
        forced = [] if s.stream.stopped else self._forced(s, self.n_ctx - len(s.tokens) - 2)
        for f in forced:
            self._emit(s, f, None)
        if (reason := self._ended(s, len(s.tokens) + 1 + len(forced) >= self.n_ctx)) is not None:
            return self._finish(s, reason)
        if forced:  # fed together, through the prefill path, which then samples the next token
            s.todo = [tok] + forced
        else:
            s.pending = tok

    @staticmethod
    def _ended(s: _Slot, full: bool = False) -> str | None:
        """Why slot s's request ends after the tokens handed over so far: "stop" (a stop string,
        EOS, the end of a constrained value), "length" (max_tokens, or `full`: no room left in
        the context), or None."""
        if s.stream.stopped or s.chooser.finished:
            return "stop"
        if s.chooser.done or full:
            return "length"
        return None

    def _lookup_step(self, s: _Slot) -> bool:
        """Prompt-lookup decoding for a slot that decodes alone (with others, the batched step
        already shares each weight read): its pending token and a draft of the tokens that
        followed the same n-gram earlier in its context go through the model in one call
        (`Session.verify`), and each draft token is checked against the logits before it by the
        request's own rule, as `generate._lookup_ids` does. Up to the model's exact_draft tokens, each
        row is bit for bit a decode step's, so the output is unchanged. False if there is no draft:
        the plain step follows."""
        r, tok = s.request, s.pending
        room = min(r.max_tokens - s.chooser.n_new - 1, self.n_ctx - len(s.tokens) - 3)
        draft = [] if s.corrected else s.lookup.draft(s.tokens + [tok], room)
        s.corrected = False
        if not draft:
            return False
        session = self.batch.sessions[s.index]
        start = session.pos
        t0 = time.perf_counter()
        rows = session.verify([tok] + draft)  # rows[i]: the logits after tok and draft[:i]
        self.stats.decode_seconds += time.perf_counter() - t0
        self.stats.decode_steps += 1
        s.tokens.append(tok)
        s.pending = None
        taken, chosen, finished = 0, None, False
        for d in draft:
            chosen = s.chooser.choose(self._adjusted(s, rows[taken]), d)
            if chosen != d:  # the model's own token (or EOS) where the draft went wrong
                break
            s.tokens.append(d)
            taken += 1
            self._emit(s, d, rows[taken - 1])
            if (reason := self._ended(s)) is not None:
                finished = True
                self._finish(s, reason)
                break
        else:  # the whole draft taken: the last row gives the next token
            chosen = s.chooser.choose(self._adjusted(s, rows[taken]))
        session.pos = start + 1 + taken  # the cache keeps tok and the draft tokens taken
        s.lookup.update(len(draft), taken)
        r.drafted_tokens += len(draft)
        r.accepted_tokens += taken
        self.stats.drafted_tokens += len(draft)
        self.stats.accepted_tokens += taken
        if not finished:
            s.corrected = taken < len(draft)
            self._chosen(s, chosen, rows[taken])
        return True

    def _forced(self, s: _Slot, room: int) -> list[int]:
        # Not with logprobs: a forced token's log-probability would need the step it skips.
        return [] if s.request.logprobs is not None else s.chooser.take_forced(room)

    def _emit(self, s: _Slot, tok: int, raw: np.ndarray | None) -> None:
        r = s.request
        r.completion_tokens += 1
        self.stats.generated_tokens += 1
        s.counts[tok] = s.counts.get(tok, 0) + 1
        piece = s.stream.push(tok)
        if r.logprobs is not None:
            r.emit(("text", piece, tok, _logprobs(raw, tok, r.logprobs)))
        elif piece:
            r.emit(("text", piece, tok))

    def _finish(self, s: _Slot, reason: str) -> None:
        r = s.request
        tail = s.stream.flush()
        if tail:
            r.emit(("text", tail, None))
        r.emit(("done", reason))
        self._release(s)

    def _release(self, s: _Slot) -> None:
        # The cache keeps what was fed; a token sampled but never fed is not in it.
        s.request, s.todo, s.pending, s.chooser, s.stream = None, [], None, None, None


def _logprobs(logits: np.ndarray, tok: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of tok (its distribution at temperature 1, before penalties,
    biases and grammar masks), and the k most likely tokens with theirs."""
    z = logits.astype(np.float64)
    top = z.max()
    lse = top + np.log(np.exp(z - top).sum())
    best = []
    if k > 0:
        idx = np.argpartition(-z, k - 1)[:k]
        idx = idx[np.argsort(-z[idx], kind="stable")]
        best = [(int(i), float(z[i] - lse)) for i in idx]
    return float(z[tok] - lse), best
