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
from stages.io.safetensors import FLOAT_DTYPES, ShardedWriter, copy_file, fsync_dir, torch_dtype, write_file
from stages.peft import family_for
from stages.peft.adapter import load_adapter
from stages.peft.combine import check_method, combine
from stages.peft.plan import HEAD, MergePlan, plan_merge
from stages.peft.quantized import DequantizedWeights, nf4_round_trip, nf4_targets, open_base

DTYPES = ("auto", "float32", "bfloat16", "float16")
BASE_PRECISIONS = ("original", "nf4")
# Update kinds that add a ΔW independent of the tensor they are added to (the rest are functions of W0).
ADDITIVE = ("linear", "embedding", "bias", "conv", "experts", "additive")

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
                on_bytes=None, log=None, *, method: str = "linear", density: float | None = None,
                seed: int | None = None, base_precision: str = "original",
                nf4_double_quant: bool = False) -> MergeReport:
    """Merge ``adapters`` (``[(path, weight)]``) into the model at ``base_dir``, writing ``out_dir``.

    ``dtype="auto"`` keeps every tensor's dtype; otherwise float tensors are written in
    ``dtype``. ``on_bytes(n)`` is called with the base bytes processed after each tensor.
    ``out_dir`` may exist but must be empty; on failure what was written is removed.
    Same inputs give byte-identical outputs.

    ``method``: ``linear`` (W0 + Σ wᵢ·ΔWᵢ, adapters applied in order), or ``ties`` /
    ``dare_linear`` / ``dare_ties`` on the full updates ΔWᵢ = Wᵢ − W0 (``density``; DARE needs
    ``seed``); see docs/merging.md. ``base_precision="nf4"`` merges into the NF4 round trip of
    the base (QLoRA); a bitsandbytes 4/8-bit base is always dequantized.
    """
    started = time.monotonic()
    log = log or (lambda message: None)
    if dtype not in DTYPES:
        raise FuseError("F103", f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", key="dtype")
    if base_precision not in BASE_PRECISIONS:
        raise FuseError("F103", f"base_precision must be one of {', '.join(BASE_PRECISIONS)}, got {base_precision!r}",
                        key="base_precision")
    density = check_method(method, density, seed, len(adapters))
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    adapter_list = [load_adapter(Path(path), weight) for path, weight in adapters]
    _check_output(out_dir, base_dir, [a.path for a in adapter_list])
    base = open_base(base_dir)
    if isinstance(base, DequantizedWeights):
        log(f"the base is a {base.quantization} checkpoint: dequantizing each weight as it is read")
        if base_precision == "nf4":
            raise FuseError("F103", "base_precision: nf4 round-trips a 16-bit base; this base is already quantized "
                            f"({base.quantization}) and is merged into its dequantized weights", key="base_precision",
                            fix="drop base_precision, or point base at the 16-bit model")
    plan = plan_merge(base, adapter_list, method=method)
    plan.options = {"density": density, "seed": seed,
                    "nf4": nf4_targets(base) if base_precision == "nf4" else set(), "double_quant": nf4_double_quant}

    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = [(name, torch_dtype(_out_dtype(info.dtype, dtype)), plan.shape(name))
              for name, info in plan.outputs.items()]
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
                   untied_embeddings=plan.untie, seconds=round(time.monotonic() - started, 3), method=method,
                   base_precision=base_precision)
    if plan.vocab_size is not None:
        metrics["vocab_size"] = plan.vocab_size
    if isinstance(base, DequantizedWeights):
        metrics["dequantized"] = base.quantization
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
    nf4, double_quant = plan.options.get("nf4", set()), plan.options.get("double_quant", False)
    if nf4:
        log(f"base_precision nf4: merging into the NF4 round trip of {len(nf4)} linear weights")
    merged = 0
    kept = Retention()
    with torch.no_grad():
        for name in writer.order:
            info = plan.outputs[name]
            target = torch_dtype(_out_dtype(info.dtype, dtype))
            source = plan.base.load(info.name)  # dequantized when the base is a bitsandbytes checkpoint
            if info.name in nf4:
                source = nf4_round_trip(source, double_quant)
            if name in plan.updates:
                # float() of a float32 tensor is that tensor: keep the start apart for the retention metric
                W = _merge_tensor(plan, name, source.clone() if source.dtype == torch.float32 else source.float())
                merged += 1
                result = W.to(target)  # the one rounding
                if result.dtype != W.dtype:
                    _check_range(name, result, W)
                kept.add(name, source, W, result)
            else:
                result = source.to(target)
                if result.dtype != source.dtype:
                    _check_range(name, result, source)
            writer.write(name, result)
            if on_bytes and name in plan.base:  # progress counts base bytes; an untied lm_head is extra
                on_bytes(info.nbytes)
    return {"tensors_merged": merged, "tensors_copied": len(writer.order) - merged,
            "adapter_tensors": sum(len(a.tensors) for a in plan.adapters), **kept.metrics(), "nf4_tensors": len(nf4)}


