"""The equivalence gate (``check``): it passes correct merges of every kind of update, fails a
merge in which one layer's update was transposed or scaled wrong (the merged output is tampered
with in the test), and writes its numbers to the manifest either way.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import stages
from stages import metrics as M
from stages.steps.check import check_merge, half_ulp
from stages.findings import FuseError
from stages.peft import merge as engine
from stages.peft.merge import merge_model

from factory import make_lora_adapter, make_tiny_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "fixtures" / "stories260K-hf"
TARGET = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    make_tiny_model("llama", root / "llama", dtype=torch.bfloat16, train_steps=40)
    make_lora_adapter(root / "llama", root / "lora", target_modules=["q_proj", "v_proj", "down_proj"])
    make_lora_adapter(root / "llama", root / "lora-small", target_modules=["q_proj", "v_proj"], scale=0.01, seed=3)
    return root


def merged(models, tmp_path, adapters, dtype="bfloat16", base="llama", name="out"):
    out = tmp_path / name
    merge_model(models / base if isinstance(base, str) else base, adapters, out, dtype=dtype)
    return out


def check(base, adapters, out, **kw):
    kw.setdefault("merge_options", {})
    kw.setdefault("logits_max_params", 0)
    return check_merge(base, adapters, out, **kw)


# ---------------------------------------------------------------- the bound itself


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_half_ulp_is_half_the_spacing_at_each_value(dtype):
    st = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
    values = torch.tensor([1.0, -1.0, 0.75, 3.0e-3, -7.1e2, 2.0 ** -20, 0.0, 1e-30], dtype=torch.float32).to(dtype)
    nxt = torch.nextafter(values.abs(), torch.tensor(float("inf"), dtype=dtype))
    spacing = (nxt.float() - values.abs().float())
    got = half_ulp(values.float(), st)
    if dtype == torch.float32:  # the smallest spacings underflow float32's own arithmetic: allow 0 there
        spacing = torch.where(spacing < 2.0 ** -126, torch.zeros_like(spacing), spacing)
        got = torch.where(got < 2.0 ** -126, torch.zeros_like(got), got)
    assert torch.equal(got, spacing / 2), (got, spacing / 2)


def test_probe_constants():
    assert 8.3 < M.probe_lambda() < 8.5
    bounds = [M.mean_square_bound(k) for k in (1, 4, 16, 64)]
    assert bounds == sorted(bounds, reverse=True) and bounds[-1] > 1
    k, s = 16, M.mean_square_bound(16)
    assert math.exp(-(k / 2) * (s - 1 - math.log(s))) == pytest.approx(M.PROBE_FAILURE_PROBABILITY, rel=1e-3)


def test_logit_metrics_and_gate():
    torch.manual_seed(0)
    logits = [torch.randn(5, 11) * 4 for _ in range(3)]
    prompts = [[1, 2, 3, 4, 5]] * 3
    same = M.PromptRun(logits=logits, greedy=[[1, 2, 3]] * 3)
    m = M.compare(same, same, prompts)
    assert m["max_abs_diff"] == 0 and m["kl_mean"] == 0 and m["top1_agreement"] == 1 and m["ppl_ratio"] == 1
    assert M.gate(m, M.thresholds_for("BF16")) == []
    other = M.PromptRun(logits=[lg.flip(-1) for lg in logits], greedy=[[1, 9, 9]] * 3)
    m = M.compare(same, other, prompts)
    assert m["greedy_agreement"] == pytest.approx(1 / 3) and m["top1_agreement"] < 0.5
    failures = M.gate(m, M.thresholds_for("BF16", {"min_greedy": 0.5}))
    assert any(f.startswith("greedy_agreement 0.3333 < min_greedy 0.5") for f in failures)
    assert any(f.startswith("kl_mean") for f in failures)


# ---------------------------------------------------------------- correct merges pass


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_a_correct_merge_passes_in_every_dtype(models, tmp_path, dtype):
    adapters = [(models / "lora", 1.0)]
    out = merged(models, tmp_path, adapters, dtype=dtype)
    report = check(models / "llama", adapters, out)
    m = report["metrics"]
    assert m["probe_tensors"] == 6 and m["unchanged_identical"] == 15
    assert m["probe_worst_ratio"] < 0.5  # well inside the bound: a correct merge is not near the edge
    assert 0.98 < m["delta_retained_min"] <= m["delta_retained_max"] < 1.02
    assert {r["reference"] for r in report["tensors"] if r["kind"] != "unchanged"} == {"factored"}


def test_update_kinds_pass_gpt2_fan_in_fan_out_with_bias_dora_and_weights(models, tmp_path):
    make_tiny_model("gpt2", tmp_path / "gpt2")
    make_lora_adapter(tmp_path / "gpt2", tmp_path / "fifo", target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                      lora_bias=True)
    adapters = [(tmp_path / "fifo", 1.0)]
    report = check(tmp_path / "gpt2", adapters, merged(models, tmp_path, adapters, "float16", tmp_path / "gpt2"))
    kinds = {r["kind"] for r in report["tensors"]}
    assert {"linear", "bias"} <= kinds, kinds

    make_lora_adapter(models / "llama", tmp_path / "dora", target_modules=["q_proj", "o_proj"], use_dora=True)
    adapters = [(tmp_path / "dora", 1.0)]
    report = check(models / "llama", adapters, merged(models, tmp_path, adapters, "bfloat16", name="dora-out"))
    assert {r["reference"] for r in report["tensors"] if r["kind"].startswith("dora")} == {"formula"}

    adapters = [(models / "lora", 0.7), (models / "lora-small", -1.5)]
    report = check(models / "llama", adapters, merged(models, tmp_path, adapters, "float32", name="two"))
    assert report["metrics"]["probe_tensors"] == 6


def test_embedding_lora_on_a_tied_model_and_modules_to_save_pass(tmp_path):
    if STORIES.exists():
        base = STORIES  # real weights, tied embeddings
    else:
        base = make_tiny_model("llama", tmp_path / "tied", tie=True)
    make_lora_adapter(base, tmp_path / "emb", target_modules=["embed_tokens", "q_proj"], modules_to_save=["norm"])
    adapters = [(tmp_path / "emb", 1.0)]
    out = tmp_path / "out"
    merge_model(base, adapters, out, dtype="float32")
    report = check(base, adapters, out, logits_max_params=10**9, greedy_tokens=4)
    kinds = {r["kind"] for r in report["tensors"]}
    assert any("embedding" in k for k in kinds) and "replace" in kinds, kinds
    assert report["logits"]["metrics"]["top1_agreement"] == 1.0


def test_logits_are_compared_below_the_size_limit_and_skipped_above(models, tmp_path):
    adapters = [(models / "lora", 1.0)]
    out = merged(models, tmp_path, adapters)
    report = check(models / "llama", adapters, out, logits_max_params=10**9, greedy_tokens=8)
    logits = report["logits"]
    assert logits["failures"] == [] and logits["dtype"] == "BF16" and logits["prompts"].endswith("(no tokenizer)")
    assert logits["metrics"]["kl_mean"] < 1e-4 and logits["metrics"]["top1_agreement"] == 1.0
    assert report["metrics"]["logits_greedy_agreement"] == 1.0
    report = check(models / "llama", adapters, out, logits_max_params=1000)
    assert "logits_max_params 1,000" in report["metrics"]["logits_skipped"]


# ---------------------------------------------------------------- tampered merges fail


def tamper(monkeypatch, how: str, target: str = TARGET):
    """Make the merge engine write ``target`` with its update transposed or scaled by 1.5."""
    real = engine._merge_tensor

    def wrong(plan, name, W):
        if name != target:
            return real(plan, name, W)
        start = W.clone()
        delta = real(plan, name, W) - start
        return start + (delta.T if how == "transpose" else 1.5 * delta)
    monkeypatch.setattr(engine, "_merge_tensor", wrong)


@pytest.mark.parametrize("adapter", ["lora", "lora-small"])
@pytest.mark.parametrize("how", ["transpose", "scale"])
def test_one_layer_transposed_or_mis_scaled_fails(models, tmp_path, monkeypatch, how, adapter):
    """Also for an update ~1% of the weights' size (lora-small), close to bf16's rounding."""
    adapters = [(models / adapter, 1.0)]
    tamper(monkeypatch, how)
    out = merged(models, tmp_path, adapters)
    with pytest.raises(FuseError) as e:
        check(models / "llama", adapters, out)
    f = e.value.finding
    assert f.code == "F303" and f.key == TARGET and "rounding bound" in f.message
    assert "more tensors fail" not in f.message  # only the tampered one
    assert f.extra["metrics"]["probe_worst_tensor"] == TARGET and f.extra["metrics"]["probe_worst_ratio"] > 1
    [row] = f.extra["failed_tensors"]
    if how == "scale":
        assert 1.4 < row["retained"] < 1.6 and row["cos"] > 0.99
    else:
        assert row["cos"] < 0.5


def test_a_tensor_no_adapter_touches_must_be_the_base_bit_for_bit(models, tmp_path):
    adapters = [(models / "lora", 1.0)]
    out = merged(models, tmp_path, adapters)
    tensors = load_file(out / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].clone()
    tensors["model.norm.weight"][3] += 0.01
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FuseError) as e:
        check(models / "llama", adapters, out)
    assert e.value.finding.code == "F303" and "no adapter update targets it" in e.value.finding.message


# ---------------------------------------------------------------- in the pipeline


PIPELINE = """\
version: 1
name: gate
base: {base}
adapter: {adapter}
workdir: runs/gate
stages:
  - validate
  - merge: {{dtype: bfloat16}}
  - check: {{greedy_tokens: 4, greedy_prompts: 2}}
