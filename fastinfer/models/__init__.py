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
# f32 (docs/design.md, "The KV cache"); "f32" is exact against the NumPy references.
DEFAULT_KV_TYPE = "f16"


def architecture(name: str, source: str = "") -> ModuleType:
    """The module of architecture `name` (one of ARCHITECTURES); source names the file in errors."""
    if not isinstance(name, str) or name not in ARCHITECTURES:
        raise ValueError(f"{source + ': ' if source else ''}unsupported architecture {name!r:.40}; "
                         f"fastinfer runs {', '.join(ARCHITECTURES)}")
    return importlib.import_module(f"{__name__}.{name}")


def model_args(cls, config: dict, source: str, complete: bool = False):
    """cls(**config), with a ValueError naming the file for a config that lacks or adds keys (a
    converted checkpoint's config.json edited by hand, say) or that cls refuses. complete: every
    field must be given (a converted checkpoint stores them all)."""
    import dataclasses
    known = {f.name for f in dataclasses.fields(cls)}
    required = known if complete else {f.name for f in dataclasses.fields(cls)
                                       if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if not isinstance(config, dict) or set(config) - known or required - set(config):
        keys = set(config) if isinstance(config, dict) else set()
        raise ValueError(f"{source}: the model config lacks {sorted(required - keys)} or has unknown keys "
                         f"{sorted(keys - known)}")
    try:
        return cls(**config)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
