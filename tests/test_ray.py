"""Ray integration (fastinfer/ray.py and the two examples) on a local 2-CPU cluster with a tiny
random Llama (Q8_0 GGUF, 8-bit activations: the real models' path).

References: the Python API on the same file in this process, greedy. Ray Data decodes batches of
at most 4 prompts, where a batched step computes each sequence bit for bit as decoding it alone
does (docs/design.md, the row-major matmul loop), so every output must equal its prompt decoded
alone. The Serve app is read with the real `openai` client through Serve's HTTP proxy.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
pytest.importorskip("ray.data")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pq = pytest.importorskip("pyarrow.parquet")

import fastinfer  # noqa: E402
from fastinfer.ray import Predictor, app_builder, openai_app  # noqa: E402
from tiny_models import TINY_CFG, gguf_tokenizer_fields, random_llama_weights, tiny_bpe_tokenizer, write_gguf  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
KEY = "sk-ray"
MAX_TOKENS = 12
PROMPTS = ["The capital of France is", "Once upon a time there was", "def add(a, b):", "1, 2, 3,",
           "The weather today", "A", "Tell me a story about a dragon and a knight who"]
QUESTIONS = ["What is the capital of France?", "Name three colours."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    tok = gguf_tokenizer_fields(tiny_bpe_tokenizer())
    w = random_llama_weights(TINY_CFG, seed=0)
    return write_gguf(tmp_path_factory.mktemp("ray") / "tiny.gguf", TINY_CFG, w, "Q8_0", tokenizer_vocab=tok)


@pytest.fixture(scope="module")
def model(tiny):
    return fastinfer.load(tiny, threads=1)


def _alone(model, ids: list[int], n: int = MAX_TOKENS) -> list[int]:
    """Greedy new ids for one prompt, decoded alone in this process."""
    return model.generate(ids, max_new_tokens=n, temperature=0)


def _chat_ids(model, content: str) -> list[int]:
    text = model.apply_chat_template([{"role": "user", "content": content}])
    return model.tokenizer.encode(text, add_special_tokens=False).ids


# ----------------------------------------------------------------------------------------------
# The examples' --smoke, each on a local cluster of its own (run before this module's cluster)
# ----------------------------------------------------------------------------------------------

def test_serve_example_smoke(tiny):
    r = subprocess.run([sys.executable, str(EXAMPLES / "ray_serve.py"), "--smoke", "--model", str(tiny),
                        "--num-cpus", "1", "--port", str(_free_port())],
                       capture_output=True, text=True, timeout=240, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "replied in" in r.stderr and r.stdout.strip()


def test_batch_example_smoke(tiny):
    r = subprocess.run([sys.executable, str(EXAMPLES / "ray_batch.py"), "--smoke", "--model", str(tiny)],
                       capture_output=True, text=True, timeout=240, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "8 prompts" in r.stderr.splitlines()[-1]


# ----------------------------------------------------------------------------------------------
# Two nodes (two raylets on this host, one CPU each): the examples join a running cluster with
# --address, as on a real multi-node cluster
# ----------------------------------------------------------------------------------------------

def test_examples_on_a_two_node_cluster(tiny, model, tmp_path):
    """Ray Data's two 1-CPU actors and Serve's two 1-CPU replicas can only be placed one per node;
    every output must still equal its prompt decoded alone in this process."""
    import signal
    import time

    from ray.cluster_utils import Cluster
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    serving = None
    try:
        nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
        src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:6]))
        r = subprocess.run([sys.executable, str(EXAMPLES / "ray_batch.py"), str(src), str(dst), "--model", str(tiny),
                            "--address", nodes.address, "--threads", "1", "--batch-size", "3", "-n", str(MAX_TOKENS),
                            "--temperature", "0"], capture_output=True, text=True, timeout=300, env=_env())
        assert r.returncode == 0, r.stderr[-2000:]
        assert "ray_batch: 2 actors x 1 threads on a cluster of 2 nodes, 2 CPUs" in r.stderr
        rows = [json.loads(line) for line in dst.read_text().splitlines()]
        assert [row["output"] for row in rows] == [model.decode(_alone(model, model.encode(p))) for p in PROMPTS[:6]]

        port = _free_port()
        serving = subprocess.Popen([sys.executable, str(EXAMPLES / "ray_serve.py"), "--model", str(tiny),
                                    "--address", nodes.address, "--replicas", "2", "--num-cpus", "1", "--parallel", "2",
                                    "--ctx", "128", "--port", str(port)],
                                   stderr=subprocess.PIPE, text=True, env=_env())
        deadline = time.monotonic() + 240
        for line in serving.stderr:  # "serving ..." once both replicas are up
            if "ray_serve: serving" in line or time.monotonic() > deadline:
                break
        assert "ray_serve: serving" in line and "from a cluster of 2 nodes" in line, line
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        for q in QUESTIONS * 2:  # Serve's router spreads requests over both replicas
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}],
                                               max_tokens=MAX_TOKENS, temperature=0)
            assert r.choices[0].message.content == model.decode(_alone(model, _chat_ids(model, q)))
        serving.send_signal(signal.SIGINT)
        assert serving.wait(timeout=120) == 0
    finally:
        if serving is not None and serving.poll() is None:
            serving.kill()
        nodes.shutdown()


# ----------------------------------------------------------------------------------------------
# Bad input to the batch example: one line on stderr, exit 1, before any cluster starts
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing", "no-column", "not-json", "bad-output"])
def test_batch_example_bad_input(tmp_path, case):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    if case == "no-column":
        src.write_text(json.dumps({"text": "hello"}) + "\n")
    elif case == "not-json":
        src.write_text("prompt,hello\n")
    elif case == "bad-output":
        src.write_text(json.dumps({"prompt": "hello"}) + "\n")
        dst = tmp_path / "out.csv"
    r = subprocess.run([sys.executable, str(EXAMPLES / "ray_batch.py"), str(src), str(dst)],
                       capture_output=True, text=True, timeout=60, env=_env())
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    expected = {"missing": "no such file", "no-column": "no 'prompt' column", "not-json": "not JSON",
                "bad-output": "must end in"}[case]
    assert lines[0].startswith("ray_batch: ") and expected in lines[0]
    assert not dst.exists()


def test_predictor_names_a_missing_column(tiny):
    p = Predictor(str(tiny), threads=1, max_tokens=2)
    with pytest.raises(ValueError, match="no 'prompt' column; it has text"):
        p({"text": np.array(["hello"], dtype=object)})


def test_predictor_records_bad_rows_and_generates_the_rest(tiny, model):
    """on_error="record": the rows that cannot run say why; the others are what they would be in
    a batch of their own (the reference: the Python API, greedy, in this process)."""
    good = PROMPTS[:3]
    batch = {"prompt": np.array([good[0], "", "x y z " * 200, good[1], None, good[2]], dtype=object)}
    out = Predictor(str(tiny), threads=1, max_tokens=MAX_TOKENS, temperature=0, on_error="record")(batch)
    assert list(out["finish_reason"][[1, 2, 4]]) == ["error"] * 3
    assert "is 0 tokens" in out["error"][1] and "the context holds" in out["error"][2]
    assert "must hold strings; found NoneType" in out["error"][4]
    assert list(out["output"][[1, 2, 4]]) == [""] * 3 and list(out["output_tokens"][[1, 2, 4]]) == [0] * 3
    outs = model.generate([model.encode(p) for p in good], max_new_tokens=MAX_TOKENS, temperature=0)
    assert list(out["output"][[0, 3, 5]]) == [model.decode(o) for o in outs]
    assert list(out["error"][[0, 3, 5]]) == [""] * 3
    with pytest.raises(ValueError, match="the context holds"):  # the default: the batch fails
        Predictor(str(tiny), threads=1, max_tokens=2)({"prompt": batch["prompt"][:3]})
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'record'"):
        Predictor(str(tiny), threads=1, on_error="skip")


def test_app_options_are_checked(tiny):
    """What `serve run fastinfer.ray:app_builder key=value ...` passes: strings, typed here."""
    deployment = app_builder({"model": str(tiny), "num_cpus": "2", "min_replicas": "1", "max_replicas": "3"})
    assert type(deployment).__name__ == "Application"
    with pytest.raises(ValueError, match="unknown option 'replica'"):
        app_builder({"replica": "2"})
    with pytest.raises(ValueError, match="max_replicas must be an integer"):
        app_builder({"max_replicas": "many"})
    with pytest.raises(ValueError, match="not both"):
        openai_app(str(tiny), num_replicas=2, max_replicas=3)
    with pytest.raises(ValueError, match="num_cpus must be a number > 0"):
        openai_app(str(tiny), num_cpus=0)
    assert type(app_builder({"max_replicas": "2", "upscale_delay_s": "5", "downscale_delay_s": "60"})).__name__ == \
        "Application"
    with pytest.raises(ValueError, match="upscale_delay_s applies to autoscaling"):
        openai_app(str(tiny), upscale_delay_s=5)
    with pytest.raises(ValueError, match="downscale_delay_s must be a number >= 0"):
        openai_app(str(tiny), max_replicas=2, downscale_delay_s=-1)


# ----------------------------------------------------------------------------------------------
# One cluster for the rest of the module
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _predict(tiny, prompts: list[str], batch_size: int, actors: int, **options) -> list[dict]:
    ds = ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(prompts)])
    ds = ds.map_batches(Predictor, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=1, fn_constructor_kwargs=dict(model=str(tiny), max_tokens=MAX_TOKENS, **options))
    return sorted(ds.take_all(), key=lambda r: r["id"])


def test_predictor_equals_generating_each_prompt_alone(cluster, tiny, model):
    rows = _predict(tiny, PROMPTS, batch_size=3, actors=2, temperature=0)
    assert [r["prompt"] for r in rows] == PROMPTS
    for r in rows:
        ids = model.encode(r["prompt"])
        out = _alone(model, ids)
        assert r["output"] == model.decode(out)
        assert (r["prompt_tokens"], r["output_tokens"]) == (len(ids), len(out))
        assert r["finish_reason"] == ("length" if len(out) == MAX_TOKENS else "stop")
    assert sum(r["output_tokens"] for r in rows) > len(rows)  # the model did write something


def test_predictor_batch_of_7_equals_the_engines_batched_path(cluster, tiny, model):
    """From 5 sequences a batched step groups its float sums differently from decoding alone, so
    the reference is `Model.generate` on the same 7 prompts at once, in this process."""
    rows = _predict(tiny, PROMPTS, batch_size=7, actors=1, temperature=0)
    outs = model.generate([model.encode(p) for p in PROMPTS], max_new_tokens=MAX_TOKENS, temperature=0)
    assert [r["output"] for r in rows] == [model.decode(o) for o in outs]
    assert [r["output_tokens"] for r in rows] == [len(o) for o in outs]


def test_predictor_chat_template(cluster, tiny, model):
    rows = _predict(tiny, QUESTIONS, batch_size=2, actors=1, temperature=0, chat=True)
    for r in rows:
        ids = _chat_ids(model, r["prompt"])
        assert r["prompt_tokens"] == len(ids)
        assert r["output"] == model.decode(_alone(model, ids))


def test_predictor_seeded_sampling_does_not_depend_on_the_batch(cluster, tiny):
    """Each sequence has its own generator, seeded alike: batches of 1 and of 4 agree."""
    one = _predict(tiny, PROMPTS[:4], batch_size=1, actors=1, temperature=0.9, seed=7)
    four = _predict(tiny, PROMPTS[:4], batch_size=4, actors=1, temperature=0.9, seed=7)
    assert [r["output"] for r in one] == [r["output"] for r in four]


def _batch_example(cluster, *args) -> subprocess.CompletedProcess:
    """The example as a second driver on this module's cluster (the Serve tests may hold a CPU)."""
    return subprocess.run([sys.executable, str(EXAMPLES / "ray_batch.py"), *map(str, args), "--address", cluster,
                           "--concurrency", "1"], capture_output=True, text=True, timeout=180, env=_env())


