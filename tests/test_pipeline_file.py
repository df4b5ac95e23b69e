"""The pipeline file: every mistake is one finding naming file:line:key, exit 2, no traceback."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stages.findings import FuseError
from stages.pipeline import load

GOOD = """\
version: 1
name: demo
base: base
adapter: adapter
stages:
  - validate
  - merge: {dtype: bfloat16}
  - publish: {to: dir, path: out}
"""


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "adapter").mkdir()
    return tmp_path


def write(tree: Path, text: str, name="pipeline.yaml") -> Path:
    p = tree / name
    p.write_text(textwrap.dedent(text))
    return p


def test_good_pipeline_resolves_paths_ids_and_defaults(tree):
    p = load(write(tree, GOOD))
    assert p.name == "demo"
    assert p.base == str((tree / "base").resolve())
    assert p.adapters[0].path == (tree / "adapter").resolve() and p.adapters[0].weight == 1.0
    assert p.workdir == (tree / "runs" / "demo").resolve()  # default workdir runs/${name}, relative to the file
    assert [s.id for s in p.stages] == ["validate", "merge", "publish"]
    merge = p.stage("merge").params
    assert merge["dtype"] == "bfloat16" and merge["max_shard_size"] == "5GB"  # given, and a default
    assert merge["method"] == "linear" and merge["base_precision"] == "original"
    assert p.stage("publish").params["path"] == str((tree / "out").resolve())


def test_paths_resolve_against_the_pipeline_dir_not_the_cwd(tree, monkeypatch):
    sub = tree / "elsewhere"
    sub.mkdir()
    monkeypatch.chdir(sub)
    p = load(write(tree, GOOD))
    assert p.base == str((tree / "base").resolve())


def test_interpolation_name_env_and_set(tree, monkeypatch):
    monkeypatch.setenv("OUT_DIR", "published")
    monkeypatch.setenv("SECRET_TOKEN", "hf_supersecretvalue")
    text = GOOD.replace("path: out", "path: '${env.OUT_DIR}/${name}'").replace(
        "version: 1", "version: 1\nworkdir: work/${name}")
    p = load(write(tree, text), overrides=["merge.dtype=float16"])
    assert p.workdir == (tree / "work" / "demo").resolve()
    assert p.stage("publish").params["path"] == str((tree / "published" / "demo").resolve())
    # what may be written down keeps the placeholder, not the value
    assert p.stage("publish").recorded["path"] == "${env.OUT_DIR}/${name}"
    assert p.stage("merge").params["dtype"] == "float16"
    assert p.secrets == set()  # OUT_DIR is a path, not a secret: only secret-looking names are redacted


def test_same_stage_twice_with_ids_and_from(tree):
    text = GOOD + "  - publish: {id: publish-2, to: dir, path: out2, from: merge}\n"
    p = load(write(tree, text))
    assert p.stage("publish-2").from_id == "merge"


def test_hub_id_base_is_kept_for_resolution_at_run_time(tree):
    p = load(write(tree, GOOD.replace("base: base", "base: HuggingFaceTB/SmolLM2-135M@main")))
    assert p.base == "HuggingFaceTB/SmolLM2-135M@main"


CASES = [
    ("bad yaml", "name: demo\nbase: [unclosed\nadapter: adapter\n", "F101", 3, None),
    ("tab indentation", "name: demo\nstages:\n\t- merge\n", "F101", 3, None),
    ("unknown top key", GOOD + "extra: 1\n", "F102", 9, "extra"),
    ("unknown stage param", GOOD.replace("{dtype: bfloat16}", "{dtyp: bfloat16}"), "F102", 7, "merge.dtyp"),
    ("duplicate yaml key", GOOD.replace("name: demo", "name: demo\nname: again"), "F102", 3, "name"),
    ("wrong type", GOOD.replace("{dtype: bfloat16}", "{dtype: 16}"), "F103", 7, "merge.dtype"),
    ("bad choice", GOOD.replace("{dtype: bfloat16}", "{dtype: int3}"), "F103", 7, "merge.dtype"),
    ("stages not a list", GOOD.split("stages:")[0] + "stages: merge\n", "F103", 5, "stages"),
    ("version 2", GOOD.replace("version: 1", "version: 2"), "F103", 1, "version"),
    ("bad name", GOOD.replace("name: demo", "name: 'a b/c'"), "F103", 2, "name"),
    ("missing base", GOOD.replace("base: base\n", ""), "F104", 1, "base"),
    ("missing stages", GOOD.split("stages:")[0], "F104", 1, "stages"),
    ("missing publish target", GOOD.replace("{to: dir, path: out}", "{path: out}"), "F104", 8, "publish.to"),
    ("missing base path", GOOD.replace("base: base", "base: ./no/such/model"), "F105", 3, "base"),
    ("missing adapter path", GOOD.replace("adapter: adapter", "adapter: missing-adapter"), "F105", 4, "adapter"),
    ("duplicate id", GOOD + "  - merge\n", "F106", 9, "stages[3]"),
    ("unknown stage", GOOD + "  - quantise\n", "F107", 9, "stages[3]"),
    ("from names no earlier stage", GOOD.replace("{to: dir, path: out}", "{to: dir, path: out, from: nope}"),
     "F108", 8, "publish.from"),
    ("publish without a model", GOOD.replace("  - merge: {dtype: bfloat16}\n", ""), "F108", 7, "publish"),
    ("undefined env var", GOOD.replace("path: out", "path: '${env.FUSE_TEST_UNSET_VAR}'"), "F110", 8, "path"),
    ("unknown variable", GOOD.replace("path: out", "path: '${nme}'"), "F110", 8, "path"),
]


@pytest.mark.parametrize("label,text,code,line,key", CASES, ids=[c[0] for c in CASES])
def test_each_mistake_names_file_line_and_key(tree, label, text, code, line, key):
    path = write(tree, text)
    with pytest.raises(FuseError) as e:
        load(path)
    f = e.value.finding
    assert f.code == code, f.line_text()
    assert f.file == str(path)
    assert f.line == line, f.line_text()
    if key:
        assert key in (f.key or ""), f.line_text()


SET_CASES = [
    ("merge.dtype", "F109"),  # no '='
    ("nosuch.dtype=float16", "F109"),
    ("merge.dtyp=float16", "F109"),
    ("merge.dtype=float8", "F109"),
]


@pytest.mark.parametrize("override,code", SET_CASES)
def test_bad_set_overrides(tree, override, code):
    with pytest.raises(FuseError) as e:
        load(write(tree, GOOD), overrides=[override])
    assert e.value.finding.code == code
    assert e.value.finding.file == "--set"


def test_missing_pipeline_file(tmp_path):
    with pytest.raises(FuseError) as e:
        load(tmp_path / "nope.yaml")
    assert e.value.finding.code == "F105"


def test_non_utf8_pipeline(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(FuseError) as e:
        load(p)
    assert e.value.finding.code == "F101"


def cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "stages", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=120)


@pytest.mark.parametrize("label,text,code,line,key", [CASES[i] for i in (0, 2, 5, 13, 15)],
                         ids=[CASES[i][0] for i in (0, 2, 5, 13, 15)])
def test_cli_prints_one_finding_exit_2_no_traceback(tree, label, text, code, line, key):
    path = write(tree, text)
    r = cli("run", str(path))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error {code} {path}:{line}"), r.stderr
    assert not (tree / "runs").exists()  # nothing written


def test_cli_annotation_under_github_actions(tree):
    path = write(tree, CASES[2][1])
    r = cli("run", str(path), env={"GITHUB_ACTIONS": "true"})
    assert r.returncode == 2
    assert r.stderr.startswith(f"::error file={path},line=9,title=F102"), r.stderr


def test_pipeline_error_is_reported_before_torch_loads(tree):
    """Lazy imports: a bad pipeline must not wait for `import torch`."""
    path = write(tree, CASES[2][1])
    code = ("import sys, stages.__main__ as m; rc = m.main(['run', %r]); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)" % str(path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False False", r.stdout + r.stderr


def test_cross_parameter_rules_are_checked_when_the_file_loads(tree):
    """publish to: hub without repo_id fails before any stage runs, on the step's line."""
    with pytest.raises(FuseError) as e:
        load(write(tree, GOOD.replace("{to: dir, path: out}", "{to: hub}")))
    assert e.value.finding.code == "F501" and e.value.finding.line == 8 and "repo_id" in e.value.finding.message


