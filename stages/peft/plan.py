"""The merge plan: which adapter tensor updates which base tensor, from headers alone.

One piece of code decides where every adapter tensor goes, and validate, merge and check
all use it. Any adapter tensor that lands nowhere is an error (F203), never a silent
skip; a tensor that lands on a base tensor of the wrong shape is F204. No torch here.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field

from stages.findings import FuseError
from stages.io.safetensors import FLOAT_DTYPES, ModelWeights, TensorInfo
from stages.peft import family_for
from stages.peft.adapter import Adapter
from stages.peft.combine import METHODS
from stages.peft.family import is_embedding

PREFIX = "base_model.model."  # what peft puts before every module path it saves
HEAD = "lm_head.weight"
# Input embeddings of the architectures Fuse knows, for tied lm_head handling.
EMBEDDINGS = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
              "language_model.model.embed_tokens.weight", "transformer.wte.weight",
              "model.decoder.embed_tokens.weight", "transformer.word_embeddings.weight", "embed_tokens.weight")


@dataclass
class Update:
    """One change to one output tensor, in the order the merge applies them.

    ``kind`` is ``"replace"`` (a full tensor from the adapter: modules_to_save, an
    embedding saved whole, ``bias="all"``) or a family-specific kind such as ``"linear"``.
    ``extra`` holds what a family decided at planning time (layout, rank, ...).
    """

    adapter: int               # index into MergePlan.adapters
    kind: str
    module: str                # module path as peft saw it (rank/alpha patterns match it)
    tensors: dict              # role -> adapter tensor name
    peft_type: str = ""        # family that applies it; "" for a replacement
    scaling: float = 1.0
    weight: float = 1.0        # the adapter's weight in a weighted merge
    fan_in_fan_out: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def follows_tie(self) -> bool:
        """Changes the embedding *parameter* itself (a resized table saved whole, trainable tokens): a tied
        lm_head, which is that same parameter, changes with it."""
        return bool(self.extra.get("follows_tie"))


@dataclass
class MergePlan:
    base: ModelWeights
    adapters: list[Adapter]
    outputs: dict[str, TensorInfo]   # output tensor -> base tensor it starts from; base order, additions last
    updates: dict[str, list[Update]]  # output tensor -> its updates (replacements first)
    untie: bool = False               # lm_head written on its own, tie_word_embeddings=false
    warnings: list[dict] = field(default_factory=list)
    shapes: dict[str, tuple] = field(default_factory=dict)  # output tensor -> shape, where an adapter resized it
    vocab_size: int | None = None     # new vocab_size for config.json when the embedding was resized
    method: str = "linear"
    options: dict = field(default_factory=dict)  # the merge's own settings (density, seed, nf4 tensors)

    def shape(self, name: str) -> tuple:
        return self.shapes.get(name, self.outputs[name].shape)

    def summary(self) -> dict:
        replaced = sum(any(u.kind == "replace" for u in us) for us in self.updates.values())
        summary = {
            "adapter_tensors": sum(len(a.tensors) for a in self.adapters),
            "tensors_updated": len(self.updates),
            "tensors_replaced": replaced,
            "tensors_unchanged": len(self.outputs) - len(self.updates),
            "untie_embeddings": self.untie,
        }
        if self.vocab_size is not None:
            summary["vocab_size"] = self.vocab_size
        return summary


@dataclass
class PlanContext:
    """What a family may look at while planning one module: the base, the tie, the merge method."""

    base: ModelWeights
    tied: tuple | None
    method: str = "linear"
    shapes: dict = field(default_factory=dict)  # resized outputs so far

    _runtime: object = None

    def runtime(self):
        """transformers' runtime names for the checkpoint's tensors (stages/peft/runtime.py), read on first need:
        most adapters name checkpoint tensors directly and never import transformers."""
        if self._runtime is None:
            from stages.peft.runtime import runtime_names

            self._runtime = runtime_names(self.base)
        return self._runtime

    def resolve(self, name: str) -> str | None:
        """The checkpoint tensor a runtime tensor name is: itself, another spelling of it, or its name
        before transformers' conversion mapping renamed it (e.g. Mixtral's ``mlp.gate`` is
        ``block_sparse_moe.gate`` on disk)."""
        return _resolve(name, self.base, self.tied) or self.runtime().renamed.get(name)

    def fused(self, name: str):
        """For a name :meth:`resolve` does not find: the :class:`~stages.peft.runtime.Fused` tensor
        transformers builds under it from several checkpoint tensors (Mixtral's experts), or None."""
        return self.runtime().fused.get(name)

    def target(self, name: str) -> TensorInfo:
        info = _source(name, self.base, self.tied)
        shape = self.shapes.get(name)
        return dataclasses.replace(info, shape=shape) if shape else info


def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """peft's ``utils.other.get_pattern_key``: the first pattern that matches a suffix of the module path.

    Copied (5 lines) rather than imported so that planning does not import torch.
    """
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def plan_merge(base: ModelWeights, adapters: list[Adapter], method: str = "linear") -> MergePlan:
    """Map every tensor of every adapter onto the base; raises F202/F203/F204."""
    if method not in METHODS:
        raise FuseError("F103", f"merge method must be one of {', '.join(METHODS)}, got {method!r}", key="method")
    tied = tied_embeddings(base)
    ctx = PlanContext(base=base, tied=tied, method=method)
    updates: dict[str, list[Update]] = {}
    warnings: list[dict] = []
    for index, adapter in enumerate(adapters):
        for name, update in _plan_adapter(index, adapter, ctx):
            updates.setdefault(name, []).append(update)
            if update.kind == "replace" and adapter.weight != 1.0:
                key = update.tensors["tensor"]
                warnings.append({"code": "F202", "key": key, "file": str(adapter.weights_file),
                                 "message": f"{key} replaces {name} whole; the adapter weight {adapter.weight} "
                                            "does not scale a replacement"})
    for tensor_updates in updates.values():  # replacements first, then deltas; adapters in order within each
        tensor_updates.sort(key=lambda u: u.kind != "replace")

    outputs = dict(base.tensors)
    shapes = dict(ctx.shapes)
    untie = bool(tied) and any(not u.follows_tie for name in tied for u in updates.get(name, []))
    if untie:
        embed = tied[0]
        outputs[HEAD] = base.tensors[embed]  # lm_head starts as the embedding it was tied to ...
        follow = [u for u in updates.get(embed, []) if u.follows_tie]  # ... as the adapters changed that parameter
        if follow:
            updates[HEAD] = follow + updates.get(HEAD, [])
            if embed in shapes:
                shapes.setdefault(HEAD, shapes[embed])
    elif tied:
        updates.pop(HEAD, None)  # (never planned: anything on lm_head unties)
    plan = MergePlan(base=base, adapters=adapters, outputs=outputs, updates=updates, untie=untie,
                     warnings=warnings, shapes=shapes, method=method)
    plan.vocab_size = _check_vocab(plan, tied)
    return plan


def _check_vocab(plan: MergePlan, tied) -> int | None:
    """The new vocab_size when adapters resized the embedding; F204 when embedding and lm_head disagree."""
    embed = next((e for e in EMBEDDINGS if e in plan.outputs), None)
    if embed is None or not plan.shapes:
        return None
    rows = plan.shape(embed)[0]
    if HEAD in plan.outputs and plan.shape(HEAD)[0] != rows:
        resized = embed if embed in plan.shapes else HEAD
        raise FuseError("F204", f"after the merge {embed} has {rows} rows but {HEAD} has {plan.shape(HEAD)[0]}: the "
                        f"adapters resized only {resized}", key=resized,
                        fix="a resized vocabulary needs both the embedding and lm_head in the adapter "
                            "(peft's save_pretrained(save_embedding_layers=True) or modules_to_save)")
    return rows if rows != plan.outputs[embed].shape[0] else None


def _plan_adapter(index: int, adapter: Adapter, ctx: PlanContext):
    """``[(output tensor, Update)]`` for one adapter; F203 if any of its tensors lands nowhere."""
    base, tied = ctx.base, ctx.tied
    family = family_for(adapter.peft_type)
    groups: dict[tuple, dict] = {}   # (module, param) -> {role: key}
    shared: dict[str, str] = {}      # tensors the family shares between modules (VeRA's projections)
    planned, unmapped = [], []
    copies = adapter.config.get("modules_to_save") or []
    for key in adapter.tensors:
        if key.removeprefix("base_model.") in getattr(family, "SHARED", ()):
            shared[key.removeprefix("base_model.")] = key
            continue
        module, param, role = split_key(key, family.SUFFIXES)
        if role != "replace":
            groups.setdefault((module, param), {})[role] = key
            continue
        name = ctx.resolve(module)
        if name is None:
            unmapped.append((key, module))
            continue
        owner = module.rsplit(".", 1)[0]
        original = ".original_module." in key  # a ModulesToSaveWrapper saved whole: the base it wrapped
        follows = original or (not _in_modules_to_save(owner, copies) and name in (tied or ()))
        _check_replacement(adapter, key, _source(name, base, tied), name, ctx)
        planned.append((name, Update(index, "replace", module, {"tensor": key}, weight=adapter.weight,
                                     extra={"follows_tie": follows, "original": original})))
    if hasattr(family, "regroup"):  # e.g. LoRA on MoE expert parameters: the key does not name the parameter
        groups = family.regroup(adapter, groups, ctx)
    family_updates = []
    for (module, param), roles in groups.items():
        name = ctx.resolve(f"{module}.{param}")
        fused = ctx.fused(f"{module}.{param}") if name is None else None
        if name is None and fused is None:
            unmapped.extend((key, f"{module}.{param}") for key in roles.values())
            continue
        if fused is not None and fused.why:
            raise fused.refusal(f"the adapter's {module}", str(adapter.weights_file), next(iter(roles.values())))
        target = fused.info if fused is not None else ctx.target(name)
        if target.dtype not in FLOAT_DTYPES:
            raise FuseError("F209", f"{target.name} is stored as {target.dtype}; Fuse merges into float16, "
                            "bfloat16, float32 and float64 tensors only", file=str(target.path), key=target.name)
        made = family.make_update(index, adapter, module, param, roles, target, ctx=ctx)
        if fused is not None:
            for out, update in _split(adapter, fused, made, roles):
                planned.append((out, update))
                family_updates.append(update)
            continue
        for out_param, update in made if isinstance(made, list) else [(param, made)]:
            out = name if out_param == param else ctx.resolve(f"{module}.{out_param}")
            planned.append((out, update))
            family_updates.append(update)
    if unmapped:
        raise _unmapped_error(adapter, unmapped, base)
    if hasattr(family, "finalize"):
        family.finalize(adapter, [u for u in family_updates if u.kind != "replace"], shared)
    elif shared:
        raise _unmapped_error(adapter, [(key, key) for key in shared.values()], base)
    return planned


def _split(adapter: Adapter, fused, made, roles: dict) -> list:
    """An update of a runtime tensor that transformers fuses from several checkpoint tensors, as one update
    per checkpoint tensor: the same adapter tensors, plus which expert and slice of ΔW it takes (the
    reverse of MergeModulelist(dim=0) + Concatenate, see stages/peft/runtime.py)."""
    made = made if isinstance(made, list) else [(None, made)]
    if len(made) != 1 or made[0][1].kind != "experts":
        raise fused.refusal(f"the adapter's {made[0][1].module}", str(adapter.weights_file),
                            next(iter(roles.values())), why="Fuse splits only LoRA expert updates back")
    update = made[0][1]
    return [(p.key, dataclasses.replace(update, extra={**update.extra, "piece": (p.expert, p.dim, p.start, p.stop)}))
            for p in fused.pieces]


def _in_modules_to_save(module: str, copies) -> bool:
    if isinstance(copies, str):
        copies = [copies]
    return any(module == c or module.endswith("." + c) for c in copies)


def split_key(key: str, suffixes: dict) -> tuple[str, str | None, str]:
    """``base_model.model.<module>.lora_A.weight`` -> (module, "weight", "A").

    A key with no family suffix is a full tensor (role ``"replace"``), returned as the
    base tensor name it replaces: peft saves ``modules_to_save`` as the module's own
    state dict (older versions as ``<module>.modules_to_save.<adapter>.<param>``; with a
    resized vocabulary the whole wrapper, ``original_module`` included) and a LoRA-targeted
    embedding whole as ``<module>.base_layer.weight``.
    """
    k = key.removeprefix(PREFIX)
    for suffix, (param, role) in suffixes.items():
        if k.endswith(suffix):
            return k[: -len(suffix)], param, role
    k = re.sub(r"\.(?:modules_to_save|original_module)\.(?:[^.]+\.)?(?=[^.]+$)", ".", k)
    k = k.replace(".base_layer.", ".")
    return k, None, "replace"


def tied_embeddings(base: ModelWeights) -> tuple[str, str] | None:
    """``(input embedding, lm_head.weight)`` when the base ties them, else None.

    The config decides (``tie_word_embeddings``, top level or ``text_config``); without
    that key, a checkpoint lacking ``lm_head.weight`` must be tied.
    """
    embed = next((e for e in EMBEDDINGS if e in base), None)
    if embed is None:
        return None
    tie = base.config.get("tie_word_embeddings")
    if tie is None:
        tie = (base.config.get("text_config") or {}).get("tie_word_embeddings")
    if tie is None:
        tie = HEAD not in base
    return (embed, HEAD) if tie else None


# Prefixes under which the same language-model weights appear: ...ForCausalLM says
# ``model.layers.0...``, a ...ForConditionalGeneration checkpoint ``model.language_model.layers.0...``
# (transformers >= 4.52) or ``language_model.model.layers.0...`` (older), a bare backbone nothing.
_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "")


