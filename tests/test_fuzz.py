"""Mutated GGUF files, HF folders and converted checkpoints: each load is refused with one clear
error or gives the reference's logits (tests/fuzz_models.py has the mutations and the oracle).

FASTINFER_FUZZ_CASES sets the cases per format (default 10,000: about 45 s a format on a 2-core
AVX-512 Xeon); failing cases are saved under FASTINFER_FUZZ_FINDINGS (default /tmp/fuzz-findings).
The seed is fixed, so a run is repeatable against the same code.
"""
import os
from pathlib import Path

import pytest

from fuzz_models import Fuzzer

CASES = int(os.environ.get("FASTINFER_FUZZ_CASES", "10000"))
FINDINGS = Path(os.environ.get("FASTINFER_FUZZ_FINDINGS", "/tmp/fuzz-findings"))


@pytest.fixture(scope="module")
def fuzzer():
    fz = Fuzzer(FINDINGS)
    yield fz
    fz.close()


@pytest.mark.parametrize("fmt", ["gguf", "hf", "converted"])
def test_mutated_files_load_or_fail_clearly(fuzzer, fmt):
    stats = fuzzer.run(fmt, CASES, seed=0)
    failures = fuzzer.failures(fmt)
    if failures:
        pytest.fail(f"{len(failures)} kinds of failure in {stats['cases']} {fmt} cases ({stats['counts']}):\n"
                    f"{fuzzer.report(fmt)}", pytrace=False)
