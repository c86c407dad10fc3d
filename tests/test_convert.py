"""Converted checkpoints: round trips for every dtype and source kind, atomic writes, bad files."""
import json
import subprocess
import sys

import numpy as np
import pytest

import fastinfer
import reference
from fastinfer.convert import convert
from tiny_models import (TINY_CFG, gguf_tokenizer_fields, random_llama_weights, tiny_bpe_tokenizer,
                         write_gguf, write_hf_dir)

IDS = [5, 17, 42, 3, 250, 99, 7, 7, 128, 64, 1, 200, 33]
DTYPES = ["auto", "f32", "bf16", "int8", "int4"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    tok = tiny_bpe_tokenizer()
    w = random_llama_weights(TINY_CFG, seed=5)
    return {
        "hf": write_hf_dir(d / "hf", TINY_CFG, w, tokenizer=tok),
        "gguf": write_gguf(d / "m.gguf", TINY_CFG, w, "Q4_1", tokenizer_vocab=gguf_tokenizer_fields(tok)),
        "weights": w,
    }


@pytest.mark.parametrize("kind", ["hf", "gguf"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_converted_equals_in_memory(tmp_path, sources, kind, dtype):
    out = convert(sources[kind], tmp_path / "out", dtype, progress=False).out
    assert json.loads((out / "config.json").read_text())["format"] == "fastinfer"
    converted = fastinfer.load(out)
    in_memory = fastinfer.load(sources[kind], dtype=dtype)
    assert converted.weights.wqkv.kind_name == in_memory.weights.wqkv.kind_name
    np.testing.assert_array_equal(converted.forward(IDS), in_memory.forward(IDS))
    # and a converted checkpoint converts again (to itself, for auto)
    again = convert(out, tmp_path / "again", "auto", progress=False).out
    np.testing.assert_array_equal(fastinfer.load(again).forward(IDS), converted.forward(IDS))


def test_dtype_formats(sources):
    kinds = {d: fastinfer.load(sources["hf"], dtype=d).weights for d in DTYPES}
    assert kinds["auto"].wqkv.kind_name == "F32" and kinds["f32"].wqkv.kind_name == "F32"
    assert kinds["bf16"].wqkv.kind_name == "BF16"
    assert kinds["int8"].wqkv.kind_name == "Q8_0"
    assert kinds["int4"].wqkv.kind_name == "Q4_1"
    assert kinds["int4"].tok_embeddings.kind_name == "Q8_0"  # embeddings stay at 8 bits
    g = fastinfer.load(sources["gguf"], dtype="int4").weights
    assert g.wqkv.kind_name == "Q4_1"  # a 4-bit source keeps its own blocks


def test_gguf_int4_keeps_source_values(sources):
    a = fastinfer.load(sources["gguf"], dtype="int4", activations="f32", kv_type="f32").forward(IDS)
    want = reference.llama_forward_gguf(sources["gguf"], IDS)
    np.testing.assert_allclose(a, want, atol=2e-4, rtol=0)


# Relative logit error against the float64 reference on a tiny random model (seed 5); random
# weights amplify quantization error through the layers, so these bound regressions, not quality.
@pytest.mark.parametrize("dtype,tol", [("f32", 1e-5), ("bf16", 0.015), ("int8", 0.04), ("int4", 0.5)])
def test_quantized_logits_near_reference(sources, dtype, tol):
    got = fastinfer.load(sources["hf"], dtype=dtype, activations="f32", kv_type="f32").forward(IDS)
    want = reference.llama_forward(sources["weights"], TINY_CFG, IDS)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= tol


def test_refuses_to_overwrite(tmp_path, sources):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        convert(sources["hf"], out, "int8", progress=False)
    # --force replaces only a previous fastinfer output: a directory of the user's files stays
    with pytest.raises(ValueError, match="replaces only a previous fastinfer output; .* is not one"):
        convert(sources["hf"], out, "int8", force=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    out.rmdir()
    convert(sources["hf"], out, "int8", progress=False)
    first = (out / "model.safetensors").stat().st_mtime_ns
    convert(sources["hf"], out, "int4", force=True, progress=False)  # a previous output: replaced
    assert json.loads((out / "config.json").read_text())["dtype"] == "int4"
    assert (out / "model.safetensors").stat().st_mtime_ns != first
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left beside it


def test_force_never_deletes_the_source_or_other_files(tmp_path, sources):
    import shutil
    # the source inside the output directory
    home = tmp_path / "models"
    shutil.copytree(sources["hf"], home / "hf")
    with pytest.raises(ValueError, match="holds the source"):
        convert(home / "hf", home, "int8", force=True, progress=False)
    # a model folder (not a fastinfer output) as the output
    with pytest.raises(ValueError, match="is not one"):
        convert(sources["gguf"], home / "hf", "int8", force=True, progress=False)
    # a previous output the user put files into
    out = convert(sources["hf"], tmp_path / "out", "int8", progress=False).out
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="also holds notes.txt"):
        convert(sources["hf"], out, "int8", force=True, progress=False)
    # a file as the output
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match="is not one"):
        convert(sources["hf"], tmp_path / "file", "int8", force=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "mine"
    assert sorted(p.name for p in (home / "hf").iterdir()) == sorted(p.name for p in sources["hf"].iterdir())


def test_interrupted_convert_leaves_nothing(tmp_path, sources, monkeypatch):
    import fastinfer.weights.converted as conv

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        convert(sources["hf"], tmp_path / "out", "int8", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_truncated_converted_checkpoint(tmp_path, sources):
    out = convert(sources["hf"], tmp_path / "out", "int8", progress=False).out
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-500])
    with pytest.raises(ValueError, match="truncated|past the end"):
        fastinfer.load(out)


def test_corrupt_converted_checkpoint(tmp_path, sources):
    out = convert(sources["hf"], tmp_path / "out", "int8", progress=False).out
    (out / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="model.safetensors"):
        fastinfer.load(out)


def test_future_format_version(tmp_path, sources):
    out = convert(sources["hf"], tmp_path / "out", "auto", progress=False).out
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        fastinfer.load(out)


def test_cli_convert(tmp_path, sources):
    run = lambda *a: subprocess.run([sys.executable, "-m", "fastinfer", "convert", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=600)
    r = run(str(sources["gguf"]), "-o", str(tmp_path / "c"), "--dtype", "int8")
    assert r.returncode == 0, r.stderr
    assert "MB" in r.stdout and "worst tensor" in r.stdout
    r = run(str(sources["gguf"]), "-o", str(tmp_path / "c"), "--dtype", "int8")
    assert r.returncode == 1 and "--force" in r.stderr and "Traceback" not in r.stderr
    r = run(str(sources["gguf"]), "-o", str(tmp_path / "d"), "--dtype", "int3")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "keep.txt").write_text("mine")
    r = run(str(sources["gguf"]), "-o", str(tmp_path / "e"), "--force")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "is not one" in r.stderr
    assert (tmp_path / "e" / "keep.txt").read_text() == "mine"