def test_float_parameters_accept_yaml_exponent_strings(tree):
    p = load(write(tree, GOOD.replace("  - merge: {dtype: bfloat16}\n",
                                      "  - merge: {dtype: bfloat16}\n  - check: {max_kl: 1e-12}\n")))
    assert p.stage("check").params["max_kl"] == 1e-12


def test_the_example_pipeline_loads(tmp_path, monkeypatch):
    """examples/ must stay valid as the schema moves (its adapter comes from a training job)."""
    import shutil

    (tmp_path / "examples").mkdir()
    shutil.copy(Path(__file__).parents[1] / "examples" / "qwen2.5-7b-support.yaml", tmp_path / "examples")
    (tmp_path / "outputs" / "qwen2.5-7b-support-lora").mkdir(parents=True)
    monkeypatch.setenv("RUNNER_TEMP", str(tmp_path / "tmp"))
    p = load(tmp_path / "examples" / "qwen2.5-7b-support.yaml")
    assert p.base == "Qwen/Qwen2.5-7B-Instruct"
    assert [s.name for s in p.stages] == ["validate", "merge", "check", "quantize", "publish", "publish"]
    assert p.stage("publish-gptq").from_id == "quantize"


def test_docs_stage_parameters_are_generated_from_the_stage_modules():
    """docs/pipeline.md embeds `python -m stages params`: a parameter added, renamed or given a new
    default in code without the docs fails here."""
    from stages.pipeline import params_reference

    text = (Path(__file__).resolve().parents[1] / "docs/pipeline.md").read_text()
    embedded = text.split("<!-- params:begin -->\n", 1)[1].split("<!-- params:end -->", 1)[0]
    assert embedded == params_reference(), \
        "docs/pipeline.md is stale: replace the params block with the output of `python -m stages params`"


