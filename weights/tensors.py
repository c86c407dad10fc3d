"""Weight matrices in the layouts the kernels read (see `fastinfer.kernels.linear`).

A `QMatrix` is a stack of L matrices (rows, cols) in one storage format. Checkpoint readers
produce one per tensor (L = 1); the model graph stacks a role's matrices over layers so that one
compiled call runs every layer.
"""
from dataclasses import dataclass

import numpy as np

from fastinfer.kernels import linear as K

from .gguf_meta import GGML_TYPES

_NO_U8 = np.zeros((0, 0, 0), np.uint8)
_NO_F32 = np.zeros((0, 0, 0), np.float32)

# ggml block types kept as stored: name -> (kernel kind, bytes per 32-element block)
_BLOCK_BYTES = {name: nbytes for name, _, nbytes in GGML_TYPES.values()}
GGML_BLOCKS = {name: (kind, _BLOCK_BYTES[name]) for name, kind in (("Q8_0", K.Q8_0), ("Q4_0", K.Q4_0), ("Q4_1", K.Q4_1))}


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
    return stack_joined([[w] for w in ws])


def stack_joined(layers: list[list[QMatrix]]) -> QMatrix:
    """One stack over layers, each layer's matrices joined along their rows (one matmul for several).

    layers[i] lists layer i's matrices in row order. Every format quantizes within a row, so
    joining rows keeps values exact; mixed formats fall back to f32 for the whole stack.

    Consumes `layers`: each entry is dropped once copied into the stack, whose pages the OS
    supplies as they are written, so a load holds about one copy of the weights instead of the
    per-layer, stacked and joined copies side by side.
    """
    first = layers[0]
    if any(w.n != 1 for ws in layers for w in ws):
        raise ValueError("stack_joined takes one layer per matrix")
    shapes = [(w.rows, w.cols) for w in first]
    if any([(w.rows, w.cols) for w in ws] != shapes for ws in layers):
        raise ValueError(f"layers disagree on a weight's shape: "
                         f"{sorted({(w.rows, w.cols) for ws in layers for w in ws})}")
    if len({cols for _, cols in shapes}) != 1:
        raise ValueError(f"matrices to join must share their columns: {shapes}")
    widen = to_f32 if len({w.kind for ws in layers for w in ws}) > 1 else (lambda w: w)
    proto = widen(first[0])
    out = {}
    for name in "qsmf":
        a = getattr(proto, name)
        out[name] = a if a.shape[0] == 0 else np.empty((len(layers), sum(r for r, _ in shapes), a.shape[2]), a.dtype)
    for i in range(len(layers)):
        ws, layers[i] = layers[i], None
        row = 0
        for w in map(widen, ws):
            for name, a in out.items():
                if a.shape[0]:
                    a[i, row:row + w.rows] = getattr(w, name)[0]
            row += w.rows
        del ws, w
    return QMatrix(proto.kind, out["q"], out["s"], out["m"], out["f"], sum(r for r, _ in shapes), shapes[0][1])
