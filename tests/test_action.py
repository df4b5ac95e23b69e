"""The GitHub Action: action.yml's contract, its shell steps run locally on a tiny model
(tests/actionsim.py), and the reporting module behind its summary and outputs.

The whole action, setup and install included, runs under act in ``.ci/lint-actions``.
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from actionsim import ROOT, parse_output_file, run_action
from factory import make_lora_adapter, make_tiny_model
from stages import report

WORKFLOW_FILES = sorted([*(ROOT / ".github/workflows").glob("*.yml"), *(ROOT / "examples/workflows").glob("*.yml")])
ACTION_FILES = [ROOT / "action.yml", *sorted((ROOT / ".ci/act/stubs").glob("*/action.yml"))]
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")

PIPELINE = """\
version: 1
name: tiny-action
base: base
adapter: adapter
workdir: runs/${name}
stages:
  - validate
  - merge: {dtype: bfloat16}
  - publish: {to: dir, path: "dist/${name}"}
"""
SECRET = "fuse-test-token-a1b2c3d4e5f6"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("action-inputs")
    make_tiny_model("llama", root / "base", dtype=torch.bfloat16)
    make_lora_adapter(root / "base", root / "adapter", target_modules=["q_proj", "v_proj"])
    return root


@pytest.fixture
def workspace(tmp_path, inputs):
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in ("base", "adapter"):
        (ws / name).symlink_to(inputs / name)
    (ws / "pipeline.yaml").write_text(PIPELINE)
    return ws


def _steps(doc: dict):
    if "runs" in doc:
        yield from doc["runs"].get("steps", [])
    for job in (doc.get("jobs") or {}).values():
        yield from job.get("steps", [])


def _uses(doc: dict):
    for step in _steps(doc):
        if "uses" in step:
            yield step["uses"]
    for job in (doc.get("jobs") or {}).values():
        if "uses" in job:
            yield job["uses"]


# --------------------------------------------------------------------------- contract


def test_inputs_and_outputs():
    spec = yaml.safe_load((ROOT / "action.yml").read_text())
    assert spec["runs"]["using"] == "composite"
    assert {"pipeline", "set", "from", "only", "python-version", "extras", "torch"} <= set(spec["inputs"])
    assert {"manifest", "model-dir", "published", "status"} <= set(spec["outputs"])
    docs = (ROOT / "docs/action.md").read_text()
    for name in [*spec["inputs"], *spec["outputs"]]:
        assert f"`{name}`" in docs, f"docs/action.md does not describe {name}"
    assert "cpu" in spec["inputs"]["torch"]["description"] and "preinstalled" in spec["inputs"]["torch"]["description"]


@pytest.mark.parametrize("path", ACTION_FILES + WORKFLOW_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_expression_is_pasted_into_a_script(path):
    """Inputs and event data reach the shell through env:, never as text inside run:."""
    for step in _steps(yaml.safe_load(path.read_text())):
        assert "${{" not in step.get("run", ""), f"{path.name}: {step.get('name') or step['run'][:60]}"


@pytest.mark.parametrize("path", ACTION_FILES + WORKFLOW_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_uses_is_pinned_to_a_full_commit_sha(path):
    for uses in _uses(yaml.safe_load(path.read_text())):
        assert uses.startswith("./") or PINNED.match(uses), f"{path.name}: {uses}"


def test_every_composite_run_step_names_its_shell():
    for path in ACTION_FILES:
        for step in yaml.safe_load(path.read_text())["runs"]["steps"]:
            assert "uses" in step or step.get("shell") == "bash", f"{path}: {step}"


def test_the_act_stubs_stand_in_for_the_pinned_actions():
    """.ci/lint-actions maps each pinned remote action of the self-test and the examples to a stub."""
    used = set()
    for path in (ROOT / "action.yml", ROOT / ".github/workflows/action-selftest.yml",
                 *sorted((ROOT / "examples/workflows").glob("*.yml"))):
        used |= {u.split("@")[0] for u in _uses(yaml.safe_load(path.read_text())) if not u.startswith("./")}
    stubs = {f"actions/{p.parent.name}" for p in (ROOT / ".ci/act/stubs").glob("*/action.yml")}
    stubs.add("fuse-llm/fuse")  # this checkout's action.yml
    assert used <= stubs, f"no act stub for {sorted(used - stubs)}"


def test_every_example_has_an_act_run_and_a_header_pipeline():
    """.ci/act-examples.py runs each example file with the pipeline of its header comment."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("act_examples", ROOT / ".ci/act-examples.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for path in sorted((ROOT / "examples/workflows").glob("*.yml")):
        assert path.stem in mod.EXAMPLES, f"{path.name}: no act run in .ci/act-examples.py"
        text = mod.header_pipeline(path, "0" * 40)
        doc = yaml.safe_load(text)
        assert doc["version"] == 1 and doc["stages"], path.name
        event = mod.EXAMPLES[path.stem][0]
        triggers = yaml.safe_load(path.read_text())[True]  # YAML 1.1 reads the key `on` as True
        assert event in triggers, f"{path.name}: act runs it on {event}, not one of its triggers"


