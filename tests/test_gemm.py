"""The prefill register block (kernels/gemm.py) against a NumPy matmul, on every token count 1..6,
unaligned offsets and widths that are not multiples of 8."""
import numpy as np
import pytest

from fastinfer.kernels import gemm as G


@pytest.mark.parametrize("n", [1, 7, 64, 577])
@pytest.mark.parametrize("mr", range(1, G.MR + 1))
def test_micro_matches_numpy(n, mr):
    rng = np.random.default_rng(n * 10 + mr)
    x = rng.standard_normal((9, n)).astype(np.float32)
    w = rng.standard_normal((48, n)).astype(np.float32)
    panel = G.pack_panels(w)
    out = np.full((12, 40), 7.0, np.float32)  # the block lands at rows 3.., columns 5..; the rest stays
    G.micro(out, 3, x, 2, panel, 16 * n, n, 5, mr)  # the second 16-row panel, tokens 2..
    want = out.copy()
    want[3:3 + mr, 5:21] = x[2:2 + mr].astype(np.float64) @ w[16:32].T.astype(np.float64)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4 * np.sqrt(n))


def test_empty_inner_dimension_gives_zeros():
    out = np.ones((6, 16), np.float32)
    G.micro(out, 0, np.zeros((6, 0), np.float32), 0, np.zeros(0, np.float32), 0, 0, 0, 6)
    assert not out.any()
