"""Hostile and damaged model files, one regression test per kind of damage: every one is refused
with one clear error naming the file (never a crash, a hang, a blow-up or a silently wrong model).

GGUF cases are made by parsing a valid tiny file with the fuzzer's own GGUF reader/writer
(tests/fuzz_models.py), changing one field, and writing it back.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import fastinfer
from fastinfer.weights.gguf_meta import open_gguf
from fuzz_models import pack_gguf, pack_st, parse_gguf, parse_st
from tiny_models import (TINY_CFG, gguf_tokenizer_fields, random_llama_weights, tiny_bpe_tokenizer, write_gguf,
                         write_hf_dir)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    d = tmp_path_factory.mktemp("seeds")
    w = random_llama_weights(TINY_CFG)
    vocab = gguf_tokenizer_fields(tiny_bpe_tokenizer())
    return {t: write_gguf(d / f"{t}.gguf", TINY_CFG, w, t, tokenizer_vocab=vocab).read_bytes()
            for t in ("F32", "Q8_0")} | {"hf": write_hf_dir(d / "hf", TINY_CFG, w, tokenizer=tiny_bpe_tokenizer())}


def _gguf(tmp_path, seed: bytes, edit) -> str:
    g = parse_gguf(seed)
    edit(g)
    path = tmp_path / "bad.gguf"
    path.write_bytes(pack_gguf(g))
    return str(path)


def _refused(path, match: str):
    with pytest.raises(ValueError, match=match) as e:
        fastinfer.load(path, threads=1, n_ctx=16)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def _tensor(g, name: str) -> dict:
    return next(t for t in g["tensors"] if t["name"] == name.encode())


def _kv(g, key: str) -> dict:
    return next(e for e in g["kv"] if e["key"] == key.encode())


# -- a tensor's type must match its bytes ------------------------------------------------------
@pytest.mark.parametrize("seed,name,new_type", [
    ("Q8_0", "blk.0.ffn_down.weight", 2),   # Q8_0 data labelled Q4_0 (a gap follows it)
    ("Q8_0", "blk.0.ffn_down.weight", 3),   # ... labelled Q4_1
    ("F32", "blk.0.attn_q.weight", 1),      # F32 labelled F16
    ("F32", "output.weight", 30),           # F32 labelled BF16, the last tensor (bytes left over)
    ("Q8_0", "blk.1.attn_k.weight", 0),     # labelled F32: runs into the next tensor
])
def test_type_that_does_not_match_the_bytes(tmp_path, seeds, seed, name, new_type):
    def edit(g):
        _tensor(g, name)["type"] = new_type
    _refused(_gguf(tmp_path, seeds[seed], edit), r"belong to no tensor|overlaps|runs past")


@pytest.mark.parametrize("delta", [-32, 32, 1 << 40])
def test_overlapping_or_outside_offsets(tmp_path, seeds, delta):
    def edit(g):
        _tensor(g, "blk.1.attn_v.weight")["offset"] += delta
    _refused(_gguf(tmp_path, seeds["Q8_0"], edit), r"overlaps|belong to no tensor|runs past")


def test_tensor_count_one_short(tmp_path, seeds):
    def edit(g):
        g["n_tensors"] = len(g["tensors"]) - 1
    _refused(_gguf(tmp_path, seeds["Q8_0"], edit), r"not padding|belong to no tensor|lacks")


def test_duplicate_tensor_name(tmp_path, seeds):
    def edit(g):
        _tensor(g, "blk.1.attn_q.weight")["name"] = b"blk.0.attn_q.weight"
    _refused(_gguf(tmp_path, seeds["Q8_0"], edit), r"tensor blk.0.attn_q.weight appears twice")


def test_missing_tensor(tmp_path, seeds):
    def edit(g):
        t = _tensor(g, "blk.2.ffn_up.weight")
        t["name"] = b"blk.2.ffn_up.weightX"
    _refused(_gguf(tmp_path, seeds["Q8_0"], edit), r"unexpected tensor")


@pytest.mark.parametrize("name,dims", [("blk.1.attn_norm.weight", [63]), ("output_norm.weight", [64, 1]),
                                       ("blk.0.attn_norm.weight", [32, 2])])
def test_norm_whose_shape_disagrees_with_the_config(tmp_path, seeds, name, dims):
    def edit(g):
        _tensor(g, name)["dims"] = dims
    _refused(_gguf(tmp_path, seeds["F32"], edit), r"has shape|belong to no tensor|dimensions")


def test_norm_and_matrix_swapped(tmp_path, seeds):
    def edit(g):
        a, b = _tensor(g, "blk.0.attn_norm.weight"), _tensor(g, "blk.0.attn_q.weight")
        a["name"], b["name"] = b["name"], a["name"]
    _refused(_gguf(tmp_path, seeds["F32"], edit), r"is a ndarray; expected a weight matrix|has shape")


@pytest.mark.parametrize("key,value,match", [
    ("general.alignment", 0, r"general.alignment = 0; expected a power of two"),
    ("general.alignment", 48, r"general.alignment = 48; expected a power of two"),
    ("llama.rope.freq_base", float("nan"), r"rope_theta = nan"),
    ("llama.attention.layer_norm_rms_epsilon", 0.0, r"norm_eps = 0.0"),
])
def test_bad_metadata_values(tmp_path, seeds, key, value, match):
    def edit(g):
        if key == "general.alignment":  # absent from the seed: added
            g["kv"].append({"key": key.encode(), "type": 4, "value": value})
        else:
            _kv(g, key)["value"] = value
    _refused(_gguf(tmp_path, seeds["Q8_0"], edit), match)


def test_array_valued_count(tmp_path, seeds):
    def edit(g):
        e = _kv(g, "llama.block_count")
        e["type"], e["value"] = 9, [4, [3, 3]]  # an array of two uint32
    _refused(_gguf(tmp_path, seeds["Q8_0"], edit), r"llama.block_count = \[3, 3\]; expected an integer")


def test_partial_rope_is_refused(tmp_path, seeds):
    def edit(g):
        _kv(g, "llama.rope.dimension_count")["value"] = 8
    _refused(_gguf(tmp_path, seeds["Q8_0"], edit), r"rope.dimension_count = 8 differs from the head size 16")


def test_broken_bpe_vocabulary(tmp_path, seeds):
    def edit(g):
        merges = _kv(g, "tokenizer.ggml.merges")
        merges["value"][1][0] = b"nosuchtoken alsonot"
    _refused(_gguf(tmp_path, seeds["Q8_0"], edit), r"its tokenizer cannot be built")


def test_invalid_utf8_string(tmp_path, seeds):
    def edit(g):
        _kv(g, "general.name")["value"] = b"\xff\xfe"
    _refused(_gguf(tmp_path, seeds["Q8_0"], edit), r"is not UTF-8")


def test_invalid_utf8_in_a_string_array(tmp_path, seeds):
    def edit(g):
        _kv(g, "tokenizer.ggml.tokens")["value"][1][7] = b"ab\xff"
    _refused(_gguf(tmp_path, seeds["Q8_0"], edit), r"the string at byte \d+ is not UTF-8")


def test_string_in_an_array_longer_than_the_file(tmp_path, seeds):
    b = bytearray(pack_gguf(parse_gguf(seeds["Q8_0"])))
    key = b"tokenizer.ggml.tokens"
    at = b.index(key) + len(key) + 4 + 4 + 8  # past the key, its type, the element type and the count
    at += 8 + int.from_bytes(b[at:at + 8], "little")  # past the first token: the second's length
    b[at:at + 8] = (len(b) * 2).to_bytes(8, "little")
    path = tmp_path / "long.gguf"
    path.write_bytes(bytes(b))
    _refused(str(path), r"a string of \d+ bytes at byte \d+ runs past the end of the file")


def test_huge_string_array_count_is_refused_before_reading(tmp_path, seeds):
    def edit(g):
        _kv(g, "tokenizer.ggml.merges")["count"] = 1 << 40
    _refused(_gguf(tmp_path, seeds["Q8_0"], edit), r"an array of 1099511627776 strings")


def test_big_numeric_metadata_array_costs_its_bytes(tmp_path, seeds):
    # 8 MB of uint8 metadata cost ~9x its size as a list of Python ints (64 MB: 700-850 MB)
    n, key = 8 << 20, b"junk.array"
    g = parse_gguf(seeds["Q8_0"])
    g["kv"].insert(0, {"key": key, "type": 9, "value": [0, []], "count": n})  # the header says n items
    b = pack_gguf(g)
    at = 24 + 8 + len(key) + 4 + 4 + 8  # after the file header and this key's name, type and count
    path = tmp_path / "big.gguf"
    path.write_bytes(b[:at] + bytes(n) + b[at:])  # n is a multiple of the alignment: the data stays aligned
    tracemalloc.start()
    f = open_gguf(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert isinstance(f.metadata["junk.array"], np.ndarray) and f.metadata["junk.array"].size == n
    assert peak < 2 * n, f"reading {n} bytes of metadata took {peak} bytes"


# -- safetensors and HF folders ---------------------------------------------------------------
def _edit_st(d, edit):
    f = d / "model.safetensors"
    s = parse_st(f.read_bytes())
    edit(s)
    f.write_bytes(pack_st(s))


@pytest.mark.parametrize("offsets", [[-512, -256], [0, 256], [10 ** 12, 10 ** 12 + 256]])
def test_safetensors_offsets_outside_or_overlapping(tmp_path, seeds, offsets):
    d = shutil.copytree(seeds["hf"], tmp_path / "hf")

    def edit(s):
        entry = next(v for k, v in s["entries"] if k == "model.norm.weight")
        entry["data_offsets"] = offsets
    _edit_st(d, edit)
    _refused(d, r"data_offsets|starts at byte|ends at byte")


def test_safetensors_duplicate_key(tmp_path, seeds):
    d = shutil.copytree(seeds["hf"], tmp_path / "hf")

    def edit(s):
        s["entries"].append(list(s["entries"][1]))
    _edit_st(d, edit)
    _refused(d, r"appears twice")


def test_untied_head_must_be_present(tmp_path, seeds):
    d = shutil.copytree(seeds["hf"], tmp_path / "hf")
    f = d / "model.safetensors"  # the head dropped, the other tensors' data still tiling the file
    s = parse_st(f.read_bytes())
    keep = [[k, v] for k, v in s["entries"] if k != "lm_head.weight"]
    data, pos = b"", 0
    for k, v in sorted(keep, key=lambda kv: kv[1]["data_offsets"][0]):
        a, b = v["data_offsets"]
        data += s["data"][a:b]
        v["data_offsets"] = [pos, pos + b - a]
        pos += b - a
    f.write_bytes(pack_st({"entries": keep, "meta": s["meta"], "data": data}))
    _refused(d, r"lacks lm_head.weight")


def test_missing_rope_scaling_factor(tmp_path, seeds):
    d = shutil.copytree(seeds["hf"], tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "llama3", "low_freq_factor": 1.0}
    (d / "config.json").write_text(json.dumps(cfg))
    _refused(d, r"RoPE scaling factor = None")


@pytest.mark.parametrize("key,value", [("num_attention_heads", "4"), ("hidden_size", [64]), ("vocab_size", 300.5),
                                       ("num_hidden_layers", True)])
def test_config_value_of_the_wrong_type(tmp_path, seeds, key, value):
    d = shutil.copytree(seeds["hf"], tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    _refused(d, rf"{key} = .*; expected an integer")


# -- converted checkpoints --------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(seeds, tmp_path_factory):
    from fastinfer.convert import convert
    out = tmp_path_factory.mktemp("conv") / "int8"
    convert(seeds["hf"], out, "int8", progress=False)
    return out


def _edit_converted(tmp_path, converted, edit_arrays=None, edit_config=None):

    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    d = shutil.copytree(converted, tmp_path / "conv")
    if edit_arrays:
        arrays = load_file(str(d / "model.safetensors"))
        with safe_open(str(d / "model.safetensors"), "np") as f:
            meta = f.metadata()
        edit_arrays(arrays, meta)
        save_file(arrays, str(d / "model.safetensors"), metadata=meta)
    if edit_config:
        info = json.loads((d / "config.json").read_text())
        edit_config(info)
        (d / "config.json").write_text(json.dumps(info))
    return d


def test_converted_scale_of_another_dtype(tmp_path, converted):
    # was: a new Numba compile (minutes) for the unexpected f64 type
    def edit(a, meta):
        a["w2.s"] = a["w2.s"].astype(np.float64)
    _refused(_edit_converted(tmp_path, converted, edit), r"w2 \(Q8_0\) has s float64")


def test_converted_truncated_array(tmp_path, converted):
    def edit(a, meta):
        a["wo.q"] = a["wo.q"][:, :-1]
    _refused(_edit_converted(tmp_path, converted, edit), r"wo \(Q8_0\) has q uint8")


def test_converted_missing_array(tmp_path, converted):
    def edit(a, meta):
        del a["wqkv.s"]
    _refused(_edit_converted(tmp_path, converted, edit), r"wqkv \(Q8_0\) has s float32 \(0, 0, 0\)")


def test_converted_two_dimensional_norm(tmp_path, converted):
    # was: a Numba TypingError
    def edit(a, meta):
        a["norm"] = np.stack([a["norm"], a["norm"]])
    _refused(_edit_converted(tmp_path, converted, edit), r"the final norm has shape \(2, 64\)")


def test_converted_matrix_without_its_format(tmp_path, converted):
    def edit(a, meta):
        del meta["output.kind"]
    _refused(_edit_converted(tmp_path, converted, edit), r"output\.[qsmf] belongs to no weight matrix")


@pytest.mark.parametrize("edit,match", [
    (lambda i: i["config"].pop("norm_eps"), r"lacks \['norm_eps'\]"),
    (lambda i: i["config"].pop("arch"), r"lacks arch"),
    (lambda i: i["config"].update(arch=5), r"unsupported architecture 5"),
    (lambda i: i["config"].update(head_dim=15), r"head_dim must be even"),
    (lambda i: i.update(eos_ids=31), r"eos_ids must be a list"),
])
def test_converted_config_damage(tmp_path, converted, edit, match):
    _refused(_edit_converted(tmp_path, converted, edit_config=edit), match)


# -- no data lost, nothing left behind --------------------------------------------------------
def test_stale_scratch_of_a_killed_convert_is_removed(tmp_path, seeds):
    from fastinfer.convert import convert
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.tmp-{dead}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    alive = tmp_path / f".out.tmp-{os.getpid()}-abc"  # a live process's: not touched
    alive.mkdir()
    convert(seeds["hf"], tmp_path / "out", progress=False)
    assert not stale.exists() and alive.exists() and (tmp_path / "out" / "config.json").is_file()


def test_sigterm_during_convert_leaves_nothing(tmp_path, seeds):
    out = tmp_path / "out"
    code = f"""
