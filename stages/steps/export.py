"""Stage ``export``: the merged model to ONNX, checked in ONNX Runtime against the merged model.

Reads the merged full-precision Hugging Face model (never a GPTQ/AWQ checkpoint: exporting a
quantized torch model gives a broken or bloated graph, ``docs/quantize-export.md``) and writes
a directory that ONNX Runtime loads as it is: ``model.onnx`` (+ ``model.onnx.data`` when the
weights pass ~2 GB; the graph records that name, so both travel together under these names),
and the model's config, generation config and tokenizer files.

- ``with_past: true`` exports one graph with KV-cache inputs and outputs (prefill with an
  empty cache, then decode token by token); ``false`` a graph without cache.
- ``dtype``: float32 (exact) or float16.
- ``quantize: int8 | int4``: ONNX Runtime's own weight quantization of the exported graph
  (``MatMulNBits`` for int4, dynamic int8); the lm_head stays full precision unless
  ``quantize_lm_head``.

Quality gate: the graph runs in ONNX Runtime on a fixed evaluation text (teacher forcing),
and greedy decoding runs through its KV cache for a few steps; against the merged model in
torch (float32): max abs logit difference (prefill and each decode step), KL, top-1,
perplexity ratio, greedy agreement (:mod:`stages.quantization.gate`, the ``check`` stage's
metrics). Thresholds default by variant (float32: max abs diff 1e-3); a miss fails the stage
(F607) with every number in one message.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from ..findings import FuseError
from ..io.jsonfile import read_json
from ..metrics import THRESHOLD_PARAMS, gate_params
from ..pipeline import Param

NAME = "export"
VERSION = 2  # 2: the exporter's debugging metadata (stack traces with local paths) is scrubbed from the graph
INPUT = ("hf-model",)  # the merged full-precision model; quantize's output is another kind
OUTPUT = "onnx-model"
LIBS = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")
CARD_METRICS = ("max_abs_diff", "decode_max_abs_diff", "kl_mean", "top1_agreement", "ppl_ratio", "greedy_agreement")
PARAMS = {
    "format": Param(str, "onnx", choices=("onnx",), help="onnx (ONNX Runtime)"),
    "opset": Param(int, None, help="ONNX opset (default: the exporter's, 20 with torch 2.13)"),
    "with_past": Param(bool, True, help="KV-cache inputs/outputs for generation (false: a graph without cache)"),
    "dtype": Param(str, "float32", choices=("float32", "float16"), help="weights and activations of the graph"),
    "quantize": Param(str, "none", choices=("none", "int8", "int4"),
                      help="ONNX Runtime weight quantization of the graph: int4 (MatMulNBits) or int8 (dynamic)"),
    "block_size": Param(int, 32, help="int4: weights per scale (16, 32, 64, 128, ...)"),
    "quantize_lm_head": Param(bool, False, help="int4/int8: quantize the projection to the vocabulary too"),
    "optimize": Param(bool, True, help="run onnxscript's graph optimizer (constant folding, fusions); false "
                                       "exports ~40% faster (ONNX Runtime optimizes at load either way)"),
    "external_data": Param(str, "auto", choices=("auto", "always", "never"),
                           help="weights in model.onnx.data: auto (past ~2 GB), always, never"),
    **gate_params(test="ONNX", ref="merged", greedy_tokens=8, greedy_prompts=3,
                  defaults={k: "default by dtype and quantize" for k in THRESHOLD_PARAMS}),
}


def requires(params) -> dict:
    """Modules this stage imports that the base install lacks -> the extra that brings them."""
    return {"onnx": "export", "onnxscript": "export", "onnxruntime": "export"}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".data")


def check_params(ctx) -> None:
    p, sid = ctx.params, ctx.stage.id
    where = dict(file=getattr(ctx.pipeline, "path", None), line=getattr(ctx.stage, "line", None))
    if p["quantize"] != "none" and p["dtype"] != "float32":
        raise FuseError("F103", f"quantize: {p['quantize']} starts from a float32 graph, not {p['dtype']}",
                        key=f"{sid}.dtype", fix="use dtype: float32 with quantize", **where)
    if p["block_size"] < 16 or p["block_size"] & (p["block_size"] - 1):
        raise FuseError("F103", f"block_size {p['block_size']} is not a power of two >= 16", key=f"{sid}.block_size",
                        fix="use 32, 64 or 128", **where)
    if p["opset"] is not None and not 17 <= p["opset"] <= 23:
        raise FuseError("F103", f"opset {p['opset']} is not supported by the exporter", key=f"{sid}.opset",
                        fix="use an opset from 17 to 23, or leave it out", **where)


def estimate_bytes(ctx) -> int:
    """float32 weights: twice a 16-bit merged model, plus the float32 copy a quantized export starts from."""
    weights = sum(p.stat().st_size for p in Path(ctx.input_dir).glob("*.safetensors"))
    per = {"float32": 2, "float16": 1}[ctx.params["dtype"]] * (2 if ctx.params["quantize"] != "none" else 1)
    return int(weights * per * 1.1) + (1 << 20)


def variant(params: dict) -> str:
    return params["quantize"] if params["quantize"] != "none" else params["dtype"]


def run(ctx) -> dict:
    from ..onnx import exporter
    from ..onnx.runtime import op_types
    from ..quantization.capture import captured

    check_params(ctx)
    p, sid = ctx.params, ctx.stage.id
    src = Path(ctx.input_dir)
    out = Path(ctx.output_dir)
    log_file = ctx.workdir / "logs" / f"{sid}.log"
    log_file.unlink(missing_ok=True)
    config = read_json(src / "config.json", "F205",
                       fix="export reads a Hugging Face model directory (the merge's output)")
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")

    started = time.perf_counter()
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        from ..extras import install_fix
        raise FuseError("F602", f"export needs onnx, onnxscript and onnxruntime ({e})",
                        fix=install_fix({"export": []})) from None
    with captured(log_file):
        model = exporter.load_model(src, p["dtype"])
    quantize = p["quantize"] != "none"
    scratch = Path(tempfile.mkdtemp(prefix=f"{Path(ctx.output_dir).name}-scratch-", dir=ctx.workdir)) if quantize else None
    try:
        target = (scratch if quantize else out) / "model.onnx"
        ctx.log(f"  export: torch.onnx (dynamo), {p['dtype']}, with_past {str(p['with_past']).lower()} "
                f"(exporter output: {log_file})")
        try:
            with captured(log_file):
                result = exporter.export(model, target, with_past=p["with_past"], opset=p["opset"],
                                         external_data="auto" if quantize else p["external_data"],
                                         optimize=p["optimize"])
        except Exception as e:
            import traceback

            with open(log_file, "a", encoding="utf-8") as f:
                f.write("".join(traceback.format_exception(e)))
            raise FuseError("F606", f"torch.onnx.export failed: {exporter.root_cause(e)}",
                            file=str(log_file), key=sid,
                            fix="see the log for the exporter's full output; a model whose forward torch.export "
                                "cannot trace may need a newer torch/transformers, or with_past: false") from e
        export_seconds = time.perf_counter() - started
        ctx.log(f"  export: {', '.join(result.files)} (opset {result.opset}) in {export_seconds:.1f}s")
        quant_info = {}
        if quantize:
            from ..onnx.quantize import quantize_graph

            q_started = time.perf_counter()
            weights = sum(x.numel() * 4 for x in model.parameters())
            ext = p["external_data"] == "always" or (p["external_data"] == "auto" and
                                                    weights / (8 if p["quantize"] == "int4" else 4) >
                                                    exporter.EXTERNAL_DATA_THRESHOLD)
            with captured(log_file):
                quant_info = quantize_graph(target, out / "model.onnx", p["quantize"], block_size=p["block_size"],
                                            keep_lm_head=not p["quantize_lm_head"], external_data=ext)
            ctx.log(f"  export: ONNX Runtime {p['quantize']} quantization in {time.perf_counter() - q_started:.1f}s"
                    + (f" (kept full precision: {', '.join(quant_info['kept_full_precision'])})"
                       if quant_info["kept_full_precision"] else ""))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if quantize:  # ORT's quantizers copy metadata they find; a scrubbed graph has none, this keeps it so
        exporter.scrub_file(out / "model.onnx")
    files = sorted(f.name for f in out.iterdir())  # the graph and its data file(s), before the side files
    _copy_side_files(src, out)

    ref_model = model if p["dtype"] == "float32" else None
    del model
    values, failures, limits, source = _gate(ctx, src, out / "model.onnx", ref_model, vocab, log_file)
    ops = op_types(out / "model.onnx")
    from ..quantization.gate import failure_message, rounded

    metrics = rounded({k: values[k] for k in ("max_abs_diff", "decode_max_abs_diff", "kl_mean", "top1_agreement",
                                               "ppl_ratio", "greedy_agreement", "mean_abs_diff", "kl_max",
                                               "greedy_exact") if k in values})
    metrics.update(rounded({"ppl_merged": values["ppl_ref"], "ppl_onnx": values["ppl_test"]}))
    metrics.update({"format": "onnx", "variant": variant(p), "opset": result.opset, "with_past": p["with_past"],
                    "files": files, "external_data": any(f != "model.onnx" for f in files),
                    "bytes_written": sum((out / f).stat().st_size for f in files),
                    "eval_prompts": source, "thresholds": limits, "export_seconds": round(export_seconds, 1)})
    if quantize:
        metrics["quantized_ops"] = {k: v for k, v in ops.items()
                                    if k in ("MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear")}
        metrics["kept_full_precision"] = quant_info.get("kept_full_precision", [])
    if failures:
        raise FuseError("F607", failure_message(f"the ONNX model ({variant(p)}) in ONNX Runtime", failures, values),
                        file=str(src), key=sid,
                        fix="for int4/int8 try a smaller block_size or quantize: int8; for float16, float32; or relax "
                            f"the gate (--set {sid}.<threshold>=...)", metrics=metrics)
    return metrics


def _copy_side_files(src: Path, out: Path) -> None:
    """The merged model's non-weight files (config, generation config, tokenizer, chat template), so the
    ONNX directory is self-contained (ORTModelForCausalLM and GenAI tools read config.json)."""
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if not f.is_file() or f.suffix in WEIGHT_SUFFIXES or f.name.endswith((".index.json", ".onnx_data")):
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, out / rel)


def _gate(ctx, ref_dir: Path, onnx_path: Path, ref_model, vocab, log_file: Path):
    """ORT against torch float32: teacher-forced logits, then greedy decoding through the graph's KV cache
    with each step's logits compared to torch's on the same tokens."""
    import torch

    from .. import metrics as M
    from ..onnx.exporter import load_model
    from ..onnx.runtime import OnnxCausalLM
    from ..quantization import gate

    p = ctx.params
    limits = gate.thresholds(gate.EXPORT[variant(p)], p)
    prompts, source = gate.eval_prompts(ref_dir, p["prompts"], p["seed"], vocab, key=f"{ctx.stage.id}.prompts")
    started = time.perf_counter()
    if ref_model is None:
        from ..quantization.capture import captured

        with captured(log_file):
            ref_model = load_model(ref_dir, "float32")
    n, k = p["greedy_tokens"], p["greedy_prompts"]
    ref = M.run_prompts(ref_model, prompts, n, k)
    lm = OnnxCausalLM(onnx_path)
    test = M.run_prompts(lm.forward, prompts, 0, 0)
    decode_diff = 0.0
    with torch.no_grad():
        for prompt in prompts[:k]:
            ids = torch.tensor([prompt])
            tokens, steps = lm.greedy(ids, n)
            test.greedy.append(tokens)
            if tokens:  # torch's logits at the same positions, on the tokens ORT chose
                seq = torch.tensor([prompt + tokens[:-1]])
                want = ref_model(input_ids=seq).logits[0, len(prompt) - 1:].float()
                decode_diff = max(decode_diff, float((want - steps).abs().max()))
    values = M.compare(ref, test, prompts)
    values["decode_max_abs_diff"] = decode_diff
    failures = M.gate(values, limits)
    if limits.get("max_abs_diff") is not None and decode_diff > limits["max_abs_diff"]:
        failures.append(f"decode_max_abs_diff {decode_diff:.4g} > max_abs_diff {limits['max_abs_diff']:g}")
    how = "through its KV cache" if lm.with_past else "without cache"
    ctx.log(f"  export: gate {'FAILED' if failures else 'passed'} on {source}, {k} greedy decodes of {n} tokens "
            f"{how}, in {time.perf_counter() - started:.1f}s: "
            + M.describe(values, limits, gate.KEY_METRICS + ("decode_max_abs_diff",)))
    return values, failures, {key: v for key, v in limits.items() if v is not None}, source
