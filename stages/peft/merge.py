"""merge_model: fold adapters into a base model, streaming tensor by tensor.

Per output tensor: read it from the base (``pread``), apply every update in float32,
round once to the output dtype, write it (hashing as it goes), drop it. Peak memory is
a few float32 copies of the largest tensor, whatever the model's size. The base is only
ever opened for reading.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from stages.findings import FuseError
from stages.io.safetensors import (FLOAT_DTYPES, ModelWeights, ShardedWriter, copy_file, fsync_dir, load_tensor,
                                   torch_dtype, write_file)
from stages.peft import family_for
from stages.peft.adapter import load_adapter
from stages.peft.plan import HEAD, MergePlan, plan_merge

DTYPES = ("auto", "float32", "bfloat16", "float16")

# Weight files of the base: the merged output replaces them, so they are never copied.
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json",
                   "*.pth", "*.pt", "*.ckpt", "*.gguf", "tf_model*.h5", "flax_model*.msgpack*")
ADAPTER_PATTERNS = ("adapter_config.json", "adapter_model.*")
# Files of the adapter directory that win over the base's: the tokenizer and chat template it was trained with.
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                      "spiece.model", "sentencepiece*.model", "chat_template*")
SKIP_DIRS = (".git", ".cache")


@dataclass
class MergeReport:
    metrics: dict
    hashes: dict[str, str]  # relpath in out_dir -> sha256, for every file written


def merge_model(base_dir, adapters, out_dir, dtype: str = "auto", max_shard_bytes=5_000_000_000,
                on_bytes=None, log=None) -> MergeReport:
    """Merge ``adapters`` (``[(path, weight)]``) into the model at ``base_dir``, writing ``out_dir``.

    ``dtype="auto"`` keeps every tensor's dtype; otherwise float tensors are written in
    ``dtype``. ``on_bytes(n)`` is called with the base bytes processed after each tensor.
    ``out_dir`` may exist but must be empty; on failure what was written is removed.
    Same inputs give byte-identical outputs.
    """
    started = time.monotonic()
    log = log or (lambda message: None)
    if dtype not in DTYPES:
        raise FuseError("F103", f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", key="dtype")
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    adapter_list = [load_adapter(Path(path), weight) for path, weight in adapters]
    _check_output(out_dir, base_dir, [a.path for a in adapter_list])
    plan = plan_merge(ModelWeights.open(base_dir), adapter_list)

    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = [(name, torch_dtype(_out_dtype(info.dtype, dtype)), info.shape) for name, info in plan.outputs.items()]
    writer = ShardedWriter(out_dir, layout, max_shard_bytes)
    try:
        counts = _write_weights(plan, writer, dtype, on_bytes, log)
        hashes = writer.close()
        side_hashes, side_bytes = _write_side_files(plan, out_dir, dtype)
        hashes.update(side_hashes)
        fsync_dir(out_dir)
    except BaseException:  # out_dir was empty: everything in it is ours, and half-written
        writer.abort()
        for child in out_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
        if created:
            out_dir.rmdir()
        raise
    metrics = dict(counts, bytes_written=writer.bytes_written + side_bytes, files_written=len(hashes),
                   untied_embeddings=plan.untie, seconds=round(time.monotonic() - started, 3))
    return MergeReport(metrics=metrics, hashes=dict(sorted(hashes.items())))


def _check_output(out_dir: Path, base_dir: Path, adapter_dirs: list[Path]) -> None:
    """F207 when writing ``out_dir`` could touch the base or an adapter, or clobber files."""
    out = out_dir.resolve()
    for what, src in [("base model", base_dir)] + [("adapter", a) for a in adapter_dirs]:
        src = src.resolve()
        if out == src or src in out.parents or out in src.parents:
            raise FuseError("F207", f"output {out_dir} overlaps the {what} directory {src}", file=out_dir,
                            fix="write the merged model to a directory outside the base and adapter directories")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FuseError("F207", f"output {out_dir} already exists and is not an empty directory", file=out_dir,
                        fix="give a new or empty directory")


def _out_dtype(base_dtype: str, dtype: str) -> str:
    """Safetensors dtype of an output tensor: float tensors follow ``dtype``, others keep theirs."""
    if dtype == "auto" or base_dtype not in FLOAT_DTYPES:
        return base_dtype
    return {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]


def _write_weights(plan: MergePlan, writer: ShardedWriter, dtype: str, on_bytes, log) -> dict:
    """Every output tensor in the writer's order: read, merge in float32, round once, write."""
    import torch

    if plan.untie:
        log(f"the adapter changes {HEAD} or the embedding it is tied to: writing {HEAD} on its own and setting "
            "tie_word_embeddings=false")
    merged = 0
    with torch.no_grad():
        for name in writer.order:
            info = plan.outputs[name]
            target = torch_dtype(_out_dtype(info.dtype, dtype))
            source = load_tensor(info)
            if name in plan.updates:
                source = _merge_tensor(plan, name, source.float())
                merged += 1
            result = source.to(target)  # the one rounding
            if result.dtype != source.dtype:
                _check_range(name, result, source)
            writer.write(name, result)
            if on_bytes and name in plan.base:  # progress counts base bytes; an untied lm_head is extra
                on_bytes(info.nbytes)
    return {"tensors_merged": merged, "tensors_copied": len(writer.order) - merged,
            "adapter_tensors": sum(len(a.tensors) for a in plan.adapters)}