import os, signal, time
from fastinfer import cli
from fastinfer.weights import converted
save = converted.save_file
def save_then_terminated(*a, **k):
    save(*a, **k)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
converted.save_file = save_then_terminated
raise SystemExit(cli.main(["convert", {str(seeds["hf"])!r}, "-o", {str(out)!r}, "--dtype", "int8"]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


# -- chat templates ---------------------------------------------------------------------------
@pytest.mark.parametrize("template,match", [
    ("{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}", r"range of 99999"),
    ("{% for i in range(60000) %}{% for j in range(60000) %}{% endfor %}{% endfor %}", r"took over 2 s"),
    ("{{ 'x' * 10**10 }}", r"a value of 10000000000 items"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
     r"a value of 2097152 items"),
    ("{{ 'x'|center(1000000000) }}", r"a filter argument"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", r"recurses"),
    ("{{ messages.__class__.__mro__ }}", r"unsafe"),
])
def test_chat_template_is_bounded(template, match):
    from fastinfer.chat_template import render
    with pytest.raises(ValueError, match=match):
        render(template, messages=[{"role": "user", "content": "hi"}])


# -- API arguments ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(seeds, tmp_path_factory):
    p = tmp_path_factory.mktemp("m") / "m.gguf"
    p.write_bytes(seeds["Q8_0"])
    return fastinfer.load(p, threads=1, n_ctx=32)


@pytest.mark.parametrize("call,match", [
    (lambda m: m.generate(5), r"prompt must be a str"),
    (lambda m: m.generate(None), r"prompt must be a str"),
    (lambda m: m.generate("hi", max_new_tokens="5"), r"max_new_tokens must be an integer"),
    (lambda m: m.generate("hi", temperature="hot"), r"temperature must be a number"),
    (lambda m: m.generate("hi", temperature=float("inf")), r"temperature must be a number"),
    (lambda m: m.generate("hi", top_p="x"), r"top_p must be a number"),
    (lambda m: m.generate("hi", min_p=[0.1]), r"min_p must be a number"),
    (lambda m: m.generate("hi", seed="x", temperature=1.0), r"seed must be a non-negative integer"),
    (lambda m: m.generate("hi", seed=1.5, temperature=1.0), r"seed must be a non-negative integer"),
    (lambda m: m.generate("hi", stop=5), r"stop must be a string or a list of strings"),
    (lambda m: m.generate("hi", max_length="9"), r"max_length must be an integer"),
    (lambda m: m.generate("hi", num_beams=2, length_penalty="x"), r"length_penalty must be a finite number"),
    (lambda m: m.encode(5), r"encode takes a str"),
    (lambda m: m.decode([-1]), r"outside the vocabulary"),
    (lambda m: m.decode("abc"), r"expected a sequence of token ids"),
    (lambda m: m.session(n_ctx="5"), r"n_ctx must be between"),
    (lambda m: m.chat([{"role": "user", "content": 5}]), r"messages must be a list"),
    (lambda m: fastinfer.load(5), r"source must be a path"),
    (lambda m: fastinfer.load(m.source, n_ctx="32"), r"n_ctx must be an integer"),
    (lambda m: fastinfer.load(m.source, kv_type={}), r"kv_type must be one of"),
])
def test_api_arguments_of_the_wrong_type(tiny_model, call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_model)
