"""The runner end to end on a tiny Llama: skip rule, resume after kill -9, lock, full disk, secrets.

Each scenario runs the real CLI in a subprocess, as a user or CI would.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from factory import make_lora_adapter, make_tiny_model
from cli import fuse

PIPELINE = """\
version: 1
name: tiny
base: base
adapter: adapter
workdir: {workdir}
stages:
  - validate
  - merge: {{dtype: bfloat16, max_shard_size: 40KB}}
  - publish: {{to: dir, path: dist}}
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    make_tiny_model("llama", root / "base", dtype=__import__("torch").bfloat16)
    make_lora_adapter(root / "base", root / "adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    return root


@pytest.fixture
def project(tmp_path, inputs):
    for name in ("base", "adapter"):
        (tmp_path / name).symlink_to(inputs / name)
    write_pipeline(tmp_path)
    return tmp_path


def write_pipeline(root: Path, workdir="runs/tiny", text=PIPELINE) -> Path:
    p = root / "pipeline.yaml"
    p.write_text(text.format(workdir=workdir))
    return p


def snapshot(root: Path) -> dict:
    """path -> (sha256, mtime_ns) of every file under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def manifest(project) -> dict:
    return json.loads((project / "runs/tiny/manifest.json").read_text())


def test_run_then_rerun_skips_everything_and_rewrites_nothing(project, inputs):
    base_before = snapshot(inputs / "base")
    r = fuse("run", "pipeline.yaml", cwd=project)
    assert "3 ran" in r.stderr
    m = manifest(project)
    assert {k: v["status"] for k, v in m["stages"].items()} == {"validate": "done", "merge": "done", "publish": "done"}
    outputs = snapshot(project / "runs/tiny/merge") | {"dist/" + k: v for k, v in snapshot(project / "dist").items()}
    manifest_before = (project / "runs/tiny/manifest.json").read_bytes()

    r = fuse("run", "pipeline.yaml", cwd=project)
    assert "0 ran, 3 fresh and skipped" in r.stderr
    after = snapshot(project / "runs/tiny/merge") | {"dist/" + k: v for k, v in snapshot(project / "dist").items()}
    assert after == outputs  # same sha256 and mtimes: nothing rewritten
    assert (project / "runs/tiny/manifest.json").read_bytes() == manifest_before
    assert snapshot(inputs / "base") == base_before  # the base is never modified


def test_published_model_loads_and_carries_provenance(project):
    fuse("run", "pipeline.yaml", cwd=project)
    dist = project / "dist"
    names = set(os.listdir(dist))
    assert {"README.md", "fuse-provenance.json", "SHA256SUMS", "config.json", "model.safetensors.index.json"} <= names
    assert not any(n.startswith("adapter_") for n in names)
    # SHA256SUMS covers every other file and is right
    sums = dict(reversed(line.split("  ", 1)) for line in (dist / "SHA256SUMS").read_text().splitlines())
    from stages.publishers.dir import JOURNAL

    assert set(sums) == names - {"SHA256SUMS", JOURNAL}  # the journal is the publisher's record, not the model
    for name, sha in sums.items():
        assert hashlib.sha256((dist / name).read_bytes()).hexdigest() == sha
    card = (dist / "README.md").read_text()
    assert "base_model_relation: finetune" in card and "library_name: transformers" in card
    prov = json.loads((dist / "fuse-provenance.json").read_text())
    assert "run_id" not in json.dumps(prov) and "_at" not in json.dumps(prov)  # deterministic: no times, no ids
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dist)
    assert model.config.model_type == "llama"


def test_published_files_are_deterministic_across_workdirs(project, tmp_path_factory):
    fuse("run", "pipeline.yaml", cwd=project)
    first = {k: v[0] for k, v in snapshot(project / "dist").items()}
    other = tmp_path_factory.mktemp("other")
    for name in ("base", "adapter"):
        (other / name).symlink_to((project / name).resolve())
    write_pipeline(other, workdir="elsewhere/w")
    fuse("run", "pipeline.yaml", cwd=other)
    assert {k: v[0] for k, v in snapshot(other / "dist").items()} == first


def test_changing_a_parameter_reruns_that_stage_and_after_not_before(project):
    fuse("run", "pipeline.yaml", cwd=project)
    r = fuse("run", "pipeline.yaml", "--set", "merge.dtype=float16", cwd=project)
    assert "[validate] fresh, skipped" in r.stderr
    assert "[merge] running: parameter dtype changed ('bfloat16' → 'float16')" in r.stderr
    assert "[publish] running: upstream output changed" in r.stderr
    cfg = json.loads((project / "dist/config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float16"
    status = json.loads(fuse("status", "pipeline.yaml", "--json", cwd=project).stdout)
    assert [r["state"] for r in status] == ["fresh", "stale", "stale"]  # without --set, merge is stale again
    assert "dtype" in status[1]["why"]


def test_verify_catches_a_flipped_byte_in_any_output(project):
    fuse("run", "pipeline.yaml", cwd=project)
    assert fuse("verify", "runs/tiny", cwd=project).returncode == 0
    recorded = [(Path("runs/tiny") / s["output_dir"] / f["path"]) for s in manifest(project)["stages"].values()
                for f in s["outputs"]] + [Path("dist") / f["path"] for f in manifest(project)["stages"]["publish"]["external"]["files"]]
    assert len(recorded) > 8
    for rel in recorded:
        p = project / rel
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(data)
        r = fuse("verify", "runs/tiny", cwd=project, check=False)
        assert r.returncode == 1 and str(rel.name) in r.stderr and "F403" in r.stderr, (rel, r.stderr)
        data[len(data) // 2] ^= 0x01
        p.write_bytes(data)
    assert fuse("verify", "runs/tiny", cwd=project).returncode == 0


def test_a_changed_output_makes_its_stage_stale_and_reruns_it(project):
    fuse("run", "pipeline.yaml", cwd=project)
    (project / "dist/config.json").write_text("{}")
    r = fuse("run", "pipeline.yaml", cwd=project)
    assert "[publish] running: outputs changed" in r.stderr and "[merge] fresh" in r.stderr
    assert json.loads((project / "dist/config.json").read_text()) != {}


# A wrapper that pauses the merge after its first tensor, so the test can kill it there.
PAUSING = textwrap.dedent("""
    import os, sys, time
    from stages.io import safetensors as st
    real = st.ShardedWriter.write
    def write(self, *a, **kw):
        real(self, *a, **kw)
        open(os.environ["FUSE_TEST_MARK"], "w").close()
        time.sleep(float(os.environ.get("FUSE_TEST_SLEEP", "60")))
    st.ShardedWriter.write = write
    from stages.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")


def start_paused(project, *args):
    mark = project / "paused.mark"
    proc = subprocess.Popen([sys.executable, "-c", PAUSING, *args], cwd=project, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FUSE_TEST_MARK": str(mark)}, start_new_session=True)
    deadline = time.time() + 120
    while not mark.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "merge never started"
        time.sleep(0.05)
    return proc


def test_kill_9_during_merge_then_resume_gives_identical_outputs(project, tmp_path_factory):
    # the reference: an uninterrupted run elsewhere
    ref = tmp_path_factory.mktemp("ref")
    for name in ("base", "adapter"):
        (ref / name).symlink_to((project / name).resolve())
    write_pipeline(ref)
    fuse("run", "pipeline.yaml", cwd=ref)

    proc = start_paused(project, "run", "pipeline.yaml")
    assert list((project / "runs/tiny").glob(".tmp-merge-*"))  # half-written output exists, in a temp dir only
    live = json.loads(fuse("status", "pipeline.yaml", "--json", cwd=project).stdout)
    assert live[1]["state"] == "running" and live[1]["why"].startswith("running now (pid "), live[1]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (project / "runs/tiny/merge").exists()
    assert manifest(project)["stages"]["merge"]["status"] == "running"
    status = json.loads(fuse("status", "pipeline.yaml", "--json", cwd=project).stdout)
    assert status[1]["state"] == "interrupted"

    r = fuse("run", "pipeline.yaml", cwd=project)
    assert "[validate] fresh" in r.stderr and "[merge] running: interrupted" in r.stderr
    assert not list((project / "runs/tiny").glob(".tmp-*"))
    assert {k: v[0] for k, v in snapshot(project / "runs/tiny/merge").items()} == \
        {k: v[0] for k, v in snapshot(ref / "runs/tiny/merge").items()}
    assert {k: v[0] for k, v in snapshot(project / "dist").items()} == {k: v[0] for k, v in snapshot(ref / "dist").items()}


def test_second_run_on_a_locked_workdir_stops_with_a_clear_message(project):
    proc = start_paused(project, "run", "pipeline.yaml")
    try:
        r = fuse("run", "pipeline.yaml", cwd=project, check=False)
        assert r.returncode == 1 and "F401" in r.stderr and "another Fuse run" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    fuse("run", "pipeline.yaml", cwd=project)  # the lock died with the process


def test_lock_is_held_while_running(project):
    (project / "runs/tiny").mkdir(parents=True)
    fd = os.open(project / "runs/tiny/.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        r = fuse("run", "pipeline.yaml", cwd=project, check=False)
        assert r.returncode == 1 and "F401" in r.stderr
    finally:
        os.close(fd)


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_not_enough_space_is_caught_before_the_merge(project, small_tmpfs):
    write_pipeline(project, workdir=str(small_tmpfs / "w"))
    r = fuse("run", "pipeline.yaml", cwd=project, check=False)
    assert r.returncode == 1 and "F402" in r.stderr and str(small_tmpfs) in r.stderr and "needs about" in r.stderr
    assert not (small_tmpfs / "w/merge").exists()


DISK_LIES = textwrap.dedent("""
    import shutil, sys
    from collections import namedtuple
    shutil.disk_usage = lambda p: namedtuple("u", "total used free")(10**12, 0, 10**12)  # the pre-check is fooled
    from stages.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")


def test_disk_full_mid_stage_is_clear_leaves_nothing_and_resumes(project, small_tmpfs):
    write_pipeline(project, workdir=str(small_tmpfs / "w"))
    r = subprocess.run([sys.executable, "-c", DISK_LIES, "run", "pipeline.yaml"], cwd=project, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "F402" in r.stderr and "disk full" in r.stderr and str(small_tmpfs) in r.stderr, r.stderr
    w = small_tmpfs / "w"
    assert not (w / "merge").exists() and not list(w.glob(".tmp-*"))  # no partial output visible
    assert json.loads((w / "manifest.json").read_text())["stages"]["merge"]["status"] == "failed"
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_tmpfs)], check=True)
    r = fuse("run", "pipeline.yaml", cwd=project)
    assert "[validate] fresh" in r.stderr and "[merge] running: failed last time" in r.stderr
    assert fuse("verify", str(w), cwd=project).returncode == 0


def test_no_secret_from_env_reaches_manifest_or_logs(project):
    """A secret may not flow into a path or a published field: refused before anything runs (F113, more in
    tests/test_secrets.py); the run without it prints and writes the environment's secret nowhere."""
    secret = "hf_SECRET_a8f7d6e5c4b3"
    write_pipeline(project, text=PIPELINE.replace("path: dist", "path: '${{env.FUSE_TEST_TOKEN}}-dist'"))
    r0 = fuse("run", "pipeline.yaml", cwd=project, env={"FUSE_TEST_TOKEN": secret}, check=False)
    assert r0.returncode == 2 and "F113" in r0.stderr and "FUSE_TEST_TOKEN" in r0.stderr
    assert not (project / "runs").exists() and not list(project.glob("*-dist"))
    # a card template that (by mistake) holds the secret: the published card and provenance do not
    (project / "card.md").write_text(f"## Notes\n\nTrained with {secret} (oops).\n")
    write_pipeline(project, text=PIPELINE.replace("path: dist", "path: dist, card: card.md"))
    r = fuse("run", "pipeline.yaml", cwd=project, env={"FUSE_TEST_TOKEN": secret})
    assert "Trained with *** (oops)." in (project / "dist/README.md").read_text()
    r1 = fuse("run", "pipeline.yaml", "--set", f"merge.dtype={secret}", cwd=project, env={"FUSE_TEST_TOKEN": secret},
              check=False)
    assert r1.returncode == 2 and "F109" in r1.stderr and "${env.FUSE_TEST_TOKEN}" in r1.stderr
    r2 = fuse("show", "pipeline.yaml", cwd=project, env={"FUSE_TEST_TOKEN": secret})
    r3 = fuse("status", "pipeline.yaml", cwd=project, env={"FUSE_TEST_TOKEN": secret})
    workdir_text = "".join(p.read_text(errors="replace") for d in ("runs/tiny", "dist") for p in (project / d).rglob("*")
                           if p.is_file() and p.suffix in (".json", ".md", "") and p.stat().st_size < 10**6)
    for text in (r0.stderr, r.stderr, r.stdout, r1.stderr, r2.stdout, r2.stderr, r3.stdout, workdir_text):
        assert secret not in text  # never written down or printed


def test_from_and_only_resume_a_part(project):
    fuse("run", "pipeline.yaml", cwd=project)
    r = fuse("run", "pipeline.yaml", "--only", "publish", "--force", cwd=project)
    assert "[publish] running: forced" in r.stderr and "[merge]" not in r.stderr
    assert "0 copied" in r.stderr  # re-publishing an unchanged model copies nothing
    r = fuse("run", "pipeline.yaml", "--from", "merge", cwd=project)
    assert "[validate]" not in r.stderr and "[merge] fresh" in r.stderr


def test_until_stops_after_a_stage_and_from_goes_on_from_there(project):
    """The split-runner pattern: --until merge on one machine, --from publish on the next."""
    r = fuse("run", "pipeline.yaml", "--until", "merge", cwd=project)
    assert "[merge] running" in r.stderr and "[publish]" not in r.stderr and "2 stages, 2 ran" in r.stderr
    assert not (project / "dist").exists()
    r = fuse("run", "pipeline.yaml", "--from", "merge", "--until", "merge", cwd=project)
    assert "[merge] fresh" in r.stderr and "[publish]" not in r.stderr and "[validate]" not in r.stderr
    r = fuse("run", "pipeline.yaml", "--from", "publish", cwd=project)
    assert "[publish] running" in r.stderr and "1 stages, 1 ran" in r.stderr


@pytest.mark.parametrize("args, says", [
    (["--until", "nope"], "--until nope: no stage has that id"),
    (["--from", "publish", "--until", "merge"], "--until merge comes before --from publish"),
    (["--only", "merge", "--until", "merge"], "--only runs one stage"),
])
def test_until_that_selects_nothing_is_F108(project, args, says):
    r = fuse("run", "pipeline.yaml", *args, cwd=project, check=False)
    assert r.returncode == 2 and "F108" in r.stderr and says in r.stderr and "Traceback" not in r.stderr
    assert not (project / "runs").exists()


def test_validate_reruns_when_the_merge_method_it_plans_for_changes(project):
    """validate plans the merge that merge will do: merge's method is part of its fingerprint, merge's
    dtype is not (the plan does not depend on it)."""
    fuse("run", "pipeline.yaml", cwd=project)
    r = fuse("run", "pipeline.yaml", "--set", "merge.dtype=float16", cwd=project)
    assert "[validate] fresh" in r.stderr and "[merge] running" in r.stderr
    r = fuse("run", "pipeline.yaml", "--set", "merge.dtype=float16", "--set", "merge.method=ties", cwd=project,
             check=False)
    assert "[validate] running: parameter merge.method changed ('linear' → 'ties')" in r.stderr, r.stderr
    assert r.returncode != 0 and "F104" in r.stderr and "needs density" in r.stderr  # caught before merging
    assert "[merge]" not in r.stderr


def test_a_missing_extra_stops_the_run_before_any_stage_and_only_where_a_stage_will_run(project, monkeypatch):
    """export needs onnxscript (fuse-llm[export]): without it the run stops before validate and merge,
    naming the stage, the package and the pip command; once export is fresh, nothing needs it."""
    import stages
    from stages.findings import FuseError

    write_pipeline(project, text=PIPELINE + "  - export: {{with_past: false, optimize: false}}\n")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # what import does with it: ImportError
    with pytest.raises(FuseError) as e:
        stages.run(project / "pipeline.yaml", log=lambda *a: None)
    f = e.value.finding
    assert f.code == "F602" and f.key == "export" and f.line == 10, f
    assert "onnxscript (extra 'export')" in f.message and "'onnxscript>=0.5'" in f.fix and "fuse-llm" not in f.fix
    assert not (project / "runs/tiny/merge").exists() and not (project / "runs/tiny/validate").exists()
    assert stages.run(project / "pipeline.yaml", until="merge", log=lambda *a: None) == \
        {"validate": "done", "merge": "done"}  # the stages before it run here (split across machines)

    monkeypatch.delitem(sys.modules, "onnxscript")
    assert stages.run(project / "pipeline.yaml", log=lambda *a: None)["export"] == "done"
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert set(stages.run(project / "pipeline.yaml", log=lambda *a: None).values()) == {"skipped"}
    with pytest.raises(FuseError):
        stages.run(project / "pipeline.yaml", only="export", force=True, log=lambda *a: None)


def test_editing_the_card_template_reruns_publish(project):
    """A file a parameter names (the card template) is part of the fingerprint, by content."""
    (project / "card.md").write_text("## Intended use\n\nSupport answers.\n")
    write_pipeline(project, text=PIPELINE.replace("path: dist", "path: dist, card: card.md"))
    fuse("run", "pipeline.yaml", cwd=project)
    assert "Support answers." in (project / "dist/README.md").read_text()
    assert "0 ran" in fuse("run", "pipeline.yaml", cwd=project).stderr
    (project / "card.md").write_text("## Intended use\n\nInternal evaluation only.\n")
    r = fuse("run", "pipeline.yaml", cwd=project)
    assert "[merge] fresh" in r.stderr and "[publish] running: a file named by a parameter changed" in r.stderr
    assert "Internal evaluation only." in (project / "dist/README.md").read_text()


def test_a_dangling_link_in_the_base_is_a_finding_not_a_traceback(project, tmp_path):
    base = tmp_path / "linked-base"
    base.mkdir()
    for f in (project / "base").resolve().iterdir():
        (base / f.name).symlink_to(f)
    (base / "extra.json").symlink_to(tmp_path / "gone.json")  # points nowhere
    write_pipeline(project, text=PIPELINE.replace("base: base", f"base: {base}"))
    r = fuse("run", "pipeline.yaml", cwd=project, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "F205" in r.stderr and "extra.json" in r.stderr, r.stderr


# --------------------------------------------------------------------------- issue 12: ownership, I/O errors


def one_finding(r, code: str, exit_code: int) -> str:
    assert r.returncode == exit_code and "Traceback" not in r.stderr and "bug in Fuse" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error ")]
    assert len(errors) == 1 and errors[0].startswith(f"error {code} "), r.stderr
    return errors[0]


def test_a_user_folder_named_like_a_stage_is_never_deleted(project):
    """out/merge/train.py where merge never ran in out: F408 (exit 2) before any stage, the file stays."""
    write_pipeline(project, workdir="out")
    (project / "out/merge").mkdir(parents=True)
    (project / "out/merge/train.py").write_text("print('mine')\n")
    line = one_finding(fuse("run", "pipeline.yaml", cwd=project, check=False), "F408", 2)
    assert str(project / "out/merge") in line and "was not written by Fuse" in line
    assert (project / "out/merge/train.py").read_text() == "print('mine')\n"
    assert not (project / "out/manifest.json").exists()  # no stage began


def test_a_user_file_where_fuse_keeps_its_lock_is_not_overwritten(project):
    write_pipeline(project, workdir="out")
    (project / "out").mkdir()
    (project / "out/.lock").write_text("my notes\n")
    line = one_finding(fuse("run", "pipeline.yaml", cwd=project, check=False), "F408", 2)
    assert str(project / "out/.lock") in line
    assert (project / "out/.lock").read_text() == "my notes\n"


def test_user_temp_entries_survive_and_fuse_temp_files_do_not(project):
    w = project / "runs/tiny"
    users = [".tmp-notes/a.txt", ".tmp-merge-merge-0badc0de/x", ".trash-merge-0badc0de/y", ".manifest.json.mine.tmp"]
    for rel in users:
        (w / rel).parent.mkdir(parents=True, exist_ok=True)
        (w / rel).write_text(rel)
    fuse("run", "pipeline.yaml", cwd=project)
    (w / ".manifest.json.0a1b2c3d.tmp").write_text('{"schema_version": 1, "sta')  # a manifest write killed
    r = fuse("run", "pipeline.yaml", cwd=project)
    assert "0 ran" in r.stderr and not (w / ".manifest.json.0a1b2c3d.tmp").exists()
    assert all((w / rel).read_text() == rel for rel in users)

    # a file added to Fuse's own output: verify names it, and a run that would replace the output refuses
    (w / "merge/notes.txt").write_text("eval notes")
    r = fuse("verify", str(w), cwd=project, check=False)
    assert r.returncode == 1 and "merge/notes.txt: extra file, not in the manifest" in r.stderr
    line = one_finding(fuse("run", "pipeline.yaml", cwd=project, check=False), "F408", 2)
    assert "merge/notes.txt" in line
    assert (w / "merge/notes.txt").read_text() == "eval notes"


def test_a_read_only_workdir_is_one_finding(project, tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    try:
        write_pipeline(project, workdir=str(mnt / "w"))
        line = one_finding(fuse("run", "pipeline.yaml", cwd=project, check=False), "F409", 1)
        assert str(mnt / "w") in line and "read-only file system" in line
        assert fuse("status", "pipeline.yaml", cwd=project).returncode == 0  # status writes nothing
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


FAILING_IO = textwrap.dedent("""
    import errno, os, sys
    from pathlib import Path
    from stages import manifest as mf
    kind, where = os.environ["FUSE_TEST_FAIL"].split(":")
    code = {"ENOSPC": errno.ENOSPC, "EACCES": errno.EACCES, "ENAMETOOLONG": errno.ENAMETOOLONG}[kind]
    real_write, real_mkdir = mf.atomic_write, Path.mkdir
    def atomic_write(path, data):
        if where == "manifest" and Path(path).name == "manifest.json" and b'"running"' in data:
            raise OSError(code, os.strerror(code), str(path))
        return real_write(path, data)
    def mkdir(self, *a, **kw):
        if where == "tmp" and self.name.startswith(".tmp-merge-"):
            raise OSError(code, os.strerror(code), str(self))
        return real_mkdir(self, *a, **kw)
    mf.atomic_write, Path.mkdir = atomic_write, mkdir
    from stages.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("fail, code, says", [
    ("ENOSPC:manifest", "F402", "disk full writing"),  # ENOSPC at stage start: the "running" record
    ("EACCES:tmp", "F409", "not writable (permission denied)"),  # the stage's temp dir
    ("ENAMETOOLONG:tmp", "F409", "name too long"),
])
def test_an_os_error_of_the_runner_is_one_finding_naming_the_path(project, fail, code, says):
    r = subprocess.run([sys.executable, "-c", FAILING_IO, "run", "pipeline.yaml"], cwd=project, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "FUSE_TEST_FAIL": fail, "HF_HUB_OFFLINE": "1"})
    line = one_finding(r, code, 1)
    assert says in line and str(project / "runs/tiny") in line
    assert not list((project / "runs/tiny").glob(".tmp-*"))
    r = fuse("run", "pipeline.yaml", cwd=project)  # the machine fixed: it resumes
    first = "validate" if fail.endswith("manifest") else "merge"  # the stage that could not start
    assert f"[{first}] running" in r.stderr and ("[validate] fresh" in r.stderr) == (first == "merge")


def test_a_sparse_1_tib_adapter_is_refused_before_it_is_hashed(project, tmp_path):
    """Its header claims far less than the file holds: refused by the header check, not after hashing 1 TiB."""
    adapter = tmp_path / "sparse-adapter"
    adapter.mkdir()
    real = (project / "adapter").resolve()
    for f in real.iterdir():
        (adapter / f.name).write_bytes(f.read_bytes())
    weights = adapter / "adapter_model.safetensors"
    os.truncate(weights, 1 << 40)
    (project / "adapter").unlink()
    (project / "adapter").symlink_to(adapter)
    r = fuse("run", "pipeline.yaml", cwd=project, check=False, timeout=120)  # hashing 1 TiB would not finish
    line = one_finding(r, "F206", 2)
    assert "adapter_model.safetensors" in line
    assert not (project / "runs/tiny/.fuse-statcache.json").exists() or \
        "adapter_model" not in (project / "runs/tiny/.fuse-statcache.json").read_text()


OLD_MAIN = "e8e7d37"  # main before the ownership rule (issue 12): workdirs it wrote stay Fuse's


def test_a_workdir_written_before_the_ownership_rule_is_still_fuses(project, tmp_path):
    repo = Path(__file__).resolve().parents[1]
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(repo), "archive", OLD_MAIN, "stages"], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"no git history with {OLD_MAIN} here")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    r = fuse("run", "pipeline.yaml", cwd=project, env={"PYTHONPATH": str(old)})
    assert "3 ran" in r.stderr
    w = project / "runs/tiny"
    assert "temp" not in manifest(project)["stages"]["merge"]  # really the old writer
    r = fuse("run", "pipeline.yaml", cwd=project)
    assert "0 ran, 3 fresh and skipped" in r.stderr
    # the old runner's killed merge: a running record without "temp" and its temp dir
    m = manifest(project)
    m["stages"]["merge"] = {k: v for k, v in m["stages"]["merge"].items() if k not in ("output_dir", "outputs")}
    m["stages"]["merge"]["status"] = "running"
    (w / "manifest.json").write_text(json.dumps(m))
    (w / ".tmp-merge-merge-1234abcd").mkdir()
    (w / ".tmp-merge-merge-1234abcd/model.safetensors").write_bytes(b"half")
    r = fuse("run", "pipeline.yaml", cwd=project)
    assert "[merge] running: interrupted" in r.stderr and not (w / ".tmp-merge-merge-1234abcd").exists()
    assert fuse("verify", str(w), cwd=project).returncode == 0
    # the old runner's failed re-run of merge: a failed record without output_dir, the earlier output in place
    m = manifest(project)
    m["stages"]["merge"] = {"stage": "merge", "status": "failed", "error": {"code": "F406", "message": "x"}}
    (w / "manifest.json").write_text(json.dumps(m))
    r = fuse("run", "pipeline.yaml", cwd=project)
    assert "[merge] running: failed last time" in r.stderr and "F408" not in r.stderr
