"""Planning helpers shared by the adapter families (torch-free: validate uses them too)."""
from __future__ import annotations

import re

from stages.findings import FuseError
from stages.io.safetensors import TensorInfo

# Last component of module paths that hold an embedding table rather than a linear layer.
EMBEDDING_MODULES = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "embed_positions",
                     "position_embeddings", "token_type_embeddings", "shared", "tok_embeddings")


def is_embedding(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in EMBEDDING_MODULES


def layout(target: TensorInfo, module: str, fan_in_fan_out: bool = False) -> str:
    """How peft saw the base module: linear, gpt2-conv1d, embedding, or conv1d/2d/3d (from the tensor rank)."""
    n = len(target.shape)
    if n == 2:
        if is_embedding(module):
            return "embedding"
        return "gpt2-conv1d" if fan_in_fan_out else "linear"
    return {3: "conv1d", 4: "conv2d", 5: "conv3d"}.get(n, f"{n}-d")


def out_in(target: TensorInfo, lay: str) -> tuple[int, int]:
    """(out_features, in_features) of the base module as peft counts them."""
    if lay == "gpt2-conv1d":
        return target.shape[1], target.shape[0]
    if lay == "embedding":
        return target.shape[1], target.shape[0]
    return target.shape[0], target.shape[1]


def pattern_value(pattern: dict | None, module: str, default):
    """peft's ``rank_pattern``/``alpha_pattern`` lookup for one module."""
    from stages.peft.plan import get_pattern_key

    pattern = pattern or {}
    return pattern.get(get_pattern_key(pattern.keys(), module), default)


def require_number(config: dict, path, *keys, allow_zero=False) -> None:
    for key in keys:
        value = config.get(key)
        bad = not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0
        if bad or (value == 0 and not allow_zero):
            raise FuseError("F201", f"{key} must be a positive number, got {value!r}", file=str(path), key=key)


def where(adapter, roles: dict) -> dict:
    return {"file": str(adapter.weights_file), "key": next(iter(roles.values()))}


def incomplete(adapter, module: str, roles: dict, expected: str) -> FuseError:
    present = ", ".join(sorted(roles))
    return FuseError("F208", f"{module}: the adapter holds {present}, which is not a complete {expected}",
                     **where(adapter, roles), fix="re-save the adapter; a file is incomplete")


def shape_error(adapter, module: str, roles: dict, target: TensorInfo, shapes: dict, note: str = "") -> FuseError:
    described = ", ".join(f"{role} {list(shape)}" for role, shape in sorted(shapes.items()))
    return FuseError("F204", f"{module}: adapter tensors ({described}) do not fit base tensor {target.name} "
                     f"{list(target.shape)}" + (f" ({note})" if note else ""), **where(adapter, roles),
                     fix="merge the adapter into the model it was trained on")


def unsupported_layout(adapter, module: str, roles: dict, target: TensorInfo, family: str, lay: str,
                       supported: tuple) -> FuseError:
    return FuseError("F202", f"{module}: {family} on a {lay} weight ({target.name} {list(target.shape)}) is not "
                     f"something peft merges (it supports {', '.join(supported)})", **where(adapter, roles))


def refuse_weight(adapter, roles: dict, what: str, method: str) -> None:
    """Functions of W0 (DoRA, IA3, OFT, BOFT) have no "weight · update" in a plain weighted sum."""
    if adapter.weight != 1.0 and method == "linear":
        raise FuseError("F202", f"{what} multiplies the base weights, so a linear merge cannot scale it by "
                        f"{adapter.weight}", **where(adapter, roles),
                        fix="give this adapter weight 1.0, or use method: ties / dare_linear / dare_ties, which scale "
                            "its full update W' - W0")


def matches_any(module: str, names) -> bool:
    """peft's target matching for a list (suffix) or a regex string (full match)."""
    if isinstance(names, str):
        return bool(re.fullmatch(names, module))
    return any(module == n or module.endswith("." + n) for n in names or ())
