"""Stage ``quantize``: GPTQ or AWQ weight-only quantization of the merged model, with a quality gate.

Reads the merged full-precision model and writes a standard Hugging Face checkpoint with
``quantization_config`` (``quant_method: gptq``, or ``awq`` with ``version: gemm``) that
transformers (with ``gptqmodel`` + ``optimum`` installed), vLLM and SGLang load without Fuse.
The work is done by GPTQModel (:mod:`stages.quantization.backend`; why in
``docs/quantize-export.md``), on CUDA when present, else on CPU.

Before quantizing:

- the calibration data (``calibration: {dataset, samples, seq_len, ...}``; default: a small
  built-in text, offline) is read and tokenized (token ids for models without a tokenizer);
- on CPU, the time and memory it would take are estimated; past ``cpu_max_minutes`` (or the
  free memory) the stage refuses (F601) and says how long it would have taken;
- the adapter's update is compared with the quantization step, layer by layer: a warning
  (F605) names the layers where most of the update is below one step (it would be erased).

After: the checkpoint is reloaded with plain transformers and compared with the merged
model on a fixed evaluation text (:mod:`stages.quantization.gate`, the ``check`` stage's
metrics); a threshold missed fails the stage (F604) with every number in one message.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from ..findings import FuseError
from ..io.jsonfile import read_json
from ..metrics import gate_params
from ..pipeline import Param

NAME = "quantize"
VERSION = 1
INPUT = ("hf-model",)
OUTPUT = "quantized-model"  # not an hf-model: export and check never read it
LIBS = ("torch", "transformers", "gptqmodel", "optimum", "safetensors")
CARD_METRICS = ("max_abs_diff", "kl_mean", "top1_agreement", "ppl_ratio", "greedy_agreement", "update_below_step_max")
METHODS = ("gptq", "awq")
PARAMS = {
    "method": Param(str, "gptq", choices=METHODS, help="gptq, or awq (activation-aware; 4-bit)"),
    "bits": Param(int, 4, choices=(2, 3, 4, 8), help="bits per weight: 4 or 8 (2 and 3: gptq only, experimental)"),
    "group_size": Param(int, 128, help="weights sharing one scale, along the input dimension (-1: one per row); "
                                       "it must divide every quantized layer's input size"),
    "sym": Param(bool, None, help="symmetric grid (no zero point); default true for gptq, false for awq"),
    "desc_act": Param(bool, False, help="gptq: quantize columns in order of decreasing activation (act-order)"),
    "calibration": Param(dict, None, help="{dataset: a .txt/.jsonl file or a Hub dataset id (default: built-in text), "
                                          "samples: 128, seq_len: 512, config, split: train, field: text, revision}"),
    "device": Param(str, "auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when present, else CPU"),
    "cpu_max_minutes": Param(float, 30.0, help="on CPU, refuse when the estimated time is longer (0: no limit)"),
    "erase_warn": Param(float, 0.5, help="warn when more than this fraction of a layer's adapter update is smaller "
                                         "than the quantization step"),
    **gate_params(test="quantized", ref="merged", greedy_tokens=8, greedy_prompts=3,
                  defaults={"max_abs_diff": "default: not gated", "max_kl": "default by bits",
                            "min_top1": "default by bits", "min_greedy": "default: not gated",
                            "max_ppl_ratio": "default by bits"}),
}


def requires(params) -> dict:
    """Modules this stage imports that the base install lacks -> the extra that brings them."""
    return {"gptqmodel": "quantize", "optimum": "quantize"}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
KEEP_OUTPUT = ("config.json", "quantize_config.json")  # written by the quantizer; everything else comes from the input


def check_params(ctx) -> None:
    """Parameter rules across keys (called when the pipeline is loaded, and again at run)."""
    from ..quantization.calibration import local_path, resolve

    p, sid = ctx.params, ctx.stage.id
    where = dict(file=getattr(ctx.pipeline, "path", None), line=getattr(ctx.stage, "line", None))
    if p["method"] == "awq" and p["bits"] != 4:
        raise FuseError("F103", f"awq quantizes to 4 bits only, not {p['bits']}", key=f"{sid}.bits",
                        fix="use bits: 4, or method: gptq for 8 bits", **where)
    if p["method"] == "awq" and p["desc_act"]:
        raise FuseError("F103", "desc_act applies to gptq only", key=f"{sid}.desc_act",
                        fix="remove desc_act, or use method: gptq", **where)
    if p["group_size"] != -1 and p["group_size"] < 8:
        raise FuseError("F103", f"group_size {p['group_size']} is not valid", key=f"{sid}.group_size",
                        fix="use e.g. 128, 64 or 32, or -1 for one scale per row", **where)
    for k in ("cpu_max_minutes", "erase_warn"):
        if p[k] < 0:
            raise FuseError("F103", f"{k} must not be negative", key=f"{sid}.{k}", **where)
    try:
        cal = resolve(p["calibration"], key=f"{sid}.calibration")
    except FuseError as e:
        f = e.finding
        raise FuseError(f.code, f.message, key=f.key, fix=f.fix, **where) from None
    # a local calibration file is relative to the pipeline file, like every path in it
    here = Path(where["file"]).parent if where["file"] else None
    path = local_path(cal["dataset"], here)
    if path is None:
        return
    if not path.is_file():
        raise FuseError("F105", f"calibration file {path} does not exist", key=f"{sid}.calibration.dataset",
                        fix="give a .txt or .jsonl file (relative to the pipeline file), or a Hub dataset id "
                            "(org/name)", **where)
    if str(path) != p["calibration"].get("dataset"):
        p["calibration"] = dict(p["calibration"], dataset=str(path.resolve()))


def input_files(params) -> list[str]:
    """The calibration file (its content is part of the fingerprint)."""
    dataset = (params.get("calibration") or {}).get("dataset")
    return [dataset] if dataset and os.path.isabs(dataset) and os.path.isfile(dataset) else []


def estimate_bytes(ctx) -> int:
    """The output: at most the input's weights at ``bits`` per 16-bit weight, plus side files."""
    total = 0
    for p in Path(ctx.input_dir).rglob("*"):
        if p.is_file():
            total += p.stat().st_size * (max(ctx.params["bits"], 4) / 16 if p.suffix == ".safetensors" else 1)
    return int(total * 1.2) + (1 << 20)


