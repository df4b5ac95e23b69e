"""ONNX engine: export a transformers causal LM with torch's dynamo exporter, run it in ONNX
Runtime (prefill and KV-cache decoding), quantize it with ONNX Runtime's own tools.
Knows nothing of pipelines or manifests (``stages/steps/export.py`` is the stage)."""
