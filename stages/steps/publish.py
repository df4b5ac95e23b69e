"""Stage ``publish``: hand the final model over, with its provenance, checksums and card.

Targets (``to:``), one module each in :mod:`stages.publishers`:

- ``dir``: a local directory (a mounted volume, a Docker build context);
- ``hub``: a Hugging Face Hub model repo (``repo_id``, ``private``, ``revision``, ``tag``);
- ``s3``: an S3-compatible object store (``url: s3://bucket/prefix``, ``endpoint``, ``region``).

Every target runs the same algorithm (:func:`stages.publishers.base.sync`): check the
credentials first, compare each file's sha256 from the manifest with what the target
holds, send only what differs (an unchanged model: nothing, no commit), delete what an
earlier publish left that is no longer part of the model, then read every file's sha256
back from the target. A pipeline may publish several times (give each step an ``id``),
e.g. the merged model to the Hub and its ONNX export to S3.

What is recorded in the manifest (``metrics``): the target, the files sent and their
bytes, and for the Hub the commit, its URL and the tag. Never a token.
"""
from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

from .. import card
from ..findings import FuseError
from ..manifest import file_record, tool_version
from ..pipeline import Param, upstream_of
from ..secrets import redact_data, remember

NAME = "publish"
VERSION = 2
INPUT = ("hf-model", "quantized-model", "onnx-model")
OUTPUT = None
LIBS = ()
TARGETS = ("dir", "hub", "s3")
PARAMS = {
    "to": Param(str, choices=TARGETS, help="where to publish: dir, hub or s3"),
    "path": Param("path", None, help="target directory (to: dir)", published=True),
    "repo_id": Param(str, None, help="Hub model repo, org/name (to: hub)", published=True),
    "private": Param(bool, None, help="create the Hub repo private (default true; an existing repo keeps its own)"),
    "revision": Param(str, None, help="Hub branch to commit to (default main; created if missing)", published=True),
    "tag": Param(str, None,
                 help="Hub tag put on the verified commit; an existing tag must hold the same files", published=True),
    "message": Param(str, None, help="Hub commit message", published=True),
    "url": Param(str, None, help="s3://bucket/prefix (to: s3)", published=True),
    "region": Param(str, None, help="S3 region (to: s3)"),
    "part_size": Param(str, None, help="S3 multipart part size, e.g. 64MB (to: s3; default 64MB)"),
    "endpoint": Param(str, None,
                      help="Hub endpoint (default HF_ENDPOINT or huggingface.co) or S3 endpoint URL", published=True),
    "card": Param("path", None,
                  help="model card template (Markdown): its sections replace or extend Fuse's", published=True),
}


def requires(params) -> dict:
    """Modules this stage imports that the base install lacks -> the extra that brings them."""
    return {"boto3": "s3"} if params.get("to") == "s3" else {}


# which parameters belong to which target (the others must stay unset)
TARGET_PARAMS = {
    "dir": {"path"},
    "hub": {"repo_id", "private", "revision", "tag", "message", "endpoint"},
    "s3": {"url", "region", "part_size", "endpoint"},
}
REQUIRED = {"dir": ("path", "path: dist/my-model"), "hub": ("repo_id", "repo_id: my-org/my-model"),
            "s3": ("url", "url: s3://my-bucket/models/my-model")}
COMMON = {"to", "card"}
GENERATED = (card.PROVENANCE, card.SUMS, "README.md")


def input_files(params) -> list[str]:
    """Files whose content shapes the output: the runner hashes them into the fingerprint."""
    return [params["card"]] if params.get("card") else []


def check_params(ctx) -> None:
    """Target-specific parameters: the required one is there, none of another target's is."""
    to, params = ctx.params["to"], ctx.params
    where = dict(file=ctx.pipeline.path, line=ctx.stage.line)
    key, example = REQUIRED[to]
    if not params.get(key):
        raise FuseError("F501", f"publish to: {to} needs {key}", key=f"{ctx.stage.id}.{key}",
                        fix=f"add {example}", **where)
    for name, value in params.items():
        if value is not None and name not in COMMON and name not in TARGET_PARAMS[to]:
            owner = next((t for t, names in TARGET_PARAMS.items() if name in names), "?")
            raise FuseError("F501", f"'{name}' is a parameter of to: {owner}, not of to: {to}",
                            key=f"{ctx.stage.id}.{name}", fix=f"remove {name}, or publish with to: {owner}", **where)