def _merge_tensor(plan: MergePlan, name: str, W):
    """Apply ``name``'s updates to float32 ``W`` (changed in place): a replacement first, then
    each adapter's weight·delta in adapter order."""
    updates = plan.updates[name]
    replacements = [u for u in updates if u.kind == "replace"]
    if replacements:
        W = _replacement(plan, name, replacements)
    W0 = W.clone() if any(u.kind.startswith("dora_") for u in updates) else None
    for u in updates:
        if u.kind != "replace":
            adapter = plan.adapters[u.adapter]
            tensors = {role: adapter.load(key).float() for role, key in u.tensors.items()}
            W = family_for(u.peft_type).apply(W, W0, u, tensors)
    if not _all_finite(W):
        sources = sorted({str(plan.adapters[u.adapter].path) for u in updates})
        raise FuseError("F301", f"merged tensor {name} has NaN or Inf values", key=name,
                        file=sources[0] if len(sources) == 1 else None,
                        fix="the adapter is broken (NaN/Inf in its tensors, or exploded training); check its "
                            "training logs")
    return W


def _replacement(plan: MergePlan, name: str, replacements: list):
    """The full tensor the adapters put in place of ``name``; several adapters must agree on it."""
    import torch

    first, *others = [plan.adapters[u.adapter].load(u.tensors["tensor"]).float() for u in replacements]
    if any(not torch.equal(first, other) for other in others):
        raise FuseError("F202", f"two adapters replace {name} with different tensors; Fuse cannot tell which "
                        "should win", key=name, fix="merge these adapters one at a time")
    return first


def _all_finite(t) -> bool:
    """No NaN or Inf in ``t``. Fast path: NaN/Inf make the sum non-finite; only a non-finite sum
    (finite values can overflow it) needs the exact elementwise test, which is ~4x slower."""
    import torch

    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def _check_range(name: str, result, source) -> None:
    """F302 when a finite tensor became non-finite in the (narrower) output dtype; fp16 tops out at 65504."""
    if not _all_finite(result) and _all_finite(source):
        raise FuseError("F302", f"{name} overflows {str(result.dtype).removeprefix('torch.')}: values beyond "
                        "its range became Inf", key=name, fix="write bfloat16 or float32 instead (merge dtype)")


def _write_side_files(plan: MergePlan, out_dir: Path, dtype: str) -> tuple[dict, int]:
    """Copy every non-weight file of the base, recursively; the adapters' tokenizer files win;
    config.json is rewritten when the dtype or the embedding tie changes."""
    sources = dict(_base_side_files(plan.base.dir, plan.base.files))
    for adapter in reversed(plan.adapters):  # the first adapter listed wins over later ones
        for src in sorted(adapter.path.iterdir()):
            if src.is_file() and _matches(src.name, TOKENIZER_PATTERNS):
                sources[src.name] = src
    hashes, total = {}, 0
    for rel in sorted(sources):
        dst = out_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel == "config.json" and (config := _updated_config(sources[rel], dtype, plan.untie)) is not None:
            data = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
            hashes[rel], size = write_file(dst, data), len(data)
        else:
            hashes[rel], size = copy_file(sources[rel], dst)
        total += size
    return hashes, total


def _base_side_files(base_dir: Path, weight_files: list[Path]):
    """``(relpath, path)`` of every file to carry over from the base, in a stable order."""
    skip = {p.resolve() for p in weight_files}
    for root, dirs, files in os.walk(base_dir):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for fname in sorted(files):
            path = Path(root) / fname
            if path.resolve() in skip or _matches(fname, WEIGHT_PATTERNS + ADAPTER_PATTERNS):
                continue
            yield path.relative_to(base_dir).as_posix(), path


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _updated_config(path: Path, dtype: str, untie: bool) -> dict | None:
    """config.json with the output dtype and tie flag, or None when nothing changes (copied as is)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    sections = [config] + [config[k] for k in ("text_config",) if isinstance(config.get(k), dict)]
    changed = False
    for section in sections:
        if dtype != "auto":
            keys = [k for k in ("dtype", "torch_dtype") if k in section] or (["dtype"] if section is config else [])
            for key in keys:
                changed |= section.get(key) != dtype
                section[key] = dtype
        if untie and (section is config or "tie_word_embeddings" in section):
            changed |= section.get("tie_word_embeddings") is not False
            section["tie_word_embeddings"] = False
    return config if changed else None
