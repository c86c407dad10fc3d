"""FNet's Fourier mixing against dense self-attention at the same width: FLOPs, time, memory.

Both as fastinfer runs them, float32, on random hidden states (T, dim):

  fourier     kernels/fft.fourier_mix: Re(FFT2(x)), the whole FNet mixing sublayer (no weights)
  attention   kernels/ops.attention over all T keys (bidirectional, as an encoder attends), heads of
              64, on precomputed Q, K, V: the softmax(QK^T)V core alone
  + proj      the same plus the Q, K, V and output projections (kernels/linear.linear, f32 weights):
              the sublayer that FNet replaces (the Q/K/V split and cache writes are left out)

FLOPs: a complex FFT of N points costs ~5 N log2 N real flops, a real-input one half that, so
Re(FFT2) of T x d is ~2.5 T d log2(T d). Attention: QK^T and PV are 2 T^2 d each (4 T^2 d);
projections 4 x 2 T d^2. Memory: the bytes of the working buffers each one needs beyond its input
and output (fastinfer's attention streams one row of scores per thread; the T x T x heads score
tensor that eager PyTorch materializes is listed beside it). Times: mean ± std over --reps
repetitions, methods alternating, warm-up (at the first length) excluded.

    python bench/fnet_mixing.py [--dim 768] [--lengths 512 2048 8192] [--reps 3]
        -> bench/results/fnet-mixing-<date>.md
"""
import argparse
import datetime
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from fastinfer.kernels import fft
from fastinfer.kernels import linear as L
from fastinfer.kernels import ops
from fastinfer.kernels.jit import set_threads
from fastinfer.weights.tensors import from_f32

HEAD_DIM = 64


def _mb(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    threads = set_threads(a.threads)
    d, H = a.dim, a.dim // HEAD_DIM
    rng = np.random.default_rng(0)
    wqkv = from_f32((rng.standard_normal((3 * d, d)) / math.sqrt(d)).astype(np.float32)).args()
    wo = from_f32((rng.standard_normal((d, d)) / math.sqrt(d)).astype(np.float32)).args()
    rows = []
    for T in a.lengths:
        x = rng.standard_normal((T, d)).astype(np.float32)
        out = np.zeros((T, d), np.float32)
        spec = np.zeros((T, d // 2 + 1), np.complex64)
        # attention buffers: the K/V "cache" of one layer, per-thread score rows, projections
        kc = np.ascontiguousarray(rng.standard_normal((1, H, T, HEAD_DIM)).astype(np.float32))
        vc = np.ascontiguousarray(rng.standard_normal((1, H, T, HEAD_DIM)).astype(np.float32))
        q = rng.standard_normal((T, H, HEAD_DIM)).astype(np.float32)
        att = np.zeros((T, H, HEAD_DIM), np.float32)
        scores = np.zeros((threads, T), np.float32)
        starts = np.zeros(T, np.int64)
        last = np.full(T, T - 1, np.int64)  # every token sees all T keys: bidirectional
        qkv = np.zeros((T, 3 * d), np.float32)
        lin = np.zeros((threads, L.scratch_size(d)), np.float32)

        def fourier():
            fft.fourier_mix(out, x, spec, threads)

        def attention():
            ops.attention(att, q, kc, vc, 0, starts, last, 0, scores)

        def attention_proj():
            L.linear(qkv, x, wqkv, 0, lin)
            ops.attention(att, q, kc, vc, 0, starts, last, 0, scores)
            L.linear(out, att.reshape(T, d), wo, 0, lin)

        methods = {"fourier": fourier, "attention": attention, "attention + proj": attention_proj}
        times = {k: [] for k in methods}
        if T == a.lengths[0]:  # warm-up (JIT compile and load) once, not timed
            for fn in methods.values():
                fn()
        for rep in range(a.reps):
            for k, fn in methods.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        flops = {"fourier": 2.5 * T * d * math.log2(T * d), "attention": 4.0 * T * T * d}
        flops["attention + proj"] = flops["attention"] + 8.0 * T * d * d
        mem = {"fourier": spec.nbytes, "attention": kc.nbytes + vc.nbytes + scores.nbytes,
               "attention + proj": kc.nbytes + vc.nbytes + scores.nbytes + qkv.nbytes + lin.nbytes}
        for k in methods:
            ms = np.array(times[k]) * 1e3
            rows.append((T, k, flops[k], ms.mean(), ms.std(ddof=1), mem[k],
                         4 * H * T * T if k != "fourier" else None))
            print(rows[-1], flush=True)
    date = datetime.date.today().isoformat()
    lines = [f"# FNet mixing vs dense attention, width {d} ({H} heads of {HEAD_DIM}), {threads} threads ({date})",
             "", f"Load average at the end {os.getloadavg()[0]:.1f} (shared machine); mean ± std over {a.reps} "
             "alternating repetitions, warm-up excluded. FLOPs and memory as in bench/fnet_mixing.py's docstring.", "",
             "| T | sublayer | GFLOP | ms | GFLOP/s | working memory MB | eager T×T scores MB | time vs fourier |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    base = {r[0]: r[3] for r in rows if r[1] == "fourier"}
    for T, k, fl, m, s, mem, eager in rows:
        lines.append(f"| {T} | {k} | {fl / 1e9:.2f} | {m:.1f} ± {s:.1f} | {fl / m / 1e6:.1f} | {_mb(mem)} | "
                     f"{'-' if eager is None else _mb(eager)} | {m / base[T]:.1f}× |")
    out = Path(__file__).resolve().parent / "results" / f"fnet-mixing-{date}.md"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
