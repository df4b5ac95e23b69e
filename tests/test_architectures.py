"""LoRA merges on architectures beyond the causal-LM families: Mixtral-style MoEs (experts stored one
by one, fused by transformers at load time: Mixtral, Qwen3-MoE), a vision-language model (llava, in
the layouts its checkpoints come in) and BERT for sequence classification.

The oracle is peft and transformers, never Fuse: the merged tensors against peft's
``merge_and_unload()`` (identical or within one ulp, compared under the checkpoint's own names), and the
logits of the merged model, loaded by transformers, against the unmerged PeftModel's.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stages.findings import FuseError
from stages.peft.merge import merge_model

from factory import SENTENCES, assert_logits_match, make_peft_adapter
from test_families import read_output, ulps

IDS = torch.tensor([SENTENCES[0][:8], SENTENCES[2][:8]])


def unmerged_and_merged(model, adapter, inputs: dict):
    """(logits of the unmerged PeftModel, the model peft's merge_and_unload() returns)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return peft_model(**inputs).logits, peft_model.merge_and_unload()


def assert_same_merge(ours: dict, ref: dict, base: dict) -> None:
    """Same tensors as peft's, each within 1 ulp, and the same ones changed (at least one)."""
    assert set(ours) == set(ref), set(ours) ^ set(ref)
    for name in ours:
        worst = ulps(ours[name], ref[name])
        assert worst <= 1.0, f"{name}: differs from peft by {worst:.2f} ulp"
    changed = {n for n in ours if not torch.equal(ours[n], base[n])}
    assert changed and changed == {n for n in ref if not torch.equal(ref[n], base[n])}


def write_checkpoint(tensors: dict, config_from: Path, out: Path) -> Path:
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(config_from / "config.json", out / "config.json")
    return out


# ---------------------------------------------------------------- Mixtral-style MoE

# model type -> (config kwargs, where the checkpoint keeps a layer's router): both store experts one by one
MOE = {
    "mixtral": ({"num_local_experts": 4, "intermediate_size": 96}, "block_sparse_moe.gate.weight"),
    "qwen3_moe": ({"num_experts": 4, "moe_intermediate_size": 48}, "mlp.gate.weight"),
}


def tiny_moe(out_dir, model_type: str, dtype=torch.float32) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
                                  max_position_embeddings=64, head_dim=16, **MOE[model_type][0])
    torch.manual_seed(0)
    # in shards of ~200 KB: a layer's experts span several files
    AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(out_dir, max_shard_size="200KB")
    return Path(out_dir)


@pytest.mark.parametrize("model_type,dtype", [("mixtral", torch.float32), ("mixtral", torch.bfloat16),
                                              ("qwen3_moe", torch.float32)], ids=["mixtral", "mixtral-bf16", "qwen3"])
