"""Adapter families, one module per PEFT type, registered by that type.

A family module (e.g. :mod:`stages.peft.lora`) provides:

- ``SUFFIXES``: adapter key suffix -> (base parameter it updates, role), e.g.
  ``".lora_A.weight" -> ("weight", "A")``; the planner groups a module's roles;
- ``check_config(config, path)``: refuse (F202) the variants it cannot merge;
- ``make_update(...)``: check one module's tensors against the base tensor from headers
  (F204) and resolve its scaling: no torch here, the planner serves validate too;
- ``apply(W, W0, update, tensors)``: the float32 math, exactly peft's formula.

Add a family (LoHa, IA3, ...) by writing its module and adding a line to ``FAMILIES``.
"""
from __future__ import annotations

import importlib

FAMILIES = {
    "LORA": "stages.peft.lora",
}


def family_for(peft_type: str):
    """The family module that merges ``peft_type``, or None when Fuse has none."""
    module = FAMILIES.get(peft_type)
    return importlib.import_module(module) if module else None