# --------------------------------------------------------------------------- the action's steps


def test_run_sets_outputs_writes_the_summary_and_groups_the_log(workspace):
    r = run_action({"pipeline": "pipeline.yaml"}, cwd=workspace, env={"FUSE_TEST_TOKEN": SECRET})
    assert not r.failed, r.log
    out = r.outputs
    assert out["status"] == "success"
    assert Path(out["manifest"]) == workspace / "runs/tiny-action/manifest.json"
    assert Path(out["model-dir"]) == workspace / "runs/tiny-action/merge"
    dirs = json.loads(out["stage-dirs"])
    assert dirs == {sid: str(workspace / "runs/tiny-action" / sid) for sid in ("validate", "merge", "publish")}
    assert (Path(dirs["publish"]) / "SHA256SUMS").is_file()  # what was published: card, provenance, sums
    assert (Path(out["model-dir"]) / "config.json").is_file()
    assert json.loads(out["published"]) == [(workspace / "dist/tiny-action").as_uri()]
    assert "| `merge` | ✅ ran |" in r.summary and "3 stages: 3 ran, 0 fresh and skipped." in r.summary
    for sid in ("validate", "merge", "publish"):
        assert f"::group::[{sid}] running" in r.log
    assert r.log.count("::group::") == r.log.count("::endgroup::") == 3
    # the secret is masked before anything runs, and printed nowhere else
    assert r.log.index(f"::add-mask::{SECRET}") < r.log.index("::group::")
    assert r.log.count(SECRET) == 1

    again = run_action({"pipeline": "pipeline.yaml"}, cwd=workspace)
    assert again.outputs["status"] == "success"
    assert "3 stages: 0 ran, 3 fresh and skipped." in again.summary
    assert "::group::" not in again.log
    assert again.outputs["published"] == out["published"]


def test_a_broken_pipeline_file_is_annotated_on_its_line(workspace):
    text = PIPELINE.replace("{dtype: bfloat16}", "{dtyp: bfloat16}")
    (workspace / "pipeline.yaml").write_text(text)
    line = text.splitlines().index("  - merge: {dtyp: bfloat16}") + 1
    r = run_action({"pipeline": "pipeline.yaml"}, cwd=workspace)
    assert r.steps["run"]["outcome"] == "failure" and r.steps["run"]["outputs"]["exit-code"] == "2"
    assert re.search(rf"^::error file=pipeline\.yaml,line={line},title=F102 [^:]*::unknown key 'dtyp'", r.log, re.M), r.log
    assert r.outputs["status"] == "invalid"
    assert r.outputs["manifest"] == "" and json.loads(r.outputs["published"]) == []
    assert "**Pipeline error**" in r.summary and f"pipeline.yaml:{line}" in r.summary


