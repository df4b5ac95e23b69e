"""``publish: {to: hub}`` driven by the real huggingface_hub client against tests/fake_hub.py.

The server counts what it receives (LFS PUT bytes, commit payloads, commits), so the tests
assert on the wire: a re-run sends 0 bytes and makes no commit; after a fault mid-upload
the re-run sends exactly the files that were missing. Xet is disabled (it cannot be served
offline); the LFS path is the one the client falls back to.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import stages
from fake_hub import FakeHub
from stages.findings import FuseError

TOKEN = "hf_test_write_token_0123456789"
REPO = "acme/tiny-fused"

PIPELINE = """\
version: 1
name: tiny-fused
base: base
adapter: adapter
workdir: {workdir}
stages:
  - merge: {{dtype: bfloat16, max_shard_size: {shard}}}
  - publish: {{to: hub, repo_id: {repo}, tag: {tag}, endpoint: '{endpoint}'{extra}}}
"""


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import torch

    from factory import make_lora_adapter, make_tiny_model

    root = tmp_path_factory.mktemp("pubinputs")
    make_tiny_model("llama", root / "base", dtype=torch.bfloat16)
    make_lora_adapter(root / "base", root / "adapter", target_modules=["q_proj", "v_proj"])
    (root / "base" / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\n---\n# the base\n")
    return root


def make_project(root: Path, inputs: Path, endpoint: str, *, tag="v1", shard="40KB", extra="",
                 workdir="runs/w", repo=REPO) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("base", "adapter"):
        if not (root / name).exists():
            (root / name).symlink_to(inputs / name)
    (root / "pipeline.yaml").write_text(PIPELINE.format(workdir=workdir, shard=shard, repo=repo, tag=tag,
                                                        endpoint=endpoint, extra=extra))
    return root / "pipeline.yaml"


class Sleeps(list):
    """Stands in for ``time`` inside huggingface_hub's HTTP backoff: records the waits, skips them."""

    def sleep(self, s):
        self.append(s)

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fresh fake Hub, and the client set up the way CI runs it: no Xet, not offline, HF_TOKEN."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    for var in ("HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN", "GITHUB_ACTIONS", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    sleeps = Sleeps()
    monkeypatch.setattr(_http, "time", sleeps)
    with FakeHub() as h:
        h.client_sleeps = sleeps
        yield h


def run(pipeline: Path, *args, **kw) -> tuple[dict, list[str]]:
    lines: list[str] = []
    summary = stages.run(pipeline, log=lines.append, **kw)
    return summary, lines


def manifest(pipeline: Path, workdir="runs/w") -> dict:
    return json.loads((pipeline.parent / workdir / "manifest.json").read_text())


def merged_files(pipeline: Path, workdir="runs/w") -> dict[str, dict]:
    m = manifest(pipeline, workdir)
    return {f["path"]: f for f in m["stages"]["merge"]["outputs"] if f["path"] != "README.md"}


def lfs_oids(pipeline: Path) -> dict[str, int]:
    return {f["sha256"]: f["size"] for p, f in merged_files(pipeline).items() if p.endswith(".safetensors")}


def published(pipeline: Path) -> dict[str, str]:
    """path -> sha256 of everything the publish step sent (model files + card, provenance, sums)."""
    pub = pipeline.parent / "runs/w/publish"
    out = {p: f["sha256"] for p, f in merged_files(pipeline).items()}
    out.update({n: hashlib.sha256((pub / n).read_bytes()).hexdigest()
                for n in ("README.md", "fuse-provenance.json", "SHA256SUMS")})
    return out


def hub_sha256(hub: FakeHub, rev="main") -> dict[str, str]:
    return {p: hashlib.sha256(hub.read(REPO, p, rev)).hexdigest() for p in hub.files(REPO, rev) if p != ".gitattributes"}


# --------------------------------------------------------------------------- must show