def provenance(ctx) -> dict:
    """What was published and how it was made; deterministic (no times, no run ids, no local paths)."""
    m, p = ctx.manifest, ctx.pipeline
    chain, spec = [], p.stage(ctx.input_stage)
    while spec:  # walk upstream from the published artifact to the stage that read the base
        chain.insert(0, spec)
        spec = upstream_of(spec, p.stages) if spec.module.INPUT else None
    first = m.record(chain[0].id)["fingerprint_inputs"]["inputs"]
    base = dict(first["base"], name=m.record(chain[0].id).get("sources", {}).get("base", {}).get("name", ""))
    if base["kind"] != "hub":  # a local path says nothing to the reader of the card, and names the machine
        base["name"] = Path(base["name"]).name
    here = Path(p.path).parent if getattr(p, "path", None) else Path(".")
    adapters = []
    for a, spec in zip(first["adapters"], p.adapters):
        cfg = _json(Path(spec.path) / "adapter_config.json")
        # a local path (absolute, or relative to where the adapter was trained) is not published
        base_id = card.hub_id(cfg.get("base_model_name_or_path"), here, Path(spec.path), Path(spec.path).parent)
        adapters.append({"name": spec.path.name, "digest": a["digest"], "weight": a["weight"],
                         "peft_type": cfg.get("peft_type"), "base_model_name_or_path": base_id})
    if base["kind"] == "hub":
        base["hub_id"] = base["name"]
    elif adapters and adapters[0]["base_model_name_or_path"]:
        base["hub_id"] = adapters[0]["base_model_name_or_path"]
    steps = [_step(m, spec, here) for spec in chain]
    checks = _gates(ctx, chain, steps, here)
    libs = {}
    for spec in chain:
        libs.update(m.record(spec.id)["fingerprint_inputs"].get("libraries", {}))
    # what shapes the output, not the file's bytes: moving the workdir changes no published byte
    shape = {"name": p.name, "adapters": [a["weight"] for a in adapters],
             "steps": [{k: s[k] for k in ("id", "stage", "version", "params")} for s in steps]}
    cfg = _json(ctx.input_dir / "config.json")
    model = {k: cfg[k] for k in ("architectures", "model_type") if k in cfg}
    model.update(_tokenizer_info(ctx.input_dir))
    out = {"name": p.name, "tool": {"name": "fuse-llm", "version": tool_version()}, "base": base,
           "adapters": adapters, "steps": steps, "libraries": libs,
           "pipeline": {"name": p.name, "digest": "sha256:" + sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()},
           "model": model}
    if checks:
        out["checks"] = checks
    return out


def _portable(value, here: Path):
    from ..paths import portable

    return portable(value, here)


def _step(m, spec, here: Path) -> dict:
    """A step of the artifact's chain: its parameters and the card metrics that are not gate numbers
    (those go to the gate's own entry, with their bounds)."""
    rec = m.record(spec.id)
    keep = [k for k in getattr(spec.module, "CARD_METRICS", ()) if k not in card.MEASURES]
    return {"id": spec.id, "stage": spec.name, "version": spec.module.VERSION, "params": _portable(rec["params"], here),
            "metrics": {k: v for k, v in (rec.get("metrics") or {}).items() if k in keep}}


def _gates(ctx, chain, steps, here: Path) -> list[dict]:
    """The gates that measured the published artifact itself: the gate of the stage that made it
    (quantize, export) and finished verifying stages that read it (check on the merged model). Another
    artifact's numbers (the GPTQ gate on the merged model's card) are not this one's."""
    m, p = ctx.manifest, ctx.pipeline
    made_by = chain[-1]
    out = []
    gate = _gate(ctx, made_by, here)
    if gate:
        out.append(gate)
    for spec in p.stages[: p.stages.index(p.stage(ctx.stage.id))]:
        rec = m.record(spec.id) or {}
        # a verifying stage (its output is a report) that read this artifact; quantize and export read it
        # too, but what they measure is the artifact they make
        if spec in chain or spec.module.OUTPUT != "report" or rec.get("status") != "done" \
                or spec.module.INPUT == () or upstream_of(spec, p.stages) is not made_by:
            continue
        gate = _gate(ctx, spec, here)
        if gate:
            out.append(gate)
    return out


