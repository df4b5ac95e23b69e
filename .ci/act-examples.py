#!/usr/bin/env python3
"""Run every example workflow (examples/workflows/*.yml) as written, under act, offline.

Each example runs from its own file, with the event that triggers it, against a prepared
"user repository" whose pipeline.yaml is the one in the example's header comment (the
`<commit sha>` of the base filled in). What stands in for the world outside:

- the Hugging Face Hub: tests/fake_hub.py (HF_ENDPOINT), serving the base
  HuggingFaceTB/SmolLM2-135M-Instruct as a tiny Llama (tests/factory.py) and taking the
  publishes (checked afterwards: commits, files, tags);
- the remote actions: the stubs in .ci/act/stubs (checkout copies the prepared repository,
  upload/download-artifact keep artifacts in a local store, cache caches nothing,
  attest-build-provenance checks and records the subjects), gh: .ci/act/bin/gh;
- `fuse-llm/fuse@0000…`: this checkout's action.yml, whole (setup, install, run, report);
- the runner's Python: the CI .venv. The action still creates its own venv and runs its pip
  installs; the .venv's site-packages are on PYTHONPATH, so torch and the other pinned
  packages are found installed (offline, in seconds) instead of downloaded.

Not covered, and said so in docs/action.md: downloading torch and the extras from their
indexes, a real GPU (the split example's GPU job runs on this machine's CPU), signing the
attestation, the real artifact, cache and release services, the repository_dispatch path
(it downloads the adapter over https).

Usage: .venv/bin/python .ci/act-examples.py [NAME...]   (NAME: an example's file stem)
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
# .ci/run sets HF_HUB_OFFLINE=1 for everything else; the only Hub here is the local test server.
# huggingface_hub reads it at import time: set before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "0"

from fake_hub import FakeHub  # noqa: E402

ACT = ROOT / "build/lint-venv/bin/act"
WORK = ROOT / "build/act-examples"
STUBS = ROOT / ".ci/act/stubs"
FUSE = "fuse-llm/fuse@" + "0" * 40
BASE_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
TOKEN = "hf_actexamples_fake_token_7d41c0a9e2"  # not a real token: it must never appear unmasked
GH_TOKEN = "ghs_actexamples_fake_token_0b6f3e2d"
USES = re.compile(r"uses:\s*([\w.-]+/[\w.-]+)@([0-9a-f]{40})")


def header_pipeline(workflow: Path, base_sha: str) -> str:
    """The pipeline.yaml of an example's header comment (lines after '# pipeline.yaml:')."""
    lines, out, on = workflow.read_text().splitlines(), [], False
    for line in lines:
        if line.startswith("# pipeline.yaml"):
            on = True
            continue
        if on:
            if not line.startswith("#   "):
                break
            out.append(line[4:])
    assert out, f"{workflow.name}: no pipeline.yaml in its header comment"
    return "\n".join(out).replace("<commit sha>", base_sha) + "\n"


def tiny_inputs(root: Path) -> dict:
    """A tiny Llama (the Hub's base) and LoRA adapters trained on it, made once."""
    import torch
    from factory import SENTENCES, make_lora_adapter, make_tiny_model

    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        make_tiny_model("llama", root / "base", dtype=torch.bfloat16, train_steps=60)
        for i, name in enumerate(("lora", "support", "sales", "legal")):
            out = make_lora_adapter(root / "base", root / "adapters" / name, target_modules=["q_proj", "v_proj"],
                                    seed=i)
            cfg = json.loads((Path(out) / "adapter_config.json").read_text())
            cfg["base_model_name_or_path"] = BASE_REPO  # as trained on the Hub's base
            (Path(out) / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        (root / "calib.jsonl").write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in SENTENCES * 4))
        (root / "done").write_text("")
    return {"base": root / "base", "adapters": root / "adapters", "calib": root / "calib.jsonl"}


