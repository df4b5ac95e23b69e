"""The LoRA family: Linear (incl. fan_in_fan_out), Embedding, rsLoRA, rank/alpha patterns,
lora_bias and DoRA, with peft's formulas (peft/tuners/lora/layer.py, variants.py, dora.py);
Conv1d/2d/3d through peft's own ``_ConvNd`` layer; MoE expert parameters (``target_parameters``,
``ParamWrapper``) where the checkpoint stores them as the model holds them, or transformers'
conversion mapping stacks and concatenates them from per-expert tensors (stages/peft/runtime.py); and
``trainable_token_indices`` (rows of the embedding replaced).

Planning helpers here are torch-free; only :func:`apply` imports torch.
"""
from __future__ import annotations

import math
import re

from stages.findings import FuseError
from stages.io.safetensors import TensorInfo

PEFT_TYPE = "LORA"

# adapter key suffix -> (base parameter it updates, role). peft strips the adapter name
# on save; the DoRA magnitude has no ".weight" (older files had one).
SUFFIXES = {
    ".lora_A.weight": ("weight", "A"),
    ".lora_B.weight": ("weight", "B"),
    ".lora_B.bias": ("bias", "bias"),
    ".lora_embedding_A": ("weight", "emb_A"),
    ".lora_embedding_B": ("weight", "emb_B"),
    ".lora_magnitude_vector": ("weight", "m"),
    ".lora_magnitude_vector.weight": ("weight", "m"),
    ".token_adapter.trainable_tokens_delta": ("weight", "tokens"),
}

# init_lora_weights values that change the base weights during training: the adapter only
# fits the residual base (peft #2184), unless saved with path_initial_model_for_weight_conversion.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")

# LoraConfig fields of variants whose merge is not W + scale·B@A, with why Fuse refuses them.
_REFUSED_VARIANTS = {
    "layer_replication": "layer replication shares weights between duplicated layers; peft refuses to merge it",
    "use_bdlora": "block-diagonal LoRA is not supported by Fuse yet",
    "arrow_config": "Arrow routes between LoRA experts per input, so there is no single weight to merge",
    "alora_invocation_tokens": "activated LoRA only acts after its invocation tokens, which no weight change expresses",
    "velora_config": "VeLoRA is not supported by Fuse yet",
    "kasa_config": "KaSA truncates the base weights when it is created; Fuse does not support it yet",
    "use_qalora": "QALoRA adapters fit a GPTQ-quantized base, which cannot be merged into",
    "ensure_weight_tying": "weight-tied LoRA on embeddings and lm_head is not supported by Fuse yet",
}


def check_config(config: dict, path) -> None:
    """Refuse (F202) LoRA variants whose merge Fuse does not implement."""
    for key, reason in _REFUSED_VARIANTS.items():
        if config.get(key):
            raise FuseError("F202", f"this LoRA adapter cannot be merged: {reason}", file=str(path), key=key,
                            fix="merge with peft's merge_and_unload() if peft supports it")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise FuseError("F202", f"init_lora_weights={init!r} changed the base weights during training, so this "
                        "adapter only fits that changed base", file=str(path), key="init_lora_weights",
                        fix="save the adapter with peft's save_pretrained(..., path_initial_model_for_weight_"
                            "conversion=...) to turn it into a plain LoRA of the original base")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool) or config[key] <= 0:
            raise FuseError("F201", f"{key} must be a positive number, got {config.get(key)!r}", file=str(path),
                            key=key)


def rank_and_alpha(config: dict, module: str) -> tuple[int, float]:
    """``r`` and ``lora_alpha`` of one module, with rank_pattern/alpha_pattern as peft resolves them
    (``LoraModel._create_and_replace``)."""
    from stages.peft.plan import get_pattern_key

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config["r"])
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
    return r, alpha


