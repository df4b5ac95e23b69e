"""The ``quantize`` stage: GPTQ and AWQ (GPTQModel) on trained tiny Llama and Qwen2 models (hidden 256).

Oracles: plain transformers reloads each checkpoint on CPU (no Fuse code), and the test measures
its logits against the merged float32 model itself; the checkpoint's ``quantization_config`` is
the standard one. A forced 2-bit run fails the gate with every number in one message, recorded
in the manifest. The calibration readers, the update-vs-step analysis and the CPU estimate are
tested on their own (fast, no quantizer).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, seed, settings
from hypothesis import strategies as st
from factory import SENTENCES, make_lora_adapter, make_tiny_model
from cli import fuse

from stages.findings import FuseError

HAVE_GPTQMODEL = importlib.util.find_spec("gptqmodel") is not None and importlib.util.find_spec("optimum") is not None
needs_gptqmodel = pytest.mark.skipif(not HAVE_GPTQMODEL, reason="gptqmodel/optimum not installed "
                                                                "(pip install 'fuse-llm[quantize]')")
SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "fixtures" / "stories260K-hf"
PROMPTS = [s[:-1] for s in SENTENCES]  # what the tiny models were trained on: the most peaked logits

PIPELINE = """\
version: 1
name: tiny-{arch}
base: base
adapter: adapter
workdir: runs/tiny
stages:
  - merge: {{dtype: float32}}
  - quantize: {{id: gptq, method: gptq, bits: 4, group_size: 128, calibration: {{dataset: calib.jsonl}}}}
  - quantize: {{id: awq, method: awq, bits: 4, group_size: 128, calibration: {{dataset: calib.jsonl}}}}
  - publish: {{to: dir, path: dist, from: gptq}}
"""


def write_calibration(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_project(root: Path, arch: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    make_tiny_model(arch, root / "base", hidden=256, train_steps=150)
    make_lora_adapter(root / "base", root / "adapter", target_modules=["q_proj", "v_proj", "down_proj"], scale=0.05)
    write_calibration(root / "calib.jsonl", [{"input_ids": s} for s in SENTENCES * 4])
    (root / "pipeline.yaml").write_text(PIPELINE.format(arch=arch))
    return root


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def project(request, tmp_path_factory):
    if not HAVE_GPTQMODEL:
        pytest.skip("gptqmodel/optimum not installed (pip install 'fuse-llm[quantize]')")
    root = make_project(tmp_path_factory.mktemp(f"quantize-{request.param}"), request.param)
    elsewhere = root / "elsewhere"  # the user's current directory: not the pipeline's, not the workdir
    elsewhere.mkdir()
    r = fuse("run", str(root / "pipeline.yaml"), cwd=elsewhere)
    return root, request.param, r.stderr


def manifest(root: Path) -> dict:
    return json.loads((root / "runs/tiny/manifest.json").read_text())


def logits_of(model, prompts):
    with torch.no_grad():
        return [model(input_ids=torch.tensor([p])).logits[0].float() for p in prompts]


@needs_gptqmodel
def test_the_quantizer_writes_nothing_outside_the_workdir(project):
    """GPTQModel writes logs/gptq_log_*.log under the current directory: they land in the workdir's logs."""
    root, arch, _ = project
    assert not list((root / "elsewhere").iterdir())
    assert sorted(p.name for p in root.iterdir()) == ["adapter", "base", "calib.jsonl", "dist", "elsewhere",
                                                      "pipeline.yaml", "runs"]
    kept = list((root / "runs/tiny/logs").rglob("*_log_*.log"))
    assert kept and all(p.is_relative_to(root / "runs/tiny/logs") for p in kept)


