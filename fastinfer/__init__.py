"""fastinfer: a Numba-JIT CPU inference engine for pretrained transformer language models."""
__version__ = "0.1.0"
