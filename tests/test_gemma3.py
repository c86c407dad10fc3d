"""Gemma 3 (fastinfer/models/gemma3.py) against the plain-NumPy reference written from its
definition (tests/reference_gemma3.py) and HF transformers, on tiny random checkpoints: an HF
folder, and a GGUF file laid out as llama.cpp writes Gemma 3 (norms holding 1 + w) whose matrices
come in the 5-bit and K-quant types the real downloads use, per layer mixed as Q4_K_M mixes them.
"""
import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter, quants

import fastinfer
from reference_gemma3 import gemma3_forward, layer_types
from test_kquants import random_blocks
from tiny_models import gguf_tokenizer_fields, tiny_bpe_tokenizer, write_safetensors

# 4 layers, every 2nd global; a 5-key window so that a 20-token prompt crosses it; 4 query heads
# sharing 1 kv head of 64 (q: 256 rows != hidden 256 by coincidence only: head_dim is its own key)
CFG = {
    "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "vocab_size": 300,
    "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 64, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "sliding_window": 5,
    "layer_types": ["sliding_attention", "full_attention"] * 2, "query_pre_attn_scalar": 64,
    "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 0, "final_logit_softcapping": None, "attn_logit_softcapping": None,
}
IDS = [1, 17, 250, 3, 99, 42, 42, 7, 180, 5, 66, 201, 9, 13, 150, 77, 299, 0, 64, 120]


def random_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, h, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (cfg["vocab_size"], d)),
         "model.norm.weight": rng.normal(0, 0.2, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (H * hd, d)), ("self_attn.k_proj", (KV * hd, d)),
                            ("self_attn.v_proj", (KV * hd, d)), ("self_attn.o_proj", (d, H * hd)),
                            ("mlp.gate_proj", (h, d)), ("mlp.up_proj", (h, d)), ("mlp.down_proj", (d, h))):
            w[p + name + ".weight"] = rng.normal(0, 1 / np.sqrt(shape[1]), shape)
        for name, size in (("input_layernorm", d), ("post_attention_layernorm", d), ("pre_feedforward_layernorm", d),
                           ("post_feedforward_layernorm", d), ("self_attn.q_norm", hd), ("self_attn.k_norm", hd)):
            w[p + name + ".weight"] = rng.normal(0, 0.2, size)
    return {k: v.astype(np.float32) for k, v in w.items()}


def write_hf(path, cfg, w):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    write_safetensors(path / "model.safetensors", w)
    tiny_bpe_tokenizer().save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    w = random_weights(CFG)
    return write_hf(tmp_path_factory.mktemp("gemma3") / "hf", CFG, w), w


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return fastinfer.load(hf_dir[0], activations="f32", kv_type="f32")


def close(got, want, tol=2e-4):
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_hf_folder_matches_reference(hf_dir, hf_model):
    assert hf_model.args.arch == "gemma3" and hf_model.activations == "f32"
    close(hf_model.forward(IDS), gemma3_forward(hf_dir[1], CFG, IDS))


def test_decode_steps_equal_the_full_forward(hf_model):
    """Token by token through the KV cache (the window of 5 slides past) = the whole prompt at once."""
    full = hf_model.forward(IDS)
    s = hf_model.session()
    steps = np.stack([s.prefill(IDS[:3])] + [s.decode_step(t).copy() for t in IDS[3:]])
    close(steps, full[2:], 1e-4)


def test_batch_equals_sessions(hf_model):
    from fastinfer.model import Batch
    b = Batch(hf_model, 2, 64)
    a = b.sessions[0].prefill(IDS[:7])
    c = b.sessions[1].prefill(IDS[3:12])
    out = b.decode([0, 1], [5, 9]).copy()
    close(a, hf_model.forward(IDS[:7])[-1], 1e-4)
    close(c, hf_model.forward(IDS[3:12])[-1], 1e-4)
    close(out[0], hf_model.forward(IDS[:7] + [5])[-1], 1e-4)
    close(out[1], hf_model.forward(IDS[3:12] + [9])[-1], 1e-4)


def test_int8_activations_close(hf_dir):
    """8-bit activations need block weights: int8 weights (Q8_0) with them stay within ~2% of f32."""
    m = fastinfer.load(hf_dir[0], dtype="int8", kv_type="f32")
    assert m.activations == "int8"
    got, want = m.forward(IDS), gemma3_forward(hf_dir[1], CFG, IDS)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.03