def scaling(config: dict, module: str) -> float:
    """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (``LoraLayer.update_layer``)."""
    r, alpha = rank_and_alpha(config, module)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def make_update(index: int, adapter, module: str, param: str, roles: dict, target: TensorInfo, ctx=None):
    """Check one module's LoRA tensors against the base tensor's shape (F204) and build its update."""
    from stages.peft.plan import Update

    if "tokens" in roles:
        tokens = trainable_tokens_update(index, adapter, module, roles.pop("tokens"), target, ctx)
        return [(param, tokens)] + ([] if not roles else _as_list(make_update(index, adapter, module, param, roles,
                                                                              target, ctx), param))
    method = ctx.method if ctx else "linear"
    shapes = {role: adapter.tensors[key].shape for role, key in roles.items()}
    where = {"file": str(adapter.weights_file), "key": next(iter(roles.values()))}
    fifo = bool(adapter.config.get("fan_in_fan_out"))
    if set(roles) == {"bias"}:
        kind = "bias"
        if shapes["bias"] != target.shape:
            raise _shape_error(roles["bias"], shapes["bias"], target, where)
    elif {"A", "B"} <= set(roles) <= {"A", "B", "m"}:
        kind = "linear"
        A, B = shapes["A"], shapes["B"]
        if len(target.shape) == 3 and len(A) == len(B) == 2:
            return _experts_update(index, adapter, f"{module}.{param}", roles, target, shapes, where, ctx)
        if len(target.shape) in (3, 4, 5) and len(A) == len(B) == len(target.shape):
            return conv_update(index, adapter, module, roles, target, shapes, where)
        if len(A) != 2 or len(B) != 2 or len(target.shape) != 2:
            raise FuseError("F202", f"{module}: LoRA tensors {list(A)} / {list(B)} on a {len(target.shape)}-D weight "
                            f"{target.name} {list(target.shape)}: not a layer peft merges", **where)
        out_f, in_f = target.shape[::-1] if fifo else target.shape
        if B[0] != out_f or A[1] != in_f or A[0] != B[1]:
            raise _shape_error(roles["A"], f"lora_A {list(A)}, lora_B {list(B)}", target, where,
                               "fan_in_fan_out" if fifo else None)
        _check_rank(adapter, module, A[0], where)
        _check_magnitude(shapes, out_f, target, where)
    elif {"emb_A", "emb_B"} <= set(roles) <= {"emb_A", "emb_B", "m"}:
        kind = "embedding"
        A, B = shapes["emb_A"], shapes["emb_B"]
        if len(A) != 2 or len(B) != 2 or len(target.shape) != 2 or A[0] != B[1] \
                or (A[1], B[0]) != tuple(target.shape):
            raise _shape_error(roles["emb_A"], f"lora_embedding_A {list(A)}, lora_embedding_B {list(B)}", target,
                               where)
        _check_rank(adapter, module, A[0], where)
        _check_magnitude(shapes, target.shape[1], target, where)
    else:
        present = ", ".join(sorted(roles.values()))
        raise FuseError("F208", f"{module}: the adapter holds {present}, which is not a complete LoRA "
                        "(lora_A + lora_B, or lora_embedding_A + lora_embedding_B)", **where,
                        fix="re-save the adapter; a file is incomplete")
    if "m" in roles:
        kind = "dora_" + kind
        if adapter.weight != 1.0 and method == "linear":
            raise FuseError("F202", f"DoRA rescales whole rows, so a linear merge cannot scale it by {adapter.weight}",
                            **where, fix="give DoRA adapters weight 1.0, or use method: ties / dare_linear / "
                                         "dare_ties, which scale its full update W' - W0")
    return Update(adapter=index, kind=kind, module=module, tensors=dict(roles), peft_type=PEFT_TYPE,
                  scaling=scaling(adapter.config, module), weight=adapter.weight, fan_in_fan_out=fifo)


def _as_list(made, param):
    return made if isinstance(made, list) else [(param, made)]


# ---------------------------------------------------------------- trainable tokens

def token_indices(config: dict, module: str):
    """The rows ``trainable_token_indices`` (a list: the input embedding; a dict: per module) gives ``module``."""
    spec = config.get("trainable_token_indices") or config.get("token_indices")
    if isinstance(spec, dict):
        return next((v for k, v in spec.items() if module == k or module.endswith("." + k)), None)
    return spec


