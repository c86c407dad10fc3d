"""SentencePiece BPE over a vocabulary held as plain arrays.

A 262k-piece vocabulary (Gemma 3) held as Python strings and half a million ranked merges costs
~100 MB in a `tokenizers` BPE model and ~300 MB to build one. Here the pieces are one byte array
with offsets and an open-addressing hash table, ~4 MB in all, and a merge is found when it is
needed: two adjacent pieces merge when their concatenation is a normal piece.

The order of merges is Hugging Face's BPE over SentencePiece merges (LlamaConverter): the pair
whose joined piece has the highest score first, ties by the joined piece's id, then by the left and
right ids, then leftmost. That is also SentencePiece's own order up to ties.
"""
import numpy as np

from .jit import kernel

NORMAL = 1  # llama.cpp's token type of a piece that takes part in merges

_FNV_OFFSET = np.uint64(14695981039346656037)
_FNV_PRIME = np.uint64(1099511628211)


@kernel(inline=True)
def _hash(src, lo1, hi1, lo2, hi2):
    # FNV-1a over src[lo1:hi1] followed by src[lo2:hi2]
    h = _FNV_OFFSET
    for i in range(lo1, hi1):
        h = (h ^ np.uint64(src[i])) * _FNV_PRIME
    for i in range(lo2, hi2):
        h = (h ^ np.uint64(src[i])) * _FNV_PRIME
    return h


@kernel(inline=True)
def _same(data, lo, hi, src, lo1, hi1, lo2, hi2):
    # data[lo:hi] == src[lo1:hi1] + src[lo2:hi2]
    n1 = hi1 - lo1
    if hi - lo != n1 + hi2 - lo2:
        return False
    for i in range(n1):
        if data[lo + i] != src[lo1 + i]:
            return False
    for i in range(hi2 - lo2):
        if data[lo + n1 + i] != src[lo2 + i]:
            return False
    return True


@kernel
def piece_table(table, data, offsets):
    """Fill `table` (size a power of two, all -1) with piece ids; returns the id of a duplicate, or -1.

    data (bytes,) uint8: the pieces back to back; offsets (n + 1,): piece i is data[offsets[i]:offsets[i + 1]].
    """
    mask = np.uint64(table.shape[0] - 1)
    for p in range(offsets.shape[0] - 1):
        lo, hi = offsets[p], offsets[p + 1]
        slot = _hash(data, lo, hi, 0, 0) & mask
        while table[slot] >= 0:
            q = table[slot]
            if _same(data, offsets[q], offsets[q + 1], data, lo, hi, 0, 0):
                return p
            slot = (slot + np.uint64(1)) & mask
        table[slot] = p
    return -1


@kernel(inline=True)
def _find(table, data, offsets, src, lo1, hi1, lo2, hi2):
    # id of the piece src[lo1:hi1] + src[lo2:hi2], or -1
    mask = np.uint64(table.shape[0] - 1)
    slot = _hash(src, lo1, hi1, lo2, hi2) & mask
    while table[slot] >= 0:
        q = table[slot]
        if _same(data, offsets[q], offsets[q + 1], src, lo1, hi1, lo2, hi2):
            return q
        slot = (slot + np.uint64(1)) & mask
    return -1


@kernel
def find_piece(table, data, offsets, text):
    """Id of the piece whose UTF-8 bytes are `text`, or -1."""
    return _find(table, data, offsets, text, 0, text.shape[0], 0, 0)


@kernel(inline=True)
def _merged(table, data, offsets, types, a, b):
    # the normal piece joining normal pieces a and b, or -1
    if types[a] != NORMAL or types[b] != NORMAL:
        return -1
    p = _find(table, data, offsets, data, offsets[a], offsets[a + 1], offsets[b], offsets[b + 1])
    if p >= 0 and types[p] != NORMAL:
        return -1
    return p


@kernel(inline=True)
def _before(hs, hp, ha, hb, hpos, i, j):
    # heap entry i merges before entry j
    if hs[i] != hs[j]:
        return hs[i] > hs[j]
    if hp[i] != hp[j]:
        return hp[i] < hp[j]
    if ha[i] != ha[j]:
        return ha[i] < ha[j]
    if hb[i] != hb[j]:
        return hb[i] < hb[j]
    return hpos[i] < hpos[j]


@kernel(inline=True)
def _swap(hs, hp, ha, hb, hpos, i, j):
    hs[i], hs[j] = hs[j], hs[i]
    hp[i], hp[j] = hp[j], hp[i]
    ha[i], ha[j] = ha[j], ha[i]
    hb[i], hb[j] = hb[j], hb[i]
    hpos[i], hpos[j] = hpos[j], hpos[i]


