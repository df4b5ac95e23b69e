"""AdaLoRA: W += transpose(B @ (A * E), fan_in_fan_out) * lora_alpha / (ranknum + 1e-5), where
ranknum is ``init_r`` (peft never saves it) and the saved A/E/B already hold only the ranks that
``rank_pattern`` (boolean masks) kept. The update is peft's own ``SVDLinear.get_delta_weight``
(peft/tuners/adalora/layer.py), built per module with the rank the tensors have.
"""
from __future__ import annotations

from stages.findings import FuseError
from stages.peft import family as fam

PEFT_TYPE = "ADALORA"
NAME = "AdaLoRA"
SUFFIXES = {".lora_A": ("weight", "lora_A"), ".lora_B": ("weight", "lora_B"), ".lora_E": ("weight", "lora_E")}
LAYOUTS = ("linear", "gpt2-conv1d")


def check_config(config: dict, path) -> None:
    fam.require_number(config, path, "init_r", "lora_alpha", allow_zero=True)
    for key in ("lora_embedding_A", "use_dora"):
        if config.get(key):
            raise FuseError("F202", f"AdaLoRA with {key} is not something peft merges", file=str(path), key=key)


def make_update(index, adapter, module, param, roles, target, ctx=None):
    from stages.peft.plan import Update

    lay = fam.layout(target, module, bool(adapter.config.get("fan_in_fan_out")))
    if lay not in LAYOUTS:
        raise fam.unsupported_layout(adapter, module, roles, target, NAME, lay, LAYOUTS)
    if set(roles) != {"lora_A", "lora_B", "lora_E"}:
        raise fam.incomplete(adapter, module, roles, "AdaLoRA (lora_A, lora_E, lora_B)")
    out_f, in_f = fam.out_in(target, lay)
    shapes = {role: adapter.tensors[key].shape for role, key in roles.items()}
    rank = shapes["lora_A"][0] if len(shapes["lora_A"]) == 2 else -1
    if tuple(shapes["lora_A"]) != (rank, in_f) or tuple(shapes["lora_E"]) != (rank, 1) \
            or tuple(shapes["lora_B"]) != (out_f, rank) or rank > adapter.config["init_r"]:
        raise fam.shape_error(adapter, module, roles, target, shapes, f"init_r={adapter.config['init_r']}")
    return Update(adapter=index, kind="additive", module=module, tensors=dict(roles), peft_type=PEFT_TYPE,
                  weight=adapter.weight, fan_in_fan_out=lay == "gpt2-conv1d",
                  extra={"layout": lay, "rank": rank, "init_r": adapter.config["init_r"]})


def build_layer(W, update, t, adapter):
    from peft.tuners.adalora import layer as L

    from stages.peft.layers import ADAPTER, peft_config, peft_layer

    config = peft_config(adapter)
    layer = peft_layer(L.SVDLinear, W, update.extra["layout"], update, t, config=config, r=update.extra["rank"],
                       lora_alpha=config.lora_alpha)
    layer.ranknum[ADAPTER].data.fill_(float(update.extra["init_r"]))  # what peft restores after a rank_pattern resize
    return layer


def apply(W, W0, update, t, adapter=None):
    from stages.peft.layers import apply_layer

    return apply_layer(build_layer, W, update, t, adapter)
