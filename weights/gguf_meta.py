"""A fast GGUF reader: metadata as plain Python values, tensors as memory-mapped arrays.

The `gguf` package's GGUFReader builds a numpy view for every element of every metadata array,
which takes about 3 s on a 49k-token vocabulary; this reads the same file format (GGUF v2/v3:
header, key/value pairs, tensor infos, aligned data) in a fraction of that. The `gguf` package
still provides the sizes and dequantizers of the tensor types fastinfer does not read itself.
"""
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# GGUF value type -> numpy dtype, for scalars and numeric arrays
_NUMERIC = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
            6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
# The GGML tensor types fastinfer reads itself (ggml.h, enum ggml_type): id -> (name, elements per
# block, bytes per block). The other types' sizes and dequantizers come from the gguf package,
# imported only when a file has one: importing it costs ~3.5 MB of resident memory.
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
              8: ("Q8_0", 32, 34), 30: ("BF16", 1, 2)}
_TENSOR_DTYPES = {0: np.float32, 1: np.float16}


def ggml_type_name(ttype: int) -> str:
    """"Q4_1" for 3, and so on; the gguf package names the types fastinfer does not read itself."""
    if ttype in GGML_TYPES:
        return GGML_TYPES[ttype][0]
    from gguf import GGMLQuantizationType
    try:
        return GGMLQuantizationType(ttype).name
    except ValueError:
        return f"type {ttype}"


def _block_size(ttype: int) -> tuple[int, int]:
    """(elements, bytes) of one block of GGML type ttype."""
    if ttype in GGML_TYPES:
        return GGML_TYPES[ttype][1:]
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
    except (ValueError, KeyError):
        raise ValueError(f"unknown GGML tensor type {ttype}") from None


@dataclass
class GGUFTensor:
    name: str
    tensor_type: int        # GGML type id (ggml_type_name names it)
    shape: tuple[int, ...]  # outermost first (rows, cols), unlike GGUF's own order
    data: np.ndarray        # F32/F16: values of `shape`; other types: uint8 (rows, row_bytes)


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]
    mapping: np.memmap | None = None  # the whole file, read-only

    def release(self, t: GGUFTensor) -> None:
        """Drop t's pages, and any faulted in just before it, from this process's resident memory.

        Call it once t's data has been copied. The mapping is read-only and file-backed, so
        MADV_DONTNEED loses nothing: a later read (a view that was not copied) faults the page back
        in from the page cache. Without this, every byte of the file stays counted in RSS beside
        the arrays built from it. Reading one tensor also maps neighbouring pages (the kernel's
        fault-around, whole large folios of the page cache), which can reach back into tensors
        released earlier; so the range starts `_BACK` bytes before t. `release_all` ends a load.
        """
        if self.mapping is None or t.data.size == 0:
            return
        lo = t.data.ctypes.data - self.mapping.ctypes.data
        self._drop(lo - _BACK, lo + t.data.nbytes)

    def release_all(self) -> None:
        """Drop every page of the mapping from resident memory (see `release`)."""
        if self.mapping is not None:
            self._drop(0, self.mapping.shape[0])

    def _drop(self, lo: int, hi: int) -> None:
        page = mmap.PAGESIZE
        lo, hi = max(lo, 0) // page * page, min(-(-hi // page) * page, self.mapping.shape[0])
        if hi > lo:
            self.mapping._mmap.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


_BACK = 4 << 20  # twice the largest page-cache folio that one fault maps (2 MiB on x86-64)


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def string(self) -> str:
        n = self.take("Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype == _STRING:
                return [self.string() for _ in range(count)]
            if etype == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            dt = np.dtype(_NUMERIC[etype]).newbyteorder("<")
            arr = np.frombuffer(self.buf, dt, count, self.pos)
            self.pos += count * dt.itemsize
            return arr.tolist()
        if vtype not in _NUMERIC:
            raise ValueError(f"unknown GGUF value type {vtype}")
        dt = np.dtype(_NUMERIC[vtype]).newbyteorder("<")
        v = np.frombuffer(self.buf, dt, 1, self.pos)[0]
        self.pos += dt.itemsize
        return v.item()


def open_gguf(path: str | Path) -> GGUFFile:
    """Read a GGUF file's metadata and map its tensors, with a clear error for bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return _read(path)
    except (ValueError, struct.error, IndexError, KeyError, OverflowError) as e:
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def _read(path: Path) -> GGUFFile:
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    c = _Cursor(memoryview(mm))
    if bytes(mm[:4]) != b"GGUF":
        raise ValueError("bad magic (not a GGUF file)")
    c.pos = 4
    version, n_tensors, n_kv = c.take("I"), c.take("Q"), c.take("Q")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (supported: 2, 3)")
    if n_tensors > 1 << 20 or n_kv > 1 << 20:
        raise ValueError("implausible tensor or key count")
    meta = {}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = c.value(c.take("I"))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.take("I")
        dims = [c.take("Q") for _ in range(n_dims)]
        infos.append((name, dims, c.take("I"), c.take("Q")))
    align = int(meta.get("general.alignment", 32))
    start = (c.pos + align - 1) // align * align
    tensors = []
    for name, dims, ttype, offset in infos:
        block, type_size = _block_size(ttype)
        n = int(np.prod(dims)) if dims else 1
        nbytes = n // block * type_size
        lo = start + offset
        if lo + nbytes > mm.shape[0]:
            raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")
        raw = mm[lo:lo + nbytes]
        shape = tuple(int(d) for d in reversed(dims))
        if ttype in _TENSOR_DTYPES:
            data = raw.view(_TENSOR_DTYPES[ttype]).reshape(shape)
        else:
            data = raw.reshape(shape[:-1] + (-1,)) if len(shape) > 1 else raw
        tensors.append(GGUFTensor(name, ttype, shape, data))
    return GGUFFile(path, meta, tensors, mm)


def read_metadata(f: GGUFFile) -> dict[str, Any]:
    """All key/value fields of an open GGUF file: str, int, float, bool or lists of them."""
    return f.metadata