@needs_gptqmodel
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_4bit_checkpoints_reload_with_plain_transformers_and_pass_the_gate(project, method):
    from transformers import AutoModelForCausalLM

    root, arch, _ = project
    out = root / "runs/tiny" / method
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == method and qc["bits"] == 4 and qc["group_size"] == 128
    if method == "gptq":
        assert qc["format"] == "gptq" and qc["sym"] is True and qc["desc_act"] is False
        assert json.loads((out / "quantize_config.json").read_text())["bits"] == 4
    else:
        assert qc["version"] == "gemm" and qc["zero_point"] is True  # AutoAWQ's layout, what vLLM reads
    assert not (out / "quant_log.csv").exists()  # timings: not part of the model
    assert qc.get("meta", {}).get("offload_to_disk_path") is None  # no temp path in a published file

    merged = AutoModelForCausalLM.from_pretrained(root / "runs/tiny/merge", dtype=torch.float32).eval()
    quantized = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    kernel = type(quantized.model.layers[0].self_attn.q_proj).__name__
    assert kernel == ("TorchAtenLinear" if method == "gptq" else "TorchAtenAwqLinear"), kernel
    def agreement(prompts):
        a, b = torch.cat(logits_of(merged, prompts)), torch.cat(logits_of(quantized, prompts))
        lp, lq = a.double().log_softmax(-1), b.double().log_softmax(-1)
        return float((a.argmax(-1) == b.argmax(-1)).double().mean()), float((lp.exp() * (lp - lq)).sum(-1).mean())

    top1, kl = agreement(PROMPTS)  # the sentences the models learned
    assert top1 >= 0.9 and kl < 0.05, (arch, method, top1, kl)
    # the gate's own prompts (no tokenizer: seeded token ids), measured here with plain torch
    from stages.quantization.gate import eval_prompts

    prompts, source = eval_prompts(root / "runs/tiny/merge", None, 0, 256, key="k")
    assert source.startswith("6 seeded token-id prompts")
    top1, kl = agreement(prompts)

    rec = manifest(root)["stages"][method]
    assert rec["status"] == "done"
    m = rec["metrics"]
    for key in ("max_abs_diff", "kl_mean", "top1_agreement", "ppl_ratio", "greedy_agreement"):
        assert isinstance(m[key], float), key
    assert m["top1_agreement"] == pytest.approx(top1, abs=1e-3)  # the stage measured what the test measures
    assert m["kl_mean"] == pytest.approx(kl, rel=1e-2, abs=1e-6)
    assert m["kl_mean"] <= m["thresholds"]["max_kl"] and m["top1_agreement"] >= m["thresholds"]["min_top1"]
    assert m["ppl_ratio"] <= m["thresholds"]["max_ppl_ratio"]
    assert m["bytes_written"] < m["bytes_in"] / 2
    assert m["calibration"].startswith("calib.jsonl: 20 samples")


@needs_gptqmodel
def test_published_quantized_model_has_its_card_and_numbers(project):
    root = project[0]
    dist = root / "dist"
    names = sorted(p.name for p in dist.iterdir())
    assert {"model.safetensors", "config.json", "quantize_config.json", "README.md", "SHA256SUMS"} <= set(names)
    card = (dist / "README.md").read_text()
    # the adapter names its base by a local path: no base_model, the digest instead
    assert "base_model:" not in card and "base_model_relation: quantized" in card and "- gptq" in card and f"# tiny-{project[1]} (GPTQ 4-bit)" in card
    checks = card[card.index("## Checks"):]
    assert "**`gptq`** (quantize v1)" in checks and "`awq`" not in checks  # its own gate, not another's
    assert "| kl_mean |" in checks and "| <= 0.15 |" in checks and "| greedy_agreement |" in checks
    assert str(root) not in card and str(root) not in (dist / "fuse-provenance.json").read_text()
    prov = json.loads((dist / "fuse-provenance.json").read_text())
    assert [s["stage"] for s in prov["steps"]] == ["merge", "quantize"]


@needs_gptqmodel
def test_update_below_step_is_measured_and_recorded(project):
    from stages.quantization.erasure import update_below_step

    root = project[0]
    m = manifest(root)["stages"]["gptq"]["metrics"]
    rows = update_below_step(root / "base", root / "runs/tiny/merge", bits=4, group_size=128, sym=True)
    assert {r.name: round(r.below_step, 3) for r in rows} == m["update_below_step"]
    assert len(rows) == 6  # q_proj, v_proj, down_proj in 2 layers
    warned = [w for w in manifest(root)["stages"]["gptq"]["warnings"] if w["code"] == "F605"]
    assert bool(warned) == (m["layers_update_below_step"] > 0)