def test_set_from_and_only_reach_the_cli(workspace):
    r = run_action({"pipeline": "pipeline.yaml", "only": "merge",
                    "set": "  merge.dtype=float16\n# a comment\n\nmerge.max_shard_size=1MB\n"}, cwd=workspace)
    assert r.outputs["status"] == "success", r.log
    m = json.loads(Path(r.outputs["manifest"]).read_text())
    assert set(m["stages"]) == {"merge"}
    assert m["stages"]["merge"]["params"]["dtype"] == "float16"
    assert m["stages"]["merge"]["params"]["max_shard_size"] == "1MB"
    assert "| `validate` | ➖ not run |" in r.summary

    r = run_action({"pipeline": "pipeline.yaml", "from": "publish", "set": "merge.dtype=float16"}, cwd=workspace)
    assert r.outputs["status"] == "success", r.log
    assert "[merge]" not in r.steps["run"]["log"] and "[publish] running" in r.steps["run"]["log"]


def test_a_failed_stage_is_reported_with_its_error(workspace):
    (workspace / "dist").mkdir()
    (workspace / "dist/tiny-action").write_text("a file where the publish target directory should be")
    r = run_action({"pipeline": "pipeline.yaml"}, cwd=workspace)
    assert r.outputs["status"] == "failed"
    assert r.steps["run"]["outputs"]["exit-code"] == "1"
    assert re.search(r"\| `publish` \| ❌ failed \| .*\*\*F5\d\d ", r.summary), r.summary
    assert r.outputs["model-dir"].endswith("/merge")  # the merge is done and usable
    assert json.loads(r.outputs["published"]) == []


def test_a_missing_extra_names_the_actions_extras_input(workspace, tmp_path):
    """Inside the action, F602's fix is the `extras` input (fuse-llm is not on PyPI), keeping the extras already set."""
    (workspace / "pipeline.yaml").write_text(PIPELINE + "  - export: {with_past: false, optimize: false}\n")
    blocker = tmp_path / "no-onnxscript"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['onnxscript'] = None\n")
    r = run_action({"pipeline": "pipeline.yaml", "extras": "gguf"}, cwd=workspace,
                   env={"PYTHONPATH": str(blocker)})
    assert r.outputs["status"] == "invalid" or r.steps["run"]["outcome"] == "failure", r.log
    assert re.search(r"^::error file=[^,]*pipeline\.yaml,line=10,title=F602 ", r.log, re.M), r.log
    assert "set the action's input `extras: gguf,export`" in r.log and "fuse-llm[" not in r.log
    assert not (workspace / "runs/tiny-action/merge").exists()  # stopped before any stage


def test_outside_the_action_f602_names_the_packages_of_the_extra(monkeypatch):
    """One table: pyproject.toml's optional-dependencies, read back through the installed metadata."""
    import shlex
    import tomllib

    from packaging.requirements import Requirement

    from stages import extras

    monkeypatch.delenv("FUSE_ACTION", raising=False)
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    def norm(reqs):
        return sorted((r.name, r.specifier, r.extras) for r in map(Requirement, reqs))

    for extra, reqs in table.items():
        assert norm(extras.requirements(extra)) == norm(reqs), extra
    fix = extras.install_fix({"export": ["onnxscript"]})
    assert fix == "pip install " + " ".join(f"'{r}'" for r in extras.requirements("export")), fix
    assert norm(shlex.split(fix)[2:]) == norm(table["export"])
    assert extras.install_fix({"no-such-extra": ["foo"]}) == "pip install foo"
    monkeypatch.setenv("FUSE_ACTION", "1")
    monkeypatch.setenv("FUSE_ACTION_EXTRAS", "")
    assert extras.install_fix({"quantize": [], "export": []}) == "set the action's input `extras: export,quantize`"
    monkeypatch.setenv("FUSE_ACTION_EXTRAS", "gguf, export")
    assert extras.install_fix({"export": []}) == fix  # already asked for, still missing: the packages


