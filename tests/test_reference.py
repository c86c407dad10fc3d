"""Checks of the reference implementation itself (tests/reference.py, tests/tiny_models.py).

The engine's tests trust these, so they are held to: gguf-py's own block codecs, the
equivalence of the HF route and the llama.cpp route on tiny models in every format, and the
real SmolLM2 GGUF answering " Paris"."""
from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

import reference as R
import tiny_models as T

gguf = pytest.importorskip("gguf")

DATA = Path(__file__).parent / "data"
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1")
PROMPT = "The capital of France is Paris. Hello world! How are you today? One, two, three."


def _qtype(name: str):
    return gguf.GGMLQuantizationType[name]


def _random_raw(rng, ggml_type: str, rows: int, n_cols: int) -> np.ndarray:
    """Random but valid encoded rows: random quant bytes, finite fp16 scales."""
    if ggml_type == "F32":
        return rng.standard_normal((rows, n_cols)).astype("<f4").view(np.uint8)
    if ggml_type == "F16":
        return rng.standard_normal((rows, n_cols)).astype("<f2").view(np.uint8)
    nb, bb = n_cols // R.QK, R.BLOCK_BYTES[ggml_type]
    raw = rng.integers(0, 256, size=(rows, nb, bb), dtype=np.uint8)
    n_scales = 2 if ggml_type == "Q4_1" else 1
    scales = (rng.standard_normal((rows, nb, n_scales)) * 0.05).astype("<f2")
    raw[..., : 2 * n_scales] = scales.view(np.uint8).reshape(rows, nb, 2 * n_scales)
    return raw.reshape(rows, nb * bb)


def _awkward_weights(rng, rows=41, cols=320) -> np.ndarray:
    w = rng.standard_normal((rows, cols)) * rng.uniform(1e-3, 20, size=(rows, 1))
    w = w.astype(np.float32)
    w[0] = 0.0                       # all-zero blocks: d = 0
    w[1] = 0.75                      # constant blocks
    w[2, :32] = np.tile([1.0, -1.0], 16)  # |max| ties between signs
    w[3, 5], w[3, 9] = -4.0, 4.0     # another tie, negative first
    w[4] = np.linspace(-1, 1, cols)
    return w


# ---------------------------------------------------------------------------------------------
# block formats
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ggml_type", R.GGML_TYPES)
def test_dequantize_matches_gguf_py(ggml_type):
    rng = np.random.default_rng(1)
    n_cols = 256
    raw = _random_raw(rng, ggml_type, 23, n_cols)
    assert raw.shape[1] == R.row_bytes(ggml_type, n_cols)
    ours = R.dequantize(raw, ggml_type, n_cols)
    theirs = gguf.quants.dequantize(raw, _qtype(ggml_type))
    assert ours.dtype == np.float32 and ours.shape == (23, n_cols)
    np.testing.assert_array_equal(ours, theirs.reshape(ours.shape))


@pytest.mark.parametrize("ggml_type", R.GGML_TYPES)
def test_quantize_matches_gguf_py(ggml_type):
    w = _awkward_weights(np.random.default_rng(2))
    ours = R.quantize(w, ggml_type)
    assert ours.dtype == np.uint8 and ours.shape == (w.shape[0], R.row_bytes(ggml_type, w.shape[1]))
    theirs = np.ascontiguousarray(gguf.quants.quantize(w, _qtype(ggml_type))).view(np.uint8)
    np.testing.assert_array_equal(ours, theirs.reshape(ours.shape))


def test_nibble_order_by_hand():
    """Q4_0 element j is byte j's low nibble and element j + 16 its high nibble."""
    block = np.zeros((1, 18), dtype=np.uint8)
    block[0, :2] = np.array([0.5], dtype="<f2").view(np.uint8)
    block[0, 2] = 0x9F  # element 0 = 15, element 16 = 9
    out = R.dequantize(block, "Q4_0", 32)[0]
    assert out[0] == 0.5 * (15 - 8) and out[16] == 0.5 * (9 - 8)
    assert np.all(np.delete(out, [0, 16]) == 0.5 * -8)


