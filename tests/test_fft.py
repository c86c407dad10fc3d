"""FFT kernels (kernels/fft.py, and the own kernel kept in bench/) against numpy.fft in float64."""
import sys
from pathlib import Path

import numpy as np
import pytest

from fastinfer.kernels import fft as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import fft_stockham as S  # noqa: E402

# odd, prime (Bluestein territory), powers of two and the model widths (96 = 2^5 3, 576 = 2^6 3^2)
SIZES = [1, 2, 3, 5, 7, 8, 15, 16, 17, 96, 97, 100, 127, 128, 243, 576, 768, 1000, 1021, 1024, 4093, 4096]


def _rel(got, want):
    return np.abs(got - want).max() / max(np.abs(want).max(), 1e-300)


@pytest.mark.parametrize("n", SIZES)
def test_fft_rows_matches_numpy(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((3, n)) + 1j * rng.standard_normal((3, n))
    want = np.fft.fft(x, axis=1)
    out = np.zeros_like(x)
    F.fft_rows(out, x, 1)
    assert _rel(out, want) < 1e-13
    x64, out64 = x.astype(np.complex64), np.zeros((3, n), np.complex64)
    F.fft_rows(out64, x64, 2)
    assert _rel(out64, want) < 2e-6  # complex64: ~eps32 * log n


@pytest.mark.parametrize("n", SIZES)
def test_own_stockham_kernel_matches_numpy(n):
    rng = np.random.default_rng(n + 1)
    x = rng.standard_normal((2, n)) + 1j * rng.standard_normal((2, n))
    plan = S.fft_plan(n)
    y = x.copy()
    S.fft_rows(y, plan, np.zeros((2, S.work_size(plan)), np.complex128))
    assert _rel(y, np.fft.fft(x, axis=1)) < 1e-13


@pytest.mark.parametrize("T,d", [(1, 1), (1, 8), (2, 3), (5, 8), (7, 9), (16, 96), (33, 100), (128, 768)])
def test_fourier_mix_is_real_part_of_fft2(T, d):
    rng = np.random.default_rng(T * 1000 + d)
    x = rng.standard_normal((T, d)).astype(np.float32)
    want = np.fft.fftn(x.astype(np.float64), axes=(0, 1)).real
    out = np.full((T, d), np.nan, np.float32)
    F.fourier_mix(out, x, np.zeros((T, d // 2 + 1), np.complex64), 2)
    assert _rel(out, want) < 1e-6
    ps, ph = S.fft_plan(T), S.fft_plan(d)
    own = np.full((T, d), np.nan, np.float32)
    S.fourier_mix(own, x, ps, ph, np.zeros((T, d // 2 + 1), np.complex128),
                  np.zeros((2, S.scratch_width(ps, ph)), np.complex128))
    assert _rel(own, want) < 1e-6
