"""Structure-aware mutation fuzzer for fastinfer's three model-file formats.

    python tests/fuzz_models.py --format gguf --cases 10000 --seed 1   # on demand: counts, time, cases/s
    python tests/fuzz_models.py --format all --cases 300                # gguf, hf and converted
    python tests/fuzz_models.py --replay /tmp/fuzz-findings/gguf/<class>/case-17.gguf
    FASTINFER_FUZZ_CASES=200 python -m pytest tests/test_fuzz.py -q     # CI: bounded, fails listing findings

Seeds are tiny Llama models (tests/tiny_models.py): GGUF files in F32, F16, Q8_0, Q4_0, Q4_1 (and tied /
llama3 variants), HF folders (single file and sharded), and `fastinfer convert` outputs (auto, int8,
int4). Each is parsed into its structure (GGUF header counts, key/values with their types, tensor
infos, alignment, data; a safetensors JSON header and data; config.json values), and a case is a
*plan*: one to three field mutations (counts, offsets, types, dims, config values, names, array
counts, string lengths, alignment) followed, sometimes, by raw byte flips or a truncation.

A persistent worker process (`--worker`) loads each case with `fastinfer.load(path, threads=1,
n_ctx=32, activations="f32", kv_type="f32")` and takes the logits of a fixed prompt; when the load is
accepted it also runs an independent reader plus the plain-NumPy forward of tests/reference.py on the
same file. The parent bounds each case's time and the worker's peak RSS, restarts the worker after a
crash, and judges (the oracle):

* an error is acceptable only as a ValueError or FileNotFoundError whose message is one line, names
  the case file or folder, and is not a traceback or a Numba typing error;
* an accepted load must give the reference's logits (max |diff| <= 1e-3 max|ref| + 1e-4) when they
  are finite; a file the reference reader refuses must be refused too ("accepted-ref-refused").

Failing cases are saved under --findings (default /tmp/fuzz-findings/<format>/<class>/), at most
MAX_SAVED per class, each with the plan and a one-line reason in reason.txt; `--replay` re-runs one.

Why Hypothesis rather than Atheris: Hypothesis is pure Python with wheels everywhere and runs inside
pytest with a fixed seed, and its strategies generate the structured plans directly. A plan is a
small value (one to three mutations), so a failing case is already close to minimal. Atheris needs libFuzzer and clang-instrumented
builds, and its coverage guidance would pay little here: the loaders' validation is flat (a list of
independent checks), which structure-aware mutation reaches without feedback.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
IDS = [5, 17, 42, 3, 250, 99, 7]  # the prompt (taken modulo the model's vocabulary)
MAX_SAVED = 20                    # cases saved per failure class
RSS_LIMIT = 1 << 30               # peak RSS growth over the warmed-up worker, bytes
FIRST_TIMEOUT, TIMEOUT = 600.0, 20.0  # seconds: the first case after a (re)start may compile the model graph


def _helpers_on_path() -> None:
    """Let the worker, started as a script, import the test helpers (tiny_models, reference)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


# ==============================================================================================
# GGUF: parse into fields, write back whatever the fields say
# ==============================================================================================

STR, ARR, BOOL = 8, 9, 7
_NUM = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}
# (elements, bytes) per block of each GGML type the seeds use (ggml-common.h): F32, F16, Q4_0, Q4_1,
# Q5_0, Q5_1, Q8_0, Q2_K .. Q6_K, BF16
GGML_SIZES = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 10: (256, 84),
              11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 30: (1, 2)}


