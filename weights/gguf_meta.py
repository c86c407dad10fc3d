"""A fast GGUF reader: metadata as plain Python values, tensors as memory-mapped arrays.

The `gguf` package's GGUFReader builds a numpy view for every element of every metadata array,
which takes about 3 s on a 49k-token vocabulary; this reads the same file format (GGUF v2/v3:
header, key/value pairs, tensor infos, aligned data) in a fraction of that. The `gguf` package
still provides the sizes and dequantizers of the tensor types fastinfer does not read itself.
"""
import math
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
_MAX_DIMS = 4  # GGML_MAX_DIMS


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

    def release(self, t: GGUFTensor, part: np.ndarray | None = None) -> None:
        """Drop t's pages, and any faulted in just before it, from this process's resident memory.

        Call it once t's data (or `part`, a slice of it) has been copied. The mapping is read-only and file-backed, so
        MADV_DONTNEED loses nothing: a later read (a view that was not copied) faults the page back
        in from the page cache. Without this, every byte of the file stays counted in RSS beside
        the arrays built from it. Reading one tensor also maps neighbouring pages (the kernel's
        fault-around, whole large folios of the page cache), which can reach back into tensors
        released earlier; so the range starts `_BACK` bytes before t. `release_all` ends a load.
        """
        part = t.data if part is None else part  # a slice of t.data already copied
        if self.mapping is None or part.size == 0:
            return
        lo = part.ctypes.data - self.mapping.ctypes.data
        self._drop(lo - _BACK, lo + part.nbytes)

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


# Bounds on what metadata may make this process build: the largest vocabularies have ~262k tokens
# and ~500k merges; a string array beyond this is refused before its strings become objects.
MAX_STRING_ARRAY = 1 << 21
_MAX_NESTING = 2


