"""Token pruning and KV-cache eviction: energy scores, top-k selection, gather and compaction.

Two scores say how much a token matters:

* energy: the L2 norm of its hidden state (`token_norms`), the idea that low-energy vectors
  contribute little;
* attention mass: the softmax weight it receives from the most recent queries, summed over
  queries and heads (`attention_mass`), as LazyLLM, SnapKV and TOVA measure importance.

The recent queries come from a small ring that `forward` fills at every layer (`store_queries`):
q_ring (L, W, heads, head_dim) holds the queries of the last W positions, ring_pos (L, W) their
positions (-1 = empty). Cache rows carry the position of their token in row_pos (L, rows), which
keeps the causal rule (a query sees rows whose position is <= its own) after rows move.
"""
import math

import numpy as np
from numba import get_thread_id, prange

from .attention import SJ, _exp_row, _max_row, few_scores
from .jit import kernel
from .simd import kv_get


@kernel(parallel=True)
def token_norms(out, x):
    """x (T, n) -> out (T,) = L2 norm of each row, a token's energy."""
    T, n = x.shape
    for t in prange(T):
        ss = np.float32(0.0)
        for i in range(n):
            ss += x[t, i] * x[t, i]
        out[t] = np.sqrt(ss)


@kernel
def store_queries(q_ring, ring_pos, q, l, positions):
    """q (T, heads, head_dim) -> q_ring (L, W, heads, head_dim) at ring slot positions[t] % W of
    layer l, and ring_pos[l, slot] = positions[t]. A ring of width 0 stores nothing."""
    W = q_ring.shape[1]
    if W == 0:
        return
    for t in range(q.shape[0]):
        i = positions[t] % W
        q_ring[l, i] = q[t]
        ring_pos[l, i] = positions[t]


@kernel
def _query_mass(acc, sc, qv, keys, rows_pos, qpos, scale, bits):
    # qv (hd,) one query at position qpos; keys (>= n, hd), rows_pos (n,) -> acc (n,) +=
    # softmax over the rows it may see (rows_pos <= qpos). sc (n,) holds the scores, bits
    # (int32, n) the exponents of the vectorized exp.
    n = acc.shape[0]
    hd = qv.shape[0]
    mx = -np.inf
    for j in range(n):
        if rows_pos[j] > qpos:  # a later token: causally invisible
            sc[j] = -np.inf
            continue
        kj = keys[j]
        s = np.float32(0.0)
        for i in range(hd):
            s += qv[i] * kv_get(kj[i])
        s *= scale
        sc[j] = s
        mx = max(mx, s)
    if mx == -np.inf:
        return
    _add_softmax(acc, sc, mx, bits)


@kernel
def _add_softmax(acc, sc, mx, bits):
    # acc += softmax of the scores sc, whose largest is mx (sc is overwritten; -inf gets nothing).
    for j in range(sc.shape[0]):
        sc[j] -= mx
    total = _exp_row(sc, bits)
    inv = np.float32(1.0) / total
    for j in range(sc.shape[0]):
        acc[j] += sc[j] * inv


@kernel
def _group_mass(acc, sc, lds, qs, g, keys, rows_pos, qpos, scale, bits):
    # `_query_mass` for the g query heads qs (flat, g rows of hd) that read one kv head, their
    # scores from decoding's `few_scores` (each key row loaded once for all of them) into
    # sc (rows of lds >= n rounded up to SJ).
    n = acc.shape[0]
    seen = False
    for j in range(n):
        seen |= rows_pos[j] <= qpos
    if not seen:  # every row is later than the query
        return
    few_scores(sc, lds, qs, keys.shape[1], keys, 0, g, n)
    for h in range(g):
        row = sc[h * lds:h * lds + n]
        for j in range(n):  # a later token is causally invisible
            row[j] = -np.inf if rows_pos[j] > qpos else row[j] * scale
        _add_softmax(acc, row, _max_row(row), bits)