"""


def pipeline(models, root: Path) -> Path:
    (root / "pipeline.yaml").write_text(PIPELINE.format(base=models / "llama", adapter=models / "lora"))
    return root / "pipeline.yaml"


def record(root: Path) -> dict:
    return json.loads((root / "runs/gate/manifest.json").read_text())["stages"]["check"]


def test_bad_parameters_are_refused_when_the_pipeline_loads(models, tmp_path):
    from stages.pipeline import load

    path = pipeline(models, tmp_path)
    for override, words in (("check.min_top1=1.5", "min_top1 must be in [0, 1]"),
                            ("check.probes=-1", "probes must be >= 0"),
                            ("check.prompts=[[1, 2], 'text']", "prompts must be a non-empty list")):
        with pytest.raises(FuseError) as e:
            load(path, [override])
        assert e.value.finding.code in ("F103", "F109") and words in e.value.finding.message, e.value.finding


def test_the_gate_passes_a_correct_merge_and_records_its_numbers(models, tmp_path):
    summary = stages.run(pipeline(models, tmp_path), log=lambda m: None)
    assert summary == {"validate": "done", "merge": "done", "check": "done"}
    rec = record(tmp_path)
    m = rec["metrics"]
    assert m["probe_tensors"] == 6 and m["probe_worst_ratio"] < 1 and m["logits_top1_agreement"] == 1.0
    assert {"logits_kl_mean", "logits_max_abs_diff", "logits_greedy_agreement", "logits_ppl_ratio"} <= set(m)
    report = json.loads((tmp_path / "runs/gate/check/report.json").read_text())
    assert len(report["tensors"]) == 21 and report["logits"]["thresholds"]["max_kl"] == 1e-3
    # too tight a threshold fails the stage with the numbers in the manifest
    with pytest.raises(FuseError) as e:  # (PyYAML reads a bare 1e-12 as a string: write 1.0e-12)
        stages.run(tmp_path / "pipeline.yaml", overrides=["check.max_kl=1.0e-12"], log=lambda m: None)
    assert e.value.finding.code == "F304" and "kl_mean" in e.value.finding.message
    rec = record(tmp_path)
    assert rec["status"] == "failed" and rec["error"]["code"] == "F304"
    assert rec["error"]["extra"]["logits"]["metrics"]["kl_mean"] > 1e-12
    assert not (tmp_path / "runs/gate/check").exists() or rec.get("outputs") is None


def test_the_gate_fails_a_transposed_layer_in_the_pipeline_and_the_logits_see_it_too(models, tmp_path, monkeypatch):
    tamper(monkeypatch, "transpose")
    with pytest.raises(FuseError) as e:
        stages.run(pipeline(models, tmp_path), log=lambda m: None)
    assert e.value.finding.code == "F303"
    rec = record(tmp_path)
    assert rec["status"] == "failed" and rec["error"]["key"] == TARGET
    assert rec["error"]["extra"]["metrics"]["probe_worst_ratio"] > 10
    assert not (tmp_path / "runs/gate/check").exists()
    # without the probe test, the logits gate catches the same merge (the update is large here)
    with pytest.raises(FuseError) as e:
        stages.run(tmp_path / "pipeline.yaml", overrides=["check.probes=0"], log=lambda m: None)
    assert e.value.finding.code == "F304"


CLI = textwrap.dedent("""
    import sys
    from stages.peft import merge as engine
    real = engine._merge_tensor
    def wrong(plan, name, W):
        start = W.clone()
        out = real(plan, name, W)
        return start + 1.5 * (out - start) if name == sys.argv[1] else out
    engine._merge_tensor = wrong
    from stages.__main__ import main
    sys.exit(main(sys.argv[2:]))
