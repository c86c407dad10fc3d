"""An OpenAI-compatible HTTP server over the continuous-batching engine (fastinfer/serving.py).

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus text), POST /tokenize, POST /detokenize. Errors are OpenAI-shaped,
{"error": {"message", "type", "code"}}; a parameter the server does not implement is a 400 that
names it, never a silent ignore. FastAPI and uvicorn come with `pip install "fastinfer[server]"`.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from .sampling import SamplingParams
from .serving import Engine, Request

try:
    from fastapi import FastAPI
    from fastapi.requests import Request as HTTPRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError('the server needs FastAPI and uvicorn: pip install "fastinfer[server]"') from e

MAX_BODY = 8 << 20  # bytes of one request body

# Parameters that change nothing fastinfer computes; accepted and ignored.
_HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "model"}
_SAMPLING = {"temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repetition_penalty", "seed",
             "presence_penalty", "frequency_penalty", "logit_bias", "stop", "max_tokens", "stream",
             "stream_options", "n", "cache_prompt"}
_CHAT = _SAMPLING | {"messages", "max_completion_tokens", "response_format"}
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
               max_tokens_limit: int | None = None) -> FastAPI:
    """The app. `engine` may be set later (`app.state.engine = ...`): /health says 503 until then."""
    app = FastAPI(title="fastinfer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    created = int(time.time())

    def auth(request: HTTPRequest) -> None:
        if api_key is not None and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                           "authentication_error", "invalid_api_key")

    def ready() -> Engine:
        if app.state.engine is None:
            raise APIError(503, "the model is still loading", "server_error", "loading")
        return app.state.engine

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return e.response()

    @app.get("/health")
    async def health():
        if app.state.engine is None:
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
        return {"tokens": ready().model.tokenizer.encode(content, add_special_tokens=bool(add)).ids}

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest):
        auth(request)
        body = await _json(request)
        e = ready()
        try:
            return {"content": e.model.decode(body.get("tokens"))}
        except (ValueError, TypeError) as err:
            raise APIError(400, f"'tokens': {err}", param="tokens") from None

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
        if n != 1:
            raise APIError(400, "n must be 1 on this server", param="n", code="unsupported_parameter")
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
        limit = min(limit, room)
        r = _request(e, body, ids, limit)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        r.emit = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
        try:
            e.submit(r)
        except ValueError as err:
            raise APIError(400, str(err)) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        now = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        usage = lambda: {"prompt_tokens": len(ids), "completion_tokens": r.completion_tokens,  # noqa: E731
                         "total_tokens": len(ids) + r.completion_tokens,
                         "prompt_tokens_details": {"cached_tokens": r.cached_tokens}}

        def choice(text: str | None, finish: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            if not delta:
                return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": finish}
            return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                    "finish_reason": finish}

        if not body.get("stream"):
            parts, finish = [], None
            try:
                while finish is None:
                    try:
                        ev = await asyncio.wait_for(events.get(), 0.5)
                    except asyncio.TimeoutError:
                        if await http.is_disconnected():  # nobody to answer: free the slot
                            return None
                        continue
                    if ev[0] == "text":
                        parts.append(ev[1])
                    elif ev[0] == "error":
                        raise APIError(500, ev[1], "server_error")
                    else:
                        finish = ev[1]
            finally:
                r.cancel()  # a client gone mid-request frees the slot
            return {"id": rid, "object": kind, "created": now, "model": model_name,
                    "choices": [choice("".join(parts), finish, False)], "usage": usage()}

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
                    yield sse([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}])
                while True:
                    ev = await events.get()
                    if ev[0] == "text":
                        yield sse([choice(ev[1], None, True)])
                    elif ev[0] == "error":
                        yield f"data: {json.dumps({'error': {'message': ev[1], 'type': 'server_error'}})}\n\n"
                        break
                    else:
                        yield sse([choice(None, ev[1], True)])
                        break
                if include_usage:
                    yield sse([], with_usage=True)
                yield "data: [DONE]\n\n"
            finally:
                r.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


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


def _request(e: Engine, body: dict, ids: list[int], limit: int) -> Request:
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
    return Request(ids=list(ids), max_tokens=limit, params=params, emit=lambda ev: None, stop=stop, cache_prompt=cache, grammar=grammar,
                   presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
                   frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
                   logit_bias=logit_bias)


def serve(model_source: str | None, host: str = "127.0.0.1", port: int = 8000, parallel: int = 4,
          n_ctx: int | None = None, api_key: str | None = None, threads: int | None = None,
          max_tokens: int | None = None, **load_options: Any) -> None:
    """Run the server until SIGINT/SIGTERM. It listens at once; /health says 503 until the model is loaded."""
    import threading

    import uvicorn

    from .model import load, model_source as resolve
    path = resolve(model_source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    app = create_app(None, path.stem if path.is_file() else path.name, api_key, max_tokens)
    failure: list[BaseException] = []

    def loading():
        try:
            model = load(path, threads=threads, n_ctx=n_ctx, **load_options)
            app.state.engine = Engine(model, parallel, n_ctx)
        except BaseException as e:  # shown by the main thread
            failure.append(e)
            server.should_exit = True

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    print(f"fastinfer: serving on http://{host}:{port}/v1, loading {path.name} (Ctrl-C stops)", file=sys.stderr)
    threading.Thread(target=loading, name="fastinfer-load", daemon=True).start()
    try:
        server.run()
    except (KeyboardInterrupt, SystemExit):
        pass  # uvicorn shut down on SIGINT/SIGTERM, then re-raised the signal: a requested stop
    finally:
        if app.state.engine is not None:
            app.state.engine.close()
    if failure:
        raise failure[0]
