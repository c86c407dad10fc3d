"""A conversation that keeps its KV cache between turns: a new turn prefills only its own tokens.

    chat = Conversation(model, system="You are terse.")
    for piece in chat.say("What is the capital of France?", temperature=0):
        print(piece, end="")
    chat.last.prefilled, chat.last.cached   # this turn's new tokens, and those the cache already held

Each turn renders the whole conversation through the chat template and tokenizes it; the
session's cache keeps the longest prefix it shares with what the cache holds (the system prompt
and the earlier turns), and only the rest is prefilled. A reply cut short (a stop, Ctrl-C: the
generator closed) stays in the conversation as far as it got. When the conversation and room for
a reply no longer fit the context, the oldest turns are dropped (the system message stays) and
`last.dropped` says how many; then the cache is reused only up to the first dropped turn.

With kv_budget=N (Llama-family models), no layer's cache holds more than N rows: the least
attended rows of earlier turns are evicted as the chat grows (fastinfer/prune.py), so memory and
time per token stay flat up to n_ctx positions, at some cost in what the model recalls; turns are
dropped only when the positions run out.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .generate import PromptLookup, TextStream, generate_ids

REPLY_ROOM = 256  # tokens kept free for a reply when older turns must go (at most half the context)


@dataclass
class Turn:
    """What one turn cost: prompt tokens (the whole rendered conversation), how many of them the
    cache already held and how many were prefilled, generated tokens, seconds to the first token
    and in all, and how many old turns were dropped to make room."""
    prompt_tokens: int = 0
    cached: int = 0
    prefilled: int = 0
    tokens: int = 0
    first_token_seconds: float = 0.0
    seconds: float = 0.0
    dropped: int = 0


class Conversation:
    """A chat with `model` over one Session of n_ctx tokens (default: the model's context).

    options are generate's sampling and length options (temperature, top_p, max_new_tokens,
    seed, stop, ...), the defaults for every turn; `say` takes the same to override them.
    kv_budget=N caps every layer's cache at N rows (see above)."""

    def __init__(self, model, system: str | None = None, n_ctx: int | None = None, kv_budget: int | None = None,
                 **options: Any):
        model._decoder_only("chat")
        if kv_budget is not None and options.get("prompt_lookup_num_tokens"):
            raise ValueError("prompt_lookup_num_tokens does not combine with kv_budget")
        self.model = model
        self.session = model.session(n_ctx=n_ctx or model.n_ctx, kv_budget=kv_budget)
        self.kv_budget = kv_budget
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.options = options
        self.cached: list[int] = []  # the token ids the session's cache holds, position by position
        self.last: Turn | None = None
        self.lookup: PromptLookup | None = None  # the last turn's drafts (prompt_lookup_num_tokens)
        self.reset()

    @property
    def n_ctx(self) -> int:
        return self.session.max_seq

    def reset(self) -> None:
        """Forget the turns (the system message stays). The cache is kept: a new conversation
        reuses its system prompt."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def say(self, text: str, **options: Any) -> Iterator[str]:
        """Add a user message and stream the reply, piece by piece."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the message is empty")
        opts = {**self.options, **options}
        if self.kv_budget is not None and opts.get("prompt_lookup_num_tokens"):
            raise ValueError("prompt_lookup_num_tokens does not combine with kv_budget")
        stop = opts.pop("stop", None)
        stop = [stop] if isinstance(stop, str) else list(stop or ())
        before = list(self.messages)  # a refused message changes nothing, dropped turns included
        self.messages.append({"role": "user", "content": text})
        try:
            ids, dropped = self._fit(opts)
            o = self.model._resolve(len(ids), **opts)
            if o.num_beams > 1 or o.grammar is not None:
                raise ValueError("chat turns take sampling options, not num_beams or json_schema")
        except TypeError as e:  # an option generate does not take
            self.messages = before
            raise ValueError(f"chat: {str(e).split('() ', 1)[-1]}") from None
        except ValueError:
            self.messages = before
            raise
        return self._reply(ids, o, stop, dropped)

    def save(self, path: str | os.PathLike) -> None:
        """Write the conversation as JSON ({"messages": [...]}) through a temporary name."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"messages": self.messages}, ensure_ascii=False, indent=1), encoding="utf-8")
        tmp.replace(path)

    def load(self, path: str | os.PathLike) -> None:
        """Continue a conversation written by `save` (its system message replaces this one's)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a saved conversation ({e})") from None
        msgs = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(msgs, list) or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
                for m in msgs):
            raise ValueError(f"{path}: not a saved conversation (expected {{\"messages\": [{{\"role\", \"content\"}}, ...]}})")
        self.messages = [{"role": m["role"], "content": m["content"]} for m in msgs]
        self.system = next((m["content"] for m in self.messages if m["role"] == "system"), None)

    # -- inside -----------------------------------------------------------------------------------
    def _ids(self) -> list[int]:
        text = self.model.apply_chat_template(self.messages)
        return self.model.tokenizer.encode(text, add_special_tokens=False).ids

    def _fit(self, opts: dict) -> tuple[list[int], int]:
        """The rendered conversation's ids, after dropping the oldest turns until it leaves room
        for a reply; and how many turns went."""
        room = min(opts.get("max_new_tokens") or REPLY_ROOM, REPLY_ROOM, self.n_ctx // 2)
        first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        dropped = 0
        while True:
            ids = self._ids()
            if len(ids) + room <= self.n_ctx:
                return ids, dropped
            if len(self.messages) - first <= 1:
                raise ValueError(f"the message is too long: the conversation takes {len(ids)} tokens and a reply "
                                 f"{room} more; the context holds {self.n_ctx}")
            # a turn is a user message and the reply after it
            end = first + 1
            while end < len(self.messages) - 1 and self.messages[end]["role"] != "user":
                end += 1
            del self.messages[first:end]
            dropped += 1

    def _reply(self, ids: list[int], o, stop: list[str], dropped: int) -> Iterator[str]:
        s = self.session
        keep = 0
        limit = min(len(self.cached), len(ids) - 1)  # the last prompt token runs again, for its logits
        while keep < limit and self.cached[keep] == ids[keep]:
            keep += 1
        if self.model.arch.trims_cache and len(self.cached) - keep > s.state.chunk:
            keep = 0  # a sliding-window model gave back cache pages further back than a chunk (State.trim)
        turn = self.last = Turn(prompt_tokens=len(ids), cached=keep, prefilled=len(ids) - keep, dropped=dropped)
        lookup = PromptLookup(o.prompt_lookup, self.model.exact_draft) if o.prompt_lookup else None
        tokens = generate_ids(s, ids, min(o.max_new_tokens, s.max_seq - len(ids)), o.sampling, self.model.eos_ids,
                              o.no_repeat_ngram_size, o.min_new_tokens, lookup=lookup, cached=keep)
        self.lookup = lookup
        out = TextStream(self.model.tokenizer, stop)
        fed = list(ids)  # the prompt and the reply's tokens: the cache holds their first s.pos
        reply: list[str] = []
        t0 = time.perf_counter()

        def pieces():
            finished = False
            try:
                s.rewind(keep)
                for tok in tokens:
                    if turn.tokens == 0:
                        turn.first_token_seconds = time.perf_counter() - t0
                    turn.tokens += 1
                    fed.append(tok)
                    piece = out.push(tok)
                    if piece:
                        reply.append(piece)
                        yield piece
                    if out.stopped:
                        break
                if turn.tokens == 0:
                    turn.first_token_seconds = time.perf_counter() - t0
                if not out.stopped:
                    tail = out.flush()
                    if tail:
                        reply.append(tail)
                        yield tail
                finished = True
            finally:  # also when the reader stops early (Ctrl-C): keep what was said and cached
                tokens.close()
                self.cached = fed[:s.pos]
                if finished or turn.tokens:
                    self.messages.append({"role": "assistant", "content": "".join(reply)})
                else:  # stopped before a word of the reply: the message goes back, as if unsent
                    self.messages.pop()
                turn.seconds = time.perf_counter() - t0
        return pieces()