def parse_gguf(b: bytes) -> dict:
    """bytes -> {"version", "kv": [entry], "tensors": [info], "data", "align"}: the seed's fields."""
    pos = 24
    version, nt, nkv = struct.unpack_from("<IQQ", b, 4)

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, b, pos)[0]
        pos += struct.calcsize("<" + fmt)
        return v

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return b[pos - n:pos]

    def value(t):
        if t == STR:
            return string()
        if t == ARR:
            et, n = take("I"), take("Q")
            return [et, [value(et) for _ in range(n)]]
        return take(_NUM[t])

    kv = []
    for _ in range(nkv):
        key = string()
        t = take("I")
        kv.append({"key": key, "type": t, "value": value(t)})
    tensors = []
    for _ in range(nt):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        ttype, off = take("I"), take("Q")
        block, size = GGML_SIZES[ttype]
        tensors.append({"name": name, "dims": dims, "type": ttype, "offset": off,
                        "nbytes": math.prod(dims) // block * size})
    align = next((e["value"] for e in kv if e["key"] == b"general.alignment"), 32)
    start = -(-pos // align) * align
    return {"version": version, "kv": kv, "tensors": tensors, "data": b[start:], "align": align}


def _pack_num(t: int, v) -> bytes:
    fmt = _NUM.get(t, "Q")
    if fmt in "fd":
        import numpy as np
        with np.errstate(over="ignore"):
            return np.array(float(v), "<f4" if fmt == "f" else "<f8").tobytes()
    bits = struct.calcsize(fmt) * 8
    return struct.pack("<" + fmt.upper(), int(v) % (1 << bits))


def _pack_str(s: bytes, n: int | None = None) -> bytes:
    return struct.pack("<Q", (len(s) if n is None else n) % (1 << 64)) + s


def _pack_value(t: int, v, e: dict | None = None) -> bytes:
    e = e or {}
    if t == STR:
        return _pack_str(v, e.get("slen"))
    if t == ARR:
        et, items = v
        count = len(items) if e.get("count") is None else e["count"]
        head = struct.pack("<IQ", e.get("etag", et) % (1 << 32), count % (1 << 64))
        return head + b"".join(_pack_value(et, x) for x in items)
    return _pack_num(t, v)


def pack_gguf(g: dict) -> bytes:
    out = bytearray(b"GGUF")
    out += struct.pack("<I", g["version"] % (1 << 32))
    out += struct.pack("<QQ", g.get("n_tensors", len(g["tensors"])) % (1 << 64),
                       g.get("n_kv", len(g["kv"])) % (1 << 64))
    for e in g["kv"]:
        out += _pack_str(e["key"], e.get("klen"))
        out += struct.pack("<I", e.get("tag", e["type"]) % (1 << 32))
        out += _pack_value(e["type"], e["value"], e)
    for t in g["tensors"]:
        out += _pack_str(t["name"], t.get("nlen"))
        out += struct.pack("<I", t.get("ndims", len(t["dims"])) % (1 << 32))
        out += b"".join(struct.pack("<Q", d % (1 << 64)) for d in t["dims"])
        out += struct.pack("<IQ", t["type"] % (1 << 32), t["offset"] % (1 << 64))
    out += bytes(-len(out) % g["align"])
    return bytes(out) + g["data"]


def realign(g: dict, align: int) -> None:
    """A valid re-layout with another general.alignment (the seed's tensor data moved to match)."""
    blobs = [g["data"][t["offset"]:t["offset"] + t["nbytes"]] for t in g["tensors"]]
    data = bytearray()
    for t, blob in zip(g["tensors"], blobs):
        data += bytes(-len(data) % align)
        t["offset"] = len(data)
        data += blob
    g["data"], g["align"] = bytes(data), align
    g["kv"] = [e for e in g["kv"] if e["key"] != b"general.alignment"]
    g["kv"].append({"key": b"general.alignment", "type": 4, "value": align})


# ==============================================================================================
# safetensors and folders
# ==============================================================================================

def parse_st(b: bytes) -> dict:
    (n,) = struct.unpack_from("<Q", b)
    header = json.loads(b[8:8 + n])
    meta = header.pop("__metadata__", None)
    return {"entries": [[k, v] for k, v in header.items()], "meta": meta, "data": b[8 + n:]}


def pack_st(s: dict) -> bytes:
    items = ([["__metadata__", s["meta"]]] if s["meta"] is not None else []) + s["entries"]
    text = s.get("raw") or ("{" + ",".join(json.dumps(k) + ":" + json.dumps(v) for k, v in items) + "}").encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", s.get("hlen", len(text)) % (1 << 64)) + text + s["data"]


def read_folder(d: Path) -> dict:
    """A model folder as {file name: parsed JSON, parsed safetensors, or bytes}."""
    files = {}
    for f in sorted(d.iterdir()):
        b = f.read_bytes()
        if f.suffix == ".safetensors":
            files[f.name] = parse_st(b)
        elif f.name in ("config.json", "model.safetensors.index.json"):
            files[f.name] = json.loads(b)
        else:
            files[f.name] = b
    return files


def write_folder(files: dict, d: Path) -> None:
    d.mkdir()
    for name, v in files.items():
        if isinstance(v, bytes):
            b = v
        elif isinstance(v, dict) and "entries" in v:
            b = pack_st(v)
        else:
            b = json.dumps(v).encode()
        (d / name).write_bytes(b)


# ==============================================================================================
# seeds
# ==============================================================================================

def make_seeds(d: Path) -> dict:
    """{format: {seed name: structure}} for tiny models written into d."""
    _helpers_on_path()
    from tiny_models import (TINY_CFG, TINY_CFG_LLAMA3, TINY_CFG_TIED, gguf_tokenizer_fields,
                             random_llama_weights, tiny_bpe_tokenizer, write_gguf, write_hf_dir)
    d.mkdir(parents=True, exist_ok=True)
    tok = tiny_bpe_tokenizer()
    vocab = gguf_tokenizer_fields(tok)
    cfgs = {"base": TINY_CFG, "tied": TINY_CFG_TIED, "llama3": TINY_CFG_LLAMA3}
    gguf_seeds = [("F32", "base"), ("F16", "base"), ("Q8_0", "base"), ("Q4_0", "base"), ("Q4_1", "base"),
                  ("Q8_0", "tied"), ("F32", "llama3")]
    seeds: dict = {"gguf": {}, "hf": {}, "converted": {}}
    for ggml_type, c in gguf_seeds:
        p = write_gguf(d / f"{c}-{ggml_type}.gguf", cfgs[c], random_llama_weights(cfgs[c], seed=0), ggml_type,
                       tokenizer_vocab=vocab)
        seeds["gguf"][p.stem] = parse_gguf(p.read_bytes())
    hf_seeds = [("base", "float32", 1), ("base", "float16", 1), ("tied", "float32", 2), ("llama3", "float32", 1)]
    for c, dtype, shards in hf_seeds:
        p = write_hf_dir(d / f"hf-{c}-{dtype}-{shards}", cfgs[c], random_llama_weights(cfgs[c], seed=0),
                         tokenizer=tok, dtype=dtype, shards=shards)
        seeds["hf"][p.name] = read_folder(p)

    from fastinfer.convert import convert
    for src, dtype in (("hf-base-float32-1", "auto"), ("hf-base-float32-1", "int8"),
                       ("hf-llama3-float32-1", "int4"), ("tied-Q8_0.gguf", "auto"), ("base-Q4_0.gguf", "auto")):
        out = d / f"conv-{Path(src).stem}-{dtype}"
        convert(d / src, out, dtype, progress=False)
        seeds["converted"][out.name] = read_folder(out)
    return seeds


# ==============================================================================================
# mutations: a plan is a list of (op, args...) tuples; indices are taken modulo what exists
# ==============================================================================================

NAN, INF = float("nan"), float("inf")
ODD_INTS = [0, -1, 1, 2, 3, 7, 31, 33, 63, 64, 65, 255, 300, 2**16, 2**31 - 1, 2**31, 2**32, 2**32 + 64,
            2**62, 2**63 - 1, 2**63, 2**64 - 1, -2**31, -2**63]
ODD_VALUES = ODD_INTS + [0.0, -0.0, 0.5, 1e-30, 1e300, 64.0, 64.5, NAN, INF, -INF, "64", "", "llama", "x" * 300,
                         [], [64], [1, 2], {}, {"rope_type": "llama3"}, {"rope_type": "linear", "factor": 0},
                         {"rope_type": "yarn"}, {"type": "linear", "factor": NAN}, True, False, None]
GGUF_KEYS = [b"general.alignment", b"general.architecture", b"llama.block_count", b"llama.context_length",
             b"llama.embedding_length", b"llama.feed_forward_length", b"llama.attention.head_count",
             b"llama.attention.head_count_kv", b"llama.attention.key_length", b"llama.rope.dimension_count",
             b"llama.rope.freq_base", b"llama.attention.layer_norm_rms_epsilon", b"llama.vocab_size",
             b"llama.rope.scaling.type", b"llama.rope.scaling.factor", b"tokenizer.ggml.model",
             b"tokenizer.ggml.tokens", b"tokenizer.ggml.merges", b"tokenizer.ggml.token_type",
             b"tokenizer.ggml.bos_token_id", b"tokenizer.ggml.eos_token_id", b"tokenizer.ggml.eot_token_id",
             b"tokenizer.ggml.add_bos_token", b"tokenizer.chat_template", b"tokenizer.ggml.pre"]
TENSOR_NAMES = [b"token_embd.weight", b"output.weight", b"output_norm.weight", b"rope_freqs.weight",
                b"blk.0.attn_q.weight", b"blk.0.attn_q.bias", b"blk.3.attn_q.weight", b"blk.99999999999.ffn_up.weight",
                b"blk.-1.attn_k.weight", b"blk.x.attn_v.weight", b"blk.0.attn_norm.weight", b"blk.0.unknown.weight",
                b"blk.0", b"", b"\xff\xfe.weight"]
GGML_TYPE_IDS = [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 14, 16, 30, 31, 39, 99, 2**31]
HF_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
           "rope_scaling", "tie_word_embeddings", "model_type", "sliding_window", "use_sliding_window",
           "max_window_layers", "bos_token_id", "eos_token_id", "attention_bias"]
CONV_KEYS = ["format", "format_version", "dtype", "config", "bos_id", "eos_ids"] + [
    "config." + k for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size",
                            "norm_eps", "rope_theta", "rope_scaling", "max_seq_len", "sliding_window",
                            "window_from_layer", "arch")]
ST_DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I8", "U8", "BOOL", "C64", "F8_E4M3", "XYZ", 5, None]
KINDS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "", 3]
ST_NAMES = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_proj.bias", "model.layers.3.mlp.up_proj.weight",
            "model.layers.99999999999999999999.mlp.up_proj.weight", "model.layers.0.foo.weight",
            "wqkv.q", "wqkv.s", "wqkv.f", "w13.q", "output.q", "tok_embeddings.f", "bqkv", "norm", "x.q", "", "__metadata__"]


