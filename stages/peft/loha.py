"""LoHa (low-rank Hadamard product): W += ((w1a @ w1b) * (w2a @ w2b)) * alpha/r, reshaped to W
(CP variant with hada_t1/hada_t2 for convolutions). The update is peft's own
``LoHaLayer.get_delta_weight`` (peft/tuners/loha/layer.py), built per module.
"""
from __future__ import annotations

from stages.peft import family as fam

PEFT_TYPE = "LOHA"
NAME = "LoHa"
ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
SUFFIXES = {f".{role}": ("weight", role) for role in ROLES}
LAYOUTS = ("linear", "conv1d", "conv2d")


def check_config(config: dict, path) -> None:
    fam.require_number(config, path, "r", "alpha", allow_zero=True)


def rank_alpha(config: dict, module: str):
    return (fam.pattern_value(config.get("rank_pattern"), module, config["r"]),
            fam.pattern_value(config.get("alpha_pattern"), module, config["alpha"]))


def make_update(index, adapter, module, param, roles, target, ctx=None):
    from stages.peft.plan import Update

    lay = fam.layout(target, module)
    if lay not in LAYOUTS:
        raise fam.unsupported_layout(adapter, module, roles, target, NAME, lay, LAYOUTS)
    need = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
    if not need <= set(roles) or ("hada_t1" in roles) != ("hada_t2" in roles):
        raise fam.incomplete(adapter, module, roles, "LoHa (hada_w1_a/b, hada_w2_a/b, optionally hada_t1/t2)")
    shapes = {role: adapter.tensors[key].shape for role, key in roles.items()}
    r, alpha = rank_alpha(adapter.config, module)
    out_f = target.shape[0]
    in_f = 1
    for d in target.shape[1:]:
        in_f *= d
    cp = "hada_t1" in roles
    if cp:  # w?a: (r, out), w?b: (r, in channels), t: (r, r, k...)
        fits = shapes["hada_w1_a"] == (r, out_f) and shapes["hada_w2_a"] == (r, out_f) \
            and shapes["hada_w1_b"] == (r, target.shape[1])
    else:
        fits = shapes["hada_w1_a"] == (out_f, r) and shapes["hada_w2_a"] == (out_f, r) \
            and shapes["hada_w1_b"] == (r, in_f) and shapes["hada_w2_b"] == (r, in_f)
    if not fits:
        raise fam.shape_error(adapter, module, roles, target, shapes, f"r={r}")
    return Update(adapter=index, kind="additive", module=module, tensors=dict(roles), peft_type=PEFT_TYPE,
                  scaling=alpha / r, weight=adapter.weight, extra={"layout": lay, "r": r, "alpha": alpha, "cp": cp})


def build_layer(W, update, t, adapter):
    from peft.tuners.loha import layer as L

    from stages.peft.layers import lycoris_layer

    return lycoris_layer(L, W, update, t, adapter)


def apply(W, W0, update, t, adapter=None):
    from stages.peft.layers import apply_layer

    return apply_layer(build_layer, W, update, t, adapter)
