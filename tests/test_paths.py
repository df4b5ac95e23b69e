"""Path safety (stages/paths.py): every path a run writes is refused before anything runs when it
overlaps what the run reads or a protected directory. In-process and fast: no model is needed,
the checks run before the workdir is created (the CLI's exit code is tested once)."""
from __future__ import annotations

import os

import pytest

from cli import fuse
from stages.findings import FuseError
from stages.paths import check_merge_output, check_run_paths
from stages.pipeline import load


def pipeline(root, *, workdir="runs/x", stages="[validate, merge]", base="base", extra=""):
    p = root / "pipeline.yaml"
    p.write_text(f"version: 1\nname: x\nbase: {base}\nadapter: adapter\nworkdir: {workdir}\n{extra}"
                 f"stages: {stages}\n")
    return p


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A project: base/ and adapter/ next to the pipeline file, $HOME elsewhere, no git, no CI."""
    for d in ("base", "adapter"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "config.json").write_text("{}")
    monkeypatch.setenv("HOME", str(tmp_path.parent / "home"))
    monkeypatch.delenv("GITHUB_WORKSPACE", raising=False)
    return tmp_path


def refused(p, *says) -> str:
    with pytest.raises(FuseError) as e:
        check_run_paths(load(p))
    f = e.value.finding
    assert f.code == "F111" and f.fix and f.file == str(p), f
    for s in says:
        assert s in f.message, f.message
    return f.message


def publish(path, sid="publish"):
    return f"[validate, merge, {{publish: {{id: {sid}, to: dir, path: '{path}'}}}}]"


def test_the_usual_layout_passes(root):
    check_run_paths(load(pipeline(root, stages=publish("dist/x"))))
    check_run_paths(load(pipeline(root, workdir=str(root.parent / "elsewhere"), stages=publish("/srv/models/x"))))


def test_publish_path_at_the_base_is_refused_before_merge(root):
    """The base is an earlier Fuse publish; publishing over it would overwrite its weights."""
    refused(pipeline(root, stages=publish("base")), "publish path", "is the base model")
    refused(pipeline(root, stages=publish("base/published")), "is inside the base model")
    refused(pipeline(root, stages=publish(".")), "the pipeline file's directory")
    refused(pipeline(root, stages=publish("adapter/../adapter/x")), "is inside the adapter")


def test_publish_path_and_the_workdir_keep_apart(root):
    refused(pipeline(root, stages=publish("runs/x/dist")), "is inside the workdir")
    refused(pipeline(root, stages=publish("runs")), "contains the workdir")
    refused(pipeline(root, stages="[validate, merge, {publish: {to: dir, path: dist}}, "
                                  "{publish: {id: p2, to: dir, path: dist/inner}}]"),
            "is inside the publish path of 'publish'")


def test_workdir_overlapping_an_input_or_the_pipeline_dir_is_refused(root):
    refused(pipeline(root, workdir="base/runs"), "workdir", "is inside the base model")
    refused(pipeline(root, workdir="adapter"), "is the adapter")
    refused(pipeline(root, workdir="."), "is the pipeline file's directory")
    refused(pipeline(root, workdir=".."), "contains the pipeline file's directory")
    refused(pipeline(root, workdir="/"), "is the file system root")


def test_symlinks_are_followed(root):
    (root / "runs").mkdir()
    (root / "runs" / "x").symlink_to(root / "base" / "sub", target_is_directory=True)  # dangling is enough
    refused(pipeline(root), "workdir", "is inside the base model")
    (root / "dist").symlink_to(root / "adapter")
    refused(pipeline(root, workdir="runs/y", stages=publish("dist")), "is the adapter")


def test_home_and_github_workspace_are_never_a_write_path(root, monkeypatch):
    home = root.parent / "home"
    refused(pipeline(root, workdir=str(home)), "is $HOME")
    ws = root.parent / "ws"
    monkeypatch.setenv("GITHUB_WORKSPACE", str(ws))
    refused(pipeline(root, stages=publish(str(ws))), "is $GITHUB_WORKSPACE")
    check_run_paths(load(pipeline(root, stages=publish(str(ws / "dist")))))  # inside it is fine


def test_the_git_top_level_is_never_a_write_path(root):
    (root / ".git").mkdir()
    sub = root / "ml"
    sub.mkdir()
    for d in ("base", "adapter"):
        os.symlink(root / d, sub / d)
    refused(pipeline(sub, stages=publish("..")), "publish path", "is the git top level of the pipeline")


def test_the_hf_cache_and_a_calibration_file_are_inputs(root, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root / "hf" / "hub"))
    refused(pipeline(root, workdir="hf"), "contains the Hugging Face cache")
    refused(pipeline(root, stages=publish("hf/hub/models--x")), "is inside the Hugging Face cache")
    (root / "data").mkdir()
    (root / "data" / "cal.txt").write_text("some text\n" * 10)
    q = "[merge, {quantize: {method: gptq, bits: 8, calibration: {dataset: data/cal.txt}}}]"
    refused(pipeline(root, workdir="data", stages=q), "contains a file stage 'quantize' reads")


@pytest.mark.parametrize("sid", ["logs", ".bases", "manifest.json"])
def test_a_stage_id_that_names_a_fuse_entry_of_the_workdir_is_refused(root, sid):
    with pytest.raises(FuseError) as e:
        check_run_paths(load(pipeline(root, stages=f"[validate, {{merge: {{id: '{sid}'}}}}]")))
    assert e.value.finding.code == "F103" and sid in e.value.finding.message


def test_one_shot_merge_output_inside_an_input_or_the_hf_cache(root, monkeypatch):
    from huggingface_hub import constants

    with pytest.raises(FuseError) as e:
        check_merge_output(root / "base" / "merged", root / "base", [root / "adapter"])
    assert e.value.finding.code == "F111" and "inside the base model" in e.value.finding.message
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root / "hf"))
    with pytest.raises(FuseError) as e:
        check_merge_output(root / "hf" / "out", "org/model", [root / "adapter"])
    assert "Hugging Face cache" in e.value.finding.message
    check_merge_output(root / "merged", root / "base", [root / "adapter"])


def test_the_cli_exits_2_with_one_line_and_creates_nothing(root):
    pipeline(root, stages=publish("base/published"))
    before = sorted(p.name for p in root.rglob("*"))
    r = fuse("run", "pipeline.yaml", cwd=root, check=False, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error F111") and "base/published" in lines[0]
    assert sorted(p.name for p in root.rglob("*")) == before  # no workdir, no published dir
    r = fuse("merge", "base", "adapter", "base/merged", cwd=root, check=False, timeout=120)
    assert r.returncode == 2 and "F111" in r.stderr and not (root / "base" / "merged").exists()
