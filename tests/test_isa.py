"""The ISA policy (kernels/isa.py): tiers from CPU features, FASTINFER_ISA forcing a lower tier
(in Numba's target too) or refusing one the CPU cannot run, `fastinfer info`, and a tiny model's
8-bit logits at the AVX2 tier against the fake-quantized NumPy reference, from a cold kernel cache
and from the cache."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastinfer.kernels import isa

AVX2_FEATURES = {"avx": True, "avx2": True, "fma": True, "f16c": True, "sse4.2": True}
AVX512_FEATURES = {**AVX2_FEATURES, "avx512f": True, "avx512bw": True, "avx512vl": True, "avx512dq": True}


@pytest.mark.parametrize("features,tier", [
    ({}, "generic"),
    ({"avx": True, "sse4.2": True}, "generic"),                     # Sandy Bridge: no AVX2
    ({**AVX2_FEATURES, "fma": False}, "generic"),                   # AVX2 without FMA is no tier
    (AVX2_FEATURES, "avx2"),                                        # Haswell, Zen 1-3
    ({**AVX2_FEATURES, "avxvnni": True}, "avx-vnni"),               # Alder Lake and later
    (AVX512_FEATURES, "avx512"),                                    # Skylake-X
    ({**AVX512_FEATURES, "avx512vnni": True}, "avx512-vnni"),       # Ice Lake, Zen 4
    ({**AVX512_FEATURES, "avx512vnni": True, "avxvnni": True}, "avx512-vnni"),
    ({**AVX512_FEATURES, "avx512bw": False, "avxvnni": True}, "avx-vnni"),  # AVX-512 F without BW
])
def test_best_tier_from_features(features, tier):
    if not isa._x86():
        pytest.skip("tiers above generic are x86 only")
    assert isa.best_tier(features).name == tier


def test_tiers_are_ordered_and_named():
    assert isa.TIER_NAMES == ("avx512-vnni", "avx512", "avx-vnni", "avx2", "generic")
    with pytest.raises(ValueError, match="not a tier; choose one of avx512-vnni, avx512, avx-vnni, avx2, generic"):
        isa.by_name("sse9")


def _run(code: str, *args, **env):
    """python -c code args in a child with FASTINFER_ISA and Numba's CPU settings only as env gives."""
    e = {k: v for k, v in os.environ.items() if k not in ("FASTINFER_ISA", "NUMBA_CPU_FEATURES", "NUMBA_CPU_NAME")}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env={**e, **env}, capture_output=True,
                          text=True, timeout=900)


def _cli(*args, **env):
    return _run(f"import sys; from fastinfer.cli import main; sys.exit(main({list(args)!r}))", **env)


