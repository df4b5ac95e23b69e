"""A catalogue of bad inputs: each one stops the run in the pre-flight (or the pipeline loader)
with its finding code and the offending file in one line, a non-zero exit, no traceback, and
nothing written under the workdir's stage outputs.

Every case starts from good inputs (a tiny Llama + a LoRA, from tests/factory.py), breaks one
thing, and runs the real CLI in a subprocess, as CI would.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from factory import make_lora_adapter, make_tiny_model

PIPELINE = """\
version: 1
name: bad
base: base
adapter: adapter
workdir: runs/bad
stages:
  - validate
  - merge: {dtype: bfloat16}
  - check
"""


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Good inputs every case copies: a tiny Llama, a LoRA on it, the same family with 3 layers and a
    LoRA trained on that, a GPT-2 with a fan_in_fan_out LoRA, and a LoRA on the token embedding."""
    root = tmp_path_factory.mktemp("good")
    make_tiny_model("llama", root / "base", dtype=torch.bfloat16)
    make_lora_adapter(root / "base", root / "adapter", target_modules=["q_proj", "v_proj"])
    make_tiny_model("llama", root / "other", layers=3, seed=1)
    make_lora_adapter(root / "other", root / "adapter-other", target_modules=["q_proj", "v_proj"])
    make_tiny_model("llama", root / "wide", hidden=128)
    make_lora_adapter(root / "wide", root / "adapter-wide", target_modules=["q_proj", "v_proj"])
    make_tiny_model("gpt2", root / "gpt2")
    make_lora_adapter(root / "gpt2", root / "adapter-gpt2", target_modules=["c_attn"], fan_in_fan_out=True)
    make_lora_adapter(root / "base", root / "adapter-embed", target_modules=["embed_tokens", "q_proj"])
    return root


# ---------------------------------------------------------------- helpers that break things


