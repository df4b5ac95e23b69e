"""LoKr (low-rank Kronecker product): W += kron(w1, w2) * alpha/r, reshaped to W; w1 is full or
w1_a @ w1_b, w2 full, w2_a @ w2_b or CP (lokr_t2). The update is peft's own
``LoKrLayer.get_delta_weight`` (peft/tuners/lokr/layer.py), built per module; which factors are
full follows from r, decompose_both and decompose_factor exactly as peft decides it.
"""
from __future__ import annotations

from stages.peft import family as fam

PEFT_TYPE = "LOKR"
NAME = "LoKr"
ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
SUFFIXES = {f".{role}": ("weight", role) for role in ROLES}
LAYOUTS = ("linear", "conv1d", "conv2d")


def check_config(config: dict, path) -> None:
    fam.require_number(config, path, "r", "alpha", allow_zero=True)


def make_update(index, adapter, module, param, roles, target, ctx=None):
    from stages.peft.plan import Update

    lay = fam.layout(target, module)
    if lay not in LAYOUTS:
        raise fam.unsupported_layout(adapter, module, roles, target, NAME, lay, LAYOUTS)
    has = set(roles)
    w1 = "lokr_w1" in has or {"lokr_w1_a", "lokr_w1_b"} <= has
    w2 = "lokr_w2" in has or {"lokr_w2_a", "lokr_w2_b"} <= has
    if not (w1 and w2):
        raise fam.incomplete(adapter, module, roles, "LoKr (lokr_w1 or lokr_w1_a/b, and lokr_w2 or lokr_w2_a/b)")
    r = fam.pattern_value(adapter.config.get("rank_pattern"), module, adapter.config["r"])
    alpha = fam.pattern_value(adapter.config.get("alpha_pattern"), module, adapter.config["alpha"])
    # the Kronecker product of w1 (a x c) and w2 (b x d[ x k]) must have W's element count
    shapes = {role: adapter.tensors[key].shape for role, key in roles.items()}
    rows1 = shapes["lokr_w1"][0] if "lokr_w1" in shapes else shapes["lokr_w1_a"][0]
    cols1 = shapes["lokr_w1"][1] if "lokr_w1" in shapes else shapes["lokr_w1_b"][1]
    size = 1
    for d in target.shape:
        size *= d
    if target.shape[0] % rows1 or size % (rows1 * cols1):
        raise fam.shape_error(adapter, module, roles, target, shapes, f"r={r}")
    return Update(adapter=index, kind="additive", module=module, tensors=dict(roles), peft_type=PEFT_TYPE,
                  scaling=alpha / r, weight=adapter.weight,
                  extra={"layout": lay, "r": r, "alpha": alpha, "cp": "lokr_t2" in roles})


def build_layer(W, update, t, adapter):
    from peft.tuners.lokr import layer as L

    from stages.peft.layers import lycoris_layer

    return lycoris_layer(L, W, update, t, adapter)


def apply(W, W0, update, t, adapter=None):
    from stages.peft.layers import apply_layer

    return apply_layer(build_layer, W, update, t, adapter)
