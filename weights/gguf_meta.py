"""GGUF metadata as plain Python values."""
from pathlib import Path
from typing import Any

import gguf


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All key/value fields of an open GGUF file: str, int, float, bool or lists of them."""
    return {name: field.contents() for name, field in reader.fields.items()}


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """Open a GGUF file read-only (memory-mapped), with a clear error for bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the gguf package raises ValueError, struct.error, IndexError, ...
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
