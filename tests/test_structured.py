"""JSON-schema output (fastinfer/structured.py, llguidance): what comes out parses and satisfies
the schema, on a byte-level BPE vocabulary (SmolLM2) and a SentencePiece one (Gemma 3)."""
import json
import re

import numpy as np
import pytest

pytest.importorskip("llguidance")

import fastinfer  # noqa: E402

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0},
                         "city": {"type": "string", "maxLength": 40}}}


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return fastinfer.load(smollm2_gguf, n_ctx=512)


def _check_person(value):
    assert set(value) == {"name", "age", "city"}
    assert isinstance(value["name"], str) and isinstance(value["city"], str)
    assert isinstance(value["age"], int) and value["age"] >= 0


def test_chat_output_satisfies_the_schema(smollm2):
    msgs = [{"role": "user", "content": "Describe a fictional person as JSON with name, age and city."}]
    for seed in range(3):
        _check_person(json.loads(smollm2.chat(msgs, json_schema=PERSON, temperature=0.9, seed=seed,
                                             max_new_tokens=80)))


def test_enum_and_pattern_are_forced(smollm2):
    out = smollm2.generate("My favourite colour is", json_schema={"enum": ["teal", "ochre"]}, temperature=0,
                           max_new_tokens=10)
    assert json.loads(out) in ("teal", "ochre")
    out = smollm2.generate("A number:", json_schema={"type": "string", "pattern": "^[0-9]{3}-[a-z]{2}$"},
                           temperature=1.0, seed=1, max_new_tokens=20)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", json.loads(out))


def test_any_object_and_the_stream(smollm2):
    pieces = list(smollm2.stream("A JSON object about cats:", json_schema=True, temperature=0, max_new_tokens=60))
    text = "".join(pieces)
    if len(smollm2.encode(text)) < 58:  # complete, not cut by the token budget
        assert isinstance(json.loads(text), dict)
    assert text.startswith("{")


def test_bad_schemas_are_clear_errors(smollm2):
    with pytest.raises(ValueError, match="JSON schema"):
        smollm2.generate("x", json_schema="{not json", max_new_tokens=4)
    with pytest.raises(ValueError, match="JSON schema"):
        smollm2.generate("x", json_schema=["a list"], max_new_tokens=4)
    with pytest.raises(ValueError, match="beam"):
        smollm2.generate("x", json_schema=PERSON, num_beams=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="batch"):
        smollm2.generate(["x", "y"], json_schema=PERSON, max_new_tokens=4)


def test_sentencepiece_vocabulary(gemma3_gguf):
    gemma = fastinfer.load(gemma3_gguf, n_ctx=256)
    out = gemma.generate("The answer, in JSON:", json_schema={"enum": ["yes", "no", "naïve café"]},
                         temperature=1.0, seed=2, max_new_tokens=12)
    assert json.loads(out) in ("yes", "no", "naïve café")
    out = gemma.generate("A word:", json_schema={"type": "object", "required": ["w"], "additionalProperties": False,
                                                 "properties": {"w": {"type": "string", "pattern": "^[a-zé]{1,8}$"}}},
                         temperature=1.0, seed=5, max_new_tokens=24)
    assert re.fullmatch(r"[a-zé]{1,8}", json.loads(out)["w"])


def test_cli_json_schema(smollm2_gguf, tmp_path):
    import subprocess
    import sys
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "required": ["city"], "additionalProperties": False,
                                  "properties": {"city": {"type": "string", "maxLength": 20}}}))
    run = lambda *a: subprocess.run([sys.executable, "-m", "fastinfer", "generate", "--model", str(smollm2_gguf),  # noqa: E731
                                     *a], capture_output=True, text=True, timeout=300)
    r = run("--chat", "--json-schema", f"@{schema}", "--temperature", "0", "-n", "30",
            "Which city is the capital of France? Answer in JSON.")
    assert r.returncode == 0 and set(json.loads(r.stdout)) == {"city"}
    r = run("--json-schema", "{bad", "x")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "JSON schema" in r.stderr


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 100, 257])
def test_mask_kernel_equals_its_numpy_twin(vocab):
    from fastinfer.kernels.ops import mask_tokens
    rng = np.random.default_rng(vocab)
    words = rng.integers(-2**31, 2**31, size=(vocab + 31) // 32, dtype=np.int64).astype(np.int32)
    words[0] = -1                                                   # all allowed
    if len(words) > 1:
        words[1] = 0                                                # none allowed
    logits = rng.standard_normal(vocab).astype(np.float32)
    allowed = np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab].astype(bool)
    want = np.where(allowed, logits, -np.inf).astype(np.float32)
    mask_tokens(logits, words)
    np.testing.assert_array_equal(logits, want)


def test_forced_tokens_skip_sampling(smollm2):
    """A grammar's forced tokens ('{"name":') are fed without a decode step each: fewer steps than
    tokens, and the output still parses."""
    calls = {"steps": 0}
    session = smollm2.session

    def counting(*a, **k):
        s = session(*a, **k)
        step = s.decode_step

        def counted(tok):
            calls["steps"] += 1
            return step(tok)
        s.decode_step = counted
        return s
    smollm2.session = counting
    try:
        out = smollm2.generate("Describe a person as JSON:", json_schema=PERSON, temperature=0, max_new_tokens=60)
    finally:
        del smollm2.session
    _check_person(json.loads(out))
    assert calls["steps"] < len(smollm2.encode(out)) - 3