""")


def test_the_cli_exits_1_with_one_line_naming_the_tensor(models, tmp_path):
    pipeline(models, tmp_path)
    r = subprocess.run([sys.executable, "-c", CLI, TARGET, "run", "pipeline.yaml"], cwd=tmp_path, text=True,
                       capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    [line] = [x for x in r.stderr.splitlines() if x.startswith("error ")]
    assert line.startswith("error F303 ") and TARGET in line and "1.5x the adapter's update" in line


def test_a_resized_vocabulary_and_a_family_without_a_closed_form_pass(models, tmp_path):
    stored = load_file(models / "llama" / "model.safetensors")
    adapter = tmp_path / "resized"
    make_lora_adapter(models / "llama", adapter, target_modules=["q_proj"])
    tensors = load_file(adapter / "adapter_model.safetensors")
    extra = torch.randn(44, 64, dtype=torch.bfloat16)
    tensors["base_model.model.model.embed_tokens.weight"] = torch.cat([stored["model.embed_tokens.weight"], extra])
    tensors["base_model.model.lm_head.weight"] = torch.cat([stored["lm_head.weight"], extra])
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    adapters = [(adapter, 1.0)]
    report = check(models / "llama", adapters, merged(models, tmp_path, adapters))
    assert {r["kind"] for r in report["tensors"] if r["name"].endswith(("embed_tokens.weight", "lm_head.weight"))} \
        == {"replace"}

    from stages.peft import FAMILIES

    if "LOHA" not in FAMILIES:
        pytest.skip("no LoHa family in stages.peft")
    from peft import LoHaConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(models / "llama"),
                           LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "hada_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(tmp_path / "loha")
    adapters = [(tmp_path / "loha", 1.0)]
    report = check(models / "llama", adapters, merged(models, tmp_path, adapters, name="loha-out"),
                   logits_max_params=10**9, greedy_tokens=4, greedy_prompts=1)
    assert {r["reference"] for r in report["tensors"] if r["kind"] != "unchanged"} == {"engine"}
    assert report["logits"]["failures"] == []
