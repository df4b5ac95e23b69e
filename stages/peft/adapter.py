"""Load a PEFT adapter directory: its config, its tensor headers, and whether it can be merged.

Only headers are read here (tensors are loaded on demand by the merge), so validate can
check an adapter without importing torch.
"""
from __future__ import annotations

import contextlib
import math
import re
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
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise FuseError("F208", f"adapter directory {path} {what}", file=path,
                        fix="give the directory the trainer saved the adapter to (it holds adapter_config.json "
                            "and adapter_model.safetensors); a relative path is read from the pipeline file's "
                            "directory")
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
            data = read_json(config, "F201")
            reft_config = isinstance(data, dict) and ("intervention_types" in data or "representations" in data)
        except FuseError:
            pass
    if interventions or reft_config:
        raise FuseError("F202", f"this adapter cannot be merged: {REFT}", file=path,
                        fix="serve the base model with the intervention loaded by pyreft instead of merging")


def _is_bottleneck(inner: dict) -> bool:
    return "reduction_factor" in inner or "mh_adapter" in inner or inner.get("architecture") == "bottleneck"


def read_adapter_config(path: Path) -> dict:
    """``adapter_config.json`` as a dict whose known keys have the JSON types peft writes (F201 otherwise)."""
    if not path.is_file():
        raise FuseError("F201", f"{path.name} is missing in {path.parent}", file=path,
                        fix="point the adapter path at the directory peft's save_pretrained wrote")
    config = read_json(path, "F201", fix="re-save the adapter with peft's save_pretrained")
    if not isinstance(config, dict):
        raise FuseError("F201", f"{path.name} is a JSON {type(config).__name__}, not an object", file=path,
                        fix="re-save the adapter with peft's save_pretrained")
    check_config_types(config, path)
    return config


# --------------------------------------------------------------------------- config types
#
# The keys of adapter_config.json that Fuse reads (or hands to peft's layers), with the JSON
# types peft's config classes give them. Checked once, when the file is read, so that the
# planner and the families can rely on them: a `target_modules` that is a dict, an `r` that
# is a string or a `rank_pattern` key that is no regular expression is one F201 naming the key,
# not a traceback somewhere later. Keys not listed are not read by Fuse.


def _null(v):
    return v is None


def _str(v):
    return isinstance(v, str)


def _bool(v):
    return isinstance(v, bool)


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _regex(v):
    if not isinstance(v, str):
        return False
    try:
        re.compile(v)
    except (re.error, RecursionError, OverflowError):
        return False
    return True


def _list_of(check):
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


def _dict_of(key, value):
    return lambda v: isinstance(v, dict) and all(key(k) and value(x) for k, x in v.items())


def _either(*checks):
    return lambda v: any(c(v) for c in checks)


_NAMES = _either(_null, _regex, _list_of(_str))  # a regex string (full match) or a list of module-name suffixes
_PATTERN = _either(_null, _dict_of(_regex, _num))  # {regex of a module path: value}
CONFIG_TYPES = {
    # key: (check, what it must be)
    "peft_type": (_either(_null, _str), "a string such as LORA"),
    "base_model_name_or_path": (_either(_null, _str), "a string (hub id or path) or null"),
    "revision": (_either(_null, _str), "a string or null"),
    "r": (_either(_null, _num), "a number"),
    "init_r": (_either(_null, _num), "a number"),
    "lora_alpha": (_either(_null, _num), "a number"),
    "alpha": (_either(_null, _num), "a number"),
    "oft_block_size": (_either(_null, _num), "a number"),
    "boft_block_size": (_either(_null, _num), "a number"),
    "boft_block_num": (_either(_null, _num), "a number"),
    "boft_n_butterfly_factor": (_either(_null, _num), "a number"),
    "num_cayley_neumann_terms": (_either(_null, _int), "an integer"),
    "eps": (_either(_null, _num), "a number"),
    "projection_prng_key": (_either(_null, _int), "an integer"),
    "lora_dropout": (_either(_null, lambda v: _num(v) and 0 <= v <= 1), "a number from 0 to 1"),
    "target_modules": (_NAMES, "a list of module names, a regular expression, or null"),
    "exclude_modules": (_NAMES, "a list of module names, a regular expression, or null"),
    "feedforward_modules": (_NAMES, "a list of module names, a regular expression, or null"),
    "modules_to_save": (_either(_null, _list_of(_str)), "a list of module names or null"),
    "target_parameters": (_either(_null, _list_of(_str)), "a list of parameter names or null"),
    # AdaLoRA saves the ranks it kept per module as a list of booleans (peft's adalora/model.py)
    "rank_pattern": (_either(_null, _dict_of(_regex, _either(_num, _list_of(_bool)))),
                     "an object of module-path regular expression -> rank (AdaLoRA: a list of booleans)"),
    "alpha_pattern": (_PATTERN, "an object of module-path regular expression -> alpha"),
    "layers_to_transform": (_either(_null, _int, _list_of(_int)), "an integer, a list of integers, or null"),
    "layers_pattern": (_either(_null, _str, _list_of(_str)), "a string, a list of strings, or null"),
    "init_lora_weights": (_either(_null, _bool, _str), "true, false or the name of an initialisation"),
    "token_indices": (_either(_null, _list_of(_int)), "a list of token ids or null"),
    "trainable_token_indices": (_either(_null, _list_of(_int), _dict_of(_str, _list_of(_int))),
                                "a list of token ids, an object of module name -> token ids, or null"),
    **{key: (_either(_null, _bool), "true or false") for key in (
        "fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "block_share", "coft", "save_projection",
        "use_cayley_neumann", "inference_mode", "use_effective_conv2d", "decompose_both", "rank_dropout_scale")},
}


def peft_config_of(config: dict, path: Path):
    """peft's own ``PeftConfig`` of an adapter config (imports torch); F201 when peft refuses it."""
    from peft import PeftConfig

    with peft_refusal(path.parent):
        return PeftConfig.from_peft_type(**config)


@contextlib.contextmanager
def peft_refusal(adapter_dir):
    """Turn what peft raises while it reads an adapter into F201 naming its config.

    peft's config classes and tuners check more than Fuse reads (``bias`` one of three
    strings, ``eva_config`` an object, ``megatron_config`` needing Megatron, ...): what peft's
    own loader refuses is the file's fault, so it is a finding with peft's reason, not a crash.
    """
    path = Path(adapter_dir) / CONFIG_NAME
    try:
        yield
    except (FuseError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - peft is the judge of its own format
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise FuseError("F201", f"peft cannot load the adapter {Path(adapter_dir).name}: {type(e).__name__}: "
                        f"{reason}", file=path,
                        fix="re-save the adapter with peft's save_pretrained, or correct the value peft names") from None


def check_config_types(config: dict, path: Path) -> None:
    """F201 for the first known key whose value has a type peft would not have written."""
    for key, (check, what) in CONFIG_TYPES.items():
        if key in config and not check(config[key]):
            shown = repr(config[key])
            shown = shown if len(shown) <= 60 else shown[:60] + "..."
            raise FuseError("F201", f"{key} must be {what}, got {shown}", file=path, key=key,
                            fix="re-save the adapter with peft's save_pretrained, or correct the value")


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