@needs_gptqmodel
def test_forced_2bit_fails_the_gate_with_the_numbers_in_one_message(project):
    root, arch, _ = project
    if arch != "llama":
        pytest.skip("one architecture is enough")
    r = fuse("run", "pipeline.yaml", "--only", "gptq", "--set", "gptq.bits=2", cwd=root, check=False)
    assert r.returncode == 1, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error F604")]
    assert len(lines) == 1, r.stderr[-3000:]
    line = lines[0]
    assert "the gptq 2-bit model fails its quality gate" in line
    for key in ("max_abs_diff", "kl_mean", "top1_agreement", "ppl_ratio"):
        assert key in line
    rec = manifest(root)["stages"]["gptq"]
    assert rec["status"] == "failed" and rec["error"]["code"] == "F604"
    numbers = rec["error"]["extra"]["metrics"]
    assert numbers["bits"] == 2 and numbers["kl_mean"] > numbers["thresholds"]["max_kl"]
    assert not list((root / "runs/tiny").glob(".tmp-*"))  # nothing half-written left behind
    # (the last test of the module on this project: a plain run would re-quantize at 4 bits)


# ------------------------------------------------------------------ no quantizer needed


def test_cpu_estimate_refuses_a_big_model_up_front(tmp_path):
    """A 7B-shaped model on 2 cores: hours. The stage refuses with the estimate before loading anything."""
    from stages.quantization.estimate import estimate

    shapes = [(4096, 4096)] * 4 * 32 + [(11008, 4096)] * 2 * 32 + [(4096, 11008)] * 32
    est = estimate(shapes, 6_700_000_000, 128 * 512, "gptq", cores=2)
    assert est.seconds > 3600 and est.minutes().endswith(" h")
    assert estimate(shapes, 6_700_000_000, 128 * 512, "awq", cores=2).seconds > est.seconds
    small = estimate([(256, 256)] * 8, 500_000, 200, "gptq", cores=2)
    assert small.seconds < 10

    root = tmp_path
    make_tiny_model("llama", root / "base", hidden=256)
    make_lora_adapter(root / "base", root / "adapter", target_modules=["q_proj"])
    write_calibration(root / "calib.jsonl", [{"input_ids": s} for s in SENTENCES])
    (root / "pipeline.yaml").write_text(
        "version: 1\nname: t\nbase: base\nadapter: adapter\nstages:\n  - merge\n"
        "  - quantize: {calibration: {dataset: calib.jsonl}, cpu_max_minutes: 0.001}\n")
    r = fuse("run", "pipeline.yaml", cwd=root, check=False)
    assert r.returncode == 1
    line = next(line for line in r.stderr.splitlines() if line.startswith("error F601"))
    assert "would take about" in line and "(estimate)" in line and "--from quantize" in line
    assert "gptqmodel" not in r.stderr.lower()  # refused before the quantizer was even imported


def test_quantize_parameter_rules_are_checked_when_the_pipeline_loads(tmp_path):
    from stages import pipeline

    make_tiny_model("llama", tmp_path / "base")
    make_lora_adapter(tmp_path / "base", tmp_path / "adapter", target_modules=["q_proj"])
    head = "version: 1\nname: t\nbase: base\nadapter: adapter\nstages:\n  - merge\n"
    cases = [("  - quantize: {method: awq, bits: 8}\n", "F103", "awq quantizes to 4 bits only"),
             ("  - quantize: {method: awq, desc_act: true}\n", "F103", "desc_act applies to gptq only"),
             ("  - quantize: {calibration: {dataset: c.txt, sample: 4}}\n", "F102", "unknown key 'sample'"),
             ("  - quantize: {calibration: {seq_len: 0}}\n", "F103", "seq_len must be a positive integer"),
             ("  - quantize: {calibration: {dataset: missing.jsonl}}\n", "F105", "missing.jsonl does not exist"),
             ("  - quantize: {bits: 5}\n", "F103", "5 is not allowed"),
             ("  - quantize\n  - export: {from: quantize}\n", "F108", "cannot read the output of 'quantize'")]
    for stage, code, text in cases:
        (tmp_path / "pipeline.yaml").write_text(head + stage)
        with pytest.raises(FuseError) as e:
            pipeline.load(tmp_path / "pipeline.yaml")
        assert e.value.finding.code == code and text in e.value.finding.message, (stage, e.value.finding)
        assert e.value.finding.line is not None
    # a relative calibration path is resolved against the pipeline file, and hashed into the fingerprint
    (tmp_path / "c.txt").write_text("hello")
    (tmp_path / "pipeline.yaml").write_text(head + "  - quantize: {calibration: {dataset: c.txt}}\n")
    p = pipeline.load(tmp_path / "pipeline.yaml")
    from stages.steps import quantize

    assert quantize.input_files(p.stage("quantize").params) == [str((tmp_path / "c.txt").resolve())]


