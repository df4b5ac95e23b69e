"""Stage ``publish``: hand the final model over, with its provenance, checksums and card.

``to: dir`` copies into a local directory (a mounted volume, a Docker build context).
Only files whose sha256 differs are copied, each through a temp file and a rename, so a
re-publish of an unchanged model copies nothing and a reader never sees half a file.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from . import card
from .findings import FuseError
from .manifest import file_record, list_files, sha256_file, tool_version
from .pipeline import Param, upstream_of

NAME = "publish"
VERSION = 1
INPUT = ("hf-model",)
OUTPUT = None
LIBS = ()
PARAMS = {
    "to": Param(str, choices=("dir",), help="where to publish"),
    "path": Param("path", None, help="target directory (to: dir)"),
}
GENERATED = (card.PROVENANCE, card.SUMS, "README.md")


def provenance(ctx) -> dict:
    """What was published and how it was made; deterministic (no times, no run ids, no local paths)."""
    m, p = ctx.manifest, ctx.pipeline
    chain, spec = [], p.stage(ctx.input_stage)
    while spec:  # walk upstream from the published artifact to the stage that read the base
        chain.insert(0, spec)
        spec = upstream_of(spec, p.stages) if spec.module.INPUT else None
    first = m.record(chain[0].id)["fingerprint_inputs"]["inputs"]
    base = dict(first["base"], name=m.record(chain[0].id).get("sources", {}).get("base", {}).get("name", ""))
    if base["kind"] != "hub":  # a local path says nothing to the reader of the card
        base["name"] = Path(base["name"]).name
    adapters = []
    for a, spec in zip(first["adapters"], p.adapters):
        cfg = _adapter_config(spec.path)
        adapters.append({"name": spec.path.name, "digest": a["digest"], "weight": a["weight"],
                         "peft_type": cfg.get("peft_type"), "base_model_name_or_path": cfg.get("base_model_name_or_path")})
    if base["kind"] == "hub":
        base["hub_id"] = base["name"]
    elif adapters and adapters[0]["base_model_name_or_path"]:
        base["hub_id"] = adapters[0]["base_model_name_or_path"]
    steps = []
    for spec in chain:
        rec = m.record(spec.id)
        keep = getattr(spec.module, "CARD_METRICS", ())
        steps.append({"id": spec.id, "stage": spec.name, "version": spec.module.VERSION, "params": rec["params"],
                      "metrics": {k: v for k, v in (rec.get("metrics") or {}).items() if k in keep}})
    libs = {}
    for spec in chain:
        libs.update(m.record(spec.id)["fingerprint_inputs"].get("libraries", {}))
    return {"name": p.name, "tool": {"name": "fuse-llm", "version": tool_version()}, "base": base,
            "adapters": adapters, "steps": steps, "libraries": libs}


def _adapter_config(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def run(ctx) -> dict:
    if ctx.params["to"] == "dir" and not ctx.params["path"]:
        raise FuseError("F501", "publish to: dir needs a path", file=ctx.pipeline.path, line=ctx.stage.line,
                        key=f"{ctx.stage.id}.path", fix="add path: dist/my-model")
    src = ctx.input_dir
    upstream = ctx.manifest.record(ctx.input_stage)
    model_files = {f["path"]: f["sha256"] for f in upstream["outputs"] if f["path"] not in GENERATED}
    prov = provenance(ctx)
    prov["files"] = dict(sorted(model_files.items()))
    generated = {
        card.PROVENANCE: card.provenance_bytes(prov),
        "README.md": card.render_card(prov, card.base_card_metadata(src)).encode("utf-8"),
    }
    from hashlib import sha256
    all_sums = dict(model_files, **{k: sha256(v).hexdigest() for k, v in generated.items()})
    generated[card.SUMS] = card.sha256sums(all_sums)
    for name, data in generated.items():  # the workdir keeps a copy of what was published
        (ctx.output_dir / name).write_bytes(data)
    target = Path(ctx.params["path"])
    return _sync_dir(ctx, src, model_files, target)


def _sync_dir(ctx, src: Path, model_files: dict, target: Path) -> dict:
    _check_target(ctx, target)
    target.mkdir(parents=True, exist_ok=True)
    wanted = dict(model_files)
    sources = {rel: src / rel for rel in model_files}
    for name in GENERATED:
        wanted[name] = sha256_file(ctx.output_dir / name)
        sources[name] = ctx.output_dir / name
    copied = unchanged = nbytes = 0
    for rel, sha in sorted(wanted.items()):
        dest = target / rel
        if dest.is_file() and dest.stat().st_size == sources[rel].stat().st_size and sha256_file(dest) == sha:
            unchanged += 1
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            shutil.copyfile(sources[rel], tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        copied += 1
        nbytes += dest.stat().st_size
    for rel in list_files(target):  # files of an earlier publish that are no longer part of the model
        if rel not in wanted:
            (target / rel).unlink()
    ctx.external = {"root": str(target), "files": [file_record(target, rel, sha) for rel, sha in sorted(wanted.items())]}
    ctx.log(f"published {len(wanted)} files to {target}: {copied} copied ({nbytes / 1e6:.1f} MB), {unchanged} unchanged")
    return {"files": len(wanted), "files_copied": copied, "bytes_copied": nbytes, "files_unchanged": unchanged}


def _check_target(ctx, target: Path):
    """Never write into someone else's directory, nor into the workdir or the base."""
    target = target.resolve()
    for inside, what in ((ctx.workdir.resolve(), "the workdir"),):
        if target == inside or inside in target.parents:
            raise FuseError("F501", f"publish path {target} is inside {what}", key=f"{ctx.stage.id}.path",
                            fix="publish to a directory outside the workdir")
    if target.exists() and any(target.iterdir()) and not (target / card.PROVENANCE).exists():
        raise FuseError("F501", f"publish path {target} is not empty and holds no earlier Fuse publish",
                        file=target, key=f"{ctx.stage.id}.path",
                        fix="choose an empty or new directory (Fuse replaces files it published before)")
