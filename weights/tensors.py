"""Weight matrices in the layouts the kernels read (see `fastinfer.kernels.linear`).

A `QMatrix` is a stack of L matrices (rows, cols) in one storage format. Checkpoint readers
produce one per tensor (L = 1); the model graph stacks a role's matrices over layers so that one
compiled call runs every layer.
"""
from dataclasses import dataclass

import numpy as np

from fastinfer.kernels import linear as K

_NO_U8 = np.zeros((0, 0, 0), np.uint8)
_NO_F32 = np.zeros((0, 0, 0), np.float32)

# ggml block types kept as stored: name -> (kernel kind, bytes per 32-element block)
GGML_BLOCKS = {"Q8_0": (K.Q8_0, 34), "Q4_0": (K.Q4_0, 18), "Q4_1": (K.Q4_1, 20)}


def readonly(a: np.ndarray) -> np.ndarray:
    """A read-only plain-ndarray view. Numba types read-only and writable arrays apart, and weights
    may come from read-only memory maps, so the model graph always sees them read-only."""
    v = np.asarray(a).view()
    v.flags.writeable = False
    return v


@dataclass
class QMatrix:
    kind: int
    q: np.ndarray  # uint8 (L, rows, row_bytes)
    s: np.ndarray  # f32 (L, rows, cols // 32)
    m: np.ndarray  # f32 (L, rows, cols // 32)
    f: np.ndarray  # f32 (L, rows, cols)
    rows: int
    cols: int

    @property
    def kind_name(self) -> str:
        return K.KIND_NAMES[self.kind]

    @property
    def n(self) -> int:
        return max(a.shape[0] for a in (self.q, self.s, self.m, self.f))

    def args(self) -> tuple:
        """The tuple the kernels take (read-only views, so every model compiles to one signature)."""
        return (self.kind, readonly(self.q), readonly(self.s), readonly(self.m), readonly(self.f))

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.s.nbytes + self.m.nbytes + self.f.nbytes


def from_f32(a: np.ndarray) -> QMatrix:
    a = np.ascontiguousarray(a, dtype=np.float32)
    rows, cols = a.shape
    return QMatrix(K.F32, _NO_U8, _NO_F32, _NO_F32, a[None], rows, cols)


def from_half_bits(bits: np.ndarray, kind: int) -> QMatrix:
    """uint16 (rows, cols) holding float16 (kind F16) or bfloat16 (kind BF16) bits."""
    rows, cols = bits.shape
    q = np.ascontiguousarray(bits, dtype=np.uint16).view(np.uint8)
    return QMatrix(kind, q[None], _NO_F32, _NO_F32, _NO_F32, rows, cols)


def from_ggml_blocks(raw: np.ndarray, type_name: str, cols: int) -> QMatrix:
    """uint8 (rows, row_bytes) in a ggml block format, split into values and f32 scales."""
    kind, block_bytes = GGML_BLOCKS[type_name]
    rows = raw.shape[0]
    nb = cols // K.QK
    blk = np.asarray(raw, dtype=np.uint8).reshape(rows, nb, block_bytes)
    d = np.ascontiguousarray(blk[:, :, 0:2]).view(np.float16).reshape(rows, nb).astype(np.float32)
    if type_name == "Q4_1":
        mn = np.ascontiguousarray(blk[:, :, 2:4]).view(np.float16).reshape(rows, nb).astype(np.float32)
        vals = blk[:, :, 4:]
    else:
        mn = None
        vals = blk[:, :, 2:]
    q = np.ascontiguousarray(vals).reshape(rows, -1)
    return QMatrix(kind, q[None], d[None], _NO_F32 if mn is None else mn[None], _NO_F32, rows, cols)


def permute_rows(w: QMatrix, order: np.ndarray) -> QMatrix:
    """The same matrices with their rows reordered: new row i is old row order[i]."""
    take = lambda a: a if a.shape[0] == 0 else np.ascontiguousarray(a[:, order])  # noqa: E731
    return QMatrix(w.kind, take(w.q), take(w.s), take(w.m), take(w.f), w.rows, w.cols)


def to_f32(w: QMatrix) -> QMatrix:
    """Expand every matrix of the stack to plain f32."""
    if w.kind == K.F32:
        return w
    out = np.empty((w.n, w.rows, w.cols), np.float32)
    for layer in range(w.n):
        K.dequant_matrix(out[layer], w.args(), layer)
    return QMatrix(K.F32, _NO_U8, _NO_F32, _NO_F32, out, w.rows, w.cols)


def stack(ws: list[QMatrix]) -> QMatrix:
    """Stack per-layer matrices of one shape. Mixed formats fall back to f32 for the stack."""
    first = ws[0]
    if any((w.rows, w.cols) != (first.rows, first.cols) for w in ws):
        raise ValueError(f"layers disagree on a weight's shape: {sorted({(w.rows, w.cols) for w in ws})}")
    if any(w.kind != first.kind for w in ws):
        ws = [to_f32(w) for w in ws]
        first = ws[0]
    cat = lambda name: getattr(first, name) if getattr(first, name).shape[0] == 0 else \
        np.concatenate([getattr(w, name) for w in ws])  # noqa: E731
    return QMatrix(first.kind, cat("q"), cat("s"), cat("m"), cat("f"), first.rows, first.cols)


def concat_rows(ws: list[QMatrix]) -> QMatrix:
    """Stacks with the same layers and columns joined along their rows (one matmul for several).

    Every format quantizes within a row, so joining rows keeps values exact; mixed formats fall
    back to f32.
    """
    first = ws[0]
    if any((w.n, w.cols) != (first.n, first.cols) for w in ws):
        raise ValueError("matrices to join must share their layer count and columns")
    if any(w.kind != first.kind for w in ws):
        ws = [to_f32(w) for w in ws]
        first = ws[0]
    cat = lambda name: getattr(first, name) if getattr(first, name).shape[0] == 0 else \
        np.concatenate([getattr(w, name) for w in ws], axis=1)  # noqa: E731
    return QMatrix(first.kind, cat("q"), cat("s"), cat("m"), cat("f"), sum(w.rows for w in ws), first.cols)