def header_of(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_adapter(case: Path, fn) -> None:
    f = case / "adapter" / "adapter_model.safetensors"
    tensors = fn(load_file(f))
    save_file({k: v.contiguous() for k, v in tensors.items()}, f, metadata={"format": "pt"})


def edit_config(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def shard_base(case: Path) -> Path:
    """Split the base's model.safetensors into two shards with an index; returns the index path."""
    base = case / "base"
    tensors = load_file(base / "model.safetensors")
    names = sorted(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for k, part in enumerate(halves, 1):
        fname = f"model-{k:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, base / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (base / "model.safetensors").unlink()
    index = base / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def first_key(case: Path, contains: str) -> str:
    return next(k for k in sorted(load_file(case / "adapter" / "adapter_model.safetensors")) if contains in k)


def use(case: Path, good: Path, base: str | None = None, adapter: str | None = None) -> None:
    """Replace the case's base or adapter with another of the good inputs."""
    for name, src in (("base", base), ("adapter", adapter)):
        if src:
            shutil.rmtree(case / name)
            shutil.copytree(good / src, case / name)


# ---------------------------------------------------------------- the cases


@dataclass
class Case:
    id: str
    code: str
    file: str  # what the finding's line must name (a file name or path fragment)
    build: Callable[[Path, Path], None]  # (case dir, good inputs)
    argv: tuple = ()
    exit_code: int = 2
    wrapper: str | None = None  # python code run before the CLI (to simulate a full disk)


def _wrong_base(case, good):
    use(case, good, adapter="adapter-other")  # trained on a 3-layer model, given the 2-layer base
    edit_config(case / "adapter" / "adapter_config.json", base_model_name_or_path=str(good / "other"))


def _wider_model(case, good):
    use(case, good, adapter="adapter-wide")  # hidden 128 vs 64; its base is nowhere to compare configs
    edit_config(case / "adapter" / "adapter_config.json", base_model_name_or_path="acme/not-cached-anywhere")


def _renamed_module(case, good):
    edit_adapter(case, lambda t: {k.replace("q_proj", "query"): v for k, v in t.items()})


def _missing_lora_b(case, good):
    key = first_key(case, "v_proj.lora_B")
    edit_adapter(case, lambda t: {k: v for k, v in t.items() if k != key})


def _transposed(case, good):
    key = first_key(case, "q_proj.lora_A")
    edit_adapter(case, lambda t: {k: (v.T if k == key else v) for k, v in t.items()})


def _rank_mismatch(case, good):
    edit_config(case / "adapter" / "adapter_config.json", r=8)


def _zero_alpha(case, good):
    edit_config(case / "adapter" / "adapter_config.json", lora_alpha=0)


def _truncated_shard(case, good):
    f = case / "base" / "model.safetensors"
    os.truncate(f, f.stat().st_size - 100)


def _header_claims_more(case, good):
    f = case / "base" / "model.safetensors"
    header, data = header_of(f)
    header["model.extra.weight"] = {"dtype": "F32", "shape": [256], "data_offsets": [len(data), len(data) + 1024]}
    write_raw(f, header, data)


def _nan_in_lora_b(case, good):
    key = first_key(case, "lora_B")

    def fn(t):
        t[key] = t[key].clone()
        t[key][0, 0] = float("nan")
        return t
    edit_adapter(case, fn)


def _inf_in_lora_a(case, good):
    key = first_key(case, "lora_A")

    def fn(t):
        t[key] = t[key].clone()
        t[key][-1, -1] = float("inf")
        return t
    edit_adapter(case, fn)


def _empty_adapter(case, good):
    write_raw(case / "adapter" / "adapter_model.safetensors", {"__metadata__": {"format": "pt"}}, b"")


def _index_missing_shard(case, good):
    shard_base(case)
    (case / "base" / "model-00002-of-00002.safetensors").unlink()


def _pickle_adapter(case, good):
    f = case / "adapter" / "adapter_model.safetensors"
    torch.save(load_file(f), case / "adapter" / "adapter_model.bin")
    f.unlink()


def _pickle_base(case, good):
    f = case / "base" / "model.safetensors"
    torch.save(load_file(f), case / "base" / "pytorch_model.bin")
    f.unlink()


def _lora_other_vocab(case, good):
    use(case, good, adapter="adapter-embed")
    key = first_key(case, "lora_embedding_A")
    edit_adapter(case, lambda t: {k: (torch.cat([v, v[:, :44]], dim=1) if k == key else v) for k, v in t.items()})


def _shrunk_embedding(case, good):
    table = load_file(case / "base" / "model.safetensors")["model.embed_tokens.weight"]
    edit_adapter(case, lambda t: dict(t, **{"base_model.model.model.embed_tokens.weight": table[:200].clone()}))


def _tokenizer_too_big(case, good):
    vocab = {f"t{i}": i for i in range(300)}
    (case / "adapter" / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab},
                                                                 "added_tokens": []}))


def _path_traversal(case, good):
    index = shard_base(case)
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = "../../evil.safetensors"
    index.write_text(json.dumps(data))


def _link_outside(case, good):
    outside = case / "elsewhere"
    outside.mkdir()
    (case / "base" / "generation_config.json").replace(outside / "generation_config.json")
    (case / "base" / "generation_config.json").symlink_to(outside / "generation_config.json")


def _huge_header(case, good):
    f = case / "base" / "model.safetensors"
    with open(f, "wb") as out:
        out.write(struct.pack("<Q", 100_000_001) + b"{")
    os.truncate(f, 100_000_200)  # big enough to hold what the header length claims: a sparse file


def _non_utf8_config(case, good):
    (case / "base" / "config.json").write_bytes(b'{"model_type": "llama", "name": "\xff\xfe"}')


def _non_utf8_adapter_config(case, good):
    (case / "adapter" / "adapter_config.json").write_bytes(b'{"peft_type": "LORA", "x": "\xc3\x28"}')


