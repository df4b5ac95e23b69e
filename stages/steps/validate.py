"""Stage ``validate``: the pre-flight, from configs, headers and the (small) adapter tensors.

It reads no tensor data of the base, so it takes about a second whatever the model size
(``bench/preflight_sparse.py`` times it on a 15 GB model), and it runs the same planner
as ``merge``: what passes here is what merge will do. Checks, cheap to dearer:

1. files: symlinks stay inside the model directory (or a hub snapshot's blob store),
   safetensors headers are bounded and describe their files exactly, the index agrees
   with the shards, pickle files are refused unless ``allow_pickle``;
2. the base: not quantized; the same model the adapter was trained on, compared by
   config fingerprint (``allow_base_mismatch`` overrides);
3. the adapter: a PEFT type Fuse can merge, vocabulary and tokenizer against the
   embedding rows, config consistent with its tensors, every tensor mapped onto a base
   tensor of the right shape (the planner), no NaN/Inf;
4. room: free disk space in the workdir for what the pipeline will write.

Each problem is one finding (``docs/validation.md`` lists them). Errors stop the run;
warnings go into the manifest, and ``strict: true`` makes them errors.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

from ..pipeline import Param

NAME = "validate"
VERSION = 2
INPUT = ()
OUTPUT = "report"
LIBS = ("safetensors", "peft")
# validate plans the merge the merge stage will follow: its combination method decides what is
# refused (e.g. TIES for a family with no additive update), so it is part of validate's fingerprint
READS_PARAMS_OF = {"merge": ("method", "density", "seed")}
PARAMS = {
    "strict": Param(bool, False, help="treat warnings as errors"),
    "allow_base_mismatch": Param(bool, False, help="merge even when the base's config differs from the one the "
                                                   "adapter was trained on"),
    "allow_pickle": Param(bool, False, help="read an adapter saved as a pickle (adapter_model.bin) with "
                                            "torch.load(weights_only=True)"),
}

# config keys that identify a model's shape, with the spellings architectures use for them
FINGERPRINT = {
    "model_type": ("model_type",),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "num_key_value_heads": ("num_key_value_heads",),
    "vocab_size": ("vocab_size",),
    "intermediate_size": ("intermediate_size", "n_inner"),
}
# module names of input embeddings and output heads: their first dimension is the vocabulary
VOCAB_MODULES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "lm_head", "embed_out")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "added_tokens.json")
MERGEABLE_QUANTIZATION = ("bitsandbytes",)  # merge dequantizes these checkpoints


def run(ctx) -> dict:
    from ..findings import FuseError

    merge = next((s for s in ctx.pipeline.stages if s.name == "merge"), None)
    report = preflight(ctx.base.dir, ctx.adapters, base_name=ctx.base.name, base_revision=ctx.base.revision,
                       allow_base_mismatch=ctx.params["allow_base_mismatch"],
                       allow_pickle=ctx.params["allow_pickle"], room=(ctx.workdir, estimate_outputs(ctx)),
                       merge_options=merge.params if merge else None)
    for w in report["warnings"]:
        ctx.warn(**w)
    if ctx.params["strict"] and report["warnings"]:
        first = report["warnings"][0]
        more = len(report["warnings"]) - 1
        raise FuseError(first["code"], first["message"] + " (strict: warnings are errors"
                        + (f"; {more} more warning{'s' if more > 1 else ''}" if more else "") + ")",
                        file=first.get("file"), key=first.get("key"), fix=first.get("fix"))
    from ..paths import portable

    report["base"]["source"] = ctx.base.describe()
    seconds, free = report.pop("seconds"), report["disk"].pop("free_bytes")  # the file holds no timings
    # paths relative to the pipeline's directory: the same report in every checkout
    shown = portable(report, ctx.pipeline.path.parent)
    (ctx.output_dir / "report.json").write_text(json.dumps(shown, indent=2, sort_keys=True, default=str) + "\n")
    return dict(report["plan"], warnings=len(report["warnings"]), seconds=seconds,
                disk_need_bytes=report["disk"]["need_bytes"], disk_free_bytes=free)


def estimate_outputs(ctx) -> int:
    """Bytes the pipeline's stages will write into the workdir, from their ``estimate_bytes``."""
    total = 0
    for spec in ctx.pipeline.stages:
        estimate = getattr(spec.module, "estimate_bytes", None)
        if estimate is None:
            continue
        try:
            total += int(estimate(SimpleNamespace(base=ctx.base, params=spec.params, pipeline=ctx.pipeline,
                                                  stage=spec, workdir=ctx.workdir)))
        except Exception:  # noqa: BLE001 - an estimate that needs what only its own run has: it checks then
            continue
    return total


