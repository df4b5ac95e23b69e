"""Example (c), examples/workflows/split-runner.yml, run locally: its jobs' steps in order,
each job in its own directory (a runner), the workdir handed from one to the other the way
upload-artifact / download-artifact with ``include-hidden-files: true`` would (``cp -a``).

Every stage must end ``done``, and nothing the first runner did may run again on the second.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from actionsim import ROOT, evaluate, run_action
from factory import SENTENCES, make_lora_adapter, make_tiny_model

EXAMPLE = ROOT / "examples/workflows/split-runner.yml"
FUSE_ACTION = "fuse-llm/fuse@"

# The example's pipeline.yaml (see its header), on a tiny Llama instead of SmolLM2: 8 bits
# and group 32 (hidden 64), calibrated on token ids (the tiny model has no tokenizer).
PIPELINE = """\
version: 1
name: support-v2
base: models/base
adapter: outputs/lora
workdir: runs/${name}
stages:
  - validate
  - merge: {dtype: bfloat16}
  - quantize: {method: gptq, bits: 8, group_size: 32, calibration: {dataset: calib.jsonl}}
  - publish: {to: dir, path: "dist/${name}", from: merge}
  - publish: {id: publish-gptq, to: dir, path: "dist/${name}-gptq", from: quantize}
"""
STAGES = ["validate", "merge", "quantize", "publish", "publish-gptq"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("split-inputs")
    import torch

    make_tiny_model("llama", root / "base", dtype=torch.bfloat16, train_steps=60)
    make_lora_adapter(root / "base", root / "lora", target_modules=["q_proj", "v_proj"])
    (root / "calib.jsonl").write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in SENTENCES * 4))
    return root


def checkout(runner: Path, inputs: Path):
    """What actions/checkout gives each runner: the repository with its pipeline and inputs."""
    (runner / "models").mkdir(parents=True)
    (runner / "outputs").mkdir()
    shutil.copytree(inputs / "base", runner / "models/base")
    shutil.copytree(inputs / "lora", runner / "outputs/lora")
    (runner / "pipeline.yaml").write_text(PIPELINE)
    shutil.copy(inputs / "calib.jsonl", runner / "calib.jsonl")


def job_order(jobs: dict) -> list[str]:
    done, order = set(), []
    while len(order) < len(jobs):
        ready = [j for j, spec in jobs.items() if j not in done
                 and set(_list(spec.get("needs"))) <= done]
        assert ready, "cycle in needs"
        order.append(ready[0])
        done.add(ready[0])
    return order


def _list(v):
    return [] if v is None else [v] if isinstance(v, str) else list(v)


def fuse(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "GITHUB_ACTIONS": ""}, timeout=300)


def test_split_runner_example_resumes_on_the_second_runner(tmp_path, inputs):
    wf = yaml.safe_load(EXAMPLE.read_text())
    store = tmp_path / "artifacts"  # what the artifact service holds between the jobs
    store.mkdir()
    github = {"run_id": "4242", "run_attempt": "1"}
    runners, logs = {}, []
    for job in job_order(wf["jobs"]):
        spec = wf["jobs"][job]
        runner = runners[job] = tmp_path / f"runner-{job}"  # a separate machine per job
        checkout(runner, inputs)
        env = {**(wf.get("env") or {}), **(spec.get("env") or {})}
        ctx = {"env": env, "github": github, "steps": {}}
        for step in spec["steps"]:
            uses = step.get("uses", "")
            args = {k: evaluate(v, ctx) for k, v in (step.get("with") or {}).items()}
            assert "run" not in step, f"{job}: a run: step the test does not know how to run: {step}"
            if uses.startswith("actions/checkout@"):
                continue
            if uses.startswith("actions/upload-artifact@"):
                src = runner / args["path"]
                if args["path"].rstrip("/") == env["WORKDIR"]:
                    assert args.get("include-hidden-files") == "true", \
                        f"{job}: uploading a workdir needs include-hidden-files: true"
                dest = store / args["name"] / (src.name if src.is_file() else "")
                dest.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run(["cp", "-a", f"{src}/." if src.is_dir() else str(src), str(dest)], check=True)
            elif uses.startswith("actions/download-artifact@"):
                dest = runner / args["path"]
                dest.mkdir(parents=True, exist_ok=True)
                subprocess.run(["cp", "-a", f"{store / args['name']}/.", str(dest)], check=True)
            elif uses.startswith(FUSE_ACTION):
                r = run_action(args, cwd=runner, tmp=tmp_path / f"action-{job}-{len(logs)}")
                logs.append((job, step.get("name"), r.log))
                assert r.outputs["status"] == "success", f"{job}/{step.get('name')}:\n{r.log}"
                if step.get("id"):
                    ctx["steps"][step["id"]] = {"outputs": r.outputs}
            else:
                raise AssertionError(f"{job}: step the test does not know: {uses}")

    cpu, gpu = runners["merge"], runners["gpu"]
    workdir = Path(wf["env"]["WORKDIR"])
    first = json.loads((cpu / workdir / "manifest.json").read_text())
    last = json.loads((gpu / workdir / "manifest.json").read_text())

    # every stage done
    assert {k: v["status"] for k, v in last["stages"].items()} == {k: "done" for k in STAGES}
    assert set(first["stages"]) == {"validate", "merge"}  # the CPU runner stopped after merge
    # what ran on the CPU runner was taken over as it was, not run again on the GPU runner
    for sid in ("validate", "merge"):
        for key in ("fingerprint", "finished_at", "output_digest"):
            assert last["stages"][sid][key] == first["stages"][sid][key], (sid, key)
    gpu_logs = "".join(log for job, _, log in logs if job == "gpu")
    assert "[quantize] running" in gpu_logs and "[publish-gptq] running" in gpu_logs
    assert "[validate] running" not in gpu_logs and "[merge] running" not in gpu_logs
    assert (gpu / "dist/support-v2-gptq/SHA256SUMS").is_file() and not (cpu / "dist").exists()
    # the finished models leave the self-hosted runner as an artifact, checksums intact
    models = store / "fuse-models-4242-1"
    for name in ("support-v2", "support-v2-gptq"):
        r = subprocess.run(["sha256sum", "--check", "--strict", "--quiet", "SHA256SUMS"], cwd=models / name,
                           capture_output=True, text=True)
        assert r.returncode == 0, (name, r.stdout, r.stderr)
    assert not (cpu / workdir / "quantize").exists()

    # the second runner sees the whole pipeline fresh: a full run there runs nothing
    r = fuse("run", "pipeline.yaml", cwd=gpu)
    assert r.returncode == 0, r.stderr
    assert f"0 ran, {len(STAGES)} fresh and skipped" in r.stderr, r.stderr
    r = fuse("verify", str(workdir), cwd=gpu)
    assert r.returncode == 0, r.stderr


def test_every_workdir_upload_in_the_examples_keeps_hidden_files():
    for path in sorted((ROOT / "examples/workflows").glob("*.yml")):
        wf = yaml.safe_load(path.read_text())
        for job, spec in wf["jobs"].items():
            for step in spec.get("steps", []):
                w = step.get("with") or {}
                if step.get("uses", "").startswith("actions/upload-artifact@") and "manifest.json" not in \
                        str(w.get("path")) and "WORKDIR" in str(w.get("path")):
                    assert w.get("include-hidden-files") is True, f"{path.name}:{job}"
