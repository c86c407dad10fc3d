"""The kernel cache's housekeeping (kernels/jit.py): old source versions' caches are removed."""
import os
import time

from fastinfer.kernels.jit import remove_stale_caches


def _make(root, name, age_days):
    d = root / name
    (d / "sub").mkdir(parents=True)
    f = d / "sub" / "x.nbc"
    f.write_bytes(b"0")
    t = time.time() - age_days * 86400
    for p in (f, d / "sub", d):
        os.utime(p, (t, t))
    return d


def test_only_other_versions_unused_for_two_weeks_go(tmp_path):
    keep = _make(tmp_path, "0123456789abcdef", 100)         # the current version, however old
    old = _make(tmp_path, "fedcba9876543210", 30)           # another version, unused for a month
    recent = _make(tmp_path, "00112233445566ff", 1)         # another version, used yesterday
    other = _make(tmp_path, "not-a-digest", 30)             # not ours: never touched
    removed = remove_stale_caches(tmp_path, keep)
    assert removed == [old]
    assert keep.is_dir() and recent.is_dir() and other.is_dir() and not old.exists()


def test_missing_root_is_fine(tmp_path):
    assert remove_stale_caches(tmp_path / "absent", tmp_path / "absent" / "x") == []


_LOGITS = """
import sys
import numpy as np
import fastinfer
out = []
for act in ("int8", "f32"):
    m = fastinfer.load(sys.argv[1], activations=act)
    s = m.session()
    steps = [s.prefill([5, 17, 42, 3])] + [s.decode_step(t).copy() for t in (250, 99, 7)]
    out += [m.forward([5, 17, 42, 3, 250, 99, 7]), np.array(steps)]
np.save(sys.argv[2], np.concatenate(out))
"""


def test_first_process_runs_what_the_cache_holds(tmp_path):
    """The process that compiles the model graph computes exactly what later processes, which load
    it from the disk cache, compute: bit for bit, with 8-bit activations (which turn the smallest
    rounding difference into visible ones) and f32 ones. A parallel kernel's loop body compiled on
    its own (what a compiling process runs) and its copy in the cached object can sum in different
    orders under fastmath: the f32 decode matvec did on every tier, and on AVX2 a tiny Q4_1 model's
    8-bit logits moved by up to 0.09. So the first run compiles in a child process and then loads
    the cache (kernels/jit.py compile_in_child)."""
    import subprocess
    import sys

    import numpy as np
    from tiny_models import TINY_CFG, gguf_tokenizer_fields, random_llama_weights, tiny_bpe_tokenizer, write_gguf

    path = write_gguf(tmp_path / "m.gguf", TINY_CFG, random_llama_weights(TINY_CFG, seed=0), "Q4_1",
                      tokenizer_vocab=gguf_tokenizer_fields(tiny_bpe_tokenizer()))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    runs = []
    for i in range(2):  # the first compiles (an empty cache), the second loads
        out = tmp_path / f"logits{i}.npy"
        done = subprocess.run([sys.executable, "-c", _LOGITS, str(path), str(out)], env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert ("compiling kernels" in done.stderr) == (i == 0), done.stderr
        runs.append(np.load(out))
    np.testing.assert_array_equal(runs[0], runs[1])
