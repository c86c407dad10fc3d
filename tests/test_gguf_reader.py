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
    plain = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in mine.metadata.items()}
    assert plain == want  # numeric arrays come back as numpy arrays
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


def _resident_kb(path) -> int:
    """Resident KB of this process's mappings of `path` (from /proc/self/smaps)."""
    total, ours = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            ours = len(head) >= 6 and head[-1] == str(path)
        elif ours and head[0] == "Rss:":
            total += int(head[1])
    return total


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_release_drops_the_mapping_from_resident_memory(tmp_path):
    """Reading every tensor faults the file in; release (per tensor, including pages faulted in
    around it) and release_all leave nothing of the mapping resident, and reading again still works."""
    path = write_gguf(tmp_path / "m.gguf", TINY_CFG, random_llama_weights(TINY_CFG), "Q8_0",
                      tokenizer_vocab=gguf_tokenizer_fields(tiny_bpe_tokenizer()))
    f = open_gguf(path)
    before = [np.array(t.data) for t in f.tensors]
    assert _resident_kb(path) > 0
    for t in f.tensors:
        f.release(t)
    assert _resident_kb(path) == 0
    for t, b in zip(f.tensors, before):
        np.testing.assert_array_equal(np.asarray(t.data), b)   # faults back in from the file
    f.release_all()
    assert _resident_kb(path) == 0
