"""BOFT (butterfly orthogonal fine-tuning): W' = (R_butterfly @ W^T)^T * boft_s, R the product of
butterfly-permuted block-diagonal Cayley rotations. A function of W0.

With ``boft_n_butterfly_factor: 1`` there is one factor and its permutation is the identity
(``block_butterfly_perm`` returns ``arange``), so R is block-diagonal as in OFT: the blocks come
from peft's own ``BOFTLayer.cayley_batch`` and R is applied as OFT's is (:func:`oft.block_rotate`,
a strip of rows at a time, peft's numbers). peft's layer is not built: it holds its permutation
as a dense in×in matrix (two, while building it) and multiplies R by it twice; products with an
identity change no value.

peft without its CUDA extension (any CPU) merges only ``boft_n_butterfly_factor: 1``, and so
does Fuse; larger factors are refused with that reason.
"""
from __future__ import annotations

import math

from stages.findings import FuseError
from stages.peft import family as fam

PEFT_TYPE = "BOFT"
NAME = "BOFT"
SUFFIXES = {".boft_R": ("weight", "boft_R"), ".boft_s": ("weight", "boft_s")}
LAYOUTS = ("linear", "conv2d")


def check_config(config: dict, path) -> None:
    factor = config.get("boft_n_butterfly_factor", 1)
    if factor != 1:
        raise FuseError("F202", f"this BOFT adapter cannot be merged by Fuse: boft_n_butterfly_factor={factor}; peft "
                        "itself merges factors above 1 only with its CUDA extension", file=str(path),
                        key="boft_n_butterfly_factor", fix="merge with peft's merge_and_unload() on a CUDA machine")


def make_update(index, adapter, module, param, roles, target, ctx=None):
    from stages.peft.plan import Update

    lay = fam.layout(target, module, bool(adapter.config.get("fan_in_fan_out")))
    if lay not in LAYOUTS:
        raise fam.unsupported_layout(adapter, module, roles, target, NAME, lay, LAYOUTS)
    if set(roles) != {"boft_R", "boft_s"}:
        raise fam.incomplete(adapter, module, roles, "BOFT (boft_R and boft_s)")
    fam.refuse_weight(adapter, roles, "BOFT", ctx.method if ctx else "linear")
    shapes = {role: adapter.tensors[key].shape for role, key in roles.items()}
    R = shapes["boft_R"]
    in_f = target.shape[1] * math.prod(target.shape[2:])
    out_f = target.shape[0]
    if len(R) != 4 or R[0] != 1 or R[2] != R[3] or R[1] * R[2] != in_f \
            or math.prod(shapes["boft_s"]) != out_f:
        raise fam.shape_error(adapter, module, roles, target, shapes)
    return Update(adapter=index, kind="multiplicative", module=module, tensors=dict(roles), peft_type=PEFT_TYPE,
                  weight=adapter.weight, extra={"layout": lay})


def apply(W, W0, update, t, adapter=None):
    import torch
    from peft.tuners.boft.layer import BOFTLayer

    from stages.peft.oft import block_rotate

    R = t["boft_R"]
    with torch.no_grad():  # cayley_batch reads nothing from the layer
        blocks = BOFTLayer.cayley_batch(None, R.reshape(-1, R.shape[-2], R.shape[-1]))
    flat = W.reshape(W.shape[0], -1)  # Conv2d: peft's view (out, in·k·k)
    return (block_rotate(flat, blocks) * t["boft_s"].reshape(-1, 1)).view(W.shape)
