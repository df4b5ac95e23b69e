"""The names transformers gives a checkpoint's tensors at run time, from its own conversion mapping.

transformers 5 renames and fuses some tensors as it loads them (``conversion_mapping.py``):
Mixtral's ``block_sparse_moe.experts.E.w1/w3.weight`` become ``mlp.experts.gate_up_proj``
(stacked per expert, then concatenated), a legacy llava's ``language_model.model.*`` becomes
``model.language_model.*``. peft names the modules of the loaded model, so an adapter tensor
reaches the checkpoint only through that same mapping. This module applies transformers' own
transforms to the checkpoint's names (headers only, no tensor is read) and, for a fused tensor,
says which expert and which slice of it each checkpoint tensor is, so an update of the fused
tensor can be split back.

transformers is imported only when an adapter names a tensor the checkpoint does not hold under
that name (``PlanContext.runtime``): ``transformers.conversion_mapping`` imports torch and
transformers' loading code, no model code (about 3.5 s cold on a 2-core runner, 0.1 s once
torch and transformers are loaded).

Which transforms apply: the model class's or ``model_type``'s list, as transformers looks them up
for the top model; then those of its base model class and of its sub-configs' classes
(``text_config``, ``vision_config``, ...), which transformers scopes to the sub-model's module
path. That path cannot be read from config.json, so they are tried under every prefix of a name.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from stages.findings import FuseError
from stages.io.safetensors import TensorInfo

# The converters Fuse reverses: experts stacked along dim 0 (MergeModulelist), then optionally
# several stacked sources concatenated along another dim (gate and up -> gate_up).
REVERSIBLE = (["MergeModulelist"], ["MergeModulelist", "Concatenate"])


@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor inside a fused runtime tensor: ``runtime[expert]``, narrowed to
    ``[start, stop)`` along the runtime tensor's dim ``dim`` (None: the whole expert)."""

    key: str
    expert: int
    dim: int | None = None
    start: int = 0
    stop: int = 0


@dataclass
class Fused:
    """A runtime tensor transformers builds from several checkpoint tensors (a ``WeightConverter``)."""

    name: str
    keys: list            # the checkpoint tensors, in transformers' order
    operations: str       # e.g. "MergeModulelist(dim=0), Concatenate(dim=1)"
    info: TensorInfo | None = None   # the runtime tensor's dtype and shape, when Fuse can split it back
    pieces: list = field(default_factory=list)
    why: str = ""         # why Fuse cannot split an update of it back ("" when it can)

    def refusal(self, what: str, file, key, why: str = "") -> FuseError:
        shown = ", ".join(self.keys[:3]) + (f" and {len(self.keys) - 3} more" if len(self.keys) > 3 else "")
        return FuseError("F202", f"{what} changes {self.name}, which transformers builds at load time from "
                         f"{shown} ({self.operations}); {why or self.why}", file=file, key=key,
                         fix="merge with peft's merge_and_unload() and save_pretrained(), which convert the layout")


@dataclass
class RuntimeNames:
    renamed: dict = field(default_factory=dict)  # runtime name -> checkpoint tensor (renamed only)
    fused: dict = field(default_factory=dict)    # runtime name -> Fused


def runtime_names(base) -> RuntimeNames:
    """Every checkpoint tensor of ``base`` under its transformers runtime name, where that differs."""
    try:
        transforms = _transforms(base.config)
        from transformers.core_model_loading import WeightConverter, dot_natural_key
    except ImportError:  # no transformers: no conversion mapping to follow
        return RuntimeNames()
    if not transforms:
        return RuntimeNames()
    renamings = [(t, floating) for t, floating in transforms if not isinstance(t, WeightConverter)]
    converters = [(t, floating) for t, floating in transforms if isinstance(t, WeightConverter)]
    names, groups = RuntimeNames(), {}
    for key in sorted(base.tensors, key=dot_natural_key):  # transformers' load order: experts in index order
        name, converter, pattern = _runtime_name(key, renamings, converters)
        if converter is not None:
            groups.setdefault(name, (converter, {}))[1].setdefault(pattern, []).append(key)
        elif name != key:
            names.renamed.setdefault(name, key)
    for name, (converter, sources) in groups.items():
        fused = _fuse(name, converter, sources, base)
        for target in converter.target_patterns:  # a one-to-many converter (Chunk) makes several
            names.fused[name.replace(converter.target_patterns[0], target, 1)] = fused
    return names


