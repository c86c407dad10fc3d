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


def tiled(w: QMatrix) -> QMatrix:
    """w in the 16-row tiles of the decode matvec (kernels/qtile.py) if its format tiles (Q8_0,
    Q4_0, Q4_1), else w itself. The tiles hold the same values in the same number of bytes."""
    if w.kind not in K.TILED:
        return w
    qt, st, mt = K.QT.repack(w.kind, w.q, w.s, w.m)
    return QMatrix(K.TILED[w.kind], qt, st, mt, _NO_F32, w.rows, w.cols)


def tile_all(weights) -> bool:
    """Every QMatrix field of a model's weights dataclass replaced by `tiled`: one repacked copy
    for fields that share a matrix (a tied output), and one matrix at a time, so that each
    untiled copy can go before the next is made. Returns whether every matrix is now tiled."""
    groups: dict[int, list[str]] = {}
    for name, v in vars(weights).items():
        if isinstance(v, QMatrix):
            groups.setdefault(id(v), []).append(name)
    for names in groups.values():
        t = tiled(getattr(weights, names[0]))
        for name in names:
            setattr(weights, name, t)
    return all(getattr(weights, names[0]).kind in K.UNTILED for names in groups.values())


def from_f32(a: np.ndarray) -> QMatrix:
    a = np.ascontiguousarray(a, dtype=np.float32)
    rows, cols = a.shape
    return QMatrix(K.F32, _NO_U8, _NO_F32, _NO_F32, a[None], rows, cols)


def from_half_bits(bits: np.ndarray, kind: int) -> QMatrix:
    """uint16 (rows, cols) holding float16 (kind F16) or bfloat16 (kind BF16) bits."""
    rows, cols = bits.shape
    q = np.ascontiguousarray(bits, dtype=np.uint16).view(np.uint8)
    return QMatrix(kind, q[None], _NO_F32, _NO_F32, _NO_F32, rows, cols)