def test_moe_experts_merge_through_the_conversion_mapping(tmp_path, model_type, dtype):
    """LoRA on the fused runtime experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]), the router and
    attention, split back onto the per-expert tensors the checkpoint stores (Mixtral's w1/w3/w2, Qwen3's
    gate/up/down_proj): ΔW in float32, added, rounded once."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    base = tiny_moe(tmp_path / "base", model_type, dtype)
    stored = read_output(base)
    experts = [n for n in stored if ".experts." in n]
    assert len(experts) == 2 * 4 * 3 and len(list(base.glob("*.safetensors"))) > 2
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"])
    adapter = make_peft_adapter(base, tmp_path / "a", config, seed=6)
    merge_model(base, [(adapter, 1.0)], tmp_path / "out")

    # peft merges in float32 (the base's values exactly), rounded once to the base's dtype. (peft's own
    # bfloat16 merge of expert parameters rounds ΔW to bfloat16 before adding it: two roundings.)
    unmerged, merged = unmerged_and_merged(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter,
                                           {"input_ids": IDS})
    merged.save_pretrained(tmp_path / "peft")  # transformers writes it back one tensor per expert
    ours = read_output(tmp_path / "out")
    assert_same_merge(ours, {k: v.to(dtype) for k, v in read_output(tmp_path / "peft").items()}, stored)
    routers = [f"model.layers.{i}.{MOE[model_type][1]}" for i in (0, 1)]
    assert all(not torch.equal(ours[n], stored[n]) for n in experts + routers)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=dtype)(IDS).logits
        if dtype != torch.float32:  # bfloat16 forwards differ from float32's by more than the merge: the oracle
            # is peft's merged model rounded to bfloat16, as transformers loads it
            unmerged = AutoModelForCausalLM.from_pretrained(tmp_path / "peft", dtype=dtype)(IDS).logits
    torch.testing.assert_close(logits, unmerged, atol=1e-4 if dtype == torch.float32 else 0, rtol=0)


def test_a_conversion_fuse_cannot_reverse_is_refused(tmp_path):
    """nomic_bert's checkpoint holds attention as one Wqkv tensor that transformers chunks into q/k/v at load
    time: a LoRA on q_proj would change a slice of it; Fuse refuses, naming the tensors and the operation."""
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model("nomic_bert", vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(tmp_path / "base")
    assert "encoder.layers.0.attn.Wqkv.weight" in read_output(tmp_path / "base")
    model = AutoModel.from_pretrained(tmp_path / "base")
    adapter = make_peft_adapter(tmp_path / "base", tmp_path / "a", LoraConfig(r=2, target_modules=["q_proj"]),
                                model=model)
    with pytest.raises(FuseError) as e:
        merge_model(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out")
    assert e.value.finding.code == "F202"
    assert "layers.0.self_attn.q_proj.weight" in str(e.value)
    assert "encoder.layers.0.attn.Wqkv.weight" in str(e.value) and "Chunk(dim=0)" in str(e.value)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- a vision-language model: llava

IMAGE_TOKEN = 250

# Checkpoint layouts of one llava model, as renames of its runtime names (transformers' module paths):
# "runtime" as transformers 4.52-4.57 saved it; "saved" as transformers 5 saves it; "hub" as the
# llava-hf checkpoints on the Hub (transformers < 4.52), whose CLIP tower still has vision_model.
LLAVA_LAYOUTS = {
    "runtime": [],
    "saved": [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
              ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector.")],
    "hub": [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
            ("model.vision_tower.", "vision_tower.vision_model."),
            ("model.multi_modal_projector.", "multi_modal_projector.")],
}


def llava_name(name: str, layout: str) -> str:
    for runtime, stored in LLAVA_LAYOUTS[layout]:
        if name.startswith(runtime):
            return stored + name[len(runtime):]
    return name


def llava_inputs():
    """Two prompts with the 4 image tokens a 16x16 image in 8x8 patches gives, and their pixels."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([[1, 17] + [IMAGE_TOKEN] * 4 + [42, 99, 5, 63], [1] + [IMAGE_TOKEN] * 4 + [88, 13, 150, 42, 7]])
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """(base dir in transformers 5's saved layout, the model's runtime state dict, adapter dir, unmerged
    PeftModel logits, peft's merged state dict)."""
    from peft import LoraConfig
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tmp = tmp_path_factory.mktemp("llava")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              image_size=16, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                      image_token_index=IMAGE_TOKEN)).eval()
    model.save_pretrained(tmp / "base")
    runtime = {k: v.clone() for k, v in model.state_dict().items()}
    # LoRA on the language model's and the CLIP tower's q/v, the projector and lm_head
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "linear_1", "lm_head"])
    adapter = make_peft_adapter(tmp / "base", tmp / "a", config, model=model, seed=7)
    assert any("vision_tower" in k for k in read_output(adapter).keys() if "lora" in k)
    reference = LlavaForConditionalGeneration.from_pretrained(tmp / "base").eval()
    unmerged, merged = unmerged_and_merged(reference, adapter, llava_inputs())
    return tmp / "base", runtime, adapter, unmerged, {k: v.clone() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("layout", sorted(LLAVA_LAYOUTS))
def test_llava_in_each_checkpoint_layout(llava, tmp_path, layout):
    """The adapter names runtime modules; Fuse finds them in each layout and writes the merged tensors under
    the checkpoint's own names; transformers loads the result to the unmerged PeftModel's logits."""
    from transformers import LlavaForConditionalGeneration

    saved, runtime, adapter, unmerged, merged = llava
    stored = {llava_name(k, layout): v for k, v in runtime.items()}
    if layout == "saved":  # the rename table is transformers 5's own save layout
        assert set(stored) == set(read_output(saved))
    base = write_checkpoint(stored, saved, tmp_path / "base")
    inputs = llava_inputs()
    with torch.no_grad():  # the layout is one transformers reads as this very model
        before = LlavaForConditionalGeneration.from_pretrained(base)(**inputs).logits
        torch.testing.assert_close(before, LlavaForConditionalGeneration.from_pretrained(saved)(**inputs).logits,
                                   atol=0, rtol=0)

    merge_model(base, [(adapter, 1.0)], tmp_path / "out")
    ours = read_output(tmp_path / "out")
    assert_same_merge(ours, {llava_name(k, layout): v for k, v in merged.items()}, stored)
    assert not torch.equal(ours[llava_name("model.vision_tower.encoder.layers.0.self_attn.q_proj.weight", layout)],
                           stored[llava_name("model.vision_tower.encoder.layers.0.self_attn.q_proj.weight", layout)])
    with torch.no_grad():
        logits = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")(**inputs).logits
    assert_logits_match(logits, unmerged)
    assert (logits - before).abs().max() > 1e-3  # the adapter changes the logits


# ---------------------------------------------------------------- BERT for sequence classification

def test_bert_sequence_classification(tmp_path):
    """LoRA on query/value, the classifier trained whole (modules_to_save): peft's SEQ_CLS adapter."""
    from peft import LoraConfig, TaskType
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "base")
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"],
                      modules_to_save=["classifier"])
    adapter = make_peft_adapter(tmp_path / "base", tmp_path / "a", lora, seed=8,
                                model=BertForSequenceClassification.from_pretrained(tmp_path / "base"))
    assert "base_model.model.classifier.weight" in read_output(adapter)
    merge_model(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out")

    inputs = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    unmerged, merged = unmerged_and_merged(BertForSequenceClassification.from_pretrained(tmp_path / "base"),
                                           adapter, inputs)
    base = read_output(tmp_path / "base")
    ours = read_output(tmp_path / "out")
    assert_same_merge(ours, {k: v for k, v in merged.state_dict().items() if k in base}, base)
    assert {n for n in ours if not torch.equal(ours[n], base[n])} >= {
        "classifier.weight", "classifier.bias", "bert.encoder.layer.1.attention.self.value.weight"}
    with torch.no_grad():
        logits = BertForSequenceClassification.from_pretrained(tmp_path / "out")(**inputs).logits
    assert_logits_match(logits, unmerged)