def test_first_publish_uploads_and_tags_then_reruns_send_nothing(hub, inputs, tmp_path):
    p = make_project(tmp_path / "a", inputs, hub.url)
    summary, log = run(p)
    assert summary == {"merge": "done", "publish": "done"}
    oids = lfs_oids(p)
    assert len(oids) >= 3  # several shards: LFS files
    # first publish: every LFS object sent once, one commit, the tag on it
    assert sorted(hub.stored) == sorted(oids) and hub.put_bytes == sum(oids.values())
    assert hub.commits_made == 1
    head = hub.head(REPO)
    assert hub.repos[REPO].tags == {"v1": head}
    assert hub.repos[REPO].private is True  # private unless the pipeline says otherwise
    assert hub_sha256(hub) == published(p)  # every file, byte for byte
    assert ".gitattributes" in hub.files(REPO)  # the Hub's own file is left alone
    rec = manifest(p)["stages"]["publish"]
    m = rec["metrics"]
    assert m["commit"] == head and m["tag"] == "v1" and m["commits"] == 1 and m["url"] == f"{hub.url}/{REPO}"
    assert m["commit_url"] == f"{hub.url}/{REPO}/commit/{head}"
    assert m["files_uploaded"] == m["files"] == m["verified"] == len(published(p))
    assert "external" not in rec  # nothing local to verify: the hub record is in the metrics
    assert any(f"@ {head[:12]} (tag v1)" in line for line in log)

    # the same pipeline again: publish is fresh, the Hub is not even asked
    hub.reset_stats()
    summary, _ = run(p)
    assert summary["publish"] == "skipped"
    assert hub.requests == [] and hub.put_bytes == 0 and hub.commits_made == 0

    # forced: Fuse asks the Hub, finds every sha256 there, sends 0 bytes, makes no commit
    hub.reset_stats()
    summary, log = run(p, only="publish", force=True)
    assert summary == {"publish": "done"}
    assert hub.put_bytes == 0 and hub.commit_bytes == 0 and hub.commits_made == 0
    assert hub.count("POST", "/commit/") == 0 and hub.count("POST", "/preupload/") == 0
    assert hub.count("POST", "/info/lfs/objects/batch") == 0
    assert hub.head(REPO) == head
    m = manifest(p)["stages"]["publish"]["metrics"]
    assert (m["files_uploaded"], m["bytes_uploaded"], m["commits"], m["commit"]) == (0, 0, 0, head)

    # another machine (another workdir, merge re-run there): the same bytes, so again nothing sent
    q = make_project(tmp_path / "b", inputs, hub.url, workdir="elsewhere/w2")
    hub.reset_stats()
    run(q)
    assert hub.put_bytes == 0 and hub.commits_made == 0 and hub.head(REPO) == head


def test_drop_mid_upload_then_rerun_sends_only_missing_files(hub, inputs, tmp_path):
    p = make_project(tmp_path / "a", inputs, hub.url)
    stages.run(p, log=lambda m: None, only="merge")  # first, so the shards are known
    shards = {p_: f for p_, f in merged_files(p).items() if p_.endswith(".safetensors")}
    oids = {f["sha256"]: f["size"] for f in shards.values()}
    victim = shards[max(shards)]["sha256"]  # the last shard
    # every PUT of that shard loses its connection half way (the client retries 5 times, then gives up)
    fault = hub.fail("PUT", f"/_lfs/.*/{victim}$", drop=True, times=-1)
    with pytest.raises(FuseError) as e:
        stages.run(p, log=lambda m: None)
    assert e.value.finding.code == "F505" and "run again" in e.value.finding.fix
    assert hub.count("PUT", victim) == 6  # 1 try + 5 retries of huggingface_hub's backoff
    first = set(hub.stored)
    # the shards uploaded in parallel before the client gave up are in LFS storage; the victim is not
    assert first and victim not in first and first < set(oids)
    assert hub.commits_made == 0 and hub.repos[REPO].tags == {}  # no commit, no tag: nothing half published
    assert manifest(p)["stages"]["publish"]["status"] == "failed"

    hub.faults.remove(fault)
    hub.reset_stats()
    summary, log = run(p)
    assert summary["publish"] == "done"
    missing = set(oids) - first
    assert sorted(hub.stored) == sorted(missing)  # only what was missing is sent, each once
    assert hub.put_bytes == sum(oids[o] for o in missing)
    assert hub.commits_made == 1 and hub_sha256(hub) == published(p)
    assert hub.repos[REPO].tags == {"v1": hub.head(REPO)}
    assert manifest(p)["stages"]["publish"]["metrics"]["verified"] == len(published(p))
    print(f"resume: {len(first)} of {len(oids)} shards stored before the fault; re-run sent {len(missing)} "
          f"({hub.put_bytes} bytes)")


def test_500_on_commit_then_rerun_sends_no_lfs_bytes_and_commits_once(hub, inputs, tmp_path):
    p = make_project(tmp_path / "a", inputs, hub.url)
    hub.fail("POST", r"/commit/main$", 500)
    with pytest.raises(FuseError) as e:
        stages.run(p, log=lambda m: None)
    assert e.value.finding.code == "F505"
    oids = lfs_oids(p)
    assert sorted(hub.stored) == sorted(oids) and hub.commits_made == 0  # uploaded, not committed
    hub.reset_stats()
    run(p)
    assert hub.put_bytes == 0 and hub.stored == []  # LFS objects are not sent twice
    assert hub.commits_made == 1 and hub_sha256(hub) == published(p)


