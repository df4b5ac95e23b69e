"""One redaction rule (stages/secrets.py) at every exit, and no secret in a published or path field.

The examples of issue 12 point 5: a secret from ``${env.MY_TOKEN}`` in the final F505 line, in a
load-time finding (``merge.dtype: '<value>' is not allowed``), in ``--set merge.dtype=$MY_TOKEN``
and in the model card (through ``repo_id``).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stages import secrets
from stages.findings import Finding, FuseError
from stages.pipeline import STAGE_MODULES, load, stage_module
from test_pipeline_file import GOOD  # the same small pipeline

SECRET = "hf_MY_SECRET_value_9f8e7d6c5b4a"
ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture
def tree(tmp_path, monkeypatch):
    (tmp_path / "base").mkdir()
    (tmp_path / "adapter").mkdir()
    monkeypatch.setenv("MY_TOKEN", SECRET)
    return tmp_path


def write(tree: Path, text: str) -> Path:
    p = tree / "pipeline.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def cli(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "stages", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "MY_TOKEN": SECRET, **(env or {})}, timeout=120)


# --------------------------------------------------------------------------- the rule


def test_secret_names_are_whole_words_and_not_locations():
    for name in ("HF_TOKEN", "MY_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "OPENAI_API_KEY", "GITHUB_TOKEN"):
        assert secrets.is_secret_name(name), name
    for name in ("TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE", "AUTHOR", "PATH", "HF_TOKEN_PATH",
                 "AWS_SHARED_CREDENTIALS_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        assert not secrets.is_secret_name(name), name


def test_one_rule_minimum_length_six_each_line_longest_first(monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "true")  # a flag: 4 characters, never redacted
    monkeypatch.setenv("SOME_API_KEY", "line-one-secret\nline-two-secret")
    monkeypatch.setenv("SHORT_TOKEN", "abcde")  # 5: below the minimum
    monkeypatch.setenv("MY_TOKEN", SECRET)
    text = f"true abcde {SECRET} line-two-secret x{SECRET}y"
    assert secrets.redact(text) == "true abcde *** *** x***y"
    assert secrets.redact("abc123 and more", {"abc123"}) == "*** and more"  # given secrets count too
    assert secrets.MIN_SECRET_LEN == 6
    # every module that redacts uses this one function
    from stages import manifest
    from stages.publishers import base
    assert manifest.redact is base.redact is secrets.redact and manifest.redact_data is secrets.redact_data


def test_redact_data_keeps_json_valid(monkeypatch):
    monkeypatch.setenv("MY_TOKEN", 'a"b\\c{d}' + SECRET)
    data = {"flag": False, "x": [f'see a"b\\c{{d}}{SECRET}'], f'a"b\\c{{d}}{SECRET}': 1}
    out = json.loads(json.dumps(secrets.redact_data(data, ())))
    assert out == {"flag": False, "x": ["see ***"], "***": 1}


def test_remembered_credentials_are_redacted_everywhere(monkeypatch):
    monkeypatch.setattr(secrets, "_remembered", set())
    secrets.remember({"token-from-a-file-123"})
    assert secrets.redact("got token-from-a-file-123") == "got ***"
    assert "token-from-a-file-123" not in Finding("F502", "token-from-a-file-123 rejected").line_text()


def test_the_cli_streams_redact_a_secret_written_in_pieces(monkeypatch):
    monkeypatch.setenv("MY_TOKEN", SECRET)
    buf = io.StringIO()
    s = secrets.RedactingStream(buf)
    s.write("progress " + SECRET[:7])
    s.write(SECRET[7:] + " done\r")
    s.write("::add-mask::" + SECRET + "\n")  # GitHub's masking command is the one line that carries it
    s.write("tail " + SECRET)
    s.flush()
    assert buf.getvalue() == f"progress *** done\r::add-mask::{SECRET}\ntail ***"


def test_a_captured_library_log_is_redacted(tmp_path, monkeypatch):
    """quantize/export keep what GPTQModel or torch.onnx print in <workdir>/logs/<id>.log: a file Fuse writes."""
    from stages.quantization.capture import captured

    monkeypatch.setenv("MY_TOKEN", SECRET)
    log = tmp_path / "logs" / "quantize.log"
    with captured(log):
        os.write(1, f"a C extension prints {SECRET}\n".encode())
        os.write(2, f"and on stderr {SECRET[:9]}".encode())
        os.write(2, f"{SECRET[9:]}\n".encode())
    assert log.read_text() == "a C extension prints ***\nand on stderr ***\n"


def test_mask_secrets_uses_the_same_rule(monkeypatch):
    from stages import report

    for k in list(os.environ):
        if secrets.is_secret_name(k):
            monkeypatch.delenv(k)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "true")
    monkeypatch.setenv("MY_TOKEN", SECRET)
    monkeypatch.setattr(secrets, "_remembered", set())  # credentials earlier tests' publishers found
    buf = io.StringIO()
    report.mask_secrets(buf)
    assert buf.getvalue() == f"::add-mask::{SECRET}\n"


def test_findings_redact_when_rendered(monkeypatch):
    monkeypatch.setenv("MY_TOKEN", SECRET)
    f = Finding("F505", f"whoami on acme/model-{SECRET} failed", file=f"/x/{SECRET}/p.yaml", line=3,
                fix=f"check {SECRET}")
    for text in (f.line_text(), f.annotation(), str(FuseError("F505", SECRET))):
        assert SECRET not in text and "***" in text, text


def test_the_manifest_redacts_environment_secrets_it_was_not_given(tmp_path, monkeypatch):
    from stages import manifest as mf

    monkeypatch.setenv("MY_TOKEN", SECRET)
    m = mf.Manifest(tmp_path)
    m.data["stages"]["merge"] = {"error": Finding("F406", f"boom {SECRET}").to_dict()}
    m.save()
    assert SECRET not in (tmp_path / "manifest.json").read_text()


# --------------------------------------------------------------------------- issue 12 point 5, one by one


def test_a_load_time_finding_does_not_print_the_value(tree):
    path = write(tree, GOOD.replace("{dtype: bfloat16}", "{dtype: '${env.MY_TOKEN}'}"))
    with pytest.raises(FuseError) as e:
        load(path)
    f = e.value.finding
    assert f.code == "F103" and f.line == 7 and SECRET not in f.line_text() and "'***' is not allowed" in f.line_text()
    for env in ({}, {"GITHUB_ACTIONS": "true"}):
        r = cli("run", str(path), cwd=tree, env=env)
        shown = [line for line in (r.stderr + r.stdout).splitlines() if not line.startswith("::add-mask::")]
        assert r.returncode == 2 and SECRET not in "\n".join(shown) and "F103" in r.stderr, r.stderr


def test_set_with_a_secret_value_is_read_as_its_placeholder(tree):
    path = write(tree, GOOD)
    with pytest.raises(FuseError) as e:
        load(path, overrides=[f"merge.dtype={SECRET}"])
    f = e.value.finding
    assert f.code == "F109" and "merge.dtype=${env.MY_TOKEN}" in f.message and SECRET not in f.line_text()
    r = cli("status", str(path), "--set", f"merge.dtype={SECRET}", cwd=tree)
    assert r.returncode == 2 and SECRET not in r.stderr + r.stdout and "${env.MY_TOKEN}" in r.stderr
    # where it is allowed (not a path, not published) it is used, and written down as the placeholder
    p = load(path, overrides=[f"merge.max_shard_size={SECRET}"])
    assert p.stage("merge").params["max_shard_size"] == SECRET
    assert p.stage("merge").recorded["max_shard_size"] == "${env.MY_TOKEN}" and SECRET in p.secrets
    assert SECRET not in json.dumps(p.recorded)


PUBLISHED = [
    ("name", GOOD.replace("name: demo", "name: '${env.MY_TOKEN}'"), "name"),
    ("base", GOOD.replace("base: base", "base: 'org/${env.MY_TOKEN}'"), "base"),
    ("adapter", GOOD.replace("adapter: adapter", "adapter: '${env.MY_TOKEN}'"), "adapter"),
    ("adapters", GOOD.replace("adapter: adapter", "adapters: [{path: '${env.MY_TOKEN}'}]"), "adapters[0].path"),
    ("workdir", GOOD.replace("version: 1", "version: 1\nworkdir: 'runs/${env.MY_TOKEN}'"), "workdir"),
    ("publish path", GOOD.replace("path: out", "path: 'out-${env.MY_TOKEN}'"), "publish.path"),
    ("repo_id (the card's model id)", GOOD.replace("{to: dir, path: out}",
                                                   "{to: hub, repo_id: 'acme/model-${env.MY_TOKEN}'}"), "repo_id"),
    ("commit message", GOOD.replace("{to: dir, path: out}",
                                    "{to: hub, repo_id: acme/m, message: 'x ${env.MY_TOKEN}'}"), "message"),
    ("tag", GOOD.replace("{to: dir, path: out}", "{to: hub, repo_id: acme/m, tag: '${env.MY_TOKEN}'}"), "tag"),
    ("card template", GOOD.replace("path: out", "path: out, card: '${env.MY_TOKEN}.md'"), "card"),
    ("s3 url", GOOD.replace("{to: dir, path: out}", "{to: s3, url: 's3://b/${env.MY_TOKEN}'}"), "url"),
    ("a plain-named variable holding the secret", GOOD.replace("name: demo", "name: '${env.PLAIN_ALIAS}'"), "name"),
]


@pytest.mark.parametrize("label,text,key", PUBLISHED, ids=[c[0] for c in PUBLISHED])
def test_a_secret_in_a_published_or_path_field_is_refused_at_load(tree, monkeypatch, label, text, key):
    monkeypatch.setenv("PLAIN_ALIAS", SECRET)
    with pytest.raises(FuseError) as e:
        load(write(tree, text))
    f = e.value.finding
    assert f.code == "F113" and key in f.key and f.line, f.line_text()
    assert "MY_TOKEN" in f.message and "environment" in f.fix and SECRET not in f.line_text()


def test_set_cannot_put_a_secret_into_a_published_field(tree):
    path = write(tree, GOOD.replace("{to: dir, path: out}", "{to: hub, repo_id: acme/model}"))
    with pytest.raises(FuseError) as e:
        load(path, overrides=[f"publish.repo_id=acme/{SECRET}"])
    assert e.value.finding.code == "F113" and SECRET not in e.value.finding.line_text()
    r = cli("run", str(path), "--set", f"publish.repo_id=acme/{SECRET}", cwd=tree)
    assert r.returncode == 2 and "F113" in r.stderr and SECRET not in r.stderr + r.stdout
    assert not (tree / "runs").exists()


def test_the_final_error_line_and_anything_printed_are_redacted(tree, monkeypatch, capsys):
    """The F505 example: whatever a publisher or a library prints, the CLI's streams redact it."""
    import stages
    import stages.__main__ as cli_main

    def failing_run(*a, **kw):
        print(f"a library says: token={SECRET}")
        print(f"partial {SECRET[:5]}", end="", file=sys.stderr)
        print(SECRET[5:], file=sys.stderr)
        raise FuseError("F505", f"whoami on acme/model-{SECRET} failed", fix=f"check {SECRET}")

    monkeypatch.setattr(stages, "run", failing_run)
    assert cli_main.main(["run", str(write(tree, GOOD))]) == 1
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err and "error F505" in out.err and "partial ***" in out.err
    assert sys.stdout is not None and not isinstance(sys.stdout, secrets.RedactingStream)  # restored


def test_every_published_parameter_is_documented():
    """docs/pipeline.md lists the fields a secret may not flow into; a new published parameter must be there."""
    text = (ROOT / "docs" / "pipeline.md").read_text()
    section = text.split("<!-- published:begin -->", 1)[1].split("<!-- published:end -->", 1)[0]
    for name in STAGE_MODULES:
        for key, spec in stage_module(name).PARAMS.items():
            if spec.published or spec.type == "path":
                assert f"`{name}.{key}`" in section, f"docs/pipeline.md: {name}.{key} is published or a path"
    for key in ("name", "base", "adapter", "adapters", "workdir"):
        assert f"`{key}`" in section
