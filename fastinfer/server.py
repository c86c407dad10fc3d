"""An OpenAI-compatible HTTP server over the continuous-batching engine (fastinfer/serving.py).

Routes: POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings (encoder models),
GET /v1/models, GET /health, GET /metrics (Prometheus text), POST /tokenize, POST /detokenize. Errors are OpenAI-shaped,
{"error": {"message", "type", "code"}}; a parameter the server does not implement is a 400 that
names it, never a silent ignore. FastAPI and uvicorn come with `pip install "fastinfer[server]"`.
"""
from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import numpy as np

from .sampling import SamplingParams
from .serving import Engine, Request

try:
    from fastapi import FastAPI
    from fastapi.requests import Request as HTTPRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError('the server needs FastAPI and uvicorn: pip install "fastinfer[server]"') from e

MAX_BODY = 8 << 20  # bytes of one request body
MAX_N = 8  # choices per request

# Parameters that change nothing fastinfer computes; accepted and ignored.
_HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "model"}
_SAMPLING = {"temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repetition_penalty", "seed",
             "presence_penalty", "frequency_penalty", "logit_bias", "stop", "max_tokens", "stream",
             "stream_options", "n", "cache_prompt", "logprobs", "prompt_lookup_num_tokens"}
_CHAT = _SAMPLING | {"messages", "max_completion_tokens", "response_format", "top_logprobs"}
_COMPLETION = _SAMPLING | {"prompt", "echo", "response_format"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def create_app(engine: Engine | None, model_name: str, api_key: str | None = None,
               max_tokens_limit: int | None = None, model=None, prompt_lookup: int = 0) -> FastAPI:
    """The app over a decoder's `engine`, or an encoder's `model` (embeddings only). Either may be
    set later (`app.state.engine`, `app.state.model`): /health says 503 until then. prompt_lookup
    is the draft length of requests that do not set prompt_lookup_num_tokens (0: off)."""
    app = FastAPI(title="fastinfer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.model = engine.model if engine is not None else model
    embed_lock = asyncio.Lock()
    created = int(time.time())

    def auth(request: HTTPRequest) -> None:
        if api_key is not None and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                           "authentication_error", "invalid_api_key")

    def loaded():
        if app.state.model is None:
            raise APIError(503, "the model is still loading", "server_error", "loading")
        return app.state.model

    def mailbox(e: Engine) -> _Mailbox:
        """The engine's events' way onto this event loop (made on the first request)."""
        if getattr(app.state, "mailbox", None) is None:
            app.state.mailbox = _Mailbox(asyncio.get_running_loop())
            e.after_step.append(app.state.mailbox.flush)
        return app.state.mailbox

    def ready() -> Engine:
        model = loaded()
        if app.state.engine is None:
            raise APIError(400, f"{model_name} is an encoder: it serves /v1/embeddings only", code="model_not_supported")
        return app.state.engine

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return e.response()

    @app.get("/health")
    async def health():
        if app.state.model is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        auth(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "fastinfer"}]}

    @app.get("/metrics")
    async def metrics(request: HTTPRequest):
        auth(request)
        e = ready()
        st = e.stats
        rate = st.generated_tokens / st.decode_seconds if st.decode_seconds else 0.0
        lines = [
            ("fastinfer_requests_total", "counter", "requests received", st.requests),
            ("fastinfer_prompt_tokens_total", "counter", "prompt tokens", st.prompt_tokens),
            ("fastinfer_cached_prompt_tokens_total", "counter", "prompt tokens found in a slot's cache",
             st.cached_tokens),
            ("fastinfer_generated_tokens_total", "counter", "generated tokens", st.generated_tokens),
            ("fastinfer_decode_tokens_per_second", "gauge", "generated tokens per second of decode steps", rate),
            ("fastinfer_lookup_drafted_tokens_total", "counter", "prompt lookup: tokens drafted",
             st.drafted_tokens),
            ("fastinfer_lookup_accepted_tokens_total", "counter", "prompt lookup: drafted tokens taken",
             st.accepted_tokens),
            ("fastinfer_queue_length", "gauge", "requests waiting for a slot", len(e.queue)),
            ("fastinfer_busy_slots", "gauge", "slots serving a request", e.busy_slots()),
            ("fastinfer_slots", "gauge", "slots", e.parallel),
        ]
        text = "".join(f"# HELP {n} {h}\n# TYPE {n} {t}\n{n} {v}\n" for n, t, h, v in lines)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest):
        auth(request)
        body = await _json(request)
        content = body.get("content")
        if not isinstance(content, str):
            raise APIError(400, "'content' must be a string", param="content")
        add = body.get("add_special", False)
        return {"tokens": loaded().tokenizer.encode(content, add_special_tokens=bool(add)).ids}

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest):
        auth(request)
        body = await _json(request)
        try:
            return {"content": loaded().decode(body.get("tokens"))}
        except (ValueError, TypeError) as err:
            raise APIError(400, f"'tokens': {err}", param="tokens") from None

    @app.post("/v1/embeddings")
    async def embeddings(request: HTTPRequest):
        auth(request)
        body = await _json(request)
        model = loaded()
        _check_keys(body, {"input", "encoding_format", "dimensions"})
        if not model.is_encoder:
            raise APIError(400, f"{model_name} is a decoder: this server gives embeddings of encoder models",
                           code="model_not_supported")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise APIError(400, "encoding_format must be 'float' or 'base64'", param="encoding_format")
        if body.get("dimensions") not in (None, model.args.dim):
            raise APIError(400, f"dimensions: this model's embeddings have {model.args.dim}", param="dimensions")
        inputs = body.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or len(inputs) > 2048:
            raise APIError(400, "input must be a string, a list of token ids, or a list of up to 2048 of these",
                           param="input")
        try:
            ids = [model.encode(x) if isinstance(x, str) else model._check_ids(x, model.n_ctx) for x in inputs]
        except (ValueError, TypeError) as err:
            raise APIError(400, f"input: {err}", param="input") from None
        if any(not i for i in ids):
            raise APIError(400, "input: an empty text has no embedding", param="input")
        async with embed_lock:  # one forward at a time; the event loop keeps answering meanwhile
            vectors = await asyncio.to_thread(
                lambda: [model.hidden_states(i).mean(axis=0, dtype=np.float64).astype(np.float32) for i in ids])
        data = [{"object": "embedding", "index": k,
                 "embedding": base64.b64encode(v.tobytes()).decode() if fmt == "base64" else v.tolist()}
                for k, v in enumerate(vectors)]
        n = sum(len(i) for i in ids)
        return {"object": "list", "data": data, "model": model_name,
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        auth(request)
        body = await _json(request)
        e = ready()
        _check_keys(body, _CHAT)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", param="messages")
        try:
            text = e.model.apply_chat_template([_message(m) for m in messages])
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from None
        ids = e.model.tokenizer.encode(text, add_special_tokens=False).ids
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        return await _complete(request, e, body, ids, limit, chat=True)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        auth(request)
        body = await _json(request)
        e = ready()
        _check_keys(body, _COMPLETION)
        if body.get("echo"):
            raise APIError(400, "echo is not supported by this server", param="echo", code="unsupported_parameter")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = e.model.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            try:
                ids = e.model._check_ids(prompt, None)
            except ValueError as err:
                raise APIError(400, f"'prompt': {err}", param="prompt") from None
        else:
            raise APIError(400, "'prompt' must be a string, a list of token ids, or a list of one of these",
                           param="prompt")
        return await _complete(request, e, body, ids, body.get("max_tokens", 16), chat=False)

    async def _complete(http: HTTPRequest, e: Engine, body: dict, ids: list[int], limit, chat: bool):
        n = body.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise APIError(400, f"n must be an integer from 1 to {MAX_N}; got {n!r:.40}", param="n")
        room = e.n_ctx - len(ids)
        if room < 1:
            raise APIError(400, f"the prompt has {len(ids)} tokens; the context holds {e.n_ctx} "
                                f"(prompt and completion together)", code="context_length_exceeded",
                           param="messages" if chat else "prompt")
        if limit is None:
            limit = room if max_tokens_limit is None else min(room, max_tokens_limit)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise APIError(400, f"max_tokens must be an integer >= 1; got {limit!r:.40}", param="max_tokens")
        if max_tokens_limit is not None and limit > max_tokens_limit:
            raise APIError(400, f"max_tokens {limit} is above this server's limit of {max_tokens_limit}",
                           param="max_tokens")
        base = _request(e, body, ids, min(limit, room), chat, prompt_lookup)
        box = mailbox(e)
        events: asyncio.Queue = asyncio.Queue()
        reqs = []
        for i in range(n):  # n choices: n requests, the later ones finding the prompt in a cache
            seed = base.params.seed
            params = base.params if seed is None or i == 0 else replace(base.params, seed=(seed + i) % (1 << 63))
            r = replace(base, params=params, ids=list(base.ids))
            r.emit = (lambda i: lambda ev: box.put(events, (i, ev)))(i)
            reqs.append(r)
        try:
            for r in reqs:
                e.submit(r)
        except ValueError as err:
            for r in reqs:
                r.cancel()
            raise APIError(400, str(err)) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        now = int(time.time())
        token_text = _token_texts(e.model)

        def usage() -> dict:
            done = sum(r.completion_tokens for r in reqs)
            out = {"prompt_tokens": len(ids), "completion_tokens": done, "total_tokens": len(ids) + done,
                   "prompt_tokens_details": {"cached_tokens": reqs[0].cached_tokens}}
            if base.lookup:  # prompt lookup's drafts, in OpenAI's fields for predicted tokens
                taken = sum(r.accepted_tokens for r in reqs)
                out["completion_tokens_details"] = {
                    "accepted_prediction_tokens": taken,
                    "rejected_prediction_tokens": sum(r.drafted_tokens for r in reqs) - taken}
            return out

        def logprobs(entries: list) -> dict | None:
            if base.logprobs is None:
                return None
            if chat:
                return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                                     "top_logprobs": [{"token": a, "logprob": alp, "bytes": list(a.encode())}
                                                      for a, alp in top]} for t, lp, top in entries]}
            return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                    "top_logprobs": [dict(top) for _, _, top in entries]}

        def entry(ev) -> tuple | None:
            if len(ev) < 4:
                return None
            lp, top = ev[3]
            return token_text(ev[2]), lp, [(token_text(t), v) for t, v in top]

        def choice(i: int, text: str | None, finish: str | None, entries: list, delta: bool) -> dict:
            if not chat:
                return {"index": i, "text": text or "", "logprobs": logprobs(entries), "finish_reason": finish}
            if not delta:
                return {"index": i, "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs(entries), "finish_reason": finish}
            return {"index": i, "delta": {} if text is None else {"content": text},
                    "logprobs": logprobs(entries) if entries else None, "finish_reason": finish}

        async def next_event():
            """The next (choice, event); None if the client went away (its requests are cancelled)."""
            while True:
                try:
                    return await _get_within(events, 0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return None

        if not body.get("stream"):
            parts = [[] for _ in reqs]
            entries = [[] for _ in reqs]
            finish: list[str | None] = [None] * n
            try:
                while any(f is None for f in finish):
                    got = await next_event()
                    if got is None:
                        return None
                    i, ev = got
                    if ev[0] == "text":
                        parts[i].append(ev[1])
                        if (x := entry(ev)) is not None:
                            entries[i].append(x)
                    elif ev[0] == "error":  # ("error", message[, status])
                        raise APIError(ev[2] if len(ev) > 2 else 500, ev[1], "server_error")
                    else:
                        finish[i] = ev[1]
            finally:
                for r in reqs:
                    r.cancel()  # a client gone mid-request frees the slots
            return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now,
                    "model": model_name, "usage": usage(),
                    "choices": [choice(i, "".join(parts[i]), finish[i], entries[i], False) for i in range(n)]}

        opts = body.get("stream_options") or {}
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def sse(choices: list, with_usage: bool = False) -> str:
            d = {"id": rid, "object": chunk_kind, "created": now, "model": model_name, "choices": choices}
            if include_usage:
                d["usage"] = usage() if with_usage else None
            return f"data: {json.dumps(d)}\n\n"

        async def stream() -> AsyncIterator[str]:
            try:
                if chat:
                    for i in range(n):
                        yield sse([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}])
                left = n
                while left:
                    got = await next_event()
                    if got is None:
                        return
                    i, ev = got
                    if ev[0] == "text":
                        x = entry(ev)
                        if ev[1] or x is not None:
                            yield sse([choice(i, ev[1], None, [x] if x else [], True)])
                    elif ev[0] == "error":
                        yield f"data: {json.dumps({'error': {'message': ev[1], 'type': 'server_error'}})}\n\n"
                        return
                    else:
                        yield sse([choice(i, None, ev[1], [], True)])
                        left -= 1
                if include_usage:
                    yield sse([], with_usage=True)
                yield "data: [DONE]\n\n"
            finally:
                for r in reqs:
                    r.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