# --------------------------------------------------------------------------- the pre-flight


def preflight(base_dir, adapters, *, base_name: str | None = None, base_revision: str | None = None,
              allow_base_mismatch: bool = False, allow_pickle: bool = False, room=None,
              merge_options: dict | None = None) -> dict:
    """Check ``adapters`` (``[(path, weight)]``) against the model at ``base_dir``, from headers.

    Raises :class:`~stages.findings.FuseError` on the first error; returns a report with
    ``warnings`` (finding dicts). ``room`` is ``(directory, bytes needed)`` or None;
    ``merge_options`` the merge's parameters (``method``, ``density``, ``seed``), so the
    plan is the one merge will follow. No base tensor data is read, and torch is not
    imported (unless a pickle is allowed).

    Example::

        report = preflight("models/llama", [("outputs/lora", 1.0)], room=("runs/x", 15e9))
        report["plan"]["tensors_updated"]
    """
    from ..findings import FuseError
    from ..io import checks
    from ..peft.combine import check_method
    from ..peft.plan import plan_merge
    from ..peft.quantized import open_base

    started = time.perf_counter()
    base_dir = Path(base_dir)
    warnings: list[dict] = []

    # 1. files of the base
    if not base_dir.is_dir():
        raise FuseError("F205", f"base model directory {base_dir} does not exist", file=base_dir)
    checks.check_links(base_dir, "base model")
    checks.check_loadable(base_dir)  # config.json as transformers' AutoConfig needs it (F205)
    check_quantization(base_dir)
    # every shard's header is checked whole by its reader (read_header): bounded, exact tiling
    base = open_base(base_dir)  # a bitsandbytes checkpoint is seen as the float model it stands for
    warnings += checks.check_index(base)
    warnings += _carried_pickles(base_dir)

    # 2. the adapters: files, type, base, vocabulary, config
    loaded = []
    for path, weight in adapters:
        path = Path(path)
        if path.is_dir():
            checks.check_links(path, "adapter")
        loaded.append(_load_adapter(path, weight, allow_pickle))
    adapter_reports = []
    for adapter in loaded:
        match = compare_base(adapter, base, base_name or str(base_dir), base_revision, allow_base_mismatch)
        warnings += match.pop("warnings")
        warnings += check_adapter_config(adapter)
        adapter_reports.append({"path": str(adapter.path), "peft_type": adapter.peft_type, "weight": adapter.weight,
                                "tensors": len(adapter.tensors), "file": adapter.weights_file.name, **match})
    check_vocabulary(loaded, base)

    # 3. the plan: every adapter tensor onto a base tensor of the right shape, as merge will do it
    options = merge_options or {}
    method = options.get("method") or "linear"
    check_method(method, options.get("density"), options.get("seed"), len(loaded))
    plan = plan_merge(base, loaded, method=method)
    warnings += plan.warnings
    tokenizer = check_tokenizer(plan, loaded)

    # 4. adapter numerics (the adapter's tensors are small; the base's are not read)
    for adapter, rep in zip(loaded, adapter_reports):
        rep["nonfinite"] = 0
        for name in adapter.tensors:
            bad = _nonfinite(adapter, name, checks)
            if bad:
                raise FuseError("F212", f"adapter tensor {name} has {bad} NaN/Inf value{'s' if bad > 1 else ''}",
                                file=adapter.weights_file, key=name,
                                fix="the training diverged or the file is damaged: use an earlier checkpoint")

    # 5. room for the outputs
    disk = None
    if room is not None:
        where, need = room
        free = checks.check_free_space(where, int(need), "this pipeline's outputs")
        disk = {"path": str(where), "need_bytes": int(need), "free_bytes": free}

    return {
        "base": {"dir": str(base_dir), "tensors": len(base.tensors), "fingerprint": config_fingerprint(base.config),
                 "weight_bytes": sum(t.nbytes for t in base.tensors.values())},
        "adapters": adapter_reports,
        "plan": plan.summary(),
        "tokenizer": tokenizer,
        "disk": disk,
        "warnings": warnings,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _load_adapter(path: Path, weight: float, allow_pickle: bool):
    """The adapter, with the pickle policy applied first."""
    from ..findings import FuseError
    from ..peft.adapter import PICKLE_NAME, WEIGHTS_NAME, load_adapter

    if not allow_pickle and not (path / WEIGHTS_NAME).is_file() and (path / PICKLE_NAME).is_file() \
            and (path / "adapter_config.json").is_file():
        raise FuseError("F209", f"{PICKLE_NAME} is a pickle file, which can run code when it is loaded",
                        file=path / PICKLE_NAME,
                        fix="re-save the adapter with safetensors (peft's default), or set allow_pickle: true "
                            "to load it with torch.load(weights_only=True)")
    return load_adapter(path, weight=weight, allow_pickle=allow_pickle)  # its header is checked whole there


def _nonfinite(adapter, name: str, checks) -> int:
    if adapter.weights_file.suffix == ".safetensors":
        return checks.scan_nonfinite(adapter.tensors[name])
    import torch  # an allowed pickle: its tensors are in memory already

    t = adapter.load(name)
    return int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0


def _carried_pickles(base_dir: Path) -> list[dict]:
    """Pickle files of the base that merge would copy into the output as side files."""
    import fnmatch

    from ..io import checks
    from ..peft.merge import WEIGHT_PATTERNS

    out = []
    for p in checks.pickle_files(base_dir):
        if not any(fnmatch.fnmatchcase(p.name, pat) for pat in WEIGHT_PATTERNS):
            out.append({"code": "F209", "file": str(p), "message": f"{p.name} is a pickle file; merge copies it into "
                        "the output as it is (Fuse never loads it)",
                        "fix": "remove it from the base directory if the published model should not carry it"})
    return out


# --------------------------------------------------------------------------- which base


def config_fingerprint(config: dict) -> dict:
    """The values that identify a model's shape: model type, hidden size, layers, heads,
    vocabulary, MLP size (a vision-language model's ``text_config`` fills what the top lacks)."""
    sections = [config] + ([config["text_config"]] if isinstance(config.get("text_config"), dict) else [])
    out = {}
    for key, spellings in FINGERPRINT.items():
        for section in sections:
            value = next((section[s] for s in spellings if section.get(s) is not None), None)
            if value is not None:
                out[key] = value
                break
    return out


def trained_on_config(adapter) -> tuple[dict | None, str | None]:
    """The config of the model the adapter names (``base_model_name_or_path``), when it can be
    read without the network: a local directory, or the local Hugging Face cache."""
    name = adapter.config.get("base_model_name_or_path")
    if not isinstance(name, str) or not name.strip():
        return None, None
    for cand in (Path(name).expanduser(), adapter.path / name):
        cfg = cand / "config.json"
        if cfg.is_file():
            return _json_or_none(cfg), str(cfg)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(name, "config.json", revision=adapter.config.get("revision") or None)
        except Exception:  # noqa: BLE001 - an invalid repo id or an odd cache: no config to compare
            found = None
        if isinstance(found, str):
            return _json_or_none(Path(found)), found
    return None, None


def _json_or_none(path: Path) -> dict | None:
    from ..findings import FuseError
    from ..io.jsonfile import read_json

    try:
        data = read_json(path, "F205")
    except FuseError:
        return None
    return data if isinstance(data, dict) else None


def _hub_repo(model_dir: Path) -> str | None:
    """``org/name`` of a Hugging Face cache snapshot directory (``models--org--name/snapshots/<sha>``)."""
    parts = Path(os.path.abspath(model_dir)).parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part[len("models--"):].replace("--", "/")
    return None


def _same_name(adapter, base_name: str, base_dir: Path) -> bool:
    name = adapter.config.get("base_model_name_or_path") or ""

    def norm(s: str) -> str:
        return s.strip().removeprefix("hf://").rstrip("/").lower()

    if norm(name) in (norm(base_name), norm(_hub_repo(base_dir) or "\0")):
        return True
    for cand in (Path(name).expanduser(), adapter.path / name):
        try:
            if cand.exists() and cand.resolve() == base_dir.resolve():
                return True
        except OSError:
            pass
    return False


def compare_base(adapter, base, base_name: str, base_revision: str | None, allow_mismatch: bool) -> dict:
    """The adapter's ``base_model_name_or_path`` against the given base, by config fingerprint.

    Configs that differ: F211 error (a warning with ``allow_mismatch``). Same fingerprint,
    other name (a mirror, a ``-bnb-4bit`` variant, a local copy), or a name whose config
    cannot be read offline: a warning that says so. Returns what was compared, and the warnings.
    """
    from ..findings import FuseError

    name = adapter.config.get("base_model_name_or_path")
    cfg_file = adapter.path / "adapter_config.json"
    mine = config_fingerprint(base.config)
    out = {"trained_on": name, "warnings": []}
    if not name:
        return out
    theirs_config, source = trained_on_config(adapter)
    theirs = config_fingerprint(theirs_config) if theirs_config else None
    out["trained_on_config"] = source
    same_name = _same_name(adapter, base_name, base.dir)
    if theirs is not None:
        diff = {k: (theirs[k], mine[k]) for k in theirs.keys() & mine.keys() if theirs[k] != mine[k]}
        out["config_differences"] = {k: {"adapter_base": a, "base": b} for k, (a, b) in sorted(diff.items())}
        if diff:
            text = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in sorted(diff.items()))
            message = f"the adapter was trained on {name}, whose config differs from the base {base_name} ({text})"
            if not allow_mismatch:
                raise FuseError("F211", message, file=cfg_file, key="base_model_name_or_path",
                                fix=f"point base: at {name} (the model the adapter was trained on), or set "
                                    "allow_base_mismatch: true on validate if you know the adapter fits")
            out["warnings"].append({"code": "F211", "file": str(cfg_file), "key": "base_model_name_or_path",
                                    "message": message + "; allowed by allow_base_mismatch",
                                    "fix": f"merge into {name} unless this is intended"})
            return out
    if not same_name:
        if theirs is not None:
            shown = ", ".join(f"{k} {v}" for k, v in sorted(mine.items()))
            message = (f"the adapter names {name} as its base, not {base_name}; their configs match ({shown}): "
                       "a mirror, a local copy or a variant of the same model?")
        else:
            message = (f"the adapter names {name} as its base, not {base_name}, and Fuse cannot read {name}'s "
                       "config offline to compare them; the adapter's tensor shapes fit this base")
        out["warnings"].append({"code": "F211", "file": str(cfg_file), "key": "base_model_name_or_path",
                                "message": message,
                                "fix": f"nothing to do if {base_name} is {name}; otherwise merge into {name}"})
    elif base_revision and _is_sha(adapter.config.get("revision")) and adapter.config["revision"] != base_revision:
        out["warnings"].append({"code": "F211", "file": str(cfg_file), "key": "revision",
                                "message": f"the adapter was trained on {name}@{adapter.config['revision'][:12]}, "
                                           f"the base is revision {base_revision[:12]}",
                                "fix": f"pin base: {name}@{adapter.config['revision']} for an exact match"})
    return out