def _transforms(config: dict) -> list:
    """``[(transform, floating)]`` in transformers' order; floating: scoped to a sub-model whose path is unknown."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping as mapping
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    def model_class(model_type):
        cls = MODEL_MAPPING_NAMES.get(model_type)
        return cls[0] if isinstance(cls, (list, tuple)) else cls

    used, out = set(), []

    def add(lookups, floating):
        for name in lookups:
            found = mapping(name) if name else None
            if found is not None:
                if name not in used:
                    used.add(name)
                    out.extend((t, floating) for t in found)
                return

    model_type = config.get("model_type")
    add([(config.get("architectures") or [None])[0], model_type], False)
    add([model_class(model_type)], True)  # the base model (LlavaModel inside LlavaForConditionalGeneration)
    for sub in config.values():
        if isinstance(sub, dict) and sub.get("model_type"):
            add([model_class(sub["model_type"]), sub["model_type"]], True)
    if out:
        add(["legacy"], False)
    return out


def _runtime_name(key: str, renamings, converters):
    """``(name, converter, source pattern)`` as transformers' ``rename_source_key`` renames a checkpoint key:
    every renaming in turn, then the first converter that matches."""
    for transform, floating in renamings:
        key = _apply(transform, key, floating)[0]
    for transform, floating in converters:
        name, pattern = _apply(transform, key, floating)
        if pattern is not None:
            return name, transform, pattern
    return key, None, None


def _apply(transform, key: str, floating: bool):
    if not floating:
        return transform.rename_source_key(key)
    parts = key.split(".")
    for depth in range(len(parts)):  # the shortest scope under which it applies
        transform.scope_prefix, transform.base_model_prefix = ".".join(parts[:depth]), ""
        name, pattern = transform.rename_source_key(key)
        if pattern is not None:
            return name, pattern
    return key, None


def _fuse(name: str, converter, sources: dict, base) -> Fused:
    """What the converter builds from ``sources`` ({source pattern: checkpoint keys}), and each key's piece of it."""
    ops = converter.operations
    kinds = [type(op).__name__ for op in ops]
    steps = ", ".join(f"{kind}(dim={op.dim})" if hasattr(op, "dim") else kind for kind, op in zip(kinds, ops))
    patterns = [p for p in converter.source_patterns if p in sources]  # Concatenate keeps this order
    keys = [k for p in patterns for k in sources[p]]
    fused = Fused(name=name, keys=keys, operations=steps)
    concat = ops[1].dim if len(ops) == 2 else None
    if kinds not in REVERSIBLE or ops[0].dim != 0 or concat == 0 or len(converter.target_patterns) != 1 \
            or (len(patterns) > 1) != (concat is not None):
        fused.why = "Fuse splits updates back only through MergeModulelist(dim=0) optionally followed by " \
                    "Concatenate(dim>0)"
        return fused
    infos = [[base.tensors[k] for k in sources[p]] for p in patterns]
    experts = {len(group) for group in infos}
    shapes = [{tuple(i.shape) for i in group} for group in infos]
    dtypes = {i.dtype for group in infos for i in group}
    if len(experts) != 1 or any(len(s) != 1 for s in shapes) or len(dtypes) != 1:
        fused.why = "its checkpoint tensors differ in number, shape or dtype"
        return fused
    E, shapes = experts.pop(), [s.pop() for s in shapes]
    shape = list(shapes[0])
    if concat is not None:
        axis = concat - 1  # in one expert's tensor
        if any(len(s) != len(shape) or s[:axis] + s[axis + 1:] != shapes[0][:axis] + shapes[0][axis + 1:]
               for s in shapes):
            fused.why = "its checkpoint tensors do not concatenate"
            return fused
        shape[axis] = sum(s[axis] for s in shapes)
    offset = 0
    for p, s in zip(patterns, shapes):
        size = s[concat - 1] if concat is not None else 0
        fused.pieces += [Piece(k, e, concat, offset, offset + size) for e, k in enumerate(sources[p])]
        offset += size
    first = base.tensors[keys[0]]
    fused.info = TensorInfo(name=name, dtype=first.dtype, shape=(E, *shape), path=first.path, start=0, end=0)
    return fused
