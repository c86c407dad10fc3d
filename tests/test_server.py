"""The OpenAI-compatible server: the real uvicorn on 127.0.0.1 and the real `openai` client.

References: the Python API on the same model (a Session per prompt, not the server's batch of
slots), the OpenAI wire format as the openai client parses it, and a known fact.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import fastinfer  # noqa: E402
from fastinfer.server import create_app  # noqa: E402
from fastinfer.serving import Engine, Request  # noqa: E402

N_CTX = 384
KEY = "sk-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, app):
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def model(smollm2_gguf):
    return fastinfer.load(smollm2_gguf, n_ctx=N_CTX)


@pytest.fixture(scope="module")
def engine(model):
    e = Engine(model, parallel=3, n_ctx=N_CTX)
    yield e
    e.close()


@pytest.fixture(scope="module")
def server(engine):
    s = _Server(create_app(engine, "smollm2", api_key=KEY, max_tokens_limit=300))
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _solo(model, messages, n):
    """Greedy continuation through the Python API: a Session of its own."""
    ids = model.tokenizer.encode(model.apply_chat_template(messages), add_special_tokens=False).ids
    return model.decode(model.generate(ids, max_new_tokens=n, temperature=0))


QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
             "What is 2 + 2?", "Say hello in Spanish."]


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["smollm2"]


def test_completion_knows_a_fact(client):
    r = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text.startswith(" Paris")
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"


def test_chat_equals_the_python_api(client, model):
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=40, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == _solo(model, messages, 40)
    prompt = model.tokenizer.encode(model.apply_chat_template(messages), add_special_tokens=False).ids
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_chunks_in_order_and_same_text(client, model):
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    # cache_prompt off: a reused chat-template prefix leaves a few prompt tokens to a short chunk,
    # whose rounding differs from the Python API's one prefill (Engine._reusable), and this
    # question's greedy text flips on it
    chunks = list(client.chat.completions.create(model="smollm2", messages=messages, max_tokens=30, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"cache_prompt": False}))
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [i for i, c in enumerate(chunks) if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0] == len(chunks) - 2          # then the usage chunk
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _solo(model, messages, 30)


def test_concurrent_requests_each_equal_their_solo_run(client, model):
    """More requests than slots: they queue, join and leave the batch between steps. Which slot a
    request lands in depends on timing, and with it how much of the chat template's prefix a slot
    already holds; a reused prefix rounds 8-bit activations differently from a fresh prefill (see
    `Engine._reusable`), so these requests do not reuse one."""
    def ask(q):
        r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": q}],
                                           max_tokens=24, temperature=0, stream=True,
                                           extra_body={"cache_prompt": False})
        return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        got = list(pool.map(ask, QUESTIONS))
    for q, text in zip(QUESTIONS, got):
        _equal_up_to_a_near_tie(model, [{"role": "user", "content": q}], 24, text)


def _equal_up_to_a_near_tie(model, messages, n, text, gap=0.05):
    """text is the greedy continuation `_solo` computes, or leaves it where two tokens were within
    `gap` of each other in its logits: a cached prompt prefix, or a kernel compiled in this process
    rather than loaded from the cache, sums in another order, and such a near-tie can go either way."""
    ids = model.tokenizer.encode(model.apply_chat_template(messages), add_special_tokens=False).ids
    s = model.session()
    logits = s.prefill(ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(logits))
        if tok in model.eos_ids:
            break
        if not text.startswith(model.decode(out + [tok]).rstrip("\ufffd")):  # (a character's first bytes)
            top2 = np.sort(logits)[-2:]
            assert top2[1] - top2[0] < gap, (model.decode(out + [tok]), text)
            return
        out.append(tok)
        logits = s.decode_step(tok)
    assert text == model.decode(out)


def test_second_turn_reuses_the_cache(client, engine):
    first = [{"role": "user", "content": "Tell me about the Moon. " * 20}]
    a = client.chat.completions.create(model="smollm2", messages=first, max_tokens=16, temperature=0)
    second = first + [{"role": "assistant", "content": a.choices[0].message.content},
                      {"role": "user", "content": "And the Sun?"}]
    b = client.chat.completions.create(model="smollm2", messages=second, max_tokens=8, temperature=0)
    assert a.usage.prompt_tokens_details.cached_tokens < a.usage.prompt_tokens / 2  # at most the system prompt
    assert b.usage.prompt_tokens_details.cached_tokens >= a.usage.prompt_tokens
    assert b.usage.prompt_tokens > b.usage.prompt_tokens_details.cached_tokens


def test_stop_string_and_seeded_sampling(client):
    r = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"])
    assert r.choices[0].finish_reason == "stop" and " 7" not in r.choices[0].text and " 6" in r.choices[0].text
    # A cache hit recomputes less of the prompt, which changes 8-bit rounding: exact repeats skip it.
    kw = dict(model="smollm2", prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=7,
              extra_body={"cache_prompt": False})
    texts = {client.completions.create(**kw).choices[0].text for _ in range(2)}
    assert len(texts) == 1
    kw["seed"] = 8
    assert client.completions.create(**kw).choices[0].text not in texts


@pytest.mark.parametrize("kw, param", [
    (dict(temperature=5), "temperature"),
    (dict(n=9), "n"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (dict(max_tokens=301), "max_tokens"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(extra_body={"prompt_lookup_num_tokens": -1}), "prompt_lookup_num_tokens"),
])
def test_bad_parameters_are_400_with_a_message(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], **kw)
    assert e.value.status_code == 400 and param in str(e.value)


def test_prompt_longer_than_the_context(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2", prompt="word " * (N_CTX + 10), max_tokens=4)
    assert "context" in str(e.value) and e.value.code == "context_length_exceeded"


def test_auth_and_health(server):
    assert httpx.get(server.url + "/health").status_code == 200
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_disconnect_frees_the_slot(server, engine):
    body = {"model": "smollm2", "prompt": "Count to a thousand:", "max_tokens": 250, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"authorization": f"Bearer {KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert engine.busy_slots() == 1
    deadline = time.time() + 5
    while engine.busy_slots() and time.time() < deadline:
        time.sleep(0.01)
    assert engine.busy_slots() == 0


def test_shutdown_ends_a_running_request_with_an_error(model):
    # Not with a finish_reason: the request did not finish (the server answers 503)
    e = Engine(model, parallel=1, n_ctx=N_CTX)
    events, started = [], threading.Event()

    def emit(ev):
        events.append(ev)
        if ev[0] == "text":
            started.set()
    e.submit(Request(ids=model.tokenizer.encode("Once upon a time").ids, max_tokens=N_CTX // 2,
                     params=fastinfer.SamplingParams(temperature=0.0), emit=emit))
    try:
        assert started.wait(120)
    finally:
        e.close()
    assert events[-1][0] == "error" and events[-1][2] == 503 and "shutting down" in events[-1][1]
    assert not any(ev[0] == "done" for ev in events)


COPY = ("Repeat this text exactly, word for word: The old lighthouse keeper climbed the spiral stairs every "
        "evening at dusk. He lit the great lamp, wound the clockwork that turned it, and wrote the weather in "
        "his logbook before the first ships passed the rocks.")


def _metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers={"authorization": f"Bearer {KEY}"}).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


@pytest.mark.parametrize("kw", [dict(), dict(frequency_penalty=0.5, logprobs=True, top_logprobs=2)])
def test_prompt_lookup_same_text_with_drafts_taken(client, server, model, kw):
    """Prompt-lookup decoding on a request that copies its prompt: the same greedy text as plain
    decoding (the Python API's, and the server's own without drafts, with penalties and logprobs),
    drafts taken, counted in usage (OpenAI's predicted-token fields) and /metrics."""
    messages = [{"role": "user", "content": COPY}]
    drafted = _metric(server, "fastinfer_lookup_drafted_tokens_total")
    args = dict(model="smollm2", messages=messages, max_tokens=60, temperature=0, **kw)
    plain = client.chat.completions.create(**args)
    got = client.chat.completions.create(**args, extra_body={"prompt_lookup_num_tokens": 3})
    assert got.choices[0].message.content == plain.choices[0].message.content
    if not kw:
        assert plain.choices[0].message.content == _solo(model, messages, 60)
        assert plain.usage.completion_tokens_details is None
    else:
        assert [(t.token, t.logprob) for t in got.choices[0].logprobs.content] == \
            [(t.token, t.logprob) for t in plain.choices[0].logprobs.content]
    details = got.usage.completion_tokens_details
    assert details.accepted_prediction_tokens >= 10, details
    assert got.usage.completion_tokens == plain.usage.completion_tokens
    assert _metric(server, "fastinfer_lookup_drafted_tokens_total") == \
        drafted + details.accepted_prediction_tokens + details.rejected_prediction_tokens


def test_tokenize_detokenize_and_metrics(server, model):
    h = {"authorization": f"Bearer {KEY}"}
    ids = httpx.post(server.url + "/tokenize", json={"content": "Hello world"}, headers=h).json()["tokens"]
    assert ids == model.tokenizer.encode("Hello world", add_special_tokens=False).ids
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}, headers=h).json()["content"] == "Hello world"
    text = httpx.get(server.url + "/metrics", headers=h).text
    for name in ("fastinfer_requests_total", "fastinfer_generated_tokens_total", "fastinfer_busy_slots",
                 "fastinfer_queue_length", "fastinfer_cached_prompt_tokens_total"):
        assert f"\n{name} " in text