class _Mailbox:
    """Engine events to the HTTP event loop, with one wake-up per engine step.

    `loop.call_soon_threadsafe` per event writes to the loop's self-pipe each time; the HTTP
    thread wakes and takes the GIL, and the engine thread waits to get it back, 8 times a step
    with 8 streams (~6% of the engine thread's time). Here `put` only appends, and the engine's
    `after_step` hook (`flush`) wakes the loop once for all of them."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.scheduled = loop, deque(), False

    def put(self, queue: asyncio.Queue, item) -> None:  # engine thread
        self.items.append((queue, item))

    def flush(self) -> None:  # engine thread, after a step
        if self.items and not self.scheduled:
            self.scheduled = True
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:  # event loop
        self.scheduled = False  # first: an item put while draining schedules the next drain
        while self.items:
            queue, item = self.items.popleft()
            queue.put_nowait(item)


if hasattr(asyncio, "timeout"):  # Python 3.11+: no task per call, as asyncio.wait_for makes
    async def _get_within(queue: asyncio.Queue, seconds: float):
        """queue.get(), or asyncio.TimeoutError after `seconds` (once per token per stream)."""
        async with asyncio.timeout(seconds):
            return await queue.get()
else:
    def _get_within(queue: asyncio.Queue, seconds: float):
        return asyncio.wait_for(queue.get(), seconds)


async def _json(request: HTTPRequest) -> dict:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise APIError(413, f"the request body is larger than {MAX_BODY} bytes")
    try:
        body = json.loads(raw)
    except ValueError:
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _check_keys(body: dict, known: set[str]) -> None:
    for key in body:
        if key not in known and key not in _HARMLESS:
            raise APIError(400, f"parameter {key!r} is not supported by this server", param=key,
                           code="unsupported_parameter")


def _message(m) -> dict[str, str]:
    """An OpenAI chat message -> {'role', 'content'} with text content."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise APIError(400, "each message must be an object with a 'role'", param="messages")
    content = m.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise APIError(400, "message content parts must be text parts on this server", param="messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(400, "message content must be a string or a list of text parts", param="messages")
    return {"role": m["role"], "content": content}


def _response_format(fmt) -> str | None:
    """OpenAI's response_format -> llguidance's grammar, or None for plain text."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise APIError(400, "response_format must be {'type': 'text'}, {'type': 'json_object'} or "
                            "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}",
                       param="response_format")
    if fmt["type"] == "text":
        return None
    from .structured import json_schema_grammar
    schema = True
    if fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise APIError(400, "response_format.json_schema must be an object with a 'schema' object",
                           param="response_format")
        schema = spec.get("schema") or True
    try:
        return json_schema_grammar(schema)
    except ValueError as e:
        raise APIError(400, f"response_format: {e}", param="response_format") from None


def _number(body: dict, name: str, default, lo: float, hi: float) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise APIError(400, f"{name} must be a number in [{lo}, {hi}]; got {v!r:.40}", param=name)
    return float(v)


def _token_texts(model):
    """token id -> its text for logprobs."""
    from .weights.spm_bpe import SentencePieceBPE
    tok = model.tokenizer
    if isinstance(tok, SentencePieceBPE):
        return lambda t: tok.token_bytes(t).decode("utf-8", "replace")
    return lambda t: tok.decode([t], skip_special_tokens=False)


def _logprobs_option(body: dict, chat: bool) -> int | None:
    """How many alternatives per token the request wants with logprobs, or None for no logprobs."""
    lp = body.get("logprobs")
    if chat:
        if lp is None or lp is False:
            if body.get("top_logprobs") is not None:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        if lp is not True:
            raise APIError(400, f"logprobs must be true or false; got {lp!r:.40}", param="logprobs")
        k = body.get("top_logprobs") or 0
        hi = 20
    else:
        if lp is None:
            return None
        k, hi = lp, 5
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= hi:
        raise APIError(400, f"{'top_logprobs' if chat else 'logprobs'} must be an integer from 0 to {hi}; "
                            f"got {k!r:.40}", param="top_logprobs" if chat else "logprobs")
    return k


def _request(e: Engine, body: dict, ids: list[int], limit: int, chat: bool, lookup: int = 0) -> Request:
    """The engine request for a completion body, every option checked (OpenAI's defaults)."""
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "stop must be a string or a list of up to 4 strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, f"seed must be an integer; got {seed!r:.40}", param="seed")
    top_k = body.get("top_k", 0)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise APIError(400, f"top_k must be an integer >= 0; got {top_k!r:.40}", param="top_k")
    bias = body.get("logit_bias") or {}
    vocab = e.model.args.vocab_size
    try:
        logit_bias = {int(k): float(v) for k, v in bias.items()}
    except (AttributeError, TypeError, ValueError):
        raise APIError(400, "logit_bias must map token ids to numbers", param="logit_bias") from None
    if any(not 0 <= k < vocab or not -100 <= v <= 100 for k, v in logit_bias.items()):
        raise APIError(400, f"logit_bias takes token ids in [0, {vocab}) and values in [-100, 100]",
                       param="logit_bias")
    try:
        params = SamplingParams(
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_k=top_k,
            top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
            min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
            repetition_penalty=_number(body, "repetition_penalty", _number(body, "repeat_penalty", 1.0, 1e-3, 10.0),
                                       1e-3, 10.0),
            seed=None if seed is None else seed % (1 << 63),
        )
    except ValueError as err:
        raise APIError(400, str(err)) from None
    grammar = _response_format(body.get("response_format"))
    cache = body.get("cache_prompt", True)
    if not isinstance(cache, bool):
        raise APIError(400, f"cache_prompt must be true or false; got {cache!r:.40}", param="cache_prompt")
    lookup = body.get("prompt_lookup_num_tokens", lookup)
    if isinstance(lookup, bool) or not isinstance(lookup, int) or lookup < 0:
        raise APIError(400, f"prompt_lookup_num_tokens must be an integer >= 0; got {lookup!r:.40}",
                       param="prompt_lookup_num_tokens")
    return Request(ids=list(ids), max_tokens=limit, params=params, emit=lambda ev: None, stop=stop,
                   cache_prompt=cache, grammar=grammar, logprobs=_logprobs_option(body, chat), lookup=lookup,
                   presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
                   frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
                   logit_bias=logit_bias)


def serve(model_source: str | None, host: str = "127.0.0.1", port: int = 8000, parallel: int = 4,
          n_ctx: int | None = None, api_key: str | None = None, threads: int | None = None,
          max_tokens: int | None = None, prompt_lookup: int = 0, **load_options: Any) -> None:
    """Run the server until SIGINT/SIGTERM. It listens at once; /health says 503 until the model is loaded.

    HTTP is answered on a helper thread; this thread loads the model and runs the engine, so that
    one thread calls every kernel (see `Engine`)."""
    import signal
    import threading

    import uvicorn

    from .model import load, model_source as resolve
    path = resolve(model_source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    app = create_app(None, path.stem if path.is_file() else path.name, api_key, max_tokens,
                     prompt_lookup=prompt_lookup)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    http = threading.Thread(target=server.run, name="fastinfer-http", daemon=True)
    stop = threading.Event()
    engine: list[Engine] = []

    def on_signal(signum, frame):
        stop.set()
        server.should_exit = True
        if not engine:  # still loading: stop that too
            raise KeyboardInterrupt
        engine[0].close()

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        print(f"fastinfer: serving on http://{host}:{port}/v1, loading {path.name} (Ctrl-C stops)", file=sys.stderr)
        model = load(path, threads=threads, n_ctx=n_ctx, **load_options)
        if not model.is_encoder:
            engine.append(Engine(model, parallel, n_ctx, background=False))
            app.state.engine = engine[0]
        app.state.model = model
        if server.started is False and not http.is_alive():
            raise OSError(f"cannot listen on {host}:{port}")
        if engine and not stop.is_set():
            engine[0].run()
        else:
            stop.wait()
    finally:
        server.should_exit = True
        http.join(10)
        for sig, handler in old.items():
            signal.signal(sig, handler)
