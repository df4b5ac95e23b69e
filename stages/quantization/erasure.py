"""Would quantization erase the fine-tuning? The adapter's update against the quantization step.

Weight-only quantization stores each weight as ``scale · (q - zero)`` with ``q`` on a grid
of ``2^bits`` levels per group of ``group_size`` inputs; the grid's step is the group's
``scale``. An update ``ΔW`` smaller than that step changes the stored integer only when
the weight sits within ``|ΔW|`` of a rounding boundary, i.e. with probability ``|ΔW| / step``:
when most of a layer's updates are below one step, most of what the fine-tuning changed
in that layer does not survive. This module measures it from the weights alone, before
quantizing: ``ΔW`` = merged − base, the step from the merged weight's groups (the step
GPTQ/AWQ start from: min–max per group, symmetric or not).

Read tensor by tensor (headers first), so memory holds two tensors at a time.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# the projections weight-only quantizers replace: 2-D weights inside the repeated blocks
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.\d+\.")
_SKIP = re.compile(r"norm|embed|wte|wpe|ln_|lm_head|rotary|router|gate\.weight$")


def quantizable(weights) -> list:
    """The tensors (``TensorInfo``) of a ``ModelWeights`` that GPTQ/AWQ quantize: 2-D ``.weight``
    tensors of linear layers inside the repeated blocks (norms, embeddings, lm_head and MoE
    routers are kept)."""
    return [t for name, t in weights.tensors.items()
            if name.endswith(".weight") and len(t.shape) == 2 and _BLOCK.search(name) and not _SKIP.search(name)]


def group_step(W, bits: int, group_size: int, sym: bool):
    """The quantization step of every weight of ``W`` [out, in] (float32): per output row and
    group of ``group_size`` inputs (-1: the whole row), ``(max - min) / (2^bits - 1)``, with
    ``max = -min = max|w|`` when symmetric."""
    import torch

    rows, cols = W.shape
    g = cols if group_size in (-1, 0) or group_size >= cols else group_size
    pad = (-cols) % g
    Wp = torch.nn.functional.pad(W, (0, pad)) if pad else W
    G = Wp.reshape(rows, -1, g)
    if sym:
        step = 2 * G.abs().amax(-1) / (2 ** bits - 1)
    else:
        step = (G.amax(-1).clamp_min(0) - G.amin(-1).clamp_max(0)) / (2 ** bits - 1)
    return step.repeat_interleave(g, dim=1)[:, :cols]


@dataclass
class LayerErasure:
    name: str  # module name (the tensor name without ``.weight``)
    below_step: float  # fraction of the updated weights whose |ΔW| is below one quantization step
    updated: float  # fraction of the layer's weights the adapter changed at all
    median_ratio: float  # median |ΔW| / step over the updated weights


def update_below_step(base_dir: Path, merged_dir: Path, *, bits: int, group_size: int, sym: bool,
                      log=None) -> list[LayerErasure]:
    """Per quantizable layer the adapter changed: how much of its update is below the step.

    Example::

        rows = update_below_step(Path("base"), Path("runs/x/merge"), bits=4, group_size=128, sym=True)
        worst = max(rows, key=lambda r: r.below_step)
    """
    import torch

    from ..io.safetensors import ModelWeights

    base, merged = ModelWeights.open(base_dir), ModelWeights.open(merged_dir)
    out = []
    with torch.no_grad():
        for info in quantizable(merged):
            if info.name not in base.tensors or tuple(base[info.name].shape) != tuple(info.shape):
                continue
            W = merged.load(info.name).float()
            delta = W - base.load(info.name).float()
            changed = delta != 0
            n_changed = int(changed.sum())
            if n_changed == 0:
                continue
            step = group_step(W, bits, group_size, sym)
            ratio = delta.abs()[changed] / step[changed].clamp_min(1e-30)
            out.append(LayerErasure(name=info.name.removesuffix(".weight"),
                                    below_step=float((ratio < 1).double().mean()),
                                    updated=n_changed / delta.numel(),
                                    median_ratio=float(ratio.median())))
    return out


def summary(rows: list[LayerErasure], threshold: float, bits: int) -> str | None:
    """The warning for layers where more than ``threshold`` of the update is below the step, or None."""
    bad = sorted((r for r in rows if r.below_step > threshold), key=lambda r: -r.below_step)
    if not bad:
        return None
    shown = ", ".join(f"{r.name} {r.below_step:.0%}" for r in bad[:6])
    more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
    return (f"the adapter's update is smaller than the {bits}-bit quantization step for most weights of "
            f"{len(bad)} of the {len(rows)} layers it changed ({shown}{more}): quantizing will erase much of the "
            f"fine-tuning in those layers")
