"""ggml's 5-bit and K-quant block types -> the kernels' block layouts, exactly (no widening).

Every one of these types stores, per group of 16 or 32 elements, small unsigned integers u with a
float scale and offset: x = s u + m. This module reads the integers and the group scales out of
ggml's blocks (ggml-common.h defines the layouts) and repacks them for the kernels
(kernels/linear.py):

    Q5_0    32-block  d f16, qh (32 high bits), qs (16 nibble pairs)   x = d (u - 16)
    Q5_1    32-block  d, m f16, qh, qs                                 x = d u + m
    Q4_K    256-block d, dmin f16, 8 x (6-bit scale, 6-bit min), 128 nibble bytes
                                                                       x = d sc u - dmin mn   (per 32)
    Q5_K    as Q4_K plus 32 bytes of high bits                         x = d sc u - dmin mn   (per 32)
    Q6_K    256-block 128 low-nibble bytes, 64 bytes of 2-bit highs, 16 int8 scales, d f16
                                                                       x = d sc (u - 32)      (per 16)
    Q3_K    256-block 32 bytes of high-bit masks, 64 bytes of 2-bit lows, 12 bytes of 6-bit
            scales, d f16                                              x = d (sc - 32) (u - 4) (per 16)
    Q2_K    256-block 16 bytes of (4-bit scale, 4-bit min), 64 bytes of 2-bit values, d, dmin f16
                                                                       x = d sc u - dmin mn   (per 16)

Q4_K becomes Q4_1 (4-bit values, scale and min per 32); Q5_0, Q5_1 and Q5_K become Q5 (5-bit,
per 32); Q6_K, Q3_K and Q2_K become Q6 (6-bit, scale and offset per 16). The products d sc are
exact in float32 (an 11-bit mantissa times a small integer), so s u + m is ggml's value.
"""
import numpy as np

from fastinfer.kernels import linear as K

CHUNK_ELEMS = 1 << 20  # elements repacked at a time: the unpacked bytes stay a few MB

# type -> (elements per block, bytes per block, group size of the unpacked scales)
BLOCKS = {"Q5_0": (32, 22, 32), "Q5_1": (32, 24, 32), "Q4_K": (256, 144, 32), "Q5_K": (256, 176, 32),
          "Q6_K": (256, 210, 16), "Q3_K": (256, 110, 16), "Q2_K": (256, 84, 16)}
TARGET = {"Q5_0": K.Q5, "Q5_1": K.Q5, "Q4_K": K.Q4_1, "Q5_K": K.Q5, "Q6_K": K.Q6, "Q3_K": K.Q6, "Q2_K": K.Q6}


def _f16(b: np.ndarray) -> np.ndarray:
    """(..., 2) bytes -> (...) float32 from IEEE half floats."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _bits(b: np.ndarray, count: int) -> np.ndarray:
    """(..., nbytes) -> (..., count) the bits of b, little-endian within each byte."""
    return np.unpackbits(b, axis=-1, bitorder="little")[..., :count]


def _k4_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: (n, 12) packed bytes -> the 8 six-bit scales and 8 six-bit mins (n, 8).
    Sub-block j < 4: scale = byte j & 63, min = byte j + 4 & 63; j >= 4: the low and high
    nibbles of byte j + 4 give the low four bits, the top two bits of bytes j - 4 and j the high."""
    a, b, c = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scale = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return scale.astype(np.float32), mn.astype(np.float32)


