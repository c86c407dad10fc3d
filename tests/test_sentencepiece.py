"""spiece.model (SentencePiece Unigram) -> tokenizers, read without sentencepiece or protobuf."""
import gzip
import struct

import numpy as np
import pytest

from conftest import DATA
from fastinfer.weights.sentencepiece import albert_tokenizer, read_model


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    key = _varint(num << 3 | wire)
    if wire == 2:
        return key + _varint(len(payload)) + payload
    return key + payload


def write_model(path, pieces, unk_id=1, model_type=1):
    """A ModelProto written field by field from sentencepiece_model.proto."""
    buf = b""
    for piece, score, kind in pieces:
        sp = _field(1, 2, piece.encode()) + _field(2, 5, struct.pack("<f", score)) + _field(3, 0, _varint(kind))
        buf += _field(1, 2, sp)
    trainer = _field(3, 0, _varint(model_type)) + _field(40, 0, _varint(unk_id))
    buf += _field(2, 2, trainer) + _field(3, 2, _field(1, 2, b"identity"))
    path.write_bytes(buf)
    return path


PIECES = [("<pad>", 0.0, 3), ("<unk>", 0.0, 2), ("[CLS]", 0.0, 3), ("[SEP]", 0.0, 3), ("[MASK]", 0.0, 4),
          ("▁the", -1.5, 1), ("▁cat", -2.25, 1), ("▁sat", -3.0, 1), ("▁ca", -4.0, 1), ("t", -5.0, 1),
          ("▁cafe", -2.5, 1), ("▁", -6.0, 1), ("s", -7.0, 1), ("a", -7.0, 1), ("e", -7.0, 1), ("f", -7.0, 1)]


def test_pieces_and_settings_are_read(tmp_path):
    m = read_model(write_model(tmp_path / "spiece.model", PIECES, unk_id=1))
    assert [(p, s, k) for p, s, k in m["pieces"]] == PIECES  # the scores are exact in float32
    assert m["unk_id"] == 1 and m["model_type"] == 1


def test_albert_pipeline(tmp_path):
    tok = albert_tokenizer(write_model(tmp_path / "spiece.model", PIECES), do_lower_case=True, keep_accents=False)
    enc = tok.encode("The  cat sat")
    assert enc.tokens == ["[CLS]", "▁the", "▁cat", "▁sat", "[SEP]"]
    assert enc.ids == [2, 5, 6, 7, 3]
    assert tok.encode("Café").tokens[1:-1] == ["▁cafe"]  # NFKD + accents stripped + lowercase
    cased = albert_tokenizer(tmp_path / "spiece.model", do_lower_case=False, keep_accents=True)
    assert cased.encode("The").tokens[1:-1] != ["▁the"]


def test_bad_files(tmp_path):
    (tmp_path / "junk.model").write_bytes(b"\xff\xff\xff")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        read_model(tmp_path / "junk.model")
    with pytest.raises(ValueError, match="only Unigram"):
        read_model(write_model(tmp_path / "bpe.model", PIECES, model_type=2))


def test_matches_sentencepiece_itself(tmp_path):
    # A real Unigram model trained by sentencepiece on the corpus: same pieces for every line.
    spm = pytest.importorskip("sentencepiece")
    text = gzip.open(DATA / "corpus" / "persuasion.txt.gz", "rt", encoding="utf-8").read()
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 20][:3000]
    (tmp_path / "train.txt").write_text("\n".join(lines[:2000]), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=800, model_type="unigram", user_defined_symbols=["[MASK]"],
                                   control_symbols=["[CLS]", "[SEP]"], minloglevel=2)
    proc = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    ours = albert_tokenizer(tmp_path / "sp.model", do_lower_case=False, keep_accents=True)
    got = [ours.encode(ln).ids[1:-1] for ln in lines[2000:]]
    want = [proc.encode(ln) for ln in lines[2000:]]
    same = np.mean([g == w for g, w in zip(got, want)])
    assert same == 1.0, f"{same:.1%} of lines agree"


def test_fnet_folder_with_only_spiece_model(tmp_path):
    import json

    import fastinfer
    from reference_fnet import FNET_TINY_CFG, fnet_forward, random_fnet_weights, write_fnet_dir
    w = random_fnet_weights(FNET_TINY_CFG, seed=7)
    d = write_fnet_dir(tmp_path / "f", FNET_TINY_CFG, w)
    (d / "tokenizer.json").unlink()
    write_model(d / "spiece.model", PIECES)
    (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False, "keep_accents": True}))
    model = fastinfer.load(d)
    assert model.encode("the cat sat") == [2, 5, 6, 7, 3]
    hidden, _ = fnet_forward(w, FNET_TINY_CFG, [2, 5, 6, 7, 3], head=False)
    np.testing.assert_allclose(model.embed("the cat sat"), hidden.mean(0), atol=2e-5)
