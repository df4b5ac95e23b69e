"""One reader contract for safetensors files and adapter configs, and bases transformers can load.

Every entry point reads weights through ``stages.io.safetensors.read_header``, which checks the
whole file before a tensor byte is read; these tests attack it directly and through the paths
that skip the validate stage (the one-shot ``fuse merge`` and a ``[merge, publish]`` pipeline),
with the examples of issue 12: an adapter whose header length is 4 bytes short, a header dtype
that is a list, a deeply nested adapter_config.json, a base without config.json.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cli import fuse
from factory import make_lora_adapter, make_tiny_model
from stages.findings import FuseError
from stages.io.checks import check_loadable
from stages.io.safetensors import ModelWeights, read_header
from stages.peft.adapter import load_adapter


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    make_tiny_model("llama", root / "base", dtype=torch.bfloat16)
    make_lora_adapter(root / "base", root / "adapter", target_modules=["q_proj", "v_proj"])
    return root


def header_of(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path: Path, header, data: bytes, *, length_delta: int = 0) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text) + length_delta) + text + data)


def code_of(fn, *args) -> str:
    with pytest.raises(FuseError) as e:
        fn(*args)
    return e.value.finding.code


def short_length_field(f: Path, short: int = 4) -> None:
    """The issue's example: the 8-byte header length says 4 bytes less than the header has. The
    header (padded with spaces, as safetensors writes it) still parses, and every tensor would be
    read 4 bytes early: shifted by two bfloat16 elements."""
    header, data = header_of(f)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8 + 8)  # room for the shift inside the padding
    f.write_bytes(struct.pack("<Q", len(text) - short) + text + data)


# ---------------------------------------------------------------- read_header, in process


def test_accepts_what_safetensors_writes_and_agrees_on_every_byte(tmp_path):
    tensors = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16),
               "empty": torch.zeros(0, 3), "scalar": torch.tensor(7, dtype=torch.int64),
               "flags": torch.tensor([True, False])}
    path = tmp_path / "x.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "x"})
    infos, metadata = read_header(path)
    assert metadata == {"format": "pt", "note": "x"}
    assert sorted(t.name for t in infos) == sorted(tensors)
    raw = path.read_bytes()
    with safe_open(path, "pt") as f:
        for t in infos:
            assert raw[t.start:t.end] == f.get_tensor(t.name).reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
    assert infos[-1].end == len(raw)


def test_short_length_field_is_refused_where_it_would_shift_every_tensor(good, tmp_path):
    f = tmp_path / "adapter_model.safetensors"
    shutil.copy(good / "adapter" / "adapter_model.safetensors", f)
    short_length_field(f)
    with pytest.raises(Exception):  # noqa: B017 - the safetensors library refuses it too
        safe_open(f, "pt")
    with pytest.raises(FuseError) as e:
        read_header(f)
    finding = e.value.finding
    assert finding.code == "F206" and finding.file == str(f) and finding.fix
    assert "after the last tensor" in finding.message or "start with" in finding.message


@pytest.mark.parametrize("edit, words", [
    (lambda h: h[next(iter(h))].update(dtype=["F32"]), "not a dtype name"),
    (lambda h: h[next(iter(h))].update(dtype="F33"), "no safetensors dtype"),
    (lambda h: h[next(iter(h))].update(shape="4"), "not a list of non-negative integers"),
    (lambda h: h[next(iter(h))].update(shape=[-1, 4]), "not a list of non-negative integers"),
    (lambda h: h[next(iter(h))].update(shape=[True, 4]), "not a list of non-negative integers"),
    (lambda h: h[next(iter(h))].update(shape=[10**400]), "needs more than"),
    (lambda h: h[next(iter(h))].update(data_offsets=[0]), "data_offsets"),
    (lambda h: h[next(iter(h))].update(data_offsets=[8, 0]), "data_offsets"),
    (lambda h: h[next(iter(h))].update(data_offsets=["0", 8]), "data_offsets"),
    (lambda h: h[next(iter(h))].pop("dtype"), "not a dtype name"),
    (lambda h: h.update({next(iter(h)): [1, 2]}), "not an object"),
    (lambda h: h.update(__metadata__={"format": 1}), "__metadata__"),
    (lambda h: h.update(__metadata__=["pt"]), "__metadata__"),
])
def test_malformed_entries_are_F206_naming_file_and_tensor(tmp_path, edit, words):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(2, 4), "v": torch.zeros(3)}, path)
    header, data = header_of(path)
    edit(header)
    write_raw(path, header, data)
    with pytest.raises(FuseError) as e:
        read_header(path)
    assert e.value.finding.code == "F206" and words in e.value.finding.message, e.value.finding.message
    assert e.value.finding.file == str(path) and e.value.finding.fix
    assert "\n" not in e.value.finding.line_text()


@pytest.mark.parametrize("build, words", [
    (lambda h, d: (h, d + b"\0"), "after the last tensor"),
    (lambda h, d: (h, d[:-1]), "past the"),
    (lambda h, d: ({k: dict(v, data_offsets=[x + 4 for x in v["data_offsets"]]) for k, v in h.items()},
                   b"\0" * 4 + d), "unused bytes before"),
    (lambda h, d: (dict(h, v=dict(h["v"], data_offsets=[4, 16]), w=dict(h["w"], data_offsets=[0, 32])),
                   d[:32] + d[32:]), "overlap"),
])
def test_ranges_must_tile_the_data_exactly(tmp_path, build, words):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(2, 4), "v": torch.zeros(3)}, path)
    header, data = header_of(path)
    header.pop("__metadata__", None)
    write_raw(path, *build(header, data))
    with pytest.raises(FuseError) as e:
        read_header(path)
    assert e.value.finding.code == "F206" and words in e.value.finding.message, e.value.finding.message


@pytest.mark.parametrize("blob, words", [
    (b"", "fewer than the 8-byte"),
    (struct.pack("<Q", 100_000_001) + b"{}", "over the 100,000,000-byte limit"),
    (struct.pack("<Q", 64) + b"{}", "declares a 64-byte header"),
    (struct.pack("<Q", 2) + b"[]", "start with '{'"),
    (struct.pack("<Q", 4) + b"{\xff}}", "not UTF-8"),
    (struct.pack("<Q", 20_002) + b"{" + b'"a":' * 0 + b"[" * 10_000 + b"]" * 10_000 + b"}", "not JSON"),
    (struct.pack("<Q", 11) + b'{"a": 1,}  ', "not JSON"),
])
def test_length_field_and_json_are_checked_first(tmp_path, blob, words):
    path = tmp_path / "m.safetensors"
    path.write_bytes(blob)
    with pytest.raises(FuseError) as e:
        read_header(path)
    assert e.value.finding.code == "F206" and words in e.value.finding.message, e.value.finding.message


def test_deep_nesting_and_directories_are_findings(tmp_path):
    deep = b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    (tmp_path / "deep.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
    assert code_of(read_header, tmp_path / "deep.safetensors") == "F206"
    (tmp_path / "dir.safetensors").mkdir()
    assert code_of(read_header, tmp_path / "dir.safetensors") == "F206"
    assert code_of(read_header, tmp_path / "missing.safetensors") == "F206"


def test_a_real_dtype_fuse_cannot_merge_is_F209_not_F206(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(2, 4)}, path)
    header, data = header_of(path)
    header["w"]["dtype"] = "C64"
    header["w"]["shape"] = [2, 2]  # 4 complex64 values: the same 32 bytes
    write_raw(path, header, data)
    assert code_of(read_header, path) == "F209"


def test_every_reader_refuses_a_file_with_trailing_bytes(good, tmp_path):
    """ModelWeights.open serves merge, check, quantize and export; load_adapter serves merge and validate."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(good / "base", base)
    shutil.copytree(good / "adapter", adapter)
    with open(base / "model.safetensors", "ab") as f:
        f.write(b"\0" * 8)
    assert code_of(ModelWeights.open, base) == "F206"
    with open(adapter / "adapter_model.safetensors", "ab") as f:
        f.write(b"\0" * 8)
    assert code_of(load_adapter, adapter) == "F206"


