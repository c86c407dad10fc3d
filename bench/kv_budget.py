"""KV eviction over a long generation: RSS and decode speed with kv_budget, against dense.

Decodes `--tokens` greedy tokens after a short prompt with a kv_budget session. Every step of it
alternates with one step of a reference session that restarts every window (so it always decodes
at a short context): the ratio of the two per window cancels the noise of a shared machine. The
dense session runs the same way for contrast. Prints per-window tokens/s, ratio and RSS.

    python bench/kv_budget.py --budget 512 --tokens 4096 [--kv-type f32]
"""
import argparse
import gzip
import time
from pathlib import Path

import numpy as np

import fastinfer
from fastinfer.models import DEFAULT_KV_TYPE, KV_TYPES


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(model, prompt, n, window, label, **opts):
    s = model.session(**opts)
    ref = model.session(n_ctx=len(prompt) + window + 1)
    tok = int(np.argmax(s.prefill(prompt)))
    rows, t_s, t_r = [], [], []
    for i in range(n):
        if i % window == 0:
            ref.reset()
            rtok = int(np.argmax(ref.prefill(prompt)))
        t0 = time.perf_counter()
        tok = int(np.argmax(s.decode_step(tok)))
        t1 = time.perf_counter()
        rtok = int(np.argmax(ref.decode_step(rtok)))
        t2 = time.perf_counter()
        t_s.append(t1 - t0)
        t_r.append(t2 - t1)
        if (i + 1) % window == 0:
            rows.append((i + 1, window / sum(t_s), window / sum(t_r), rss_mb()))
            r = rows[-1]
            print(f"{label} {r[0]:6d} | {r[1]:6.1f} | {r[2]:6.1f} | {r[1] / r[2]:5.3f} | {r[3]:7.1f}", flush=True)
            t_s, t_r = [], []
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--dense", action="store_true", help="also run without a budget, for contrast")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kv-type", default=DEFAULT_KV_TYPE, choices=list(KV_TYPES),
                    help="KV cache element type (default: %(default)s)")
    a = ap.parse_args()
    text = gzip.open(Path(__file__).parents[1] / "tests/data/corpus/persuasion.txt.gz", "rt").read()
    model = fastinfer.load(n_ctx=64 + a.tokens + 1, threads=a.threads, kv_type=a.kv_type)
    prompt = model.encode(text)[5000:5064]
    runs = [("kv_budget=%d" % a.budget, {"kv_budget": a.budget})] + ([("dense", {})] if a.dense else [])
    for label, opts in runs:
        print(f"{label}: tokens generated | t/s | t/s of a short-context session, same moments | ratio | RSS MB",
              flush=True)
        rows = run(model, prompt, a.tokens, a.window, label, **opts)
        ratios = np.array([ts / tr for _, ts, tr, _ in rows])
        print(f"{label}: ratio first window {ratios[0]:.3f}; last 4 windows {ratios[-4:].mean():.3f} ± "
              f"{ratios[-4:].std(ddof=1):.3f}; RSS {rows[0][3]:.1f} -> {rows[-1][3]:.1f} MB", flush=True)


if __name__ == "__main__":
    main()