def trainable_tokens_update(index, adapter, module, key, target, ctx):
    """Rows of the embedding replaced by the trained ones (peft ``TrainableTokensLayer.merge``: index_copy)."""
    from stages.peft.plan import Update

    where = {"file": str(adapter.weights_file), "key": key}
    rows = token_indices(adapter.config, module)
    if not isinstance(rows, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in rows):
        raise FuseError("F201", f"{module}: adapter_config.json gives no token indices for this module's trained "
                        f"tokens (trainable_token_indices={adapter.config.get('trainable_token_indices')!r})", **where)
    shape = tuple(adapter.tensors[key].shape)
    if len(target.shape) != 2 or shape != (len(rows), target.shape[1]) or any(not 0 <= i < target.shape[0]
                                                                              for i in rows):
        raise _shape_error(key, shape, target, where, f"token indices {rows}")
    if len(set(rows)) != len(rows):
        raise FuseError("F201", f"{module}: trainable token indices repeat: {rows}", **where)
    return Update(adapter=index, kind="tokens", module=module, tensors={"tokens": key}, peft_type=PEFT_TYPE,
                  weight=adapter.weight, extra={"rows": list(rows), "follows_tie": True})


# ---------------------------------------------------------------- convolutions

def conv_update(index, adapter, module, roles, target, shapes, where):
    """LoRA on Conv1d/2d/3d: A is a conv (r, in, *k), B a 1x1 conv (out, r, 1...) (peft ``_ConvNd``)."""
    from stages.peft.plan import Update

    A, B = shapes["A"], shapes["B"]
    k = tuple(target.shape[2:])
    if A[2:] != k or B[2:] != (1,) * len(k) or B[0] != target.shape[0] or A[0] != B[1] or A[1] != target.shape[1]:
        raise _shape_error(roles["A"], f"lora_A {list(A)}, lora_B {list(B)}", target, where)
    _check_rank(adapter, module, A[0], where)
    if "m" in shapes and math.prod(shapes["m"]) != target.shape[0]:
        raise _shape_error("lora_magnitude_vector", shapes["m"], target, where)
    r, alpha = rank_and_alpha(adapter.config, module)
    return Update(adapter=index, kind="dora_conv" if "m" in roles else "conv", module=module, tensors=dict(roles),
                  peft_type=PEFT_TYPE, scaling=scaling(adapter.config, module), weight=adapter.weight,
                  extra={"layout": f"conv{len(k)}d", "r": r, "alpha": alpha})


def _conv_layer(W, update, t, adapter):
    from peft.tuners.lora import layer as L

    from stages.peft.layers import peft_config, peft_layer

    cls = {"conv1d": L.Conv1d, "conv2d": L.Conv2d, "conv3d": L.Conv3d}[update.extra["layout"]]
    names = {"A": "lora_A.weight", "B": "lora_B.weight", "m": "lora_magnitude_vector.weight"}
    tensors = {names[role]: tensor for role, tensor in t.items()}
    if "m" in t:  # peft keeps the conv DoRA magnitude as (1, out, 1, ...)
        tensors[names["m"]] = t["m"].reshape((1, -1) + (1,) * (W.dim() - 2))
    return peft_layer(cls, W, update.extra["layout"], update, tensors, config=peft_config(adapter),
                      r=update.extra["r"], lora_alpha=update.extra["alpha"])


# ---------------------------------------------------------------- MoE expert parameters (target_parameters)

# transformers 5 expert modules that store (experts, in, out) rather than (experts, out, in)
# (``use_experts_implementation(is_transposed=True)``); only needed when in == out.
TRANSPOSED_EXPERTS = ("gpt_oss", "openai_privacy_filter")


def regroup(adapter, groups: dict, ctx) -> dict:
    """LoRA on raw parameters (``target_parameters``): peft saves nested ``ParamWrapper``s as
    ``<module>[.base_layer]*.lora_A.weight``, naming the module, not the parameter. Find the parameter
    each nesting level updates from the shapes (the runtime ones where transformers fuses the parameter
    from per-expert tensors); refuse, naming the tensors, when the checkpoint holds the parameter neither
    as the model does at run time nor in a layout transformers' conversion mapping fuses reversibly."""
    targets = adapter.config.get("target_parameters") or []
    if not targets:
        return groups
    out, pending = {}, {}
    for (module, param), roles in groups.items():
        clean = module
        while clean.endswith(".base_layer"):
            clean = clean[: -len(".base_layer")]
        names = sorted({t.rpartition(".")[2] for t in targets if f"{clean}.{t.rpartition('.')[2]}".endswith(t)})
        if not names or (clean == module and ctx.resolve(f"{module}.{param}") is not None):
            out[(module, param)] = roles
            continue
        pending.setdefault(clean, []).append(roles)
    for clean, levels in pending.items():
        found = {n: _runtime_shape(ctx, f"{clean}.{n}", adapter, levels)
                 for n in sorted({t.rpartition(".")[2] for t in targets}) if f"{clean}.{n}".endswith(tuple(targets))}
        missing = [f"{clean}.{n}" for n, shape in found.items() if shape is None]
        if missing or not found:
            raise _layout_refusal(adapter, clean, missing or [clean], ctx, levels)
        free = dict(found)
        for roles in levels:
            A, B = (adapter.tensors[roles[r]].shape for r in ("A", "B"))
            fits = [n for n, shape in free.items() if _fits_expert(shape, A, B)]
            if len(fits) != 1:
                why = "none of" if not fits else "several of"
                raise FuseError("F204", f"{roles['A']}: {why} the targeted parameters "
                                f"({', '.join(f'{clean}.{n}' for n in free)}) fit lora_A {list(A)} / lora_B {list(B)}",
                                file=str(adapter.weights_file), key=roles["A"],
                                fix="merge the adapter into the model it was trained on")
            out[(clean, fits[0])] = roles
            del free[fits[0]]
    return out


