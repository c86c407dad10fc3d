"""The prefill matmul: the int8-activation VNNI kernel (kernels/qgemm.py) against the f32 path
(kernels/linear.py `linear`, which dequantizes panels to f32), on the same Q4_1 weights.

Shapes are the real model's (SmolLM2-135M: dim 576, hidden 1536, q/k/v/o 960/576, w1/w3 1536,
lm head 49152 is left out for time): T = 256 tokens of one prefill chunk, W (rows, n).
The two kernels alternate inside every repetition (the machine is shared and noisy); the first
call (JIT compile) is excluded. GOP/s counts 2 * T * rows * n per call. The int8 kernel's time
does not include quantizing the activations (a separate O(T n) kernel).

    python bench/qgemm.py [--reps 20] [--threads 1 2]
"""
import argparse
import time

import numba
import numpy as np

from fastinfer.kernels import linear as LIN
from fastinfer.kernels import qgemm as Q

SHAPES = [(256, 3072, 576), (256, 576, 1536), (256, 960, 576), (256, 576, 576)]  # (T, rows, n)


def q4_1_weight(rows: int, n: int, rng) -> tuple:
    empty = np.zeros((0, 0, 0), np.float32)
    q = rng.integers(0, 256, (1, rows, n // 2), dtype=np.uint8)
    s = rng.uniform(0.001, 0.02, (1, rows, n // 32)).astype(np.float32)
    m = rng.uniform(-0.1, 0.0, (1, rows, n // 32)).astype(np.float32)
    return (LIN.Q4_1, q, s, m, empty)


def quantize_x(x: np.ndarray):
    """f32 (T, n) -> xq int8 (T, n), xd, xs f32 (T, n // 32), as the engine's activation kernel."""
    T, n = x.shape
    xb = x.reshape(T, n // 32, 32)
    xd = (np.abs(xb).max(-1) / np.float32(127)).astype(np.float32)
    inv = np.divide(1, xd, out=np.zeros_like(xd), where=xd > 0)
    xq = np.round(xb * inv[..., None]).astype(np.int8)
    xs = (xd * xq.astype(np.float32).sum(-1)).astype(np.float32)
    return xq.reshape(T, n), xd, xs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    threads = numba.config.NUMBA_NUM_THREADS
    print("| threads | T x rows x n | f32 min ms | f32 mean ms | f32 GOP/s | a8 min ms | a8 mean ms "
          "| a8 GOP/s | speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for nt in args.threads:
        numba.set_num_threads(min(nt, threads))
        for T, rows, n in SHAPES:
            w = q4_1_weight(rows, n, rng)
            x = rng.standard_normal((T, n)).astype(np.float32)
            xq, xd, xs = quantize_x(x)
            o_f, o_q = np.zeros((T, rows), np.float32), np.zeros((T, rows), np.float32)
            s_f = np.zeros((threads, LIN.scratch_size(n)), np.float32)
            s_q = np.zeros((threads, Q.scratch_size(n)), np.float32)
            runs = {"f32": lambda: LIN.linear(o_f, x, w, 0, s_f),
                    "a8": lambda: Q.linear_a8_tiles(o_q, xq, xd, xs, w, 0, 0, s_q)}
            times = {k: [] for k in runs}
            for fn in runs.values():
                fn()  # compile / warm up
            for _ in range(args.reps):
                for k, fn in runs.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
            err = np.abs(o_q - o_f).max() / np.abs(o_f).max()
            ops = 2 * T * rows * n
            tf, tq = np.array(times["f32"]), np.array(times["a8"])
            print(f"| {nt} | {T}x{rows}x{n} | {tf.min()*1e3:.2f} | {tf.mean()*1e3:.2f} | {ops/tf.min()/1e9:.0f} "
                  f"| {tq.min()*1e3:.2f} | {tq.mean()*1e3:.2f} | {ops/tq.min()/1e9:.0f} | {tf.min()/tq.min():.2f}x |"
                  f"  (max rel diff {err:.1e})", flush=True)


if __name__ == "__main__":
    main()
