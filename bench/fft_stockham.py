"""The FFT fastinfer wrote itself, kept as the measured alternative to rocket-fft (bench/fft.py).

It lost: pocketfft/DUCC0 behind rocket-fft vectorizes across lines and was 3-10x faster at the
same accuracy class (bench/results/fft-*.md), so the engine's kernels (kernels/fft.py) call
rocket-fft. This one is correct (tests/test_fft.py checks it against numpy.fft too) and has no
dependency beyond Numba: any length, complex128 inside.

    plan = fft_plan(n)                       # precomputed once per length, outside the kernels
    fft_line(x, work, plan)                  # x (n,) complex128 <- DFT(x), in place

The DFT is numpy's: X[k] = sum_j x[j] exp(-2 pi i j k / n). Lengths factor into radices 4, 2, 3
and small odd primes, each pass a Stockham autosort stage (no bit reversal; reads and writes
stride-1 in the innermost loop once m > 1). A length with a prime factor above MAX_RADIX goes
through Bluestein's chirp-z: a circular convolution of power-of-two length M >= 2n - 1.

A plan is a tuple of plain arrays, so every length has one Numba type and kernels compile once:

    factors  int64 (stages,)       radices in the order the stages apply them
    table    complex128 (n,)       exp(-2 pi i t / n): every twiddle of every stage is one of these
    chirp    complex128 (n | 0,)   Bluestein: exp(-pi i t^2 / n); empty for direct lengths
    filt     complex128 (M | 0,)   Bluestein: DFT of the conjugate chirp, wrapped to length M
    mfactors int64, mtable complex128 (M,): the plan of the power-of-two length M

`fourier_mix` takes per-thread complex128
scratch of width `scratch_width(...)`, sized by the caller (the kernels never ask numba for the
thread count: that would defeat the disk cache).
"""
import math
from functools import lru_cache

import numpy as np
from numba import get_thread_id, prange

from fastinfer.kernels.jit import kernel

MAX_RADIX = 13  # larger prime factors cost O(p) per element directly; Bluestein costs ~6 FFTs of 2n


def _factorize(n: int) -> list[int]:
    """Radices for n: 4s first (fewest passes), then 2, 3, 5, 7, ...; [] for n == 1."""
    out = []
    while n % 4 == 0:
        out.append(4)
        n //= 4
    p = 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1 if p == 2 else 2
    return out


def _table(n: int) -> np.ndarray:
    return np.exp(-2j * np.pi * np.arange(n) / n)


_EMPTY_C = np.zeros(0, np.complex128)
_EMPTY_I = np.zeros(0, np.int64)


