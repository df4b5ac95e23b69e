"""Kill tests: a run killed at any stage boundary, inside the merge writer, inside a manifest write or
inside the dir publisher, then run again, ends byte-identical to a run never interrupted: every
output file of every stage, every published file (provenance included), and no temp file left.

Kills are deterministic: ``FUSE_TEST_KILL_AT=NAME[@N]`` makes the process ``os._exit(137)`` the N-th
time it reaches the named point (``stages.manifest.crash_point``); the merge writer is killed by a
wrapper that ends the process after its N-th tensor. A small matrix runs by default; ``FUSE_SLOW=1``
runs every point.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cli import fuse
from factory import make_lora_adapter, make_tiny_model

SLOW = os.environ.get("FUSE_SLOW") == "1"

PIPELINE = """\
version: 1
name: tiny
base: base
adapter: adapter
workdir: runs/tiny
stages:
  - validate
  - merge: {dtype: bfloat16, max_shard_size: 40KB}
  - check: {probes: 2}
  - publish: {to: dir, path: dist}
"""
STAGES = ("validate", "merge", "check", "publish")

# a kill inside the merge writer: after its N-th tensor, as kill -9 would (no finally, no cleanup)
KILL_IN_WRITER = textwrap.dedent("""
    import os, sys
    from stages.io import safetensors as st
    n, real = int(os.environ["FUSE_TEST_KILL_WRITE"]), st.ShardedWriter.write
    count = [0]
    def write(self, *a, **kw):
        real(self, *a, **kw)
        count[0] += 1
        if count[0] == n:
            os._exit(137)
    st.ShardedWriter.write = write
    from stages.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")

# (kill point, how many manifest/stage steps of the first run it lets through, re-run after a full run?)
DEFAULT = ["stage-output:merge", "writer@3", "atomic-write:manifest.json@4"]
FULL = ([f"{where}:{sid}" for sid in STAGES for where in ("stage-start", "stage-output", "stage-done")]
        + ["swap:merge", "writer@1", "writer@5"]
        + [f"atomic-write:manifest.json@{n}" for n in range(1, 9)]
        + ["atomic-write:.fuse-statcache.json", "dir:journal", "dir:mid-copy", "dir:pushed", "dir:seal"])
