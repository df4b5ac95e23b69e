"""Manifest primitives: atomic writes, fingerprints, the stat cache, verification, redaction."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from stages import manifest as mf


def test_fingerprint_is_canonical():
    a = mf.fingerprint({"b": 1, "a": [1, 2], "c": {"y": 2, "x": 1}})
    b = mf.fingerprint({"c": {"x": 1, "y": 2}, "a": [1, 2], "b": 1})
    assert a == b and a.startswith("sha256:")
    assert a != mf.fingerprint({"b": 2, "a": [1, 2], "c": {"y": 2, "x": 1}})


def test_sha256_file_matches_hashlib(tmp_path):
    p = tmp_path / "f"
    data = os.urandom(3 * mf.CHUNK + 17)
    p.write_bytes(data)
    assert mf.sha256_file(p) == hashlib.sha256(data).hexdigest()


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "manifest.json"
    mf.atomic_write(p, b"one")
    mf.atomic_write(p, b"two")
    assert p.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_killed_writer_leaves_old_or_new_never_truncated(tmp_path):
    """A process killed mid-write (os._exit before the rename) leaves the old manifest intact."""
    p = tmp_path / "manifest.json"
    mf.atomic_write(p, json.dumps({"v": "old"}).encode())
    code = f"""
import os
from stages import manifest as mf
real = os.replace
os.replace = lambda *a: os._exit(9)   # die between the fsync'd temp file and the rename
mf.atomic_write(mf.Path({str(p)!r}), b'{{"v": "new-' + b'x' * 100000 + b'"}}')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == 9
    assert json.loads(p.read_text()) == {"v": "old"}


def test_stat_cache_rehashes_only_changed_files(tmp_path, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    cache = mf.StatCache(tmp_path / "cache.json")
    first = cache.sha256(f)
    calls = []
    real = mf.sha256_file
    monkeypatch.setattr(mf, "sha256_file", lambda p: calls.append(p) or real(p))
    assert cache.sha256(f) == first and calls == []  # hit: no re-hash
    f.write_bytes(b"b" * 1000)  # same size, new mtime
    assert cache.sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest() and len(calls) == 1
    cache.save()
    again = mf.StatCache(tmp_path / "cache.json")
    assert again.sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest() and len(calls) == 1


def _manifest_with_output(tmp_path):
    out = tmp_path / "merge"
    out.mkdir()
    (out / "model.safetensors").write_bytes(os.urandom(4096))
    (out / "config.json").write_text("{}")
    m = mf.Manifest(tmp_path)
    files = [mf.file_record(out, rel) for rel in mf.list_files(out)]
    m.stages["merge"] = {"status": "done", "output_dir": "merge", "outputs": files}
    m.save()
    return m, out


def test_verify_catches_a_flipped_byte_full_mode(tmp_path):
    m, out = _manifest_with_output(tmp_path)
    assert m.verify_outputs("merge", full=True) == []
    p = out / "model.safetensors"
    st = os.stat(p)
    data = bytearray(p.read_bytes())
    data[1234] ^= 0x01
    with open(p, "r+b") as f:  # same size, same inode; restore mtime: only a full re-hash can tell
        f.write(data)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert m.verify_outputs("merge") == []  # the cheap check trusts size+mtime+inode, by design
    problems = m.verify_outputs("merge", full=True)
    assert len(problems) == 1 and "model.safetensors" in problems[0]


def test_cheap_verify_rehashes_when_stat_moved(tmp_path):
    m, out = _manifest_with_output(tmp_path)
    p = out / "config.json"
    p.write_text("{}")  # same bytes, new mtime: re-hash says fine, stat refreshed
    assert m.verify_outputs("merge") == [] and m.dirty
    p.write_text("[]")
    assert "sha256 differs" in m.verify_outputs("merge")[0]
    p.unlink()
    assert "missing" in m.verify_outputs("merge")[0]


def test_secrets_are_redacted_from_the_manifest(tmp_path):
    m = mf.Manifest(tmp_path, secrets={"hf_topsecret123"})
    m.data["note"] = "token hf_topsecret123 used"
    m.save()
    assert "hf_topsecret123" not in (tmp_path / "manifest.json").read_text()


def test_corrupt_manifest_is_a_finding(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    try:
        mf.Manifest.load(tmp_path)
    except mf.FuseError as e:
        assert e.finding.code == "F404"
    else:
        raise AssertionError("expected F404")


def test_docs_list_every_finding_code():
    from pathlib import Path

    from stages.findings import CODES

    text = (Path(__file__).parents[1] / "docs" / "findings.md").read_text()
    missing = [c for c in CODES if f"`{c}`" not in text]
    assert not missing, f"docs/findings.md lacks {missing}"


def test_secret_names_are_whole_words():
    from stages.pipeline import is_secret_name

    for name in ("HF_TOKEN", "GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "OPENAI_API_KEY", "TOKEN"):
        assert is_secret_name(name), name
    for name in ("TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE", "AUTHOR", "PATH", "RUNNER_TEMP"):
        assert not is_secret_name(name), name


def test_redaction_keeps_the_manifest_valid_json(tmp_path):
    m = mf.Manifest(tmp_path, secrets={"false", "hf_secretvalue"})  # "false" is too short to be a secret
    m.data["flag"] = False
    m.data["nested"] = {"hf_secretvalue": ["x hf_secretvalue y"]}
    m.save()
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["flag"] is False and data["nested"] == {"***": ["x *** y"]}
