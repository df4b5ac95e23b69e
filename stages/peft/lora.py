"""The LoRA family: Linear (incl. fan_in_fan_out), Embedding, rsLoRA, rank/alpha patterns,
lora_bias and DoRA, with peft's formulas (peft/tuners/lora/layer.py, variants.py, dora.py).

Planning helpers here are torch-free; only :func:`apply` imports torch.
"""
from __future__ import annotations

import math

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
}

# init_lora_weights values that change the base weights during training: the adapter only
# fits the residual base (peft #2184), unless saved with path_initial_model_for_weight_conversion.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")

# LoraConfig fields of variants whose merge is not W + scale·B@A, with why Fuse refuses them.
_REFUSED_VARIANTS = {
    "layer_replication": "layer replication shares weights between duplicated layers; peft refuses to merge it",
    "target_parameters": "LoRA on raw parameters (MoE experts) is not supported by Fuse yet",
    "trainable_token_indices": "trainable tokens are not supported by Fuse yet",
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


def make_update(index: int, adapter, module: str, param: str, roles: dict, target: TensorInfo):
    """Check one module's LoRA tensors against the base tensor's shape (F204) and build its update."""
    from stages.peft.plan import Update

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
        if len(A) != 2 or len(B) != 2 or len(target.shape) != 2:
            raise FuseError("F202", f"{module}: LoRA on a {len(target.shape)}-D weight (a convolution?) is not "
                            "supported by Fuse yet", **where)
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
        if adapter.weight != 1.0:
            raise FuseError("F202", f"DoRA rescales whole rows, so it cannot be merged with weight {adapter.weight}",
                            **where, fix="give DoRA adapters weight 1.0")
    return Update(adapter=index, kind=kind, module=module, tensors=dict(roles), peft_type=PEFT_TYPE,
                  scaling=scaling(adapter.config, module), weight=adapter.weight, fan_in_fan_out=fifo)


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


def apply(W, W0, update, t: dict):
    """``W`` (float32, may be changed in place) with one LoRA update applied; ``W0`` is the
    tensor before any adapter (DoRA's norm uses it, as peft's ``_unmerged_base_weight``).
    ``t`` maps roles to float32 adapter tensors. Formulas: peft ``Linear.get_delta_weight``,
    ``Embedding.get_delta_weight``, ``DoraLinearVariant``/``DoraEmbeddingVariant.merge_unsafe``.
    """
    import torch

    kind = update.kind
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