@pytest.mark.parametrize("ggml_type", QUANT_TYPES + ("F16",))
def test_round_trip_error_within_format_bound(ggml_type):
    w = _awkward_weights(np.random.default_rng(3))
    back = R.dequantize(R.quantize(w, ggml_type), ggml_type, w.shape[1])
    err = np.abs(back - w)
    if ggml_type == "F16":
        assert np.all(err <= np.abs(w) * 2.0 ** -11 + 1e-7)
        return
    blocks = w.reshape(w.shape[0], -1, R.QK)
    lo, hi = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
    amax = np.abs(blocks).max(-1, keepdims=True)
    fp16_rel = 2.0 ** -11
    if ggml_type == "Q8_0":
        d = amax / 127
        bound = 0.5 * d + 127 * d * fp16_rel
    elif ggml_type == "Q4_0":
        d = amax / 8
        bound = d + 8 * d * fp16_rel      # the far end of the range is clamped: one step off
    else:
        d = (hi - lo) / 15
        bound = 0.5 * d + 15 * d * fp16_rel + np.abs(lo) * fp16_rel
    assert np.all(err.reshape(blocks.shape) <= bound * (1 + 1e-5) + 1e-6)
    assert np.array_equal(back[0], w[0])   # zero blocks come back exactly


# ---------------------------------------------------------------------------------------------
# tiny models: HF route vs llama.cpp route
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_tok():
    return T.tiny_bpe_tokenizer()


@pytest.fixture(scope="module")
def prompt_ids(tiny_tok):
    ids = tiny_tok.encode(PROMPT).ids
    assert len(ids) > 20
    return ids


CFGS = {"base": T.TINY_CFG, "tied": T.TINY_CFG_TIED, "llama3": T.TINY_CFG_LLAMA3,
        "bias": T.TINY_CFG_BIAS}
CASES = [("base", t) for t in R.GGML_TYPES] + [
    (c, t) for c in ("tied", "llama3", "bias") for t in ("F32", "Q8_0")]