def test_the_actions_python_leaves_the_jobs_python_alone():
    """setup-python only provides the interpreter of Fuse's venv (update-environment: false):
    later steps of the job keep their PATH and Python. (Run for real under act: .ci/lint-actions.)"""
    spec = yaml.safe_load((ROOT / "action.yml").read_text())
    setup = next(s for s in spec["runs"]["steps"] if s.get("uses", "").startswith("actions/setup-python@"))
    assert setup["with"]["update-environment"] is False
    prep = next(s for s in spec["runs"]["steps"] if s.get("id") == "prep")
    assert prep["env"]["FUSE_SETUP_PYTHON"] == f"${{{{ steps.{setup['id']}.outputs.python-path }}}}"


FAKE_PYTHON = """#!/usr/bin/env bash
# a stand-in interpreter: records what it was run with, in which environment
{ printf 'ARGS %s\n' "$*"; env; } >> "$FAKE_PYTHON_LOG"
case "$1 $2" in
  "-m venv") mkdir -p "$3/bin" && cp "$0" "$3/bin/python" ;;
  "-c "*) echo "$FAKE_PYTHON_SITE" ;;  # a version, a site-packages dir: any answer does
esac
"""


@pytest.mark.parametrize("torch_build", ["cpu", "preinstalled"])
def test_secrets_on_the_step_never_reach_the_install(tmp_path, torch_build):
    """HF_TOKEN (and any secret-named variable) set on the action's step is for Fuse's run: the
    prep and install steps, pip and the build backends it runs, never see it."""
    from actionsim import evaluate

    spec = yaml.safe_load((ROOT / "action.yml").read_text())
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    secrets = {"HF_TOKEN": SECRET, "AWS_SECRET_ACCESS_KEY": SECRET + "x", "my_api_key": SECRET + "y"}
    ctx = {"inputs": {"torch": torch_build, "extras": "export"},
           "steps": {"prep": {"outputs": {"python": str(fake), "extras": "export", "venv": str(tmp_path / "venv"),
                                          "key": "k", "cache-dir": str(tmp_path / "pip")}},
                     "python": {"outputs": {"python-path": str(fake)}}}}
    env = {**{k: v for k, v in os.environ.items() if k == "PATH"}, **secrets,
           "FAKE_PYTHON_LOG": str(log), "FAKE_PYTHON_SITE": str(tmp_path), "GITHUB_ACTION_PATH": str(ROOT), "RUNNER_TEMP": str(tmp_path),
           "RUNNER_OS": "Linux", "RUNNER_ARCH": "X64"}
    for step in spec["runs"]["steps"]:
        if step.get("id") not in ("prep", "install"):
            continue
        out = tmp_path / f"{step['id']}.out"
        step_env = {k: evaluate(v, ctx) for k, v in (step.get("env") or {}).items()}
        r = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
                                         env={**env, **step_env, "GITHUB_OUTPUT": str(out)}, cwd=tmp_path,
                                         capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    calls = log.read_text()
    assert "ARGS -m pip install" in calls and "ARGS -m stages --version" in calls  # the install really ran
    assert SECRET not in calls and "HF_TOKEN" not in calls, "a secret reached the install"
    assert "FAKE_PYTHON_LOG" in calls  # ordinary variables do


def test_model_dir_is_the_merged_model_and_stage_dirs_name_every_output(tmp_path):
    rows = [report.StageRow(id=sid, stage=stage, state="done", seconds=1.0, output_dir=tmp_path / sid,
                            output_kind=kind)
            for sid, stage, kind in [("validate", "validate", "report"), ("merge", "merge", "hf-model"),
                                     ("quantize", "quantize", "quantized-model"), ("export", "export", "onnx-model")]]
    rows.append(report.StageRow(id="check", stage="check", state="not run", seconds=None))
    r = report.Report(name="n", status="success", pipeline=None, workdir=tmp_path, manifest=None, rows=rows)
    out = r.outputs()
    assert out["model-dir"] == str(tmp_path / "merge")
    assert json.loads(out["stage-dirs"]) == {sid: str(tmp_path / sid) for sid in ("validate", "merge", "quantize",
                                                                                   "export")}


