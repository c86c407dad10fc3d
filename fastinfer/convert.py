"""`fastinfer convert`: any supported checkpoint -> a converted, memory-mappable directory."""
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .models import architecture
from .weights.checkpoint import check_dtype, open_checkpoint
from .weights.converted import check_replaceable, write_converted
from .weights.tensors import QMatrix, to_f32


@dataclass
class ConvertReport:
    out: Path
    dtype: str
    bytes: int
    worst_tensor: str
    worst_rel_rms: float  # ||W' - W|| / ||W|| of the worst tensor against the source's values
    worst_max_abs: float


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def convert(src: str | Path, out: str | Path, dtype: str = "auto", force: bool = False,
            progress: bool = True) -> ConvertReport:
    """Convert src (GGUF, HF directory or converted checkpoint) into out with weights in dtype."""
    check_dtype(dtype)
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to overwrite it")
    if Path(src).expanduser().resolve() == out.resolve():
        raise ValueError("the output directory must differ from the source")
    check_replaceable(out, src)  # before the work: --force replaces only a previous output
    ckpt = open_checkpoint(src, dtype)
    arch = architecture(ckpt.config["arch"], ckpt.source)
    args, w = arch.build(ckpt, max_seq=1)
    tensors = {f.name: getattr(w, f.name) for f in fields(w) if f.name not in arch.derived}
    # roles a model does not have are empty arrays (a Llama's QK-norm): nothing to store
    tensors = {k: v for k, v in tensors.items() if not (isinstance(v, np.ndarray) and v.size == 0)}

    # The error is measured against the source's own values, tensor by tensor.
    worst = ("-", 0.0, 0.0)
    if dtype != "auto":
        _, ref = arch.build(open_checkpoint(src, "auto"), max_seq=1)
        for name, t in tqdm(tensors.items(), desc="measuring error", unit="tensor", disable=not progress):
            if not isinstance(t, QMatrix):
                continue
            a, b = to_f32(t).f, to_f32(getattr(ref, name)).f
            rel = float(np.sqrt(np.sum((a - b).astype(np.float64) ** 2) / max(np.sum(b.astype(np.float64) ** 2), 1e-30)))
            if rel > worst[1]:
                worst = (name, rel, float(np.abs(a - b).max()))
    write_converted(out, dtype, asdict(args), tensors, ckpt, force=force, progress=progress)
    return ConvertReport(out, dtype, _dir_bytes(out), *worst)
