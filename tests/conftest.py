"""Shared fixtures. The data tests need lives in tests/data."""
import os
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parent.parent

# `python -m pytest` puts the checkout's root on sys.path, where kernels/ and weights/ (installed as
# fastinfer.kernels and fastinfer.weights) would shadow other top-level packages of those names:
# transformers imports Hugging Face's `kernels`. Tests import fastinfer's only through fastinfer.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, fetched into the cache on first use.

    In CI (CI=true) a missing model is a failure; elsewhere the tests that need it are skipped.
    """
    from fastinfer.weights.fetch import default_model

    try:
        return default_model(download=True)
    except (OSError, RuntimeError) as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"default model not available: {e}")


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF (`fastinfer pull gemma-3-270m`), pulled on first use.

    In CI (CI=true) a missing model is a failure; elsewhere the tests that need it are skipped."""
    from fastinfer.weights.fetch import fetch

    try:
        return fetch("gemma-3-270m")
    except (OSError, RuntimeError) as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"gemma-3-270m not available: {e}")