def test_commit_whose_answer_is_lost_is_not_made_twice(hub, inputs, tmp_path):
    p = make_project(tmp_path / "a", inputs, hub.url)
    # the commit lands, then the connection drops before the answer arrives
    hub.fail("POST", r"/commit/main$", lose_answer=True)
    summary, log = run(p)
    assert summary["publish"] == "done"
    assert hub.commits_made == 1 and hub.count("POST", "/commit/") == 1  # not committed a second time
    assert any("landed although its answer was lost" in line for line in log)
    assert hub.repos[REPO].tags == {"v1": hub.head(REPO)} and hub_sha256(hub) == published(p)


def test_rejected_or_missing_token_is_one_error_before_any_upload(hub, inputs, tmp_path, monkeypatch):
    p = make_project(tmp_path / "a", inputs, hub.url)
    stages.run(p, log=lambda m: None, only="merge")
    bad = "hf_wrong_token_SECRET_77665544"
    monkeypatch.setenv("HF_TOKEN", bad)
    hub.reset_stats()
    lines = []
    with pytest.raises(FuseError) as e:
        stages.run(p, log=lines.append)
    f = e.value.finding
    assert f.code == "F502" and "rejected" in f.message and "HF_TOKEN" in f.fix
    assert [r[1] for r in hub.requests] == ["/api/whoami-v2"]  # nothing created, nothing sent
    assert bad not in json.dumps(f.to_dict()) + "\n".join(lines)
    assert bad not in (p.parent / "runs/w/manifest.json").read_text()

    monkeypatch.delenv("HF_TOKEN")
    hub.reset_stats()
    with pytest.raises(FuseError) as e:
        stages.run(p, log=lambda m: None)
    assert e.value.finding.code == "F502" and "no Hugging Face token" in e.value.finding.message
    assert hub.requests == []

    # a read-only token is refused too, before anything is created
    hub.tokens["hf_read_only_token_123"] = {"name": "alice", "orgs": ["acme"], "role": "read"}
    monkeypatch.setenv("HF_TOKEN", "hf_read_only_token_123")
    with pytest.raises(FuseError) as e:
        stages.run(p, log=lambda m: None)
    assert e.value.finding.code == "F502" and "read-only" in e.value.finding.message
    assert REPO not in hub.repos


def test_429_with_retry_after_is_waited_out(hub, inputs, tmp_path, monkeypatch):
    from stages.publishers import base

    p = make_project(tmp_path / "a", inputs, hub.url)
    fuse_sleeps = Sleeps()
    monkeypatch.setattr(base, "time", fuse_sleeps)
    # Fuse's own call (paths-info) and the client's (LFS batch) are both rate limited once
    hub.fail("POST", r"/paths-info/", 429, headers={"Retry-After": "7"}, body={"error": "slow down"})
    hub.fail("POST", r"/info/lfs/objects/batch$", 429, headers={"Retry-After": "3"}, body={"error": "slow down"})
    summary, log = run(p)
    assert summary["publish"] == "done"
    assert fuse_sleeps == [7.0]  # Fuse waited what the Hub asked
    assert 4.0 in hub.client_sleeps  # huggingface_hub waits Retry-After + 1 s
    assert any("429" in line and "retrying in 7s" in line for line in log)
    assert hub_sha256(hub) == published(p)


def test_tag_that_points_at_other_content_is_an_error_and_old_files_are_removed(hub, inputs, tmp_path):
    p = make_project(tmp_path / "a", inputs, hub.url, tag="v1")
    run(p)
    v1, v1_files = hub.head(REPO), hub.files(REPO)
    # a new model (other shard layout) under a new tag: old shards go, the Hub's own files stay
    make_project(tmp_path / "a", inputs, hub.url, tag="v2", shard="60KB")
    hub.reset_stats()
    run(p)
    now = hub.files(REPO)
    assert hub.commits_made == 1 and hub.repos[REPO].tags == {"v1": v1, "v2": hub.head(REPO)}
    assert set(now) - {".gitattributes"} == set(published(p))
    assert {k for k in v1_files if k.startswith("model-")} - set(now)  # stale shards deleted
    assert ".gitattributes" in now
    # the new content under the old tag: refused before anything is sent
    make_project(tmp_path / "a", inputs, hub.url, tag="v1", shard="60KB")
    hub.reset_stats()
    with pytest.raises(FuseError) as e:
        stages.run(p, log=lambda m: None)
    assert e.value.finding.code == "F503" and "never moved" in e.value.finding.message
    assert hub.put_bytes == 0 and hub.count("POST", "/commit/") == 0 and hub.repos[REPO].tags["v1"] == v1