def export_checkout(dest: Path) -> None:
    """What `uses: fuse-llm/fuse@…` fetches: this checkout's files (tracked and untracked but not
    ignored), without .venv and build/ (act would copy a local repository whole)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    listing = dest.parent / "fuse-src.files"
    listing.write_bytes(subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                       cwd=ROOT, capture_output=True, check=True).stdout)
    subprocess.run(f'tar -C "{ROOT}" --null --ignore-failed-read -T "{listing}" -cf - | tar -C "{dest}" -xf -',
                   shell=True, check=True)


def seed_hub(hub: FakeHub, base: Path) -> str:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo(BASE_REPO, private=False)
    api.upload_folder(repo_id=BASE_REPO, folder_path=str(base))
    return hub.head(BASE_REPO)


# --------------------------------------------------------------------------- the examples
# Each: the event and its payload, how the user's repository looks, what must hold afterwards.


def prep_on_training_complete(repo, store, inputs, pipeline):
    (repo / "pipeline.yaml").write_text(pipeline)
    # the training run's artifact (workflow_run): the adapter arrives through download-artifact
    shutil.copytree(inputs["adapters"] / "lora", store / "lora-adapter")


def check_on_training_complete(hub, store, log, **_):
    files = hub.files("acme/support-v2")  # publish reads the nearest model upstream: export's ONNX graph
    assert {"model.onnx", "config.json", "README.md", "SHA256SUMS", "fuse-provenance.json"} <= set(files), sorted(files)
    assert hub.repos["acme/support-v2"].private
    [manifest] = list(store.glob("fuse-manifest-*/manifest.json"))
    stages = json.loads(manifest.read_text())["stages"]
    assert {k: v["status"] for k, v in stages.items()} == dict.fromkeys(
        ("validate", "merge", "check", "export", "publish"), "done"), stages
    assert "::set-output:: status=success" in log


def prep_matrix_adapters(repo, store, inputs, pipeline):
    (repo / "pipeline.yaml").write_text(pipeline)
    for name in ("support", "sales", "legal"):
        shutil.copytree(inputs["adapters"] / name, repo / "adapters" / name)


def check_matrix_adapters(hub, store, log, **_):
    for name in ("support", "sales", "legal"):
        assert "model.safetensors" in hub.files(f"acme/smollm2-{name}"), name
        [m] = list(store.glob(f"fuse-manifest-{name}-*/manifest.json"))
        assert json.loads(m.read_text())["pipeline"]["resolved"]["name"] == f"smollm2-{name}"
    assert log.count("🏁  Job succeeded") == 3


def prep_split_runner(repo, store, inputs, pipeline):
    # A tiny model has no tokenizer: calibrate on token ids; 8 bits, groups of 32 (hidden 64),
    # as tests/test_split_runner.py does. Everything else is the header's pipeline.
    pipeline, n = re.subn(r"- quantize: \{[^}]*\}",
                          "- quantize: {method: gptq, bits: 8, group_size: 32, calibration: {dataset: calib.jsonl}}",
                          pipeline)
    assert n == 1, pipeline
    (repo / "pipeline.yaml").write_text(pipeline)
    shutil.copytree(inputs["adapters"] / "lora", repo / "outputs/lora")
    shutil.copy(inputs["calib"], repo / "calib.jsonl")


def check_split_runner(hub, store, log, **_):
    [handed] = list(store.glob("fuse-workdir-[0-9]*"))
    assert (handed / ".fuse-statcache.json").exists() or any(p.name.startswith(".") for p in handed.iterdir()), \
        "the workdir was handed over without its hidden files"
    assert set(json.loads((handed / "manifest.json").read_text())["stages"]) == {"validate", "merge"}
    [models] = list(store.glob("fuse-models-*"))
    for name in ("support-v2", "support-v2-gptq"):
        subprocess.run(["sha256sum", "--check", "--strict", "--quiet", "SHA256SUMS"], cwd=models / name, check=True)
    [final] = list(store.glob("fuse-workdir-final-*/manifest.json"))
    stages = json.loads(final.read_text())["stages"]
    assert all(v["status"] == "done" for v in stages.values()) and len(stages) == 5, stages
    gpu = log[log.index("Resume on the GPU runner"):]
    assert "[quantize] running" in gpu and "[merge] running" not in gpu and "[validate] running" not in gpu
    assert log.count("🏁  Job succeeded") == 2


def prep_release_provenance(repo, store, inputs, pipeline):
    (repo / "pipeline.yaml").write_text(pipeline)
    shutil.copytree(inputs["adapters"] / "lora", repo / "outputs/lora")


def check_release_provenance(hub, store, log, releases, attestations, **_):
    assert "v1.0.0" in hub.repos["acme/support-v2"].tags
    attached = releases / "v1.0.0"
    assert {p.name for p in attached.iterdir()} == {"SHA256SUMS", "fuse-provenance.json", "README.md"}
    [subjects] = list(attestations.glob("subjects-*.txt"))
    sums = dict(reversed(line.split("  ", 1)) for line in subjects.read_text().splitlines())
    assert {"model.safetensors", "README.md", "fuse-provenance.json"} <= set(sums), sums
    hub_files = hub.files("acme/support-v2", "v1.0.0")
    assert hub_files["model.safetensors"].lfs == sums["model.safetensors"]  # the attested digest is the published one


EXAMPLES = {
    "on-training-complete": ("workflow_run", {"action": "completed", "workflow_run": {
        "conclusion": "success", "id": 4242, "head_branch": "main", "name": "train"}}),
    "matrix-adapters": ("workflow_dispatch", {"inputs": {}}),
    "split-runner": ("workflow_dispatch", {"inputs": {}}),
    "release-provenance": ("release", {"action": "published", "release": {"tag_name": "v1.0.0"}}),
}


# --------------------------------------------------------------------------- running act


def stub_args(workflow: Path) -> list[str]:
    """--local-repository for every pinned remote action of the workflow and of action.yml."""
    args, seen = [], set()
    for text in (workflow.read_text(), (ROOT / "action.yml").read_text()):
        for repo, sha in USES.findall(text):
            if (repo, sha) in seen:
                continue
            seen.add((repo, sha))
            if f"{repo}@{sha}" == FUSE:
                args += ["--local-repository", f"{FUSE}={WORK / 'fuse-src'}"]
                continue
            owner, name = repo.split("/")
            stub = STUBS / name
            if owner != "actions" or not (stub / "action.yml").is_file():
                raise SystemExit(f"{workflow.name}: no act stub for {repo} (add .ci/act/stubs/{name})")
            args += ["--local-repository", f"{repo}@{sha}={stub}"]
    return args


def run_example(name: str, hub: FakeHub, inputs: dict, base_sha: str, python_bin: Path) -> float:
    workflow = ROOT / "examples/workflows" / f"{name}.yml"
    event_name, payload = EXAMPLES[name]
    here = WORK / name
    shutil.rmtree(here, ignore_errors=True)
    repo, store, releases, attest = here / "repo", here / "artifacts", here / "releases", here / "attestations"
    for d in (repo, store, releases, attest):
        d.mkdir(parents=True)
    pipeline = header_pipeline(workflow, base_sha)
    globals()[f"prep_{name.replace('-', '_')}"](repo, store, inputs, pipeline)
    (here / "event.json").write_text(json.dumps(payload))
    site = subprocess.run([str(python_bin / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    env_args = {
        "ACT_SRC": repo, "ACT_ARTIFACTS": store, "ACT_RELEASES": releases, "ACT_ATTESTATIONS": attest,
        "FUSE_ACT_PYTHON_BIN": python_bin, "PYTHONPATH": site,
        "PATH": f"{ROOT / '.ci/act/bin'}:{python_bin}:{os.environ['PATH']}",
        "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": WORK / "hf-home", "HF_HUB_OFFLINE": "0",
        "FUSE_TORCH_CPU_INDEX": "file:///nonexistent/torch-cpu-index",  # torch is found installed, never fetched
        "PIP_NO_INPUT": "1", "TOKENIZERS_PARALLELISM": "false",
        "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2"),
    }
    cmd = [str(ACT), event_name, "-W", str(workflow), "-e", str(here / "event.json"), "--no-skip-checkout",
           "-P", "ubuntu-latest=-self-hosted", "-P", "gpu=-self-hosted",
           "--pull=false", "--action-offline-mode", "--no-cache-server",
           "--action-cache-path", str(here / "act-cache"),
           "-s", f"HF_TOKEN={TOKEN}", "-s", f"GITHUB_TOKEN={GH_TOKEN}",
           *[a for k, v in env_args.items() for a in ("--env", f"{k}={v}")], *stub_args(workflow)]
    started = time.time()
    env = {k: v for k, v in os.environ.items()
           if k not in ("GITHUB_OUTPUT", "GITHUB_ENV", "GITHUB_PATH", "GITHUB_STEP_SUMMARY", "GITHUB_STATE")}
    with open(here / "act.log", "w") as f:
        rc = subprocess.run(cmd, cwd=repo, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
                            timeout=900).returncode
    log = (here / "act.log").read_text(errors="replace")
    seconds = time.time() - started
    try:
        assert rc == 0, f"act exited {rc}"
        assert "Job failed" not in log, "a job failed"
        for secret in (TOKEN, GH_TOKEN):
            assert secret not in log, "a fake token appears in the log unmasked"
        globals()[f"check_{name.replace('-', '_')}"](hub=hub, store=store, log=log, releases=releases,
                                                     attestations=attest)
    except (AssertionError, subprocess.CalledProcessError, KeyError, ValueError) as e:
        tail = "\n".join(log.splitlines()[-80:])
        raise SystemExit(f"act examples: {name}: {type(e).__name__}: {e}\n--- last lines of {here / 'act.log'}:\n{tail}")
    shutil.rmtree(here / "act-cache", ignore_errors=True)  # the job's workspace and temp: kept only on failure
    return seconds


def main(argv: list[str]) -> int:
    names = argv or sorted(p.stem for p in (ROOT / "examples/workflows").glob("*.yml"))
    unknown = set(names) - set(EXAMPLES)
    if unknown:
        raise SystemExit(f"act examples: no runner for {sorted(unknown)}: add it to .ci/act-examples.py")
    python_bin = Path(os.environ.get("FUSE_ACT_PYTHON_BIN", ROOT / ".venv/bin"))
    WORK.mkdir(parents=True, exist_ok=True)
    os.environ.update(HF_HUB_DISABLE_XET="1", HF_HOME=str(WORK / "hf-home"))
    inputs = tiny_inputs(WORK / "inputs")
    export_checkout(WORK / "fuse-src")
    shutil.rmtree(WORK / "hf-home", ignore_errors=True)
    tokens = {TOKEN: {"name": "alice", "orgs": ["acme", "HuggingFaceTB"], "role": "write"}}
    with FakeHub(tokens=tokens) as hub:
        os.environ["HF_ENDPOINT"] = hub.url
        base_sha = seed_hub(hub, inputs["base"])
        for name in names:
            s = run_example(name, hub, inputs, base_sha, python_bin)
            print(f"act examples: {name}.yml ran as written ({s:.0f} s; log: {(WORK / name / 'act.log').relative_to(ROOT)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
