"""fastinfer's GGUF reader against the gguf package's own GGUFReader, on real and written files."""
import gguf
import numpy as np
import pytest

from fastinfer.weights.gguf_meta import open_gguf
from tiny_models import TINY_CFG, gguf_tokenizer_fields, random_llama_weights, tiny_bpe_tokenizer, write_gguf


def _same_as_gguf_package(path):
    mine = open_gguf(path)
    ref = gguf.GGUFReader(str(path))
    want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert mine.metadata == want
    assert [t.name for t in mine.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(mine.tensors, ref.tensors):
        assert a.tensor_type == b.tensor_type
        assert a.shape == tuple(int(d) for d in reversed(b.shape))
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))


@pytest.mark.parametrize("ggml_type", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_written_files(tmp_path, ggml_type):
    path = write_gguf(tmp_path / "m.gguf", TINY_CFG, random_llama_weights(TINY_CFG), ggml_type,
                      tokenizer_vocab=gguf_tokenizer_fields(tiny_bpe_tokenizer()))
    _same_as_gguf_package(path)


def test_real_model(smollm2_gguf):
    _same_as_gguf_package(smollm2_gguf)


def test_bad_magic_and_version(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(ValueError, match="magic"):
        open_gguf(p)
    p.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(60))
    with pytest.raises(ValueError, match="version 9"):
        open_gguf(p)
