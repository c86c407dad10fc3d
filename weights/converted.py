"""fastinfer's own checkpoint directory: weights already in the kernels' layout, memory-mapped.

    OUT/config.json             {"format": "fastinfer", "format_version": 1, "dtype": ..., "config": {...},
                                 "bos_id": ..., "eos_ids": [...], "tied": bool}
    OUT/model.safetensors       per weight NAME, stacked over layers: NAME.q (U8), NAME.s, NAME.m,
                                NAME.f (F32), whichever the format uses; the format and matrix shape
                                in the safetensors metadata as NAME.kind / NAME.shape
    OUT/tokenizer.json
    OUT/chat_template.jinja     when the model has one
    OUT/generation_config.json  generation defaults

Writing goes to a scratch directory beside OUT that is renamed into place at the end, so an
interrupted conversion leaves no OUT behind (weights/scratch.py).
"""
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from safetensors.numpy import save_file
from tqdm import tqdm

from fastinfer.kernels import linear as K

from .checkpoint import Checkpoint
from .safetensors_mmap import read_safetensors, unique_keys
from .scratch import remove_stale, scratch_dir
from .tensors import _NO_F32, _NO_U8, QMatrix

FORMAT, FORMAT_VERSION = "fastinfer", 2  # 2: Q/K/V and gate/up stored joined
_KIND_BY_NAME = {v: k for k, v in K.KIND_NAMES.items() if k not in K.UNTILED}  # tiles exist in memory only


def is_converted(d: Path) -> bool:
    cfg = d / "config.json"
    if not cfg.is_file():
        return False
    try:
        info = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(info, dict) and info.get("format") == FORMAT


OUTPUT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json")


def check_replaceable(out: Path, src: str | Path | None = None) -> None:
    """What --force may replace: nothing, or a previous fastinfer output holding only its own files
    and not the source. Anything else (a model folder, a directory of the user's files, the
    source itself or a folder around it) is a ValueError, so no file of the user's is deleted."""
    out = Path(out).expanduser()
    if src is not None:
        s, o = Path(src).expanduser().resolve(), out.resolve()
        if s == o or o in s.parents:
            raise ValueError(f"{out} holds the source {src}; convert into another directory")
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir() or not is_converted(out):
        raise ValueError(f"--force replaces only a previous fastinfer output; {out} is not one "
                         f"(remove it yourself, or choose another directory)")
    extra = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES)
    if extra:
        raise ValueError(f"--force replaces only a previous fastinfer output; {out} also holds "
                         f"{', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''} (move them first)")


def write_converted(out: Path, dtype: str, config: dict[str, Any], tensors: dict[str, QMatrix | np.ndarray],
                    ckpt: Checkpoint, force: bool = False, progress: bool = True) -> Path:
    """Write a converted checkpoint atomically. tensors are the model's stacked weights by name."""
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to overwrite it")
    check_replaceable(out, ckpt.source)
    for prefix in (f".{out.name}.tmp-", f".{out.name}.old-"):  # left by a run that was killed
        remove_stale(out.parent, prefix)
    tmp = scratch_dir(out.parent, f".{out.name}.tmp-")
    try:
        arrays, meta, seen = {}, {}, {}
        for name, t in tqdm(tensors.items(), desc="packing", unit="tensor", disable=not progress):
            if isinstance(t, QMatrix):
                if id(t) in seen:  # a tied head is the embedding table: store it once
                    meta[f"{name}.alias"] = seen[id(t)]
                    continue
                seen[id(t)] = name
                meta[f"{name}.kind"] = t.kind_name
                meta[f"{name}.shape"] = f"{t.rows},{t.cols}"
                for part in "qsmf":
                    a = getattr(t, part)
                    if a.shape[0]:
                        arrays[f"{name}.{part}"] = np.ascontiguousarray(a)
            else:
                arrays[name] = np.ascontiguousarray(t, dtype=np.float32)
        save_file(arrays, str(tmp / "model.safetensors"), metadata=meta)
        (tmp / "config.json").write_text(json.dumps({
            "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype, "config": config,
            "bos_id": ckpt.bos_id, "eos_ids": ckpt.eos_ids, "source": ckpt.source}, indent=2, default=_jsonable))
        ckpt.tokenizer.save(str(tmp / "tokenizer.json"))
        if ckpt.chat_template:
            (tmp / "chat_template.jinja").write_text(ckpt.chat_template, encoding="utf-8")
        (tmp / "generation_config.json").write_text(json.dumps(ckpt.generation, indent=2))
        if out.exists():  # --force: move the old one aside only once the new one is complete
            old = scratch_dir(out.parent, f".{out.name}.old-")
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"cannot store {type(v).__name__} in config.json")