class Retention:
    """How much of the update survives rounding to the output dtype, over the whole run.

    Per merged tensor, with W_start the tensor the adapters started from (after a dequantization
    or an NF4 round trip), Δ = W_merged − W_start in float32 and Δ_eff = round(W_merged) −
    round(W_start) the update actually written (round: to the output dtype):
    ``update_rel_error`` = ‖Δ_eff − Δ‖ / ‖Δ‖ over all merged elements (0 = every bit survived),
    ``update_zeroed_fraction`` = the share of changed elements whose change rounded away
    entirely, and the tensor where the relative error is worst. Tensors above ``SAMPLE``
    elements are measured on ``SAMPLE`` evenly spaced ones (deterministic), which keeps the cost
    a small fraction of the merge.
    """

    SAMPLE = 1 << 20

    def __init__(self):
        self.delta2 = self.error2 = 0.0
        self.changed = self.zeroed = 0
        self.worst = ("", 0.0)

    def add(self, name, source, W, result) -> None:
        import torch

        if tuple(source.shape) != tuple(W.shape):
            return  # resized: there is no "before" for the new rows
        s, w, r = source.reshape(-1), W.reshape(-1), result.reshape(-1)
        step = -(-w.numel() // self.SAMPLE)
        if step > 1:
            s, w, r = s[::step], w[::step], r[::step]
        start = s.float()
        delta = w - start
        before = s if s.dtype == r.dtype else s.to(r.dtype)  # a dtype change alone is not a lost update
        effective = r.float() - before.float()
        d2 = float(torch.dot(delta, delta))
        error = effective.sub_(delta)
        e2 = float(torch.dot(error, error))
        changed = delta != 0
        self.changed += int(changed.sum())
        self.zeroed += int((changed & (r == before)).sum())
        self.delta2 += d2 * step
        self.error2 += e2 * step
        if d2 > 0 and (e2 / d2) ** 0.5 > self.worst[1]:
            self.worst = (name, (e2 / d2) ** 0.5)

    def metrics(self) -> dict:
        if not self.delta2:
            return {}
        return {"update_rel_error": round((self.error2 / self.delta2) ** 0.5, 6),
                "update_zeroed_fraction": round(self.zeroed / max(self.changed, 1), 6),
                "update_worst_tensor": self.worst[0], "update_worst_rel_error": round(self.worst[1], 6)}


def _merge_tensor(plan: MergePlan, name: str, W):
    """Apply ``name``'s updates to float32 ``W`` (changed in place): a replacement first, then
    each adapter's weight·delta in adapter order (``linear``), or the TIES/DARE combination of the
    adapters' full updates."""
    updates = plan.updates[name]
    replacements = [u for u in updates if u.kind == "replace"]
    if replacements:
        W = _replacement(plan, name, replacements)
    deltas = [u for u in updates if u.kind != "replace"]
    if plan.method == "linear":
        W0 = W.clone() if any(u.kind.startswith("dora_") for u in deltas) else None
        for u in deltas:
            W = _apply(plan, u, W, W0)
    elif deltas:
        W = _combine(plan, name, W, deltas)
    if not _all_finite(W):
        sources = sorted({str(plan.adapters[u.adapter].path) for u in updates})
        raise FuseError("F301", f"merged tensor {name} has NaN or Inf values", key=name,
                        file=sources[0] if len(sources) == 1 else None,
                        fix="the adapter is broken (NaN/Inf in its tensors, or exploded training); check its "
                            "training logs")
    return W


def _apply(plan: MergePlan, u, W, W0):
    adapter = plan.adapters[u.adapter]
    tensors = {role: adapter.load(key).float() for role, key in u.tensors.items()}
    return family_for(u.peft_type).apply(W, W0, u, tensors, adapter=adapter)


def _combine(plan: MergePlan, name: str, W, deltas: list):
    """TIES / DARE: each adapter's full update ΔWᵢ = (W with adapter i alone) − W, combined (combine.py)."""
    import dataclasses

    import torch

    order = list(dict.fromkeys(u.adapter for u in deltas))
    task_vectors = []
    for i in order:
        mine = [dataclasses.replace(u, weight=1.0) for u in deltas if u.adapter == i]
        if all(u.kind in ADDITIVE for u in mine):  # ΔW itself, not (W + ΔW) − W, which loses its low bits
            Wi = torch.zeros_like(W)
            for u in mine:
                Wi = _apply(plan, u, Wi, None)
            task_vectors.append(Wi)
            continue
        Wi = W.clone()
        W0 = W.clone() if any(u.kind.startswith("dora_") for u in mine) else None
        for u in mine:
            Wi = _apply(plan, u, Wi, W0)
        task_vectors.append(Wi.sub_(W))
    weights = [plan.adapters[i].weight for i in order]
    return W.add_(combine(plan.method, task_vectors, weights, plan.options["density"], plan.options["seed"], name,
                          order))


def _replacement(plan: MergePlan, name: str, replacements: list):
    """The full tensor the adapters put in place of ``name``; several adapters must agree on it."""
    import torch

    copies = [u for u in replacements if not u.extra.get("original")]
    replacements = copies or replacements  # a trained copy supersedes the (resized) module it was made from
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
        if rel == "config.json" and (config := _updated_config(sources[rel], dtype, plan)) is not None:
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


def _updated_config(path: Path, dtype: str, plan: MergePlan) -> dict | None:
    """config.json with the output dtype, tie flag and vocab_size, without the quantization_config of a
    dequantized base; None when nothing changes (copied as is)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    sections = [config] + [config[k] for k in ("text_config",) if isinstance(config.get(k), dict)]
    changed = False
    if isinstance(plan.base, DequantizedWeights) and "quantization_config" in config:
        del config["quantization_config"]
        changed = True
        if dtype == "auto":  # the dequantized weights' dtype
            dtypes = {plan.outputs[n].dtype for n in plan.base.parts}
            dtype = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(dtypes.pop(), "auto") \
                if len(dtypes) == 1 else "auto"
    for section in sections:
        if dtype != "auto":
            keys = [k for k in ("dtype", "torch_dtype") if k in section] or (["dtype"] if section is config else [])
            for key in keys:
                changed |= section.get(key) != dtype
                section[key] = dtype
        if plan.untie and (section is config or "tie_word_embeddings" in section):
            changed |= section.get("tie_word_embeddings") is not False
            section["tie_word_embeddings"] = False
        if plan.vocab_size is not None and (section is config or "vocab_size" in section):
            if "vocab_size" in section or section is config and "text_config" not in config:
                changed |= section.get("vocab_size") != plan.vocab_size
                section["vocab_size"] = plan.vocab_size
    return config if changed else None