def test_cli_serve_health_then_sigint(smollm2_gguf, tmp_path):
    """`fastinfer serve` as users start it (the CLI's main), stopped by Ctrl-C: exit 0. Its stderr
    goes to a file (a pipe nobody reads could fill and block it), and SIGUSR1 makes it print every
    thread's stack there, so a server that does not stop shows where it is stuck."""
    port = _free_port()
    code = ("import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1); "
            "from fastinfer.cli import main; sys.exit(main(sys.argv[1:]))")
    err = open(tmp_path / "stderr.txt", "w+")
    p = subprocess.Popen([sys.executable, "-c", code, "serve", "--model", str(smollm2_gguf), "--port", str(port),
                          "--parallel", "2", "--ctx", "256"], stderr=err, text=True)
    try:
        deadline, status = time.time() + 120, None
        while time.time() < deadline:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/health").status_code
            except httpx.TransportError:
                status = None
            if status == 200:
                break
            time.sleep(0.1)
        assert status == 200
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0})
        assert json.loads(r.text)["choices"][0]["text"].startswith(" Paris")
        p.send_signal(signal.SIGINT)
        try:
            rc = p.wait(60)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGUSR1)
            time.sleep(2)
            err.seek(0)
            pytest.fail("the server did not stop within 60 s of SIGINT; its stderr:\n" + err.read()[-6000:])
        assert rc == 0
    finally:
        if p.poll() is None:
            p.kill()
        err.close()