def test_params_command_prints_a_stage_and_refuses_an_unknown_one(tmp_path):
    from cli import fuse

    r = fuse("params", "quantize", cwd=tmp_path)
    assert r.returncode == 0 and "| `group_size` | int | `128` |" in r.stdout and "### `merge`" not in r.stdout
    r = fuse("params", "quantise", cwd=tmp_path, check=False)
    assert r.returncode == 2 and "F108" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- hostile files (issue 12 point 6)

BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
name: demo
base: base
stages: *i
"""
HEAD = "version: 1\nname: demo\nbase: base\nadapter: adapter\n"

HOSTILE = [
    ("alias bomb", BILLION_LAUGHS, "F112", 5, "e"),  # 'e' is the first key whose value passes 10000
    ("self-referencing alias", HEAD + "stages: &s [merge, *s]\n", "F112", 5, "stages"),
    ("self-referencing mapping", HEAD + "stages:\n  - merge: &m {dtype: *m}\n", "F112", 6, "merge"),
    ("5000-deep list", HEAD + "stages: " + "[" * 5000 + "]" * 5000 + "\n", "F112", 5, None),
    ("5000-deep map", HEAD + "stages: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n", "F112", 5, None),
    ("200-deep block list", HEAD + "stages:\n" + "".join("  " * i + "-\n" for i in range(1, 200)), "F112", None, None),
    ("!!float xyz", GOOD.replace("{dtype: bfloat16}", "{dtype: !!float xyz}"), "F103", 7, "merge.dtype"),
    ("!!bool maybe", GOOD.replace("  - validate\n", "  - validate: {strict: !!bool maybe}\n"), "F103", 6, "strict"),
    ("5000-digit int", GOOD.replace("  - validate\n", "  - check: {probes: " + "9" * 5000 + "}\n"), "F103", 6,
     "probes"),
    ("bad date", GOOD.replace("name: demo", "name: 2020-13-45"), "F103", 2, "name"),
    ("unknown tag", GOOD.replace("name: demo", "name: !foo demo"), "F112", 2, None),
    ("python tag", GOOD.replace("name: demo", "name: !!python/object/apply:os.system ['true']"), "F112", 2, None),
    ("binary tag", GOOD.replace("name: demo", "name: !!binary aGVsbG8="), "F112", 2, None),
    ("tag on a mapping", GOOD.replace("{dtype: bfloat16}", "!!python/object:x {dtype: bfloat16}"), "F112", 7, None),
    ("control character", GOOD.replace("name: demo", "name: de\x07mo"), "F101", 2, None),
    ("256-character name", GOOD.replace("name: demo", "name: " + "a" * 256), "F103", 2, "name"),
    ("101-character name", GOOD.replace("name: demo", "name: " + "a" * 101), "F103", 2, "name"),
    ("non-ASCII name", GOOD.replace("name: demo", "name: démo"), "F103", 2, "name"),
    ("256-character id", GOOD.replace("{dtype: bfloat16}", "{id: " + "m" * 256 + "}"), "F103", 7, "merge.id"),
    ("id with a slash", GOOD.replace("{dtype: bfloat16}", "{id: ../escape}"), "F103", 7, "merge.id"),
    ("id manifest.json", GOOD.replace("{dtype: bfloat16}", "{id: manifest.json}"), "F103", 7, "merge.id"),
    ("id logs", GOOD.replace("{dtype: bfloat16}", "{id: Logs}"), "F103", 7, "merge.id"),
    ("ids differing in case", GOOD + "  - merge: {id: MERGE}\n", "F106", 9, None),
    ("NUL in a path", GOOD.replace("path: out", 'path: "o\\0ut"'), "F103", 8, "publish.path"),
    ("256-byte path component", GOOD.replace("path: out", "path: " + "o" * 256), "F103", 8, "publish.path"),
    ("256-byte calibration file name", GOOD.replace("  - validate\n", "").replace(
        "  - publish", "  - quantize: {calibration: {dataset: " + "c" * 300 + ".txt}}\n  - publish"), "F103", 7,
     "quantize"),
    ("NaN weight", GOOD.replace("adapter: adapter", "adapters: [{path: adapter, weight: .nan}]"), "F103", 4,
     "weight"),
    ("NaN threshold", GOOD.replace("  - validate\n", "  - check: {max_kl: .nan}\n"), "F103", 6, "max_kl"),
    ("101 stages", GOOD.split("stages:")[0] + "stages: [" + ", ".join(f"{{merge: {{id: m{i}}}}}" for i in range(101))
     + "]\n", "F103", 5, "stages"),
    ("dotted pkg that is not installed", GOOD.replace("path: out", "path: '${pkg.no_such_pkg.sub}'"), "F110", 8,
     None),
]


@pytest.mark.parametrize("label,text,code,line,key", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_files_are_one_finding(tree, label, text, code, line, key):
    path = write(tree, text)
    with pytest.raises(FuseError) as e:
        load(path)
    f = e.value.finding
    assert f.code == code, f.line_text()
    assert f.file == str(path) and "\n" not in f.line_text() and len(f.line_text()) < 600, f.line_text()
    if line:
        assert f.line == line, f.line_text()
    if key:
        assert key in (f.key or ""), f.line_text()


def test_a_file_past_the_size_limit_is_refused_without_reading_it_all(tree):
    from stages.pipeline import MAX_BYTES

    path = write(tree, GOOD + "# padding\n" * (MAX_BYTES // 10))
    with pytest.raises(FuseError) as e:
        load(path)
    assert e.value.finding.code == "F112" and "256 KiB" in e.value.finding.message
    if os.path.exists("/dev/zero"):  # an endless file: read up to the limit only
        with pytest.raises(FuseError) as e:
            load("/dev/zero")
        assert e.value.finding.code == "F112"


def test_anchors_and_aliases_within_the_budget_still_work(tree):
    text = HEAD + "stages:\n  - merge: {dtype: float16}\n  - merge: {id: merge-2, dtype: bfloat16}\n" \
                  "  - publish: {to: dir, path: &p out}\n  - publish: {id: p2, to: dir, path: *p, from: merge-2}\n"
    p = load(write(tree, text))
    assert p.stage("p2").params["path"] == str((tree / "out").resolve())
    assert p.lines[("stages", 3, "publish", "path")] == 9  # line numbers survive aliases


@pytest.mark.parametrize("value", ["[" * 5000 + "]" * 5000, "&a [*a]", "!!python/object:os.system x", "!!float xyz"])
def test_set_values_get_the_same_limits(tree, value):
    with pytest.raises(FuseError) as e:
        load(write(tree, GOOD), overrides=[f"merge.dtype={value}"])
    assert e.value.finding.code == "F109" and "\n" not in e.value.finding.line_text()


@pytest.mark.parametrize("label", ["alias bomb", "self-referencing alias", "5000-deep list", "!!float xyz",
                                   "unknown tag", "256-character name", "id with a slash"])
def test_cli_refuses_hostile_files_with_one_line(tree, label):
    _, text, code, line, _ = next(c for c in HOSTILE if c[0] == label)
    path = write(tree, text)
    r = cli("run", str(path))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error {code} {path}:{line or ''}"), r.stderr
    assert not (tree / "runs").exists()