def test_concurrent_commit_on_the_branch_is_detected(hub, inputs, tmp_path):
    p = make_project(tmp_path / "a", inputs, hub.url, tag="v1")
    # someone pushes to main after Fuse read the head and before its commit arrives
    hub.fail("POST", r"/commit/main$", before=lambda h: h.commit_directly(REPO, "notes.txt", b"theirs"))
    with pytest.raises(FuseError) as e:
        stages.run(p, log=lambda m: None)
    assert e.value.finding.code == "F504" and "moved while publishing" in e.value.finding.message
    assert hub.commits_made == 0 and hub.repos[REPO].tags == {}
    run(p)  # the re-run starts from the new head and keeps the other commit's file
    assert hub.read(REPO, "notes.txt") == b"theirs" and hub.commits_made == 1


def test_new_branch_and_card_on_the_hub(hub, inputs, tmp_path):
    from huggingface_hub import ModelCard

    p = make_project(tmp_path / "a", inputs, hub.url, extra=", revision: candidate, private: false")
    run(p)
    repo = hub.repos[REPO]
    assert set(repo.branches) == {"main", "candidate"} and repo.private is False
    assert repo.tags["v1"] == repo.branches["candidate"] != repo.branches["main"]
    card = ModelCard(hub.read(REPO, "README.md", "candidate").decode())
    assert card.data.base_model_relation == "finetune" and card.data.license == "apache-2.0"
    assert card.data.library_name == "transformers" and "lora" in card.data.tags
    assert f'from_pretrained("{REPO}")' in card.text and f"vllm serve {REPO}" in card.text


# --------------------------------------------------------------------------- secrets, end to end


