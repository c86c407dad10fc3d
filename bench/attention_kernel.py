"""The attention kernel alone, at SmolLM2-135M's shapes (9 query heads on 3 kv heads, head_dim 64):
this tree's `fastinfer.kernels.attention` against an earlier version of it, in one process.

    prefill 512    256 queries at positions 256..511 of a 512-slot cache (pp512's second chunk)
    prefill 4096   256 queries at positions 3840..4095 of a 4096-slot cache
    decode         1 query at position 100, 800 or 2000 (past 512 keys a step splits them into pieces)
    check          a prompt-lookup draft's check: 4 or 8 queries at positions 150, 400 or 800

Dense pattern, random q and cache. The earlier version is read from git (`--baseline`, default the
commit before the transposed register-block kernel) into a temporary module; old and new alternate
call by call so both see the same load from other processes. Compile time is excluded; min and mean
of -n calls per setting, at each thread count. The baseline compiles in this process and this
tree's kernels come from the kernel cache, so the two may round differently in the last bit even
where their source is the same (the printed max |old - new|).

    python bench/attention_kernel.py -n 20 --threads 2 1
    python bench/attention_kernel.py --cases check decode --baseline REV   # a change to the few-rows path
"""
import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

from fastinfer.kernels import attention as NEW

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "64f15e160d4d2c24dbb04c7e8c20280aa9121e86"  # kernels/attention.py before this rewrite
H, KV, HD = 9, 3, 64
CASES = [("prefill 512", 256, 256, 512), ("prefill 4096", 256, 3840, 4096), ("decode @100", 1, 100, 128),
         ("decode @800", 1, 800, 816), ("decode @2000", 1, 2000, 2016), ("check 8 @150", 8, 150, 160),
         ("check 4 @400", 4, 400, 416), ("check 8 @400", 8, 400, 416), ("check 4 @800", 4, 800, 816),
         ("check 8 @800", 8, 800, 816)]


def load_baseline(rev: str):
    """kernels/attention.py at `rev` as a private module of fastinfer.kernels (so that its relative
    imports resolve to this tree's jit, isa and simd modules)."""
    src = subprocess.run(["git", "show", f"{rev}:kernels/attention.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    d = Path(tempfile.gettempdir()) / f"fastinfer_attention_{rev[:12]}"
    d.mkdir(exist_ok=True)
    path = d / "_attention_baseline.py"
    if not path.exists() or path.read_text() != src:
        path.write_text(src)
    spec = importlib.util.spec_from_file_location("fastinfer.kernels._attention_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def setup(T: int, pos0: int, slots_total: int, half: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((T, H, HD)).astype(np.float32)
    k_cache = rng.standard_normal((1, KV, slots_total, HD)).astype(np.float32)
    v_cache = rng.standard_normal((1, KV, slots_total, HD)).astype(np.float32)
    if half:  # the models' cache: half-float bits
        k_cache, v_cache = (c.astype(np.float16).view(np.uint16) for c in (k_cache, v_cache))
    slots = np.arange(pos0, pos0 + T, dtype=np.int64)
    starts = np.zeros(T, np.int64)
    return q, k_cache, v_cache, starts, slots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=20, help="timed calls per setting (default 20)")
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--baseline", default=BASELINE, help="git revision of kernels/attention.py to compare")
    ap.add_argument("--cases", nargs="+", default=["prefill", "decode @100"],
                    help="cases whose names start with these (default: prefill, decode @100)")
    ap.add_argument("--cache", choices=["f32", "f16"], default="f32", help="the K/V cache's type (models: f16)")
    args = ap.parse_args()
    old = load_baseline(args.baseline)
    versions = [("old", old), ("new", NEW)]
    threads_max = numba.config.NUMBA_NUM_THREADS
    print(f"| case | threads | old min ms | old mean ms | new min ms | new mean ms | speedup (min) | GFLOP/s new |")
    print("|---|---|---|---|---|---|---|---|")
    for name, T, pos0, slots_total in [c for c in CASES if c[0].startswith(tuple(args.cases))]:
        q, k_cache, v_cache, starts, slots = setup(T, pos0, slots_total, args.cache == "f16")
        pattern = NEW.dense_pattern(slots_total)
        keys = sum(p + 1 for p in range(pos0, pos0 + T))
        flop = 4.0 * H * HD * keys
        outs = {}
        calls = {}
        for tag, mod in versions:
            out = np.zeros((T, H, HD), np.float32)
            scratch = np.zeros((threads_max, mod.scratch_size(HD, H // KV)), np.float32)

            def call(mod=mod, out=out, scratch=scratch):
                mod.attention(out, q, k_cache, v_cache, 0, starts, slots, 0, pattern, scratch)
            call()  # compile / load from the cache
            outs[tag] = out
            calls[tag] = call
        err = float(np.abs(outs["old"] - outs["new"]).max())
        for th in args.threads:
            numba.set_num_threads(min(th, threads_max))
            ts = {tag: [] for tag, _ in versions}
            reps = args.n if T > 1 else args.n * 50
            for _ in range(reps):
                for tag, _ in versions:
                    t0 = time.perf_counter()
                    calls[tag]()
                    ts[tag].append(time.perf_counter() - t0)
            o, n = np.array(ts["old"]) * 1e3, np.array(ts["new"]) * 1e3
            print(f"| {name} | {th} | {o.min():.3f} | {o.mean():.3f} | {n.min():.3f} | {n.mean():.3f} | "
                  f"{o.min() / n.min():.2f}x | {flop / n.min() / 1e6:.1f} |", flush=True)
        print(f"<!-- {name}: max |old - new| = {err:.2e} -->")
    numba.set_num_threads(threads_max)


if __name__ == "__main__":
    main()
