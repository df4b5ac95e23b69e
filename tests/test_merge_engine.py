"""The merge engine against its oracles: peft's merge_and_unload() for the tensors, the
unmerged PeftModel's forward for the logits, safetensors/hashlib for the files."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stages.findings import FuseError
from stages.io.safetensors import ModelWeights, ShardedWriter, read_header
from stages.peft.adapter import NOT_MERGEABLE, load_adapter
from stages.peft.merge import merge_model
from stages.peft.plan import get_pattern_key, plan_merge

from factory import SENTENCES, assert_logits_match, make_lora_adapter, make_tiny_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "fixtures" / "stories260K-hf"
CONFIGS = SHARED / "fixtures" / "peft-adapter-configs"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([SENTENCES[0][:8], SENTENCES[2][:8]])


# ---------------------------------------------------------------- helpers

def peft_reference(base, adapters, dtype=torch.float32):
    """(unmerged PeftModel logits, merge_and_unload state dict, merged logits) for ``adapters`` (dirs)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], 1):
        peft_model.load_adapter(path, adapter_name=f"a{i}")
    peft_model.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    with torch.no_grad():
        unmerged = peft_model(IDS).logits
        merged = peft_model.merge_and_unload()
        return unmerged, merged.state_dict(), merged(IDS).logits


def logits_of(model_dir, dtype=torch.float32, ids=IDS):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    with torch.no_grad():
        return model(ids).logits


