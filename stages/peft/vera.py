"""VeRA: W += transpose((lambda_b * B[:out]) @ (lambda_d * A[:, :in]), fan_in_fan_out), with one pair
of random projections A (r x in_max) and B (out_max x r) shared by every module. The update is
peft's own ``VeraLayer.get_delta_weight`` (peft/tuners/vera/layer.py), built per module.

When the adapter was saved with ``save_projection: false`` the projections are not in the file:
peft regenerates them from ``projection_prng_key`` (``VeraModel._init_vera_A_vera_B``: a seeded
CPU generator, Kaiming-uniform A then B, sized by the largest targeted module), and so does Fuse,
with peft's own ``_kaiming_init``.
"""
from __future__ import annotations

from stages.findings import FuseError
from stages.peft import family as fam

PEFT_TYPE = "VERA"
NAME = "VeRA"
SUFFIXES = {".vera_lambda_b": ("weight", "vera_lambda_b"), ".vera_lambda_d": ("weight", "vera_lambda_d")}
SHARED = ("vera_A", "vera_B")   # saved once, as base_model.vera_A / base_model.vera_B
LAYOUTS = ("linear", "gpt2-conv1d")


def check_config(config: dict, path) -> None:
    fam.require_number(config, path, "r")
    if not config.get("save_projection", True) and not isinstance(config.get("projection_prng_key"), int):
        raise FuseError("F201", "a VeRA adapter saved without its projections needs an integer projection_prng_key",
                        file=str(path), key="projection_prng_key")


def make_update(index, adapter, module, param, roles, target, ctx=None):
    from stages.peft.plan import Update

    lay = fam.layout(target, module, bool(adapter.config.get("fan_in_fan_out")))
    if lay not in LAYOUTS:
        raise fam.unsupported_layout(adapter, module, roles, target, NAME, lay, LAYOUTS)
    if set(roles) != {"vera_lambda_b", "vera_lambda_d"}:
        raise fam.incomplete(adapter, module, roles, "VeRA (vera_lambda_b and vera_lambda_d)")
    out_f, in_f = fam.out_in(target, lay)
    r = adapter.config["r"]
    shapes = {role: adapter.tensors[key].shape for role, key in roles.items()}
    if tuple(shapes["vera_lambda_b"]) != (out_f,) or tuple(shapes["vera_lambda_d"]) != (r,):
        raise fam.shape_error(adapter, module, roles, target, shapes, f"r={r}")
    return Update(adapter=index, kind="additive", module=module, tensors=dict(roles), peft_type=PEFT_TYPE,
                  weight=adapter.weight, extra={"layout": lay, "r": r, "out_in": (out_f, in_f),
                                                "base_dtype": target.dtype})


def finalize(adapter, updates: list, shared: dict) -> None:
    """Size the shared projections (the largest targeted module, as peft's ``_find_dim``) and check the saved ones."""
    if not updates:
        return
    out_max = max(u.extra["out_in"][0] for u in updates)
    in_max = max(u.extra["out_in"][1] for u in updates)
    r = adapter.config["r"]
    saved = adapter.config.get("save_projection", True)
    if saved:
        missing = [name for name in SHARED if name not in shared]
        if missing:
            raise FuseError("F208", f"the VeRA adapter says save_projection=true but holds no base_model.{missing[0]}",
                            file=str(adapter.weights_file), key=f"base_model.{missing[0]}",
                            fix="re-save the adapter, or set save_projection=false to regenerate the projections "
                                "from projection_prng_key")
        A, B = adapter.tensors[shared["vera_A"]].shape, adapter.tensors[shared["vera_B"]].shape
        if len(A) != 2 or len(B) != 2 or A[0] < r or B[1] < r or A[1] < in_max or B[0] < out_max:
            raise FuseError("F204", f"VeRA projections vera_A {list(A)} / vera_B {list(B)} are too small for rank {r} "
                            f"and the largest targeted module ({out_max} x {in_max})", file=str(adapter.weights_file),
                            key=shared["vera_A"], fix="merge the adapter into the model it was trained on")
    for u in updates:
        u.extra["projection"] = (r, in_max, out_max)
        if saved:
            u.extra["shared"] = dict(shared)


def projections(adapter, update):
    """(vera_A, vera_B): loaded once from the file, or regenerated as peft does; then held in the base
    tensor's dtype, as peft holds these buffers (they move to the base layer's dtype), in float32."""
    from stages.io.safetensors import torch_dtype

    dtype = update.extra.get("base_dtype", "F32")
    cached = adapter._cache.get(("vera", dtype))
    if cached is None:
        if "shared" in update.extra:
            cached = tuple(adapter.load(update.extra["shared"][name]).float() for name in SHARED)
        else:
            import torch
            from peft.tuners.vera.model import _kaiming_init

            r, in_max, out_max = update.extra["projection"]
            generator = torch.Generator(device="cpu").manual_seed(adapter.config["projection_prng_key"])
            A = _kaiming_init((r, in_max), generator=generator)
            cached = (A, _kaiming_init((out_max, r), generator=generator))
        cached = tuple(p.to(torch_dtype(dtype)).float() for p in cached)
        adapter._cache[("vera", dtype)] = cached
    return cached


def build_layer(W, update, t, adapter):
    from peft.tuners._buffer_dict import BufferDict
    from peft.tuners.vera import layer as L

    from stages.peft.layers import ADAPTER, peft_config, peft_layer

    A, B = projections(adapter, update)
    vera_A, vera_B = BufferDict({ADAPTER: A}, persistent=False), BufferDict({ADAPTER: B}, persistent=False)
    return peft_layer(L.Linear, W, update.extra["layout"], update, t, before=(vera_A, vera_B),
                      config=peft_config(adapter), r=update.extra["r"],
                      is_target_conv_1d_layer=update.extra["layout"] == "gpt2-conv1d")


def apply(W, W0, update, t, adapter=None):
    from stages.peft.layers import apply_layer

    return apply_layer(build_layer, W, update, t, adapter)
