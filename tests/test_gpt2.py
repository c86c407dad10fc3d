"""GPT-2 from HF folders: random checkpoints in the real layout against the NumPy reference."""
import gzip
import json
import shutil

import numpy as np
import pytest

import fastinfer
from conftest import DATA
from fastinfer.convert import convert
from reference_gpt2 import GPT2_TINY_CFG, gpt2_forward, random_gpt2_weights, write_gpt2_dir

IDS = [5, 17, 42, 3, 250, 99, 7, 7, 128, 64, 1, 200, 33, 0, 299]


@pytest.mark.parametrize("prefix,buffers", [("", True), ("transformer.", False)])
def test_logits_match_reference(tmp_path, prefix, buffers):
    w = random_gpt2_weights(GPT2_TINY_CFG, seed=1, prefix=prefix, with_buffers=buffers)
    d = write_gpt2_dir(tmp_path / "g", GPT2_TINY_CFG, w)
    got = fastinfer.load(d, kv_type="f32").forward(IDS)
    np.testing.assert_allclose(got, gpt2_forward(w, GPT2_TINY_CFG, IDS), atol=2e-4, rtol=0)


def test_fp16_checkpoint(tmp_path):
    w = random_gpt2_weights(GPT2_TINY_CFG, seed=2)
    d = write_gpt2_dir(tmp_path / "g", GPT2_TINY_CFG, w, dtype="float16")
    model = fastinfer.load(d, kv_type="f32")
    assert model.weights.wqkv.kind_name == "F16"
    w16 = {k: v.astype(np.float16).astype(np.float32) for k, v in w.items()}
    np.testing.assert_allclose(model.forward(IDS), gpt2_forward(w16, GPT2_TINY_CFG, IDS), atol=2e-4, rtol=0)


def test_session_steps_equal_forward(tmp_path):
    d = write_gpt2_dir(tmp_path / "g", GPT2_TINY_CFG, random_gpt2_weights(GPT2_TINY_CFG, seed=3))
    model = fastinfer.load(d)
    full = model.forward(IDS)
    s = model.session()
    np.testing.assert_allclose(s.prefill(IDS[:5]), full[4], atol=5e-5)
    rows = [s.append([t])[0] for t in IDS[5:]]
    np.testing.assert_allclose(np.array(rows), full[5:], atol=5e-5)


def test_greedy_ids_follow_reference(tmp_path):
    w = random_gpt2_weights(GPT2_TINY_CFG, seed=4)
    model = fastinfer.load(write_gpt2_dir(tmp_path / "g", GPT2_TINY_CFG, w))
    got = model.generate(IDS[:4], max_new_tokens=8, temperature=0)
    seq = list(IDS[:4])
    for _ in range(8):
        nxt = int(gpt2_forward(w, GPT2_TINY_CFG, seq)[-1].argmax())
        if nxt in model.eos_ids:
            break
        seq.append(nxt)
    assert got == seq[4:]


@pytest.mark.parametrize("dtype", ["int8", "bf16"])
def test_convert_round_trip(tmp_path, dtype):
    d = write_gpt2_dir(tmp_path / "g", GPT2_TINY_CFG, random_gpt2_weights(GPT2_TINY_CFG, seed=5))
    out = convert(d, tmp_path / "c", dtype, progress=False).out
    np.testing.assert_array_equal(fastinfer.load(out).forward(IDS), fastinfer.load(d, dtype=dtype).forward(IDS))


@pytest.fixture(scope="module")
def real_vocab_dir(tmp_path_factory):
    """A GPT-2 folder with the real 50,257-entry vocab.json/merges.txt and tiny random weights."""
    cfg = {**GPT2_TINY_CFG, "vocab_size": 50257, "n_embd": 32, "n_head": 2, "n_layer": 1,
           "bos_token_id": 50256, "eos_token_id": 50256}
    d = write_gpt2_dir(tmp_path_factory.mktemp("real") / "g", cfg, random_gpt2_weights(cfg), tokenizer_files=False)
    for name in ("vocab.json", "merges.txt"):
        (d / name).write_bytes(gzip.decompress((DATA / "gpt2-tokenizer" / f"{name}.gz").read_bytes()))
    return d


def test_real_gpt2_tokenizer(real_vocab_dir):
    model = fastinfer.load(real_vocab_dir)
    tok = model.tokenizer
    # ids that GPT-2's own encoder gives (public, well known)
    assert tok.encode("Hello world").ids == [15496, 995]
    assert tok.encode("<|endoftext|>").ids == [50256]
    assert model.eos_ids == [50256]
    for name in ("persuasion", "prideprejudice"):
        text = gzip.decompress((DATA / "corpus" / f"{name}.txt.gz").read_bytes()).decode()[:200_000]
        assert tok.decode(tok.encode(text).ids) == text


def test_missing_files_are_named(tmp_path, real_vocab_dir):
    d = tmp_path / "g"
    shutil.copytree(real_vocab_dir, d)
    (d / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        fastinfer.load(d)
    shutil.copy(real_vocab_dir / "merges.txt", d)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        fastinfer.load(d)


def test_inconsistent_config_is_named(tmp_path):
    d = write_gpt2_dir(tmp_path / "g", GPT2_TINY_CFG, random_gpt2_weights(GPT2_TINY_CFG))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "n_embd": 96}))
    with pytest.raises(ValueError, match="shape"):
        fastinfer.load(d)
    (d / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="relu"):
        fastinfer.load(d)


def test_batched_generation(tmp_path):
    d = write_gpt2_dir(tmp_path / "g", GPT2_TINY_CFG, random_gpt2_weights(GPT2_TINY_CFG, seed=6))
    model = fastinfer.load(d)
    prompts = [IDS[:2], IDS[:7], IDS[3:5]]
    alone = [model.generate(p, max_new_tokens=6) for p in prompts]  # HF folder: greedy by default
    assert model.generate(prompts, max_new_tokens=6) == alone
