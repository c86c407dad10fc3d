"""What keeps a load's memory near one copy of the weights: stacking consumes the per-layer
matrices, and a process that only runs cached kernels does not import Numba's compiler library."""
import os
import subprocess
import sys

import numpy as np
import pytest

from fastinfer.kernels import linear as K
from fastinfer.weights import quantize as Q
from fastinfer.weights import tensors as WT


def _layers(rng, n, shapes, dtype):
    return [[Q.convert(WT.from_f32(rng.standard_normal(s).astype(np.float32)), dtype) for s in shapes]
            for _ in range(n)]


@pytest.mark.parametrize("dtype", ["f32", "int8", "int4"])
def test_stack_joined_equals_concatenation_and_consumes(dtype):
    rng = np.random.default_rng(0)
    layers = _layers(rng, 3, [(8, 64), (4, 64), (4, 64)], dtype)
    want = {name: np.concatenate([np.concatenate([getattr(w, name) for w in ws], axis=1) for ws in layers])
            for name in "qsmf" if getattr(layers[0][0], name).shape[0]}
    got = WT.stack_joined(layers)
    assert layers == [None, None, None]                  # each layer dropped once copied
    assert (got.n, got.rows, got.cols, got.kind) == (3, 16, 64, Q.convert(WT.from_f32(np.zeros((1, 64), np.float32)), dtype).kind)
    for name, a in want.items():
        np.testing.assert_array_equal(getattr(got, name), a)


def test_stack_joined_widens_mixed_formats_to_f32():
    rng = np.random.default_rng(1)
    a = _layers(rng, 1, [(8, 64)], "int8")[0] + _layers(rng, 1, [(8, 64)], "f32")[0]
    want = np.concatenate([WT.to_f32(a[0]).f[0], a[1].f[0]])
    got = WT.stack_joined([a])
    assert got.kind == K.F32
    np.testing.assert_array_equal(got.f[0], want)


def test_stack_joined_rejects_disagreeing_layers():
    rng = np.random.default_rng(2)
    layers = _layers(rng, 1, [(8, 64)], "f32") + _layers(rng, 1, [(4, 64)], "f32")
    with pytest.raises(ValueError, match="disagree"):
        WT.stack_joined(layers)


def test_cached_kernels_load_without_numbas_compiler_library(tmp_path):
    """A second process runs a cached kernel without the ~380 modules Numba imports to compile
    (kernels/jit.py `_load_cached_without_refresh`); numba.np.linalg stands for them. A first
    process, which compiles, does import them, so the check can fail."""
    code = ("import sys, numpy as np\n"
            "from fastinfer.kernels import act8\n"
            "x = np.full((2, 64), 3.0, np.float32); xq = np.ones((2, 64), np.int8)\n"
            "xd = np.ones((2, 2), np.float32); xr = np.zeros((2, 64), np.float32)\n"
            "act8.residual(xr, x, xq, xd)\n"
            "assert (xr == 2.0).all(), xr\n"
            "print('numba.np.linalg' in sys.modules)\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    run = lambda: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,  # noqa: E731
                                 timeout=600)
    first, second = run(), run()
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.split() == ["True"]     # compiling refreshes Numba's whole target context
    assert second.stdout.split() == ["False"]   # loading from the cache does not
