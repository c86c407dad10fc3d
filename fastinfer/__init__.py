"""fastinfer: a Numba-JIT CPU inference engine for pretrained transformer language models.

    import fastinfer
    model = fastinfer.load()                       # the default model, SmolLM2-135M-Instruct
    print(model.generate("The capital of France is", max_new_tokens=16, temperature=0))
"""
from .model import Model, Session, load
from .prune import Prune
from .sampling import SamplingParams
from .sparse import BlockSparse

__version__ = "0.1.0"
__all__ = ["load", "Model", "Session", "SamplingParams", "BlockSparse", "Prune", "__version__"]