def test_query_scale_and_linear_rope(tmp_path):
    """query_pre_attn_scalar other than head_dim and linear RoPE scaling on the global layers
    (Gemma 3 4B and up)."""
    cfg = dict(CFG, query_pre_attn_scalar=40, rope_scaling={"rope_type": "linear", "factor": 8.0})
    w = random_weights(cfg, 3)
    m = fastinfer.load(write_hf(tmp_path / "hf", cfg, w), activations="f32", kv_type="f32")
    close(m.forward(IDS), gemma3_forward(w, cfg, IDS))


def test_hf_transformers_parity(hf_dir, hf_model):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir[0], dtype=torch.float32)
    assert type(ref).__name__ == "Gemma3ForCausalLM"
    assert ref.config.layer_types == CFG["layer_types"]
    with torch.no_grad():
        want = ref(torch.tensor([IDS])).logits[0].numpy()
    close(hf_model.forward(IDS), want)


# -- GGUF, the way llama.cpp writes Gemma 3 -----------------------------------------------------------
GGUF_TYPES = {  # per role; ffn_down varies by layer as in Q4_K_M files
    "attn_q": "Q5_0", "attn_k": "Q4_K", "attn_v": "Q8_0", "attn_output": "Q6_K", "ffn_gate": "Q5_1",
    "ffn_up": "Q3_K", "ffn_down": ["Q6_K", "Q4_K", "Q2_K", "Q5_K"],
}
_HF_OF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
          "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
          "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}


def _quantized(w: np.ndarray, kind: str, rng) -> tuple[np.ndarray, np.ndarray]:
    """(bytes (rows, row_bytes), the float32 values they stand for): gguf's quantizer where it has
    one, else random blocks (K-quants)."""
    t = GGMLQuantizationType[kind]
    try:
        raw = quants.quantize(w.astype(np.float32), t)
    except NotImplementedError:
        raw = random_blocks(kind, w.shape[0], w.shape[1], rng)
    return raw, quants.dequantize(raw, t).reshape(w.shape)


def write_gemma3_gguf(path, cfg, w, seed=0):
    """A tiny GGUF Gemma 3 and the HF-named float weights it stands for."""
    rng = np.random.default_rng(seed)
    g = GGUFWriter(str(path), "gemma3")
    g.add_context_length(cfg["max_position_embeddings"])
    g.add_embedding_length(cfg["hidden_size"])
    g.add_block_count(cfg["num_hidden_layers"])
    g.add_feed_forward_length(cfg["intermediate_size"])
    g.add_head_count(cfg["num_attention_heads"])
    g.add_head_count_kv(cfg["num_key_value_heads"])
    g.add_key_length(cfg["head_dim"])
    g.add_value_length(cfg["head_dim"])
    g.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    g.add_rope_freq_base(cfg["rope_theta"])
    g.add_sliding_window(cfg["sliding_window"])
    tok = gguf_tokenizer_fields(tiny_bpe_tokenizer(), cfg["vocab_size"])
    g.add_tokenizer_model(tok["model"])
    g.add_tokenizer_pre(tok["pre"])
    g.add_token_list(tok["tokens"])
    g.add_token_types(tok["token_type"])
    g.add_token_merges(tok["merges"])
    g.add_bos_token_id(tok["bos_token_id"])
    g.add_eos_token_id(tok["eos_token_id"])
    stands = {}

    def add(name, hf, arr, kind):
        if kind == "F32":
            g.add_tensor(name, arr.astype(np.float32))
            stands[hf] = arr.astype(np.float32)
        else:
            raw, val = _quantized(arr, kind, rng)
            g.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=GGMLQuantizationType[kind])
            stands[hf] = val

    add("token_embd.weight", "model.embed_tokens.weight", w["model.embed_tokens.weight"], "Q8_0")
    g.add_tensor("output_norm.weight", (1 + w["model.norm.weight"]).astype(np.float32))
    stands["model.norm.weight"] = w["model.norm.weight"]
    for i in range(cfg["num_hidden_layers"]):
        for role, hf in _HF_OF.items():
            key = f"model.layers.{i}.{hf}.weight"
            if role.endswith("norm"):  # llama.cpp's converter stores Gemma's 1 + w
                g.add_tensor(f"blk.{i}.{role}.weight", (1 + w[key]).astype(np.float32))
                stands[key] = w[key]
            else:
                kind = GGUF_TYPES[role]
                add(f"blk.{i}.{role}.weight", key, w[key], kind[i % len(kind)] if isinstance(kind, list) else kind)
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    return stands


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    w = random_weights(CFG, 1)
    path = tmp_path_factory.mktemp("gemma3") / "tiny-gemma3.gguf"
    cfg = dict(CFG, layer_types=[])  # GGUF files leave the pattern to the reader: every 6th global
    stands = write_gemma3_gguf(path, cfg, w)
    return path, stands, dict(CFG, layer_types=layer_types(dict(CFG, layer_types=None)))


