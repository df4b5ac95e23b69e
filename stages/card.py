"""The model card (``README.md``) and provenance file that travel with a published model.

Both are rendered from the provenance dict alone, which holds no timestamps or run ids:
the same inputs and parameters give byte-identical files, so a re-publish of an
unchanged model changes nothing. Later stages add sections through ``sections``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

PROVENANCE = "fuse-provenance.json"
SUMS = "SHA256SUMS"


def provenance_bytes(prov: dict) -> bytes:
    return (json.dumps(prov, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def sha256sums(files: dict[str, str]) -> bytes:
    """``sha256sum -c`` format, sorted by path."""
    return "".join(f"{sha}  {path}\n" for path, sha in sorted(files.items())).encode()


def base_card_metadata(model_dir: Path) -> dict:
    """The YAML front matter of the base's own README.md, if it has one (license, language...)."""
    readme = Path(model_dir) / "README.md"
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    m = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.S)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def relation(prov: dict) -> str:
    """Hub ``base_model_relation``: one adapter folded in is a finetune; several combined is a merge."""
    if prov.get("quantization"):
        return "quantized"
    return "merge" if len(prov.get("adapters", [])) > 1 else "finetune"


def render_card(prov: dict, base_meta: dict | None = None, sections: list[tuple[str, str]] = ()) -> str:
    base_meta = base_meta or {}
    meta = {
        "base_model": prov["base"].get("hub_id") or prov["base"]["name"],
        "base_model_relation": relation(prov),
        "library_name": "transformers",
        "tags": ["fuse", "merged-adapter"] + sorted({a.get("peft_type", "").lower() for a in prov["adapters"]} - {""}),
    }
    for key in ("license", "license_name", "license_link", "language", "pipeline_tag"):
        if key in base_meta:
            meta[key] = base_meta[key]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()
    lines = [f"---\n{front}\n---", "", f"# {prov['name']}", "",
             f"`{meta['base_model']}` with {_adapters_phrase(prov)} merged into its weights by "
             f"[Fuse](https://pypi.org/project/fuse-llm/) {prov['tool']['version']}. "
             "It is a standalone model: no adapter code is needed to load it.", ""]
    lines += ["## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{prov["name"]}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{prov["name"]}")', "```", ""]
    lines += ["## Lineage", "", "| | |", "|---|---|",
              f"| base | `{prov['base']['name']}`"
              + (f" @ `{prov['base']['revision']}`" if prov["base"].get("revision") else "") + " |",
              f"| base digest | `{prov['base']['digest']}` |"]
    for a in prov["adapters"]:
        lines.append(f"| adapter `{a['name']}` ({a.get('peft_type', '?')}, weight {a['weight']}) | `{a['digest']}` |")
    lines += [f"| Fuse | {prov['tool']['version']} |"]
    for lib, ver in sorted(prov.get("libraries", {}).items()):
        lines.append(f"| {lib} | {ver} |")
    lines += ["", "## Steps", ""]
    for step in prov["steps"]:
        params = ", ".join(f"{k}={v}" for k, v in sorted(step["params"].items()))
        lines.append(f"- `{step['id']}` ({step['stage']} v{step['version']})" + (f": {params}" if params else ""))
        for k, v in sorted((step.get("metrics") or {}).items()):
            lines.append(f"  - {k}: {v}")
    for title, body in sections:
        lines += ["", f"## {title}", "", body.rstrip()]
    lines += ["", "## Files", "", f"Every file's sha256 is in `{SUMS}` (check with `sha256sum -c {SUMS}`); "
              f"`{PROVENANCE}` holds the full lineage.", ""]
    return "\n".join(lines)


def _adapters_phrase(prov: dict) -> str:
    n = len(prov["adapters"])
    if n == 1:
        return f"the adapter `{prov['adapters'][0]['name']}`"
    return f"{n} adapters"
