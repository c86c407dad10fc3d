"""FFT inside Numba: rocket-fft (kernels/fft.py) against fastinfer's own kernel and numpy.fft.

Two measurements, on the sizes FNet and the spectral filter meet (T = 16..4096, hidden 96..1024):

  1. rows: R rows of length n, complex128, DFT of each row (the building block);
  2. mixing: Re(FFT2(x)) of a float32 (T, hidden) block (one FNet layer's token mixing).

Engines alternate inside every repetition (the machine is shared and noisy); the first call of
each (JIT compile) is excluded. Accuracy: max |error| / max |reference| against numpy.fft in
float64. "rocket-fft" is what the engine uses (kernels/fft.py: DUCC0 through rocket-fft's
low-level calls from njit code); "own" is fastinfer's Stockham/Bluestein kernel
(bench/fft_stockham.py), the alternative it was chosen over.

    python bench/fft.py [--reps 7] [--threads 2]    ->  bench/results/fft-<date>-t<threads>.md
"""
import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numba
import numpy as np
import rocket_fft

import fft_stockham as S  # bench/ is on sys.path when this runs as a script
from fastinfer.kernels import fft as F
from fastinfer.kernels.jit import set_threads

ROWS = [(64, 16), (64, 97), (64, 128), (64, 512), (64, 576), (64, 768), (64, 1000), (64, 1024),
        (16, 2048), (16, 4093), (16, 4096)]
MIX = [(16, 96), (128, 576), (512, 768), (1000, 768), (2048, 1024), (4096, 1024)]

def _timed(fn, calls: int, reps_out: list) -> np.ndarray:
    t0 = time.perf_counter()
    for _ in range(calls):
        r = fn()
    reps_out.append((time.perf_counter() - t0) / calls)
    return r


def _run(engines: dict, reps: int):
    """Alternate the engines; returns name -> (per-call times, last result).

    Repetition 0 is the warm-up (JIT compile); it also sets how many back-to-back calls one timing
    spans (>= ~20 ms), so that a small transform measures its throughput, as inside a model
    forward, not the wake-up of idle worker threads on a shared machine.
    """
    times = {k: [] for k in engines}
    results, calls = {}, {}
    for name, fn in engines.items():
        fn()
        t0 = time.perf_counter()
        results[name] = fn()
        calls[name] = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6)))
    for rep in range(reps):
        for name, fn in engines.items():
            results[name] = _timed(fn, calls[name], times[name])
    return times, results


def _fmt(ts: list) -> str:
    a = np.array(ts) * 1e3
    return f"{a.mean():.3f} ± {a.std(ddof=1):.3f}"


def bench_rows(reps: int, threads: int) -> list[str]:
    lines = ["| rows × n | numpy.fft ms | own ms | rocket-fft ms | err numpy | err own | err rocket-fft |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    rng = np.random.default_rng(0)
    for R, n in ROWS:
        x = rng.standard_normal((R, n)) + 1j * rng.standard_normal((R, n))
        ref = np.fft.fft(x, axis=1)  # float64 pocketfft: the reference
        plan = S.fft_plan(n)
        sc = np.zeros((threads, S.work_size(plan)), np.complex128)
        buf = x.copy()
        out = np.zeros_like(x)

        def own():
            buf[:] = x
            S.fft_rows(buf, plan, sc)
            return buf

        def rocket():
            F.fft_rows(out, x, threads)
            return out
        engines = {"numpy": lambda: np.fft.fft(x, axis=1), "own": own, "rocket": rocket}
        times, res = _run(engines, reps)
        err = {k: float(np.abs(v - ref).max() / np.abs(ref).max()) for k, v in res.items()}
        lines.append(f"| {R} × {n} | {_fmt(times['numpy'])} | {_fmt(times['own'])} | {_fmt(times['rocket'])} | "
                     f"{err['numpy']:.1e} | {err['own']:.1e} | {err['rocket']:.1e} |")
        print(lines[-1], flush=True)
    return lines


def bench_mix(reps: int, threads: int) -> list[str]:
    lines = ["| T × hidden | numpy.fft ms | own ms | rocket-fft ms | err numpy | err own | err rocket-fft |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    rng = np.random.default_rng(1)
    for T, d in MIX:
        x = rng.standard_normal((T, d)).astype(np.float32)
        ref = np.fft.fft2(x.astype(np.float64)).real
        ps, ph = S.fft_plan(T), S.fft_plan(d)
        out = np.zeros((T, d), np.float32)
        out2 = np.zeros((T, d), np.float32)
        spec = np.zeros((T, d // 2 + 1), np.complex64)
        spec2 = np.zeros((T, d // 2 + 1), np.complex64)
        sc = np.zeros((threads, S.scratch_width(ps, ph)), np.complex128)

        def own():
            S.fourier_mix(out, x, ps, ph, spec, sc)
            return out

        def rocket():
            F.fourier_mix(out2, x, spec2, threads)
            return out2
        engines = {"numpy": lambda: np.fft.fft2(x).real, "own": own, "rocket": rocket}
        times, res = _run(engines, reps)
        err = {k: float(np.abs(v - ref).max() / np.abs(ref).max()) for k, v in res.items()}
        lines.append(f"| {T} × {d} | {_fmt(times['numpy'])} | {_fmt(times['own'])} | {_fmt(times['rocket'])} | "
                     f"{err['numpy']:.1e} | {err['own']:.1e} | {err['rocket']:.1e} |")
        print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="Markdown file (default: bench/results/fft-<date>.md)")
    a = ap.parse_args(argv)
    threads = set_threads(a.threads)
    date = datetime.date.today().isoformat()
    out = Path(a.out or Path(__file__).parent / "results" / f"fft-{date}-t{threads}.md")
    head = [f"# FFT in Numba: rocket-fft vs fastinfer's own kernel vs numpy.fft ({date})", "",
            f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; threads {threads}; "
            f"numpy {np.__version__}, numba {numba.__version__}, rocket-fft {rocket_fft.__version__}; "
            f"load average at start {os.getloadavg()[0]:.1f} (the machine is shared). "
            f"mean ± std over {a.reps} repetitions, engines alternating, JIT warm-up excluded; a repetition "
            "times enough back-to-back calls to span ~20 ms and reports the time per call. "
            "numpy.fft is single-threaded; own runs `threads` Numba threads; rocket-fft gets nthreads=threads.", "",
            "## Row transforms (complex128, DFT of each row)", ""]
    rows = bench_rows(a.reps, threads)
    mid = ["", "## FNet mixing Re(FFT2(x)), float32 input", "",
           "numpy.fft: `fft2(x).real` (complex64 for float32 input); own: complex128 lines, two real rows "
           "per complex FFT, half the columns; rocket-fft: `kernels/fft.fourier_mix` (real-input 2-D "
           "transform into a preallocated complex64 spectrum, columns past d/2 by symmetry).", ""]
    mix = bench_mix(a.reps, threads)
    text = "\n".join(head + rows + mid + mix) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