POINTS = FULL if SLOW else DEFAULT


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-inputs")
    make_tiny_model("llama", root / "base", dtype=__import__("torch").bfloat16)
    make_lora_adapter(root / "base", root / "adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    return root


def project(root: Path, inputs: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("base", "adapter"):
        (root / name).symlink_to(inputs / name)
    (root / "pipeline.yaml").write_text(PIPELINE)
    return root


def outputs(root: Path) -> dict:
    """relpath -> sha256 of every stage output (the workdir's stage directories) and published file."""
    out = {}
    workdir = root / "runs/tiny"
    tops = [d for d in sorted(workdir.iterdir()) if d.is_dir() and not d.name.startswith(".") and d.name != "logs"]
    for top in tops + [root / "dist"]:
        for p in sorted(top.rglob("*")):
            if p.is_file():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(root: Path) -> list[str]:
    found = []
    for top in (root / "runs/tiny", root / "dist"):
        for p in top.rglob("*"):
            if p.name.startswith((".tmp-", ".trash-")) or p.name.endswith(".tmp"):
                found.append(str(p.relative_to(root)))
    return found


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """One path for the reference and every case: validate's report names the workdir's disk."""
    return tmp_path_factory.mktemp("kill") / "p"


@pytest.fixture(scope="module")
def reference(inputs, place):
    root = project(place, inputs)
    fuse("run", "pipeline.yaml", cwd=root)
    ref = outputs(root)
    shutil.rmtree(root)
    return ref


@pytest.fixture
def root(place, inputs, reference):
    shutil.rmtree(place, ignore_errors=True)
    yield project(place, inputs)
    shutil.rmtree(place, ignore_errors=True)


def run_killed(root: Path, point: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if point.startswith("writer@"):
        env["FUSE_TEST_KILL_WRITE"] = point.split("@")[1]
        cmd = [sys.executable, "-c", KILL_IN_WRITER, "run", "pipeline.yaml", *extra]
    else:
        env["FUSE_TEST_KILL_AT"] = point
        cmd = [sys.executable, "-m", "stages", "run", "pipeline.yaml", *extra]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("point", POINTS)
def test_a_killed_run_resumes_byte_identical(point, root, reference):
    if point.startswith("swap:"):  # a swap happens when an output is replaced: re-run the stage over its own
        fuse("run", "pipeline.yaml", cwd=root)
        r = run_killed(root, point, "--only", point.split(":")[1], "--force")
        assert r.returncode == 137, r.stderr[-2000:]
        assert not (root / "runs/tiny" / point.split(":")[1]).exists()  # between the renames: old in the trash
    else:
        r = run_killed(root, point)
        assert r.returncode == 137, f"{point} was never reached:\n{r.stderr[-2000:]}"
    r = fuse("run", "pipeline.yaml", cwd=root)
    assert "Traceback" not in r.stderr
    assert outputs(root) == reference
    assert leftovers(root) == []
    assert fuse("verify", "runs/tiny", cwd=root).returncode == 0
    if SLOW:  # and the resumed workdir is an ordinary one
        assert "0 ran, 4 fresh and skipped" in fuse("run", "pipeline.yaml", cwd=root).stderr


def test_a_kill_in_a_manifest_write_leaves_the_old_manifest_and_a_temp_file_the_next_run_removes(root):
    r = run_killed(root, "atomic-write:manifest.json@2")  # validate's "done" record, fsync'd but not renamed
    assert r.returncode == 137
    w = root / "runs/tiny"
    assert [p.name for p in w.glob(".manifest.json.*.tmp")]  # the killed write's temp file
    assert json.loads((w / "manifest.json").read_text())["stages"]["validate"]["status"] == "running"
    r = fuse("run", "pipeline.yaml", "--until", "validate", cwd=root)
    assert "[validate] running: interrupted" in r.stderr and not list(w.glob(".manifest.json.*.tmp"))


# ---------------------------------------------------------------------------------------------------
# quantize and export: the same promise at their boundaries, on test_reproducible's pipeline (a trained
# tiny Llama with a tokenizer, so the gates mean something). Minutes per case on 2 cores: FUSE_SLOW=1.

HEAVY = [f"{where}:{sid}" for sid in ("quantize", "export") for where in ("stage-start", "stage-output", "stage-done")]


@pytest.fixture(scope="module")
def heavy(tmp_path_factory):
    import test_reproducible as rp

    if not (rp.HAVE_GPTQ and rp.HAVE_ONNX):
        pytest.skip("quantize and export need gptqmodel, optimum, onnx, onnxscript, onnxruntime")
    src = rp.make_project(tmp_path_factory.mktemp("heavy") / "src", quantize=True)
    ref = tmp_path_factory.mktemp("heavy-ref") / "p"
    shutil.copytree(src, ref, symlinks=True)
    fuse("run", "pipeline.yaml", cwd=ref)
    return src, outputs(ref)


@pytest.mark.skipif(not SLOW, reason="FUSE_SLOW=1 runs the quantize/export kill matrix (minutes per case)")
@pytest.mark.parametrize("point", HEAVY)
def test_a_run_killed_at_a_quantize_or_export_boundary_resumes_byte_identical(point, heavy, tmp_path):
    src, reference = heavy
    root = tmp_path / "p"  # another path than the reference's: stage outputs name no local path
    shutil.copytree(src, root, symlinks=True)
    r = run_killed(root, point)
    assert r.returncode == 137, f"{point} was never reached:\n{r.stderr[-2000:]}"
    r = fuse("run", "pipeline.yaml", cwd=root)
    assert "Traceback" not in r.stderr
    assert outputs(root) == reference
    assert leftovers(root) == []
    assert fuse("verify", "runs/tiny", cwd=root).returncode == 0


def kill_when_written(root: Path, sid: str, pattern: str, timeout: float = 900) -> int:
    """Run the pipeline and SIGKILL it (as kill -9) the moment a file matching ``pattern`` appears in
    stage ``sid``'s temp output: inside the writer (GPTQModel's save, torch.onnx's), not at a boundary."""
    import glob
    import signal
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "stages", "run", "pipeline.yaml"], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if glob.glob(str(root / "runs/tiny" / f".tmp-{sid}-*" / "**" / pattern), recursive=True):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.skipif(not SLOW, reason="FUSE_SLOW=1 runs the quantize/export kill matrix (minutes per case)")
@pytest.mark.parametrize("sid,pattern", [("quantize", "*.safetensors"), ("export", "model.onnx*")])
def test_a_run_killed_while_quantize_or_export_writes_resumes_byte_identical(sid, pattern, heavy, tmp_path):
    src, reference = heavy
    root = tmp_path / "p"
    shutil.copytree(src, root, symlinks=True)
    assert kill_when_written(root, sid, pattern) == -9, f"{sid} never wrote {pattern}"
    r = fuse("run", "pipeline.yaml", cwd=root)
    assert "Traceback" not in r.stderr
    assert outputs(root) == reference
    assert leftovers(root) == []
