"""OFT (orthogonal fine-tuning): W' = (R @ W^T)^T with R block-diagonal orthogonal, the Cayley
transform (or its Neumann series) of skew-symmetric parameters. A function of W0, so it is
merged with peft's own ``OFTLayer.merge`` (peft/tuners/oft/layer.py: Linear, Conv2d,
Embedding), built per module.

Note: peft builds R as a dense in_features x in_features matrix; Fuse does the same (one such
float32 matrix at a time).
"""
from __future__ import annotations

import math

from stages.peft import family as fam

PEFT_TYPE = "OFT"
NAME = "OFT"
SUFFIXES = {".oft_R.weight": ("weight", "oft_R.weight"),
            ".oft_embedding_R.weight": ("weight", "oft_embedding_R.weight")}
LAYOUTS = ("linear", "conv2d", "embedding")


def check_config(config: dict, path) -> None:
    fam.require_number(config, path, "r", "oft_block_size", allow_zero=True)


def make_update(index, adapter, module, param, roles, target, ctx=None):
    from stages.peft.plan import Update

    lay = fam.layout(target, module)
    if lay not in LAYOUTS:
        raise fam.unsupported_layout(adapter, module, roles, target, NAME, lay, LAYOUTS)
    role = "oft_embedding_R.weight" if lay == "embedding" else "oft_R.weight"
    if set(roles) != {role}:
        raise fam.incomplete(adapter, module, roles, f"OFT on a {lay} weight ({role})")
    fam.refuse_weight(adapter, roles, "OFT", ctx.method if ctx else "linear")
    shape = adapter.tensors[roles[role]].shape
    in_f = target.shape[1] * math.prod(target.shape[2:])
    block = (1 + math.isqrt(1 + 8 * shape[1])) // 2 if len(shape) == 2 else 0
    if len(shape) != 2 or block * (block - 1) // 2 != shape[1] or block == 0 or in_f % block \
            or shape[0] not in (1, in_f // block):
        raise fam.shape_error(adapter, module, roles, target, {role: shape})
    return Update(adapter=index, kind="multiplicative", module=module, tensors=dict(roles), peft_type=PEFT_TYPE,
                  weight=adapter.weight, extra={"layout": lay})


def build_layer(W, update, t, adapter):
    from peft.tuners.oft import layer as L

    from stages.peft.layers import peft_config, peft_layer

    lay = update.extra["layout"]
    cls = {"linear": L.Linear, "conv2d": L.Conv2d, "embedding": L.Embedding}[lay]
    config = peft_config(adapter)
    return peft_layer(cls, W, lay, update, t, config=config, r=config.r)


def apply(W, W0, update, t, adapter=None):
    from stages.peft.layers import apply_layer

    return apply_layer(build_layer, W, update, t, adapter)