def _spellings(name: str):
    """The names one tensor goes by across model classes and transformers versions."""
    yield name
    prefix = next(p for p in _PREFIXES if name.startswith(p))  # "" always matches
    for other in _PREFIXES:
        if other != prefix:
            yield other + name[len(prefix):]


def _resolve(name: str, base: ModelWeights, tied) -> str | None:
    """The output tensor ``name`` lands on: itself, the one spelling of it the base has,
    or ``lm_head.weight`` of a tied model whose checkpoint omits it."""
    found = [s for s in _spellings(name) if s in base]
    if name in found:
        return name
    if len(found) == 1:
        return found[0]
    if not found and tied and HEAD in _spellings(name):
        return HEAD
    return None


def _source(name: str, base: ModelWeights, tied) -> TensorInfo:
    """The base tensor an output starts from: a tied lm_head is the embedding (stored or not)."""
    return base.tensors[tied[0]] if tied and name == HEAD else base.tensors[name]


def _check_replacement(adapter: Adapter, key: str, target: TensorInfo, name: str, ctx: PlanContext) -> None:
    """F204 unless the replacement has the base tensor's shape, or is an embedding / lm_head with rows added
    (a vocabulary resized before training): then the output takes the new shape."""
    shape = tuple(adapter.tensors[key].shape)
    if shape == tuple(target.shape):
        return
    vocab_table = name in EMBEDDINGS or name == HEAD or is_embedding(name.removesuffix(".weight"))
    if vocab_table and len(shape) == 2 and shape[1:] == tuple(target.shape[1:]) and shape[0] > target.shape[0]:
        if ctx.shapes.setdefault(name, shape) != shape:
            raise FuseError("F204", f"adapters resize {name} to different sizes ({list(ctx.shapes[name])} and "
                            f"{list(shape)})", file=str(adapter.weights_file), key=key,
                            fix="merge adapters trained with the same tokenizer")
        return
    raise FuseError("F204", f"adapter tensor {key} has shape {list(shape)} but replaces {target.name} of shape "
                    f"{list(target.shape)}", file=str(adapter.weights_file), key=key,
                    fix="merge the adapter into the model it was trained on" + (
                        "; a resized vocabulary may only add rows" if vocab_table else ""))


def _unmapped_error(adapter: Adapter, unmapped: list, base: ModelWeights) -> FuseError:
    key, target = unmapped[0]
    close = difflib.get_close_matches(target, list(base.tensors), n=3, cutoff=0.5)
    more = f" ({len(unmapped) - 1} more adapter tensors are unmapped)" if len(unmapped) > 1 else ""
    hint = f"; closest base tensors: {', '.join(close)}" if close else ""
    trained_on = adapter.config.get("base_model_name_or_path")
    return FuseError("F203", f"adapter tensor {key} maps to no base tensor (looked for {target}){hint}{more}",
                     file=str(adapter.weights_file), key=key,
                     fix="merge the adapter into the model it was trained on"
                         + (f" ({trained_on}, per adapter_config.json)" if trained_on else ""))
