"""Adapter families, one module per PEFT type, registered by that type.

A family module (e.g. :mod:`stages.peft.lora`) provides:

- ``SUFFIXES``: adapter key suffix -> (base parameter it updates, role), e.g.
  ``".lora_A.weight" -> ("weight", "A")``; the planner groups a module's roles;
- ``check_config(config, path)``: refuse (F202) the variants it cannot merge;
- ``make_update(index, adapter, module, param, roles, target, ctx=)``: check one module's
  tensors against the base tensor from headers (F204) and resolve its scaling: no torch
  here, the planner serves validate too; may return ``[(param, Update), ...]`` when one
  adapter module changes several tensors (IA3: weight and bias);
- ``apply(W, W0, update, tensors, adapter=)``: the float32 math, exactly peft's: most
  families build peft's own layer around the tensor (:mod:`stages.peft.layers`);
- optional ``SHARED`` (tensors shared by all modules, e.g. VeRA's projections) with
  ``finalize(adapter, updates, shared)``, and ``regroup(adapter, groups, ctx)`` when keys do
  not name the tensor they update (LoRA ``target_parameters``).

Add a family (LoHa, IA3, ...) by writing its module and adding a line to ``FAMILIES``.
"""
from __future__ import annotations

import importlib

FAMILIES = {
    "LORA": "stages.peft.lora",
    "LOHA": "stages.peft.loha",
    "LOKR": "stages.peft.lokr",
    "IA3": "stages.peft.ia3",
    "OFT": "stages.peft.oft",
    "BOFT": "stages.peft.boft",
    "VERA": "stages.peft.vera",
    "ADALORA": "stages.peft.adalora",
    "TRAINABLE_TOKENS": "stages.peft.trainable_tokens",
}


def family_for(peft_type: str):
    """The family module that merges ``peft_type``, or None when Fuse has none."""
    module = FAMILIES.get(peft_type)
    return importlib.import_module(module) if module else None