def _gate(ctx, spec, here: Path) -> dict | None:
    """One gate's numbers with their bounds, what it compared, on what."""
    rec = ctx.manifest.record(spec.id) or {}
    metrics = rec.get("metrics") or {}
    names = [k for k in getattr(spec.module, "CARD_METRICS", ()) if k in card.MEASURES or k.startswith("logits_")]
    if not any(k in metrics for k in names):
        return None
    params, notes = rec.get("params") or {}, []
    if spec.name == "check":
        report = _json(ctx.workdir / spec.id / "report.json")
        logits = report.get("logits") or {}
        thresholds = logits.get("thresholds") or {}
        what = ("the merged model against the base with the adapter applied: a probe test of every merged "
                "tensor, then logits against peft's PeftModel in float32"
                + (f" on {logits['prompts']}" if isinstance(logits.get("prompts"), str) else "") + ".")
        if metrics.get("logits_skipped"):
            notes.append(f"Logits were not compared: {metrics['logits_skipped']}.")
    else:
        thresholds = metrics.get("thresholds") or {}
        how = (f"greedy decoding of {params.get('greedy_tokens')} tokens after the first {params.get('greedy_prompts')} "
               "prompts")
        if spec.name == "export":
            what = (f"this ONNX graph in ONNX Runtime against the merged model in torch (float32) on "
                    f"{metrics.get('eval_prompts', 'the evaluation text')}, teacher-forced, then {how}"
                    + (" through the graph's KV cache." if params.get("with_past", True) else "."))
        else:
            what = (f"this {str(params.get('method', '')).upper()} {params.get('bits')}-bit checkpoint, reloaded with "
                    f"transformers, against the merged model on {metrics.get('eval_prompts', 'the evaluation text')}, "
                    f"teacher-forced, then {how}.")
    return {"id": spec.id, "stage": spec.name, "version": spec.module.VERSION, "what": _portable(what, here),
            "numbers": card.gate_numbers(metrics, thresholds, names), "notes": notes}


def _tokenizer_info(model_dir: Path) -> dict:
    """Whether the published model has a tokenizer and a chat template (the usage snippet uses them)."""
    from ..quantization.backend import TOKENIZER_FILES

    d = Path(model_dir)
    tok = _json(d / "tokenizer_config.json")
    return {"tokenizer": any((d / f).exists() for f in TOKENIZER_FILES),
            "chat_template": (d / "chat_template.jinja").exists() or bool(tok.get("chat_template"))}


def _json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _template(ctx) -> dict | None:
    path = ctx.params.get("card")
    if not path:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FuseError("F507", f"cannot read the card template {path}: {getattr(e, 'strerror', None) or e}",
                        file=ctx.pipeline.path, line=ctx.stage.line, key=f"{ctx.stage.id}.card",
                        fix="give a Markdown file, relative to the pipeline file") from None
    if text.startswith("---") and not card.split_front_matter(text)[0] and text.count("---") >= 2:
        raise FuseError("F507", f"the YAML front matter of the card template {path} is not a valid mapping",
                        file=path, fix="write 'key: value' lines between the two --- lines")
    return card.parse_template(text)


def run(ctx) -> dict:
    check_params(ctx)
    to = ctx.params["to"]
    src = ctx.input_dir
    upstream = ctx.manifest.record(ctx.input_stage)
    model_files = {f["path"]: f for f in upstream["outputs"] if f["path"] not in GENERATED}
    prov = redact_data(provenance(ctx), ctx.manifest.secrets)  # the card and provenance carry no secret
    prov["files"] = {path: f["sha256"] for path, f in sorted(model_files.items())}
    readme = card.render_card(prov, card.base_card_metadata(src), model_id=_model_id(ctx), target=to,
                              template=redact_data(_template(ctx), ctx.manifest.secrets))
    generated = {card.PROVENANCE: card.provenance_bytes(prov), "README.md": readme.encode("utf-8")}
    all_sums = dict(prov["files"], **{k: sha256(v).hexdigest() for k, v in generated.items()})
    generated[card.SUMS] = card.sha256sums(all_sums)
    for name, data in generated.items():  # the workdir keeps a copy of what was published
        (ctx.output_dir / name).write_bytes(data)
        ctx.hashes[name] = sha256(data).hexdigest()

    from ..publishers.base import LocalFile, sync

    # model files first, the card and provenance next, SHA256SUMS last: where files land one
    # by one (dir, s3), a complete SHA256SUMS means a complete publish
    files = [LocalFile(path, src / path, f["size"], f["sha256"]) for path, f in sorted(model_files.items())]
    files += [LocalFile(name, ctx.output_dir / name, len(generated[name]), ctx.hashes[name])
              for name in (card.PROVENANCE, "README.md", card.SUMS)]
    pub = _publisher(ctx, to, prov)
    try:
        outcome = sync(pub, files)
    finally:
        ctx.manifest.secrets |= pub.secrets  # never written down, even in an error message
        remember(pub.secrets)  # ...nor printed, wherever this process prints
    return _metrics(ctx, to, pub, outcome, files)