def _runtime_shape(ctx, name: str, adapter, levels):
    """The shape of the parameter the model holds as ``name`` at run time: stored under that name (or
    renamed), or fused by transformers from several checkpoint tensors; None when neither."""
    base_name = ctx.resolve(name)
    if base_name is not None:
        return ctx.base.tensors[base_name].shape
    fused = ctx.fused(name)
    if fused is not None and fused.why:
        raise fused.refusal(f"LoRA on {name} (target_parameters)", str(adapter.weights_file),
                            next(iter(levels[0].values())))
    return fused.info.shape if fused is not None else None


def _fits_expert(shape, A, B) -> bool:
    if len(A) != 2 or len(B) != 2 or A[0] != B[1]:
        return False
    if len(shape) == 2:
        return (B[0], A[1]) == tuple(shape)
    if len(shape) != 3 or A[0] % shape[0]:
        return False
    return (shape[1], shape[2]) in ((B[0], A[1]), (A[1], B[0]))


def _layout_refusal(adapter, clean, missing, ctx, levels) -> FuseError:
    layer = re.match(r"(.*?\.(?:layers|h|blocks)\.\d+\.)", clean)
    prefix = layer.group(1) if layer else clean.rsplit(".", 1)[0]
    stored = [n for n in ctx.base.tensors if n.startswith(prefix) and "expert" in n][:4]
    seen = f"; the checkpoint stores {', '.join(stored)}{', ...' if stored else ''}" if stored else ""
    key = next(iter(levels[0].values()))
    model_type = ctx.base.config.get("model_type") or "this model"
    return FuseError("F202", f"LoRA on {', '.join(missing)} (target_parameters) changes the expert tensor the model "
                     f"holds at run time, which this checkpoint does not store in that layout{seen}, and "
                     f"transformers' conversion mapping for {model_type} does not build it; Fuse merges "
                     "target_parameters where the on-disk layout equals the runtime one or that mapping "
                     "stacks and concatenates the checkpoint's tensors into it",
                     file=str(adapter.weights_file), key=key,
                     fix="merge with peft's merge_and_unload() and save_pretrained(), which convert the layout")