def _invalid_adapter_config(case, good):
    (case / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')


def _prefix_tuning(case, good):
    edit_config(case / "adapter" / "adapter_config.json", peft_type="PREFIX_TUNING")


def _unknown_type(case, good):
    edit_config(case / "adapter" / "adapter_config.json", peft_type="MADE_UP_TUNING")


def _no_adapter_config(case, good):
    (case / "adapter" / "adapter_config.json").unlink()


def _adapter_as_base(case, good):
    shutil.copy(case / "adapter" / "adapter_config.json", case / "base" / "adapter_config.json")


def _index_wrong_shard(case, good):
    index = shard_base(case)
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = "model-00002-of-00002.safetensors" \
        if data["weight_map"][name].startswith("model-00001") else "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))


def _index_omits_tensor(case, good):
    index = shard_base(case)
    data = json.loads(index.read_text())
    data["weight_map"].pop(sorted(data["weight_map"])[0])
    index.write_text(json.dumps(data))


def _overlapping(case, good):
    f = case / "base" / "model.safetensors"
    header, data = header_of(f)
    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]
    start, (begin, end) = header[first]["data_offsets"][0], header[second]["data_offsets"]
    header[second]["data_offsets"] = [start, start + end - begin]  # the second tensor starts where the first does
    write_raw(f, header, data)


def _trailing_bytes(case, good):
    with open(case / "base" / "model.safetensors", "ab") as f:
        f.write(b"\0" * 4096)


def _gptq_base(case, good):
    edit_config(case / "base" / "config.json", quantization_config={"quant_method": "gptq", "bits": 4})


def _unknown_dtype(case, good):
    f = case / "base" / "model.safetensors"
    header, data = header_of(f)
    name = next(k for k in header if k.endswith("norm.weight"))
    header[name]["dtype"] = "F4"
    write_raw(f, header, data)


def _duplicate_keys(case, good):
    f = case / "base" / "model.safetensors"
    header, data = header_of(f)
    name = next(k for k in header if k != "__metadata__")
    text = json.dumps(header)
    entry = json.dumps({name: header[name]})[1:-1]
    text = text[:-1] + ", " + entry + "}"
    raw = text.encode() + b" " * (-len(text) % 8)
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _no_weights(case, good):
    (case / "base" / "model.safetensors").unlink()


def _pissa(case, good):
    edit_config(case / "adapter" / "adapter_config.json", init_lora_weights="pissa")


def _strict_name(case, good):
    edit_config(case / "adapter" / "adapter_config.json", base_model_name_or_path="acme/some-other-model")


def _fifo_flipped(case, good):
    use(case, good, base="gpt2", adapter="adapter-gpt2")
    edit_config(case / "adapter" / "adapter_config.json", fan_in_fan_out=False)


def _garbage_adapter_header(case, good):
    f = case / "adapter" / "adapter_model.safetensors"
    f.write_bytes(struct.pack("<Q", 16) + b"not json at all!" + b"\0" * 64)


def _missing_adapter_dir(case, good):
    shutil.rmtree(case / "adapter")


def _config_not_object(case, good):
    (case / "base" / "config.json").write_text("[1, 2, 3]")


def _shrunk_lm_head(case, good):
    table = load_file(case / "base" / "model.safetensors")["lm_head.weight"]
    edit_adapter(case, lambda t: dict(t, **{"base_model.model.lm_head.weight": table[:128].clone()}))


def _adapter_length_4_short(case, good):
    """Issue 12: the header length 4 bytes short; the space-padded header still parses, and every
    tensor would be read 4 bytes early (two bfloat16 elements)."""
    f = case / "adapter" / "adapter_model.safetensors"
    header, data = header_of(f)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8 + 8)
    f.write_bytes(struct.pack("<Q", len(text) - 4) + text + data)


