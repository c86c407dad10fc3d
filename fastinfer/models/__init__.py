"""One module per architecture: ModelArgs, Weights, build, State, forward and run.

Modules are imported when a model of that architecture is loaded, so `import fastinfer` does not
pay for the others (FNet's FFT library pulls in scipy.fft).
"""
import importlib
from types import ModuleType

import numpy as np

ARCHITECTURES = ("llama", "gpt2", "fnet")
# The KV cache's element type -> its array dtype: f16 stores IEEE half floats as their uint16 bits
# (Numba has no float16 on the CPU; the kernels widen them, kernels/simd.py kv_get / kv_put).
KV_TYPES = {"f32": np.float32, "f16": np.uint16}
# f16 is llama.cpp's default too: half the cache memory and traffic, and perplexity within ~0.2% of
# f32 (README, "KV cache"); "f32" is exact against the NumPy references.
DEFAULT_KV_TYPE = "f16"


def architecture(name: str) -> ModuleType:
    """The module of architecture `name` (one of ARCHITECTURES)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {name!r}; fastinfer runs {', '.join(ARCHITECTURES)}")
    return importlib.import_module(f"{__name__}.{name}")


def model_args(cls, config: dict, source: str):
    """cls(**config), with a ValueError naming the keys for a config that lacks or adds any
    (a converted checkpoint's config.json edited by hand, say)."""
    import dataclasses
    known = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if not isinstance(config, dict) or set(config) - known or required - set(config):
        keys = set(config) if isinstance(config, dict) else set()
        raise ValueError(f"{source}: the model config lacks {sorted(required - keys)} or has unknown keys "
                         f"{sorted(keys - known)}")
    return cls(**config)
