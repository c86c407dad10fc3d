"""Resident KV-cache memory of Gemma 3 at a long context: the sliding-window layers' old pages
given back (the default) against a cache that keeps every position.

    python bench/kv_memory.py --model gemma-3-270m --tokens 8192

Prefills random token ids in chunks, then counts the caches' resident pages in
/proc/self/pagemap (Linux). Prints one JSON line.
"""
import argparse
import dataclasses
import json
import time

import numpy as np

import fastinfer


def resident_kib(a: np.ndarray) -> int:
    """Resident KiB of array a's pages, from /proc/self/pagemap (bit 63 of a page's entry: present)."""
    import mmap as _mmap
    page = _mmap.PAGESIZE
    first, last = a.ctypes.data // page, (a.ctypes.data + a.nbytes - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = np.frombuffer(f.read((last - first + 1) * 8), np.uint64)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum()) * page // 1024


def measure(model, tokens: int, trim: bool) -> dict:
    model.arch = dataclasses.replace(model.arch, trims_cache=trim)
    s = model.session()
    ids = np.random.default_rng(0).integers(0, model.args.vocab_size, tokens).tolist()
    t = time.perf_counter()
    s.prefill(ids)
    kib = resident_kib(s.state.k_cache) + resident_kib(s.state.v_cache)
    return {"trim": trim, "tokens": tokens, "kv_resident_mib": round(kib / 1024, 1),
            "prefill_s": round(time.perf_counter() - t, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--kv-type", default="f16")
    args = ap.parse_args()
    m = fastinfer.load(args.model, n_ctx=args.tokens, kv_type=args.kv_type)
    per_token = 2 * m.args.n_layers * m.args.n_kv_heads * m.args.head_dim * (2 if args.kv_type == "f16" else 4)
    rows = [measure(m, args.tokens, trim) for trim in (True, False)]
    print(json.dumps({"model": m.source, "kv_type": args.kv_type, "full_cache_mib": round(per_token * args.tokens / 2**20, 1),
                      "cpu": fastinfer.kernels.isa.describe()["cpu"], "isa": fastinfer.kernels.isa.TIER.name,
                      "runs": rows}))


if __name__ == "__main__":
    main()
