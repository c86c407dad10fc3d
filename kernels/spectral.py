"""The spectral filter: per token, keep only the strongest frequencies of its hidden state.

An opt-in experiment (docs/performance.md, "The spectral filter": it costs time and saves
nothing). Rows are short (the model width) and the filter is off by default, so this is a
direct real DFT against tables built once per session, in float64: no FFT library is imported on
the Llama path, which keeps `import fastinfer` and a warm start fast (rocket-fft, which FNet's
token mixing uses, pulls in scipy.fft).
"""
import numpy as np

from .jit import kernel


def dft_tables(d: int) -> np.ndarray:
    """f64 (2, d // 2 + 1, d): cos(2 pi k j / d) and sin(2 pi k j / d) for bin k, element j."""
    h = d // 2 + 1
    ang = 2.0 * np.pi * ((np.arange(h)[:, None] * np.arange(d)[None, :]) % d) / d
    return np.stack([np.cos(ang), np.sin(ang)])


@kernel
def spectral_filter_(x, keep, tables, spec, mags):
    """Per row of x (T, d) f32, in place: keep its `keep` strongest frequencies, zero the others.

    The frequencies are the h = d // 2 + 1 bins of the row's real DFT (bin k stands for k and
    d - k together, so the row stays real); strength is |X_k|, ties at the threshold are kept.
    tables = dft_tables(d); spec f64 (2, h) and mags f64 (2, h) are scratch: nothing is allocated.
    """
    T, d = x.shape
    h = d // 2 + 1
    if keep >= h:
        return
    cs, sn = tables[0], tables[1]
    re, im = spec[0], spec[1]
    mag, srt = mags[0], mags[1]
    for t in range(T):
        row = x[t]
        for k in range(h):  # X_k = sum_j x_j exp(-2 pi i k j / d)
            a = 0.0
            b = 0.0
            for j in range(d):
                a += cs[k, j] * row[j]
                b -= sn[k, j] * row[j]
            re[k] = a
            im[k] = b
            mag[k] = np.sqrt(a * a + b * b)
            srt[k] = mag[k]
        srt.sort()
        thresh = srt[h - keep] if keep > 0 else np.inf
        for k in range(h):
            if mag[k] < thresh:
                re[k] = 0.0
                im[k] = 0.0
        # inverse: x_j = (X_0 + 2 sum_{0<k<d/2} Re(X_k e^{2 pi i k j / d}) + X_{d/2} (-1)^j) / d
        last = h - 1 if d % 2 == 0 else h  # the Nyquist bin (even d) has no mirror image
        for j in range(d):
            v = re[0]
            for k in range(1, last):
                v += 2.0 * (re[k] * cs[k, j] - im[k] * sn[k, j])
            if d % 2 == 0:
                v += re[h - 1] * cs[h - 1, j]
            row[j] = v / d
