"""How long GPTQ / AWQ would take on this machine's CPU, and how much memory, before starting.

A rough model (within a factor of about 2), fitted to runs on a 2-core machine with GPTQModel
7.6 (``docs/quantize-export.md`` has the measurements):

    seconds = (per_token[method] · layer_params · calibration_tokens
               + per_param[method] · layer_params
               + per_solve · Σ over GPTQ layers of in_features² · out_features) · (2 / cores)
            + fixed

The token term is the calibration forward passes through each block; the parameter term is
AWQ's scale search (a grid of 20 scales per projection group, each one quantizing the weights
again), which dominates AWQ on CPU whatever the calibration size; the solve term is GPTQ's
Hessian inverse and column updates. Measured points (2 cores): GPTQ 4-bit on a 494 M-parameter
Qwen2 shape, 8,192 tokens: 194 s (this model: 240 s); on SmolLM2-135M, 1,536 tokens: 43-56 s
on a busy machine (this model: 23 s); AWQ on the 494 M shape: 54 s per layer, 22 min
(this model: 22 min); on SmolLM2-135M: 11.7 min on a busy machine (this model: 6.5 min).
Memory: GPTQModel holds the whole model in 16-bit plus one block's activations.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

PER_TOKEN = {"gptq": 5.0e-11, "awq": 2.0e-11}  # seconds per (layer parameter x calibration token), 2 cores
PER_PARAM = {"gptq": 0.0, "awq": 3.6e-6}  # seconds per layer parameter (AWQ's scale grid search), 2 cores
PER_SOLVE = 1.2e-10  # seconds per (in² x out) of a GPTQ layer's solve, 2 cores
FIXED = 5.0  # seconds: import, load, save


@dataclass
class Estimate:
    seconds: float
    ram_bytes: int
    layer_params: int

    def minutes(self) -> str:
        m = self.seconds / 60
        return f"{self.seconds:.0f} s" if m < 1 else f"{m:.0f} min" if m < 120 else f"{m / 60:.1f} h"


def estimate(shapes: list[tuple[int, int]], total_params: int, tokens: int, method: str,
             cores: int | None = None) -> Estimate:
    """``shapes``: (out_features, in_features) of every layer to quantize; ``tokens``: calibration tokens."""
    cores = max(1, cores or os.cpu_count() or 1)
    scale = 2.0 / cores
    layer_params = sum(o * i for o, i in shapes)
    solve = sum(i * i * o for o, i in shapes) if method == "gptq" else 0
    seconds = (PER_TOKEN[method] * layer_params * tokens + PER_PARAM[method] * layer_params
               + PER_SOLVE * solve) * scale + FIXED
    ram = int(total_params * 2 * 1.3) + 512 * 2 ** 20
    return Estimate(seconds=seconds, ram_bytes=ram, layer_params=layer_params)


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def human_bytes(n: float) -> str:
    if not n or not math.isfinite(n):
        return "0 B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
