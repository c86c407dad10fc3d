"""One module per architecture: ModelArgs, Weights, build, State, forward and run."""
from . import fnet, gpt2, llama

ARCHITECTURES = {"llama": llama, "gpt2": gpt2, "fnet": fnet}