def test_gguf_kquants_match_reference(gguf_file):
    """Every K-quant and 5-bit type held in blocks and multiplied there: f32 activations give the
    reference's logits over the gguf package's dequantized values."""
    path, stands, cfg = gguf_file
    m = fastinfer.load(path, activations="f32", kv_type="f32")
    kinds = {m.weights.wq.kind_name, m.weights.wk.kind_name, m.weights.w2.kind_name, m.weights.wo.kind_name}
    assert kinds == {"Q5", "Q4_1", "Q6"} and m.weights.w2.kind_name == "Q6"  # mixed layers: Q6, not f32
    assert cfg["layer_types"] == ["sliding_attention"] * 4  # 4 layers: none is a 6th
    close(m.forward(IDS), gemma3_forward(stands, cfg, IDS))


def test_gguf_int8_activations(gguf_file):
    """The default (8-bit activations on every K-quant kind) stays close to the reference."""
    path, stands, cfg = gguf_file
    m = fastinfer.load(path, kv_type="f32")
    assert m.activations == "int8"
    got, want = m.forward(IDS), gemma3_forward(stands, cfg, IDS)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.03
    s = m.session()
    s.prefill(IDS[:10])
    step = s.decode_step(IDS[10])
    assert np.linalg.norm(step - want[10]) / np.linalg.norm(want[10]) < 0.03


def _resident_kib(a: np.ndarray) -> int:
    """Resident KiB of array a's pages, from /proc/self/pagemap (bit 63 of a page's entry: present)."""
    import mmap as _mmap
    page = _mmap.PAGESIZE
    first, last = a.ctypes.data // page, (a.ctypes.data + a.nbytes - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = np.frombuffer(f.read((last - first + 1) * 8), np.uint64)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum()) * page // 1024


def test_cache_trim_keeps_results(tmp_path):
    """Local layers' cache slots older than the window are given back to the OS as a long
    sequence goes on; what the model computes does not change."""
    cfg = dict(CFG, sliding_window=8, max_position_embeddings=2048)
    w = random_weights(cfg, 5)
    m = fastinfer.load(write_hf(tmp_path / "hf", cfg, w), activations="f32", kv_type="f32", n_ctx=2048)
    ids = list(np.random.default_rng(0).integers(0, 300, 1600))
    s = m.session()
    s.prefill(ids[:1500])
    assert s.state._released.get(0, 0) > 0  # slots were given back
    if Path("/proc/self/pagemap").exists():  # and the OS took their pages: 2 of 4 layers are local
        full = 2 * 4 * 1500 * 64 * 4 / 1024  # KiB of K and V for 4 layers, 1 kv head of 64, f32
        kib = _resident_kib(s.state.k_cache) + _resident_kib(s.state.v_cache)
        assert kib < 0.75 * full, (kib, full)  # the global half stays, the local half mostly goes
    got = np.stack([s.decode_step(t).copy() for t in ids[1500:1504]])
    want = m.forward(ids[:1504])[1500:1504]
    close(got, want, 1e-4)


# -- the real model: Gemma 3 270M, Q4_K_M, as downloaded ----------------------------------------------
def _passages(n: int = 3, words: int = 70) -> list[str]:
    """Stretches of a novel from tests/data, far into the book (nothing anyone tuned on here)."""
    import gzip
    from pathlib import Path
    text = gzip.decompress((Path(__file__).parent / "data" / "corpus" / "persuasion.txt.gz").read_bytes()).decode()
    w = text.split()
    return [" ".join(w[20000 + 5000 * i:20000 + 5000 * i + words]) for i in range(n)]