def test_batch_example_jsonl_to_parquet(cluster, tiny, model, tmp_path):
    src, dst = tmp_path / "prompts.jsonl", tmp_path / "outputs.parquet"
    src.write_text("".join(json.dumps({"prompt": p, "tag": i}) + "\n" for i, p in enumerate(PROMPTS)))
    r = _batch_example(cluster, src, dst, "--model", tiny, "--batch-size", 4, "-n", MAX_TOKENS, "--temperature", 0)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = pq.read_table(dst).to_pylist()
    assert [(x["prompt"], x["tag"]) for x in rows] == [(p, i) for i, p in enumerate(PROMPTS)]  # in order
    assert [x["output"] for x in rows] == [model.decode(_alone(model, model.encode(p))) for p in PROMPTS]
    assert sorted(os.listdir(tmp_path)) == ["outputs.parquet", "prompts.jsonl"]  # no temporary file left


def test_batch_example_failure_keeps_the_old_output(cluster, tiny, tmp_path):
    """A prompt longer than the context fails the run after earlier batches were written: the
    previous output stays as it was, and no partial file is left."""
    src, dst = tmp_path / "prompts.parquet", tmp_path / "outputs.jsonl"
    import pyarrow as pa
    pq.write_table(pa.table({"prompt": PROMPTS + ["x y z " * 200]}), src)
    dst.write_text("old\n")
    r = _batch_example(cluster, src, dst, "--model", tiny, "--batch-size", 2, "-n", 4)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ray_batch: ") and "context" in last, r.stderr[-2000:]
    assert dst.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["outputs.jsonl", "prompts.parquet"]


