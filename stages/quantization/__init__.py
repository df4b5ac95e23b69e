"""Quantization engine: calibration data, GPTQ / AWQ through GPTQModel, the adapter-update vs
quantization-step analysis, CPU cost estimates, and the quality gate shared with ``export``.
Knows nothing of pipelines or manifests (``stages/steps/quantize.py`` is the stage)."""