def run(ctx) -> dict:
    from ..io.safetensors import ModelWeights
    from ..quantization import erasure
    from ..quantization.backend import quantize_model
    from ..quantization.calibration import load_calibration

    check_params(ctx)
    p, sid = ctx.params, ctx.stage.id
    method, bits, group = p["method"], p["bits"], p["group_size"]
    sym = p["sym"] if p["sym"] is not None else method == "gptq"
    src = Path(ctx.input_dir)
    config = read_json(src / "config.json", "F205",
                       fix="quantize reads a Hugging Face model directory (the merge's output)")
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")

    weights = ModelWeights.open(src)
    layers = erasure.quantizable(weights)
    _check_layers(layers, group, src, sid)
    device = _device(p["device"], sid)

    from ..quantization.gate import tokenizer

    calib = load_calibration(p["calibration"], tokenizer(src), vocab_size=vocab, key=f"{sid}.calibration")
    ctx.log(f"  quantize: calibration: {calib.source}")
    est = _check_budget(ctx, weights, layers, calib.tokens, method, device)

    metrics: dict = {}
    metrics.update(_erasure(ctx, src, bits, group, sym))

    log_file = ctx.workdir / "logs" / f"{sid}.log"
    log_file.unlink(missing_ok=True)
    ctx.log(f"  quantize: {method} {bits}-bit, group_size {group}, sym {str(sym).lower()} on {device} "
            f"(estimated {est.minutes()}; GPTQModel's output: {log_file})")
    result = quantize_model(src, ctx.output_dir, method=method, bits=bits, group_size=group, sym=sym,
                            desc_act=p["desc_act"], samples=calib.samples, device=device, log_file=log_file)
    _copy_side_files(src, ctx.output_dir)
    packed = sum(name.endswith(".qweight") for name in ModelWeights.open(ctx.output_dir).tensors)
    ctx.log(f"  quantize: {packed} layers quantized in {result.seconds:.1f}s")

    gate_metrics, failures, limits, source = _gate(ctx, src, ctx.output_dir, device, bits, vocab, log_file)
    in_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    out_bytes = sum(f.stat().st_size for f in Path(ctx.output_dir).glob("*.safetensors"))
    from ..quantization.gate import rounded

    out = rounded({k: gate_metrics[k] for k in ("max_abs_diff", "kl_mean", "top1_agreement", "ppl_ratio",
                                                 "greedy_agreement", "mean_abs_diff", "kl_max", "greedy_exact")})
    out.update(rounded({"ppl_merged": gate_metrics["ppl_ref"], "ppl_quantized": gate_metrics["ppl_test"]}))
    out.update(metrics)
    out.update({"method": method, "bits": bits, "group_size": group, "sym": sym, "device": device,
                "layers_quantized": packed, "calibration": calib.source,
                "calibration_tokens": calib.tokens, "eval_prompts": source, "thresholds": limits,
                "bytes_in": in_bytes, "bytes_written": out_bytes,
                "quantize_seconds": round(result.seconds, 1), "estimated_seconds": round(est.seconds, 1)})
    if result.loss_max is not None:
        out["quant_loss_max"] = float(f"{result.loss_max:.4g}")
    if failures:
        from ..quantization.gate import failure_message

        raise FuseError("F604", failure_message(f"the {method} {bits}-bit model", failures, gate_metrics),
                        file=str(src), key=sid,
                        fix=f"quantize with more bits or a smaller group_size, calibrate on text like the model's "
                            f"(calibration.dataset), or relax the gate (--set {sid}.<threshold>=...)",
                        metrics=out)
    return out


