"""The per-token elementwise ops of a Llama layer (kernels/ops.py), old vs new, one process.

SmolLM2-135M's shapes (dim 576, 9 heads / 3 kv heads, head_dim 64, hidden 1536, 30 layers) at
T = 256 (a prefill chunk) and T = 1 (decode). The old kernels are the serial versions from before
the parallel / vectorized rewrite, copied below under private names. Each sample is a compiled
loop of `inner` calls (so no Python dispatch is counted), old and new alternating sample by
sample; min and mean per call over the samples, compile excluded.

    python bench/ops_kernels.py --threads 2 -n 30
"""
import argparse
import time

import numba
import numpy as np
from numba import njit

from fastinfer.kernels import ops
from fastinfer.kernels.jit import FASTMATH, set_threads
from fastinfer.kernels.linear import dequant_row
from fastinfer.weights.quantize import quantize_q8_0

old = njit(cache=False, fastmath=set(FASTMATH), error_model="numpy", nogil=True)


# -- the serial kernels as they were (kernels/ops.py before this change) ---------------------------

@old
def _rmsnorm(out, x, w, eps):
    T, n = x.shape
    for t in range(T):
        ss = np.float32(0.0)
        for i in range(n):
            ss += x[t, i] * x[t, i]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(n) + np.float32(eps))
        for i in range(n):
            out[t, i] = x[t, i] * inv * w[i]


@old
def _rope(x, cos, sin, positions):
    T, H, hd = x.shape
    half = hd // 2
    for t in range(T):
        c = cos[positions[t]]
        s = sin[positions[t]]
        for h in range(H):
            v = x[t, h]
            for i in range(half):
                a = v[i]
                b = v[i + half]
                v[i] = a * c[i] - b * s[i]
                v[i + half] = b * c[i] + a * s[i]


@old
def _swiglu(out, gate_up):
    T, n = out.shape
    for t in range(T):
        for i in range(n):
            g = gate_up[t, i]
            out[t, i] = g / (np.float32(1.0) + np.exp(-g)) * gate_up[t, n + i]


@old
def _split_qkv(q, k, v, qkv, b):
    T, dq = q.shape
    dkv = k.shape[1]
    for t in range(T):
        for i in range(dq):
            q[t, i] = qkv[t, i] + b[i]
        for i in range(dkv):
            k[t, i] = qkv[t, dq + i] + b[dq + i]
            v[t, i] = qkv[t, dq + dkv + i] + b[dq + dkv + i]


@old
def _add_(x, y):
    T, n = x.shape
    for t in range(T):
        for i in range(n):
            x[t, i] += y[t, i]


@old
def _embed(out, ids, w):
    for t in range(ids.shape[0]):
        dequant_row(out[t], w, 0, ids[t])


@old
def _store_kv(k_cache, v_cache, k, v, l, slots):
    T, Hkv, hd = k.shape
    for t in range(T):
        for h in range(Hkv):
            k_cache[l, h, slots[t], :] = k[t, h]
            v_cache[l, h, slots[t], :] = v[t, h]


# -- compiled loops: `reps` calls, buffers sliced as llama.forward slices them ----------------------

@old
def loop_rmsnorm(f, reps, T, xb, x, w):
    for _ in range(reps):
        f(xb[:T], x[:T], w[0], 1e-5)


@old
def loop_split_qkv(f, reps, T, q, k, v, qkv, b):
    for _ in range(reps):
        f(q[:T], k[:T], v[:T], qkv[:T], b[0])


@old
def loop_rope(f, reps, T, q, cos, sin, positions, heads, hd):
    for _ in range(reps):
        f(q[:T].reshape((T, heads, hd)), cos, sin, positions[:T])


@old
def loop_store_kv(f, reps, T, kc, vc, k, v, slots, kv_heads, hd):
    for _ in range(reps):
        f(kc, vc, k[:T].reshape((T, kv_heads, hd)), v[:T].reshape((T, kv_heads, hd)), 0, slots[:T])


@old
def loop_add(f, reps, T, x, y):
    for _ in range(reps):
        f(x[:T], y[:T])


@old
def loop_swiglu(f, reps, T, hb, h13):
    for _ in range(reps):
        f(hb[:T], h13[:T])