_U64 = struct.Struct("<Q")


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def _need(self, nbytes: int, what: str) -> None:
        if nbytes > len(self.buf) - self.pos:
            raise ValueError(f"{what} at byte {self.pos} runs past the end of the file (truncated?)")

    def string(self) -> str:
        return self.strings(1)[0]

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row (a vocabulary, its merges), each its uint64 length and UTF-8 bytes."""
        unpack, buf, pos, end = _U64.unpack_from, self.buf, self.pos, len(self.buf)
        out: list[str] = []
        append = out.append
        for _ in range(count):
            (n,) = unpack(buf, pos)
            pos += 8
            if n > end - pos:
                self.pos = pos
                self._need(n, f"a string of {n} bytes")
            try:
                append(str(buf[pos:pos + n], "utf-8"))
            except UnicodeDecodeError:
                raise ValueError(f"the string at byte {pos} is not UTF-8") from None
            pos += n
        self.pos = pos
        return out

    def name(self, what: str) -> str:
        """A key or tensor name: UTF-8 without control characters (they would garble messages)."""
        s = self.string()
        if not s.isprintable():
            raise ValueError(f"a {what} name {s[:60]!r} holds control characters")
        return s

    def value(self, vtype: int, depth: int = 0):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype == _STRING:
                # every string takes at least its 8-byte length: a count the file cannot hold is
                # refused before the loop, as is one that would make millions of objects
                self._need(8 * count, f"an array of {count} strings")
                if count > MAX_STRING_ARRAY:
                    raise ValueError(f"an array of {count} strings (at most {MAX_STRING_ARRAY} are read)")
                return self.strings(count)
            if etype == _ARRAY:
                if depth >= _MAX_NESTING:
                    raise ValueError(f"arrays nested deeper than {_MAX_NESTING}")
                self._need(12 * count, f"an array of {count} arrays")
                return [self.value(_ARRAY, depth + 1) for _ in range(count)]
            if etype not in _NUMERIC:
                raise ValueError(f"unknown GGUF array element type {etype}")
            dt = np.dtype(_NUMERIC[etype]).newbyteorder("<")
            self._need(count * dt.itemsize, f"an array of {count} numbers")
            # a numpy copy: compact (a list of Python numbers costs ~5x the bytes), and no view
            # pins the mapping
            arr = np.frombuffer(self.buf, dt, count, self.pos).astype(dt.newbyteorder("="))
            self.pos += count * dt.itemsize
            return arr
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
    except ValueError as e:
        raise ValueError(f"{path} is not a readable GGUF file ({e})") from None
    except (struct.error, IndexError, KeyError, OverflowError) as e:
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt: {type(e).__name__})") from None


def _read(path: Path) -> GGUFFile:
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    size = mm.shape[0]
    c = _Cursor(memoryview(mm))
    if bytes(mm[:4]) != b"GGUF":
        raise ValueError("bad magic (not a GGUF file)")
    c.pos = 4
    version, n_tensors, n_kv = c.take("I"), c.take("Q"), c.take("Q")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (supported: 2, 3)")
    # a key/value pair takes at least 12 bytes and a tensor info 24: counts the file cannot hold
    # are refused before any loop runs over them
    if 12 * n_kv + 24 * n_tensors > size:
        raise ValueError(f"{n_kv} keys and {n_tensors} tensors cannot fit in a file of {size} bytes")
    meta = {}
    for _ in range(n_kv):
        key = c.name("metadata key")
        if key in meta:
            raise ValueError(f"metadata key {key} appears twice")
        meta[key] = c.value(c.take("I"))
    infos, names = [], set()
    for _ in range(n_tensors):
        name = c.name("tensor")
        if name in names:
            raise ValueError(f"tensor {name} appears twice")
        names.add(name)
        n_dims = c.take("I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise ValueError(f"tensor {name} has {n_dims} dimensions (GGUF allows 1..{_MAX_DIMS})")
        dims = [c.take("Q") for _ in range(n_dims)]
        infos.append((name, dims, c.take("I"), c.take("Q")))
    align = meta.get("general.alignment", 32)
    if isinstance(align, bool) or not isinstance(align, int) or not 1 <= align <= 1 << 16 or align & (align - 1):
        raise ValueError(f"general.alignment = {str(align)[:40]}; expected a power of two up to 65536")
    start = (c.pos + align - 1) // align * align
    if start > size or any(mm[c.pos:start]):
        raise ValueError(f"the {start - c.pos} bytes after the tensor infos are not padding "
                         f"(is the tensor count {n_tensors} right?)")
    tensors, extents = [], []
    for name, dims, ttype, offset in infos:
        try:
            block, type_size = _block_size(ttype)
        except ValueError:
            raise ValueError(f"tensor {name} has GGML type {ttype}, which fastinfer does not know") from None
        if min(dims) < 1 or dims[0] % block:
            raise ValueError(f"tensor {name} has dimensions {dims}; each must be positive and the first "
                             f"a multiple of {block} for type {ggml_type_name(ttype)}")
        n = math.prod(dims)
        nbytes = n // block * type_size
        lo = start + offset
        if offset % align:
            raise ValueError(f"tensor {name} starts at offset {offset}, not a multiple of the alignment {align}")
        if lo + nbytes > size:
            raise ValueError(f"tensor {name} ({ggml_type_name(ttype)}, {nbytes} bytes at offset {offset}) "
                             f"runs past the end of the file (truncated?)")
        extents.append((lo, lo + nbytes, name, ggml_type_name(ttype)))
        raw = mm[lo:lo + nbytes]
        shape = tuple(int(d) for d in reversed(dims))
        if ttype in _TENSOR_DTYPES:
            data = raw.view(_TENSOR_DTYPES[ttype]).reshape(shape)
        else:
            data = raw.reshape(shape[:-1] + (-1,)) if len(shape) > 1 else raw
        tensors.append(GGUFTensor(name, ttype, shape, data))
    _check_layout(sorted(extents), start, size, align)
    return GGUFFile(path, meta, tensors, mm)


def _check_layout(extents: list[tuple[int, int, str, str]], start: int, size: int, align: int) -> None:
    """Tensor data must tile the data section as GGUF writers lay it out: in any order, each tensor
    starting at the first aligned byte after the one before it, the last one ending the file. A
    tensor whose type does not match its bytes (Q8_0 data labelled Q4_0, F32 labelled F16), an
    overlap or a tensor missing from the count leaves a gap or an overlap here."""
    pos = start
    for lo, hi, name, kind in extents:
        if lo < pos:
            raise ValueError(f"tensor {name} overlaps the tensor before it")
        if lo - pos >= align:
            raise ValueError(f"{lo - pos} bytes before tensor {name} belong to no tensor (is the type "
                             f"of the one before it right, or a tensor missing from the count?)")
        pos = hi
    if size - pos >= align:
        last = extents[-1] if extents else None
        raise ValueError(f"{size - pos} bytes after the last tensor's data belong to no tensor"
                         + (f" (is {last[2]} really {last[3]}?)" if last else ""))


def read_metadata(f: GGUFFile) -> dict[str, Any]:
    """All key/value fields of an open GGUF file: str, int, float, bool or lists of them."""
    return f.metadata
