"""One module per architecture: ModelArgs, Weights, build, State, forward and run.

Modules are imported when a model of that architecture is loaded, so `import fastinfer` does not
pay for the others (FNet's FFT library pulls in scipy.fft).
"""
import importlib
from types import ModuleType

ARCHITECTURES = ("llama", "gpt2", "fnet")


def architecture(name: str) -> ModuleType:
    """The module of architecture `name` (one of ARCHITECTURES)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {name!r}; fastinfer runs {', '.join(ARCHITECTURES)}")
    return importlib.import_module(f"{__name__}.{name}")