# --------------------------------------------------------------------------- before


def _check_layers(layers, group: int, src: Path, sid: str) -> None:
    if not layers:
        raise FuseError("F608", "the model has no linear layers in repeated blocks to quantize", file=str(src),
                        key=sid, fix="quantize applies to transformer language models")
    if group == -1:
        return
    bad = [t for t in layers if t.shape[1] % group]
    if bad:
        sizes = sorted({t.shape[1] for t in layers})
        fits = [g for g in (128, 64, 32, 16) if all(s % g == 0 for s in sizes)]
        raise FuseError("F608", f"group_size {group} does not divide the input size {bad[0].shape[1]} of "
                                f"{bad[0].name} ({len(bad)} layers)", file=str(src), key=f"{sid}.group_size",
                        fix=(f"use group_size: {fits[0]}" if fits else "use group_size: -1") +
                            f" (input sizes: {', '.join(map(str, sizes))})")


def _device(choice: str, sid: str) -> str:
    import torch

    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        raise FuseError("F602", "device: cuda, but torch sees no CUDA device", key=f"{sid}.device",
                        fix="run this stage on a GPU runner (python -m stages run pipeline.yaml --from quantize), "
                            "or use device: auto")
    return "cuda" if choice == "cuda" or (choice == "auto" and cuda) else "cpu"


def _check_budget(ctx, weights, layers, tokens: int, method: str, device: str):
    """On CPU: the time and memory estimate, a refusal past the limits, a note when it is long."""
    import math

    from ..quantization.estimate import available_memory, estimate, human_bytes

    total = sum(math.prod(t.shape) for t in weights.tensors.values())
    est = estimate([tuple(t.shape) for t in layers], total, tokens, method)
    if device != "cpu":
        return est
    sid, limit = ctx.stage.id, ctx.params["cpu_max_minutes"]
    cores = os.cpu_count() or 1
    what = (f"{method}-quantizing this model ({total / 1e6:,.0f} M parameters, {len(layers)} layers) on "
            f"{cores} CPU core{'s' if cores > 1 else ''} with {tokens:,} calibration tokens")
    if limit and est.seconds > limit * 60:
        raise FuseError("F601", f"{what} would take about {est.minutes()} (estimate), more than cpu_max_minutes "
                                f"{limit:g}", key=f"{sid}.cpu_max_minutes",
                        fix=f"run quantize on a GPU runner (python -m stages run pipeline.yaml --from {sid}, after "
                            f"copying the workdir; docs/quantize-export.md), use fewer calibration samples, or raise "
                            f"--set {sid}.cpu_max_minutes=...", estimated_seconds=round(est.seconds))
    free = available_memory()
    if free is not None and est.ram_bytes > free:
        raise FuseError("F601", f"{what} needs about {human_bytes(est.ram_bytes)} of memory, "
                                f"{human_bytes(free)} is available", key=sid,
                        fix="run quantize on a machine with more memory or a GPU")
    if est.seconds > 120:
        ctx.warn("F601", f"{what}: about {est.minutes()} (estimate); a GPU runner takes minutes",
                 key=f"{sid}.device")
    return est


