"""Fourier transforms for FNet's token mixing (the spectral filter is kernels/spectral.py).

The transforms are DUCC0's (the C++ library behind scipy.fft), called from compiled code through
rocket-fft's low-level interface, which writes into caller-provided arrays: nothing is allocated
per call, and any length works (mixed radix, Bluestein for large primes). bench/fft.py chose it
over fastinfer's own Stockham/Bluestein kernel (kept in bench/fft_stockham.py) by measurement:
several times faster at the same accuracy class. For float32 data the spectra are complex64, as in
torch (HF's FNet runs its FFTs in complex64).
"""
import numpy as np
from rocket_fft.lowlevel import c2c, c2r, r2c

from .jit import kernel

# Axis lists for DUCC0 (read-only module constants: Numba freezes them at compile time).
AXES_2D = np.array([0, 1], np.int64)
AXES_ROWS = np.array([1], np.int64)


@kernel
def fft_rows(out, x, nthreads):
    """x (R, n) complex -> out (R, n) = DFT of each row, numpy's sign: sum_j x_j exp(-2 pi i jk / n)."""
    c2c(x, out, AXES_ROWS, True, 1.0, nthreads)


@kernel
def fourier_mix(out, x, spec, nthreads):
    """FNet's token mixing: x (T, d) f32 -> out (T, d) = Re(FFT2(x)) over sequence and hidden.

    spec complex64 (T, d // 2 + 1) receives the real-input 2-D spectrum; x is real, so the columns
    past d / 2 follow from Hermitian symmetry: Z[t, d - k] = conj(Z[(T - t) % T, k]).
    """
    T, d = x.shape
    h = d // 2 + 1
    r2c(x, spec, AXES_2D, True, 1.0, nthreads)
    for t in range(T):
        tm = (T - t) % T
        for k in range(h):
            out[t, k] = spec[t, k].real
        for k in range(h, d):
            out[t, k] = spec[tm, d - k].real
