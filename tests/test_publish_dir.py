"""``publish: {to: dir}``: ownership, the journal, resume after a kill, a full disk or a deleted
``SHA256SUMS``, the upgrade from targets written before the journal existed.

Most tests drive the publisher on a tiny release (a few small files, laid out as the publish
stage hands them over: model files, ``fuse-provenance.json``, ``README.md``, ``SHA256SUMS``
last); kills run it in a subprocess that ``FUSE_TEST_KILL_AT`` ends with ``os._exit(137)`` at
a named point (no cleanup runs, as with ``kill -9``). The end-to-end tests run the real CLI on
a merged tiny model. ``FUSE_SLOW=1`` runs the full kill matrix.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from cli import fuse
from stages.findings import FuseError
from stages.publishers import dir as dirpub
from stages.publishers.base import LocalFile, sync

SLOW = os.environ.get("FUSE_SLOW") == "1"
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- a tiny release


def release(root: Path, version: int = 1) -> list[LocalFile]:
    """Version 1: one weight file and a sub-folder; version 2: two shards, the sub-folder gone."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(version)
    model = {"config.json": json.dumps({"model_type": "llama", "version": version}).encode(),
             "tokenizer.json": b'{"version": "1.0", "model": {}}'}
    if version == 1:
        model["model.safetensors"] = rng.randbytes(dirpub.CHUNK + 300_000)  # two chunks: a kill lands mid-file
        model["1_Pooling/config.json"] = b'{"pooling_mode_mean_tokens": true}'
    else:
        model["model-00001-of-00002.safetensors"] = rng.randbytes(dirpub.CHUNK + 1000)
        model["model-00002-of-00002.safetensors"] = rng.randbytes(5000)
    sha = {p: hashlib.sha256(d).hexdigest() for p, d in model.items()}
    generated = {dirpub.PROVENANCE: json.dumps({"name": "tiny", "files": dict(sorted(sha.items()))}, indent=2,
                                               sort_keys=True).encode() + b"\n",
                 "README.md": b"---\nlicense: mit\n---\n# tiny v%d\n" % version}
    sha.update({p: hashlib.sha256(d).hexdigest() for p, d in generated.items()})
    content = dict(sorted(model.items()), **generated)
    content["SHA256SUMS"] = "".join(f"{h}  {p}\n" for p, h in sorted(sha.items())).encode()
    files = []
    for path, data in content.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
        files.append(LocalFile(path, root / path, len(data), hashlib.sha256(data).hexdigest()))
    return files


def publish(files, target: Path, log=None):
    return sync(dirpub.Publisher({"path": str(target)}, log=log if log is not None else (lambda m: None)), files)