# ---------------------------------------------------------------- adapter_config.json


@pytest.mark.parametrize("change, key", [
    ({"target_modules": {"q_proj": ["x"]}}, "target_modules"),
    ({"target_modules": "("}, "target_modules"),
    ({"r": "8"}, "r"),
    ({"lora_alpha": [16]}, "lora_alpha"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern"),
    ({"rank_pattern": {"(": 2}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern"),
    ({"base_model_name_or_path": 3}, "base_model_name_or_path"),
    ({"target_parameters": [None]}, "target_parameters"),
    ({"fan_in_fan_out": "yes"}, "fan_in_fan_out"),
    ({"lora_dropout": 2.5}, "lora_dropout"),
    ({"modules_to_save": "lm_head"}, "modules_to_save"),
])
def test_adapter_config_of_wrong_types_is_F201_naming_the_key(good, tmp_path, change, key):
    adapter = tmp_path / "adapter"
    shutil.copytree(good / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(FuseError) as e:
        load_adapter(adapter)
    assert e.value.finding.code == "F201" and e.value.finding.key == key, e.value.finding.line_text()


def test_deep_adapter_config_is_F201(good, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(good / "adapter", adapter)
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert code_of(load_adapter, adapter) == "F201"
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ' + "9" * 5000 + "}")
    assert code_of(load_adapter, adapter) == "F201"


# ---------------------------------------------------------------- bases transformers cannot load


@pytest.mark.parametrize("config, words", [
    (None, "has no config.json"),
    ("{}", "has no model_type"),
    ('{"model_type": ""}', "has no model_type"),
    ('{"model_type": ["llama"]}', "model_type must be a JSON string"),
    ('{"model_type": "llama", "text_config": [1]}', "text_config must be a JSON object"),
    ("{not json", "not valid JSON"),
    ("[1]", "not an object"),
    ('{"a": ' + "[" * 50_000 + "]" * 50_000 + "}", "nests too deeply"),
])
def test_check_loadable_follows_autoconfig(tmp_path, config, words):
    (tmp_path / "model.safetensors").write_bytes(b"")
    if config is not None:
        (tmp_path / "config.json").write_text(config)
    with pytest.raises(FuseError) as e:
        check_loadable(tmp_path)
    assert e.value.finding.code == "F205" and words in e.value.finding.message, e.value.finding.message
    assert e.value.finding.fix


def test_check_loadable_accepts_what_autoconfig_loads(good, tmp_path):
    from transformers import AutoConfig

    assert check_loadable(good / "base")["model_type"] == "llama"
    AutoConfig.from_pretrained(good / "base")
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoConfig": "my_model.MyConfig"}}))
    assert check_loadable(tmp_path)  # custom code: transformers loads it with trust_remote_code
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="model_type"):  # the oracle refuses what check_loadable refuses
        AutoConfig.from_pretrained(tmp_path)


# ---------------------------------------------------------------- through the CLI, without a validate stage

PIPELINE = """\
version: 1
name: reader
base: base
adapter: adapter
workdir: runs/reader
stages:
  - merge
  - publish: {to: dir, path: dist}
"""


def project(good: Path, tmp_path: Path) -> Path:
    shutil.copytree(good / "base", tmp_path / "base")
    shutil.copytree(good / "adapter", tmp_path / "adapter")
    (tmp_path / "pipeline.yaml").write_text(PIPELINE)
    return tmp_path


def _short_adapter(p):
    short_length_field(p / "adapter" / "adapter_model.safetensors")


def _list_dtype(p):
    f = p / "adapter" / "adapter_model.safetensors"
    header, data = header_of(f)
    header[next(k for k in header if k != "__metadata__")]["dtype"] = ["BF16"]
    write_raw(f, header, data)


def _deep_config(p):
    (p / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ' + "[" * 100_000 + "]" * 100_000
                                                       + "}")


def _no_base_config(p):
    (p / "base" / "config.json").unlink()


def _no_model_type(p):
    f = p / "base" / "config.json"
    f.write_text(json.dumps({k: v for k, v in json.loads(f.read_text()).items() if k != "model_type"}))


CLI_CASES = [("header-length-4-short", _short_adapter, "F206", "adapter_model.safetensors"),
             ("header-dtype-is-a-list", _list_dtype, "F206", "adapter_model.safetensors"),
             ("deep-adapter-config", _deep_config, "F201", "adapter_config.json"),
             ("base-without-config", _no_base_config, "F205", "config.json"),
             ("base-config-without-model-type", _no_model_type, "F205", "config.json")]


def assert_one_finding(r, code: str, file: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr + r.stdout and "bug in Fuse" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error ")]
    assert len(lines) == 1 and lines[0].startswith(f"error {code} ") and file in lines[0], r.stderr


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_one_shot_merge_refuses(good, tmp_path, case):
    _, build, code, file = case
    p = project(good, tmp_path)
    build(p)
    r = fuse("merge", "base", "adapter", "out", cwd=p, check=False, timeout=300)
    assert_one_finding(r, code, file)
    assert sorted(x.name for x in p.iterdir()) == ["adapter", "base", "pipeline.yaml"]  # no out, no temp


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_merge_publish_pipeline_refuses_and_publishes_nothing(good, tmp_path, case):
    _, build, code, file = case
    p = project(good, tmp_path)
    build(p)
    r = fuse("run", "pipeline.yaml", cwd=p, check=False, timeout=300)
    assert_one_finding(r, code, file)
    assert not (p / "dist").exists()
    assert not (p / "runs" / "reader" / "merge").exists()


def test_a_config_peft_refuses_is_F201(tmp_path):
    from stages.peft.adapter import peft_config_of

    config = json.loads((Path(__file__).parent.parent / "demo" / "adapter" / "adapter_config.json").read_text())
    with pytest.raises(FuseError) as e:
        peft_config_of({**config, "eva_config": [1, 2]}, tmp_path / "adapter_config.json")
    assert e.value.finding.code == "F201" and "EvaConfig" in e.value.finding.message


def test_an_adapter_peft_refuses_is_F201_in_check_not_a_bug(good, tmp_path):
    """Keys Fuse never reads but peft's own loader checks: the check stage builds the PeftModel, and what
    peft refuses there is the adapter's fault (F201 naming its config), not "F406 a bug in Fuse"."""
    p = project(good, tmp_path)
    config = json.loads((p / "adapter" / "adapter_config.json").read_text())
    (p / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "bias": False}))
    (p / "pipeline.yaml").write_text(PIPELINE.replace("  - publish: {to: dir, path: dist}\n", "  - check\n"))
    r = fuse("run", "pipeline.yaml", cwd=p, check=False, timeout=600)
    assert_one_finding(r, "F201", "adapter_config.json")


@pytest.mark.parametrize("text, words", [
    (rb'{"a\ud800": {"dtype": "BF16", "shape": [], "data_offsets": [0, 2]}}', "surrogate"),
    (rb'{"a": {"dtype": "BF16", "shape": [], "data_offsets": [0, 2], "x": ["\udc00"]}}', "surrogate"),
    (rb'{"a": {"dtype": "BF16", "shape": [], "data_offsets": [0, 2], "x": NaN}}', "not finite"),
    (rb'{"a": {"dtype": "BF16", "shape": [], "data_offsets": [0, 2], "x": 1e400}}', "not finite"),
], ids=["lone-surrogate-in-a-name", "lone-surrogate-in-an-extra-field", "nan", "1e400"])
def test_json_python_accepts_but_the_format_does_not(tmp_path, text, words):
    """Found by the fuzzer: Python's json lets these through, the safetensors library refuses the file."""
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0\0")
    with pytest.raises(Exception):  # noqa: B017 - the oracle
        safe_open(path, "pt")
    with pytest.raises(FuseError) as e:
        read_header(path)
    assert e.value.finding.code == "F206" and words in e.value.finding.message
