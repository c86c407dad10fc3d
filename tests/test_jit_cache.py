"""The kernel cache's housekeeping (kernels/jit.py): old source versions' caches are removed."""
import os
import time

from fastinfer.kernels.jit import remove_stale_caches


def _make(root, name, age_days):
    d = root / name
    (d / "sub").mkdir(parents=True)
    f = d / "sub" / "x.nbc"
    f.write_bytes(b"0")
    t = time.time() - age_days * 86400
    for p in (f, d / "sub", d):
        os.utime(p, (t, t))
    return d


def test_only_other_versions_unused_for_two_weeks_go(tmp_path):
    keep = _make(tmp_path, "0123456789abcdef", 100)         # the current version, however old
    old = _make(tmp_path, "fedcba9876543210", 30)           # another version, unused for a month
    recent = _make(tmp_path, "00112233445566ff", 1)         # another version, used yesterday
    other = _make(tmp_path, "not-a-digest", 30)             # not ours: never touched
    removed = remove_stale_caches(tmp_path, keep)
    assert removed == [old]
    assert keep.is_dir() and recent.is_dir() and other.is_dir() and not old.exists()


def test_missing_root_is_fine(tmp_path):
    assert remove_stale_caches(tmp_path / "absent", tmp_path / "absent" / "x") == []
