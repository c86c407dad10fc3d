"""Decode matvec for 1..8 tokens: the 16-row tiles (kernels/qtile.py) against the row loops over
untiled rows (kernels/qmatvec.py), on the default model's shapes with random weights.

    python bench/qtile.py [--threads 2] [--reps 15] [--tokens 1,2,3,4,5,6,8]

Per token count the two kernels alternate call by call (compile excluded); the table gives each
one's minimum in µs over --reps calls, its cost against its own one-token call, and the speedup.
"""
import argparse
import time

import numba
import numpy as np

from fastinfer.kernels import act8 as A8
from fastinfer.kernels import isa
from fastinfer.kernels import qmatvec as QV
from fastinfer.kernels import qtile as QT
from fastinfer.kernels.formats import Q4_1, Q8_0, TILED

CASES = [(Q4_1, 30, 3072, 576, "30 x (3072, 576) Q4_1: the layers' gate and up"),
         (Q8_0, 1, 49152, 576, "1 x (49152, 576) Q8_0: the output matrix")]


def weight(kind, layers, rows, n, rng):
    nb = n // 32
    q = rng.integers(0, 256, (layers, rows, n if kind == Q8_0 else n // 2), dtype=np.uint8)
    s = rng.uniform(0.001, 0.02, (layers, rows, nb)).astype(np.float32)
    m = rng.uniform(-0.1, 0.1, (layers, rows, nb)).astype(np.float32) if kind == Q4_1 else np.zeros((0, 0, 0), np.float32)
    return kind, q, s, m, np.zeros((0, 0, 0), np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--tokens", default="1,2,3,4,5,6,8")
    args = ap.parse_args()
    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"tier {isa.TIER.name}, {args.threads} threads, min of {args.reps} calls each\n")
    print("| matrices | T | row loops µs | vs T=1 | tiles µs | vs T=1 | speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, layers, rows, n, label in CASES:
        w = weight(kind, layers, rows, n, rng)
        wt = (TILED[kind],) + QT.repack(kind, w[1], w[2], w[3]) + (w[4],)
        xq = np.zeros((8, n), np.int8)
        xd, xs = np.zeros((8, n // 32), np.float32), np.zeros((8, n // 32), np.float32)
        A8.quantize(xq, xd, xs, rng.standard_normal((8, n)).astype(np.float32))
        scratch = np.zeros((args.threads, QV.scratch_size(n, 8)), np.float32)
        one = {}
        for T in (int(t) for t in args.tokens.split(",")):
            out = np.zeros((T, rows), np.float32)
            times = {"rows": [], "tiles": []}
            for rep in range(args.reps + 1):
                for name in times:
                    t0 = time.perf_counter()
                    for l in range(layers):
                        if name == "rows":
                            QV.linear_a8_rows(out, xq[:T], xd[:T], xs[:T], w, l, scratch, 0)
                        else:
                            QT.linear_a8_tiled(out, xq[:T], xd[:T], xs[:T], wt, l, 0, args.threads)
                    if rep:  # the first call of each compiles
                        times[name].append((time.perf_counter() - t0) * 1e6)
            best = {k: min(v) for k, v in times.items()}
            for k in best:
                one.setdefault(k, best[k])
            print(f"| {label} | {T} | {best['rows']:.0f} | {best['rows'] / one['rows']:.2f}× | {best['tiles']:.0f} | "
                  f"{best['tiles'] / one['tiles']:.2f}× | {best['rows'] / best['tiles']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
