"""Bad input gets one clear message: files, architectures, shapes, prompts and options."""
import json
import struct
import subprocess
import sys

import gguf
import numpy as np
import pytest

import fastinfer
from tiny_models import (TINY_CFG, gguf_tokenizer_fields, random_llama_weights, tiny_bpe_tokenizer, write_gguf,
                         write_hf_dir)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tok = tiny_bpe_tokenizer()
    path = write_gguf(d / "tiny.gguf", TINY_CFG, random_llama_weights(TINY_CFG), "Q8_0",
                      tokenizer_vocab=gguf_tokenizer_fields(tok))
    return path


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return fastinfer.load(tiny, n_ctx=32)


def _hf(tmp_path, **edit):
    w = random_llama_weights(TINY_CFG)
    w.update(edit)
    return write_hf_dir(tmp_path / "hf", TINY_CFG, w, tokenizer=tiny_bpe_tokenizer())


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        fastinfer.load(tmp_path / "nope.gguf")


def test_corrupt_gguf(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="bad.gguf"):
        fastinfer.load(p)


def test_truncated_gguf(tmp_path, tiny):
    p = tmp_path / "cut.gguf"
    p.write_bytes(tiny.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="cut.gguf"):
        fastinfer.load(p)


def test_unsupported_gguf_architecture(tmp_path):
    p = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(p), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ValueError, match="unsupported architecture 'mamba'"):
        fastinfer.load(p)


def test_hf_missing_config(tmp_path):
    d = _hf(tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        fastinfer.load(d)


def test_hf_unsupported_model_type(tmp_path):
    d = _hf(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt_neox'"):
        fastinfer.load(d)


def test_hf_truncated_safetensors(tmp_path):
    d = _hf(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated|past the end"):
        fastinfer.load(d)


def test_hf_wrong_shape(tmp_path):
    d = _hf(tmp_path, **{"model.layers.1.self_attn.q_proj.weight": np.zeros((32, 64), np.float32)})
    with pytest.raises(ValueError, match=r"layers.1.wq has shape \(1, 32, 64\)"):
        fastinfer.load(d)


def test_hf_unsupported_tensor_dtype(tmp_path):
    d = _hf(tmp_path)
    header = {"model.layers.0.self_attn.o_proj.weight": {"dtype": "I32", "shape": [64, 64],
                                                         "data_offsets": [0, 64 * 64 * 4]}}
    raw = json.dumps(header).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(64 * 64 * 4))
    with pytest.raises(ValueError, match="I32"):
        fastinfer.load(d)


def test_bad_dtype(tiny):
    with pytest.raises(ValueError, match="dtype"):
        fastinfer.load(tiny, dtype="int3")


def test_bad_threads(tiny):
    with pytest.raises(ValueError, match="threads"):
        fastinfer.load(tiny, threads=0)


def test_prompt_longer_than_context(tiny_model):
    with pytest.raises(ValueError, match="context"):
        tiny_model.generate(list(range(40)), max_new_tokens=2)
    with pytest.raises(ValueError, match="context"):
        tiny_model.forward(list(range(40)))


def test_session_overflow(tiny_model):
    s = tiny_model.session()
    s.prefill(list(range(30)))
    with pytest.raises(ValueError, match="do not fit"):
        s.append([1, 2, 3])


def test_session_longer_than_loaded_context(tiny_model):
    # RoPE tables are sized for the n_ctx the model was loaded with; a longer session must refuse.
    with pytest.raises(ValueError, match="loaded for"):
        tiny_model.session(n_ctx=33)


def test_empty_prompt(tiny_model):
    with pytest.raises(ValueError, match="empty"):
        tiny_model.generate("", max_new_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        tiny_model.generate([], max_new_tokens=2)


def test_token_id_out_of_range(tiny_model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_model.forward([1, 2, 300])


@pytest.mark.parametrize("token", [10**9, -5, TINY_CFG["vocab_size"], 2**70])
def test_decode_step_checks_its_token(tiny_model, token):
    # an id past the embedding table used to be read as an address (10^9: SIGSEGV)
    s = tiny_model.session()
    s.prefill([1, 2])
    with pytest.raises(ValueError, match=f"token id {token} is outside the vocabulary"):
        s.decode_step(token)
    assert s.pos == 2  # nothing was fed
    np.testing.assert_array_equal(s.decode_step(7), tiny_model.forward([1, 2, 7])[-1])


@pytest.mark.parametrize("token", ["7", 7.0, True, None])
def test_token_ids_must_be_integers(tiny_model, token):
    with pytest.raises(ValueError, match="token ids must be integers"):
        tiny_model.session().decode_step(token)
    with pytest.raises(ValueError, match="token ids must be integers"):
        tiny_model.generate([5, token], max_new_tokens=2)


def test_bytes_are_not_token_ids(tiny_model):
    with pytest.raises(ValueError, match="got bytes"):
        tiny_model.generate(b"hi", max_new_tokens=2)


def test_batch_decode_checks_its_tokens(tiny_model):
    from fastinfer.model import Batch
    batch = Batch(tiny_model, 2, 16)
    batch.sessions[0].prefill([1, 2])
    batch.sessions[1].prefill([3])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        batch.decode([0, 1], [7, 10**9])
    with pytest.raises(ValueError, match="one token per sequence"):
        batch.decode([0, 1], [7])
    assert [s.pos for s in batch.sessions] == [2, 1]


@pytest.mark.parametrize("rows", [1, TINY_CFG["vocab_size"] - 1])
def test_output_matrix_must_cover_the_vocabulary(tmp_path, rows):
    # an lm_head with fewer rows than the vocabulary: the head wrote logits past its rows (SIGSEGV)
    d = _hf(tmp_path, **{"lm_head.weight": np.zeros((rows, TINY_CFG["hidden_size"]), np.float32)})
    with pytest.raises(ValueError, match=rf"the output matrix has shape \(1, {rows}, 64\)"):
        fastinfer.load(d)


@pytest.mark.parametrize("opt,value", [("top_p", 1.5), ("temperature", -0.1), ("top_k", -1), ("min_p", 2.0),
                                       ("repetition_penalty", 0.0), ("max_new_tokens", 0)])
def test_sampling_values_out_of_range(tiny_model, opt, value):
    with pytest.raises(ValueError, match=opt):
        tiny_model.generate([1, 2, 3], **{"max_new_tokens": 2, opt: value})


def _cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "fastinfer", *args], input=stdin, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("args,needle", [
    (["generate", "hi", "--top-p", "2"], "top_p"),
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "-m", "/no/such/model.gguf"], "/no/such/model.gguf"),
])
def test_cli_errors_are_one_line(args, needle):
    r = _cli(*args)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("fastinfer: error:")]
    assert len(lines) == 1 and needle in lines[0]