def read_converted(d: Path) -> Checkpoint:
    """A converted directory -> Checkpoint of stacked, memory-mapped weights (no copy)."""
    try:
        info = json.loads((d / "config.json").read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{d}/config.json is not valid JSON ({str(e) or type(e).__name__})") from None
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{d}: converted with format version {info.get('format_version')!r:.20}; this fastinfer "
                         f"reads version {FORMAT_VERSION} (convert the source again)")
    if not isinstance(info.get("config"), dict):
        raise ValueError(f"{d}/config.json has no model config")
    st = d / "model.safetensors"
    if not st.is_file():
        raise FileNotFoundError(f"{d}: missing model.safetensors")
    arrays, meta = read_safetensors(st, with_metadata=True)
    tensors: dict[str, QMatrix | np.ndarray] = {}
    names = {k.rsplit(".", 1)[0] for k in meta if k.endswith(".kind")}
    for name in names:
        kind = meta[f"{name}.kind"]
        if kind not in _KIND_BY_NAME:
            raise ValueError(f"{st}: tensor {name} has unknown format {kind!r:.20}")
        shape = meta.get(f"{name}.shape", "")
        if not re.fullmatch(r"\d{1,9},\d{1,9}", shape):
            raise ValueError(f"{st}: tensor {name} has shape {shape!r:.30}; expected 'rows,cols'")
        rows, cols = (int(x) for x in shape.split(","))
        parts = {}
        for part, empty in (("q", _NO_U8), ("s", _NO_F32), ("m", _NO_F32), ("f", _NO_F32)):
            got = arrays.get(f"{name}.{part}")
            parts[part] = empty if got is None else _aligned(got[1])
        tensors[name] = QMatrix(_KIND_BY_NAME[kind], parts["q"], parts["s"], parts["m"], parts["f"], rows, cols)
    for k, target in meta.items():
        if k.endswith(".alias"):
            if target not in names:
                raise ValueError(f"{st}: {k} names {target!r:.40}, which is not a weight matrix in the file")
            tensors[k[:-len(".alias")]] = tensors[target]
    for k, (dt, a) in arrays.items():
        base, _, part = k.rpartition(".")
        if base in names:
            continue
        if part in ("q", "s", "m", "f"):  # a matrix's part whose format and shape are missing
            raise ValueError(f"{st}: {k} belongs to no weight matrix (its {base}.kind is missing)")
        tensors[k] = _aligned(a)
    try:
        tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception on unreadable files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{d}/tokenizer.json is missing or invalid ({first})") from None
    template = d / "chat_template.jinja"
    gen = d / "generation_config.json"
    try:
        generation = json.loads(gen.read_text(encoding="utf-8")) if gen.is_file() else {}
        chat_template = template.read_text(encoding="utf-8") if template.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{d}: {gen.name} or {template.name} is not valid ({str(e) or type(e).__name__})") from None
    if not isinstance(generation, dict):
        raise ValueError(f"{gen} is not a JSON object")
    bos, eos = info.get("bos_id"), info.get("eos_ids") or []
    if not isinstance(eos, list):
        raise ValueError(f"{d}/config.json: eos_ids must be a list of token ids")
    vocab = info["config"].get("vocab_size")
    ids = ([] if bos is None else [bos]) + eos
    if any(isinstance(v, bool) or not isinstance(v, int) or not isinstance(vocab, int) or not 0 <= v < vocab
           for v in ids):
        raise ValueError(f"{d}/config.json: bos_id / eos_ids must be token ids below the vocabulary size")
    return Checkpoint(config=info["config"], tensors=tensors, tokenizer=tok, bos_id=bos, eos_ids=list(eos),
                      chat_template=chat_template, generation=generation, source=str(d), converted=True)


def _aligned(a: np.ndarray) -> np.ndarray:
    # Kernels want naturally aligned arrays; safetensors places F32 data first so this holds,
    # but a file written by another tool might not.
    return a if a.ctypes.data % a.dtype.itemsize == 0 else np.array(a)