def test_cli_serve_bad_model_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastinfer", "serve", "--model", str(tmp_path / "nope.gguf"),
                        "--port", str(_free_port())], capture_output=True, text=True, timeout=120,
                       env={**os.environ})
    assert r.returncode == 1 and r.stderr.count("error") == 1 and "nope.gguf" in r.stderr


def test_json_schema_response_format(client):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0}}}
    r = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Invent a person. Answer in JSON."}], max_tokens=60,
        temperature=0.7, seed=1, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int) and value["age"] >= 0
    assert r.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "A JSON object about dogs."}], max_tokens=80,
        temperature=0, response_format={"type": "json_object"}, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.startswith("{")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema", "json_schema": {"schema": [1]}})
    assert "response_format" in str(e.value)


def _log_softmax(x):
    x = x.astype(np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def test_logprobs_are_the_models(client, model):
    messages = [{"role": "user", "content": QUESTIONS[3]}]
    r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=3, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    ids = model.tokenizer.encode(model.apply_chat_template(messages), add_special_tokens=False).ids
    want = _log_softmax(model.session(N_CTX).prefill(ids))
    first = int(np.argmax(want))
    assert content[0].logprob == pytest.approx(want[first], abs=1e-4)
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(np.sort(want)[::-1][:3], abs=1e-4)
    assert content[0].top_logprobs[0].token == content[0].token
    assert "".join(c.token for c in content) == r.choices[0].message.content
    c = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=2, temperature=0,
                                  logprobs=2)
    assert len(c.choices[0].logprobs.tokens) == 2 and len(c.choices[0].logprobs.top_logprobs[0]) == 2
    assert c.choices[0].logprobs.token_logprobs[0] <= 0


def test_n_choices(client):
    r = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                  seed=11, n=3, extra_body={"cache_prompt": False})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.text for c in r.choices}) > 1                        # each choice samples on its own
    assert r.usage.prompt_tokens == 4 and 3 <= r.usage.completion_tokens <= 36     # the prompt counted once
    chunks = list(client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=5, n=2, stream=True, temperature=0))
    assert {c.choices[0].index for c in chunks} == {0, 1}
    assert sum(1 for c in chunks if c.choices[0].finish_reason) == 2


def test_embeddings_of_an_encoder(tmp_path):
    from reference_fnet import FNET_TINY_CFG, random_fnet_weights, write_fnet_dir
    fnet = fastinfer.load(write_fnet_dir(tmp_path / "f", FNET_TINY_CFG, random_fnet_weights(FNET_TINY_CFG)))
    s = _Server(create_app(None, "fnet", model=fnet))
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        texts = ["hello world", "the cat sat"]
        got = c.embeddings.create(model="fnet", input=texts)                # the client asks for base64
        want = fnet.embed(texts)
        assert np.allclose([d.embedding for d in got.data], want, atol=1e-6)
        floats = c.embeddings.create(model="fnet", input=texts[0], encoding_format="float")
        assert np.allclose(floats.data[0].embedding, want[0], atol=1e-6)
        ids = fnet.encode(texts[1])
        by_ids = c.embeddings.create(model="fnet", input=ids, encoding_format="float")
        assert np.allclose(by_ids.data[0].embedding, want[1], atol=1e-6)
        with pytest.raises(openai.BadRequestError, match="encoder"):
            c.completions.create(model="fnet", prompt="x", max_tokens=2)
    finally:
        s.stop()


def test_embeddings_refused_for_a_decoder(client):
    with pytest.raises(openai.BadRequestError, match="decoder"):
        client.embeddings.create(model="smollm2", input="x")
