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


# --------------------------------------------------------------------------- schema (issue 12)

import pytest  # noqa: E402

from stages.findings import FuseError  # noqa: E402


def _f404(tmp_path) -> str:
    with pytest.raises(FuseError) as e:
        mf.Manifest.load(tmp_path)
    f = e.value.finding
    assert f.code == "F404" and "move the workdir aside" in f.fix and f.file.endswith("manifest.json")
    return f.message


@pytest.mark.parametrize("data, says", [
    ([], "holds a JSON list, not an object"),
    ("manifest", "holds a JSON str"),
    ({"stages": {}}, "'schema_version' is missing"),
    ({"schema_version": "1", "stages": {}}, "schema_version is the string \"1\", not the number 1"),
    ({"schema_version": True, "stages": {}}, "schema_version: not an integer"),
    ({"schema_version": 7, "stages": {}}, "schema_version 7 is from a newer Fuse; this one reads 1"),
    ({"schema_version": 1}, "'stages' is missing"),
    ({"schema_version": 1, "stages": []}, "stages: an object of stage records, not list"),
    ({"schema_version": 1, "stages": {"merge": {"status": "done", "output_dir": "merge", "outputs": "x"}}},
     "stages.merge.outputs: not a list"),
    ({"schema_version": 1, "stages": {"merge": {"status": "done", "output_dir": "../../etc", "outputs": []}}},
     "stages.merge.output_dir: \"../../etc\" is not a plain directory name"),
    ({"schema_version": 1, "stages": {"merge": {"status": "done", "output_dir": "merge",
                                                "outputs": [{"path": "../x", "size": 1, "sha256": "0" * 64}]}}},
     "is not a plain relative path"),
    ({"schema_version": 1, "stages": {"merge": {"status": "done", "output_dir": "merge",
                                                "outputs": [{"path": "x", "size": True, "sha256": "0" * 64}]}}},
     "stages.merge.outputs[0].size: a size in bytes, not bool"),
    ({"schema_version": 1, "stages": {"merge": {"status": "weird"}}}, '"weird" is not one of running, done'),
    ({"schema_version": 1, "stages": {"merge": {"status": "running", "temp": ["../../home"]}}},
     "is not a Fuse temp name"),
])
def test_a_manifest_of_the_wrong_shape_is_F404_with_a_message_that_says_why(tmp_path, data, says):
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    message = _f404(tmp_path)
    assert says in message and "schema 1 is not 1" not in message


def test_a_manifest_that_is_a_directory_or_not_utf8_is_F404(tmp_path):
    (tmp_path / "manifest.json").mkdir()
    assert "is a directory" in _f404(tmp_path)
    (tmp_path / "manifest.json").rmdir()
    (tmp_path / "manifest.json").write_bytes(b"\xff\xfe{}")
    assert "not UTF-8" in _f404(tmp_path)
    (tmp_path / "manifest.json").write_text("[" * 100000)  # deep nesting: RecursionError inside json
    assert "not valid JSON" in _f404(tmp_path)


def test_a_manifest_written_by_this_fuse_passes_the_schema(tmp_path):
    m, _ = _manifest_with_output(tmp_path)
    assert mf.Manifest.load(tmp_path).stages == json.loads((tmp_path / "manifest.json").read_text())["stages"]


def test_a_broken_stat_cache_is_discarded_entry_by_entry(tmp_path):
    good = [10, 1, 2, "a" * 64]
    for text in ("{oops", "[1, 2]", '"x"', "null", "[" * 100000):
        (tmp_path / "c.json").write_text(text)
        assert mf.StatCache(tmp_path / "c.json").entries == {}
    (tmp_path / "c.json").write_text(json.dumps({"/a": good, "/b": [1, 2], "/c": [1, 2, 3, 4], "/d": "x",
                                                 "/e": [True, 1, 2, "a" * 64], "/f": [1, 2, 3, "A" * 64]}))
    assert mf.StatCache(tmp_path / "c.json").entries == {"/a": good}
    (tmp_path / "d.json").mkdir()
    assert mf.StatCache(tmp_path / "d.json").entries == {}


def test_leftovers_are_only_what_fuse_recorded_or_its_exact_temp_names(tmp_path):
    m = mf.Manifest(tmp_path)
    m.stages["merge"] = {"status": "running", "stage": "merge", "output_dir": "merge",
                         "temp": [".tmp-merge-merge-0123abcd", ".trash-merge-0123abcd"]}
    m.stages["old"] = {"status": "running", "stage": "export"}  # written before 0.2: no "temp"
    m.save()
    fuse_made = [".tmp-merge-merge-0123abcd", ".trash-merge-0123abcd", ".tmp-merge-merge-0123abcd-scratch-x1",
                 ".tmp-export-old-89abcdef", ".tmp-export-old-scratch-k2_j", ".manifest.json.0a1b2c3d.tmp",
                 "..fuse-statcache.json.0a1b2c3d.tmp"]
    users = [".tmp-notes", ".tmp-merge-merge-ffffffff", ".trash-mine", ".manifest.json.backup.tmp",
             ".tmp-export-other-89abcdef"]
    for n in fuse_made + users:
        (tmp_path / n).mkdir() if n.startswith((".tmp-", ".trash-")) else (tmp_path / n).write_text("x")
    assert sorted(p.name for p in m.leftovers()) == sorted(fuse_made)


def test_an_output_dir_that_gained_a_file_no_longer_verifies(tmp_path):
    m, out = _manifest_with_output(tmp_path)
    (out / "sub").mkdir()
    (out / "sub" / "notes.txt").write_text("mine")
    problems = m.verify_outputs("merge")
    assert problems == [f"{out / 'sub/notes.txt'}: extra file, not in the manifest"]
    assert m.extra_files("merge") == ["sub/notes.txt"]


def test_crash_point_costs_nothing_unset_and_kills_on_the_nth_hit(tmp_path):
    code = ("from stages import manifest as mf\n"
            "for i in range(5):\n    mf.crash_point('a'); mf.crash_point('b'); print(i, flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k != "FUSE_TEST_KILL_AT"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.split() == ["0", "1", "2", "3", "4"]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**env, "FUSE_TEST_KILL_AT": "b@3"})
    assert r.returncode == 137 and r.stdout.split() == ["0", "1"]
