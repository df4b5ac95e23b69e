"""The Python API mirrors the CLI: stages.steps.merge one-shot and stages.run / status."""
from __future__ import annotations

import pytest

import stages
from factory import make_lora_adapter, make_tiny_model


def test_one_shot_merge_writes_a_loadable_model_atomically(tmp_path):
    base = make_tiny_model("llama", tmp_path / "base")
    adapter = make_lora_adapter(base, tmp_path / "lora", target_modules=["q_proj", "v_proj"])
    metrics = stages.merge(base, adapter, tmp_path / "out", dtype="bfloat16", log=lambda m: None)
    assert metrics["tensors_merged"] == 4  # q and v in 2 layers
    assert not list(tmp_path.glob(".tmp-*"))
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").dtype.is_floating_point
    with pytest.raises(stages.FuseError) as e:  # never over an existing directory
        stages.merge(base, adapter, tmp_path / "out", log=lambda m: None)
    assert e.value.finding.code == "F207"


def test_one_shot_merge_of_several_adapters_with_a_method(tmp_path):
    base = make_tiny_model("llama", tmp_path / "base")
    a = make_lora_adapter(base, tmp_path / "a", target_modules=["q_proj"], seed=1)
    b = make_lora_adapter(base, tmp_path / "b", target_modules=["q_proj"], seed=2)
    metrics = stages.merge(base, [(a, 0.5), (b, 0.5)], tmp_path / "out", method="ties", density=0.5,
                           log=lambda m: None)
    assert metrics["tensors_merged"] == 2