def test_batch_example_records_a_prompt_too_long(cluster, tiny, model, tmp_path):
    src, dst = tmp_path / "prompts.jsonl", tmp_path / "outputs.jsonl"
    prompts = PROMPTS[:3] + ["x y z " * 200]
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    r = _batch_example(cluster, src, dst, "--model", tiny, "--batch-size", 2, "-n", 4, "--temperature", 0,
                       "--on-error", "record")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 could not run" in r.stderr.strip().splitlines()[-1]
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [x["finish_reason"] for x in rows][3] == "error" and "the context holds" in rows[3]["error"]
    assert [x["output"] for x in rows[:3]] == [model.decode(_alone(model, model.encode(p), 4)) for p in PROMPTS[:3]]
    assert [x["error"] for x in rows[:3]] == [""] * 3


# ----------------------------------------------------------------------------------------------
# Ray Serve: the OpenAI app on one replica of 1 CPU
# ----------------------------------------------------------------------------------------------

class TestServe:
    @pytest.fixture(scope="class")
    def served(self, cluster, tiny):
        from ray import serve
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(openai_app(str(tiny), num_cpus=1, parallel=2, n_ctx=128, api_key=KEY),
                           name="fastinfer", route_prefix="/")
        yield f"http://127.0.0.1:{port}", handle
        serve.shutdown()  # gives its CPU back to the tests after this class

    @pytest.fixture
    def client(self, served):
        return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)

    def test_replica_threads_match_its_cpus(self, served):
        info = served[1].info.remote().result()
        assert info["threads"] == 1 and info["parallel"] == 2 and info["n_ctx"] == 128
        assert info["omp_num_threads"] == "1"  # Ray's setting for a 1-CPU actor; Numba's team follows threads

    def test_models_and_health(self, served, client):
        assert [m.id for m in client.models.list().data] == ["tiny"]
        assert httpx.get(served[0] + "/health", timeout=30).json() == {"status": "ok"}
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=served[0] + "/v1", api_key="wrong", max_retries=0).models.list()

    def test_chat_equals_the_python_api(self, client, model):
        messages = [{"role": "user", "content": QUESTIONS[0]}]
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        ids = _chat_ids(model, QUESTIONS[0])
        out = _alone(model, ids)
        assert r.choices[0].message.content == model.decode(out)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(out))

    def test_stream_concatenates_to_the_reply(self, client):
        messages = [{"role": "user", "content": QUESTIONS[1]}]
        whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS,
                                               temperature=0).choices[0].message.content
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS,
                                                     temperature=0, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [i for i, c in enumerate(chunks) if c.choices[0].finish_reason] == [len(chunks) - 1]
        pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
        assert len(pieces) > 1 and "".join(pieces) == whole