def _int_like(n: int, how: int) -> int:
    return [n + 1, n - 1, 0, 2**31, 2**32 + n, 2**63, 2**64 - 1, n * 2, 1, n + 2**16][how % 10]


def _dims(dims: list, how: int, k: int) -> list:
    d = list(dims)
    i = k % len(d) if d else 0
    if how == 0 and len(d) > 1:
        d[0], d[1] = d[1], d[0]
    elif how == 1 and d:
        d[i] += 1
    elif how == 2 and d:
        d[i] -= 1
    elif how == 3 and d:
        d[i] = 0
    elif how == 4 and d:
        d[i] = [2**32, 2**31, 2**62, 2**64 - 1, 2**40][k % 5]
    elif how == 5:
        d.append([1, 2, 3][k % 3])
    elif how == 6 and d:
        d.pop()
    elif how == 7 and d:
        d[i] = -1
    elif how == 8 and d:
        d[i] *= 2
    return d


def mutate_gguf(g: dict, op: tuple) -> None:
    kind, a = op[0], op[1:]
    kv, ts = g["kv"], g["tensors"]
    e = kv[a[0] % len(kv)] if kv and a and isinstance(a[0], int) else None
    t = ts[a[0] % len(ts)] if ts and a and isinstance(a[0], int) else None
    if kind == "n_kv":
        g["n_kv"] = _int_like(len(kv), a[0])
    elif kind == "n_tensors":
        g["n_tensors"] = _int_like(len(ts), a[0])
    elif kind == "version":
        g["version"] = a[0]
    elif kind == "kv_value":  # (index or key, (type, value))
        vt, v = a[1]
        key = a[0] if isinstance(a[0], bytes) else e["key"]
        g["kv"] = [x for x in kv if x["key"] != key] + [{"key": key, "type": vt, "value": v}]
    elif kind == "kv_tag":  # the type id written, the value bytes kept
        e["tag"] = a[1]
    elif kind == "kv_delete":
        kv.remove(e)
    elif kind == "kv_dup":
        kv.append(copy.deepcopy(e))
    elif kind == "kv_rename":
        e["key"] = a[1]
    elif kind == "klen":
        e["klen"] = _int_like(len(e["key"]), a[1])
    elif kind == "slen":  # a string value's (or a string array's first item's) length field
        strs = [x for x in kv if x["type"] == STR]
        if strs:
            x = strs[a[0] % len(strs)]
            x["slen"] = _int_like(len(x["value"]), a[1])
    elif kind in ("array_count", "array_etype"):
        arrs = [x for x in kv if x["type"] == ARR]
        if arrs:
            x = arrs[a[0] % len(arrs)]
            if kind == "array_count":
                x["count"] = _int_like(len(x["value"][1]), a[1])
            else:
                x["etag"] = a[1]
    elif kind == "align":  # (value, relayout)
        if a[1] and 1 <= a[0] <= 4096:
            realign(g, a[0])
        else:
            g["kv"] = [x for x in kv if x["key"] != b"general.alignment"]
            g["kv"].append({"key": b"general.alignment", "type": 4, "value": a[0]})
    elif kind == "t_dims":
        t["dims"] = _dims(t["dims"], a[1], a[2])
    elif kind == "t_ndims":
        t["ndims"] = [0, 1, 3, 4, 2**31, 2**32 - 1][a[1] % 6]
    elif kind == "t_type":
        t["type"] = a[1]
    elif kind == "t_offset":
        other = ts[a[2] % len(ts)]["offset"]
        t["offset"] = [-32, -1, len(g["data"]), len(g["data"]) - 1, other, t["offset"] + 1, t["offset"] + 2,
                       t["offset"] + 32, 2**63, 0][a[1] % 10]
    elif kind == "t_name":
        t["name"] = a[1] if isinstance(a[1], bytes) else ts[a[1] % len(ts)]["name"]
    elif kind == "nlen":
        t["nlen"] = _int_like(len(t["name"]), a[1])
    elif kind == "t_delete":
        ts.remove(t)
    elif kind == "t_dup":
        ts.append(dict(t))
    elif kind == "t_swap":  # two tensors trade names: each other's shapes and types under the name
        u = ts[a[1] % len(ts)]
        t["name"], u["name"] = u["name"], t["name"]
    elif kind == "t_extra":  # (name, dims, type)
        blob = bytes(math.prod(a[1]) * 4 % (1 << 20))
        g["data"] += bytes(-len(g["data"]) % 32)
        ts.append({"name": a[0], "dims": list(a[1]), "type": a[2], "offset": len(g["data"])})
        g["data"] += blob
    elif kind == "poison":  # (tensor, pattern, block): inf/nan/huge into a value or a block scale
        # f16 inf, nan, -inf, 65504; f32 nan, inf. (No huge finite f32: the reference's float64
        # would keep what fastinfer's float32 rightly overflows.)
        pat = [b"\x00\x7c", b"\x00\x7e", b"\x00\xfc", b"\xff\x7b", b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f"][a[1] % 6]
        block = GGML_SIZES.get(t["type"], (1, 4))[1]
        at = t["offset"] + (a[2] * block) % max(t.get("nbytes", 4), 4)
        d = bytearray(g["data"])
        d[at:at + len(pat)] = pat[:len(d) - at] if at < len(d) else b""
        g["data"] = bytes(d[:len(g["data"])])


def mutate_st(s: dict, op: tuple) -> None:
    kind, a = op[0], op[1:]
    es = s["entries"]
    e = es[a[0] % len(es)] if es and a and isinstance(a[0], int) else None
    if e is None and kind not in ("st_hlen", "st_raw", "st_meta", "st_extra"):
        return
    if kind == "st_dtype":
        e[1]["dtype"] = a[1]
    elif kind == "st_shape":
        how = a[1] % 12
        shape = e[1].get("shape")
        if how < 9 and isinstance(shape, list):
            e[1]["shape"] = _dims(shape, how, a[2])
        else:
            e[1]["shape"] = ["64", None, 64.0][how - 9]
    elif kind == "st_offsets":
        lo, hi = e[1]["data_offsets"] if isinstance(e[1].get("data_offsets"), list) and len(e[1]["data_offsets"]) == 2 else (0, 0)
        o = es[a[2] % len(es)][1].get("data_offsets")
        n = len(s["data"])
        e[1]["data_offsets"] = [[-4, hi], [hi, lo], [lo, n + 4], [lo + 1, hi + 1], [lo + 2, hi], [lo, hi - 1],
                                [lo, hi + 4], o, [lo], [lo, hi, 0], "0,4", [float(lo), float(hi)], [lo, 2**64],
                                [2**63, 2**63 + 4], [0, 0], [n, n]][a[1] % 16]
    elif kind == "st_name":
        e[0] = a[1] if isinstance(a[1], str) else es[a[1] % len(es)][0]  # an existing name: a duplicate key
    elif kind == "st_delete":
        es.remove(e)
    elif kind == "st_dup":
        es.append(copy.deepcopy(e))
    elif kind == "st_extra":  # (name, dtype, shape)
        b = len(s["data"])
        es.append([a[1], {"dtype": "F32", "shape": list(a[2]), "data_offsets": [b, b + 4 * math.prod(a[2])]}])
        s["data"] += bytes(4 * math.prod(a[2]))
    elif kind == "st_field":  # drop or retype a field of one entry
        field = ["dtype", "shape", "data_offsets"][a[1] % 3]
        if a[2] % 3 == 0:
            e[1].pop(field, None)
        else:
            e[1][field] = [None, "x", {}, 7][a[2] % 4]
        if a[2] % 7 == 6:
            e[1] = [1, 2]  # not an object at all
    elif kind == "st_hlen":
        s["hlen"] = _int_like(len(pack_st(s)) - 8 - len(s["data"]), a[0])
    elif kind == "st_raw":
        s["raw"] = [b"[]", b"{", b"{\"a\": NaN}", b"\xff\xfe", b"null", b"{}", b"{\"__metadata__\": 5}"][a[0] % 7]
    elif kind == "st_meta":  # (key, value) into __metadata__; key None: the whole of it
        if a[0] is None:
            s["meta"] = a[1]
        else:
            s["meta"] = dict(s["meta"] or {})
            if a[1] is None:
                s["meta"].pop(a[0], None)
            else:
                s["meta"][a[0]] = a[1]
    elif kind == "poison":
        lo = e[1]["data_offsets"][0] if isinstance(e[1].get("data_offsets"), list) else 0
        pat = [b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x7c", b"\x00\xfc"][a[1] % 4]
        at = lo + 4 * (a[2] % 64)
        d = bytearray(s["data"])
        d[at:at + len(pat)] = pat
        s["data"] = bytes(d[:len(s["data"])])


def _set_path(obj, path: list, value):
    for k in path[:-1]:
        obj = obj.setdefault(k, {}) if isinstance(obj, dict) else {}
    if isinstance(obj, dict):
        if value is _DELETE:
            obj.pop(path[-1], None)
        else:
            obj[path[-1]] = value


_DELETE = object()


def mutate_folder(files: dict, op: tuple) -> None:
    kind, a = op[0], op[1:]
    sts = sorted(n for n, v in files.items() if isinstance(v, dict) and "entries" in v)
    if kind in ("cfg_set", "cfg_del"):
        if isinstance(files.get("config.json"), dict):
            _set_path(files["config.json"], a[0].split("."), _DELETE if kind == "cfg_del" else a[1])
    elif kind == "cfg_raw":
        files["config.json"] = [b"", b"[1, 2]", b"{", b"\xff\xfe{}", b"{\"model_type\": \"llama\"}", b"null",
                                b"{\"format\": \"fastinfer\"}", b"{\"format\": \"fastinfer\", \"format_version\": 2}"][a[0] % 8]
    elif kind == "rm":
        names = sorted(files)
        files.pop(names[a[0] % len(names)], None)
    elif kind == "raw_file":  # replace a non-weight file's bytes
        names = sorted(n for n in files if n not in sts)
        if names:
            n = names[a[0] % len(names)]
            files[n] = [b"", b"{", b"\xff", b"{}", b"[]", b"null"][a[1] % 6]
    elif kind == "index":  # sharded folders: the weight_map
        idx = files.get("model.safetensors.index.json")
        if isinstance(idx, dict) and isinstance(idx.get("weight_map"), dict):
            wm = idx["weight_map"]
            keys = sorted(wm)
            k = keys[a[0] % len(keys)] if keys else "x"
            how = a[1] % 7
            if how == 0:
                wm[k] = "missing.safetensors"
            elif how == 1:
                wm[k] = 5
            elif how == 2:
                wm[k] = "../model-00001-of-00002.safetensors"
            elif how == 3:
                idx["weight_map"] = [1, 2]
            elif how == 4:
                wm.pop(k)
            elif how == 5:
                wm[k] = sorted(set(wm.values()))[0]
            else:
                wm["model.layers.7.mlp.up_proj.weight"] = sorted(set(wm.values()))[0]
    elif sts:
        mutate_st(files[sts[op[-1] % len(sts)]], op[:-1])


def apply_bytes(b: bytes, op: tuple) -> bytes:
    """Byte-level ops on a serialized file: (flip, where 0..1, xor), (truncate, where 0..1), (cut, n)."""
    if not b:
        return b
    if op[0] == "flip":
        i = min(int(op[1] * len(b)), len(b) - 1)
        return b[:i] + bytes([b[i] ^ op[2]]) + b[i + 1:]
    if op[0] == "truncate":
        return b[:int(op[1] * len(b))]
    if op[0] == "cut":  # a few bytes off the end: the last tensor short
        return b[:max(len(b) - op[1], 0)]
    return b


# -- Hypothesis strategies --------------------------------------------------------------------

def strategies():
    """{format: strategy of (seed index, plan)}."""
    from hypothesis import strategies as st
    I = st.integers(0, 1 << 16)  # noqa: E741 (an index, taken modulo what exists)
    odd = st.sampled_from(ODD_VALUES) | st.integers() | st.floats() | st.text(max_size=8)
    odd_int = st.sampled_from(ODD_INTS) | st.integers(-2**64, 2**64)
    gv = st.one_of(  # a GGUF typed value
        st.tuples(st.sampled_from([0, 1, 2, 3, 4, 5, 10, 11]), odd_int),
        st.tuples(st.sampled_from([6, 12]), st.sampled_from([NAN, INF, -INF, 0.0, -1.0, 1e-5, 1e30, 1e300, 64.0]) | st.floats()),
        st.tuples(st.just(BOOL), st.sampled_from([0, 1, 2, 255])),
        st.tuples(st.just(STR), st.sampled_from([b"", b"llama", b"gpt2", b"linear", b"yarn", b"\xff\xfe", b"mamba"]) | st.binary(max_size=8)),
        st.tuples(st.just(ARR), st.tuples(st.sampled_from([4, 6, 8, 9]), st.lists(st.just(1), max_size=3)).map(
            lambda x: [x[0], [b"a" if x[0] == 8 else [4, [1]] if x[0] == 9 else v for v in x[1]]])),
        st.tuples(st.just(99), st.just(0)))
    gkey = st.sampled_from(GGUF_KEYS) | st.binary(max_size=12)
    dims = st.lists(st.sampled_from([0, 1, 2, 32, 64, 96, 300, 2**32, 2**62]), min_size=0, max_size=4)
    gguf_ops = st.one_of(
        st.tuples(st.just("n_kv"), I), st.tuples(st.just("n_tensors"), I),
        st.tuples(st.just("version"), st.sampled_from([0, 1, 2, 4, 2**31, 2**32 - 1])),
        st.tuples(st.just("kv_value"), I | gkey, gv), st.tuples(st.just("kv_value"), gkey, gv),
        st.tuples(st.just("kv_tag"), I, st.sampled_from([0, 4, 6, 7, 8, 9, 10, 12, 13, 2**31])),
        st.tuples(st.just("kv_delete"), I), st.tuples(st.just("kv_dup"), I),
        st.tuples(st.just("kv_rename"), I, gkey), st.tuples(st.just("klen"), I, I),
        st.tuples(st.just("slen"), I, I), st.tuples(st.just("array_count"), I, I),
        st.tuples(st.just("array_etype"), I, st.sampled_from([0, 4, 6, 7, 8, 9, 12, 13, 2**31])),
        st.tuples(st.just("align"), st.sampled_from([0, 1, 2, 3, 7, 8, 16, 64, 4096, 2**31, 2**32 - 1]), st.booleans()),
        st.tuples(st.just("t_dims"), I, st.integers(0, 8), I), st.tuples(st.just("t_ndims"), I, I),
        st.tuples(st.just("t_type"), I, st.sampled_from(GGML_TYPE_IDS)),
        st.tuples(st.just("t_offset"), I, I, I),
        st.tuples(st.just("t_name"), I, I | st.sampled_from(TENSOR_NAMES)), st.tuples(st.just("nlen"), I, I),
        st.tuples(st.just("t_delete"), I), st.tuples(st.just("t_dup"), I), st.tuples(st.just("t_swap"), I, I),
        st.tuples(st.just("t_extra"), st.sampled_from(TENSOR_NAMES), dims, st.sampled_from([0, 1, 8])),
        st.tuples(st.just("poison"), I, I, I))
    st_ops = st.one_of(
        st.tuples(st.just("st_dtype"), I, st.sampled_from(ST_DTYPES)),
        st.tuples(st.just("st_shape"), I, I, I), st.tuples(st.just("st_offsets"), I, I, I),
        st.tuples(st.just("st_name"), I, I | st.sampled_from(ST_NAMES)),
        st.tuples(st.just("st_delete"), I), st.tuples(st.just("st_dup"), I),
        st.tuples(st.just("st_extra"), st.sampled_from(ST_NAMES), st.lists(st.sampled_from([0, 1, 2, 64, 96]), max_size=3)),
        st.tuples(st.just("st_field"), I, I, I), st.tuples(st.just("st_hlen"), I), st.tuples(st.just("st_raw"), I),
        st.tuples(st.just("poison"), I, I, I)).flatmap(lambda op: st.tuples(*map(st.just, op), I))  # + which file
    meta_key = st.tuples(st.sampled_from(["wqkv", "wo", "w13", "w2", "tok_embeddings", "output", "x"]),
                         st.sampled_from([".kind", ".shape", ".alias"])).map("".join)
    meta_val = st.sampled_from(KINDS[:-1] + ["64,64", "288,64", "192,64", "a,b", "1,2,3", "-1,64", "0,64", "",
                                            "4294967296,64", "64", "wqkv", "tok_embeddings", "output", "nope", None])
    folder_common = [st.tuples(st.just("cfg_raw"), I), st.tuples(st.just("rm"), I), st.tuples(st.just("raw_file"), I, I)]
    hf_ops = st.one_of(st.tuples(st.just("cfg_set"), st.sampled_from(HF_KEYS), odd),
                       st.tuples(st.just("cfg_del"), st.sampled_from(HF_KEYS)),
                       st.tuples(st.just("index"), I, I), st_ops, *folder_common)
    conv_ops = st.one_of(st.tuples(st.just("cfg_set"), st.sampled_from(CONV_KEYS), odd),
                         st.tuples(st.just("cfg_del"), st.sampled_from(CONV_KEYS)),
                         st.tuples(st.just("st_meta"), meta_key, meta_val, st.just(0)),
                         st.tuples(st.just("st_meta"), st.none(), st.sampled_from([None, 5, [], {"x": 1}]), st.just(0)),
                         st_ops, *folder_common)
    byte_ops = st.one_of(st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
                         st.tuples(st.just("truncate"), st.floats(0, 1)),
                         st.tuples(st.just("cut"), st.integers(1, 64)))

    def plan(ops, files=False):
        b = byte_ops.flatmap(lambda op: st.tuples(*map(st.just, op), I)) if files else byte_ops
        return st.tuples(I, st.lists(ops, min_size=1, max_size=3),
                         st.lists(b, max_size=1) | st.just([]))
    return {"gguf": plan(gguf_ops), "hf": plan(hf_ops, True), "converted": plan(conv_ops, True)}


def build_case(fmt: str, seeds: dict, plan: tuple, path: Path) -> Path:
    """Write the case `plan` describes (seed index, field ops, byte ops) to path; returns it."""
    names = sorted(seeds[fmt])
    seed_i, ops, byte_ops = plan
    s = copy.deepcopy(seeds[fmt][names[seed_i % len(names)]])
    if fmt == "gguf":
        for op in ops:
            try:
                mutate_gguf(s, op)
            except (IndexError, ValueError, TypeError, KeyError, ZeroDivisionError):
                pass  # an op that does not apply to this seed
        b = pack_gguf(s)
        for op in byte_ops:
            b = apply_bytes(b, op)
        path.write_bytes(b)
        return path
    for op in ops:
        try:
            mutate_folder(s, op)
        except (IndexError, ValueError, TypeError, KeyError, ZeroDivisionError, AttributeError):
            pass
    write_folder(s, path)
    for op in byte_ops:  # on one of the folder's files
        files = sorted(path.iterdir())
        if files:
            f = files[op[-1] % len(files)]
            f.write_bytes(apply_bytes(f.read_bytes(), op[:-1]))
    return path


def describe(fmt: str, seeds: dict, plan: tuple) -> str:
    names = sorted(seeds[fmt])
    return f"seed {names[plan[0] % len(names)]}: {plan[1]!r}" + (f" then bytes {plan[2]!r}" if plan[2] else "")


# ==============================================================================================
# the worker: load, forward, reference
# ==============================================================================================

def _where(tb) -> str:
    """The innermost frame in fastinfer's own code (fastinfer/, kernels/, weights/), and the innermost."""
    import traceback
    frames = traceback.extract_tb(tb)
    own = [f for f in frames if f.filename.startswith(str(ROOT)) and "/tests/" not in f.filename]
    pick = lambda f: f"{os.path.relpath(f.filename, ROOT) if f.filename.startswith(str(ROOT)) else Path(f.filename).name}:{f.lineno} {f.name}"  # noqa: E731
    out = pick(own[-1]) if own else "-"
    if frames and (not own or frames[-1] is not own[-1]):
        out += f" -> {pick(frames[-1])}"
    return out


def _reference_gguf(path: Path, ids):
    import reference
    return reference.llama_forward_gguf(path, ids)


def _st_arrays(f: Path) -> tuple[dict, dict]:
    """An independent safetensors read: the safetensors package (which validates the header),
    with bfloat16 (which numpy lacks) widened to float32 from the raw bytes."""
    import numpy as np
    from safetensors import safe_open
    out = {}
    with safe_open(str(f), "numpy") as h:
        meta = h.metadata() or {}
        bf16 = [k for k in h.keys() if h.get_slice(k).get_dtype() == "BF16"]
        for k in h.keys():
            if k not in bf16:
                out[k] = h.get_tensor(k)
    if bf16:
        raw = f.read_bytes()
        (n,) = struct.unpack_from("<Q", raw)
        header = json.loads(raw[8:8 + n])
        for k in bf16:
            lo, hi = header[k]["data_offsets"]
            bits = np.frombuffer(raw[8 + n + lo:8 + n + hi], "<u2").astype(np.uint32) << 16
            out[k] = bits.view(np.float32).reshape(header[k]["shape"])
    return out, meta


def _reference_hf(d: Path, ids):
    import numpy as np
    import reference
    cfg = json.loads((d / "config.json").read_text())
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted({d / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:  # fastinfer's documented fallback: model.safetensors, else every *.safetensors
        files = [d / "model.safetensors"] if (d / "model.safetensors").exists() else sorted(d.glob("*.safetensors"))
    w = {}
    for f in files:
        arrays, _ = _st_arrays(f)
        for k, a in arrays.items():
            if k in w:
                raise ValueError(f"tensor {k} in two shards")
            w[k] = np.asarray(a, np.float32)
    cfg = {k: v for k, v in cfg.items() if v is not None}  # null is "not set", as fastinfer reads it
    cfg.setdefault("rms_norm_eps", 1e-6)  # LlamaConfig's default
    if cfg.get("model_type") not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"model_type {cfg.get('model_type')!r}")
    return reference.llama_forward(w, cfg, ids)


def _dequant_converted(kind: str, parts: dict, rows: int, cols: int):
    """converted layout (weights/converted.py) -> f32 (L, rows, cols), written from its docstring."""
    import numpy as np
    if kind == "F32":
        return parts["f"].reshape(-1, rows, cols)
    q = parts["q"]
    if kind == "F16":
        return q.view("<f2").astype(np.float32).reshape(-1, rows, cols)
    if kind == "BF16":
        return (q.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(-1, rows, cols)
    d = np.repeat(parts["s"].reshape(-1, rows, cols // 32), 32, axis=-1)
    if kind == "Q8_0":
        return q.view(np.int8).astype(np.float32).reshape(-1, rows, cols) * d
    qb = q.reshape(-1, rows, cols // 32, 16)
    vals = np.concatenate([qb & 15, qb >> 4], axis=-1).reshape(-1, rows, cols).astype(np.float32)
    if kind == "Q4_0":
        return (vals - 8) * d
    if kind == "Q4_1":
        return vals * d + np.repeat(parts["m"].reshape(-1, rows, cols // 32), 32, axis=-1)
    raise ValueError(f"kind {kind!r}")


def _reference_converted(d: Path, ids):
    import numpy as np
    import reference
    info = json.loads((d / "config.json").read_text())
    if info.get("format") != "fastinfer" or info.get("format_version") != 2:
        raise ValueError("not a version-2 converted checkpoint")
    c = info["config"]
    arrays, meta = _st_arrays(d / "model.safetensors")
    rs = c.get("rope_scaling")
    cfg = {"hidden_size": c["dim"], "num_hidden_layers": c["n_layers"], "num_attention_heads": c["n_heads"],
           "num_key_value_heads": c["n_kv_heads"], "head_dim": c["head_dim"], "intermediate_size": c["hidden_dim"],
           "vocab_size": c["vocab_size"], "rms_norm_eps": c["norm_eps"], "rope_theta": c["rope_theta"],
           "rope_scaling": rs, "max_position_embeddings": c["max_seq_len"],
           # fastinfer's window (layers from window_from_layer on) is HF Qwen2's max_window_layers rule
           "model_type": "qwen2", "use_sliding_window": True, "sliding_window": c.get("sliding_window", 0),
           "max_window_layers": c.get("window_from_layer", 0)}
    if rs and "freq_factors" in rs:
        raise ValueError("rope freq_factors: not in the HF reference")

    def mat(name):
        if f"{name}.alias" in meta:
            name = meta[f"{name}.alias"]
        rows, cols = (int(x) for x in meta[f"{name}.shape"].split(","))
        parts = {p: arrays[f"{name}.{p}"] for p in "qsmf" if f"{name}.{p}" in arrays}
        return _dequant_converted(meta[f"{name}.kind"], parts, rows, cols)

    L, H, KV, hd, dim, ff = (c[k] for k in ("n_layers", "n_heads", "n_kv_heads", "head_dim", "dim", "hidden_dim"))
    qkv, wo, w13, w2 = mat("wqkv"), mat("wo"), mat("w13"), mat("w2")
    if qkv.shape != (L, (H + 2 * KV) * hd, dim) or w13.shape != (L, 2 * ff, dim):
        raise ValueError("stacked shapes disagree with the config")
    b = arrays["bqkv"].reshape(L, -1)
    w = {"model.embed_tokens.weight": mat("tok_embeddings")[0], "model.norm.weight": arrays["norm"],
         "lm_head.weight": mat("output")[0]}
    for i in range(L):
        p = f"model.layers.{i}."
        q, k, v = np.split(qkv[i], [H * hd, (H + KV) * hd])
        bq, bk, bv = np.split(b[i], [H * hd, (H + KV) * hd])
        w |= {p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
              p + "self_attn.q_proj.bias": bq, p + "self_attn.k_proj.bias": bk, p + "self_attn.v_proj.bias": bv,
              p + "self_attn.o_proj.weight": wo[i], p + "mlp.gate_proj.weight": w13[i, :ff],
              p + "mlp.up_proj.weight": w13[i, ff:], p + "mlp.down_proj.weight": w2[i],
              p + "input_layernorm.weight": arrays["attention_norm"][i],
              p + "post_attention_layernorm.weight": arrays["ffn_norm"][i]}
    return reference.llama_forward(w, cfg, ids)


REFERENCES = {".gguf": _reference_gguf, ".hf": _reference_hf, ".conv": _reference_converted}


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(path: Path, baseline: int, announce: bool = True) -> dict:
    """Load, forward and (when accepted) the reference, in this process."""
    import numpy as np
    import fastinfer
    t0 = time.perf_counter()
    try:
        m = fastinfer.load(path, threads=1, n_ctx=32, activations="f32", kv_type="f32")
        ids = [i % max(int(m.config.vocab_size), 1) for i in IDS]
        got = m.forward(ids)
        del m
    except Exception as e:  # noqa: BLE001 (judged by the parent)
        return {"status": "error", "type": type(e).__name__, "message": str(e)[:4000],
                "where": _where(e.__traceback__), "rss": _maxrss() - baseline, "time": time.perf_counter() - t0}
    out = {"status": "ok", "rss": _maxrss() - baseline, "time": time.perf_counter() - t0}
    if announce:  # so that the parent can tell a hang of the reference from one of fastinfer
        print(json.dumps({"phase": "reference"}), flush=True)
    try:
        with np.errstate(all="ignore"):
            ref = np.asarray(REFERENCES[path.suffix](path, ids), np.float32)
        if ref.shape != got.shape:
            raise ValueError(f"reference logits have shape {ref.shape}, fastinfer's {got.shape}")
    except Exception as e:  # noqa: BLE001
        out["ref_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return out
    with np.errstate(all="ignore"):
        out.update(ref_finite=bool(np.isfinite(ref).all()), got_finite=bool(np.isfinite(got).all()),
                   diff=float(np.nan_to_num(np.abs(got.astype(np.float64) - ref), nan=np.inf).max()),
                   scale=float(np.abs(ref).max()) if np.isfinite(ref).all() else float("nan"))
    return out


def worker(warm: str) -> None:
    """Answer one JSON line per case path read from stdin (see the module docstring)."""
    import faulthandler
    faulthandler.enable()
    # a bound on address space, so that a file asking for many GB fails here, not on the machine
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    _helpers_on_path()
    warm_result = run_case(Path(warm), 0, announce=False)
    if warm_result["status"] != "ok" or "ref_error" in warm_result:
        raise RuntimeError(f"the warm-up seed does not load: {warm_result}")
    baseline = _maxrss()
    print(json.dumps({"ready": True, "baseline": baseline}), flush=True)
    for line in sys.stdin:
        path = Path(line.rstrip("\n"))
        print(json.dumps(run_case(path, baseline)), flush=True)


# ==============================================================================================
# the parent: bounds, oracle, findings
# ==============================================================================================

class Worker:
    """The persistent worker subprocess, restarted after a crash, a hang or a blow-up."""

    def __init__(self, warm: Path, tmp: Path):
        self.warm, self.tmp, self.proc, self.fresh = warm, tmp, None, True

    def start(self) -> None:
        self.log = open(self.tmp / "worker-stderr.log", "w+")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(self.warm)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, cwd=str(self.tmp))
        self.buf = b""
        ready = self._line(120)
        if not ready or "ready" not in ready:
            raise RuntimeError(f"fuzz worker did not start: {self._stderr_tail()}")
        self.fresh = True

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None
            self.log.close()

    def _stderr_tail(self) -> str:
        self.log.flush()
        self.log.seek(0)
        lines = [x.strip() for x in self.log.read().splitlines() if x.strip()]
        fatal = [i for i, x in enumerate(lines) if x.startswith("Fatal Python error")]
        return " | ".join(lines[fatal[-1]:fatal[-1] + 6] if fatal else lines[-6:])  # faulthandler: innermost first

    def _line(self, timeout: float) -> dict | None:
        import select
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return {"timeout": True}
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def run(self, path: Path, timeout: float) -> dict:
        if self.proc is None:
            self.start()
        t = FIRST_TIMEOUT if self.fresh else timeout
        self.fresh = False
        self.proc.stdin.write(f"{path}\n".encode())
        self.proc.stdin.flush()
        phase = "load"
        while True:
            r = self._line(t)
            if r is None:
                rc = self.proc.wait()
                tail = self._stderr_tail()
                self.stop()
                return {"status": "crash", "phase": phase, "returncode": rc, "message": tail}
            if r.get("timeout"):
                self.stop()
                return {"status": "hang", "phase": phase, "message": f"no answer within {t:.0f} s"}
            if "phase" in r:
                phase = r["phase"]
                continue
            return r


def verdict(r: dict, case: Path) -> tuple[str, str]:
    """(outcome, reason): outcome "ok", "refused" (clean error), "ref-refused" (a refusal only the
    reference makes of a file fastinfer handles... see below), or a failure class."""
    s = r["status"]
    if s == "crash":
        return "crash", f"worker died (returncode {r['returncode']}) during {r['phase']}: {r['message'][:300]}"
    if s == "hang":
        return ("hang" if r["phase"] == "load" else "reference-hang"), r["message"]
    if r.get("rss", 0) > RSS_LIMIT:
        return "memory", f"peak RSS grew {r['rss'] / 2**20:.0f} MiB"
    if s == "error":
        msg, typ = r["message"], r["type"]
        first = msg.splitlines()[0][:200] if msg else ""
        names = str(case) in msg or case.name in msg
        if typ not in ("ValueError", "FileNotFoundError"):
            return "bad-error-type", f"{typ}: {first} [at {r['where']}]"
        if "\n" in msg:
            return "bad-error-multiline", f"{typ}: {first} ... [at {r['where']}]"
        if re.search(r"Traceback|numba|TypingError|File \"", msg, re.I):
            return "bad-error-traceback", f"{typ}: {first} [at {r['where']}]"
        if not names:
            return "bad-error-no-path", f"{typ}: {first} [at {r['where']}]"
        return "refused", f"{typ}: {first}"
    if "ref_error" in r:
        return "accepted-ref-refused", f"fastinfer loaded it; the reference reader refuses: {r['ref_error'][:200]}"
    if not r["ref_finite"]:
        return "ok-nonfinite", "reference logits not finite"
    if r["diff"] > 1e-3 * r["scale"] + 1e-4:
        return "mismatch", (f"max |logit diff| {r['diff']:.3g} (max |ref| {r['scale']:.3g})"
                            + ("" if r["got_finite"] else "; fastinfer's logits are not finite"))
    return "ok", ""


GOOD = ("ok", "ok-nonfinite", "refused")
INCONCLUSIVE = ("reference-hang",)


def class_key(outcome: str, reason: str) -> str:
    """Failures of one kind: a bad error by its type and where it is raised (line numbers left out,
    as the code moves); others by their reason, with digits, paths and quoted values normalized."""
    m = re.match(r"(\w+): .*\[at (.*)\]$", reason)
    if outcome.startswith("bad-error") and m:
        where = re.sub(r":\d+", "", m.group(2))
        return f"{outcome}: {m.group(1)} at {where}"
    r = re.sub(r"/\S+", "PATH", reason)
    r = re.sub(r"0x[0-9a-f]+", "0xN", r)
    r = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", r)
    r = re.sub(r"\d+", "N", r)
    return f"{outcome}: {r[:140]}"


class Fuzzer:
    def __init__(self, findings: Path = Path("/tmp/fuzz-findings"), timeout: float = TIMEOUT, log=print):
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
        self.tmp = Path(tempfile.mkdtemp(prefix="fastinfer-fuzz-", dir=base))
        self.seeds = make_seeds(self.tmp / "seeds")
        self.findings, self.timeout, self.log = findings, timeout, log
        self.worker = Worker(self.tmp / "seeds" / "base-Q8_0.gguf", self.tmp)
        self.classes: dict[str, dict] = {}
        self.n = 0

    def close(self) -> None:
        self.worker.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def check(self, fmt: str, plan: tuple) -> tuple[str, str]:
        """Build, run and judge one case; failures are saved. Returns (outcome, reason)."""
        self.n += 1
        suffix = {"gguf": ".gguf", "hf": ".hf", "converted": ".conv"}[fmt]
        case = self.tmp / "cases" / f"case-{self.n}{suffix}"
        case.parent.mkdir(exist_ok=True)
        build_case(fmt, self.seeds, plan, case)
        try:
            r = self.worker.run(case, self.timeout)
            outcome, reason = verdict(r, case)
            if outcome not in GOOD and self.worker.proc is not None and r.get("rss", 0) > RSS_LIMIT:
                self.worker.stop()  # the peak stays with the process: start afresh
            if outcome not in GOOD:
                self._save(fmt, plan, case, outcome, reason)
            return outcome, reason
        finally:
            shutil.rmtree(case, ignore_errors=True) if case.is_dir() else case.unlink(missing_ok=True)

    def _save(self, fmt: str, plan: tuple, case: Path, outcome: str, reason: str) -> None:
        key = class_key(outcome, reason)
        c = self.classes.get(key)
        if c is None:
            slug = re.sub(r"[^A-Za-z0-9]+", "-", key)[:60].strip("-") + f"-{len(self.classes):03d}"
            c = self.classes[key] = {"fmt": fmt, "outcome": outcome, "reason": reason, "count": 0, "plan": plan,
                                     "dir": self.findings / fmt / slug, "example": None}
        c["count"] += 1
        if c["count"] > MAX_SAVED:
            return
        c["dir"].mkdir(parents=True, exist_ok=True)
        dest = c["dir"] / case.name
        shutil.copytree(case, dest) if case.is_dir() else shutil.copy(case, dest)
        with open(c["dir"] / "reason.txt", "a") as f:
            f.write(f"{case.name}: {outcome}: {reason} | plan {describe(fmt, self.seeds, plan)}\n")
        c["example"] = c["example"] or dest

    def run(self, fmt: str, cases: int, seed: int = 0) -> dict:
        """`cases` Hypothesis-generated plans against format fmt; counts by outcome."""
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import seed as hseed
        counts: dict[str, int] = {}
        t0 = time.perf_counter()

        @hseed(seed)
        @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(plan=strategies()[fmt])
        def one(plan):
            outcome, _ = self.check(fmt, plan)
            counts[outcome] = counts.get(outcome, 0) + 1
        one()
        dt = time.perf_counter() - t0
        return {"format": fmt, "cases": sum(counts.values()), "counts": dict(sorted(counts.items())),
                "seconds": round(dt, 1), "cases_per_s": round(sum(counts.values()) / dt, 1)}

    def failures(self, fmt: str | None = None) -> list[dict]:
        return [c for c in self.classes.values() if (fmt is None or c["fmt"] == fmt)
                and c["outcome"] not in INCONCLUSIVE]

    def report(self, fmt: str | None = None) -> str:
        lines = []
        for key, c in sorted(self.classes.items(), key=lambda kv: (kv[1]["fmt"], kv[0])):
            if fmt is not None and c["fmt"] != fmt:
                continue
            lines.append(f"[{c['fmt']}] {c['count']}x {c['outcome']}: {c['reason'][:220]}\n"
                         f"    plan: {describe(c['fmt'], self.seeds, c['plan'])[:300]}\n    saved: {c['example']}")
        return "\n".join(lines)


def replay(path: Path) -> None:
    """Run one saved case through a fresh worker and print the verdict."""
    tmp = Path(tempfile.mkdtemp(prefix="fastinfer-replay-"))
    try:
        fz_seeds = make_seeds(tmp / "seeds")  # noqa: F841 (the worker warms up on a seed)
        w = Worker(tmp / "seeds" / "base-Q8_0.gguf", tmp)
        r = w.run(path.resolve(), TIMEOUT)
        w.stop()
        print(json.dumps(r, indent=1))
        print("verdict:", *verdict(r, path.resolve()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", metavar="WARMUP_FILE")
    ap.add_argument("--format", choices=["gguf", "hf", "converted", "all"], default="all")
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=TIMEOUT)
    ap.add_argument("--findings", type=Path, default=Path("/tmp/fuzz-findings"))
    ap.add_argument("--replay", type=Path)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker)
        return 0
    if a.replay:
        replay(a.replay)
        return 0
    fz = Fuzzer(a.findings, a.timeout)
    try:
        for fmt in (["gguf", "hf", "converted"] if a.format == "all" else [a.format]):
            s = fz.run(fmt, a.cases, a.seed)
            print(f"{fmt}: {s['cases']} cases in {s['seconds']} s ({s['cases_per_s']} cases/s): {s['counts']}", flush=True)
        print(fz.report())
        (a.findings / "summary.txt").parent.mkdir(parents=True, exist_ok=True)
        (a.findings / "summary.txt").write_text(fz.report() + "\n")
    finally:
        fz.close()
    return 1 if fz.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
