"""The model card (``README.md``) and provenance file that travel with a published model.

Both are rendered from the provenance dict alone, which holds no timestamps, run ids or
local paths: the same inputs and parameters give byte-identical files in any checkout, so
a re-publish of an unchanged model changes nothing.

Each card describes its own artifact (the merged model, a GPTQ/AWQ checkpoint, an ONNX
export): its title, a usage snippet that loads that artifact (tested: the snippet runs), and
the numbers of the gates that measured *it* (``check`` for the merged model, the quantize or
export gate for what they produced), each number next to its bound or marked informational.

The card's YAML front matter is Hub metadata (``base_model``, ``base_model_relation``,
``library_name``, ``license`` carried from the base, ``tags``...) in the key order of
``huggingface_hub.ModelCardData``, so ``ModelCard`` parses and re-serializes it unchanged.
``base_model`` is only ever a Hub id: a base Fuse read from a local path is named by its
digest in the body instead. A user template (``card:`` in the publish step) can add
metadata and replace or add sections: see :func:`parse_template`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

PROVENANCE = "fuse-provenance.json"
SUMS = "SHA256SUMS"
# ModelCardData's own attribute order: what ModelCard.content writes back
META_ORDER = ("base_model", "datasets", "language", "library_name", "license", "license_name", "license_link",
              "metrics", "model_name", "pipeline_tag", "tags", "base_model_relation")
CARRIED_FROM_BASE = ("license", "license_name", "license_link", "language", "pipeline_tag")
_FRONT = re.compile(r"^---\s*\n(.*?)\n---\s*(?:\n|$)", re.S)

# How a base/adapter digest is computed (stages.manifest.tree_digest) and a shell line that
# recomputes it; tests/test_publish_card.py runs this line against tree_digest.
DIGEST_COMMAND = (r"""find -L . -type f | sed 's|^\./||' | LC_ALL=C sort | tr '\n' '\0' | xargs -0 sha256sum | """
                  r"""awk 'BEGIN{printf "["} {printf "%s[\"%s\",\"%s\"]", (NR>1?",":""), substr($0,67), $1} """
                  r"""END{printf "]"}' | sha256sum""")
# what each gate number measures, for the reader of the card
MEASURES = {
    "probe_worst_ratio": "worst merged tensor's probe error over its rounding bound (<= 1: every tensor is "
                         "base + adapter up to one rounding)",
    "max_abs_diff": "largest absolute difference of any logit",
    "decode_max_abs_diff": "the same, at each step of greedy decoding through the graph's KV cache",
    "kl_mean": "mean KL divergence of the next-token distributions (nats)",
    "top1_agreement": "share of positions whose most likely next token is the same",
    "ppl_ratio": "perplexity on the evaluation text, this model / the reference",
    "greedy_agreement": "share of greedily decoded tokens that match before the first difference (one early "
                        "difference changes the rest of a continuation)",
}


