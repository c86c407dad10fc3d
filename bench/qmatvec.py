"""Decode matvec: 8-bit activations x packed weights (kernels/qmatvec.py) against the f32-activation
path (kernels/linear.py `linear`), T = 1 unless --tokens, in GB/s of weight bytes (q + s + m) streamed.

    python bench/qmatvec.py [--reps 30] [--tokens 1] [--threads 2,1]

Each case alternates the two kernels call by call (other processes share the cores), compile
excluded; min and mean over the calls. The roof is a plain prange sum over a 150 MB uint8 array (read as f32).
The activations are quantized once outside the timing (that is a separate kernel).
"""
import argparse
import time

import numba
import numpy as np
from numba import prange

from fastinfer.kernels import linear as LIN
from fastinfer.kernels import qmatvec as Q
from fastinfer.kernels.jit import kernel

QK = 32


@kernel(parallel=True)
def _stream_sum(a, tasks):
    # a (N,) -> sum, split into `tasks` contiguous ranges: the memory-bandwidth roof. Called on
    # the uint8 array viewed as f32, so the loop vectorizes without widening bytes.
    n = a.shape[0]
    acc = np.float32(0.0)
    for task in prange(tasks):
        s = np.float32(0.0)
        for i in range(task * n // tasks, (task + 1) * n // tasks):
            s += a[i]
        acc += s
    return acc


def quantize_x(x):
    """x f32 (T, n) -> xq int8 (T, n), xd, xs f32 (T, n // 32)."""
    T, n = x.shape
    b = x.reshape(T, n // QK, QK)
    xd = (np.abs(b).max(axis=2) / 127).astype(np.float32)
    xq = np.rint(b / np.where(xd == 0, 1, xd)[..., None]).astype(np.int8)
    xs = (xd * xq.astype(np.float32).sum(axis=2)).astype(np.float32)
    return xq.reshape(T, n), xd, xs


def random_weight(kind, L, rows, n, rng):
    nb = n // QK
    q = rng.integers(0, 256, (L, rows, n if kind == LIN.Q8_0 else n // 2), dtype=np.uint8)
    s = rng.uniform(0.001, 0.02, (L, rows, nb)).astype(np.float32)
    m = (rng.uniform(-0.2, 0.0, (L, rows, nb)).astype(np.float32) if kind == LIN.Q4_1
         else np.zeros((0, 0, 0), np.float32))
    return kind, q, s, m, np.zeros((0, 0, 0), np.float32)


def roof(threads, reps):
    a = np.zeros(150_000_000, np.uint8)
    v = a.view(np.float32)
    _stream_sum(v, threads)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _stream_sum(v, threads)
        ts.append(time.perf_counter() - t0)
    return a.nbytes / min(ts) / 1e9, a.nbytes / np.mean(ts) / 1e9


def case(kind, L, rows, n, threads, reps, T, rng):
    """Time one pass over all L layers with each kernel, alternating; returns the row of numbers."""
    w = random_weight(kind, L, rows, n, rng)
    wbytes = w[1].nbytes + w[2].nbytes + w[3].nbytes
    x = rng.standard_normal((T, n)).astype(np.float32)
    xq, xd, xs = quantize_x(x)
    out_new = np.zeros((T, rows), np.float32)
    out_old = np.zeros((T, rows), np.float32)
    scratch = np.zeros((numba.config.NUMBA_NUM_THREADS, LIN.scratch_size(n)), np.float32)
    tasks = np.zeros((threads, LIN.scratch_size(n)), np.float32)  # one row per parallel task

    def new():
        for l in range(L):
            Q.linear_a8_rows(out_new, xq, xd, xs, w, l, tasks, 0)

    def old():
        for l in range(L):
            LIN.linear(out_old, x, w, l, scratch)

    new(), old()  # compile / load from cache
    tn, to = [], []
    for _ in range(reps):
        for f, ts in ((new, tn), (old, to)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    rel = np.abs(out_new - out_old).max() / np.abs(out_old).max()
    return dict(wbytes=wbytes, new=(min(tn), np.mean(tn)), old=(min(to), np.mean(to)), rel=rel)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=1, help="tokens per call (both kernels)")
    ap.add_argument("--threads", default="2,1", help="comma-separated thread counts")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    cases = [("Q4_1", LIN.Q4_1, 1, 3072, 576), ("Q4_1", LIN.Q4_1, 1, 576, 1536), ("Q4_1", LIN.Q4_1, 1, 960, 576),
             ("Q4_1", LIN.Q4_1, 1, 49152, 576), ("Q4_1", LIN.Q4_1, 30, 3072, 576),
             ("Q4_0", LIN.Q4_0, 30, 3072, 576), ("Q8_0", LIN.Q8_0, 30, 3072, 576),
             ("Q8_0", LIN.Q8_0, 1, 49152, 576)]
    for threads in (int(v) for v in args.threads.split(",")):
        numba.set_num_threads(threads)
        rmin, rmean = roof(threads, 10)
        print(f"\nthreads={threads}  roof (prange sum, 150 MB uint8): {rmin:.1f} GB/s best, {rmean:.1f} mean")
        print(f"{'kind':5} {'L x (rows, n)':>18} {'MB':>6} | {'a8 us min/mean':>16} {'GB/s':>6} | "
              f"{'f32 us min/mean':>16} {'GB/s':>6} | {'speedup':>7} {'rel diff':>8}")
        for name, kind, L, rows, n in cases:
            r = case(kind, L, rows, n, threads, args.reps, args.tokens, rng)
            mb = r["wbytes"] / 1e6
            (nmin, nmean), (omin, omean) = r["new"], r["old"]
            print(f"{name:5} {f'{L} x ({rows}, {n})':>18} {mb:6.1f} | {nmin*1e6:7.0f} /{nmean*1e6:7.0f} "
                  f"{r['wbytes']/nmin/1e9:6.1f} | {omin*1e6:7.0f} /{omean*1e6:7.0f} {r['wbytes']/omin/1e9:6.1f} | "
                  f"{omin/nmin:6.2f}x {r['rel']:8.4f}")


if __name__ == "__main__":
    main()
