"""Memory-mapped safetensors reading, including bfloat16 (which numpy has no dtype for).

The format: an 8-byte little-endian header length, a JSON header mapping each tensor name to its
dtype, shape and byte range, then the raw little-endian data.
"""
import json
import struct
from pathlib import Path

import numpy as np

# BF16 comes back as its raw uint16 bits; the caller decides what to do with them.
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_, "C64": np.complex64}  # C64: FNet's saved DFT matrices (skipped)


def read_safetensors(path: Path, with_metadata: bool = False):
    """name -> (safetensors dtype string, read-only memory-mapped array).

    With with_metadata, returns (that dict, the header's __metadata__ dict).
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError("header length exceeds the file")
            header = json.loads(fh.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a valid safetensors file ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    if not header:
        return ({}, meta) if with_metadata else {}
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        dt = info.get("dtype")
        if dt not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {dt}")
        start, end = info["data_offsets"]
        if end > data.shape[0]:
            raise ValueError(f"{path}: tensor {name} runs past the end of the file (truncated?)")
        arr = data[start:end].view(_DTYPES[dt]).reshape(info["shape"])
        out[name] = (dt, arr)
    return (out, meta) if with_metadata else out
