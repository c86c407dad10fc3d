"""One module per architecture: ModelArgs, Weights, build, State, forward and run, declared to the
rest of fastinfer by one `Architecture` (each module's ARCH).

Modules are imported when a model of that architecture is loaded, so `import fastinfer` does not
pay for the others (FNet's FFT library pulls in scipy.fft).
"""
import importlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

ARCHITECTURES = ("llama", "gpt2", "fnet", "gemma3")
# The KV cache's element type -> its array dtype: f16 stores IEEE half floats as their uint16 bits
# (Numba has no float16 on the CPU; the kernels widen them, kernels/simd.py kv_get / kv_put).
KV_TYPES = {"f32": np.float32, "f16": np.uint16}
# f16 is llama.cpp's default too: half the cache memory and traffic, and perplexity within ~0.2% of
# f32 (docs/design.md, "The KV cache"); "f32" is exact against the NumPy references.
DEFAULT_KV_TYPE = "f16"


@dataclass(frozen=True)
class Architecture:
    """What the rest of fastinfer needs from an architecture module, in one place.

    Model (fastinfer/model.py) calls:
        build(ckpt, max_seq) -> (args, weights)      weights.args() is the tuple `run` takes
        State(args, max_seq, chunk, threads, act8=, float_path=, row_loops=, kv_type=)   decoders
        run(args, w, st, ids, positions, starts, slots, pattern, all_logits, **options)   decoders
        run(args, w, ids, threads, head)                                      encoders
    Capabilities, declared rather than probed:
        encoder        forward / embed only, no sessions or generation (FNet)
        act8           State(act8=True): matmul inputs quantized to 8 bits
        research       run(..., spectral=, pruned=): pruning, eviction and the spectral filter
        spectral_args  (args, keep, layers) -> run's spectral option
        matmul_kinds   weights -> the matmul weights' formats, from which act8 decides which
                       matmul paths to compile (float, decode row loops)
        derived        Weights fields rebuilt from the config at load (convert does not store them)
        trims_cache    State.trim(base, pos) / State.reset(base): memory no query reads again
    Files (for architectures whose names live in their own module; None: the reader's own tables):
        hf_types, hf_config(ConfigReader, config dict, source) -> config, hf_layer_names
        ("model.layers.{i}." suffix -> canonical), hf_global_names, hf_norms (canonical norms
        to which HF's (1 + w) convention adds 1)
        gguf_arch, gguf_config(value, metadata, source) -> config, gguf_layer_names ("blk.{i}."
        role -> canonical), gguf_global_names
    """
    name: str
    ModelArgs: type
    build: Callable
    run: Callable
    State: type | None = None
    encoder: bool = False
    act8: bool = False
    research: bool = False
    spectral_args: Callable | None = None
    matmul_kinds: Callable[[Any], list] | None = None
    derived: tuple = ()
    trims_cache: bool = False
    hf_types: tuple = ()
    hf_config: Callable | None = None
    hf_layer_names: dict | None = None
    hf_global_names: dict | None = None
    hf_norms: tuple = ()
    gguf_arch: str | None = None
    gguf_config: Callable | None = None
    gguf_layer_names: dict | None = None
    gguf_global_names: dict | None = None


def architecture(name: str, source: str = "") -> Architecture:
    """The Architecture `name` (one of ARCHITECTURES); source names the file in errors."""
    if not isinstance(name, str) or name not in ARCHITECTURES:
        raise ValueError(f"{source + ': ' if source else ''}unsupported architecture {name!r:.40}; "
                         f"fastinfer runs {', '.join(ARCHITECTURES)}")
    return importlib.import_module(f"{__name__}.{name}").ARCH


# Architectures whose file names and config live in their own module, by HF model_type and GGUF
# architecture (the Llama family, GPT-2 and FNet are read by weights/hf.py and weights/gguf.py).
BY_HF_TYPE = {"gemma3_text": "gemma3"}
BY_GGUF_ARCH = {"gemma3": "gemma3"}


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
