"""Load a PEFT adapter directory: its config, its tensor headers, and whether it can be merged.

Only headers are read here (tensors are loaded on demand by the merge), so validate can
check an adapter without importing torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from stages.findings import FuseError
from stages.io.jsonfile import read_json
from stages.io.safetensors import TensorInfo, load_tensor, read_header, st_dtype

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# PEFT types whose update is no change to any weight, with the reason shown to the user.
NOT_MERGEABLE = {
    "PROMPT_TUNING": "prompt tuning learns virtual tokens fed in with every input, not a change to any weight",
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning learns virtual tokens fed in with every input, "
                               "not a change to any weight",
    "P_TUNING": "p-tuning learns a prompt encoder that makes virtual tokens, not a change to any weight",
    "PREFIX_TUNING": "prefix tuning learns key/value prefixes for every attention layer, not a change to any weight",
    "ADAPTION_PROMPT": "adaption prompts (LLaMA-Adapter) add gated prompt attention, which no weight change expresses",
    "CPT": "context-aware prompt tuning learns virtual tokens, not a change to any weight",
    "CARTRIDGE": "a cartridge is a learned KV-cache prefix, not a change to any weight",
    "POLY": "Polytropon routes between LoRA skills per task at run time, so there is no single weight to merge",
    "XLORA": "X-LoRA mixes LoRA experts with an input-dependent gate, so there is no single weight to merge",
}


# Adapter formats of other libraries whose updates no weight change expresses, with the reason.
REFT = ("ReFT interventions (pyreft) edit hidden representations at chosen layers and positions, "
        "which is not a change to any weight")
BOTTLENECK = ("bottleneck adapters (the `adapters` library) insert new down/up-projection layers with a "
              "non-linearity between them, which no change to the existing weights expresses")


@dataclass
class Adapter:
    """One adapter directory: config, tensor headers, and its weight in a weighted merge."""

    path: Path
    config: dict
    peft_type: str
    tensors: dict[str, TensorInfo]
    weights_file: Path
    weight: float = 1.0
    _in_memory: dict = field(default_factory=dict, repr=False)  # tensors of an allowed pickle file
    _cache: dict = field(default_factory=dict, repr=False)      # per-adapter values the merge computes once

    def load(self, name: str):
        """One adapter tensor as stored (its dtype unchanged)."""
        if name in self._in_memory:
            return self._in_memory[name]
        return load_tensor(self.tensors[name])


def load_adapter(path, weight: float = 1.0, *, allow_pickle: bool = False) -> Adapter:
    """Read ``adapter_config.json`` and the adapter's tensor headers; refuse what cannot be merged (F202)."""
    from stages.peft import family_for  # the registry; imported here to avoid a cycle

    path = Path(path)
    if not path.is_dir():
        raise FuseError("F208", f"adapter directory {path} does not exist", file=path)
    _refuse_foreign_formats(path)
    config = read_adapter_config(path / CONFIG_NAME)
    peft_type = str(config.get("peft_type", "")).upper()
    if not peft_type and isinstance(config.get("config"), dict):  # saved by the `adapters` library
        if _is_bottleneck(config["config"]):
            raise FuseError("F202", f"this adapter cannot be merged: {BOTTLENECK}", file=path / CONFIG_NAME,
                            fix="serve the base model with the adapter loaded by the adapters library instead")
        raise FuseError("F202", "this adapter was saved by the `adapters` library, not peft; Fuse merges peft "
                        "adapters", file=path / CONFIG_NAME, key="config",
                        fix="merge it with the adapters library (model.merge_adapter), or train it with peft")
    if not peft_type:
        raise FuseError("F201", "adapter_config.json has no peft_type", file=path / CONFIG_NAME, key="peft_type",
                        fix="save the adapter with peft's save_pretrained, which writes peft_type")
    if peft_type in NOT_MERGEABLE:
        raise FuseError("F202", f"{peft_type} adapters cannot be merged: {NOT_MERGEABLE[peft_type]}",
                        file=path / CONFIG_NAME, key="peft_type",
                        fix="serve the base model with the adapter loaded by peft instead of merging")
    family = family_for(peft_type)
    if family is None:
        raise FuseError("F202", f"{peft_type} adapters cannot be merged by Fuse yet: it has no merge module for "
                        f"{peft_type} (it merges: {', '.join(_supported())})", file=path / CONFIG_NAME,
                        key="peft_type", fix="merge with peft's merge_and_unload() for now")
    family.check_config(config, path / CONFIG_NAME)

    weights_file, tensors, in_memory = _read_weights(path, allow_pickle)
    if not tensors:
        raise FuseError("F208", f"{weights_file.name} holds no tensors", file=weights_file)
    return Adapter(path=path, config=config, peft_type=peft_type, tensors=tensors,
                   weights_file=weights_file, weight=float(weight), _in_memory=in_memory)


def _refuse_foreign_formats(path: Path) -> None:
    """F202 for a pyreft (ReFT) save directory: intervention files and no adapter_config.json."""
    if (path / CONFIG_NAME).exists():
        return
    interventions = any(p.name.startswith("intkey_") for p in path.iterdir())
    config = path / "config.json"
    reft_config = False
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
            reft_config = isinstance(data, dict) and ("intervention_types" in data or "representations" in data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
    if interventions or reft_config:
        raise FuseError("F202", f"this adapter cannot be merged: {REFT}", file=path,
                        fix="serve the base model with the intervention loaded by pyreft instead of merging")


def _is_bottleneck(inner: dict) -> bool:
    return "reduction_factor" in inner or "mh_adapter" in inner or inner.get("architecture") == "bottleneck"


def read_adapter_config(path: Path) -> dict:
    if not path.is_file():
        raise FuseError("F201", f"{path.name} is missing in {path.parent}", file=path,
                        fix="point the adapter path at the directory peft's save_pretrained wrote")
    config = read_json(path, "F201", fix="re-save the adapter with peft's save_pretrained")
    if not isinstance(config, dict):
        raise FuseError("F201", f"{path.name} is not a JSON object", file=path)
    return config


def _read_weights(path: Path, allow_pickle: bool):
    """``(file, {name: TensorInfo}, in-memory tensors)``; a pickle is read whole, and only when allowed."""
    if (path / WEIGHTS_NAME).exists():
        return path / WEIGHTS_NAME, {t.name: t for t in read_header(path / WEIGHTS_NAME)[0]}, {}
    pickle = path / PICKLE_NAME
    if not pickle.exists():
        raise FuseError("F208", f"{path} has no {WEIGHTS_NAME}", file=path / WEIGHTS_NAME,
                        fix="copy the adapter weights next to adapter_config.json")
    if not allow_pickle:
        raise FuseError("F209", f"{pickle.name} is a pickle file, which can run code when loaded", file=pickle,
                        fix="re-save the adapter with safetensors (peft's default), or allow pickle files explicitly")
    import torch

    try:
        state = torch.load(pickle, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unreadable file
        raise FuseError("F208", f"cannot read {pickle.name}: {e}", file=pickle) from None
    infos = {name: TensorInfo(name, st_dtype(t.dtype), tuple(t.shape), pickle, 0, 0) for name, t in state.items()}
    return pickle, infos, dict(state)


def _supported() -> list[str]:
    from stages.peft import FAMILIES

    return sorted(FAMILIES)
