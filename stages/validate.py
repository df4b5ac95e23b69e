"""Stage ``validate``: pre-flight from configs, headers and the (small) adapter tensors.

It reads no tensor data of the base, so it takes seconds whatever the model size, and
it runs the same planner as ``merge``: what passes here is what merge will do.
"""
from __future__ import annotations

import json

from .pipeline import Param

NAME = "validate"
VERSION = 1
INPUT = ()
OUTPUT = "report"
LIBS = ("safetensors", "peft")
PARAMS = {
    "strict": Param(bool, False, help="treat warnings as errors"),
}


def run(ctx) -> dict:
    from .findings import FuseError
    from .io.safetensors import ModelWeights
    from .peft.adapter import load_adapter
    from .peft.plan import plan_merge

    base = ModelWeights.open(ctx.base.dir)
    adapters = [load_adapter(path, weight=weight) for path, weight in ctx.adapters]
    plan = plan_merge(base, adapters)
    for w in plan.warnings:
        ctx.warn(**w)
    if ctx.params["strict"] and ctx.warnings:
        first = ctx.warnings[0]
        raise FuseError(first["code"], first["message"] + " (strict mode: warnings are errors)",
                        file=first.get("file"), key=first.get("key"), fix=first.get("fix"))
    report = {"base": ctx.base.describe(), "plan": plan.summary(), "warnings": ctx.warnings}
    (ctx.output_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    return plan.summary()