@old
def loop_embed(f, reps, T, x, ids, w):
    for _ in range(reps):
        f(x[:T], ids[:T], w)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-n", type=int, default=30, help="samples per variant (min and mean over them)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1])
    a = ap.parse_args()
    set_threads(a.threads)
    rng = np.random.default_rng(0)
    dim, heads, kv_heads, hd, hidden, vocab, chunk, max_seq = 576, 9, 3, 64, 1536, 49152, 256, 512
    qd, kvd = heads * hd, kv_heads * hd

    def r(*shape, s=1.0):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    x, xb = r(chunk, dim), r(chunk, dim)
    norm_w = r(1, dim)
    qkv, bqkv = r(chunk, qd + 2 * kvd), r(1, qd + 2 * kvd)
    q, k, v = r(chunk, qd), r(chunk, kvd), r(chunk, kvd)
    ang = np.outer(np.arange(max_seq), 10000.0 ** (-np.arange(0, hd, 2) / hd))
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    positions = np.arange(128, 128 + chunk, dtype=np.int64)
    kc, vc = np.zeros((30, kv_heads, max_seq, hd), np.float32), np.zeros((30, kv_heads, max_seq, hd), np.float32)
    h13, hb = r(chunk, 2 * hidden, s=3.0), r(chunk, hidden)
    emb = quantize_q8_0(r(vocab, dim)).args()
    ids = rng.integers(0, vocab, chunk).astype(np.int64)
    y = r(chunk, dim, s=1e-3)

    cases = [  # name, loop, (old, new), args after T
        ("rmsnorm", loop_rmsnorm, (_rmsnorm, ops.rmsnorm), (xb, x, norm_w)),
        ("split_qkv", loop_split_qkv, (_split_qkv, ops.split_qkv), (q, k, v, qkv, bqkv)),
        ("rope q", loop_rope, (_rope, ops.rope), (q, cos, sin, positions, heads, hd)),
        ("rope k", loop_rope, (_rope, ops.rope), (k, cos, sin, positions, kv_heads, hd)),
        ("store_kv", loop_store_kv, (_store_kv, ops.store_kv), (kc, vc, k, v, positions, kv_heads, hd)),
        ("add_", loop_add, (_add_, ops.add_), (x, y)),
        ("swiglu", loop_swiglu, (_swiglu, ops.swiglu), (hb, h13)),
        ("embed", loop_embed, (_embed, ops.embed), (x, ids, emb)),
    ]
    per_layer = {"rmsnorm": 2, "split_qkv": 1, "rope q": 1, "rope k": 1, "store_kv": 1, "add_": 2, "swiglu": 1}
    print(f"threads {numba.get_num_threads()}, {a.n} samples per variant; microseconds per call")
    print(f"{'op':10} {'T':>4} {'old min':>9} {'old mean':>9} {'new min':>9} {'new mean':>9} {'speedup':>8}")
    totals = {}
    for T in a.tokens:
        inner = 20 if T > 16 else 2000
        for name, loop, fns, args in cases:
            for f in fns:  # compile
                loop(f, 1, T, *args)
            ts = {0: [], 1: []}
            for i in range(2 * a.n):
                which = i % 2 if (i // 2) % 2 == 0 else 1 - i % 2  # ABBA order
                t0 = time.perf_counter()
                loop(fns[which], inner, T, *args)
                ts[which].append((time.perf_counter() - t0) / inner * 1e6)
            o, n = np.array(ts[0]), np.array(ts[1])
            print(f"{name:10} {T:4d} {o.min():9.2f} {o.mean():9.2f} {n.min():9.2f} {n.mean():9.2f} "
                  f"{o.min() / n.min():7.2f}x", flush=True)
            if name in per_layer:
                tot = totals.setdefault(T, [0.0, 0.0])
                tot[0] += per_layer[name] * o.min()
                tot[1] += per_layer[name] * n.min()
    for T, (o, n) in totals.items():
        print(f"one layer's elementwise ops at T={T} (2 rmsnorm, 2 add_, ...; min): "
              f"old {o:.1f} us, new {n:.1f} us ({o / n:.2f}x); x30 layers: {30 * o / 1e3:.2f} -> {30 * n / 1e3:.2f} ms")


if __name__ == "__main__":
    main()