@lru_cache(maxsize=64)
def fft_plan(n: int) -> tuple:
    """The plan (see the module docstring) for length n >= 1. Cached: plans are read-only."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"FFT length must be a positive integer; got {n!r}")
    n = int(n)
    factors = _factorize(n)
    if not factors or max(factors) <= MAX_RADIX:
        plan = (np.array(factors, np.int64), _table(n), _EMPTY_C, _EMPTY_C, _EMPTY_I, _EMPTY_C)
    else:
        m = 1 << (2 * n - 2).bit_length()  # >= 2n - 1: the linear convolution does not wrap
        t = np.arange(n, dtype=np.int64)
        chirp = np.exp(-1j * np.pi * ((t * t) % (2 * n)) / n)  # k^2 mod 2n keeps the angle exact
        c = np.zeros(m, np.complex128)
        c[:n] = np.conj(chirp)
        c[m - n + 1:] = np.conj(chirp[1:])[::-1]
        plan = (_EMPTY_I, _EMPTY_C, chirp, np.fft.fft(c), np.array(_factorize(m), np.int64), _table(m))
    for a in plan:
        a.flags.writeable = False
    return plan


def work_size(plan: tuple) -> int:
    """complex128 elements `fft_line` needs as work space for this plan."""
    factors, table, chirp, filt, mfactors, mtable = plan
    return table.shape[0] if chirp.shape[0] == 0 else 2 * mtable.shape[0]


def plan_length(plan: tuple) -> int:
    return plan[1].shape[0] if plan[2].shape[0] == 0 else plan[2].shape[0]


@kernel
def _stockham(a, b, factors, table):
    """DFT of a (n,) complex128 by Stockham passes between a and b (n,).

    The result is in a after an even number of passes, in b after an odd number. Pass with radix
    p, l = n / (radices so far * p), m = radices so far: for j < l, k < m, q < p,
        b[k + m (q + p j)] = w^(j q) * sum_r a[k + m (j + l r)] exp(-2 pi i r q / p),  w = exp(-2 pi i / (l p)).
    """
    n = table.shape[0]
    l = n
    m = 1
    for f in range(factors.shape[0]):
        p = factors[f]
        l //= p
        s = n // (l * p)  # w^t = table[t * s]
        if p == 4:
            for j in range(l):
                w1 = table[j * s]
                w2 = table[2 * j * s]
                w3 = table[3 * j * s]
                for k in range(m):
                    x0 = a[k + m * j]
                    x1 = a[k + m * (j + l)]
                    x2 = a[k + m * (j + 2 * l)]
                    x3 = a[k + m * (j + 3 * l)]
                    t0 = x0 + x2
                    t1 = x0 - x2
                    t2 = x1 + x3
                    d = x1 - x3
                    t3 = complex(d.imag, -d.real)  # -i (x1 - x3)
                    o = k + m * 4 * j
                    b[o] = t0 + t2
                    b[o + m] = (t1 + t3) * w1
                    b[o + 2 * m] = (t0 - t2) * w2
                    b[o + 3 * m] = (t1 - t3) * w3
        elif p == 2:
            for j in range(l):
                w1 = table[j * s]
                for k in range(m):
                    x0 = a[k + m * j]
                    x1 = a[k + m * (j + l)]
                    o = k + m * 2 * j
                    b[o] = x0 + x1
                    b[o + m] = (x0 - x1) * w1
        elif p == 3:
            h = math.sqrt(3.0) / 2.0
            for j in range(l):
                w1 = table[j * s]
                w2 = table[2 * j * s]
                for k in range(m):
                    x0 = a[k + m * j]
                    x1 = a[k + m * (j + l)]
                    x2 = a[k + m * (j + 2 * l)]
                    t1 = x1 + x2
                    t2 = x0 - 0.5 * t1
                    d = x1 - x2
                    t3 = complex(h * d.imag, -h * d.real)  # -i sin(60°) (x1 - x2)
                    o = k + m * 3 * j
                    b[o] = x0 + t1
                    b[o + m] = (t2 + t3) * w1
                    b[o + 2 * m] = (t2 - t3) * w2
        else:  # a small odd prime: the p-point DFT directly, O(p) per output
            sp = n // p  # exp(-2 pi i / p)^u = table[u * sp]
            for j in range(l):
                for k in range(m):
                    for q in range(p):
                        acc = 0j
                        for r in range(p):
                            acc += a[k + m * (j + l * r)] * table[((r * q) % p) * sp]
                        b[k + m * (q + p * j)] = acc * table[j * q * s]
        m *= p
        a, b = b, a


@kernel
def fft_line(x, work, plan):
    """x (n,) complex128 <- its DFT, in place. work complex128 (>= work_size(plan),)."""
    factors, table, chirp, filt, mfactors, mtable = plan
    n = x.shape[0]
    if chirp.shape[0] == 0:
        if factors.shape[0] == 0:
            return
        tmp = work[:n]
        _stockham(x, tmp, factors, table)
        if factors.shape[0] % 2 == 1:
            x[:] = tmp
        return
    # Bluestein: X[k] = chirp[k] * sum_j (x[j] chirp[j]) conj(chirp[k - j]), a convolution of length M.
    M = mtable.shape[0]
    a = work[:M]
    b = work[M:2 * M]
    for j in range(n):
        a[j] = x[j] * chirp[j]
    a[n:] = 0
    _stockham(a, b, mfactors, mtable)
    r = a if mfactors.shape[0] % 2 == 0 else b
    o = b if mfactors.shape[0] % 2 == 0 else a
    for j in range(M):  # product of the spectra, conjugated: the inverse DFT as a forward one
        r[j] = (r[j] * filt[j]).conjugate()
    _stockham(r, o, mfactors, mtable)
    res = r if mfactors.shape[0] % 2 == 0 else o
    inv = 1.0 / M
    for k in range(n):
        x[k] = chirp[k] * res[k].conjugate() * inv


@kernel(parallel=True)
def fft_rows(x, plan, scratch):
    """x (R, n) complex128 <- DFT of each row, in place. scratch complex128 (threads, >= work_size)."""
    for r in prange(x.shape[0]):
        fft_line(x[r], scratch[get_thread_id()], plan)


def scratch_width(*plans) -> int:
    """Per-thread complex128 scratch that `fourier_mix` / `spectral_filter_` need with these plans."""
    return max(plan_length(p) + work_size(p) for p in plans)


@kernel(parallel=True)
def fourier_mix(out, x, plan_seq, plan_hid, spec, scratch):
    """FNet's token mixing: x (T, d) -> out (T, d) = Re(FFT2(x)), the 2-D DFT over sequence and hidden.

    spec complex (>= T, d // 2 + 1) holds the row spectra; scratch complex128 (threads,
    scratch_width(plan_seq, plan_hid)). x real, so
      - rows go two at a time as one complex FFT of x[t0] + i x[t1], split by Hermitian symmetry;
      - only columns k <= d / 2 are transformed: Re Z[t, d - k] = Re Z[(T - t) % T, k].
    """
    T, d = x.shape
    h = d // 2 + 1
    for pair in prange((T + 1) // 2):
        buf = scratch[get_thread_id()]
        line = buf[:d]
        t0 = 2 * pair
        t1 = t0 + 1
        if t1 < T:
            for i in range(d):
                line[i] = complex(x[t0, i], x[t1, i])
        else:
            for i in range(d):
                line[i] = complex(x[t0, i], 0.0)
        fft_line(line, buf[d:], plan_hid)
        for k in range(h):
            z = line[k]
            zc = line[(d - k) % d].conjugate()
            spec[t0, k] = 0.5 * (z + zc)           # spectrum of the real part, row t0
            if t1 < T:
                u = z - zc                         # (z - zc) / 2i: spectrum of the imaginary part
                spec[t1, k] = complex(0.5 * u.imag, -0.5 * u.real)
    for k in prange(h):
        buf = scratch[get_thread_id()]
        line = buf[:T]
        for t in range(T):
            line[t] = spec[t, k]
        fft_line(line, buf[T:], plan_seq)
        for t in range(T):
            out[t, k] = line[t].real
        if k >= 1 and d - k >= h:
            for t in range(T):
                out[t, d - k] = line[(T - t) % T].real