@pytest.fixture(scope="module")
def hf_gemma(gemma3_gguf):
    """HF transformers' Gemma3ForCausalLM in float32 over the file's dequantized weights, and its
    tokenizer, both built by transformers from the GGUF."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF files
    kw = dict(gguf_file=gemma3_gguf.name)
    tok = transformers.AutoTokenizer.from_pretrained(gemma3_gguf.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(gemma3_gguf.parent, dtype=torch.float32, **kw)
    return tok, model.eval(), torch


@pytest.fixture(scope="module")
def gemma_f32(gemma3_gguf):
    return fastinfer.load(gemma3_gguf, activations="f32", kv_type="f32")


def test_real_tokens_equal_hf(gemma3_gguf, gemma_f32, hf_gemma):
    tok = hf_gemma[0]
    for text in _passages() + ["Hello world", "  two  spaces\tand a tab\n", "naïve café 東京 🤖", "x = f(3.14) ** 2"]:
        assert gemma_f32.encode(text) == tok(text).input_ids, text


def test_real_top1_equals_hf_everywhere(gemma_f32, hf_gemma):
    """f32 activations and cache: the most likely next token equals HF's fp32 one at every position
    of every passage."""
    tok, model, torch = hf_gemma
    for text in _passages():
        ids = gemma_f32.encode(text)
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].numpy()
        got = gemma_f32.forward(ids)
        assert (got.argmax(-1) == want.argmax(-1)).all()
        assert np.abs(got - want).max() < 2e-2 * np.abs(want).max()


def test_real_greedy_48_tokens_equal_hf(gemma_f32, hf_gemma):
    tok, model, torch = hf_gemma
    prompt = _passages(1, 40)[0]
    ids = gemma_f32.encode(prompt)
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False, min_new_tokens=48)[0, len(ids):]
    got = gemma_f32.generate(ids, max_new_tokens=48, temperature=0, min_new_tokens=48)
    assert got == want.tolist()


def test_real_defaults_close_to_f32(gemma3_gguf, gemma_f32):
    """The defaults (8-bit activations, f16 cache) cost little: perplexity over a passage within
    1% of f32 activations and cache (docs/performance.md has the measurement over a whole book)."""
    m = fastinfer.load(gemma3_gguf)
    assert m.activations == "int8"
    ids = gemma_f32.encode(" ".join(_passages(3, 200)))

    def ppl(model):
        logits = model.forward(ids).astype(np.float64)
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        return float(np.exp(np.mean(lse[:-1] - logits[np.arange(len(ids) - 1), ids[1:]])))

    base, default = ppl(gemma_f32), ppl(m)
    assert default <= 1.01 * base, (default, base)


# -- damaged K-quant files: one clear error naming the file, the tensor and its type ----------------
def _edited(tmp_path, gguf_file, edit, cut: int = 0):
    from fuzz_models import pack_gguf, parse_gguf
    g = parse_gguf(gguf_file[0].read_bytes())
    edit(g)
    data = pack_gguf(g)
    path = tmp_path / "bad.gguf"
    path.write_bytes(data[:len(data) - cut] if cut else data)
    return path


def _refused(path, *parts):
    with pytest.raises(ValueError) as e:
        fastinfer.load(path, threads=1, n_ctx=16)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg and all(p in msg for p in parts), msg


def _tensor_info(g, name):
    return next(t for t in g["tensors"] if t["name"] == name.encode())


def test_kquant_row_not_a_multiple_of_256(tmp_path, gguf_file):
    def edit(g):  # attn_k: 64 rows of 256 (Q4_K) relabelled as 128 rows of 128
        _tensor_info(g, "blk.0.attn_k.weight")["dims"] = [128, 128]
    _refused(_edited(tmp_path, gguf_file, edit), "blk.0.attn_k.weight", "Q4_K", "multiple of 256")


def test_truncated_block_table(tmp_path, gguf_file):
    _refused(_edited(tmp_path, gguf_file, lambda g: None, cut=1000), "runs past the end", "truncated")


def test_tensor_type_we_do_not_read(tmp_path, gguf_file):
    def edit(g):
        _tensor_info(g, "blk.1.ffn_up.weight")["type"] = 99
    _refused(_edited(tmp_path, gguf_file, edit), "blk.1.ffn_up.weight", "GGML type 99")


def test_architecture_we_do_not_read(tmp_path, gguf_file):
    def edit(g):
        kv = next(e for e in g["kv"] if e["key"] == b"general.architecture")
        kv["value"] = b"gemma4"
    _refused(_edited(tmp_path, gguf_file, edit), "unsupported architecture 'gemma4'", "gemma3")


def test_convert_keeps_kquant_blocks(gguf_file, tmp_path):
    """A converted checkpoint keeps the blocks (Q5, Q4_1, Q6 as read), memory-maps them, and
    computes exactly what the GGUF does."""
    from fastinfer.convert import convert
    path = gguf_file[0]
    convert(path, tmp_path / "conv", progress=False)
    a = fastinfer.load(path, activations="f32", kv_type="f32")
    b = fastinfer.load(tmp_path / "conv", activations="f32", kv_type="f32")
    for role in ("wq", "wk", "wv", "wo", "w13", "w2", "tok_embeddings"):
        assert getattr(a.weights, role).kind == getattr(b.weights, role).kind
    assert not b.weights.w2.q.flags.owndata  # a view of the mapped file
    np.testing.assert_array_equal(b.forward(IDS), a.forward(IDS))
