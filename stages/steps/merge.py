"""Stage ``merge``: fold the adapter(s) into the base, tensor by tensor.

The work is done by :func:`stages.peft.merge.merge_model`; this module only maps the
pipeline's parameters onto it and reports progress.
"""
from __future__ import annotations

from ..pipeline import Param

NAME = "merge"
VERSION = 2  # 2: method/density/seed, base_precision, dequantized bitsandbytes bases, new families
INPUT = ()  # reads the base and adapters, not an upstream stage
OUTPUT = "hf-model"
LIBS = ("torch", "safetensors", "peft", "bitsandbytes")
CARD_METRICS = ("tensors_merged", "tensors_copied")  # deterministic: shown in the model card
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PARAMS = {
    "dtype": Param(str, "auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="output dtype; auto keeps each tensor's own dtype"),
    "max_shard_size": Param(str, "5GB", help="largest output shard, e.g. 2GB or 500MB"),
    "method": Param(str, "linear", choices=("linear", "ties", "dare_linear", "dare_ties"),
                    help="how several adapters combine: linear = W0 + sum of weight x update; ties / dare_* act on "
                         "the full updates (docs/merging.md)"),
    "density": Param(float, None, help="ties / dare_*: fraction of each update kept, in (0, 1]"),
    "seed": Param(int, None, help="dare_*: seed of the random drop masks (same seed, same model)"),
    "base_precision": Param(str, "original", choices=("original", "nf4"),
                            help="merge into the base as stored, or into its NF4 round trip (what a QLoRA adapter "
                                 "saw in training; needs bitsandbytes)"),
    "nf4_double_quant": Param(bool, False, help="base_precision nf4: the base was loaded with "
                                                "bnb_4bit_use_double_quant"),
    "memory_budget": Param(str, "600MB", help="whole-process peak memory (RSS, Python and torch included) the merge "
                                              "stays under, whatever the model's size, e.g. 600MB or 2GB"),
}


def requires(params) -> dict:
    """Modules this stage imports that the base install lacks -> the extra that brings them."""
    return {"bitsandbytes": "qlora"} if params.get("base_precision") == "nf4" else {}


def parse_size(text: str, key: str = "merge.max_shard_size") -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as transformers' max_shard_size)."""
    from ..findings import FuseError

    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper().replace(" ", "")
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit) and t[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * units[unit])
    if t.isdigit():
        return int(t)
    raise FuseError("F103", f"cannot read size '{text}'", key=key, fix="write e.g. 5GB or 500MB")


def estimate_bytes(ctx) -> int:
    """Output size: the base's weights, re-sized if the dtype changes, plus side files."""
    total = 0
    for f in ctx.base.files:
        size = f["size"]
        if f["path"].endswith(".safetensors") and ctx.params["dtype"] != "auto":
            size = size * DTYPE_BYTES[ctx.params["dtype"]] // 2  # bases are mostly 16-bit
        total += size
    return total


def run(ctx) -> dict:
    from ..peft.merge import merge_model

    weights = sum(f["size"] for f in ctx.base.files if f["path"].endswith(".safetensors"))
    with ctx.progress("merge", weights) as progress:
        report = merge_model(ctx.base.dir, ctx.adapters, ctx.output_dir, dtype=ctx.params["dtype"],
                             max_shard_bytes=parse_size(ctx.params["max_shard_size"]),
                             on_bytes=progress.advance, log=ctx.log, method=ctx.params["method"],
                             density=ctx.params["density"], seed=ctx.params["seed"],
                             base_precision=ctx.params["base_precision"],
                             nf4_double_quant=ctx.params["nf4_double_quant"],
                             memory_budget=parse_size(ctx.params["memory_budget"], key="merge.memory_budget"))
    ctx.hashes.update(report.hashes)
    return report.metrics
