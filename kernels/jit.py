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


def kernel(fn=None, *, parallel=False, inline=False):
    """Decorate a hot loop: njit, cached on disk, explicit fastmath, numpy error model.

    inline=True inlines the function into its callers' Numba IR (no call, no array views), for
    a loop body shared by a serial loop and its prange twin."""
    deco = numba.njit(cache=True, fastmath=set(FASTMATH), parallel=parallel,
                      error_model="numpy", nogil=True, inline="always" if inline else "never")
    return deco if fn is None else deco(fn)


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
    """Print one line while kernels compile for the first time on this machine.

    A marker file in the cache directory records that `tag` has been compiled once; later
    processes load the cached machine code and print nothing.
    """
    marker = CACHE_DIR / f"compiled-{tag}"
    first = not marker.exists()
    t0 = time.perf_counter()
    if first:
        print("fastinfer: compiling kernels (first run on this machine, about a minute)...",
              file=sys.stderr, flush=True)
    yield
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