@pytest.mark.parametrize("cfg_name,ggml_type", CASES)
def test_gguf_route_equals_hf_route(tmp_path, tiny_tok, prompt_ids, cfg_name, ggml_type):
    cfg = CFGS[cfg_name]
    w = T.random_llama_weights(cfg, seed=7)
    path = T.write_gguf(tmp_path / "m.gguf", cfg, w, ggml_type, T.gguf_tokenizer_fields(tiny_tok))
    hf = R.llama_forward(T.as_quantized(w, ggml_type), cfg, prompt_ids)
    gg = R.llama_forward_gguf(path, prompt_ids)
    assert hf.shape == gg.shape == (len(prompt_ids), cfg["vocab_size"])
    assert hf.dtype == gg.dtype == np.float32
    assert hf.std() > 1.0   # not a degenerate model whose logits all agree anyway
    np.testing.assert_allclose(gg, hf, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(gg.argmax(-1), hf.argmax(-1))


def test_equivalence_needs_the_permutation(tmp_path, monkeypatch, prompt_ids):
    """Without the converter's Q/K row permutation the interleaved route gives other numbers,
    so the equivalence above really checks it."""
    cfg = T.TINY_CFG
    w = T.random_llama_weights(cfg, seed=7)
    monkeypatch.setattr(T, "permute_qk", lambda x, n: x)
    path = T.write_gguf(tmp_path / "unpermuted.gguf", cfg, w, "F32")
    gg = R.llama_forward_gguf(path, prompt_ids)
    hf = R.llama_forward(w, cfg, prompt_ids)
    np.testing.assert_allclose(gg[0], hf[0], atol=1e-4)  # position 0: rope is the identity
    assert np.abs(gg[1:] - hf[1:]).max() > 1e-2


def test_llama3_scaling_changes_the_logits(prompt_ids):
    cfg = T.TINY_CFG_LLAMA3
    w = T.random_llama_weights(cfg, seed=7)
    scaled = R.llama_forward(w, cfg, prompt_ids)
    plain = R.llama_forward(w, {**cfg, "rope_scaling": None}, prompt_ids)
    assert np.abs(scaled - plain).max() > 1e-2
    factors = T.llama3_rope_factors(cfg)
    assert factors.shape == (cfg["head_dim"] // 2,)
    assert factors[0] == 1 and factors[-1] == 8 and np.any((factors > 1) & (factors < 8))
    # the converter's factors and HF's scaled frequencies agree
    dim, base = cfg["head_dim"], cfg["rope_theta"]
    plain_freq = 1.0 / base ** (np.arange(0, dim, 2) / dim)
    np.testing.assert_allclose(plain_freq / factors, R.hf_inv_freq(cfg), rtol=1e-6)


def test_forward_is_causal(prompt_ids):
    w = T.random_llama_weights(T.TINY_CFG, seed=3)
    full = R.llama_forward(w, T.TINY_CFG, prompt_ids)
    prefix = R.llama_forward(w, T.TINY_CFG, prompt_ids[:5])
    np.testing.assert_allclose(full[:5], prefix, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the files themselves
# ---------------------------------------------------------------------------------------------

def _read_safetensors(path: Path) -> dict[str, tuple[str, list, bytes]]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    assert (8 + n) % 8 == 0
    header.pop("__metadata__", None)
    data = blob[8 + n:]
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in header.items()}


@pytest.mark.parametrize("dtype,shards", [("float32", 1), ("float16", 1), ("bfloat16", 1),
                                          ("bfloat16", 3), ("float32", 2)])
def test_hf_dir(tmp_path, tiny_tok, dtype, shards):
    from safetensors import safe_open
    from tokenizers import Tokenizer

    cfg = T.TINY_CFG
    w = T.random_llama_weights(cfg, seed=5)
    d = T.write_hf_dir(tmp_path / "hf", cfg, w, tokenizer=tiny_tok, dtype=dtype, shards=shards)

    config = json.loads((d / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["torch_dtype"] == dtype
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "max_position_embeddings",
                "rms_norm_eps", "rope_theta", "tie_word_embeddings"):
        assert config[key] == cfg[key]

    if shards == 1:
        files = ["model.safetensors"]
        assert not (d / "model.safetensors.index.json").exists()
    else:
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert set(index) == {"metadata", "weight_map"}
        files = sorted(set(index["weight_map"].values()))
        assert files == [f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)]
        assert set(index["weight_map"]) == set(w)

    stored = T.as_stored(w, dtype)
    seen = {}
    st_dtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    for f in files:
        for name, (dt, shape, raw) in _read_safetensors(d / f).items():
            assert dt == st_dtype and tuple(shape) == w[name].shape
            if dt == "BF16":
                x = T.from_bf16_bits(np.frombuffer(raw, dtype="<u2")).reshape(shape)
            else:
                x = np.frombuffer(raw, dtype="<f4" if dt == "F32" else "<f2").reshape(shape)
            np.testing.assert_array_equal(x.astype(np.float32), stored[name])
            seen[name] = f
        with safe_open(str(d / f), framework="numpy") as sf:  # the real library accepts it
            for name in sf.keys():
                assert sf.get_slice(name).get_shape() == list(w[name].shape)
                if dtype != "bfloat16":
                    got = sf.get_tensor(name).astype(np.float32)
                    np.testing.assert_array_equal(got, stored[name])
    assert set(seen) == set(w)
    if shards > 1:
        assert index["metadata"]["total_size"] == sum(v.nbytes for v in w.values()) // (
            2 if dtype != "float32" else 1)
        assert all(index["weight_map"][n] == f for n, f in seen.items())

    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert tok.encode(PROMPT).ids == tiny_tok.encode(PROMPT).ids


def test_bf16_rounds_to_nearest_even():
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -7, -2.5], dtype=np.float32)
    back = T.from_bf16_bits(T.to_bf16_bits(x))
    np.testing.assert_array_equal(back, [1.0, 1.0, 1.0 + 2 ** -6, 1.0 + 2 ** -7, -2.5])


@pytest.mark.parametrize("cfg_name,ggml_type",
                         [("base", "Q4_1"), ("tied", "F16"), ("llama3", "Q8_0")])
