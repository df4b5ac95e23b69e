"""The model card (``README.md``) and provenance file that travel with a published model.

Both are rendered from the provenance dict alone, which holds no timestamps or run ids:
the same inputs and parameters give byte-identical files, so a re-publish of an
unchanged model changes nothing.

The card's YAML front matter is Hub metadata (``base_model``, ``base_model_relation``,
``library_name``, ``license`` carried from the base, ``tags``...) in the key order of
``huggingface_hub.ModelCardData``, so ``ModelCard`` parses and re-serializes it unchanged.
A user template (``card:`` in the publish step) can add metadata and replace or add
sections: see :func:`parse_template`.
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


def artifact_kind(prov: dict) -> str:
    """What was published: ``onnx``, ``quantized`` or ``hf-model`` (a full-precision HF model)."""
    stages = [s["stage"] for s in prov.get("steps", [])]
    if "export" in stages:
        return "onnx"
    if "quantize" in stages or prov.get("quantization"):
        return "quantized"
    return "hf-model"


def relation(prov: dict) -> str:
    """Hub ``base_model_relation``: one adapter folded in is a finetune; several combined is a
    merge; a quantized artifact is ``quantized``."""
    if artifact_kind(prov) == "quantized":
        return "quantized"
    return "merge" if len(prov.get("adapters", [])) > 1 else "finetune"


def card_metadata(prov: dict, base_meta: dict | None = None, extra: dict | None = None) -> dict:
    """The card's front matter, in ModelCardData's key order. ``extra`` (a template's front
    matter) overrides keys, except ``tags``, which it extends."""
    base_meta = base_meta or {}
    kind = artifact_kind(prov)
    tags = ["fuse", "merged-adapter"] + sorted({a.get("peft_type", "").lower() for a in prov["adapters"]} - {""})
    for s in prov.get("steps", []):
        if s["stage"] == "quantize" and s["params"].get("method"):
            tags.append(str(s["params"]["method"]).lower())
    if kind == "onnx":
        tags.append("onnx")
    meta = {
        "base_model": prov["base"].get("hub_id") or prov["base"]["name"],
        "library_name": "onnx" if kind == "onnx" else "transformers",
        "tags": tags,
        "base_model_relation": relation(prov),
    }
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
                model_id: str | None = None, template: dict | None = None) -> str:
    """The whole README.md. ``model_id``: the id the usage snippets load (the Hub repo id
    when publishing to the Hub, else the pipeline's name). ``template``: from :func:`parse_template`."""
    template = template or {"meta": {}, "title": None, "intro": "", "sections": []}
    meta = card_metadata(prov, base_meta, template["meta"])
    model_id = model_id or prov["name"]
    front = yaml.dump(meta, sort_keys=False, allow_unicode=True).strip()
    intro = template["intro"] or (
        f"`{meta['base_model']}` with {_adapters_phrase(prov)} merged into its weights by "
        f"[Fuse](https://pypi.org/project/fuse-llm/) {prov['tool']['version']}. "
        "It is a standalone model: no adapter code is needed to load it.")
    body = [("Usage", _usage(prov, model_id)), ("Lineage", _lineage(prov)), ("How it was made", _steps(prov))]
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
    lines = [f"---\n{front}\n---", "", f"# {template['title'] or prov['name']}", "", intro.rstrip(), ""]
    for title, text in body:
        lines += [f"## {title}", "", text.rstrip(), ""]
    return "\n".join(lines)


def _usage(prov: dict, model_id: str) -> str:
    kind = artifact_kind(prov)
    archs = (prov.get("model") or {}).get("architectures") or []
    causal = any(a.endswith(("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")) for a in archs) or not archs
    if kind == "onnx":
        return "\n".join([
            "With [onnxruntime](https://onnxruntime.ai/):", "", "```python", "import onnxruntime as ort", "",
            'session = ort.InferenceSession("model.onnx")  # from a download of this repository',
            "print([i.name for i in session.get_inputs()])", "```", "",
            "or through Optimum:", "", "```python", "from optimum.onnxruntime import ORTModelForCausalLM", "",
            f'model = ORTModelForCausalLM.from_pretrained("{model_id}")', "```"])
    auto = "AutoModelForCausalLM" if causal else "AutoModel"
    out = ["With [transformers](https://github.com/huggingface/transformers):", "", "```python",
           f"from transformers import {auto}, AutoTokenizer", "",
           f'model = {auto}.from_pretrained("{model_id}")',
           f'tokenizer = AutoTokenizer.from_pretrained("{model_id}")']
    if causal:
        out += ['inputs = tokenizer("Hello", return_tensors="pt")',
                "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))"]
    out += ["```"]
    if kind == "quantized":
        out[0] = "With [transformers](https://github.com/huggingface/transformers) (and the quantizer's kernels " \
                 "installed, e.g. `gptqmodel`):"
    if causal:
        out += ["", "With [vLLM](https://github.com/vllm-project/vllm):", "", "```bash", f"vllm serve {model_id}", "```"]
    return "\n".join(out)


def _lineage(prov: dict) -> str:
    base = prov["base"]
    lines = ["| | |", "|---|---|",
             f"| base | `{base['name']}`" + (f" @ `{base['revision']}`" if base.get("revision") else "") + " |",
             f"| base digest | `{base['digest']}` |"]
    for a in prov["adapters"]:
        lines.append(f"| adapter `{a['name']}` ({a.get('peft_type') or '?'}, weight {a['weight']}) | `{a['digest']}` |")
    lines.append(f"| Fuse | {prov['tool']['version']} |")
    if prov.get("pipeline"):
        lines.append(f"| pipeline `{prov['pipeline']['name']}` | `{prov['pipeline']['digest']}` |")
    for lib, ver in sorted(prov.get("libraries", {}).items()):
        lines.append(f"| {lib} | {ver} |")
    return "\n".join(lines)


def _steps(prov: dict) -> str:
    lines = []
    for step in prov["steps"]:
        params = ", ".join(f"{k}={v}" for k, v in sorted(step["params"].items()))
        lines.append(f"- `{step['id']}` ({step['stage']} v{step['version']})" + (f": {params}" if params else ""))
        for k, v in sorted((step.get("metrics") or {}).items()):
            lines.append(f"  - {k}: {v}")
    return "\n".join(lines)


def _checks(prov: dict) -> str:
    lines = ["| step | measure | value |", "|---|---|---|"]
    for check in prov["checks"]:
        for k, v in sorted(check["metrics"].items()):
            lines.append(f"| `{check['id']}` ({check['stage']}) | {k} | {v} |")
    return "\n".join(lines)


def _adapters_phrase(prov: dict) -> str:
    n = len(prov["adapters"])
    if n == 1:
        return f"the adapter `{prov['adapters'][0]['name']}`"
    return f"{n} adapters"