@kernel(inline=True)
def _push(hs, hp, ha, hb, hpos, n, score, p, a, b, pos):
    hs[n], hp[n], ha[n], hb[n], hpos[n] = score, p, a, b, pos
    i = n
    while i > 0:
        parent = (i - 1) // 2
        if not _before(hs, hp, ha, hb, hpos, i, parent):
            break
        _swap(hs, hp, ha, hb, hpos, i, parent)
        i = parent
    return n + 1


@kernel(inline=True)
def _pop(hs, hp, ha, hb, hpos, n):
    # moves the first entry to index n - 1 and restores the heap over [0, n - 1)
    n -= 1
    _swap(hs, hp, ha, hb, hpos, 0, n)
    i = 0
    while True:
        first, left, right = i, 2 * i + 1, 2 * i + 2
        if left < n and _before(hs, hp, ha, hb, hpos, left, first):
            first = left
        if right < n and _before(hs, hp, ha, hb, hpos, right, first):
            first = right
        if first == i:
            break
        _swap(hs, hp, ha, hb, hpos, i, first)
        i = first
    return n


@kernel
def spm_bpe(out, text, table, data, offsets, types, scores, byte_ids, unk_id):
    """Encode one stretch of normalized text; returns the number of ids written to `out`.

    text (bytes,) uint8 valid UTF-8; out (bytes,) int32 is long enough, since every piece is at
    least one byte. types (vocab,) and scores (vocab,) are per piece; byte_ids (256,) are the
    <0xXX> pieces (-1 if absent); unk_id is -1 when there is no unknown piece.
    A character that is no piece becomes its bytes' pieces, else one unknown piece per run.
    """
    n_bytes = text.shape[0]
    sym = np.empty(n_bytes, np.int32)
    n = 0
    unk_run = False
    i = 0
    while i < n_bytes:
        lead = text[i]
        width = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        width = min(width, n_bytes - i)
        p = _find(table, data, offsets, text, i, i + width, 0, 0)
        if p >= 0:
            if unk_run:
                sym[n] = unk_id
                n += 1
                unk_run = False
            sym[n] = p
            n += 1
        else:
            fallback = True
            for k in range(i, i + width):
                if byte_ids[text[k]] < 0:
                    fallback = False
            if fallback:  # a pending unknown piece waits for the next found character, as in `tokenizers`
                for k in range(i, i + width):
                    sym[n] = byte_ids[text[k]]
                    n += 1
            elif unk_id >= 0:
                unk_run = True
        i += width
    if unk_run:
        sym[n] = unk_id
        n += 1

    # Symbols form a linked list; a merged-away symbol is marked removed.
    prev = np.arange(-1, n - 1).astype(np.int32)
    nxt = np.arange(1, n + 1).astype(np.int32)
    if n > 0:
        nxt[n - 1] = -1
    removed = np.zeros(n, np.bool_)
    cap = 3 * n + 1  # n - 1 first pairs, then at most two new pairs per merge
    hs = np.empty(cap, np.float32)
    hp = np.empty(cap, np.int32)
    ha = np.empty(cap, np.int32)
    hb = np.empty(cap, np.int32)
    hpos = np.empty(cap, np.int32)
    size = 0
    for k in range(n - 1):
        p = _merged(table, data, offsets, types, sym[k], sym[k + 1])
        if p >= 0:
            size = _push(hs, hp, ha, hb, hpos, size, scores[p], p, sym[k], sym[k + 1], k)
    while size > 0:
        size = _pop(hs, hp, ha, hb, hpos, size)
        pos = hpos[size]
        if removed[pos] or nxt[pos] < 0:
            continue
        right = nxt[pos]
        if sym[pos] != ha[size] or sym[right] != hb[size]:
            continue  # stale: a neighbour merged since this pair was queued
        sym[pos] = hp[size]
        removed[right] = True
        nxt[pos] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = pos
        left = prev[pos]
        if left >= 0:
            p = _merged(table, data, offsets, types, sym[left], sym[pos])
            if p >= 0:
                size = _push(hs, hp, ha, hb, hpos, size, scores[p], p, sym[left], sym[pos], left)
        if nxt[pos] >= 0:
            p = _merged(table, data, offsets, types, sym[pos], sym[nxt[pos]])
            if p >= 0:
                size = _push(hs, hp, ha, hb, hpos, size, scores[p], p, sym[pos], sym[nxt[pos]], pos)

    m = 0
    for k in range(n):
        if not removed[k]:
            out[m] = sym[k]
            m += 1
    return m