@kernel(parallel=True)
def attention_mass(out, q_ring, ring_pos, k_cache, row_pos, l, q0, scratch):
    """Attention mass the first n = out.shape[0] cache rows of layer l receive from the queries in
    layer l's ring at positions >= q0, summed over queries and heads.

    q_ring (L, W, heads, hd); ring_pos (L, W), -1 = empty; k_cache (L, kv_heads, rows, hd);
    row_pos (L, rows). Query head h reads kv head h // (heads // kv_heads). scratch f32
    (threads, >= 3 n): each thread sums into its own row; the rows are added up at the end.
    """
    n = out.shape[0]
    W, H, hd = q_ring.shape[1], q_ring.shape[2], q_ring.shape[3]
    group = H // k_cache.shape[1]
    scale = np.float32(1.0 / math.sqrt(hd))
    for i in range(scratch.shape[0]):
        scratch[i, :n] = 0.0
    for item in prange(W * H):
        w = item // H
        h = item % H
        if ring_pos[l, w] >= max(q0, 0):
            tid = get_thread_id()
            _query_mass(scratch[tid, :n], scratch[tid, n:2 * n], q_ring[l, w, h], k_cache[l, h // group],
                        row_pos[l, :n], ring_pos[l, w], scale, scratch[tid, 2 * n:3 * n].view(np.int32))
    out[:] = 0.0
    for i in range(scratch.shape[0]):
        for j in range(n):
            out[j] += scratch[i, j]


@kernel
def _kth_largest(a, m):
    # The m-th largest value (m >= 1) of a (n,), which it reorders: a 3-way quickselect, so runs of
    # equal scores cannot make it quadratic.
    lo, hi = 0, a.shape[0] - 1
    target = m - 1  # its index once a is sorted in descending order
    while lo < hi:
        p = a[(lo + hi) // 2]
        lt, i, gt = lo, lo, hi
        while i <= gt:  # [lo, lt) > p, [lt, i) == p, (gt, hi] < p
            if a[i] > p:
                a[lt], a[i] = a[i], a[lt]
                lt += 1
                i += 1
            elif a[i] < p:
                a[i], a[gt] = a[gt], a[i]
                gt -= 1
            else:
                i += 1
        if target < lt:
            hi = lt - 1
        elif target > gt:
            lo = gt + 1
        else:
            return p
    return a[lo]


@kernel
def _select(idx, scores, forced, k, work):
    # Choose k of the n rows: every forced row, then the highest-scoring others, ties to the
    # earlier row. idx (>= k,) <- the chosen rows, ascending. work f32 (>= n,). Returns the count
    # (k, or the forced count if that is larger).
    n = scores.shape[0]
    c = 0
    for j in range(n):
        if not forced[j]:
            work[c] = scores[j]
            c += 1
    m = min(k - (n - c), c)  # free choices left after the forced rows
    v = np.float32(0.0)
    ties = 0
    if m > 0:
        v = _kth_largest(work[:c], m)
        above = 0
        for j in range(n):
            if not forced[j] and scores[j] > v:
                above += 1
        ties = m - above
    out = 0
    for j in range(n):
        take = forced[j]
        if not take and m > 0:
            if scores[j] > v:
                take = True
            elif scores[j] == v and ties > 0:
                take = True
                ties -= 1
        if take:
            idx[out] = j
            out += 1
    return out


@kernel(parallel=True)
def select_top(idx, counts, scores, forced, k, work):
    """Per row r of scores (R, n): keep every forced[r] row plus the highest-scoring others, k in
    all (ties to the earlier index). idx (R, >= k) <- chosen indices ascending; counts (R,) <- how
    many (more than k only when more are forced). work f32 (R, n)."""
    for r in prange(scores.shape[0]):
        counts[r] = _select(idx[r], scores[r], forced[r], k, work[r])


@kernel(parallel=True)
def gather_rows(out, x, idx):
    """out (k, n) <- x[idx[i]] for idx (k,): the kept tokens' hidden states, in order."""
    for i in prange(idx.shape[0]):
        out[i] = x[idx[i]]


@kernel
def _compact(k_cache, v_cache, row_pos, l, idx, n):
    # Move rows idx[:n] (ascending, so idx[i] >= i) of layer l to rows 0..n-1, in place.
    for i in range(n):
        j = idx[i]
        if j != i:
            for h in range(k_cache.shape[1]):
                k_cache[l, h, i] = k_cache[l, h, j]
                v_cache[l, h, i] = v_cache[l, h, j]
            row_pos[l, i] = row_pos[l, j]


@kernel(parallel=True)
def evict(k_cache, v_cache, row_pos, fill, q_ring, ring_pos, l0, l1, limit, target, sinks, recent, queries,
          fscratch, iscratch, bscratch):
    """Shrink every layer l in [l0, l1) holding more than `limit` rows to `target` rows.

    A layer keeps the sinks (rows of positions < sinks), its last `recent` rows, and the rows
    with the most attention mass from the newest `queries` positions in its ring; kept rows stay
    in order, at the front of the cache. caches (L, kv_heads, rows, hd); row_pos (L, rows); fill (L,) rows held,
    updated. Per-thread scratch: fscratch f32 (threads, >= 6 rows + 4 SJ), iscratch int64
    (threads, >= rows), bscratch bool (threads, >= rows).
    """
    H, hd = q_ring.shape[2], q_ring.shape[3]
    group = H // k_cache.shape[1]
    scale = np.float32(1.0 / math.sqrt(hd))
    for l in prange(l0, l1):
        n = fill[l]
        if n <= limit:
            continue
        tid = get_thread_id()
        mass = fscratch[tid, :n]
        mass[:] = 0.0
        lds = -(-n // SJ) * SJ  # score rows padded for the scores block
        newest = -1
        for w in range(q_ring.shape[1]):
            newest = max(newest, ring_pos[l, w])
        first = max(newest - queries + 1, 0)
        for w in range(q_ring.shape[1]):
            if ring_pos[l, w] >= first:
                qf = q_ring[l, w].reshape(H * hd)
                for kv in range(k_cache.shape[1]):
                    for h0 in range(kv * group, (kv + 1) * group, 4):
                        _group_mass(mass, fscratch[tid, n:n + 4 * lds], lds, qf[h0 * hd:],
                                    min(4, (kv + 1) * group - h0), k_cache[l, kv], row_pos[l, :n], ring_pos[l, w],
                                    scale, fscratch[tid, n + 4 * lds:2 * n + 4 * lds].view(np.int32))
        forced = bscratch[tid, :n]
        for j in range(n):
            forced[j] = row_pos[l, j] < sinks or j >= n - recent
        kept = _select(iscratch[tid], mass, forced, target, fscratch[tid, 2 * n:3 * n])
        _compact(k_cache, v_cache, row_pos, l, iscratch[tid], kept)
        fill[l] = kept


@kernel
def append_rows(row_pos, fill, positions, l0, l1):
    """Note that layers l0..l1-1 just stored tokens at positions (T,) in their next rows:
    row_pos[l, fill[l] + t] = positions[t]; fill[l] += T."""
    T = positions.shape[0]
    for l in range(l0, l1):
        for t in range(T):
            row_pos[l, fill[l] + t] = positions[t]
        fill[l] += T