def tree(target: Path) -> dict[str, bytes]:
    return {p.relative_to(target).as_posix(): p.read_bytes() for p in sorted(target.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def temps(target: Path) -> list[str]:
    """Temp files in ``target`` (the user's own ``.notes.txt.0123abcd.tmp`` aside)."""
    found = (p.relative_to(target).as_posix() for p in target.rglob("*.tmp"))
    return sorted(rel for rel in found if rel not in USER)


def reference(tmp_path: Path, versions=(1,), user: dict | None = None, name="ref") -> dict[str, bytes]:
    """What an uninterrupted publish (of each version in turn) leaves, beside the user's files."""
    target = tmp_path / name
    for v in versions:
        publish(release(tmp_path / f"src{v}", v), target)
        for rel, data in (user or {}).items():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            (target / rel).write_bytes(data)
    return tree(target)


USER = {"EVAL.md": b"# our eval\n", "samples/a.txt": b"a", "samples/deep/b.txt": b"b",
        "1_Pooling/NOTES.md": b"keep the folder", ".notes.txt.0123abcd.tmp": b"a user's file, Fuse-like name"}


def add_user_files(target: Path):
    for rel, data in USER.items():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_bytes(data)


# --------------------------------------------------------------------------- ownership


def test_first_publish_writes_a_complete_journal_and_a_rerun_copies_nothing(tmp_path):
    files = release(tmp_path / "src")
    target = tmp_path / "dist"
    out = publish(files, target)
    assert len(out.uploaded) == len(files) and out.deleted == []
    got = tree(target)
    assert {p: hashlib.sha256(d).hexdigest() for p, d in got.items() if p != dirpub.JOURNAL} == \
        {f.path: f.sha256 for f in files}
    journal = json.loads(got[dirpub.JOURNAL])
    assert journal == {"fuse_publish": 1, "complete": True, "owned": sorted(f.path for f in files),
                       "files": {f.path: {"sha256": f.sha256, "size": f.size} for f in files}}
    assert temps(target) == []
    again = publish(files, target)
    assert again.uploaded == [] and again.deleted == [] and tree(target) == got


def test_user_files_survive_a_republish_and_previous_lists_only_fuse_files(tmp_path):
    """Issue 12, 1: a re-publish removed EVAL.md and samples/ the user had added."""
    target = tmp_path / "dist"
    v1 = release(tmp_path / "src1", 1)
    publish(v1, target)
    add_user_files(target)
    pub = dirpub.Publisher({"path": str(target)}, log=lambda m: None)
    pub.open()
    try:
        assert pub.previous({}, []) == {f.path for f in v1}  # never EVAL.md, samples/..., the user's notes
    finally:
        pub.close()
    v2 = release(tmp_path / "src2", 2)
    out = publish(v2, target)
    assert sorted(out.deleted) == ["1_Pooling/config.json", "model.safetensors"]
    got = tree(target)
    for rel, data in USER.items():
        assert got[rel] == data, rel
    assert got == reference(tmp_path, (1, 2), USER)
    assert not (target / "model.safetensors").exists() and (target / "1_Pooling/NOTES.md").exists()
    # a folder only Fuse's files were in goes with them
    publish(v1, tmp_path / "clean")
    publish(v2, tmp_path / "clean")
    assert not (tmp_path / "clean/1_Pooling").exists()


@pytest.mark.parametrize("where", ["fresh", "non-fuse", "fuse"])
def test_a_user_file_where_fuse_must_write_is_F509_before_anything_is_written(tmp_path, where):
    target = tmp_path / "dist"
    v1 = release(tmp_path / "src1", 1)
    if where == "fuse":  # an earlier Fuse publish, and the user's own file where the next version writes
        publish(v1, target)
        (target / "model-00002-of-00002.safetensors").write_bytes(b"the user's")
        files = release(tmp_path / "src2", 2)
    else:
        target.mkdir()
        (target / "Dockerfile").write_text("FROM scratch\n")
        (target / "config.json").write_text('{"theirs": true}')
        if where == "non-fuse":
            (target / "README.md").write_text("# their readme\n")
        files = v1
    before = tree(target)
    with pytest.raises(FuseError) as e:
        publish(files, target)
    f = e.value.finding
    name = "model-00002-of-00002.safetensors" if where == "fuse" else "config.json"
    assert f.code == "F509" and name in f.message and name in f.fix, f
    assert ("and 1 more" in f.message) == (where == "non-fuse")
    assert tree(target) == before and temps(target) == []  # nothing written, not even the journal
    # once the user's file is out of the way, the publish goes ahead and leaves their others alone
    (target / name).unlink()
    (target / "README.md").unlink(missing_ok=True) if where == "non-fuse" else None
    publish(files, target)
    if where != "fuse":
        assert (target / "Dockerfile").read_text() == "FROM scratch\n"


def test_a_symlink_or_file_where_fuse_needs_a_folder_is_F509(tmp_path):
    files = release(tmp_path / "src")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = tmp_path / "dist"
    target.mkdir()
    (target / "1_Pooling").symlink_to(elsewhere)
    with pytest.raises(FuseError) as e:
        publish(files, target)
    assert e.value.finding.code == "F509" and "1_Pooling (a symlink" in e.value.finding.message
    assert list(elsewhere.iterdir()) == [] and not (target / dirpub.JOURNAL).exists()
    # a journal that claims a path through a symlink still cannot reach outside
    (target / "1_Pooling").unlink()
    publish(files, target)
    shutil.rmtree(target / "1_Pooling")
    (target / "1_Pooling").symlink_to(elsewhere)
    (elsewhere / "config.json").write_text("outside")
    with pytest.raises(FuseError):
        publish(files, target)
    assert (elsewhere / "config.json").read_text() == "outside"


def test_a_journal_fuse_cannot_read_stops_the_publish(tmp_path):
    files = release(tmp_path / "src")
    target = tmp_path / "dist"
    publish(files, target)
    for text in ("{not json", '{"fuse_publish": 99, "owned": [], "files": {}}', '["a list"]',
                 '{"fuse_publish": 1, "owned": "config.json", "files": {}}', "[" * 100_000, b"\xff\xfe not utf-8"):
        (target / dirpub.JOURNAL).write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(FuseError) as e:
            publish(files, target)
        assert e.value.finding.code == "F501" and dirpub.JOURNAL in e.value.finding.message


def test_journal_paths_outside_the_directory_are_never_touched(tmp_path):
    files = release(tmp_path / "src")
    target = tmp_path / "pub" / "dist"
    publish(files, target)
    victim = tmp_path / "pub" / "victim.txt"
    victim.write_text("not Fuse's")
    journal = json.loads((target / dirpub.JOURNAL).read_text())
    journal["owned"] += ["../victim.txt", str(victim), "./x/../../victim.txt"]
    (target / dirpub.JOURNAL).write_text(json.dumps(journal))
    publish(files, target)
    assert victim.read_text() == "not Fuse's"


def test_two_publishes_to_one_directory_do_not_interleave(tmp_path):
    files = release(tmp_path / "src")
    first = dirpub.Publisher({"path": str(tmp_path / "dist")}, log=lambda m: None)
    first.open()  # holds the directory's lock, as a run in the middle of its publish would
    try:
        with pytest.raises(FuseError) as e:
            publish(files, tmp_path / "dist")
        assert e.value.finding.code == "F501" and "another Fuse run" in e.value.finding.message
    finally:
        first.close()
    publish(files, tmp_path / "dist")


SEED = int(os.environ.get("FUSE_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
SEGMENTS = ["EVAL.md", "samples", "notes", "1_Pooling", "config.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "tokenizer.json", "SHA256SUMS", ".notes.0123abcd.tmp", "x"]


def _collides(user: str, fuse_paths) -> bool:
    """The user's file is at a path Fuse writes, where it needs a folder, or inside one it writes as a file."""
    return any(user == p or p.startswith(user + "/") or user.startswith(p + "/") for p in fuse_paths)


def test_property_user_files_are_never_touched_and_collisions_change_nothing(tmp_path):
    """For generated trees of user files added after a publish: the next publish either leaves
    every one of them byte for byte and ends as the reference, or stops with F509 having changed
    nothing (exactly when one of them is where the model must go)."""
    from hypothesis import HealthCheck, given, seed, settings, strategies as st

    print(f"\nhypothesis seed: {SEED} (replay with FUSE_FUZZ_SEED={SEED})")
    v1, v2 = release(tmp_path / "src1", 1), release(tmp_path / "src2", 2)
    expected = reference(tmp_path, (1, 2))
    v2_paths = {f.path for f in v2}
    paths = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3).map("/".join)
    counter = iter(range(10**9))

    @seed(SEED)
    @settings(max_examples=400 if SLOW else 15, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(st.dictionaries(paths, st.binary(max_size=20), max_size=6))
    def check(user):
        target = tmp_path / f"t{next(counter)}"
        publish(v1, target)
        made = {}
        for rel, data in user.items():
            p = target / rel
            if p.exists() or any(q.is_file() for q in p.parents if target in q.parents):
                continue  # a file of Fuse's or one just made is in the way: not something a user can add
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            made[rel] = data
        made = {rel: d for rel, d in made.items() if (target / rel).is_file()}  # a later one made it a folder
        before = tree(target)
        if any(_collides(rel, v2_paths) for rel in made):
            with pytest.raises(FuseError) as e:
                publish(v2, target)
            assert e.value.finding.code == "F509"
            assert tree(target) == before
        else:
            publish(v2, target)
            got = tree(target)
            assert {rel: got.get(rel) for rel in made} == made
            assert {k: v for k, v in got.items() if k not in made} == expected
        shutil.rmtree(target)

    check()


# --------------------------------------------------------------------------- upgrade path


def _old_publisher_module():
    """The ``to: dir`` publisher as it was before the journal (git history), or None."""
    r = subprocess.run(["git", "log", "--format=%H", "-1", "--", "stages/publishers/dir.py"], cwd=ROOT,
                       capture_output=True, text=True)
    commits = subprocess.run(["git", "log", "--format=%H", "--", "stages/publishers/dir.py"], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    for commit in commits if r.returncode == 0 else []:
        src = subprocess.run(["git", "show", f"{commit}:stages/publishers/dir.py"], cwd=ROOT, capture_output=True,
                             text=True).stdout
        if src and "JOURNAL" not in src:
            mod = types.ModuleType("stages.publishers._old_dir")
            mod.__package__ = "stages.publishers"
            exec(compile(src, f"old dir.py ({commit[:12]})", "exec"), mod.__dict__)
            return mod
    return None


@pytest.mark.parametrize("how", ["old-code", "same-bytes"])
@pytest.mark.parametrize("sums_deleted", [False, True])
def test_a_target_written_before_the_journal_still_counts_as_fuses(tmp_path, how, sums_deleted):
    """Issue 12, 9: a directory published by the code before this change (no journal)."""
    target = tmp_path / "dist"
    v1 = release(tmp_path / "src1", 1)
    if how == "old-code":
        old = _old_publisher_module()
        if old is None:
            pytest.skip("no git history with the old publisher here")
        sync(old.Publisher({"path": str(target)}, log=lambda m: None), v1)
    else:  # what the old code left: exactly the files' bytes at their paths, nothing else
        for f in v1:
            (target / f.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f.source, target / f.path)
    assert not (target / dirpub.JOURNAL).exists() and tree(target) == {f.path: f.source.read_bytes() for f in v1}
    add_user_files(target)
    if sums_deleted:
        (target / "SHA256SUMS").unlink()
    v2 = release(tmp_path / "src2", 2)
    out = publish(v2, target)
    assert sorted(out.deleted) == ["1_Pooling/config.json", "model.safetensors"]
    assert tree(target) == reference(tmp_path, (1, 2), USER)


# --------------------------------------------------------------------------- resume


def test_deleted_sha256sums_is_put_back_alone(tmp_path):
    """Issue 12, 3: a user deleting SHA256SUMS made every later run stop with F501."""
    files = release(tmp_path / "src")
    target = tmp_path / "dist"
    publish(files, target)
    (target / "SHA256SUMS").unlink()
    out = publish(files, target)
    assert [f.path for f in out.uploaded] == ["SHA256SUMS"]
    assert tree(target) == reference(tmp_path)


def _failing_copy(monkeypatch, after: int, err: int):
    calls = []
    real = dirpub._copy

    def copy(source, out):
        calls.append(source)
        if len(calls) > after:
            out.write(b"partial")
            raise OSError(err, os.strerror(err))
        real(source, out)

    monkeypatch.setattr(dirpub, "_copy", copy)
    return calls


@pytest.mark.parametrize("after", [0, 3] + ([1, 2, 4, 5, 6] if SLOW else []))
def test_disk_full_is_F402_naming_the_path_and_the_rerun_resumes(tmp_path, monkeypatch, after):
    """Issue 12, 3: ENOSPC in the target ended the same way as a kill (F501 forever)."""
    files = release(tmp_path / "src")
    target = tmp_path / "dist"
    _failing_copy(monkeypatch, after, errno.ENOSPC)
    with pytest.raises(FuseError) as e:
        publish(files, target)
    f = e.value.finding
    assert f.code == "F402" and str(target / files[after].path) in f.message and "resumes" in f.fix, f
    assert temps(target) == [] and json.loads((target / dirpub.JOURNAL).read_text())["complete"] is False
    monkeypatch.undo()
    out = publish(files, target)
    assert [x.path for x in out.uploaded] == [x.path for x in files[after:]]  # only what was missing
    assert tree(target) == reference(tmp_path) and temps(target) == []


def test_a_real_full_disk_resumes(tmp_path):
    """The same on a tmpfs that really fills up (needs root to mount; skipped otherwise)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        files = release(tmp_path / "src")
        with pytest.raises(FuseError) as e:
            publish(files, mnt / "dist")
        assert e.value.finding.code == "F402" and str(mnt / "dist") in e.value.finding.message
        assert temps(mnt / "dist") == []
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
        publish(files, mnt / "dist")
        assert tree(mnt / "dist") == reference(tmp_path) and temps(mnt / "dist") == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES])
def test_unwritable_target_is_F510_naming_the_path(tmp_path, monkeypatch, err):
    files = release(tmp_path / "src")
    target = tmp_path / "dist"
    publish(release(tmp_path / "old", 2), target)
    before = tree(target)
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        if target in Path(dst).parents and Path(dst).name != dirpub.JOURNAL:
            raise OSError(err, os.strerror(err), str(dst))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(FuseError) as e:
        publish(files, target)
    f = e.value.finding
    assert f.code == "F510" and str(target / files[0].path) in f.message and os.strerror(err) in f.message, f
    assert temps(target) == []
    monkeypatch.undo()
    assert {k: v for k, v in tree(target).items() if k != dirpub.JOURNAL} == \
        {k: v for k, v in before.items() if k != dirpub.JOURNAL}  # the journal aside, nothing changed
    publish(files, target)
    assert tree(target) == reference(tmp_path, (2, 1))


@pytest.mark.parametrize("where", ["scandir", "sha256_file", "mkdir"])
def test_any_os_error_of_the_target_is_one_finding(tmp_path, monkeypatch, where):
    files = release(tmp_path / "src")
    target = tmp_path / "dist"
    publish(files, target)
    (target / "config.json").write_bytes(b"x" * files[1].size)  # same size: hashed again
    shutil.rmtree(target / "1_Pooling")  # copied again, into a new folder

    def denied(*a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", str(a[0]) if a else None)

    if where == "scandir":
        monkeypatch.setattr(dirpub.os, "scandir", denied)
    elif where == "sha256_file":
        monkeypatch.setattr(dirpub, "sha256_file", denied)
    else:
        monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(FuseError) as e:
        publish(files, target)
    assert e.value.finding.code == "F510" and "Permission denied" in e.value.finding.message
    assert str(target) in e.value.finding.message


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory this process cannot write: a read-only tmpfs as root, chmod 555 otherwise."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"root, and cannot mount a read-only tmpfs: {r.stderr.decode().strip()}")
    yield d
    subprocess.run(["umount", "-l", str(d)])


def test_a_really_read_only_target_is_one_finding(tmp_path, readonly_dir):
    with pytest.raises(FuseError) as e:
        publish(release(tmp_path / "src"), readonly_dir / "dist")
    assert e.value.finding.code == "F510" and str(readonly_dir / "dist") in e.value.finding.message


# --------------------------------------------------------------------------- kills

DRIVER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from stages.findings import FuseError
    from stages.publishers import publisher_class
    from stages.publishers.base import LocalFile, sync
    spec = json.loads(Path(sys.argv[1]).read_text())
    files = [LocalFile(f["path"], Path(f["source"]), f["size"], f["sha256"]) for f in spec["files"]]
    try:
        sync(publisher_class(spec["kind"])(spec["params"], log=print), files)
    except FuseError as e:
        print(e.finding.code, e.finding.message, file=sys.stderr)
        sys.exit(1)
""")


def run_publisher(kind: str, params: dict, files, spec: Path, kill: str | None = None, env: dict | None = None,
                  popen=False):
    """Publish in a subprocess (``FUSE_TEST_KILL_AT=kill`` ends it there), as the publish stage would."""
    spec.write_text(json.dumps({"kind": kind, "params": params, "files": [
        {"path": f.path, "source": str(f.source), "size": f.size, "sha256": f.sha256} for f in files]}))
    env = {**{k: v for k, v in os.environ.items() if k != "FUSE_TEST_KILL_AT"}, **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}  # None: unset
    if kill:
        env["FUSE_TEST_KILL_AT"] = kill
    args = [sys.executable, "-c", DRIVER, str(spec)]
    if popen:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


def run_driver(files, target: Path, kill: str | None = None) -> subprocess.CompletedProcess:
    return run_publisher("dir", {"path": str(target)}, files, target.parent / f"{target.name}.spec.json", kill)


PATHS = {1: ["1_Pooling/config.json", "config.json", "model.safetensors", "tokenizer.json"],
         2: ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tokenizer.json"]}


def kill_points(version: int) -> list[str]:
    """Every point of a dir publish: after the journal, before each file, in each copy, after the
    copies and removals, before the journal is sealed."""
    paths = PATHS[version] + [dirpub.PROVENANCE, "README.md", "SHA256SUMS"]
    return (["dir:renaming:.fuse-publish.json", "dir:journal"] + [f"dir:before:{p}" for p in paths]
            + [f"dir:mid-copy@{n}" for n in range(1, len(paths) + 1)]
            + [f"dir:renaming:{p.rsplit('/', 1)[-1]}" for p in paths]
            + ["dir:pushed", "dir:seal", "dir:renaming:.fuse-publish.json@2"])


SMALL = [("fresh", "dir:renaming:.fuse-publish.json"), ("fresh", "dir:journal"), ("fresh", "dir:mid-copy"),
         ("fresh", "dir:before:fuse-provenance.json"),
         ("fresh", "dir:before:SHA256SUMS"), ("republish", "dir:mid-copy@2"), ("republish", "dir:pushed"),
         ("republish", "dir:seal")]
FULL = [("fresh", p) for p in kill_points(1)] + [("republish", p) for p in kill_points(2)]


@pytest.mark.parametrize("scenario,point", FULL if SLOW else SMALL)
def test_kill_during_a_dir_publish_then_rerun_is_byte_identical(tmp_path, scenario, point):
    """Issue 12, 3 and 8: kill -9 at each point; the next run resumes, ends as an uninterrupted one."""
    target = tmp_path / "dist"
    v1 = release(tmp_path / "src1", 1)
    if scenario == "fresh":
        files, expected = v1, reference(tmp_path)
    else:  # a re-publish of a new version over an earlier one, with the user's files beside it
        publish(v1, target)
        add_user_files(target)
        files, expected = release(tmp_path / "src2", 2), reference(tmp_path, (1, 2), USER)
    r = run_driver(files, target, kill=point)
    if r.returncode == 0:  # a re-publish does not copy unchanged files: their points are not reached
        assert scenario == "republish" and point.startswith(("dir:mid-copy@", "dir:before:", "dir:renaming:")), point
    elif point == "dir:renaming:.fuse-publish.json":  # the new journal is not in place yet: nothing else written
        assert r.returncode == 137, r.stderr
        assert temps(target) and (target / dirpub.JOURNAL).exists() == (scenario == "republish")
    else:
        assert r.returncode == 137, r.stderr
        assert (target / dirpub.JOURNAL).exists() and json.loads((target / dirpub.JOURNAL).read_text())["complete"] \
            is False
    r = run_driver(files, target)
    assert r.returncode == 0, r.stderr
    assert tree(target) == expected and temps(target) == [], (point, temps(target))


# --------------------------------------------------------------------------- the real CLI

PIPELINE = """\
version: 1
name: tiny
base: base
adapter: adapter
workdir: runs/w
stages:
  - merge: {dtype: float32}
  - publish: {to: dir, path: dist}
"""


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """A project whose merge ran once; each test gets a copy."""
    from factory import make_lora_adapter, make_tiny_model

    import stages

    root = tmp_path_factory.mktemp("dirpub")
    make_tiny_model("llama", root / "base")
    make_lora_adapter(root / "base", root / "adapter", target_modules=["q_proj", "v_proj"])
    (root / "pipeline.yaml").write_text(PIPELINE)
    stages.run(root / "pipeline.yaml", log=lambda m: None, only="merge")
    return root


@pytest.fixture
def project(merged, tmp_path):
    p = tmp_path / "proj"
    shutil.copytree(merged, p, symlinks=True)
    return p


def check_published(project: Path, target: Path):
    sums = (target / "SHA256SUMS").read_text().splitlines()
    for line in sums:
        sha, name = line.split("  ")
        assert hashlib.sha256((target / name).read_bytes()).hexdigest() == sha, name
    for name in ("SHA256SUMS", "fuse-provenance.json", "README.md"):
        assert (target / name).read_bytes() == (project / "runs/w/publish" / name).read_bytes()
    assert json.loads((target / dirpub.JOURNAL).read_text())["complete"] is True and temps(target) == []


def test_cli_killed_publish_resumes_and_user_files_survive(project):
    """Issue 12, 3: kill -9 while the first publish copies; the next run resumes instead of F501."""
    r = fuse("run", "pipeline.yaml", cwd=project, env={"FUSE_TEST_KILL_AT": "dir:mid-copy@2"}, check=False)
    assert r.returncode == 137
    assert temps(project / "dist")  # the temp file the kill left
    r = fuse("run", "pipeline.yaml", cwd=project)
    assert "[publish] running" in r.stderr and "temp file of an interrupted publish" in r.stderr
    check_published(project, project / "dist")
    first = tree(project / "dist")
    add_user_files(project / "dist")
    r = fuse("run", "pipeline.yaml", "--only", "publish", "--force", cwd=project)
    got = tree(project / "dist")
    assert {k: got[k] for k in first} == first and all(got[k] == v for k, v in USER.items())
    assert fuse("verify", "runs/w", cwd=project).returncode == 0


def test_cli_collision_exits_2_and_read_only_target_exits_1(project, readonly_dir):
    (project / "dist").mkdir()
    (project / "dist/config.json").write_text("{}")
    r = fuse("run", "pipeline.yaml", cwd=project, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "F509" in r.stderr and "config.json" in r.stderr
    assert (project / "dist/config.json").read_text() == "{}"
    assert sorted(os.listdir(project / "dist")) == ["config.json"]
    (project / "pipeline.yaml").write_text(PIPELINE.replace("path: dist", f"path: '{readonly_dir}/dist'"))
    r = fuse("run", "pipeline.yaml", cwd=project, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "F406" not in r.stderr
    assert "F510" in r.stderr and str(readonly_dir / "dist") in r.stderr
    assert sum("error F" in line for line in r.stderr.splitlines()) == 1


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin", "model.onnx"])
def test_someone_elses_weights_in_the_target_are_F509_whatever_their_name(tmp_path, weights):
    """Another model's weight file beside the published shards would be loaded with them (or instead of
    them): a collision even when no name matches. Nothing is written; the user's file is kept."""
    target = tmp_path / "dist"
    target.mkdir()
    (target / weights).write_bytes(b"someone else's weights")
    before = tree(target)
    with pytest.raises(FuseError) as e:
        publish(release(tmp_path / "src", 2), target)  # shards model-0000N-of-00002.safetensors
    assert e.value.finding.code == "F509" and weights in e.value.finding.message
    assert tree(target) == before and temps(target) == []


def test_preflight_names_a_collision_before_the_model_exists_and_writes_nothing(tmp_path):
    """The runner's check before any stage: Fuse's own file names (and foreign weights) are known before the
    merge runs. Reads only: a target that does not exist is not created."""
    target = tmp_path / "dist"
    pub = dirpub.Publisher({"path": str(target)}, log=lambda m: None)
    pub.preflight(["README.md", "SHA256SUMS", dirpub.PROVENANCE])
    assert not target.exists()
    target.mkdir()
    (target / "SHA256SUMS").write_text("mine\n")
    with pytest.raises(FuseError) as e:
        dirpub.Publisher({"path": str(target)}, log=lambda m: None).preflight(["README.md", "SHA256SUMS"])
    assert e.value.finding.code == "F509" and "SHA256SUMS" in e.value.finding.message
    assert tree(target) == {"SHA256SUMS": b"mine\n"}
    # an earlier Fuse publish there owns its files: no collision
    shutil.rmtree(target)
    publish(release(tmp_path / "src", 1), target)
    dirpub.Publisher({"path": str(target)}, log=lambda m: None).preflight(["README.md", "SHA256SUMS",
                                                                         "model.safetensors"])


def test_cli_collision_is_found_before_any_stage_runs(project):
    """Issue 12, Deliver 1: a user file where Fuse must write is an error before any stage runs, not after the
    merge: Fuse's own file names and foreign weights are known up front."""
    for name in ("README.md", "model.safetensors"):
        shutil.rmtree(project / "runs", ignore_errors=True)
        shutil.rmtree(project / "dist", ignore_errors=True)
        (project / "dist").mkdir()
        (project / "dist" / name).write_text("the user's")
        r = fuse("run", "pipeline.yaml", cwd=project, check=False)
        assert r.returncode == 2 and "F509" in r.stderr and name in r.stderr and "Traceback" not in r.stderr
        assert "[merge] running" not in r.stderr and not (project / "runs/w/merge").exists()
        assert sorted(os.listdir(project / "dist")) == [name]