def test_info_names_cpu_tier_threads_and_cache():
    r = _cli("info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["isa"] == info["isa_best"] == isa.BEST.name
    assert info["cpu"] == isa.cpu_model() and info["threads"] >= 1
    assert info["kernel_cache"] and info["kernel_cache_bytes"] >= 0
    text = _cli("info")
    assert text.returncode == 0 and f"ISA tier      {isa.BEST.name}" in text.stdout and "kernel cache" in text.stdout


def test_forced_tier_holds_numba_to_it():
    lower = [t for t in isa.TIERS[isa.TIERS.index(isa.BEST) + 1:] if not isa.missing(t)]
    if not lower:
        pytest.skip("the generic tier has none below it")
    for tier in lower:
        r = _run("import json, numba; from fastinfer.kernels import isa; "
                 "print(json.dumps([isa.TIER.name, isa.BEST.name, numba.config.CPU_FEATURES]))",
                 FASTINFER_ISA=tier.name)
        assert r.returncode == 0, r.stderr
        name, best, features = json.loads(r.stdout)
        assert (name, best) == (tier.name, isa.BEST.name)
        # Numba's target has none of the tiers above: the best one the string allows is this one
        assert isa.best_tier(isa._parse(features)) == tier


@pytest.mark.parametrize("asked,msg", [
    ("sse9", "FASTINFER_ISA='sse9' is not a tier; choose one of avx512-vnni, avx512, avx-vnni, avx2, generic"),
    ("avx512-vnni", "FASTINFER_ISA=avx512-vnni: this CPU cannot run it (it lacks avx512f, avx512bw, avx512vl, "
                    "avx512vnni); it runs avx2, generic"),
    # AMD Zen 4: AVX-512 VNNI but not its VEX form, so the tier below the best is not runnable either
    ("avx-vnni", "FASTINFER_ISA=avx-vnni: this CPU cannot run it (it lacks avxvnni); it runs avx512-vnni, "
                 "avx512, avx2, generic"),
])
def test_a_tier_the_cpu_cannot_run_is_refused(asked, msg):
    # a target restricted with NUMBA_CPU_FEATURES, as a user would (AVX2 only; or Zen 4's set):
    # refused with one line naming what is missing, exit 1, before anything compiles
    if not isa._x86():
        pytest.skip("x86 only")
    features = "+avx,+avx2,+fma,+f16c,+sse4.2"
    if asked == "avx-vnni":
        features += ",+avx512f,+avx512bw,+avx512vl,+avx512vnni,-avxvnni"
    r = _cli("info", FASTINFER_ISA=asked, NUMBA_CPU_FEATURES=features)
    assert r.returncode == 1
    assert r.stderr.strip() == f"fastinfer: error: {msg}", r.stderr
    r = _run("import fastinfer; fastinfer.load('nowhere.gguf')", FASTINFER_ISA=asked, NUMBA_CPU_FEATURES=features)
    assert r.returncode == 1 and f"ValueError: {msg}" in r.stderr


_LOGITS = """
import sys
import numpy as np
import fastinfer
from fastinfer.kernels import isa
assert isa.TIER.name == sys.argv[3], (isa.TIER.name, sys.argv[3])
out = []
for path in sys.argv[1].split(","):
    m = fastinfer.load(path, activations="int8", kv_type="f32")
    s = m.session()
    out += [m.forward(%r), np.array([s.decode_step(t).copy() for t in %r])]
np.save(sys.argv[2], np.array(out))
"""


# The whole model under a forced tier costs a compile of the whole graph (minutes on a slow CPU), so
# it runs once, for AVX2 (the widest CPU fleet, and this CPU's own tier on an AVX2-only machine),
# and doubles as the test of the kernel cache's first process. The other tiers' kernels run in the
# kernel tests (test_qmatvec, test_qtile and test_qgemm, against their NumPy twins); AVX-512
# without VNNI and AVX-VNNI differ from their neighbours in the dot instruction alone.
def test_avx2_model_from_a_cold_cache_equals_the_reference_and_later_runs(tmp_path, monkeypatch):
    """A tiny Q8_0 and Q4_1 model forced to the AVX2 tier, in an empty kernel cache of its own:
    the first process compiles (in a child process: kernels/jit.py compile_in_child) and the second
    loads what the cache holds. Both must compute the same logits bit for bit: a parallel kernel's
    loop body compiled on its own and its copy in the cached object can sum in different orders
    under fastmath, and at this tier the 8-bit logits of a process that compiled in-process moved
    by up to 0.09. And both must match the float64 NumPy reference with every matmul input
    fake-quantized, as tests/test_act8.py checks the CPU's own tier."""
    tier = isa.by_name("avx2")
    lacks = isa.missing(tier)
    if lacks:
        pytest.skip(f"avx2: the CPU lacks {', '.join(lacks)}")
    import reference as R
    import test_act8 as A
    from tiny_models import TINY_CFG, as_quantized, gguf_tokenizer_fields, random_llama_weights, tiny_bpe_tokenizer
    from tiny_models import write_gguf
    ids = A.IDS
    w = random_llama_weights(TINY_CFG, seed=0)
    tok = gguf_tokenizer_fields(tiny_bpe_tokenizer())
    paths = [write_gguf(tmp_path / f"m-{t}.gguf", TINY_CFG, w, t, tokenizer_vocab=tok) for t in ("Q8_0", "Q4_1")]
    runs = []
    for i in range(2):  # the first compiles into the empty cache, the second loads it
        out = tmp_path / f"logits{i}.npy"
        r = _run(_LOGITS % (ids, ids), ",".join(map(str, paths)), out, tier.name,
                 FASTINFER_ISA=tier.name, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
        assert r.returncode == 0, r.stderr
        assert ("compiling kernels" in r.stderr) == (i == 0), r.stderr
        runs.append(np.load(out))
    np.testing.assert_array_equal(runs[0], runs[1])
    for i, ggml_type in enumerate(("Q8_0", "Q4_1")):
        wq = as_quantized(w, ggml_type)
        two = {id(v) for k, v in wq.items() if k.endswith(("k_proj.weight", "v_proj.weight"))}
        monkeypatch.setattr(R, "_linear", lambda x, m, b=None: A.fake_quantized_linear(x, m, b, 2 if id(m) in two else 1))
        want = R.llama_forward(wq, TINY_CFG, ids)
        for logits in runs[0][2 * i:2 * i + 2]:
            worst = np.abs(logits - want).max(axis=1)
            if (worst > 2e-4).sum() > 1:  # a rounding tie early on moves every later position
                A._same_up_to_rounding_ties(logits, want)
            assert worst.max() < 0.15, worst