# --------------------------------------------------------------------------- reporting pieces


def test_outputs_use_a_fresh_delimiter_and_read_back(tmp_path):
    values = {"status": "success", "published": json.dumps(["https://x/y"]), "odd": "a=b\nEOF\nc"}
    f = tmp_path / "out"
    f.write_text(report.github_outputs(values))
    assert parse_output_file(f) == values
    delims = re.findall(r"<<(\S+)", f.read_text())
    assert len(set(delims)) == 3 and all(len(d) > 30 for d in delims)


def test_stage_groups_close_before_an_error_and_record_what_ran():
    buf = io.StringIO()
    g = report.StageGroups(buf)
    g("[validate] fresh, skipped (fingerprint and outputs match)")
    g("[merge] running: never ran")
    g("  merge: 50%")
    g("::set-output name=x::injected")  # a line of the run must not become a command
    g.close()  # the stage raised
    text = buf.getvalue().splitlines()
    assert text == ["[validate] fresh, skipped (fingerprint and outputs match)", "::group::[merge] running: never ran",
                    "  merge: 50%", " ::set-output name=x::injected", "::endgroup::"]
    assert g.ran == ["merge"] and g.skipped == ["validate"]


def test_mask_secrets_masks_each_line_of_a_multiline_secret(monkeypatch):
    monkeypatch.setenv("SOME_API_KEY", "line-one-secret\nline-two-secret")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh")
    monkeypatch.setenv("HARMLESS", "not-a-secret")
    buf = io.StringIO()
    report.mask_secrets(buf)
    lines = set(buf.getvalue().splitlines())
    assert {"::add-mask::line-one-secret", "::add-mask::line-two-secret", "::add-mask::hf_abcdefgh"} <= lines
    assert "::add-mask::not-a-secret" not in lines


def test_summary_cells_are_escaped_and_the_summary_stays_under_the_limit():
    row = report.StageRow(id="merge", stage="merge", state="failed", seconds=3.0, error="F999 a|b\nnext line")
    r = report.Report(name="n", status="failed", pipeline="p.yaml", workdir=None, manifest=None, rows=[row] * 5000)
    md = report.markdown(r)
    assert "a\\|b next line" in md
    assert len(md.encode()) < 1024 * 1024


def test_key_numbers_prefer_what_a_reader_looks_for():
    nums = report.key_numbers({"seconds": 3.2, "tensors_copied": 10, "files_unchanged": 0, "bytes_written": 272585537,
                               "tensors_merged": 60, "max_abs_diff": 0.0123})
    assert nums == ["tensors merged 60", "max logit diff 0.0123", "written 272.6 MB"]
    # check's metrics (merged vs base + adapter) come first, over its tensor-level numbers
    check = {"delta_cos_min": 0.97, "delta_retained_min": 0.998, "logits_max_abs_diff": 0.169,
             "logits_kl_mean": 4.2e-05, "logits_top1_agreement": 1.0, "probe_tensors": 60}
    assert report.key_numbers(check) == ["max logit diff 0.169", "mean KL 4.20e-05", "top-1 agreement 1"]


def test_published_urls_prefer_the_pinned_commit():
    assert report._published_url({"metrics": {"url": "https://h/r", "commit_url": "https://h/r/commit/ab"}}) \
        == "https://h/r/commit/ab"
    assert report._published_url({"external": {"root": "/srv/models/x"}}) == "file:///srv/models/x"
    assert report._published_url({}) is None
