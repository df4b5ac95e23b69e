"""Quantized bases and the QLoRA base policy.

1. Bases saved as bitsandbytes 4-bit (NF4/FP4, optionally double-quantized) or 8-bit (LLM.int8)
   checkpoints: :func:`open_base` shows every quantized weight as the float tensor it stands for
   (dtype and shape from its quant state), from headers and the few-byte quant-state JSON alone,
   and :meth:`DequantizedWeights.load` dequantizes one tensor at a time with bitsandbytes' own
   ``dequantize_4bit`` / ``int8_vectorwise_dequant`` (what peft's ``dequantize_bnb_weight`` calls).
   The output is a plain float model (``quantization_config`` dropped).
2. ``base_precision: nf4``: merge into ``dequantize_4bit(quantize_4bit(W))``, the NF4 round trip
   of each weight bitsandbytes quantizes when transformers loads the base with ``load_in_4bit``
   (:func:`nf4_targets`), which is the base the adapter saw in QLoRA training.

Planning (``open_base``, ``nf4_targets``) is torch-free; bitsandbytes is imported only to dequantize.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from stages.findings import FuseError
from stages.io.safetensors import FLOAT_DTYPES, ModelWeights, TensorInfo, load_tensor

QUANT_STATE = ".quant_state.bitsandbytes__"
TORCH_TO_ST = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}
HEADS = ("lm_head.weight", "embed_out.weight", "output.weight")


@dataclass
class DequantizedWeights(ModelWeights):
    """A bitsandbytes checkpoint seen as the float model it stands for."""

    parts: dict = field(default_factory=dict)   # logical name -> ("4bit"|"8bit", {component: TensorInfo})
    quantization: str = ""                      # "bitsandbytes 4-bit nf4", ...

    def load(self, name):
        if name not in self.parts:
            return load_tensor(self.tensors[name])
        kind, components = self.parts[name]
        bnb = _bitsandbytes(name)
        import torch

        if kind == "4bit":
            state = {k: load_tensor(info) for k, info in components.items() if k != "weight"}
            quant_state = bnb.functional.QuantState.from_dict(state, device=torch.device("cpu"))
            return bnb.functional.dequantize_4bit(load_tensor(components["weight"]), quant_state)
        weight, scb = load_tensor(components["weight"]), load_tensor(components["SCB"])
        dtype = _torch_dtype(self.tensors[name].dtype)
        return bnb.functional.int8_vectorwise_dequant(weight, scb).to(dtype)


def open_base(base_dir) -> ModelWeights:
    """:class:`ModelWeights` of ``base_dir``; a :class:`DequantizedWeights` when it is a bitsandbytes checkpoint."""
    base = ModelWeights.open(base_dir)
    states = [n for n in base.tensors if QUANT_STATE in n]
    scbs = [n for n in base.tensors if n.endswith(".SCB")]
    if not states and not scbs:
        return base
    tensors, parts, hidden = {}, {}, set()
    for state in states:
        weight = state.split(QUANT_STATE)[0]
        meta = _read_json(base.tensors[state])
        dtype = TORCH_TO_ST.get(str(meta.get("dtype", "")).removeprefix("torch."))
        if weight not in base.tensors or dtype is None or not isinstance(meta.get("shape"), list):
            raise FuseError("F206", f"bitsandbytes quant state {state} is unreadable or has no weight",
                            file=str(base.tensors[state].path), key=state)
        components = {n[len(weight) + 1:]: base.tensors[n] for n in base.tensors if n.startswith(weight + ".")}
        components["weight"] = base.tensors[weight]
        hidden.update(info.name for info in components.values())
        info = base.tensors[weight]
        tensors[weight] = TensorInfo(weight, dtype, tuple(meta["shape"]), info.path, info.start, info.end)
        parts[weight] = ("4bit", components)
    dtype8 = _float_dtype(base)
    for scb in scbs:
        module = scb[: -len(".SCB")]
        weight = f"{module}.weight"
        if weight not in base.tensors or base.tensors[weight].dtype != "I8":
            raise FuseError("F206", f"bitsandbytes 8-bit scale {scb} has no int8 weight {weight}",
                            file=str(base.tensors[scb].path), key=scb)
        components = {"weight": base.tensors[weight], "SCB": base.tensors[scb]}
        hidden.update([weight, scb, f"{module}.weight_format"])
        info = base.tensors[weight]
        tensors[weight] = TensorInfo(weight, dtype8, info.shape, info.path, info.start, info.end)
        parts[weight] = ("8bit", components)
    merged = {}
    for name, info in base.tensors.items():  # base order, each logical tensor where its weight was
        if name in tensors:
            merged[name] = tensors[name]
        elif name not in hidden:
            merged[name] = info
    q = base.config.get("quantization_config") or {}
    kind = "4-bit " + str(q.get("bnb_4bit_quant_type", "nf4")) if states else "8-bit"
    return DequantizedWeights(dir=base.dir, tensors=merged, files=base.files, config=base.config, parts=parts,
                              quantization=f"bitsandbytes {kind}")


def nf4_targets(base: ModelWeights) -> set[str]:
    """The weights bitsandbytes quantizes when transformers loads this base with ``load_in_4bit``: every
    2-D ``*.weight`` of a linear layer (nn.Linear, GPT-2 Conv1D), i.e. not embeddings, not the output
    head (transformers keeps it in full precision), not norms, biases, convolutions or expert tensors."""
    from stages.peft.family import is_embedding

    out = set()
    for name, info in base.tensors.items():
        if len(info.shape) != 2 or not name.endswith(".weight") or info.dtype not in FLOAT_DTYPES:
            continue
        module = name[: -len(".weight")]
        last = module.rsplit(".", 1)[-1]
        if name in HEADS or name.endswith("." + HEADS[0]) or is_embedding(module) or "norm" in last:
            continue
        out.add(name)
    return out


def nf4_round_trip(W, double_quant: bool = False, blocksize: int = 64):
    """``dequantize_4bit(quantize_4bit(W))`` in W's dtype, as bitsandbytes' Params4bit does on load."""
    bnb = _bitsandbytes("base_precision: nf4")
    packed, state = bnb.functional.quantize_4bit(W, blocksize=blocksize, compress_statistics=double_quant,
                                                 quant_type="nf4")
    return bnb.functional.dequantize_4bit(packed, state)


def _bitsandbytes(what: str):
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        from stages.extras import install_fix
        raise FuseError("F209", f"{what} needs bitsandbytes, which is not installed",
                        fix=install_fix({"qlora": []}) + " (bitsandbytes runs on CPU)") from None
    return bitsandbytes


def _read_json(info: TensorInfo) -> dict:
    fd = os.open(info.path, os.O_RDONLY)
    try:
        raw = os.pread(fd, info.nbytes, info.start)
    finally:
        os.close(fd)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: JSONDecodeError, huge integers
        return {}
    return data if isinstance(data, dict) else {}


def _float_dtype(base: ModelWeights) -> str:
    """The output dtype of dequantized 8-bit weights: config's dtype, else the checkpoint's float tensors', else F16."""
    for key in ("dtype", "torch_dtype"):
        if str(base.config.get(key)) in TORCH_TO_ST:
            return TORCH_TO_ST[str(base.config[key])]
    floats = [i.dtype for i in base.tensors.values() if i.dtype in ("BF16", "F16", "F32")]
    return max(set(floats), key=floats.count) if floats else "F16"


def _torch_dtype(st: str):
    from stages.io.safetensors import torch_dtype

    return torch_dtype(st)