def _model_id(ctx) -> str:
    """What the card's snippets load: the Hub repo id; for a directory its path relative to the pipeline
    file (its name when it lies outside: never a machine's absolute path); for S3 the prefix's name."""
    params, to = ctx.params, ctx.params["to"]
    if to == "hub":
        return params["repo_id"]
    if to == "s3":
        return params["url"].rstrip("/").rsplit("/", 1)[-1]
    here = Path(ctx.pipeline.path).parent if getattr(ctx.pipeline, "path", None) else Path(".")
    return _portable(str(Path(params["path"]).resolve()), here)


def _publisher(ctx, to: str, prov: dict):
    from ..publishers import publisher_class

    params = dict(ctx.params)
    kw = dict(log=ctx.log, warn=ctx.warn, stage_id=ctx.stage.id, file=ctx.pipeline.path, line=ctx.stage.line)
    if to == "dir":
        return publisher_class("dir")(params, workdir=ctx.workdir, **kw)
    if to == "s3":
        from .merge import parse_size

        params["part_size"] = parse_size(params["part_size"]) if params.get("part_size") else None
        return publisher_class("s3")(params, **kw)
    params["message"] = params.get("message") or f"Publish {prov['name']} with Fuse {prov['tool']['version']}"
    params["description"] = (f"Merged by Fuse from `{prov['base']['name']}` + "
                             + ", ".join(f"`{a['name']}` ({a['digest'][:19]})" for a in prov["adapters"])
                             + f".\n\nfuse-provenance.json sha256: {sha256(card.provenance_bytes(prov)).hexdigest()}")
    return publisher_class("hub")(params, **kw)


def _metrics(ctx, to: str, pub, outcome, files) -> dict:
    sent, nbytes = len(outcome.uploaded), outcome.bytes_uploaded
    unchanged = outcome.files - sent
    if to == "dir":
        target = pub.target
        ctx.external = {"root": str(target),
                        "files": [file_record(target, f.path, f.sha256) for f in files]}
        ctx.log(f"published {outcome.files} files to {target}: {sent} copied ({nbytes / 1e6:.1f} MB), "
                f"{unchanged} unchanged" + (f", {len(outcome.deleted)} removed" if outcome.deleted else ""))
        return {"files": outcome.files, "files_copied": sent, "bytes_copied": nbytes, "files_unchanged": unchanged,
                "files_deleted": len(outcome.deleted)}
    rec = outcome.record
    metrics = {"target": to, "files": outcome.files, "files_uploaded": sent, "bytes_uploaded": nbytes,
               "files_unchanged": unchanged, "files_deleted": len(outcome.deleted), "verified": outcome.files}
    if to == "hub":
        metrics.update({k: rec[k] for k in ("repo_id", "revision", "commit", "url", "commit_url", "tag", "commits")})
        ctx.log(f"published {outcome.files} files to {rec['url']} @ {rec['commit'][:12]}"
                + (f" (tag {rec['tag']})" if rec.get("tag") else "") + f": {sent} uploaded ({nbytes / 1e6:.1f} MB), "
                f"{unchanged} unchanged, {rec['commits']} commit(s), all {outcome.files} verified")
    else:
        metrics.update({"url": rec["url"], "endpoint": rec.get("endpoint")})
        ctx.log(f"published {outcome.files} files to {rec['url']}: {sent} uploaded ({nbytes / 1e6:.1f} MB), "
                f"{unchanged} unchanged, all {outcome.files} verified")
    return metrics
