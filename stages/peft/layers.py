"""Reuse peft's own layer classes, one module at a time, for the exact update.

A family whose math lives in peft's layer code (LoHa, LoKr, IA3, VeRA, AdaLoRA, LoRA
on convolutions; OFT and BOFT take their rotation blocks from it) does not re-derive it: :func:`peft_layer` wraps the
float32 base tensor in a throwaway ``nn.Linear`` / ``nn.ConvNd`` / ``nn.Embedding`` /
transformers ``Conv1D`` (built on the meta device, so nothing is allocated but the
tensor we already hold), builds peft's layer around it with the adapter's own config,
loads the adapter tensors into it, and the family calls ``get_delta_weight`` (additive
methods) or ``merge`` (methods that are functions of W0). The layer is dropped right
after, so memory stays one module's worth.

torch and peft are imported here; planning never imports this module.
"""
from __future__ import annotations

import contextlib
import warnings

from stages.findings import FuseError

ADAPTER = "default"   # the adapter name inside throwaway layers


def peft_config(adapter):
    """The adapter's ``PeftConfig`` as peft itself builds it from adapter_config.json (cached on the adapter)."""
    cached = adapter._cache.get("peft_config")
    if cached is None:
        from stages.peft.adapter import CONFIG_NAME, peft_config_of

        with quiet():
            cached = peft_config_of(adapter.config, adapter.path / CONFIG_NAME)  # F201 when peft refuses it
        cached.inference_mode = True
        adapter._cache["peft_config"] = cached
    return cached


@contextlib.contextmanager
def quiet():
    """Silence peft's construction-time warnings (they describe training, not merging), and keep BOFT from
    trying to compile its CUDA extension: on CPU peft falls back to the same torch code."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patched = None
        try:
            import peft.tuners.boft.layer as boft_layer

            patched, boft_layer._FBD_CUDA = boft_layer._FBD_CUDA, False
        except ImportError:  # pragma: no cover - peft without BOFT
            pass
        try:
            yield
        finally:
            if patched is not None:
                boft_layer._FBD_CUDA = patched


def layout_of(W, *, fan_in_fan_out: bool = False, embedding: bool = False) -> str:
    """Which torch module holds a weight of this shape: linear, conv1d/2d/3d, gpt2-conv1d or embedding."""
    if W.dim() == 2:
        if embedding:
            return "embedding"
        return "gpt2-conv1d" if fan_in_fan_out else "linear"
    return {3: "conv1d", 4: "conv2d", 5: "conv3d"}.get(W.dim(), f"{W.dim()}-d")


def base_module(W, layout: str, bias=None):
    """A module of kind ``layout`` whose weight *is* ``W`` (no copy) and whose bias is ``bias``."""
    import torch
    from torch import nn

    with torch.device("meta"):
        if layout == "linear":
            module = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None)
        elif layout == "embedding":
            module = nn.Embedding(W.shape[0], W.shape[1])
        elif layout == "gpt2-conv1d":
            from transformers.pytorch_utils import Conv1D

            module = Conv1D(W.shape[1], W.shape[0])
        elif layout in ("conv1d", "conv2d", "conv3d"):
            cls = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[layout]
            # groups cannot be read from a checkpoint; a grouped conv looks like one with in/groups channels
            module = cls(W.shape[1], W.shape[0], tuple(W.shape[2:]), bias=bias is not None)
        else:
            raise ValueError(f"no module holds a {layout} weight")
    module.weight = nn.Parameter(W, requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(bias, requires_grad=False)
    elif hasattr(module, "bias") and module.bias is not None:  # Conv1D always has one
        module.bias = nn.Parameter(torch.zeros(W.shape[-1] if layout == "gpt2-conv1d" else W.shape[0]),
                                   requires_grad=False)
    return module


def peft_layer(cls, W, layout: str, update, tensors: dict, *, bias=None, before=(), **kwargs):
    """peft's layer ``cls(base, *before, "default", **kwargs)`` around ``W``, holding this update's adapter
    tensors (role = parameter path)."""
    import torch

    base = base_module(W, layout, bias)
    with quiet(), torch.no_grad():
        try:
            layer = cls(base, *before, ADAPTER, **kwargs)
        except (TypeError, ValueError) as e:
            raise FuseError("F202", f"{update.module}: peft cannot build its {cls.__module__.split('.')[-2]} layer "
                            f"on this {layout} weight {list(W.shape)}: {e}") from None
        layer.eval()
        for role, tensor in tensors.items():
            set_param(layer, role, tensor, update)
    return layer


def set_param(layer, role: str, tensor, update) -> None:
    """Put ``tensor`` where peft keeps the adapter parameter saved as ``<module>.<role>``:
    ``hada_w1_a`` -> ``layer.hada_w1_a["default"]``, ``oft_R.weight`` -> ``layer.oft_R["default"].weight``."""
    head, _, rest = role.partition(".")
    holder = getattr(layer, head, None)
    target = holder[ADAPTER] if holder is not None and ADAPTER in holder else None
    for part in rest.split(".") if rest else ():
        target = getattr(target, part, None)
    if target is None:
        raise FuseError("F208", f"{update.module}: the adapter holds {role}, which peft's layer for this module "
                        "does not have (a different variant of the method?)", key=update.tensors.get(role),
                        fix="re-save the adapter with the peft version it was trained with")
    if tuple(target.shape) != tuple(tensor.shape):
        raise FuseError("F204", f"{update.module}: adapter tensor {role} has shape {list(tensor.shape)}, but peft's "
                        f"layer for this base tensor expects {list(target.shape)}", key=update.tensors.get(role),
                        fix="merge the adapter into the model it was trained on, with its own adapter_config.json")
    target.data = tensor.to(target.dtype) if target.dtype.is_floating_point else tensor


def merged_weight(layer):
    """The base weight after ``layer.merge()`` (peft's own in-place or replacing merge)."""
    import torch

    with quiet(), torch.no_grad():
        layer.merge(adapter_names=[ADAPTER])
    return layer.get_base_layer().weight.data


def delta_weight(layer):
    import torch

    with quiet(), torch.no_grad():
        return layer.get_delta_weight(ADAPTER)


def apply_layer(build, W, update, t, adapter):
    """Apply one update through peft's layer: ``W + weight·get_delta_weight()`` for additive methods
    (``update.kind == "additive"``), peft's ``merge()`` for the ones that are functions of W0."""
    layer = build(W, update, t, adapter)
    if update.kind != "additive":
        return merged_weight(layer)
    delta = delta_weight(layer)
    if update.weight != 1.0:
        delta = delta * update.weight
    return W.add_(delta)


def lycoris_layer(layer_module, W, update, t, adapter):
    """LoHa and LoKr build their peft layer the same way, each from its own layer module."""
    config = peft_config(adapter)
    config.use_effective_conv2d = update.extra["cp"]
    cls = {"linear": layer_module.Linear, "conv1d": layer_module.Conv1d,
           "conv2d": layer_module.Conv2d}[update.extra["layout"]]
    return peft_layer(cls, W, update.extra["layout"], update, t, config=config, r=update.extra["r"],
                      alpha=update.extra["alpha"])