def read_output(out_dir) -> dict:
    tensors = {}
    for f in sorted(Path(out_dir).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def assert_within_one_ulp(ours: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, name
    if torch.equal(ours, ref):
        return
    a = ref.abs()
    ulp = (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).float()
    worst = ((ours.float() - ref.float()).abs() / ulp).max().item()
    assert worst <= 1.0, f"{name}: differs from peft by {worst:.2f} ulp"


def assert_matches_peft(out_dir, ref_state: dict) -> None:
    ours = read_output(out_dir)
    assert set(ours) <= set(ref_state)
    for name, tensor in ours.items():
        assert_within_one_ulp(tensor, ref_state[name], name)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_digest(root) -> dict:
    return {p.relative_to(root).as_posix(): (sha256(p), p.stat().st_mtime_ns)
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=1)


@pytest.fixture(scope="module")
def llama_adapter(llama, tmp_path_factory):
    return make_lora_adapter(llama, tmp_path_factory.mktemp("lora"), target_modules=ALL_LINEAR, r=4, alpha=8,
                             use_rslora=True, rank_pattern={"layers.1.self_attn.v_proj": 2, "down_proj": 6},
                             alpha_pattern={"o_proj": 3}, seed=2)


@pytest.fixture(scope="module")
def qwen2_bf16(tmp_path_factory):
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("qwen2"), dtype=torch.bfloat16, seed=3)


# ---------------------------------------------------------------- oracle: peft

def test_llama_fp32_rslora_patterns_match_peft(llama, llama_adapter, tmp_path):
    progress = []
    report = merge_model(llama, [(llama_adapter, 1.0)], tmp_path / "out", on_bytes=progress.append)
    assert sum(progress) == sum(t.nbytes for t in ModelWeights.open(llama).tensors.values())
    unmerged, ref_state, _ = peft_reference(llama, [llama_adapter])
    assert_matches_peft(tmp_path / "out", ref_state)
    assert_logits_match(logits_of(tmp_path / "out"), unmerged)
    assert report.metrics["tensors_merged"] == 2 * len(ALL_LINEAR)
    assert report.metrics["tensors_copied"] == len(ModelWeights.open(llama).tensors) - 2 * len(ALL_LINEAR)


def test_qwen2_bf16_with_lora_bias_matches_peft(qwen2_bf16, tmp_path):
    adapter = make_lora_adapter(qwen2_bf16, tmp_path / "lora", target_modules=["q_proj", "k_proj", "v_proj"],
                                r=8, alpha=16, lora_bias=True, rank_pattern={"k_proj": 2}, seed=4)
    merge_model(qwen2_bf16, [(adapter, 1.0)], tmp_path / "out")
    _, ref_state, ref_logits = peft_reference(qwen2_bf16, [adapter], dtype=torch.bfloat16)
    ours = read_output(tmp_path / "out")
    assert ours["model.layers.0.self_attn.q_proj.bias"].dtype == torch.bfloat16
    assert_matches_peft(tmp_path / "out", ref_state)
    torch.testing.assert_close(logits_of(tmp_path / "out", torch.bfloat16), ref_logits, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_change_rounds_once(llama, llama_adapter, tmp_path, dtype):
    merge_model(llama, [(llama_adapter, 1.0)], tmp_path / "out", dtype=dtype)
    _, ref_state, _ = peft_reference(llama, [llama_adapter])  # merged in float32 ...
    target = getattr(torch, dtype)
    for name, tensor in read_output(tmp_path / "out").items():
        assert torch.equal(tensor, ref_state[name].to(target)), name  # ... then one rounding
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == dtype


def test_dora_embedding_lm_head_modules_to_save_match_peft(llama, tmp_path):
    adapter = make_lora_adapter(llama, tmp_path / "lora", target_modules=["q_proj", "v_proj", "embed_tokens",
                                "lm_head"], modules_to_save=["model.norm"], use_dora=True, seed=5)
    merge_model(llama, [(adapter, 1.0)], tmp_path / "out")
    unmerged, ref_state, _ = peft_reference(llama, [adapter])
    assert_matches_peft(tmp_path / "out", ref_state)
    assert_logits_match(logits_of(tmp_path / "out"), unmerged)


@pytest.mark.parametrize("use_dora", [False, True])
def test_fan_in_fan_out_gpt2_matches_peft(tmp_path, use_dora):
    base = make_tiny_model("gpt2", tmp_path / "gpt2", seed=6)
    adapter = make_lora_adapter(base, tmp_path / "lora", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                use_dora=use_dora, seed=7)
    merge_model(base, [(adapter, 1.0)], tmp_path / "out")
    unmerged, ref_state, _ = peft_reference(base, [adapter])
    assert_matches_peft(tmp_path / "out", ref_state)
    assert_logits_match(logits_of(tmp_path / "out"), unmerged)


@pytest.mark.parametrize("arch,targets", [("mistral", ["q_proj", "down_proj"]), ("gemma", ["k_proj", "up_proj"]),
                                          ("phi3", ["qkv_proj", "gate_up_proj"])])
def test_other_architectures_match_peft(tmp_path, arch, targets):
    base = make_tiny_model(arch, tmp_path / arch, tie=arch == "gemma", seed=10)
    adapter = make_lora_adapter(base, tmp_path / "lora", target_modules=targets, seed=11)
    merge_model(base, [(adapter, 1.0)], tmp_path / "out")
    unmerged, ref_state, _ = peft_reference(base, [adapter])
    assert_matches_peft(tmp_path / "out", ref_state)
    assert_logits_match(logits_of(tmp_path / "out"), unmerged)


def test_weighted_sum_of_two_adapters(llama, llama_adapter, tmp_path):
    """No peft equivalent: the oracle is W + Σ wᵢ·ΔWᵢ from peft's per-adapter get_delta_weight."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    second = make_lora_adapter(llama, tmp_path / "lora2", target_modules=["q_proj", "up_proj"], r=2, seed=8)
    merge_model(llama, [(llama_adapter, 0.5), (second, -1.0)], tmp_path / "out")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), llama_adapter, adapter_name="a")
    model.load_adapter(second, adapter_name="b")
    ours = read_output(tmp_path / "out")
    checked = 0
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "lora_A"):
            key = name.removeprefix("base_model.model.") + ".weight"
            expected = module.get_base_layer().weight.detach().clone()
            for adapter_name, w in (("a", 0.5), ("b", -1.0)):
                if adapter_name in module.lora_A:
                    expected += module.get_delta_weight(adapter_name) * w
                    checked += 1
            assert_within_one_ulp(ours[key], expected, key)
    assert checked == 2 * len(ALL_LINEAR) + 4


# ---------------------------------------------------------------- real model, tied embeddings

@pytest.mark.skipif(not STORIES.is_dir(), reason=f"fixture {STORIES} is absent")
@pytest.mark.parametrize("targets,untied", [(["q_proj", "v_proj", "down_proj"], False), (["lm_head"], True),
                                            (["embed_tokens"], True)])
def test_stories260k_tied_embeddings(tmp_path, targets, untied):
    adapter = make_lora_adapter(STORIES, tmp_path / "lora", target_modules=targets, r=4, alpha=8, seed=9)
    report = merge_model(STORIES, [(adapter, 1.0)], tmp_path / "out")
    unmerged, _, _ = peft_reference(STORIES, [adapter])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    names = set(read_output(tmp_path / "out"))
    assert report.metrics["untied_embeddings"] is untied
    assert config["tie_word_embeddings"] is (not untied)
    assert ("lm_head.weight" in names) is untied
    # the forward of the unmerged adapter is the oracle: for a tied model whose embedding the
    # adapter changes, peft's own merge changes lm_head too and so departs from it
    assert_logits_match(logits_of(tmp_path / "out"), unmerged)


# ---------------------------------------------------------------- planner

def test_unmapped_adapter_tensor_is_f203(llama, llama_adapter, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(llama_adapter, bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.qq_proj.lora_A.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.model.layers.0.self_attn.qq_proj.lora_B.weight"] = torch.zeros(64, 4)
    save_file(tensors, bad / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FuseError) as e:
        merge_model(llama, [(bad, 1.0)], tmp_path / "out")
    assert e.value.finding.code == "F203"
    assert "self_attn.qq_proj.lora_A.weight" in str(e.value)
    assert "model.layers.0.self_attn.q_proj.weight" in str(e.value)  # the closest base name
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_is_f204(llama_adapter, tmp_path):
    other = make_tiny_model("llama", tmp_path / "small", hidden=32)
    with pytest.raises(FuseError) as e:
        plan_merge(ModelWeights.open(other), [load_adapter(llama_adapter)])
    assert e.value.finding.code == "F204" and "does not fit base tensor" in str(e.value)


def test_rank_in_config_must_match_tensors(llama, llama_adapter, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(llama_adapter, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["rank_pattern"] = {}
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FuseError, match="F204.*r=4 but its tensors have rank"):
        plan_merge(ModelWeights.open(llama), [load_adapter(bad)])


def test_prefix_drift_language_model(llama, llama_adapter, tmp_path):
    """An adapter trained on ...ForCausalLM (model.layers...) fits a checkpoint that says model.language_model..."""
    vlm = tmp_path / "vlm"
    vlm.mkdir()
    tensors = {k.replace("model.", "model.language_model.", 1): v for k, v in load_file(llama / "model.safetensors").items()}
    save_file(tensors, vlm / "model.safetensors", metadata={"format": "pt"})
    plan = plan_merge(ModelWeights.open(vlm), [load_adapter(llama_adapter)])
    assert "model.language_model.layers.1.mlp.down_proj.weight" in plan.updates
    assert len(plan.updates) == 2 * len(ALL_LINEAR)


def test_planner_resolves_patterns_like_peft():
    from peft.utils.other import get_pattern_key as peft_get_pattern_key

    patterns = ["layers.1.self_attn.v_proj", "down_proj", r"model\.layers\.0\..*proj", "o_proj"]
    for module in ["model.layers.1.self_attn.v_proj", "model.layers.11.self_attn.v_proj", "model.layers.0.mlp.up_proj",
                   "model.layers.3.mlp.down_proj", "model.layers.3.self_attn.o_proj", "lm_head"]:
        assert get_pattern_key(patterns, module) == peft_get_pattern_key(patterns, module)


def test_planner_does_not_import_torch():
    from stages.peft import FAMILIES

    families = ", ".join(FAMILIES.values())
    code = (f"import sys, stages.io.safetensors, stages.peft.adapter, stages.peft.plan, stages.peft.quantized, "
            f"stages.peft.combine, {families}; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ---------------------------------------------------------------- files

def test_side_files_copied_adapter_files_not(llama, llama_adapter, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(llama, base)
    (base / "tokenizer.json").write_text('{"base": true}')
    (base / "tokenizer_config.json").write_text('{"from": "base"}')
    (base / "modules.json").write_text("[]")
    (base / "1_Pooling").mkdir()
    (base / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (base / "modeling_custom.py").write_text("# custom code\n")
    (base / "pytorch_model.bin").write_bytes(b"stale pickle weights")
    (base / "original").mkdir()
    (base / "original" / "consolidated.00.pth").write_bytes(b"stale weights")
    adapter = tmp_path / "adapter"
    shutil.copytree(llama_adapter, adapter)
    (adapter / "tokenizer_config.json").write_text('{"from": "adapter"}')
    (adapter / "chat_template.jinja").write_text("{{ messages }}")
    (adapter / "training_args.bin").write_bytes(b"not a side file")

    report = merge_model(base, [(adapter, 1.0)], tmp_path / "out")
    out = tmp_path / "out"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["1_Pooling/config.json", "chat_template.jinja", "config.json", "generation_config.json",
                     "model.safetensors", "modeling_custom.py", "modules.json", "tokenizer.json",
                     "tokenizer_config.json"]
    assert (out / "tokenizer_config.json").read_text() == '{"from": "adapter"}'
    assert (out / "tokenizer.json").read_text() == '{"base": true}'
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()  # unchanged: copied as is
    assert report.hashes == {f: sha256(out / f) for f in files}
    assert report.metrics["bytes_written"] == sum((out / f).stat().st_size for f in files)


def test_base_is_byte_identical_after_merge(llama, llama_adapter, tmp_path):
    before = tree_digest(llama)
    merge_model(llama, [(llama_adapter, 1.0)], tmp_path / "out", dtype="bfloat16")
    assert tree_digest(llama) == before


def test_same_inputs_give_identical_bytes(llama, llama_adapter, tmp_path):
    first = merge_model(llama, [(llama_adapter, 1.0)], tmp_path / "a", max_shard_bytes=60_000)
    second = merge_model(llama, [(llama_adapter, 1.0)], tmp_path / "b", max_shard_bytes=60_000)
    assert first.hashes == second.hashes


def test_sharded_output_loads_with_transformers(llama, llama_adapter, tmp_path):
    report = merge_model(llama, [(llama_adapter, 1.0)], tmp_path / "out", max_shard_bytes=60_000)
    out = tmp_path / "out"
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = read_output(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
    assert set(report.hashes) >= set(shards) | {"model.safetensors.index.json"}
    unmerged, _, _ = peft_reference(llama, [llama_adapter])
    assert_logits_match(logits_of(out), unmerged)


def test_hf_cache_layout_with_symlinked_shards(llama, llama_adapter, tmp_path):
    """A Hugging Face cache snapshot: every file is a symlink into ../../blobs/."""
    merge_model(llama, [], tmp_path / "sharded", max_shard_bytes=60_000)
    blobs, snapshot = tmp_path / "cache" / "blobs", tmp_path / "cache" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted((tmp_path / "sharded").iterdir()):
        shutil.copy(f, blobs / sha256(f))
        (snapshot / f.name).symlink_to(Path("../../blobs") / sha256(f))
    direct = merge_model(tmp_path / "sharded", [(llama_adapter, 1.0)], tmp_path / "a")
    cached = merge_model(snapshot, [(llama_adapter, 1.0)], tmp_path / "b")
    assert direct.hashes == cached.hashes


def test_sharded_writer_bytes_and_hashes(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(33, 7, generator=gen).to(torch.bfloat16), "b": torch.randn(5, generator=gen),
               "ids": torch.arange(9, dtype=torch.int64), "flag": torch.tensor(True), "empty": torch.zeros(0, 3),
               "h": torch.randn(3, 3, generator=gen).to(torch.float16)}
    writer = ShardedWriter(tmp_path, [(k, v.dtype, v.shape) for k, v in tensors.items()], max_shard_bytes=200)
    for name in writer.order:
        writer.write(name, tensors[name])
    hashes = writer.close()
    assert hashes == {p.name: sha256(p) for p in tmp_path.iterdir()}
    for name, shard in writer.weight_map.items():
        with safe_open(tmp_path / shard, "pt") as f:
            assert torch.equal(f.get_tensor(name), tensors[name])
    with pytest.raises(ValueError):
        ShardedWriter(tmp_path / "x", [("a", torch.float32, (2,))], 100).write("b", torch.zeros(2))


# ---------------------------------------------------------------- errors

def test_nan_in_adapter_is_f301(llama, llama_adapter, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(llama_adapter, bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    tensors[key][3, 1] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(FuseError, match="F301.*model.layers.1.mlp.up_proj.weight"):
        merge_model(llama, [(bad, 1.0)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fp16_overflow_is_f302(llama, llama_adapter, tmp_path):
    big = tmp_path / "big"
    shutil.copytree(llama, big)
    tensors = load_file(big / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = 70000.0
    save_file(tensors, big / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "out").mkdir()
    with pytest.raises(FuseError, match="F302.*model.layers.0.mlp.up_proj.weight overflows float16"):
        merge_model(big, [(llama_adapter, 1.0)], tmp_path / "out", dtype="float16")
    assert list((tmp_path / "out").iterdir()) == []  # what was written is gone, the given directory stays


def test_output_overlapping_inputs_is_f207(llama, llama_adapter, tmp_path):
    for out in (llama / "merged", llama, llama_adapter / "merged"):
        with pytest.raises(FuseError, match="F207"):
            merge_model(llama, [(llama_adapter, 1.0)], out)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FuseError, match="F207.*not an empty directory"):
        merge_model(llama, [(llama_adapter, 1.0)], tmp_path / "full")


def test_corrupt_and_missing_base_files(llama, tmp_path):
    with pytest.raises(FuseError, match="F205"):
        ModelWeights.open(tmp_path / "nope")
    data = (llama / "model.safetensors").read_bytes()
    for name, blob in [("trunc", data[: len(data) // 2]), ("short", data[:5]),
                       ("huge", struct.pack("<Q", 10**12) + data[8:]), ("junk", struct.pack("<Q", 4) + b"\xff{[\x00")]:
        path = tmp_path / name / "model.safetensors"
        path.parent.mkdir()
        path.write_bytes(blob)
        with pytest.raises(FuseError) as e:
            ModelWeights.open(path.parent)
        assert e.value.finding.code == "F206" and e.value.finding.file == str(path)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model-00001-of-00002.safetensors").write_bytes(data)
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FuseError, match="F205.*model-00002-of-00002.safetensors, which is missing"):
        ModelWeights.open(sharded)
    index["weight_map"]["model.norm.weight"] = "../trunc/model.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FuseError, match="F206.*outside"):
        ModelWeights.open(sharded)
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FuseError, match="F209"):
        ModelWeights.open(tmp_path / "pickled")


def test_header_offsets_are_absolute(llama):
    tensors, metadata = read_header(llama / "model.safetensors")
    assert metadata == {"format": "pt"}
    with safe_open(llama / "model.safetensors", "pt") as f:
        for info in tensors:
            raw = (llama / "model.safetensors").read_bytes()[info.start:info.end]
            assert raw == f.get_tensor(info.name).contiguous().view(torch.uint8).numpy().tobytes()


def test_adapter_config_errors(llama_adapter, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(llama_adapter, bad)
    (bad / "adapter_config.json").write_text('{\n  "peft_type": "LORA",\n  "r": 4,,\n}')
    with pytest.raises(FuseError) as e:
        load_adapter(bad)
    assert (e.value.finding.code, e.value.finding.line) == ("F201", 3)
    (bad / "adapter_config.json").write_bytes(b'{"peft_type": "LORA\xff"}')
    with pytest.raises(FuseError, match="F201.*not UTF-8"):
        load_adapter(bad)
    (bad / "adapter_config.json").unlink()
    with pytest.raises(FuseError, match="F201.*adapter_config.json is missing"):
        load_adapter(bad)
    shutil.copy(llama_adapter / "adapter_config.json", bad)
    (bad / "adapter_model.safetensors").unlink()
    with pytest.raises(FuseError, match="F208.*no adapter_model.safetensors"):
        load_adapter(bad)


def test_adapter_types_from_real_configs(tmp_path):
    """Every real adapter_config.json: LoRA loads unless it is a variant Fuse refuses; the rest are F202."""
    if not CONFIGS.is_dir():
        pytest.skip(f"fixture {CONFIGS} is absent")
    from stages.peft import FAMILIES

    refused_lora = {"bdlora": "use_bdlora", "kasa": "kasa_config"}
    prompt_like = {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "ADAPTION_PROMPT"}
    loaded = set()
    for config_file in sorted(CONFIGS.glob("*.json")):
        adapter = tmp_path / config_file.stem
        adapter.mkdir()
        shutil.copy(config_file, adapter / "adapter_config.json")
        save_file({"base_model.model.x.lora_A.weight": torch.zeros(1, 1)}, adapter / "adapter_model.safetensors")
        peft_type = json.loads(config_file.read_text())["peft_type"]
        refused = next((key for tag, key in refused_lora.items() if tag in config_file.stem), None)
        if peft_type in FAMILIES and not refused:
            assert load_adapter(adapter).peft_type == peft_type
            loaded.add(peft_type)
            continue
        with pytest.raises(FuseError) as e:
            load_adapter(adapter)
        assert e.value.finding.code == "F202", config_file.name
        if refused:
            assert e.value.finding.key == refused
        elif peft_type in prompt_like:
            assert f"cannot be merged: {NOT_MERGEABLE[peft_type]}" in str(e.value)
        else:
            assert "no merge module" in str(e.value)
    assert {"LORA", "LOHA", "LOKR", "IA3", "OFT", "BOFT", "VERA", "ADALORA", "TRAINABLE_TOKENS"} <= loaded


def test_pickled_adapter_only_when_allowed(llama, llama_adapter, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(llama_adapter / "adapter_config.json", pickled)
    torch.save(load_file(llama_adapter / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    with pytest.raises(FuseError, match="F209.*pickle"):
        load_adapter(pickled)
    adapter = load_adapter(pickled, allow_pickle=True)
    reference = load_adapter(llama_adapter)
    assert {k: v.shape for k, v in adapter.tensors.items()} == {k: v.shape for k, v in reference.tensors.items()}
    key = next(iter(adapter.tensors))
    assert torch.equal(adapter.load(key), reference.load(key))
    assert plan_merge(ModelWeights.open(llama), [adapter]).summary() == \
        plan_merge(ModelWeights.open(llama), [reference]).summary()


def test_base_mutating_init_is_refused(llama_adapter, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(llama_adapter, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["init_lora_weights"] = "pissa_niter_4"
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FuseError, match="F202.*changed the base weights"):
        load_adapter(bad)


def test_factory_training_peaks_logits(tmp_path):
    model_dir = make_tiny_model("qwen2", tmp_path / "m", hidden=32, layers=1, train_steps=60, seed=0)
    ids = torch.tensor([SENTENCES[0]])
    probs = torch.softmax(logits_of(model_dir, ids=ids)[0, :-1], -1)
    assert probs.gather(1, ids[0, 1:, None]).mean() > 0.3  # random init gives ~1/256