class CharTokenizer:
    """Enough of a tokenizer for the calibration reader: one id per character."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + ord(c) % 200 for c in text]}


def test_calibration_sources(tmp_path, monkeypatch):
    from stages.quantization.calibration import load_calibration
    from stages.quantization.texts import CALIBRATION_TEXT

    tok = CharTokenizer()
    built_in = load_calibration({"samples": 4, "seq_len": 64}, tok, vocab_size=256)
    assert len(built_in.samples) == 4 and all(len(s) == 64 and s[0] == 1 for s in built_in.samples)
    assert built_in.source.startswith("built-in calibration text: 4 samples of 64 tokens")
    assert load_calibration({"samples": 4, "seq_len": 64}, tok, vocab_size=256).samples == built_in.samples
    assert sum(map(len, load_calibration({"samples": 10_000, "seq_len": 64}, tok, vocab_size=256).samples)) >= \
        len(CALIBRATION_TEXT)  # the whole text, cut in windows

    (tmp_path / "c.txt").write_text("abc " * 100)
    txt = load_calibration({"dataset": str(tmp_path / "c.txt"), "samples": 3, "seq_len": 50}, tok, vocab_size=256)
    assert [len(s) for s in txt.samples] == [50, 50, 50]
    texts = write_calibration(tmp_path / "t.jsonl", [{"text": "one two three " * 10}, {"text": "four five"}])
    assert load_calibration({"dataset": str(texts), "seq_len": 1000}, tok, vocab_size=256).tokens > 100
    ids = write_calibration(tmp_path / "i.jsonl", [{"input_ids": s} for s in SENTENCES] + [[5, 6, 7]])
    got = load_calibration({"dataset": str(ids), "seq_len": 8}, None, vocab_size=256)
    assert got.samples[:2] == [SENTENCES[0][:8], SENTENCES[1][:8]] and got.samples[-1] == [5, 6, 7]
    (tmp_path / "l.json").write_text(json.dumps(["some text", "more text"]))
    assert load_calibration({"dataset": str(tmp_path / "l.json")}, tok, vocab_size=256).tokens > 10

    def code_of(spec, tokenizer=tok, vocab=256):
        with pytest.raises(FuseError) as e:
            load_calibration(spec, tokenizer, vocab_size=vocab)
        return e.value.finding

    assert code_of({"dataset": str(texts)}, tokenizer=None).code == "F603"  # text, but no tokenizer
    assert "input_ids" in code_of({"dataset": str(texts)}, tokenizer=None).fix
    assert "outside the model's vocabulary" in code_of({"dataset": str(ids)}, vocab=50).message
    assert code_of({"dataset": str(tmp_path / "missing.jsonl")}).code == "F603"
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    bad = code_of({"dataset": str(tmp_path / "bad.jsonl")})
    assert bad.code == "F603" and bad.line == 2
    write_calibration(tmp_path / "mixed.jsonl", [{"text": "a b c"}, {"input_ids": [1, 2, 3]}])
    assert "mixes" in code_of({"dataset": str(tmp_path / "mixed.jsonl")}).message

    # a Hub dataset id goes through datasets.load_dataset (streaming), stopping once it has enough text
    import datasets

    calls, served = [], []

    def fake_load_dataset(name, config=None, split=None, revision=None, streaming=False):
        calls.append((name, config, split, revision, streaming))

        def rows():
            for i in range(10_000):
                served.append(i)
                yield {"text": f"line {i} of the corpus" if i % 3 else "", "id": i}
        return rows()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = load_calibration({"dataset": "acme/corpus", "config": "en", "samples": 2, "seq_len": 32}, tok,
                           vocab_size=256)
    assert calls == [("acme/corpus", "en", "train", None, True)]
    assert len(hub.samples) == 2 and hub.source.startswith("hub dataset acme/corpus (en) [train]")
    assert len(served) < 100  # streamed: it did not read the whole dataset
    assert "no text column 'body'" in code_of({"dataset": "acme/corpus", "field": "body"}).message


def _adapter_pair(tmp_path, scale):
    base = tmp_path / "base"
    if not base.exists():
        make_tiny_model("llama", base, hidden=256, train_steps=20)
    adapter = make_lora_adapter(base, tmp_path / f"adapter-{scale}", target_modules=["q_proj", "v_proj"],
                                scale=scale)
    from stages.peft.merge import merge_model

    out = tmp_path / f"merged-{scale}"
    merge_model(base, [(adapter, 1.0)], out, dtype="float32")
    return base, out


def test_update_below_step_warns_for_small_updates_only(tmp_path):
    from stages.quantization.erasure import group_step, summary, update_below_step

    # the step of one group: (max - min) / 15 asymmetric, 2·max|w| / 15 symmetric
    W = torch.tensor([[-1.0, 0.5, 2.0, 0.0]])
    assert torch.allclose(group_step(W, 4, 2, sym=False), torch.tensor([[1.5, 1.5, 2.0, 2.0]]) / 15)
    assert torch.allclose(group_step(W, 4, -1, sym=True), torch.full((1, 4), 4.0 / 15))

    base, small = _adapter_pair(tmp_path, 0.003)
    rows = update_below_step(base, small, bits=4, group_size=128, sym=True)
    assert len(rows) == 4 and all(r.below_step > 0.9 for r in rows), rows
    text = summary(rows, 0.5, 4)
    assert "4 of the 4 layers" in text and "model.layers.0.self_attn.q_proj" in text and "%" in text
    _, large = _adapter_pair(tmp_path, 0.5)
    rows = update_below_step(base, large, bits=4, group_size=128, sym=True)
    assert all(r.below_step < 0.5 for r in rows), rows
    assert summary(rows, 0.5, 4) is None
    # 8 bits: a step 17x finer ((2^8 - 1) / (2^4 - 1)), the same update 17x larger in steps
    eight = update_below_step(base, small, bits=8, group_size=128, sym=True)
    four = update_below_step(base, small, bits=4, group_size=128, sym=True)
    assert all(e.median_ratio == pytest.approx(17 * f.median_ratio, rel=1e-3) for e, f in zip(eight, four))


def test_group_size_must_divide_the_layers(tmp_path):
    """stories260K-shaped widths (64 and 172): group 128 does not fit; the finding says what does."""
    from stages.steps.quantize import _check_layers

    class T:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    layers = [T("model.layers.0.self_attn.q_proj.weight", (64, 64)), T("model.layers.0.mlp.down_proj.weight", (64, 172))]
    with pytest.raises(FuseError) as e:
        _check_layers(layers, 128, tmp_path, "quantize")
    assert e.value.finding.code == "F608" and "group_size: -1" in e.value.finding.fix
    layers = [T("model.layers.0.self_attn.q_proj.weight", (576, 576)), T("model.layers.0.mlp.down_proj.weight", (576, 1536))]
    with pytest.raises(FuseError) as e:
        _check_layers(layers, 128, tmp_path, "quantize")
    assert "use group_size: 64" in e.value.finding.fix  # SmolLM2-135M: hidden 576 = 9 x 64
    _check_layers(layers, 64, tmp_path, "quantize")
    _check_layers(layers, -1, tmp_path, "quantize")
    assert math.gcd(576, 1536) % 64 == 0


_EXAMPLES = 400 if os.environ.get("FUSE_SLOW") else 60


@settings(max_examples=_EXAMPLES, deadline=None)
@seed(20261205)
@given(values=st.fixed_dictionaries({k: st.floats(0, 2) | st.just(float("nan")) for k in
                                     ("max_abs_diff", "kl_mean", "top1_agreement", "ppl_ratio", "greedy_agreement")}),
       limits=st.fixed_dictionaries({k: st.none() | st.floats(0, 2) for k in
                                     ("max_abs_diff", "max_kl", "min_top1", "min_greedy", "max_ppl_ratio")}))
def test_the_gate_line_marks_exactly_what_the_gate_fails_and_what_it_does_not_gate(values, limits):
    """What a reader sees (stages.metrics.describe) agrees with what the gate decides (metrics.gate):
    a number is 'outside' its bound iff the gate names it; 'informational' iff no threshold is set."""
    from stages import metrics as M

    line = M.describe(values, limits, tuple(values))
    gated_part, _, info_part = line.partition("informational, not gated: ")
    failed = {f.split()[0] for f in M.gate(values, limits)}
    for metric in values:
        name = next(n for n, (m, _) in M.THRESHOLDS.items() if m == metric)
        if limits[name] is None:
            assert f"{metric} " in info_part and f"{metric} " not in gated_part
        else:
            assert f"{metric} " in gated_part and f"{metric} " not in info_part
            assert (f"(outside {M.bound(metric, limits)})" in line.split(f"{metric} ")[1].split(",")[0]) == \
                (metric in failed), (line, failed)
