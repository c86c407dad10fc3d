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


def _compile_then_load(tmp_path, then: str):
    """Run act8.residual, then the code `then`, in two processes sharing an empty kernel cache: the
    first compiles, the second loads. Returns both finished processes."""
    code = ("import sys, numpy as np\n"
            "from fastinfer.kernels import act8\n"
            "x = np.full((2, 64), 3.0, np.float32); xq = np.ones((2, 64), np.int8)\n"
            "xd = np.ones((2, 2), np.float32); xr = np.zeros((2, 64), np.float32)\n"
            "act8.residual(xr, x, xq, xd)\n"
            "assert (xr == 2.0).all(), xr\n") + then
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr + runs[1].stderr
    return runs


def test_cached_kernels_load_without_numbas_compiler_library(tmp_path):
    """A second process runs a cached kernel without the ~380 modules Numba imports to compile
    (kernels/jit.py `_load_cached_without_refresh`); numba.np.linalg stands for them. A first
    process, which compiles, does import them, so the check can fail."""
    first, second = _compile_then_load(tmp_path, "print('numba.np.linalg' in sys.modules)\n")
    assert first.stdout.split() == ["True"]     # compiling refreshes Numba's whole target context
    assert second.stdout.split() == ["False"]   # loading from the cache does not


def test_cached_kernels_load_without_parsing_their_bitcode(tmp_path):
    """A second process loads a cached kernel without parsing the LLVM bitcode stored beside its
    machine code (kernels/jit.py `_load_objects_without_their_bitcode`: ~13 MB for the model
    graph), and a new kernel that calls it still compiles, links against it and runs."""
    first, second = _compile_then_load(tmp_path, (
        "lib = next(iter(act8.residual.overloads.values())).library\n"
        "print(lib._shared_module is None)\n"
        "import numba\n"
        "@numba.njit\n"
        "def twice(xr, x, xq, xd):\n"
        "    act8.residual(xr, x, xq, xd)\n"
        "    return xr.sum()\n"
        "assert twice(xr, x, xq, xd) == 2.0 * xr.size\n"))
    assert first.stdout.split() == ["False"]    # compiled here: Numba keeps its module
    assert second.stdout.split() == ["True"]    # loaded: nothing parsed until something links


def test_elf_symbols_are_the_modules_definitions():
    """The names read from a kernel's object code are the ones LLVM's own module of it defines."""
    import numba
    from llvmlite import binding as ll

    from fastinfer.kernels.jit import _elf_defined_symbols

    @numba.njit
    def f(a):
        return a.sum() * 2.0

    f(np.ones(3))
    lib = next(iter(f.overloads.values())).library
    module = ll.parse_bitcode(lib._get_module_for_linking().as_bitcode())
    names = _elf_defined_symbols(lib._codegen._tm.emit_object(module))  # LLVM's object of that module
    defined = {g.name for g in (*module.functions, *module.global_variables)
               if not g.is_declaration and g.linkage.name in ("external", "linkonce_odr", "weak_odr")}
    assert defined and defined <= names
    assert _elf_defined_symbols(b"not an object") is None


def test_reading_a_gguf_of_our_types_does_not_import_the_gguf_package(tmp_path):
    """The gguf package costs ~3.5 MB of resident memory; F32/F16/BF16/Q4_0/Q4_1/Q8_0 files are
    read without it (weights/gguf_meta.py GGML_TYPES)."""
    from tiny_models import TINY_CFG, gguf_tokenizer_fields, random_llama_weights, tiny_bpe_tokenizer, write_gguf

    path = write_gguf(tmp_path / "m.gguf", TINY_CFG, random_llama_weights(TINY_CFG, seed=0), "Q4_1",
                      tokenizer_vocab=gguf_tokenizer_fields(tiny_bpe_tokenizer()))
    code = ("import sys\n"
            "from fastinfer.weights.checkpoint import open_checkpoint\n"
            f"ck = open_checkpoint({str(path)!r}, 'auto')\n"
            "assert 'layers.0.wq' in ck.tensors\n"
            "print('gguf' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]
