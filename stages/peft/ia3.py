"""(IA)^3: learned vectors that rescale activations, folded into the weights multiplicatively:
W = W * l (l is (1, in) for feed-forward modules, (out, 1) otherwise), and for non-feed-forward
modules the bias too: b = b * l. The weight update is peft's own ``IA3Layer.merge``
(peft/tuners/ia3/layer.py: Linear incl. GPT-2 Conv1D, Conv2d, Conv3d), built per module; the bias
line is the one-line ``torch.mul(bias, ia3_l.reshape(bias.shape))`` of the same ``merge``.
"""
from __future__ import annotations

from stages.peft import family as fam

PEFT_TYPE = "IA3"
NAME = "(IA)^3"
SUFFIXES = {".ia3_l": ("weight", "ia3_l")}
LAYOUTS = ("linear", "gpt2-conv1d", "conv2d", "conv3d")


def check_config(config: dict, path) -> None:
    pass


def make_update(index, adapter, module, param, roles, target, ctx=None):
    from stages.peft.plan import Update

    lay = fam.layout(target, module, bool(adapter.config.get("fan_in_fan_out")))
    if lay not in LAYOUTS:
        raise fam.unsupported_layout(adapter, module, roles, target, NAME, lay, LAYOUTS)
    method = ctx.method if ctx else "linear"
    fam.refuse_weight(adapter, roles, "(IA)^3", method)
    feedforward = fam.matches_any(module, adapter.config.get("feedforward_modules"))
    out_f, in_f = fam.out_in(target, lay)
    shape = adapter.tensors[roles["ia3_l"]].shape
    if lay in ("linear", "gpt2-conv1d"):
        expected = (1, in_f) if feedforward else (out_f, 1)
    else:
        expected = (1, in_f if feedforward else out_f) + (1,) * (len(target.shape) - 2)
    if tuple(shape) != expected:
        raise fam.shape_error(adapter, module, roles, target, {"ia3_l": shape},
                              "feed-forward module" if feedforward else "not a feed-forward module")
    update = Update(adapter=index, kind="multiplicative", module=module, tensors=dict(roles), peft_type=PEFT_TYPE,
                    weight=adapter.weight, extra={"layout": lay, "feedforward": feedforward})
    updates = [("weight", update)]
    bias = f"{module}.bias"
    if not feedforward and ctx is not None and ctx.resolve(bias) is not None:
        updates.append(("bias", Update(adapter=index, kind="multiplicative", module=module, tensors=dict(roles),
                                       peft_type=PEFT_TYPE, weight=adapter.weight, extra={"bias": True})))
    return updates


def build_layer(W, update, t, adapter):
    from peft.tuners.ia3 import layer as L

    from stages.peft.layers import peft_config, peft_layer

    lay = update.extra["layout"]
    cls = {"linear": L.Linear, "gpt2-conv1d": L.Linear, "conv2d": L.Conv2d, "conv3d": L.Conv3d}[lay]
    return peft_layer(cls, W, lay, update, t, config=peft_config(adapter), is_feedforward=update.extra["feedforward"],
                      is_target_conv_1d_layer=lay == "gpt2-conv1d")


def apply(W, W0, update, t, adapter=None):
    from stages.peft.layers import apply_layer

    if update.extra.get("bias"):
        return W.mul_(t["ia3_l"].reshape(W.shape))
    return apply_layer(build_layer, W, update, t, adapter)