def from_ggml_blocks(raw: np.ndarray, type_name: str, cols: int, copied=None) -> QMatrix:
    """uint8 (rows, row_bytes) in a ggml block format, split into values and f32 scales.

    Rows are copied in slices of ~16 MB, and `copied(lo, hi)` is called after rows [lo, hi): a
    reader of a mapped file releases those pages then, so a 170 MB embedding is never resident
    twice."""
    kind, block_bytes = GGML_BLOCKS[type_name]
    rows = raw.shape[0]
    nb = cols // K.QK
    blk = np.asarray(raw, dtype=np.uint8).reshape(rows, nb, block_bytes)
    first = 4 if type_name == "Q4_1" else 2  # bytes of f16 scale (and f16 minimum) before the values
    q = np.empty((1, rows, nb * (block_bytes - first)), np.uint8)
    d = np.empty((1, rows, nb), np.float32)
    mn = np.empty((1, rows, nb), np.float32) if type_name == "Q4_1" else _NO_F32
    step = max(1, (16 << 20) // max(1, nb * block_bytes))
    for lo in range(0, rows, step):
        b = blk[lo:lo + step]
        d[0, lo:lo + step] = np.ascontiguousarray(b[:, :, 0:2]).view(np.float16).reshape(len(b), nb)
        if type_name == "Q4_1":
            mn[0, lo:lo + step] = np.ascontiguousarray(b[:, :, 2:4]).view(np.float16).reshape(len(b), nb)
        q[0, lo:lo + step] = b[:, :, first:].reshape(len(b), -1)
        if copied is not None:
            copied(lo, lo + len(b))
    return QMatrix(kind, q, d, mn, _NO_F32, rows, cols)


def from_kquant_blocks(raw: np.ndarray, type_name: str, cols: int) -> QMatrix:
    """uint8 (rows, row_bytes) of a ggml 5-bit or K-quant type -> the kernel kind that holds it
    exactly (weights/kquants.py): Q4_K as Q4_1, Q5_0 / Q5_1 / Q5_K as Q5, Q6_K / Q3_K / Q2_K as Q6."""
    from .kquants import TARGET, repack
    q, s, m = repack(raw, type_name, cols)
    return QMatrix(TARGET[type_name], q[None], s[None], m[None], _NO_F32, raw.shape[0], cols)


def to_q6(w: QMatrix) -> QMatrix:
    """A Q4_0, Q4_1, Q5 or Q6 stack as Q6, exactly: the kind that holds all four, so a role whose
    layers come in different 4- to 6-bit types (K-quant mixes) stacks without widening."""
    from .kquants import pack
    if w.kind == K.Q6:
        return w
    if w.kind not in (K.Q4_0, K.Q4_1, K.Q5):
        raise ValueError(f"{w.kind_name} cannot be held as Q6")
    n, rows, cols = w.n, w.rows, w.cols
    q = np.empty((n, rows, K.row_bytes(K.Q6, cols)), np.uint8)
    s = np.empty((n, rows, cols // 16), np.float32)
    m = np.empty_like(s)
    for layer in range(n):
        lo = w.q[layer, :, :cols // 2].reshape(rows, cols // 32, 16)
        u = np.concatenate([lo & 15, lo >> 4], axis=2).reshape(rows, cols)
        if w.kind == K.Q5:
            u |= np.unpackbits(w.q[layer, :, cols // 2:], axis=1, bitorder="little") << 4
        mn = w.m[layer] if w.kind != K.Q4_0 else -8.0 * w.s[layer]
        q[layer], s[layer], m[layer] = pack(u, w.s[layer], mn, K.Q6)
    return QMatrix(K.Q6, q, s, m, _NO_F32, rows, cols)


def _holds_as_q8_0(w: QMatrix) -> bool:
    """Whether Q8_0 holds w exactly: Q8_0 itself, Q4_0, or Q5 whose offsets are all -16 scales."""
    return w.kind in (K.Q8_0, K.Q4_0) or (w.kind == K.Q5 and np.array_equal(w.m, -16.0 * w.s))


def to_q8_0(w: QMatrix) -> QMatrix | None:
    """A Q8_0, Q4_0 or Q5 stack as Q8_0 if that holds it exactly (every offset is -8 or -16 times
    its block's scale: Q4_0 and Q5_0 data, whose values u - 8 / u - 16 fit a signed byte), else
    None. Q4_K_M files mix Q8_0 and Q5_0 in one role (attn_v)."""
    if w.kind == K.Q8_0:
        return w
    if not _holds_as_q8_0(w):
        return None
    n, rows, cols = w.n, w.rows, w.cols
    q = np.empty((n, rows, cols), np.uint8)
    for layer in range(n):
        lo = w.q[layer, :, :cols // 2].reshape(rows, cols // 32, 16)
        u = np.concatenate([lo & 15, lo >> 4], axis=2).reshape(rows, cols).astype(np.int16)
        if w.kind == K.Q5:
            u |= np.unpackbits(w.q[layer, :, cols // 2:], axis=1, bitorder="little").astype(np.int16) << 4
            u -= 16
        else:
            u -= 8
        q[layer] = u.astype(np.int8).view(np.uint8)
    return QMatrix(K.Q8_0, q, np.ascontiguousarray(w.s), _NO_F32, _NO_F32, rows, cols)


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
    joining rows keeps values exact. Mixed formats take the kind that holds them all exactly: Q6
    for 4- to 6-bit blocks (K-quant mixes give a role different types in different layers), Q8_0
    for Q8_0 beside Q4_0 / Q5_0 blocks, else f32.

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
    kinds = {w.kind for ws in layers for w in ws}
    if len(kinds) == 1:
        widen = lambda w: w  # noqa: E731
    elif kinds <= {K.Q4_0, K.Q4_1, K.Q5, K.Q6}:
        widen = to_q6
    elif all(_holds_as_q8_0(w) for ws in layers for w in ws):
        widen = to_q8_0
    else:
        widen = to_f32
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


# Per format: whether s and m (per K.GROUP elements) are used, and whether f (plain f32) is: what
# `check_matrix` holds every matrix to (q's row bytes are K.row_bytes).
_LAYOUT = {K.F32: (False, False, True), K.F16: (False, False, False), K.BF16: (False, False, False),
           K.Q8_0: (True, False, False), K.Q4_0: (True, False, False), K.Q4_1: (True, True, False),
           K.Q5: (True, True, False), K.Q6: (True, True, False)}
# The largest weight magnitude accepted (2^20): far above any trained model's (a model stored in
# f16 cannot exceed 65504), and low enough that a value grown by a flipped exponent bit is caught
# before it overflows the float32 sums of squares in a norm (which the kernels, compiled with
# fastmath, would turn into silent garbage rather than NaN).
MAX_WEIGHT = float(1 << 20)
# exponent bits of an IEEE half float / a bfloat16 at or above which a value is too large (all
# ones: infinities and NaNs; a half float cannot reach MAX_WEIGHT)
_EXPONENT = {K.F16: (0x7C00, 0x7C00), K.BF16: (0x7F80, (127 + 20) << 7)}


def check_matrix(m, name: str, shape: tuple[int, int, int], source: str) -> None:
    """A ValueError naming the tensor unless m is a QMatrix of shape[0] stacked (rows, cols)
    matrices whose arrays have exactly the dtypes and shapes its format needs (so a kernel never
    reads past them) and whose scales and float values are finite."""
    if not isinstance(m, QMatrix):
        raise ValueError(f"{source}: {name} is a {type(m).__name__}; expected a weight matrix")
    if m.kind not in _LAYOUT or not all(isinstance(a, np.ndarray) and a.ndim == 3 for a in (m.q, m.s, m.m, m.f)):
        raise ValueError(f"{source}: {name} is not a weight matrix fastinfer can read (format code {m.kind})")
    if (m.n, m.rows, m.cols) != tuple(shape):
        raise ValueError(f"{source}: {name} has shape {(m.n, m.rows, m.cols)}; expected {tuple(shape)} "
                         f"from the model's config")
    n, rows, cols = shape
    scales, mins, plain = _LAYOUT[m.kind]
    unit = K.STRETCH if m.kind in (K.Q5, K.Q6) else K.QK
    if scales and cols % unit:
        raise ValueError(f"{source}: {name} has {cols} columns, not a multiple of {unit} for {m.kind_name}")
    q_bytes, G = K.row_bytes(m.kind, cols), K.GROUP.get(m.kind, 1)
    want = {"q": ((n, rows, q_bytes), np.uint8) if q_bytes else ((0, 0, 0), np.uint8),
            "s": ((n, rows, cols // G), np.float32) if scales else ((0, 0, 0), np.float32),
            "m": ((n, rows, cols // G), np.float32) if mins else ((0, 0, 0), np.float32),
            "f": ((n, rows, cols), np.float32) if plain else ((0, 0, 0), np.float32)}
    for part, (pshape, dtype) in want.items():
        a = getattr(m, part)
        if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != pshape or not a.flags.c_contiguous:
            got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"{source}: {name} ({m.kind_name}) has {part} {got}; expected "
                             f"{np.dtype(dtype)} {pshape if pshape[0] else 'empty'} (corrupt or truncated?)")
    if m.kind in _EXPONENT:
        mask, limit = _EXPONENT[m.kind]
        if ((m.q.view(np.uint16) & mask) >= limit).any():
            raise ValueError(f"{source}: {name} holds infinite, NaN or implausibly large values")
    if not all(_bounded(a) for a in (m.s, m.m, m.f)):
        raise ValueError(f"{source}: {name} holds infinite, NaN or implausibly large values (beyond {MAX_WEIGHT:g})")


def _bounded(a: np.ndarray) -> bool:
    """Every value finite and within MAX_WEIGHT (NaN fails the comparison); no copy is made."""
    return a.size == 0 or bool(max(a.max(), -a.min()) <= MAX_WEIGHT)


def check_vector(a, name: str, shape: tuple[int, ...], source: str) -> np.ndarray:
    """a as a contiguous f32 array of exactly `shape` with finite values, or a ValueError naming it."""
    if isinstance(a, QMatrix):
        raise ValueError(f"{source}: {name} has shape {(a.n, a.rows, a.cols)}; expected {tuple(shape)} "
                         f"from the model's config")
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiu":
        raise ValueError(f"{source}: {name} is not a numeric array; expected f32 {tuple(shape)}")
    if a.shape != tuple(shape):
        raise ValueError(f"{source}: {name} has shape {a.shape}; expected {tuple(shape)} from the model's config")
    a = np.ascontiguousarray(a, np.float32)
    if not _bounded(a):
        raise ValueError(f"{source}: {name} holds infinite, NaN or implausibly large values (beyond {MAX_WEIGHT:g})")
    return a