def test_serve_autoscales_with_the_load(cluster, tiny):
    """min 1 and max 2 replicas of 1 CPU, one request each: while 4 clients keep requests in flight,
    Serve adds the second replica (the cluster's other CPU), both answer, and once the clients stop
    it goes back to one."""
    import threading
    import time

    from ray import serve

    def running() -> int:
        return serve.status().applications["fastinfer"].deployments["fastinfer"].replica_states.get("RUNNING", 0)

    def wait_for(replicas: int, seconds: float = 90) -> None:
        deadline = time.monotonic() + seconds
        while running() != replicas:
            assert time.monotonic() < deadline, f"{running()} replicas running after {seconds} s; expected {replicas}"
            time.sleep(0.25)

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        handle = serve.run(openai_app(str(tiny), num_cpus=1, parallel=1, n_ctx=128, min_replicas=1, max_replicas=2,
                                      upscale_delay_s=0.5, downscale_delay_s=1),
                           name="fastinfer", route_prefix="/")
        assert running() == 1
        stop, pids, failures = threading.Event(), set(), []

        def client() -> None:
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
            try:
                while not stop.is_set():
                    r = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=100, temperature=0)
                    assert r.choices[0].text or r.choices[0].finish_reason == "stop"
            except Exception as e:  # handed to the test thread
                failures.append(e)

        clients = [threading.Thread(target=client) for _ in range(4)]
        for t in clients:
            t.start()
        try:
            wait_for(2)
            deadline = time.monotonic() + 30
            while len(pids) < 2 and time.monotonic() < deadline:  # requests through the handle reach both
                pids.add(handle.info.remote().result()["pid"])
        finally:
            stop.set()
            for t in clients:
                t.join(timeout=120)
        assert not failures, failures[0]
        assert len(pids) == 2
        wait_for(1)
    finally:
        serve.shutdown()