def _adapter_dtype_list(case, good):
    f = case / "adapter" / "adapter_model.safetensors"
    header, data = header_of(f)
    header[next(k for k in header if k != "__metadata__")]["dtype"] = ["BF16"]
    write_raw(f, header, data)


def _gap_between_tensors(case, good):
    f = case / "base" / "model.safetensors"
    header, data = header_of(f)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    header[last]["data_offsets"] = [x + 8 for x in header[last]["data_offsets"]]
    start = header[last]["data_offsets"][0] - 8
    write_raw(f, header, data[:start] + b"\0" * 8 + data[start:])


def _deep_adapter_config(case, good):
    (case / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ' + "[" * 100_000
                                                          + "]" * 100_000 + "}")


def _target_modules_dict(case, good):
    edit_config(case / "adapter" / "adapter_config.json", target_modules={"q_proj": ["a"], "v_proj": ["b"]})


def _r_string(case, good):
    edit_config(case / "adapter" / "adapter_config.json", r="4")


def _base_without_config(case, good):
    (case / "base" / "config.json").unlink()


def _base_config_without_model_type(case, good):
    f = case / "base" / "config.json"
    f.write_text(json.dumps({k: v for k, v in json.loads(f.read_text()).items() if k != "model_type"}))


FULL_DISK = "import stages.io.checks as c; c.free_bytes = lambda path: 4096\n"

CASES = [
    Case("wrong-base", "F211", "adapter_config.json", _wrong_base),
    Case("adapter-for-wider-model", "F204", "adapter_model.safetensors", _wider_model),
    Case("renamed-target-module", "F203", "adapter_model.safetensors", _renamed_module),
    Case("missing-lora-B", "F208", "adapter_model.safetensors", _missing_lora_b),
    Case("transposed-lora-A", "F204", "adapter_model.safetensors", _transposed),
    Case("rank-not-as-configured", "F204", "adapter_model.safetensors", _rank_mismatch),
    Case("lora-alpha-zero", "F201", "adapter_config.json", _zero_alpha),
    Case("truncated-shard", "F206", "model.safetensors", _truncated_shard),
    Case("header-claims-more-bytes", "F206", "model.safetensors", _header_claims_more),
    Case("nan-in-lora-B", "F212", "adapter_model.safetensors", _nan_in_lora_b),
    Case("inf-in-lora-A", "F212", "adapter_model.safetensors", _inf_in_lora_a),
    Case("empty-adapter", "F208", "adapter_model.safetensors", _empty_adapter),
    Case("index-names-missing-shard", "F205", "model.safetensors.index.json", _index_missing_shard),
    Case("pickle-adapter", "F209", "adapter_model.bin", _pickle_adapter),
    Case("pickle-base", "F209", "pytorch_model.bin", _pickle_base),
    Case("lora-for-other-vocab-size", "F213", "adapter_model.safetensors", _lora_other_vocab),
    Case("embedding-with-fewer-rows", "F213", "adapter_model.safetensors", _shrunk_embedding),
    Case("lm-head-with-fewer-rows", "F213", "adapter_model.safetensors", _shrunk_lm_head),
    Case("tokenizer-bigger-than-embedding", "F213", "tokenizer.json", _tokenizer_too_big),
    Case("path-traversal-in-shard-name", "F206", "model.safetensors.index.json", _path_traversal),
    Case("link-outside-the-model", "F210", "generation_config.json", _link_outside),
    Case("100MB-json-header", "F206", "model.safetensors", _huge_header),
    Case("non-utf8-base-config", "F205", "config.json", _non_utf8_config),
    Case("non-utf8-adapter-config", "F201", "adapter_config.json", _non_utf8_adapter_config),
    Case("invalid-adapter-config-json", "F201", "adapter_config.json", _invalid_adapter_config),
    Case("prefix-tuning", "F202", "adapter_config.json", _prefix_tuning),
    Case("unknown-peft-type", "F202", "adapter_config.json", _unknown_type),
    Case("no-adapter-config", "F201", "adapter_config.json", _no_adapter_config),
    Case("adapter-given-as-base", "F205", "base", _adapter_as_base),
    Case("index-puts-tensor-in-wrong-shard", "F205", "model.safetensors.index.json", _index_wrong_shard),
    Case("shard-holds-tensor-index-omits", "F205", "model.safetensors.index.json", _index_omits_tensor),
    Case("overlapping-tensors", "F206", "model.safetensors", _overlapping),
    Case("bytes-after-last-tensor", "F206", "model.safetensors", _trailing_bytes),
    Case("gptq-quantized-base", "F215", "config.json", _gptq_base),
    Case("unknown-tensor-dtype", "F209", "model.safetensors", _unknown_dtype),
    Case("duplicate-header-keys", "F206", "model.safetensors", _duplicate_keys),
    Case("base-without-weights", "F205", "base", _no_weights),
    Case("pissa-init-not-converted", "F202", "adapter_config.json", _pissa),
    Case("strict-names-other-base", "F211", "adapter_config.json", _strict_name,
         argv=("--set", "validate.strict=true")),
    Case("fan-in-fan-out-flipped", "F204", "adapter_model.safetensors", _fifo_flipped),
    Case("garbage-adapter-header", "F206", "adapter_model.safetensors", _garbage_adapter_header),
    Case("adapter-directory-missing", "F105", "pipeline.yaml", _missing_adapter_dir),
    Case("base-config-not-an-object", "F205", "config.json", _config_not_object),
    Case("no-room-for-outputs", "F402", "runs/bad", lambda case, good: None, exit_code=1, wrapper=FULL_DISK),
    Case("adapter-header-length-4-short", "F206", "adapter_model.safetensors", _adapter_length_4_short),
    Case("adapter-header-dtype-is-a-list", "F206", "adapter_model.safetensors", _adapter_dtype_list),
    Case("gap-between-tensors", "F206", "model.safetensors", _gap_between_tensors),
    Case("deeply-nested-adapter-config", "F201", "adapter_config.json", _deep_adapter_config),
    Case("target-modules-a-dict-of-lists", "F201", "adapter_config.json", _target_modules_dict),
    Case("lora-rank-a-string", "F201", "adapter_config.json", _r_string),
    Case("base-without-config-json", "F205", "config.json", _base_without_config),
    Case("base-config-without-model-type", "F205", "config.json", _base_config_without_model_type),
]