def _experts_update(index, adapter, module, roles, target, shapes, where, ctx):
    """A 3-D expert parameter (E, ., .): A is (r*E, in), B is (out, r*E) (peft ``ParamWrapper``)."""
    from stages.peft.plan import Update

    A, B = shapes["A"], shapes["B"]
    E = target.shape[0]
    if not _fits_expert(target.shape, A, B) or set(roles) != {"A", "B"}:
        raise _shape_error(roles["A"], f"lora_A {list(A)}, lora_B {list(B)}", target, where)
    model_type = (ctx.base.config.get("model_type") if ctx else None) or ""
    if (target.shape[1], target.shape[2]) == (B[0], A[1]) and (A[1] != B[0] or model_type not in TRANSPOSED_EXPERTS):
        orientation = "e o i"   # (experts, out, in): most MoE models
    else:
        orientation = "e i o"   # (experts, in, out): gpt-oss
    _check_rank(adapter, module, A[0] // E, where)
    return Update(adapter=index, kind="experts", module=module, tensors=dict(roles), peft_type=PEFT_TYPE,
                  scaling=scaling(adapter.config, module), weight=adapter.weight,
                  extra={"experts": E, "orientation": orientation})


def _check_rank(adapter, module: str, rank: int, where: dict) -> None:
    r, _ = rank_and_alpha(adapter.config, module)
    if r != rank:
        raise FuseError("F204", f"{module}: adapter_config.json says r={r} but its tensors have rank {rank}",
                        **where, fix="use the adapter_config.json saved with these weights (rank_pattern?)")


def _check_magnitude(shapes: dict, size: int, target: TensorInfo, where: dict) -> None:
    if "m" in shapes and tuple(shapes["m"]) != (size,):
        raise _shape_error("lora_magnitude_vector", shapes["m"], target, where)


def _shape_error(what, shape, target: TensorInfo, where: dict, note=None) -> FuseError:
    shape = list(shape) if isinstance(shape, tuple) else shape
    return FuseError("F204", f"adapter tensor {what} ({shape}) does not fit base tensor {target.name} "
                     f"{list(target.shape)}" + (f" with {note}" if note else ""), **where,
                     fix="merge the adapter into the model it was trained on")


def apply(W, W0, update, t: dict, adapter=None):
    """``W`` (float32, may be changed in place) with one LoRA update applied; ``W0`` is the
    tensor before any adapter (DoRA's norm uses it, as peft's ``_unmerged_base_weight``).
    ``t`` maps roles to float32 adapter tensors. Formulas: peft ``Linear.get_delta_weight``,
    ``Embedding.get_delta_weight``, ``DoraLinearVariant``/``DoraEmbeddingVariant.merge_unsafe``;
    convolutions go through peft's own ``_ConvNd`` layer; expert parameters are
    ``ParamWrapper.get_delta_weight``'s einsum; trained tokens ``TrainableTokensLayer.merge``.
    """
    import torch

    kind = update.kind
    if kind == "tokens":
        index = torch.tensor(update.extra["rows"], dtype=torch.long)
        return W.index_copy_(0, index, t["tokens"].to(W.dtype))
    if kind in ("conv", "dora_conv"):
        from stages.peft.layers import delta_weight, merged_weight

        layer = _conv_layer(W, update, t, adapter)
        if kind == "dora_conv":
            return merged_weight(layer)
        delta = delta_weight(layer)
        return W.add_(delta * update.weight if update.weight != 1.0 else delta)
    if kind == "experts":  # peft ParamWrapper.get_delta_weight (lora/layer.py), E experts
        E = update.extra["experts"]
        A = t["A"].reshape(E, -1, t["A"].shape[-1])
        B = t["B"].reshape(t["B"].shape[0], -1, E)
        piece = update.extra.get("piece")
        if piece:  # W is one checkpoint tensor of a runtime tensor transformers fuses: one expert, a slice
            expert, dim, start, stop = piece
            A, B = A[expert:expert + 1], B[:, :, expert:expert + 1]
        delta = torch.einsum(f"o r e, e r i -> {update.extra['orientation']}", B, A) * update.scaling
        if piece:
            delta = delta[0] if dim is None else delta[0].narrow(dim - 1, start, stop - start)
        return W.add_(delta * update.weight if update.weight != 1.0 else delta)
    if kind == "bias":
        delta = t["bias"] * update.scaling
    else:  # in place from here on: a full-size temporary less than peft's `* scaling`, same values
        if kind.endswith("embedding"):
            delta = (t["emb_B"] @ t["emb_A"]).T
        else:
            delta = t["B"] @ t["A"]
            delta = delta.T if update.fan_in_fan_out else delta
        delta.mul_(update.scaling)
    if update.weight != 1.0:
        delta.mul_(update.weight)
    if not kind.startswith("dora_"):
        return W.add_(delta)
    # DoRA: rescale each output row (embedding: each column) to the learned magnitude.
    if kind == "dora_embedding":
        norm = torch.linalg.norm(W0.T + delta.T, dim=1)
        factor = (t["m"] / norm).view(1, -1)
    else:
        fifo = update.fan_in_fan_out
        norm = torch.linalg.norm((W0.T if fifo else W0) + (delta.T if fifo else delta), dim=1)
        factor = (t["m"] / norm).view(-1, 1)
        factor = factor.T if fifo else factor
    return factor * (W + delta)
