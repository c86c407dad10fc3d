"""Where fastinfer keeps its files: the model cache and the compiled-kernel cache."""
import os
from pathlib import Path


def home() -> Path:
    """The cache directory: `$FASTINFER_HOME`, default `~/.cache/fastinfer`."""
    return Path(os.environ.get("FASTINFER_HOME") or Path.home() / ".cache" / "fastinfer").expanduser()