def test_token_never_appears_in_manifest_logs_or_card(hub, inputs, tmp_path):
    """The real CLI in a subprocess, as CI runs it: HF_TOKEN, then trusted publishing (OIDC)."""
    p = make_project(tmp_path / "a", inputs, hub.url)
    secret = "hf_SECRET_token_a8f7d6e5c4b3a2"
    hub.tokens[secret] = {"name": "alice", "orgs": ["acme"], "role": "write"}
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    env.update(HF_HUB_DISABLE_XET="1", HF_TOKEN=secret, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hfhome"), HF_DEBUG="1")
    r = subprocess.run([sys.executable, "-m", "stages", "run", str(p)], cwd=p.parent, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # trusted publishing: an id token exchanged for a repo-scoped Hub token, masked in Actions logs
    hub.oidc = ("gh-oidc-id-token-SECRET-1", "hf_oidc_exchanged_SECRET_99")
    env2 = dict(env, HF_OIDC_RESOURCE=REPO, HF_OIDC_ID_TOKEN=hub.oidc[0], GITHUB_ACTIONS="true")
    env2.pop("HF_TOKEN")
    r2 = subprocess.run([sys.executable, "-m", "stages", "run", str(p), "--only", "publish", "--force"],
                        cwd=p.parent, env=env2, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr
    assert f"Bearer {hub.oidc[1]}" in hub.auth_headers  # the exchanged token was used
    # a rejected token: the error is printed, the token is not
    r3 = subprocess.run([sys.executable, "-m", "stages", "run", str(p), "--only", "publish", "--force"],
                        cwd=p.parent, env=dict(env, HF_TOKEN="hf_bad_SECRET_00112233", HF_DEBUG=""), capture_output=True,
                        text=True, timeout=300)
    assert r3.returncode == 1 and "F502" in r3.stderr and "Traceback" not in r3.stderr
    workdir_text = "".join(f.read_text(errors="replace") for f in (p.parent / "runs/w").rglob("*") if f.is_file()
                           and f.stat().st_size < 10**6)
    on_hub = "".join(hub.read(REPO, f).decode(errors="replace") for f in hub.files(REPO)
                     if not f.endswith(".safetensors"))
    # in GitHub Actions a token may appear only in an ::add-mask:: command, which the runner consumes
    assert f"::add-mask::{hub.oidc[1]}" in r2.stdout + r2.stderr

    def unmasked(text):
        return "\n".join(line for line in text.splitlines() if not line.startswith("::add-mask::"))

    everything = [unmasked(t) for t in (r.stdout, r.stderr, r2.stdout, r2.stderr, r3.stdout, r3.stderr)]
    everything += [workdir_text, on_hub]
    for s in (secret, hub.oidc[0], hub.oidc[1], "hf_bad_SECRET_00112233"):
        for text in everything:
            assert s not in text


# --------------------------------------------------------------------------- parameters, card template


def test_parameters_are_checked_and_a_card_template_is_applied(hub, inputs, tmp_path):
    from huggingface_hub import ModelCard

    p = make_project(tmp_path / "a", inputs, hub.url)
    head = p.read_text().split("  - publish:")[0]
    (p.parent / "card.md").write_text("---\ntags: [support]\n---\n# Acme bot\n\nInternal.\n\n"
                                      "## Limitations\n\nEnglish only.\n")

    def publish_with(params: str):
        p.write_text(head + f"  - publish: {{{params}}}\n")
        return stages.run(p, log=lambda m: None)

    publish_with("to: dir, path: dist, card: card.md")
    card = ModelCard((p.parent / "dist/README.md").read_text())
    assert card.data.tags[-1] == "support" and card.data.license == "apache-2.0"
    assert "# Acme bot" in card.text and "English only." in card.text and "## Lineage" in card.text
    for params, code, words in [
        ("to: dir, path: dist, repo_id: acme/x", "F501", "'repo_id' is a parameter of to: hub"),
        ("to: hub, tag: v1", "F501", "needs repo_id"),
        ("to: s3, url: 's3://b/p', tag: v1", "F501", "'tag' is a parameter of to: hub"),
        ("to: dir, path: dist, card: missing.md", "F507", "cannot read the card template"),
    ]:
        with pytest.raises(FuseError) as e:
            publish_with(params)
        assert e.value.finding.code == code and words in e.value.finding.message, (params, e.value.finding)
        assert e.value.finding.line == 8  # the publish line of pipeline.yaml
    assert hub.requests == []


# --------------------------------------------------------------------------- kills

SLOW = os.environ.get("FUSE_SLOW") == "1"
KILLS = ["hub:before-commit", "lfs-put@1", "hub:committed", "hub:before-tag"]
KILLS_SLOW = KILLS + ["lfs-put@0", "commit-request"]


def _branch_commits(hub: FakeHub, repo_id: str) -> int:
    repo, n, c = hub.repos[repo_id], 0, hub.head(repo_id)
    while c:
        n, c = n + 1, repo.commits[c]["parent"]
    return n


@pytest.mark.parametrize("point", KILLS_SLOW if SLOW else KILLS)
def test_kill_during_a_hub_publish_then_rerun_is_identical(hub, tmp_path, point):
    """Issue 12, 8: the publishing process dies (kill -9) before the commit, during an LFS upload,
    after the commit, before the tag; the re-run ends as an uninterrupted publish: the same
    files, one commit, the tag on it."""
    from test_publish_dir import release, run_publisher

    files = release(tmp_path / "src", 2)
    env = {"HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hfhome"), "HF_HUB_OFFLINE": None,
           "TRANSFORMERS_OFFLINE": None, "HF_OIDC_RESOURCE": None, "GITHUB_ACTIONS": None, "HF_ENDPOINT": None}

    def params(repo):
        return {"repo_id": repo, "endpoint": hub.url, "tag": "v1", "message": "Publish tiny"}

    assert run_publisher("hub", params("acme/reference"), files, tmp_path / "ref.json", env=env).returncode == 0
    spec = tmp_path / "spec.json"
    if point.startswith("hub:"):
        r = run_publisher("hub", params(REPO), files, spec, kill=point, env=env)
        assert r.returncode == 137, r.stderr
    else:  # killed from the server's side, while the request is arriving
        name, _, skip = point.partition("@")
        proc = run_publisher("hub", params(REPO), files, spec, env=env, popen=True)
        method, path = ("PUT", r"/_lfs/") if name == "lfs-put" else ("POST", r"/commit/main$")
        hub.fail(method, path, before=lambda h: proc.kill(), skip=int(skip or 0))
        proc.communicate(timeout=300)
        assert proc.returncode == -9
    r = run_publisher("hub", params(REPO), files, spec, env=env)
    assert r.returncode == 0, r.stderr
    held = {p: hub.read(REPO, p) for p in hub.files(REPO)}
    assert held == {p: hub.read("acme/reference", p) for p in hub.files("acme/reference")}
    assert {p: hashlib.sha256(d).hexdigest() for p, d in held.items() if p != ".gitattributes"} == \
        {f.path: f.sha256 for f in files}
    assert _branch_commits(hub, REPO) == _branch_commits(hub, "acme/reference") == 2  # the repo's first + ours
    assert hub.repos[REPO].tags == {"v1": hub.head(REPO)} and hub.repos[REPO].parts == {}
