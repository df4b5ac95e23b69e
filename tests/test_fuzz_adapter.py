"""Fuzzing the reader contract: generated safetensors files and mutated adapters.

Three generators, each with a seed printed at the start of the test (``FUSE_FUZZ_SEED=<n>``
replays it; a failure also prints hypothesis' own reproduction line):

1. generated safetensors files (valid layouts, then one mutation: a random JSON value for an
   entry, the length field off by a few bytes, truncation, appended bytes, overlapping or
   shifted offsets, dtypes and shapes of the wrong type, raw byte flips) -> ``read_header``
   returns tensors that tile the file exactly and that the safetensors library reads the same
   way, or raises F206 (F209 for a real dtype Fuse does not merge);
2. byte-level and value-level mutations of the demo adapter (adapter_model.safetensors and
   adapter_config.json) -> loading it and planning its merge onto a header-only base succeeds
   or raises a F2xx finding, never another exception;
3. end-to-end: ``python -m stages merge BASE ADAPTER OUT``, or a ``[merge, publish]`` pipeline
   (no validate stage: the readers alone stand guard), in a subprocess on a tiny base from
   tests/factory.py with a mutated adapter, under an address-space limit and a timeout -> exit
   0, 1 or 2, no traceback, no "bug in Fuse" (F406), one finding line for exit 2, nothing
   written outside OUT (the workdir and the publish directory for the pipeline).

A few hundred in-process examples by default (seconds); thousands with ``FUSE_SLOW=1``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st

from stages.findings import FuseError
from stages.io.safetensors import ITEMSIZE, read_header

SLOW = os.environ.get("FUSE_SLOW") == "1"
SEED = int(os.environ.get("FUSE_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
DEMO = Path(__file__).resolve().parent.parent / "demo" / "adapter"


def examples(default: int, slow: int):
    return settings(max_examples=slow if SLOW else default, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def _print_seed():
    print(f"\nhypothesis seed: {SEED} (replay with FUSE_FUZZ_SEED={SEED})")


# ---------------------------------------------------------------- 1. generated safetensors files

JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
                    | st.text(max_size=6), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
MUTATIONS = ("none", "entry", "field", "length", "truncate", "append", "shift", "overlap", "metadata", "flip")


@st.composite
def safetensors_files(draw) -> tuple[bytes, str]:
    names = draw(st.lists(st.text(min_size=1, max_size=10).filter(lambda s: s != "__metadata__"), max_size=5,
                          unique=True))
    header, offset = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    data = draw(st.binary(min_size=offset, max_size=offset))
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))
    if metadata is not None:
        header["__metadata__"] = metadata
    mutation = draw(st.sampled_from(MUTATIONS))
    tensors = [k for k in header if k != "__metadata__"]
    if mutation == "entry" and tensors:
        header[draw(st.sampled_from(tensors))] = draw(JSON)
    elif mutation == "field" and tensors:
        entry = header[draw(st.sampled_from(tensors))]
        entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(
            JSON | st.sampled_from(["F4", "C64", "f32", "", ["F32"]]) | st.lists(st.integers(-3, 2**65), max_size=3))
    elif mutation == "shift" and tensors:
        entry = header[draw(st.sampled_from(tensors))]
        delta = draw(st.integers(-9, 9))
        entry["data_offsets"] = [entry["data_offsets"][0] + delta, entry["data_offsets"][1] + delta]
    elif mutation == "overlap" and len(tensors) > 1:
        a, b = draw(st.permutations(tensors))[:2]
        size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
        start = header[a]["data_offsets"][0]
        header[b]["data_offsets"] = [start, start + size]
    elif mutation == "metadata":
        header["__metadata__"] = draw(JSON)
    text = json.dumps(header).encode()
    text += b" " * draw(st.integers(0, 16))
    length = len(text) + (draw(st.integers(-12, 12)) if mutation == "length" else 0)
    blob = struct.pack("<Q", max(length, 0)) + text + data
    if mutation == "truncate":
        blob = blob[: draw(st.integers(0, max(len(blob) - 1, 0)))]
    elif mutation == "append":
        blob += draw(st.binary(min_size=1, max_size=16))
    elif mutation == "flip" and blob:
        raw = bytearray(blob)
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        blob = bytes(raw)
    return blob, mutation


def assert_contract(path: Path, blob: bytes) -> list | None:
    """The tensors read_header returns tile the file exactly and match the safetensors library;
    otherwise it raised F206/F209 naming the file, with a fix, on one line."""
    try:
        tensors, metadata = read_header(path)
    except FuseError as e:
        f = e.finding
        event(f.code)
        assert f.code in ("F206", "F209"), f.line_text()
        assert f.file == str(path) and f.fix and "\n" not in f.line_text(), f.line_text()
        return None
    (n,) = struct.unpack("<Q", blob[:8])
    pos = 8 + n
    for t in tensors:
        assert t.start == pos and t.nbytes == math.prod(t.shape) * ITEMSIZE[t.dtype], t
        pos = t.end
    assert pos == len(blob)
    event("accepted")
    assert isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    from safetensors import safe_open  # the oracle: what Fuse accepts, the format's own reader accepts alike

    with safe_open(path, "pt") as f:
        assert sorted(f.keys()) == sorted(t.name for t in tensors)
        for t in tensors:
            sl = f.get_slice(t.name)
            assert (sl.get_dtype(), tuple(sl.get_shape())) == (t.dtype, t.shape)
    return tensors


@seed(SEED)
@examples(400, 5000)
@given(case=safetensors_files())
def test_generated_headers_tile_the_file_or_are_F206(case):
    blob, mutation = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        path.write_bytes(blob)
        tensors = assert_contract(path, blob)
    if mutation == "none":
        assert tensors is not None, "a valid file was refused"


# ---------------------------------------------------------------- 2. the demo adapter, mutated, in process


def header_only_base(adapter_file: Path, out: Path) -> Path:
    """A base the demo adapter fits, from its header alone: a sparse file (no data is read)."""
    tensors, _ = read_header(adapter_file)
    shapes = {t.name: t.shape for t in tensors}
    weights = {"model.embed_tokens.weight": [49152, 576], "model.norm.weight": [576]}
    for name, shape in shapes.items():
        if ".lora_A." in name:
            module = name.split(".lora_A.")[0].removeprefix("base_model.model.")
            weights[module + ".weight"] = [shapes[name.replace(".lora_A.", ".lora_B.")][0], shape[1]]
    header, offset = {}, 0
    for name in sorted(weights):
        size = 2 * math.prod(weights[name])
        header[name] = {"dtype": "BF16", "shape": weights[name], "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    out.mkdir(parents=True)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 576, "vocab_size": 49152,
                                                 "num_hidden_layers": 30, "tie_word_embeddings": True}))
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if not (DEMO / "adapter_model.safetensors").is_file():
        pytest.skip("demo/adapter is not in this checkout")
    from stages.peft.adapter import load_adapter
    from stages.peft.plan import plan_merge
    from stages.peft.quantized import open_base

    root = tmp_path_factory.mktemp("demo")
    base = open_base(header_only_base(DEMO / "adapter_model.safetensors", root / "base"))
    plan_merge(base, [load_adapter(DEMO)])  # the unmutated adapter plans onto it
    return base, (DEMO / "adapter_model.safetensors").read_bytes(), (DEMO / "adapter_config.json").read_bytes()


JSON_BYTES = b'[]{}",:0123456789-+eE.\\ntfalsrunl'


@st.composite
def byte_mutations(draw, blob: bytes, region: int) -> bytes:
    """1-4 edits within the first ``region`` bytes (a header), or a truncation / an append."""
    kind = draw(st.sampled_from(["set", "set", "insert", "delete", "truncate", "append"]))
    raw = bytearray(blob)
    if kind == "truncate":
        return bytes(raw[: draw(st.integers(0, len(raw) - 1))])
    if kind == "append":
        return bytes(raw) + draw(st.binary(min_size=1, max_size=64))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, min(region, len(raw)) - 1))
        byte = draw(st.sampled_from(JSON_BYTES) | st.integers(0, 255))
        if kind == "set":
            raw[pos] = byte
        elif kind == "insert":
            raw.insert(pos, byte)
        else:
            del raw[pos]
    return bytes(raw)


@st.composite
def config_mutations(draw, config: bytes) -> bytes:
    if draw(st.booleans()):
        return draw(byte_mutations(config, len(config)))
    data = json.loads(config)
    keys = sorted(data) + ["peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern",
                           "modules_to_save", "layers_to_transform", "trainable_token_indices"]
    for _ in range(draw(st.integers(1, 3))):
        data[draw(st.sampled_from(keys))] = draw(JSON | st.sampled_from(["(", "all-linear", ".*q_proj", "LORA", "IA3"]))
    return json.dumps(data).encode()


def _mutated(draw, weights: bytes, config: bytes) -> tuple[bytes, bytes]:
    (n,) = struct.unpack("<Q", weights[:8])
    target = draw(st.sampled_from(["weights", "weights", "config", "both"]))
    if target in ("weights", "both"):
        weights = draw(byte_mutations(weights, 8 + n))
    if target in ("config", "both"):
        config = draw(config_mutations(config))
    return weights, config


@seed(SEED)
@examples(200, 3000)
@given(data=st.data())
def test_mutated_demo_adapter_plans_or_is_a_F2xx_finding(demo, data):
    from stages.peft.adapter import load_adapter
    from stages.peft.plan import plan_merge

    base, weights, config = demo
    weights, config = _mutated(data.draw, weights, config)
    with tempfile.TemporaryDirectory() as d:
        adapter = Path(d) / "adapter"
        adapter.mkdir()
        (adapter / "adapter_model.safetensors").write_bytes(weights)
        (adapter / "adapter_config.json").write_bytes(config)
        try:
            plan_merge(base, [load_adapter(adapter)])
            event("planned")
        except FuseError as e:
            event(e.finding.code)
            assert e.finding.code.startswith("F2"), e.finding.line_text()
            assert "\n" not in e.finding.message, e.finding.line_text()


# ---------------------------------------------------------------- 3. end to end, in subprocesses

ADDRESS_SPACE = 16 << 30  # torch maps a few GB of address space at import; a runaway allocation is caught
CLI_TIMEOUT = 300


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    from factory import make_lora_adapter, make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    make_tiny_model("llama", root / "base", dtype=torch.bfloat16)
    make_lora_adapter(root / "base", root / "adapter", target_modules=["q_proj", "v_proj"])
    return root


def _limit():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


PIPELINE = """\
version: 1
name: fuzz
base: base
adapter: adapter
workdir: runs
stages: [merge, {publish: {to: dir, path: dist}}]
"""
COMMANDS = {"merge": (["merge", "base", "adapter", "out"], ("out",)),  # one-shot: writes OUT only
            "pipeline": (["run", "pipeline.yaml"], ("runs", "dist"))}  # no validate stage: the readers alone


@seed(SEED)
@examples(8, 48)
@given(data=st.data())
def test_cli_on_a_mutated_adapter_exits_cleanly(tiny, data):
    weights = (tiny / "adapter" / "adapter_model.safetensors").read_bytes()
    config = (tiny / "adapter" / "adapter_config.json").read_bytes()
    weights, config = _mutated(data.draw, weights, config)
    command = data.draw(st.sampled_from(sorted(COMMANDS)))
    argv, outputs = COMMANDS[command]
    with tempfile.TemporaryDirectory() as d:
        case = Path(d)
        shutil.copytree(tiny / "base", case / "base")
        (case / "adapter").mkdir()
        (case / "adapter" / "adapter_model.safetensors").write_bytes(weights)
        (case / "adapter" / "adapter_config.json").write_bytes(config)
        (case / "pipeline.yaml").write_text(PIPELINE)
        before = _tree(case)
        env = {k: v for k, v in os.environ.items() if k not in ("GITHUB_ACTIONS", "FUSE_DEBUG")}
        env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HOME=str(case / "home"), HF_HOME=str(case / "home"))
        r = subprocess.run([sys.executable, "-m", "stages", *argv], cwd=case, capture_output=True, text=True,
                           env=env, timeout=CLI_TIMEOUT, preexec_fn=_limit)
        out = r.stdout + r.stderr
        codes = [line.split()[1] for line in r.stderr.splitlines() if line.startswith("error ")]
        event(f"{command}: exit {r.returncode} {' '.join(codes)}")
        assert r.returncode in (0, 1, 2), out[-3000:]
        assert "Traceback" not in out and "bug in Fuse" not in out and "F406" not in out, out[-3000:]
        if r.returncode == 2:
            lines = [line for line in r.stderr.splitlines() if line.startswith("error ")]
            assert len(lines) == 1 and lines[0].startswith("error F2"), r.stderr[-3000:]
        after = {k: v for k, v in _tree(case).items() if k.split("/")[0] not in outputs}
        assert after == before, "files written or changed outside the outputs"
        assert (case / outputs[-1]).exists() == (r.returncode == 0)  # out/ or dist/ only when it succeeded
