"""The JIT policy, in one place: fastmath flags, the on-disk cache and threading.

Every kernel module decorates with `kernel` from here, so flags and caching never drift apart.
"""
import hashlib
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numba

from fastinfer.paths import home

# fastmath without nnan/ninf: attention masks with -inf and must stay exact.
FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})


def _source_digest() -> str:
    """Hash of every module that holds jitted code.

    Numba's cache is keyed on the decorated function's own file, so a cached model graph would not
    notice an edited kernel it calls. Keying the whole cache directory on all jitted sources does.
    """
    pkg = Path(__file__).resolve().parent
    roots = [pkg, pkg.parent / "fastinfer" / "models", pkg.parent / "models"]
    # The install location is part of the key: numba's index is per source path, so a second
    # install of the same sources compiles again and should announce it.
    # rocket-fft's calls are compiled into the FFT kernels: a new version must recompile them.
    try:
        from importlib.metadata import version
        rocket = version("rocket-fft")
    except Exception:  # not installed: importing kernels/fft.py will say so
        rocket = "-"
    h = hashlib.sha256(f"{numba.__version__} {rocket} {pkg}".encode())
    for root in roots:
        if root.is_dir():
            for f in sorted(root.glob("*.py")):
                h.update(f.name.encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


if not os.environ.get("NUMBA_CACHE_DIR"):
    CACHE_DIR = home() / "numba" / _source_digest()
    numba.config.CACHE_DIR = str(CACHE_DIR)
else:
    CACHE_DIR = Path(os.environ["NUMBA_CACHE_DIR"])


def _load_cached_without_refresh() -> None:
    """Load cached kernels without first importing Numba's whole lowering library.

    Before every disk-cache lookup Numba refreshes its target context: it imports ~380 modules
    (its implementations of Python and NumPy for compiling) and installs their registries. Loading
    compiled code needs none of that, only the runtime (NRT) that the code calls; the refresh
    costs ~18 MB of peak RSS in a process that only runs cached kernels. A cache miss still
    compiles through Numba's compiler, which refreshes the context itself first.
    Where Numba's internals differ from what this expects, nothing is changed.
    """
    from numba.core import caching
    from numba.core.runtime import rtsys
    cache = caching.Cache
    if not all(hasattr(cache, a) for a in ("load_overload", "_load_overload", "_guard_against_spurious_io_errors")):
        return

    def load_overload(self, sig, target_context):
        rtsys.initialize(target_context)
        with self._guard_against_spurious_io_errors():
            return self._load_overload(sig, target_context)
        return None  # the guard swallowed an I/O error: compile instead

    cache.load_overload = load_overload


_load_cached_without_refresh()


def _elf_defined_symbols(obj: bytes) -> set[str] | None:
    """Names of the global and weak symbols an ELF64 little-endian object defines; None if obj is
    not one."""
    import struct
    if len(obj) < 64 or obj[:4] != b"\x7fELF" or obj[4] != 2 or obj[5] != 1:
        return None
    shoff, = struct.unpack_from("<Q", obj, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", obj, 0x3A)
    sections = [struct.unpack_from("<4xI16xQQI", obj, shoff + i * shentsize) for i in range(shnum)]
    names = set()
    for kind, offset, size, link in sections:
        if kind != 2:  # SHT_SYMTAB
            continue
        strings = sections[link][1]
        for e in range(offset, offset + size, 24):
            name, info, shndx = struct.unpack_from("<IB1xH", obj, e)
            if shndx != 0 and info >> 4 in (1, 2):  # defined; STB_GLOBAL or STB_WEAK
                start = strings + name
                names.add(obj[start:obj.index(b"\0", start)].decode())
    return names


def _load_objects_without_their_bitcode() -> None:
    """Load cached machine code without parsing the LLVM bitcode stored beside it.

    A cached kernel holds its object code and, for linking into kernels compiled later, its LLVM
    bitcode. On every load Numba parses that bitcode into a module only to read off the names it
    defines, and keeps it: ~13 MB for the model graph, for the life of the process. The same
    names are in the object's ELF symbol table; this reads them there and parses the bitcode
    only if a later compile links against the kernel. Where Numba's internals differ from what
    this expects, or the object is not ELF, Numba's own path runs.
    """
    from llvmlite import binding as ll
    from numba.core import codegen
    lib = codegen.CPUCodeLibrary
    needed = ("_unserialize", "_get_module_for_linking", "enable_object_caching", "_set_compiled_object",
              "_finalize_final_module")
    if not all(hasattr(lib, a) for a in needed) or not isinstance(lib.__dict__.get("_unserialize"), classmethod):
        return
    numba_unserialize = lib._unserialize.__func__
    numba_module_for_linking = lib._get_module_for_linking

    def _unserialize(cls, cg, state):
        name, kind, data = state
        names = _elf_defined_symbols(data[0]) if kind == "object" else None
        engine = getattr(cg, "_engine", None)
        if not names or not hasattr(engine, "_defined_symbols"):
            return numba_unserialize(cls, cg, state)
        self = cg.create_library(name)
        self.enable_object_caching()
        self._set_compiled_object(data[0])
        self._fastinfer_bitcode = data[1]
        self._finalize_final_module()
        engine._defined_symbols |= names
        return self

    def _get_module_for_linking(self):
        bitcode = self.__dict__.pop("_fastinfer_bitcode", None)
        if bitcode is not None and self._shared_module is None:
            self._shared_module = ll.parse_bitcode(bitcode)
        return numba_module_for_linking(self)

    lib._unserialize = classmethod(_unserialize)
    lib._get_module_for_linking = _get_module_for_linking


_load_objects_without_their_bitcode()


def kernel(fn=None, *, parallel=False, inline=False):
    """Decorate a hot loop: njit, cached on disk, explicit fastmath, numpy error model.

    inline=True inlines the function into its callers' Numba IR (no call, no array views), for
    a loop body shared by a serial loop and its prange twin."""
    deco = numba.njit(cache=True, fastmath=set(FASTMATH), parallel=parallel,
                      error_model="numpy", nogil=True, inline="always" if inline else "never")

    def make(f):
        dispatcher = deco(f)
        # Before its first call a dispatcher imports every installed Numba extension. Ours import
        # the one they use themselves (kernels/fft.py, rocket-fft), and rocket-fft's hook would
        # bring SciPy into every process that runs a cached kernel: ~34 MB of RSS. A compile
        # (cache miss) still loads the extensions, through Numba's target context.
        dispatcher._compilation_chain_init_hook = _no_extension_scan
        return dispatcher
    return make if fn is None else make(fn)


def _no_extension_scan() -> None:
    pass


def set_threads(n: int | None) -> int:
    """Set the kernel thread count (None: all cores numba sees). Returns the count in use."""
    limit = numba.config.NUMBA_NUM_THREADS
    if n is None:
        n = limit
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    numba.set_num_threads(min(n, limit))
    return numba.get_num_threads()


STALE_DAYS = 14  # a cache of other sources unused this long is removed after a fresh compile


def remove_stale_caches(root: Path, keep: Path, days: float = STALE_DAYS) -> list[Path]:
    """Delete the cache directories of other source versions under root (named by their 16-hex
    digest) that nothing has written for `days`: every upgrade or edit compiles into a new one, and
    the old ones would pile up (~20 MB each). Returns what was removed."""
    import re
    import shutil
    cutoff = time.time() - days * 86400
    removed = []
    for d in root.iterdir() if root.is_dir() else ():
        if d == keep or not d.is_dir() or not re.fullmatch(r"[0-9a-f]{16}", d.name):
            continue
        newest = max((f.stat().st_mtime for f in d.rglob("*")), default=d.stat().st_mtime)
        if newest < cutoff:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


@contextmanager
def compile_notice(tag: str):
    """Print one line while kernels compile for the first time on this machine; yields whether
    this is that first time.

    A marker file in the cache directory records that `tag` has been compiled once; later
    processes load the cached machine code and print nothing.
    """
    marker = CACHE_DIR / f"compiled-{tag}"
    first = not marker.exists() and not os.environ.get(CHILD_ENV)
    t0 = time.perf_counter()
    if first:
        from .isa import TIER
        print(f"fastinfer: compiling kernels for {TIER.name} (first run on this machine: one to three "
              f"minutes)...", file=sys.stderr, flush=True)
    yield first
    if first:
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{time.perf_counter() - t0:.1f}s\n")
            print(f"fastinfer: kernels compiled in {time.perf_counter() - t0:.1f} s (cached for next time)",
                  file=sys.stderr, flush=True)
            if not os.environ.get("NUMBA_CACHE_DIR"):  # our own cache layout: tidy the old versions
                remove_stale_caches(CACHE_DIR.parent, CACHE_DIR)
        except OSError:
            pass


CHILD_ENV = "FASTINFER_COMPILING"  # set in the child that compiles for its parent


def compile_in_child(code: str) -> bool:
    """Run `code` (Python that compiles kernels into the disk cache) in a child interpreter, so that
    this process then loads what the cache holds, as every later process does.

    A parallel kernel compiled in the process that runs it runs its loop body as compiled on its
    own, while the cached object carries a copy optimized in the caller's context; with fastmath
    (reassociation) the two can sum in different orders, a last bit apart (seen: the f32 decode
    matvec on every tier, and a kernel of the 8-bit path on AVX2, where a flipped rounding tie
    moved a tiny model's logits by up to 0.09). So the first run would compute other numbers than
    every later one. False if the child failed (the caller then compiles in-process).
    """
    import subprocess
    if os.environ.get(CHILD_ENV):
        return False
    env = dict(os.environ, **{CHILD_ENV: "1", "NUMBA_CACHE_DIR": str(CACHE_DIR)})
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    except OSError:
        return False
    return done.returncode == 0