def test_cli_empty_stdin_prompt():
    r = _cli("generate", "-", stdin="  \n")
    assert r.returncode == 1 and "empty" in r.stderr and "Traceback" not in r.stderr


def test_cli_stdin_that_is_not_utf8(tiny):
    r = subprocess.run([sys.executable, "-m", "fastinfer", "generate", "-", "-m", str(tiny), "-n", "2"],
                       input=b"\xff\xfe hello", capture_output=True, timeout=600)
    assert r.returncode == 1 and r.stderr.decode() == "fastinfer: error: stdin: not UTF-8 text (invalid start byte at byte 0)\n"


def test_more_new_tokens_than_memory_stops_at_the_context(tiny_model):
    # -n 10^12 used to allocate its token history up front (7 TiB); generation ends with the context
    out = tiny_model.generate([1, 2, 3], max_new_tokens=10**12, temperature=0)
    assert 1 <= len(out) <= tiny_model.n_ctx - 3 + 1
    assert tiny_model.generate([[1, 2], [3]], max_new_tokens=10**12, temperature=0)


def test_cli_prompt_too_long(tiny):
    r = _cli("generate", "word " * 200, "-m", str(tiny), "--ctx", "16")
    assert r.returncode == 1 and "context" in r.stderr and "Traceback" not in r.stderr


def test_cli_usage_error_exit_code():
    r = _cli("generate", "hi", "-n", "zero")
    assert r.returncode == 1 and "positive integer" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_block_sparse_with_pruning_is_refused(tiny_model):
    # pruning and eviction renumber cache rows; a block pattern over rows would be meaningless
    with pytest.raises(ValueError, match="does not combine"):
        tiny_model.session(attention=fastinfer.BlockSparse(block=4), kv_budget=128)
    with pytest.raises(ValueError, match="does not combine"):
        tiny_model.generate([1, 2, 3], max_new_tokens=2, attention=fastinfer.BlockSparse(block=4),
                            prune=fastinfer.Prune())


@pytest.mark.parametrize("edit,msg", [
    ({"num_hidden_layers": 2**31}, r"n_layers = 2147483648; expected an integer in 1..4096"),  # looped forever
    ({"num_hidden_layers": 2}, r"the config says 2 layers; the file holds layer tensors for 3"),  # one ignored
    ({"num_hidden_layers": 4}, r"the config says 4 layers; the file holds layer tensors for 3"),
    ({"rms_norm_eps": -0.5}, r"norm_eps = -0.5; expected a number in \(0, 1\]"),
    ({"rms_norm_eps": float("nan")}, r"norm_eps = nan; expected a number in \(0, 1\]"),
    ({"rope_theta": 0.0}, r"rope_theta = 0.0; expected a number in \[1, 1e\+12\]"),
    ({"rope_theta": 0.5}, r"rope_theta = 0.5; expected a number in \[1, 1e\+12\]"),  # logits off
    ({"num_key_value_heads": 3}, r"4 query heads do not divide into 3 key/value heads"),
])
@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_config_values_are_checked_against_range_and_tensors(tmp_path, fmt, edit, msg):
    w = random_llama_weights(TINY_CFG)
    cfg = {**TINY_CFG, **edit}
    if fmt == "gguf" and "num_key_value_heads" in edit:
        pytest.skip("the test's GGUF writer cannot permute K rows for heads that do not divide")
    if fmt == "gguf":
        path = write_gguf(tmp_path / "m.gguf", cfg, w, "F32", tokenizer_vocab=gguf_tokenizer_fields(tiny_bpe_tokenizer()))
    else:
        path = write_hf_dir(tmp_path / "hf", TINY_CFG, w, tokenizer=tiny_bpe_tokenizer())
        (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()), **edit}))
    with pytest.raises(ValueError, match=msg):
        fastinfer.load(path)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", ".."])
def test_index_shards_stay_in_the_model_folder(tmp_path, shard):
    # an index entry with a path used to load a shard from outside the folder (path traversal)
    d = write_hf_dir(tmp_path / "hf", TINY_CFG, random_llama_weights(TINY_CFG), tokenizer=tiny_bpe_tokenizer(),
                     shards=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    (tmp_path / "outside.safetensors").write_bytes((d / index["weight_map"][first]).read_bytes())  # loadable
    index["weight_map"][first] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="is not a file name in"):
        fastinfer.load(d)


def test_index_without_a_weight_map(tmp_path):
    d = write_hf_dir(tmp_path / "hf", TINY_CFG, random_llama_weights(TINY_CFG), tokenizer=tiny_bpe_tokenizer(),
                     shards=2)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a", "b"]}))
    with pytest.raises(ValueError, match="expected a weight_map"):
        fastinfer.load(d)
