"""Scratch directories for writes that must land whole or not at all.

Each one is named after the process that made it (PREFIX<pid>-<random>), beside its final place,
and renamed into place when complete. A process that is interrupted removes its own (on SIGINT,
and on SIGTERM through the CLI's handler); one that was killed outright leaves it behind, and the
next run beside it removes it once no process with that id is alive.
"""
import os
import shutil
import tempfile
from pathlib import Path


def scratch_dir(parent: Path, prefix: str) -> Path:
    """A new empty directory in parent, named prefix + this process id."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def remove_stale(parent: Path, prefix: str) -> None:
    """Remove parent's scratch directories of this prefix whose process has ended."""
    if not parent.is_dir():
        return
    for d in parent.glob(f"{prefix}*"):
        pid = d.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or not d.is_dir() or d.is_symlink() or _alive(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or an id we cannot ask about): leave it alone
    return True