def _is_sha(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{40}", value) is not None


# --------------------------------------------------------------------------- quantized bases


def check_quantization(base_dir: Path) -> None:
    """F215 for a base quantized by a method whose weights cannot be merged into (GPTQ, AWQ, FP8,
    ...). bitsandbytes checkpoints pass: merge dequantizes them (``stages.peft.quantized``)."""
    from ..findings import FuseError

    config = _json_or_none(base_dir / "config.json") or {}
    quant = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if not quant:
        return
    method = str(quant.get("quant_method", "unknown")) if isinstance(quant, dict) else "unknown"
    if method.lower() in MERGEABLE_QUANTIZATION:
        return
    raise FuseError("F215", f"the base is quantized with {method}: an adapter cannot be folded into its packed "
                    "weights", file=base_dir / "config.json", key="quantization_config",
                    fix="point base: at the float16/bfloat16 model it was quantized from; quantize the merged "
                        "model afterwards (quantize stage)")


# --------------------------------------------------------------------------- vocabulary


def embedding_rows(base) -> int | None:
    """Rows of the base's input embedding (its vocabulary as stored), from the header."""
    from ..peft.plan import EMBEDDINGS, HEAD

    for name in (*EMBEDDINGS, HEAD):
        if name in base:
            return base[name].shape[0]
    return None


def _vocab_dim(key: str, shape: tuple, family) -> tuple[str, int] | None:
    """``(how, vocabulary size)`` an adapter tensor implies, if it belongs to an embedding or head:
    ``how`` is "whole" for a table saved whole (it may resize the vocabulary), "lora" for a
    low-rank factor (it must fit the table)."""
    from ..peft.plan import split_key

    module, _, role = split_key(key, family.SUFFIXES)
    if role == "replace":
        module = module.rsplit(".", 1)[0] if module.endswith((".weight", ".bias")) else module
        if module.split(".")[-1] in VOCAB_MODULES and len(shape) == 2:
            return "whole", shape[0]
        return None
    if module.split(".")[-1] not in VOCAB_MODULES or len(shape) != 2:
        return None
    if role == "emb_A":  # lora_embedding_A [r, vocab]
        return "lora", shape[1]
    if role == "B" and module.split(".")[-1] in ("lm_head", "embed_out"):  # lora_B [vocab, r]
        return "lora", shape[0]
    return None


def check_vocabulary(adapters, base) -> None:
    """F213 when an adapter's vocabulary does not fit the base: a table saved whole with fewer rows
    than the base's (a vocabulary may only grow), or a LoRA factor sized for another vocabulary
    than the table it updates (the base's, or the one a table saved whole resizes it to)."""
    from ..findings import FuseError
    from ..peft import family_for

    rows = embedding_rows(base)
    if rows is None:
        return
    implied = []
    for adapter in adapters:
        family = family_for(adapter.peft_type)
        for key, info in adapter.tensors.items():
            found = _vocab_dim(key, info.shape, family)
            if found:
                implied.append((adapter, key, *found))
    resized = max([n for _, _, how, n in implied if how == "whole"] + [rows])
    for adapter, key, how, vocab in implied:
        if how == "whole" and vocab < rows:
            raise FuseError("F213", f"adapter tensor {key} has {vocab} rows, fewer than the base's {rows}: "
                            "a vocabulary can grow, not shrink", file=adapter.weights_file, key=key,
                            fix="merge the adapter into the model (and tokenizer) it was trained on")
        if how == "lora" and vocab != resized:
            saved = "" if resized == rows else f" (resized to {resized} rows by the adapter)"
            raise FuseError("F213", f"adapter tensor {key} is sized for a vocabulary of {vocab} tokens, but the "
                            f"embedding it updates has {resized} rows{saved}", file=adapter.weights_file, key=key,
                            fix="the adapter was trained after resizing the embeddings: save it with "
                                "save_pretrained(..., save_embedding_layers=True) so the resized tables travel "
                                "with it, or merge into a base resized the same way")


def tokenizer_size(directory: Path) -> tuple[int, Path] | None:
    """(number of token ids, file) of the tokenizer saved in ``directory``, from its JSON files;
    None when it has none that Fuse can read without loading it (e.g. only a sentencepiece model)."""
    from ..io.jsonfile import read_json

    top, source = -1, None
    for fname in TOKENIZER_FILES:
        path = directory / fname
        if not path.is_file():
            continue
        code = "F208" if (directory / "adapter_config.json").exists() else "F205"
        data = read_json(path, code, fix="re-save the tokenizer with save_pretrained")
        ids = []
        if fname == "tokenizer.json" and isinstance(data, dict):
            model = data.get("model")
            vocab = model.get("vocab") if isinstance(model, dict) else None
            if isinstance(vocab, dict):
                ids += [v for v in vocab.values() if isinstance(v, int)]
            elif isinstance(vocab, list):
                ids.append(len(vocab) - 1)
            added = data.get("added_tokens")
            ids += [t["id"] for t in (added if isinstance(added, list) else []) if isinstance(t, dict)
                    and isinstance(t.get("id"), int)]
        elif isinstance(data, dict):  # vocab.json / added_tokens.json: token -> id
            ids += [v for v in data.values() if isinstance(v, int)]
        if ids and max(ids) > top:
            top, source = max(ids), path
    return (top + 1, source) if source else None


def check_tokenizer(plan, adapters) -> dict | None:
    """F213 when the tokenizer that ships with the merged model (the first adapter's, else the
    base's) has token ids past the merged embedding's rows."""
    from ..findings import FuseError
    from ..peft.plan import EMBEDDINGS, HEAD

    table = next((n for n in (*EMBEDDINGS, HEAD) if n in plan.outputs), None)
    rows = plan.shape(table)[0] if table else None
    for directory in [a.path for a in adapters] + [plan.base.dir]:
        found = tokenizer_size(directory)
        if found is None:
            continue
        size, path = found
        if rows is not None and size > rows:
            raise FuseError("F213", f"{path.name} has {size} tokens, but the merged model's embedding has {rows} "
                            f"rows: token ids {rows} and above have no embedding", file=path,
                            fix="resize the embeddings when training and save them with the adapter "
                                "(save_embedding_layers=True), or ship the base's tokenizer")
        return {"file": str(path), "tokens": size, "embedding_rows": rows}
    return None


# --------------------------------------------------------------------------- adapter config


def _target_matches(targets, module: str) -> bool:
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def check_adapter_config(adapter) -> list[dict]:
    """F214 warnings: adapter weights for modules that ``target_modules`` does not name, and
    rank/alpha patterns that match no module (config and weights from different runs?)."""
    from ..peft import family_for
    from ..peft.plan import get_pattern_key, split_key

    family = family_for(adapter.peft_type)
    modules = sorted({split_key(k, family.SUFFIXES)[0] for k in adapter.tensors
                      if split_key(k, family.SUFFIXES)[2] != "replace"})
    out = []
    where = {"file": str(adapter.path / "adapter_config.json")}
    targets = adapter.config.get("target_modules")
    if targets and isinstance(targets, (str, list)):
        stray = [m for m in modules if not _target_matches(targets, m)]
        if stray:
            out.append(dict(where, code="F214", key="target_modules",
                            message=f"the adapter holds weights for {stray[0]}"
                                    + (f" (and {len(stray) - 1} more modules)" if len(stray) > 1 else "")
                                    + f", which target_modules {targets} does not name",
                            fix="use the adapter_config.json saved with these weights"))
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = adapter.config.get(key) or {}
        unused = [p for p in pattern if not any(get_pattern_key([p], m) == p for m in modules)]
        if unused:
            out.append(dict(where, code="F214", key=f"{key}.{unused[0]}",
                            message=f"{key} entry {unused[0]!r} matches no module of the adapter",
                            fix=f"check the {key} keys against the module names (a typo?)"))
    return out