def provenance_bytes(prov: dict) -> bytes:
    return (json.dumps(prov, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def sha256sums(files: dict[str, str]) -> bytes:
    """``sha256sum -c`` format, sorted by path."""
    return "".join(f"{sha}  {path}\n" for path, sha in sorted(files.items())).encode()


def split_front_matter(text: str) -> tuple[dict, str]:
    """(YAML front matter as a dict, the rest of the text). Bad or missing YAML: ({}, text)."""
    m = _FRONT.match(text)
    if not m:
        return {}, text
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}, text
    return (data if isinstance(data, dict) else {}), text[m.end():]


def base_card_metadata(model_dir: Path) -> dict:
    """The YAML front matter of the base's own README.md, if it has one (license, language...)."""
    readme = Path(model_dir) / "README.md"
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    return split_front_matter(text)[0]


def hub_id(value, *local_roots: Path) -> str | None:
    """``value`` when it is a Hub repo id (``org/name`` or a canonical ``name``) and no local path;
    None for an absolute or relative path (one that exists under any of ``local_roots``)."""
    if not isinstance(value, str) or not value or value.startswith((".", "~")) or "\\" in value:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    if any((Path(root) / value).exists() for root in local_roots):
        return None
    return value


# --------------------------------------------------------------------------- what was published


def _step(prov: dict, stage: str) -> dict | None:
    return next((s for s in reversed(prov.get("steps", [])) if s["stage"] == stage), None)


def artifact_kind(prov: dict) -> str:
    """What was published: ``onnx``, ``quantized`` or ``hf-model`` (a full-precision HF model)."""
    stages = [s["stage"] for s in prov.get("steps", [])]
    if "export" in stages:
        return "onnx"
    if "quantize" in stages or prov.get("quantization"):
        return "quantized"
    return "hf-model"


def artifact_label(prov: dict) -> str:
    """``merged model``, ``GPTQ 8-bit``, ``AWQ 4-bit``, ``ONNX (float32)``, ``ONNX (int4)``..."""
    kind = artifact_kind(prov)
    if kind == "onnx":
        return f"ONNX ({_onnx_variant(prov)})"
    if kind == "quantized":
        p = (_step(prov, "quantize") or {}).get("params", {})
        return f"{str(p.get('method', 'gptq')).upper()} {p.get('bits', 4)}-bit"
    return "merged model"


def _onnx_variant(prov: dict) -> str:
    p = _step(prov, "export")["params"]
    return p.get("quantize") if p.get("quantize") not in (None, "none") else p.get("dtype") or "float32"


def relation(prov: dict) -> str:
    """Hub ``base_model_relation``: one adapter folded in is a finetune; several combined is a
    merge; a quantized artifact is ``quantized``."""
    if artifact_kind(prov) == "quantized":
        return "quantized"
    return "merge" if len(prov.get("adapters", [])) > 1 else "finetune"


def card_metadata(prov: dict, base_meta: dict | None = None, extra: dict | None = None) -> dict:
    """The card's front matter, in ModelCardData's key order. ``extra`` (a template's front
    matter) overrides keys, except ``tags``, which it extends. ``base_model`` only when the
    base is known by a Hub id."""
    base_meta = base_meta or {}
    kind = artifact_kind(prov)
    tags = ["fuse", "merged-adapter"] + sorted({a.get("peft_type", "").lower() for a in prov["adapters"]} - {""})
    for s in prov.get("steps", []):
        if s["stage"] == "quantize" and s["params"].get("method"):
            tags.append(str(s["params"]["method"]).lower())
    if kind == "onnx":
        tags.append("onnx")
    meta = {
        "library_name": "onnx" if kind == "onnx" else "transformers",
        "tags": tags,
        "base_model_relation": relation(prov),
    }
    if prov["base"].get("hub_id"):
        meta["base_model"] = prov["base"]["hub_id"]
    for key in CARRIED_FROM_BASE:
        if base_meta.get(key) is not None:
            meta[key] = base_meta[key]
    for key, value in (extra or {}).items():
        if key == "tags":
            more = value if isinstance(value, list) else [value]
            meta["tags"] = meta["tags"] + [t for t in more if t not in meta["tags"]]
        else:
            meta[key] = value
    meta["tags"] = list(dict.fromkeys(meta["tags"]))  # unique, first occurrence wins (as ModelCardData does)
    ordered = {k: meta[k] for k in META_ORDER if k in meta}
    ordered.update({k: v for k, v in meta.items() if k not in ordered})
    return ordered


def parse_template(text: str) -> dict:
    """A user card template: Markdown with optional YAML front matter.

    - front matter keys are added to the card's metadata (they win over Fuse's, except
      ``tags``, which are added to Fuse's);
    - a ``# Title`` line replaces the title, the text before the first ``## `` the intro;
    - each ``## Section`` replaces Fuse's section of the same title (Usage, Lineage, How it
      was made, Checks, Files) or is added before Files.
    """
    meta, body = split_front_matter(text)
    title, intro, sections, current = None, [], [], None
    for line in body.splitlines():
        if line.startswith("# ") and title is None and current is None and not "".join(intro).strip():
            title = line[2:].strip()
        elif line.startswith("## "):
            current = [line[3:].strip(), []]
            sections.append(current)
        elif current is None:
            intro.append(line)
        else:
            current[1].append(line)
    return {"meta": meta, "title": title, "intro": "\n".join(intro).strip(),
            "sections": [(t, "\n".join(b).strip()) for t, b in sections]}


def render_card(prov: dict, base_meta: dict | None = None, sections: list[tuple[str, str]] = (), *,
                model_id: str | None = None, target: str = "hub", template: dict | None = None) -> str:
    """The whole README.md. ``model_id``: what the usage snippets load — the Hub repo id
    (``target="hub"``), the published directory relative to the pipeline file (``"dir"``), a
    local copy's directory name (``"s3"``); default: the pipeline's name. ``template``: from
    :func:`parse_template`."""
    template = template or {"meta": {}, "title": None, "intro": "", "sections": []}
    meta = card_metadata(prov, base_meta, template["meta"])
    model_id = model_id or prov["name"]
    front = yaml.dump(meta, sort_keys=False, allow_unicode=True).strip()
    intro = template["intro"] or _intro(prov)
    body = [("Usage", _usage(prov, model_id, target)), ("Lineage", _lineage(prov)),
            ("How it was made", _steps(prov))]
    if prov.get("checks"):
        body.append(("Checks", _checks(prov)))
    body += list(sections)
    files = ("Files", f"Every file's sha256 is in `{SUMS}` (check with `sha256sum -c {SUMS}`); "
                      f"`{PROVENANCE}` holds the full lineage.")
    titles = [t for t, _ in body]
    for title, text in template["sections"]:
        if title == "Files":
            files = (title, text)
        elif title in titles:
            body[titles.index(title)] = (title, text)
        else:
            body.append((title, text))
            titles.append(title)
    body.append(files)
    title = template["title"] or f"{prov['name']} ({artifact_label(prov)})"
    lines = [f"---\n{front}\n---", "", f"# {title}", "", intro.rstrip(), ""]
    for title, text in body:
        lines += [f"## {title}", "", text.rstrip(), ""]
    return "\n".join(lines)


def _base_phrase(prov: dict) -> str:
    base = prov["base"]
    if base.get("hub_id"):
        return f"`{base['hub_id']}`"
    return f"A local base model `{base['name']}` (digest `{base['digest']}`, see Lineage)"


def _intro(prov: dict) -> str:
    kind = artifact_kind(prov)
    made = (f"{_base_phrase(prov)} with {_adapters_phrase(prov)} merged into its weights by Fuse "
            f"(`fuse-llm` {prov['tool']['version']})")
    if kind == "quantized":
        p = (_step(prov, "quantize") or {}).get("params", {})
        return (made + f", then quantized with {str(p.get('method', 'gptq')).upper()} to {p.get('bits')} bits "
                f"(group size {p.get('group_size')}). It loads with transformers when `gptqmodel` is installed; "
                "no adapter code is needed.")
    if kind == "onnx":
        p = _step(prov, "export")["params"]
        cache = "with KV-cache inputs and outputs" if p.get("with_past", True) else "without KV cache"
        return (made + f", then exported to ONNX ({_onnx_variant(prov)}, {cache}) for ONNX Runtime. "
                "The directory holds the graph and the tokenizer: no PyTorch is needed to run it.")
    return made + ". It is a standalone model: no adapter code is needed to load it."


# --------------------------------------------------------------------------- usage


def _chat_input(model: dict, indent: str = "") -> list[str]:
    """Lines that set ``ids`` (a list of token ids) for a prompt, the way this model's tokenizer wants."""
    if model.get("chat_template"):
        return [f'{indent}messages = [{{"role": "user", "content": "What is the capital of France?"}}]',
                f"{indent}ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
                'return_dict=True)["input_ids"]']
    if model.get("tokenizer"):
        return [f'{indent}ids = tokenizer("The capital of France is")["input_ids"]']
    return [f"{indent}ids = [1, 2, 3]  # token ids: this model ships no tokenizer"]


def _where(target: str) -> str:
    """A comment saying what ``path`` in a snippet is."""
    if target == "dir":
        return "the directory this model was published to, relative to the pipeline file"
    if target == "s3":
        return "a local copy of this model's files from the S3 store"
    return "its Hub repository"


def _usage(prov: dict, model_id: str, target: str) -> str:
    kind = artifact_kind(prov)
    model = prov.get("model") or {}
    archs = model.get("architectures") or []
    causal = any(a.endswith(("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")) for a in archs) or not archs
    if kind == "onnx":
        return _usage_onnx(prov, model_id, target)
    what = _where(target)
    auto = "AutoModelForCausalLM" if causal else "AutoModel"
    out = []
    if kind == "quantized":
        out += ["With [transformers](https://github.com/huggingface/transformers) and the quantizer's kernels "
                "(`pip install gptqmodel optimum`). The checkpoint is made for GPUs (vLLM, SGLang, transformers on "
                "CUDA). On CPU, GPTQModel's kernel unpacks every layer's weights at each forward: several times "
                "slower than the merged model, and slower still in bfloat16 (with torch.compile recompiling per "
                "shape), so the snippet loads it in float32 there; for CPU inference the merged model or an ONNX "
                "export serves better.", "", "```python", "import torch"]
    else:
        out += ["With [transformers](https://github.com/huggingface/transformers):", "", "```python"]
        if causal:
            out.append("import torch")
    out += [f"from transformers import {auto}" + (", AutoTokenizer" if model.get("tokenizer") else ""), "",
            f'# "{model_id}": {what}']
    if model.get("tokenizer"):
        out.append(f'tokenizer = AutoTokenizer.from_pretrained("{model_id}")')
    if kind == "quantized":
        out += ['device = "cuda" if torch.cuda.is_available() else "cpu"',
                f'model = {auto}.from_pretrained("{model_id}", device_map=device, '
                'dtype=torch.float32 if device == "cpu" else "auto")']
    else:
        out.append(f'model = {auto}.from_pretrained("{model_id}")')
    if causal:
        out += _chat_input(model)
        out += ["inputs = torch.tensor([ids], device=model.device)",
                "output = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=24, "
                "do_sample=False)"]
        out.append("print(tokenizer.decode(output[0, len(ids):], skip_special_tokens=True))"
                   if model.get("tokenizer") else "print(output[0, len(ids):].tolist())")
    elif model.get("tokenizer"):
        out += ['outputs = model(**tokenizer("Hello", return_tensors="pt"))', "print(outputs.last_hidden_state.shape)"]
    out += ["```"]
    if causal:
        out += ["", "With [vLLM](https://github.com/vllm-project/vllm):", "", "```bash", f"vllm serve {model_id}",
                "```"]
    return "\n".join(out)


def _usage_onnx(prov: dict, model_id: str, target: str) -> str:
    """ONNX Runtime and the tokenizer, greedy decoding through the graph's KV cache (Optimum's
    ORTModelForCausalLM does not run with the pinned packages: optimum-onnx needs transformers < 4.58)."""
    model = prov.get("model") or {}
    with_past = _step(prov, "export")["params"].get("with_past", True)
    what = _where(target)
    out = ["With [ONNX Runtime](https://onnxruntime.ai/) (`pip install onnxruntime transformers`; transformers "
           "only reads the tokenizer), greedy decoding" + (" through the graph's KV cache:" if with_past else ":"),
           "", "```python", "import numpy as np", "import onnxruntime as ort"]
    if model.get("tokenizer"):
        out.append("from transformers import AutoTokenizer")
    out.append("")
    if target == "hub":
        out += ["from huggingface_hub import snapshot_download", "",
                f'path = snapshot_download("{model_id}")  # its Hub repository']
    else:
        out.append(f'path = "{model_id}"  # {what}')
    if model.get("tokenizer"):
        out.append("tokenizer = AutoTokenizer.from_pretrained(path)")
    out += ['session = ort.InferenceSession(f"{path}/model.onnx", providers=["CPUExecutionProvider"])']
    out += _chat_input(model)
    eos = "tokenizer.eos_token_id" if model.get("tokenizer") else "None"
    if with_past:
        out += ['past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]',
                "past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]),",
                '                         dtype=np.float16 if i.type == "tensor(float16)" else np.float32)',
                "        for i in past_inputs}",
                "tokens, step = list(ids), list(ids)",
                "for _ in range(24):",
                "    n = len(tokens)",
                '    feed = {"input_ids": np.array([step], dtype=np.int64),',
                '            "attention_mask": np.ones((1, n), dtype=np.int64),',
                '            "position_ids": np.arange(n - len(step), n, dtype=np.int64)[None], **past}',
                "    logits, *present = session.run(None, feed)",
                "    next_id = int(logits[0, -1].argmax())",
                f"    if next_id == {eos}:",
                "        break",
                "    tokens.append(next_id)",
                "    past = dict(zip((i.name for i in past_inputs), present))",
                "    step = [next_id]"]
    else:
        out += ["tokens = list(ids)",
                "for _ in range(24):",
                "    n = len(tokens)",
                '    feed = {"input_ids": np.array([tokens], dtype=np.int64),',
                '            "attention_mask": np.ones((1, n), dtype=np.int64),',
                '            "position_ids": np.arange(n, dtype=np.int64)[None]}',
                "    logits = session.run(None, feed)[0]",
                "    next_id = int(logits[0, -1].argmax())",
                f"    if next_id == {eos}:",
                "        break",
                "    tokens.append(next_id)"]
    out.append("print(tokenizer.decode(tokens[len(ids):], skip_special_tokens=True))" if model.get("tokenizer")
               else "print(tokens[len(ids):])")
    out += ["```", "",
            "The graph's inputs are `input_ids`, `attention_mask`, `position_ids`"
            + (" and `past_key_values.{i}.key` / `.value`; its outputs `logits` and `present.{i}.key` / `.value`"
               if with_past else "; its output `logits`") + " (Optimum's layout)."]
    return "\n".join(out)


# --------------------------------------------------------------------------- lineage, steps, checks


def _lineage(prov: dict) -> str:
    base = prov["base"]
    name = base.get("hub_id") or base["name"]
    lines = ["| | |", "|---|---|",
             f"| base | `{name}`" + (f" @ `{base['revision']}`" if base.get("revision") else "")
             + ("" if base.get("hub_id") else " (read from a local path, not a Hub id)") + " |",
             f"| base digest | `{base['digest']}` |"]
    for a in prov["adapters"]:
        lines.append(f"| adapter `{a['name']}` ({a.get('peft_type') or '?'}, weight {a['weight']}) | `{a['digest']}` |")
    lines.append(f"| Fuse (`fuse-llm`) | {prov['tool']['version']} |")
    if prov.get("pipeline"):
        lines.append(f"| pipeline `{prov['pipeline']['name']}` | `{prov['pipeline']['digest']}` |")
    for lib, ver in sorted(prov.get("libraries", {}).items()):
        lines.append(f"| {lib} | {ver} |")
    lines += ["", "The base and adapter digests are not the sha256 of one file: each is `sha256:` + the sha256 of "
              "one line of compact JSON, the list of `[path, sha256]` pairs of every file Fuse read, sorted by path "
              "(paths relative to the model or adapter directory; a single-file base such as a GGUF is listed "
              'by its file name): `[["config.json","<sha256>"],["model.safetensors","<sha256>"]]`. Recompute one '
              "in the directory (GNU coreutils; file names without quotes, backslashes or newlines):", "",
              "```bash", DIGEST_COMMAND, "```", "",
              "For a single file, put `echo <file name>` in place of the `find ... | sort` part. The pipeline "
              "digest covers the pipeline's name, steps, parameters and adapter weights."]
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _steps(prov: dict) -> str:
    lines = []
    for step in prov["steps"]:
        params = ", ".join(f"{k}={v}" for k, v in sorted(step["params"].items()) if v is not None)
        lines.append(f"- `{step['id']}` ({step['stage']} v{step['version']})" + (f": {params}" if params else ""))
        for k, v in sorted((step.get("metrics") or {}).items()):
            lines.append(f"  - {k}: {_fmt(v)}")
    return "\n".join(lines)


def gate_numbers(metrics: dict, thresholds: dict, names) -> list[dict]:
    """``[{"name", "value", "bound"}]`` for each of ``names`` in ``metrics``; ``bound`` is ``"<= 0.02"``
    / ``">= 0.85"`` for a gated number, None for an informational one. ``thresholds`` are a gate's
    threshold parameters (``max_kl``...); ``probe_worst_ratio`` is bounded by 1 (check's probe test)."""
    from .metrics import bound

    return [{"name": name, "value": metrics[name],
             "bound": "<= 1" if name == "probe_worst_ratio" else bound(name, thresholds)}
            for name in names if name in metrics]


def _checks(prov: dict) -> str:
    lines = ["Numbers measured on this artifact by the gates that verify it. A gated number outside its bound "
             "fails the run (nothing is published); an informational one is measured and recorded, not gated.", ""]
    for check in prov["checks"]:
        lines.append(f"**`{check['id']}`** ({check['stage']} v{check['version']}): {check.get('what', '')}".rstrip())
        lines += ["", "| measure | value | bound | |", "|---|---|---|---|"]
        for row in check["numbers"]:
            lines.append(f"| {row['name']} | {_fmt(row['value'])} | {row['bound'] or 'informational'} | "
                         f"{MEASURES.get(row['name'].removeprefix('logits_'), '')} |")
        for note in check.get("notes", []):
            lines += ["", note]
        lines.append("")
    return "\n".join(lines).rstrip()


def _adapters_phrase(prov: dict) -> str:
    n = len(prov["adapters"])
    if n == 1:
        return f"the adapter `{prov['adapters'][0]['name']}`"
    return f"{n} adapters"