def run_cli(case: Case, cwd: Path) -> subprocess.CompletedProcess:
    argv = ["run", "pipeline.yaml", *case.argv]
    if case.wrapper:
        code = case.wrapper + "import sys\nfrom stages.__main__ import main\nsys.exit(main(sys.argv[1:]))\n"
        cmd = [sys.executable, "-c", code, *argv]
    else:
        cmd = [sys.executable, "-m", "stages", *argv]
    env = {k: v for k, v in os.environ.items() if k not in ("GITHUB_ACTIONS", "FUSE_DEBUG")}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=120)


def test_the_catalogue_is_large_and_covers_the_issue():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_finding_and_writes_nothing(case, good, tmp_path):
    shutil.copytree(good / "base", tmp_path / "base")
    shutil.copytree(good / "adapter", tmp_path / "adapter")
    (tmp_path / "pipeline.yaml").write_text(PIPELINE)
    case.build(tmp_path, good)

    r = run_cli(case, tmp_path)

    assert r.returncode == case.exit_code, r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error ")]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error {case.code} ") and case.file in lines[0], lines[0]
    workdir = tmp_path / "runs" / "bad"
    if workdir.exists():
        written = sorted(p.name for p in workdir.iterdir() if p.is_dir())
        assert written == [], f"stage outputs written: {written}"
        record = json.loads((workdir / "manifest.json").read_text()) if (workdir / "manifest.json").exists() else {}
        for stage in ("merge", "check"):
            assert stage not in record.get("stages", {}), f"{stage} ran"
