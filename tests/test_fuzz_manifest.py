"""Fuzzing the manifest and stat-cache loaders (issue 12): whatever JSON lies in ``manifest.json``
or ``.fuse-statcache.json``, Fuse answers with F404 (the manifest) or discards it (the cache), and
every reader of a manifest that loads (verify, show, ownership, leftovers) keeps to findings too.

In-process with hypothesis (random JSON shapes, and a valid manifest with one part replaced,
deleted or retyped), then a few CLI runs of ``status``/``run``/``verify``/``show`` in subprocesses:
exit 0/1/2, never a traceback or "bug in Fuse". Counts: small by default, large with FUSE_SLOW=1;
the seed is fixed (FUSE_FUZZ_SEED to change it) and printed, so a failure reproduces.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import subprocess
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from stages import manifest as mf
from stages.findings import FuseError

SLOW = os.environ.get("FUSE_SLOW") == "1"
SEED = int(os.environ.get("FUSE_FUZZ_SEED", "1205"))
print(f"test_fuzz_manifest: hypothesis seed {SEED} (FUSE_FUZZ_SEED), {'full' if SLOW else 'reduced'} run")

SETTINGS = settings(max_examples=3000 if SLOW else 300, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
           | st.text(max_size=20) | st.sampled_from(["1", "done", "running", "failed", "merge", "../x", "/", "a" * 64,
                                                     ".tmp-merge-merge-0a1b2c3d", ""]))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=10), c,
                                                                                       max_size=5), max_leaves=30)
SHA = "0" * 64


def template() -> dict:
    """A manifest of every field the readers look at, as this Fuse writes it."""
    rec = lambda stage, status: {  # noqa: E731
        "stage": stage, "status": status, "version": 1, "started_at": "2026-01-01T00:00:00Z",
        "finished_at": "2026-01-01T00:00:01Z", "seconds": 1.5, "params": {"dtype": "bfloat16"},
        "fingerprint": "sha256:" + SHA, "output_dir": stage, "output_digest": "sha256:" + SHA,
        "outputs": [{"path": "config.json", "size": 2, "sha256": SHA, "mtime_ns": 1, "inode": 2},
                    {"path": "sub/w.safetensors", "size": 0, "sha256": SHA}],
        "fingerprint_inputs": {"stage": stage, "version": 1, "params": {"dtype": "bfloat16"}, "libraries": {"x": "1"},
                               "inputs": {"base": {"kind": "local", "digest": "sha256:" + SHA},
                                          "adapters": [{"digest": "sha256:" + SHA, "weight": 1.0}],
                                          "upstream": {"id": "merge", "digest": None}, "stage_params": {}}},
        "sources": {"base": {"name": "base", "kind": "local"}, "adapters": ["/a"]},
        "metrics": {"m": 1}, "warnings": [{"code": "F000", "message": "w"}],
        "error": {"code": "F406", "message": "boom"}, "temp": [".tmp-merge-merge-0a1b2c3d"]}
    return {"schema_version": 1, "run_id": "r", "previous_run_id": None, "started_at": "t",
            "tool": {"name": "fuse-llm", "version": "0"}, "python": "3", "platform": "linux",
            "libraries": {"torch": "2"}, "ci": {}, "pipeline": {"path": "/p.yaml", "sha256": SHA, "resolved": {}},
            "stages": {"validate": rec("validate", "done"), "merge": rec("merge", "running"),
                       "publish": dict(rec("publish", "failed"), external={"root": "/nonexistent/dist",
                                                                          "files": []})}}


def paths_of(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths_of(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths_of(v, prefix + (i,))


@st.composite
def mutated_manifests(draw):
    """The template with 1-3 parts replaced by random JSON, deleted, or turned to another type."""
    data = template()
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in paths_of(data) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    return data


def write_workdir(root: Path, data, *, as_text: str | None = None) -> Path:
    w = root / "w"
    w.mkdir()
    (w / "merge").mkdir()
    (w / "merge" / "config.json").write_text("{}")
    (w / "validate").mkdir()
    (w / "validate" / "sub").write_text("a file where the manifest may expect a directory")
    (w / mf.MANIFEST).write_text(as_text if as_text is not None else json.dumps(data))
    return w


def read_everything(w: Path) -> None:
    """Every reader of a loaded manifest, as the CLI would call it: only FuseError may come out."""
    from stages import verify
    from stages.__main__ import cmd_show

    m = mf.Manifest.load(w)
    for sid in list(m.stages):
        m.verify_outputs(sid)
        m.owns_output(sid)
        m.extra_files(sid)
    m.leftovers()
    verify(w)
    with contextlib.redirect_stdout(io.StringIO()):
        cmd_show(Namespace(target=str(w), json=False))
        cmd_show(Namespace(target=str(w), json=True))


def load_or_f404(data=None, text=None):
    with tempfile.TemporaryDirectory() as d:
        w = write_workdir(Path(d), data, as_text=text)
        try:
            read_everything(w)
        except FuseError as e:
            assert e.finding.code == "F404", e.finding
            assert "move the workdir aside" in e.finding.fix


@seed(SEED)
@SETTINGS
@given(json_values)
def test_any_json_as_manifest_loads_or_is_F404(data):
    load_or_f404(data)


@seed(SEED)
@SETTINGS
@given(mutated_manifests())
def test_a_manifest_with_parts_replaced_loads_or_is_F404(data):
    load_or_f404(data)


@seed(SEED)
@settings(SETTINGS, max_examples=300 if SLOW else 50)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_as_manifest_are_F404(raw):
    load_or_f404(text=raw.decode("utf-8", "replace"))


def test_the_template_itself_loads():
    load_or_f404(template())
    with tempfile.TemporaryDirectory() as d:
        w = write_workdir(Path(d), template())
        assert set(mf.Manifest.load(w).stages) == {"validate", "merge", "publish"}


@seed(SEED)
@SETTINGS
@given(json_values | st.dictionaries(st.text(max_size=30), json_values | st.lists(scalars, min_size=4, max_size=4)))
def test_any_json_as_stat_cache_is_discarded_or_kept_only_where_well_formed(data):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / mf.STAT_CACHE
        p.write_text(json.dumps(data))
        cache = mf.StatCache(p)
        assert all(mf._cache_entry_ok(k, v) for k, v in cache.entries.items())
        f = Path(d) / "f"
        f.write_bytes(b"x")
        cache.sha256(f)  # usable afterwards
        cache.save()


# --------------------------------------------------------------------------- the CLI, in subprocesses

PIPELINE = "version: 1\nname: fz\nbase: base\nadapter: adapter\nworkdir: w\nstages: [validate, merge]\n"


FIXED = [{"schema_version": "1", "stages": {}}, [], {"schema_version": 1, "stages": {"merge": 5}}]


def _limit_memory():
    """Bounded memory: an 8 GiB address space (torch's import reserves ~3 GiB of it)."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


def cli(command: str, data) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for sub in ("base", "adapter", "w"):
            (root / sub).mkdir()
        (root / "pipeline.yaml").write_text(PIPELINE)
        (root / "w" / mf.MANIFEST).write_text(json.dumps(data))
        args = {"status": ["status", "pipeline.yaml"], "run": ["run", "pipeline.yaml"],
                "verify": ["verify", "w"], "show": ["show", "w"]}[command]
        r = subprocess.run([sys.executable, "-m", "stages", *args], cwd=root, capture_output=True, text=True,
                           timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"}, preexec_fn=_limit_memory)
    assert r.returncode in (0, 1, 2), (data, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "bug in Fuse" not in r.stderr, (data, r.stderr[-2000:])
    if r.returncode:
        assert [ln for ln in r.stderr.splitlines() if ln.startswith("error ")], r.stderr[-2000:]


@pytest.mark.parametrize("command", ["status", "run", "verify", "show"])
@seed(SEED)
@settings(SETTINGS, max_examples=12 if SLOW else 2)
@given(st.sampled_from(FIXED) | mutated_manifests())
def test_the_cli_over_fuzzed_manifests_exits_0_1_or_2_without_a_traceback(command, data):
    cli(command, data)
