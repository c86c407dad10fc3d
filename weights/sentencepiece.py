"""SentencePiece `.model` files (FNet's and ALBERT's spiece.model) -> a `tokenizers` Unigram tokenizer.

A .model file is a small protobuf (sentencepiece_model.proto's ModelProto). Only the fields a
Unigram tokenizer needs are read, with a minimal wire-format decoder, so neither sentencepiece
nor protobuf is a dependency:

    ModelProto      1 pieces (repeated SentencePiece), 2 trainer_spec, 3 normalizer_spec
    SentencePiece   1 piece (string), 2 score (float), 3 type (1 normal, 2 unknown, 3 control,
                    4 user defined, 5 unused, 6 byte)
    TrainerSpec     3 model_type (1 unigram), 35 byte_fallback, 40 unk_id
    NormalizerSpec  2 precompiled_charsmap (bytes)

The pipeline around the model is transformers' AlbertTokenizer (which FNetTokenizer is):
``/'' -> ", NFKD + strip accents unless keep_accents, lowercase if do_lower_case, the file's
precompiled normalization, whitespace split, "▁" word prefixes, [CLS] text [SEP].
"""
import struct
from pathlib import Path

import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers, processors


def _fields(buf: bytes):
    """Yield (field number, wire type, value) of one protobuf message."""
    i, n = 0, len(buf)

    def varint():
        nonlocal i
        shift = value = 0
        while True:
            if i >= n:
                raise ValueError("truncated varint")
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7

    while i < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, wire, varint()
        elif wire == 1:
            yield field, wire, buf[i:i + 8]
            i += 8
        elif wire == 2:
            size = varint()
            if i + size > n:
                raise ValueError("truncated field")
            yield field, wire, buf[i:i + size]
            i += size
        elif wire == 5:
            yield field, wire, buf[i:i + 4]
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


def read_model(path: Path) -> dict:
    """{"pieces": [(piece, score, type)], "model_type", "unk_id", "byte_fallback", "charsmap"}."""
    out = {"pieces": [], "model_type": 1, "unk_id": 0, "byte_fallback": False, "charsmap": b""}
    try:
        for field, wire, value in _fields(Path(path).read_bytes()):
            if field == 1 and wire == 2:
                piece, score, kind = "", 0.0, 1
                for f, w, v in _fields(value):
                    if f == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif f == 2 and w == 5:
                        score = struct.unpack("<f", v)[0]
                    elif f == 3 and w == 0:
                        kind = v
                out["pieces"].append((piece, score, kind))
            elif field == 2 and wire == 2:
                for f, w, v in _fields(value):
                    if f == 3 and w == 0:
                        out["model_type"] = v
                    elif f == 35 and w == 0:
                        out["byte_fallback"] = bool(v)
                    elif f == 40 and w == 0:
                        out["unk_id"] = v
            elif field == 3 and wire == 2:
                for f, w, v in _fields(value):
                    if f == 2 and w == 2:
                        out["charsmap"] = bytes(v)
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(f"{path} is not a valid SentencePiece model ({e})") from None
    if not out["pieces"]:
        raise ValueError(f"{path} is not a valid SentencePiece model (it holds no pieces)")
    if out["model_type"] != 1:
        raise ValueError(f"{path}: only Unigram SentencePiece models are supported (model_type "
                         f"{out['model_type']}; 1 is Unigram)")
    return out


def albert_tokenizer(path: Path, do_lower_case: bool = True, keep_accents: bool = False) -> tokenizers.Tokenizer:
    """The tokenizer transformers' AlbertTokenizer/FNetTokenizer builds around a spiece.model."""
    m = read_model(path)
    tok = tokenizers.Tokenizer(tokenizers.models.Unigram([(p, s) for p, s, _ in m["pieces"]], unk_id=m["unk_id"],
                                                         byte_fallback=m["byte_fallback"]))
    norm = [normalizers.Replace("``", '"'), normalizers.Replace("''", '"')]
    if not keep_accents:
        norm += [normalizers.NFKD(), normalizers.StripAccents()]
    if do_lower_case:
        norm.append(normalizers.Lowercase())
    if m["charsmap"]:
        norm.append(normalizers.Precompiled(m["charsmap"]))
    tok.normalizer = normalizers.Sequence(norm)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    control = [p for p, _, kind in m["pieces"] if kind in (2, 3)]  # unknown and control pieces
    tok.add_special_tokens(control)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls is not None and sep is not None:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok
