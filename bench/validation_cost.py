"""What validating a model file costs, as a share of loading it.

    python bench/validation_cost.py [MODEL] [-r 7]

Loads MODEL (default: the default model) r times after one warm-up load (compiled kernels cached,
file in the page cache), with every validation step timed by a wrapper: the GGUF data layout,
the config checks, each matrix's and vector's layout and finiteness checks, the RoPE scaling
checks and the safetensors header checks. Prints load time and validation time, mean ± std,
with the CPU and ISA tier.
"""
import argparse
import statistics
import time

import fastinfer
from fastinfer.kernels import isa
from fastinfer.models import llama
from fastinfer.weights import checkpoint, gguf, gguf_meta, safetensors_mmap, tensors

# (module, function name) of every validation step, and every module that imported it by name
STEPS = [(gguf_meta, "_check_layout", []), (checkpoint, "check_config", [gguf]),
         (tensors, "check_matrix", [llama]), (tensors, "check_vector", [llama]),
         (llama, "_check_rope_scaling", []), (safetensors_mmap, "_span", [])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("-r", "--repetitions", type=int, default=7)
    args = ap.parse_args()

    spent = [0.0]

    def timed(f):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t
        return wrapper

    for module, name, importers in STEPS:
        w = timed(getattr(module, name))
        for m in (module, *importers):
            if hasattr(m, name):
                setattr(m, name, w)

    fastinfer.load(args.model, threads=2)  # warm-up: compile cache, page cache
    loads, checks = [], []
    for _ in range(args.repetitions):
        spent[0] = 0.0
        t = time.perf_counter()
        m = fastinfer.load(args.model, threads=2)
        loads.append(time.perf_counter() - t)
        checks.append(spent[0])
        del m
    share = [c / t for c, t in zip(checks, loads)]
    print(f"{isa.cpu_model()} ({isa.TIER.name}); model {args.model or 'default'}; {args.repetitions} loads")
    print(f"load        {statistics.mean(loads) * 1e3:8.1f} ± {statistics.stdev(loads) * 1e3:.1f} ms")
    print(f"validation  {statistics.mean(checks) * 1e3:8.1f} ± {statistics.stdev(checks) * 1e3:.1f} ms "
          f"({statistics.mean(share):.1%} ± {statistics.stdev(share):.1%} of the load)")


if __name__ == "__main__":
    main()