def _erasure(ctx, merged: Path, bits: int, group: int, sym: bool) -> dict:
    """Per layer: how much of the adapter's update is below the quantization step (F605 past erase_warn)."""
    from ..quantization import erasure

    try:
        base_dir = ctx.base.dir
    except Exception as e:  # noqa: BLE001 - the base is not here (e.g. --from quantize elsewhere): skip
        ctx.log(f"  quantize: base model not available, update-vs-step check skipped ({e})")
        return {}
    rows = erasure.update_below_step(Path(base_dir), merged, bits=bits, group_size=group, sym=sym)
    if not rows:
        return {}
    limit = ctx.params["erase_warn"]
    text = erasure.summary(rows, limit, bits)
    if text:
        ctx.warn("F605", text, key=f"{ctx.stage.id}.bits",
                 fix=("use bits: 8 or a smaller group_size" if bits < 8 else "use a smaller group_size") +
                 ", and read the gate's numbers; a larger adapter update (higher LoRA alpha, more training) "
                 "survives quantization better")
    worst = max(rows, key=lambda r: r.below_step)
    return {"update_below_step_max": round(worst.below_step, 4),
            "update_below_step_median_ratio": float(f"{sorted(r.median_ratio for r in rows)[len(rows) // 2]:.3g}"),
            "layers_update_below_step": sum(r.below_step > limit for r in rows),
            "layers_updated": len(rows),
            "update_below_step": {r.name: round(r.below_step, 3) for r in rows}}


# --------------------------------------------------------------------------- after


def _copy_side_files(src: Path, out: Path) -> None:
    """Every non-weight file of the merged model (tokenizer, chat template, generation config, custom
    code...) as it was, over whatever the quantizer re-serialized; its config.json stays."""
    out = Path(out)
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if not f.is_file() or f.name in KEEP_OUTPUT or f.suffix in WEIGHT_SUFFIXES or \
                f.name.endswith(".safetensors.index.json") or f.name.endswith(".bin.index.json"):
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, out / rel)


def _gate(ctx, ref_dir: Path, test_dir: Path, device: str, bits: int, vocab, log_file: Path):
    """The quantized model (reloaded with plain transformers) against the merged one."""
    import torch

    from .. import metrics as M
    from ..quantization import gate
    from ..quantization.capture import captured

    p = ctx.params
    limits = gate.thresholds(gate.QUANTIZE[8 if bits == 8 else 4], p)
    prompts, source = gate.eval_prompts(ref_dir, p["prompts"], p["seed"], vocab, key=f"{ctx.stage.id}.prompts")
    ctx.log(f"  quantize: gate on {source}")
    started = time.perf_counter()
    with captured(log_file):  # transformers' and the kernels' loading chatter
        ref_model = _load(ref_dir, device, quantized=False)
    ref = M.run_prompts(ref_model, prompts, p["greedy_tokens"], p["greedy_prompts"])
    del ref_model
    with captured(log_file):
        test_model = _load(test_dir, device, quantized=True)
    # GPTQModel's torch kernel wraps its dequantization in torch.compile: one recompile per layer
    # shape until dynamo's limit, compiler chatter on stderr, and a slower gate (31 s vs 20 s on the
    # demo); the gate measures the same numbers eagerly
    with torch.compiler.set_stance("force_eager"):
        test = M.run_prompts(test_model, prompts, p["greedy_tokens"], p["greedy_prompts"])
    del test_model
    values = M.compare(ref, test, prompts)
    failures = M.gate(values, limits)
    ctx.log(f"  quantize: gate {'FAILED' if failures else 'passed'} in {time.perf_counter() - started:.1f}s: "
            + M.describe(values, limits, gate.KEY_METRICS))
    return values, failures, {k: v for k, v in limits.items() if v is not None}, source


def _load(model_dir: Path, device: str, quantized: bool):
    """A causal LM in eval mode: the merged model in float32 (CPU) or its own dtype (CUDA); the
    quantized one as transformers loads it (through gptqmodel's kernels)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        if quantized:
            model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cuda:0" if device == "cuda" else "cpu")
        else:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32 if device == "cpu" else "auto",
                device_map="cuda:0" if device == "cuda" else "cpu")
    except ImportError as e:
        from ..extras import install_fix
        raise FuseError("F602", f"transformers cannot load the quantized checkpoint: {str(e).splitlines()[0]}",
                        file=str(model_dir), fix=install_fix({"quantize": []})) from None
    model.eval()
    return model if device == "cpu" else _on_device(model)


class _DeviceOutput:
    def __init__(self, logits, past):
        self.logits, self.past_key_values = logits, past


def _on_device(model):
    """A CUDA model behind the CPU interface :mod:`stages.metrics` uses: ids in, float32 CPU logits out."""
    import torch

    class OnDevice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.device = next(model.parameters()).device

        def forward(self, input_ids, past_key_values=None, use_cache=False):
            out = self.model(input_ids=input_ids.to(self.device), past_key_values=past_key_values,
                             use_cache=use_cache)
            return _DeviceOutput(out.logits.float().cpu(), getattr(out, "past_key_values", None))

    return OnDevice().eval()
