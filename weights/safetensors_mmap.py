"""Memory-mapped safetensors reading, including bfloat16 (which numpy has no dtype for).

The format: an 8-byte little-endian header length, a JSON header mapping each tensor name to its
dtype, shape and byte range, then the raw little-endian data.
"""
import json
import math
import struct
from pathlib import Path

import numpy as np

# BF16 comes back as its raw uint16 bits; the caller decides what to do with them.
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_, "C64": np.complex64}  # C64: FNet's saved DFT matrices (skipped)


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object_pairs_hook: a key given twice is an error (json keeps the last silently, other
    readers the first, so the file means different things to different tools)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {dup!r:.60} appears twice")
    return out


_MAX_HEADER = 100 << 20  # as the safetensors library: a header beyond 100 MB is refused unread


def read_safetensors(path: Path, with_metadata: bool = False):
    """name -> (safetensors dtype string, read-only memory-mapped array).

    With with_metadata, returns (that dict, the header's __metadata__ dict of strings).
    The header is validated as the safetensors library does: every tensor's dtype and shape
    known, its byte range the size its shape needs, and the ranges tiling the data exactly (no
    overlap, no gap, nothing outside the file).
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > min(size - 8, _MAX_HEADER):
                raise ValueError(f"header length {n} exceeds the file or {_MAX_HEADER} bytes")
            header = json.loads(fh.read(n), object_pairs_hook=unique_keys)
    except (struct.error, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not a valid safetensors file ({str(e) or type(e).__name__})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a valid safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{path}: __metadata__ must map names to strings")
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        spans.append((*_span(path, name, info), name))
    pos = 0
    for start, end, name in sorted(spans):
        if start != pos:
            raise ValueError(f"{path}: tensor {name}'s data starts at byte {start}, expected {pos} "
                             f"({'overlapping another tensor' if start < pos else 'a gap before it'})")
        pos = end
    if pos != data_size:
        raise ValueError(f"{path}: the tensors' data ends at byte {pos} of {data_size} (truncated or padded?)")
    if not header:
        return ({}, meta) if with_metadata else {}
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        out[name] = (info["dtype"], data[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"]))
    return (out, meta) if with_metadata else out


def _span(path: Path, name: str, info) -> tuple[int, int]:
    """A header entry's byte range, once its dtype, shape and offsets are checked."""
    if not isinstance(info, dict):
        raise ValueError(f"{path}: tensor {name}'s header entry is not an object")
    dt, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dt, str) or dt not in _DTYPES:
        raise ValueError(f"{path}: tensor {name} has unsupported dtype {dt!r:.20}")
    ints = lambda v, k: isinstance(v, list) and len(v) <= k and all(  # noqa: E731
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
    if not ints(shape, 8):
        raise ValueError(f"{path}: tensor {name} has shape {shape!r:.40}; expected a list of non-negative integers")
    if not ints(offsets, 2) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise ValueError(f"{path}: tensor {name} has data_offsets {offsets!r:.40}; expected [start, end]")
    nbytes = math.prod(shape) * np.dtype(_DTYPES[dt]).itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(f"{path}: tensor {name} is {dt} {shape} ({nbytes} bytes) but its data_offsets "
                         f"span {offsets[1] - offsets[0]} bytes")
    return offsets[0], offsets[1]