def test_gguf_file_layout(tmp_path, tiny_tok, cfg_name, ggml_type):
    cfg = CFGS[cfg_name]
    w = T.random_llama_weights(cfg, seed=9)
    tv = T.gguf_tokenizer_fields(tiny_tok)
    path = T.write_gguf(tmp_path / "m.gguf", cfg, w, ggml_type, tv)
    reader = gguf.GGUFReader(str(path))

    def field(key):
        return reader.get_field(key).contents()

    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == cfg["num_hidden_layers"]
    assert field("llama.context_length") == cfg["max_position_embeddings"]
    assert field("llama.embedding_length") == cfg["hidden_size"]
    assert field("llama.feed_forward_length") == cfg["intermediate_size"]
    assert field("llama.attention.head_count") == cfg["num_attention_heads"]
    assert field("llama.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert field("llama.rope.freq_base") == pytest.approx(cfg["rope_theta"])
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg["rms_norm_eps"])
    assert field("llama.rope.dimension_count") == R.head_dim_of(cfg)
    assert field("llama.vocab_size") == cfg["vocab_size"]
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.tokens") == tv["tokens"]
    assert len(tv["tokens"]) == cfg["vocab_size"]
    assert field("tokenizer.ggml.token_type")[:4] == [3, 3, 3, 1]
    assert field("tokenizer.ggml.merges") == tv["merges"]
    assert field("tokenizer.ggml.bos_token_id") == 1 and field("tokenizer.ggml.eos_token_id") == 2

    types = {t.name: t.tensor_type.name for t in reader.tensors}
    shapes = {t.name: [int(s) for s in t.shape] for t in reader.tensors}
    assert ("output.weight" in types) == (not cfg["tie_word_embeddings"])
    assert ("rope_freqs.weight" in types) == (cfg.get("rope_scaling") is not None)
    n_layers = cfg["num_hidden_layers"]
    assert len(types) == (2 + 9 * n_layers + ("output.weight" in types)
                          + ("rope_freqs.weight" in types))
    for name, t in types.items():
        if name.endswith("norm.weight") or name == "rope_freqs.weight":
            assert t == "F32"
        else:
            assert t == ggml_type, name
    hd = R.head_dim_of(cfg)
    assert shapes["token_embd.weight"] == [cfg["hidden_size"], cfg["vocab_size"]]
    assert shapes["blk.0.attn_q.weight"] == [cfg["hidden_size"], cfg["num_attention_heads"] * hd]
    assert shapes["blk.0.attn_k.weight"] == [cfg["hidden_size"], cfg["num_key_value_heads"] * hd]
    assert shapes["blk.0.ffn_down.weight"] == [cfg["intermediate_size"], cfg["hidden_size"]]

    # Q rows are stored permuted: row 2i+1 of head 0 is HF row i + hd/2
    _, tensors = R.read_gguf(path)
    q_hf = T.as_quantized(w, ggml_type)["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"][1], q_hf[hd // 2])
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"],
                                  T.permute_qk(q_hf, cfg["num_attention_heads"]))


def test_gguf_tokenizer_fields_rebuild_the_tokenizer(tiny_tok):
    """A BPE rebuilt from the GGUF tokens and merges encodes exactly like the original."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tv = T.gguf_tokenizer_fields(tiny_tok)
    assert tv["tokens"][:3] == T.SPECIAL_TOKENS and len(tv["tokens"]) == T.TINY_VOCAB
    vocab = {t: i for i, t in enumerate(tv["tokens"]) if tv["token_type"][i] == 1}
    merges = [tuple(m.split(" ")) for m in tv["merges"]]
    rebuilt = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    rebuilt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    rebuilt.decoder = decoders.ByteLevel()
    for text in (PROMPT, "  odd   spacing\n\nand ünïcödé 🚀 12345", "Paris!"):
        assert rebuilt.encode(text).ids == tiny_tok.encode(text).ids
        assert rebuilt.decode(rebuilt.encode(text).ids) == text


# ---------------------------------------------------------------------------------------------
# the real model
# ---------------------------------------------------------------------------------------------

# "The capital of France is" and " Paris" in SmolLM2's tokenizer (used when the tokenizer copy
# under tests/data is not there).
SMOLLM2_PROMPT_IDS = [504, 3575, 282, 4649, 314]
SMOLLM2_PARIS_ID = 7042


def _smollm2_tokenizer():
    path = DATA / "smollm2-tokenizer" / "tokenizer.json.gz"
    if not path.exists():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_str(gzip.decompress(path.read_bytes()).decode("utf-8"))


@pytest.fixture(scope="module")
def smollm2_path(request):
    try:
        return request.getfixturevalue("smollm2_gguf")
    except ImportError:
        # The engine's fetch module is not there yet: use its cache location if it is filled.
        home = Path(os.environ.get("FASTINFER_HOME") or Path.home() / ".cache" / "fastinfer")
        path = home.expanduser() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.exists():
            pytest.skip("SmolLM2 GGUF not available")
        return path


def test_smollm2_says_paris(smollm2_path):
    tok = _smollm2_tokenizer()
    if tok is not None:
        ids = tok.encode("The capital of France is").ids
        assert ids == SMOLLM2_PROMPT_IDS
        assert tok.encode(" Paris").ids == [SMOLLM2_PARIS_ID]
    logits = R.llama_forward_gguf(smollm2_path, SMOLLM2_PROMPT_IDS)
    assert logits.shape == (len(SMOLLM2_PROMPT_IDS), 49152)
    assert np.all(np.isfinite(logits))
    assert int(logits[-1].argmax()) == SMOLLM2_PARIS_ID
    if tok is not None:
        assert tok.decode([int(logits[-1].argmax())]) == " Paris"