def _unpack(blk: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """blocks uint8 (n, bytes) of one type -> (u uint8 (n, elements), s, m f32 (n, groups))."""
    n = blk.shape[0]
    if kind in ("Q5_0", "Q5_1"):
        d = _f16(blk[:, 0:2].reshape(n, 1, 2))
        off = 4 if kind == "Q5_1" else 2
        m = _f16(blk[:, 2:4].reshape(n, 1, 2)) if kind == "Q5_1" else -16.0 * d
        hi = _bits(blk[:, off:off + 4], 32)
        qs = blk[:, off + 4:off + 20]
        u = np.concatenate([qs & 15, qs >> 4], axis=1) | (hi << 4)
        return u, d, m
    if kind in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blk[:, 0:2].reshape(n, 1, 2)), _f16(blk[:, 2:4].reshape(n, 1, 2))
        sc, mn = _k4_scales(blk[:, 4:16])
        qs = blk[:, -128:].reshape(n, 4, 32)  # 64 elements per 32 bytes: low nibbles, then high
        u = np.stack([qs & 15, qs >> 4], axis=2).reshape(n, 256)
        if kind == "Q5_K":  # bit 2j of qh[l] is element 64j + l's fifth bit, bit 2j + 1 element 64j + 32 + l's
            hi = _bits(blk[:, 16:48].reshape(n, 32, 1), 8)  # (n, 32 l, 8 bit)
            u |= hi.transpose(0, 2, 1).reshape(n, 256) << 4
        return u, d * sc, -dmin * mn
    if kind == "Q6_K":
        ql, qh = blk[:, 0:128].reshape(n, 2, 64), blk[:, 128:192].reshape(n, 2, 32)
        sc = blk[:, 192:208].view(np.int8).astype(np.float32)
        d = _f16(blk[:, 208:210].reshape(n, 1, 2))
        low = np.concatenate([ql & 15, ql >> 4], axis=2)  # (n, half, 128): l, l + 32 | l + 64, l + 96
        high = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=2).reshape(n, 2, 128)
        u = (low | (high << 4)).reshape(n, 256)
        s = d * sc
        return u, s, -32.0 * s
    if kind == "Q3_K":
        hmask, qs = blk[:, 0:32], blk[:, 32:96].reshape(n, 2, 32)
        raw, d = blk[:, 96:108], _f16(blk[:, 108:110].reshape(n, 1, 2))
        low4 = np.concatenate([raw[:, 0:8] & 15, raw[:, 0:8] >> 4], axis=1)
        top2 = np.concatenate([(raw[:, 8:12] >> s) & 3 for s in (0, 2, 4, 6)], axis=1)
        sc = (low4 | (top2 << 4)).astype(np.float32) - 32.0
        lo2 = np.stack([(qs >> s) & 3 for s in (0, 2, 4, 6)], axis=2).reshape(n, 256)
        hbit = _bits(hmask.reshape(n, 32, 1), 8).transpose(0, 2, 1).reshape(n, 256)
        u = lo2 | (hbit << 2)  # q + 4 in 0..7: the stored value minus 4 unless its mask bit is set
        s = d * sc
        return u, s, -4.0 * s
    if kind == "Q2_K":
        raw, qs = blk[:, 0:16], blk[:, 16:80].reshape(n, 2, 32)
        d, dmin = _f16(blk[:, 80:82].reshape(n, 1, 2)), _f16(blk[:, 82:84].reshape(n, 1, 2))
        u = np.stack([(qs >> s) & 3 for s in (0, 2, 4, 6)], axis=2).reshape(n, 256)
        return u, d * (raw & 15).astype(np.float32), -dmin * (raw >> 4).astype(np.float32)
    raise ValueError(f"no unpacker for GGML type {kind}")


def unpack(raw: np.ndarray, kind: str, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (rows, row_bytes) of type kind -> (u uint8 (rows, cols), s, m f32 (rows, cols // group))."""
    per, nbytes, group = BLOCKS[kind]
    rows = raw.shape[0]
    u, s, m = _unpack(np.asarray(raw, np.uint8).reshape(rows * (cols // per), nbytes), kind)
    return u.reshape(rows, cols), s.reshape(rows, cols // group), m.reshape(rows, cols // group)


def _nibbles(u: np.ndarray) -> np.ndarray:
    """u (rows, cols) < 16 -> (rows, cols // 2) bytes in Q4_1 order: byte j of a 32-block holds
    element j (low nibble) and j + 16 (high)."""
    rows, cols = u.shape
    b = u.reshape(rows, cols // 32, 2, 16)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(rows, cols // 2)


def pack(u: np.ndarray, s: np.ndarray, m: np.ndarray, kind: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integers u (rows, cols) and group scales -> (q, s, m) of kernel kind Q4_1, Q5 or Q6 (kernels/linear.py).

    s, m come per 32 (Q4_1, Q5) or per 16 (Q6) elements; groups of 32 go to Q6 twice."""
    rows, cols = u.shape
    low = _nibbles(u & 15)
    if kind == K.Q4_1:
        return low, s, m
    if kind == K.Q5:
        plane = np.packbits((u >> 4) & 1, axis=1, bitorder="little")  # bit e of the row: element e
        return np.concatenate([low, plane], axis=1), s, m
    if kind != K.Q6:
        raise ValueError(f"cannot pack into kernel kind {kind}")
    if s.shape[1] * 32 == cols:
        s, m = np.repeat(s, 2, axis=1), np.repeat(m, 2, axis=1)
    hi = ((u >> 4) & 3).reshape(rows, cols // 64, 4, 16)  # 64-element stretch: byte j, bits 2k: element 16k + j
    plane = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return np.concatenate([low, plane.reshape(rows, cols // 4)], axis=1), s, m


def repack(raw: np.ndarray, kind: str, cols: int, target: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A whole tensor, rows (rows, row_bytes) of ggml type kind -> (q, s, m) of the target kernel
    kind (default TARGET[kind]), a chunk of rows at a time."""
    target = TARGET[kind] if target is None else target
    rows = raw.shape[0]
    G = K.GROUP[target]
    qb = K.row_bytes(target, cols)
    q = np.empty((rows, qb), np.uint8)
    s = np.empty((rows, cols // G), np.float32)
    m = np.empty((rows, cols // G), np.float32)
    step = max(1, CHUNK_ELEMS // cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        u, ss, mm = unpack(raw[r0:r1], kind, cols)
        q[r0:r1], s[r0:r1], m[r0:r1] = pack(u, ss, mm, target)
    return q, s, m
