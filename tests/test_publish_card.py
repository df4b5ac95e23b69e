"""The model card: Hub metadata that huggingface_hub's ModelCard/ModelCardData parse back intact,
relation and library by artifact, license carried from the base, user templates.

Pure rendering: no model, no server (``ModelCard.validate()`` would call the Hub, so the
round trip through the parser is the offline check).
"""
from __future__ import annotations

import copy
import re

import pytest

from stages import card

PROV = {
    "name": "support-bot",
    "tool": {"name": "fuse-llm", "version": "0.1.0"},
    "base": {"kind": "hub", "name": "HuggingFaceTB/SmolLM2-135M", "hub_id": "HuggingFaceTB/SmolLM2-135M",
             "revision": "93efa2f097d58c2a74874c7e644dbc9b0cee75a2", "digest": "sha256:" + "ab" * 32},
    "adapters": [{"name": "lora", "digest": "sha256:" + "cd" * 32, "weight": 1.0, "peft_type": "LORA",
                  "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M"}],
    "steps": [{"id": "merge", "stage": "merge", "version": 1, "params": {"dtype": "bfloat16"},
               "metrics": {"tensors_merged": 60, "tensors_copied": 12}}],
    "checks": [{"id": "check", "stage": "check", "version": 1, "what": "the merged model against base + adapter.",
                "numbers": [{"name": "logits_max_abs_diff", "value": 0.0123, "bound": "<= 0.01"},
                            {"name": "logits_greedy_agreement", "value": 0.46, "bound": None}], "notes": []}],
    "libraries": {"torch": "2.13.0", "peft": "0.21.2"},
    "pipeline": {"name": "support-bot", "digest": "sha256:" + "ef" * 32},
    "model": {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
}
BASE_META = {"license": "apache-2.0", "language": ["en"], "pipeline_tag": "text-generation",
             "datasets": ["their/pretraining-data"], "tags": ["base-only-tag"]}


def parse(text):
    from huggingface_hub import ModelCard

    return ModelCard(text)


def test_card_round_trips_through_huggingface_hub_with_every_field_intact():
    from huggingface_hub import ModelCardData

    text = card.render_card(PROV, BASE_META, model_id="acme/support-bot")
    meta = card.card_metadata(PROV, BASE_META)
    parsed = parse(text)
    assert parsed.data.to_dict() == meta  # every front-matter field, values and types
    assert meta == {"base_model": "HuggingFaceTB/SmolLM2-135M", "language": ["en"], "library_name": "transformers",
                    "license": "apache-2.0", "pipeline_tag": "text-generation",
                    "tags": ["fuse", "merged-adapter", "lora"], "base_model_relation": "finetune"}
    assert ModelCardData(**meta).to_dict() == meta
    assert str(parsed) == text  # re-serialized byte for byte: same key order, same YAML style
    assert text.endswith(parsed.text) and parsed.text.startswith("\n# support-bot (merged model)\n")
    for needle in ("93efa2f097d58c2a74874c7e644dbc9b0cee75a2", "sha256:" + "cd" * 32, "| Fuse (`fuse-llm`) | 0.1.0 |",
                   "sha256:" + "ef" * 32, "| logits_max_abs_diff | 0.0123 | <= 0.01 |",
                   "| logits_greedy_agreement | 0.46 | informational |", "tensors_merged: 60",
                   '# "acme/support-bot": its Hub repository', 'AutoModelForCausalLM.from_pretrained("acme/support-bot")',
                   "vllm serve acme/support-bot", "sha256sum -c SHA256SUMS"):
        assert needle in parsed.text, needle
    assert "pypi.org" not in text  # fuse-llm is not on PyPI: no link to a page that does not exist
    # deterministic: same provenance, same bytes
    assert card.render_card(copy.deepcopy(PROV), dict(BASE_META), model_id="acme/support-bot") == text


def test_base_metadata_that_is_not_about_this_model_is_not_carried():
    meta = card.card_metadata(PROV, BASE_META)
    assert "datasets" not in meta and "base-only-tag" not in meta["tags"]
    assert "license" not in card.card_metadata(PROV, {})  # no license invented


@pytest.mark.parametrize("change, relation, library, tag", [
    ({}, "finetune", "transformers", "lora"),
    ({"adapters": PROV["adapters"] * 2}, "merge", "transformers", "lora"),
    ({"steps": PROV["steps"] + [{"id": "quantize", "stage": "quantize", "version": 1,
                                 "params": {"method": "gptq", "bits": 4}, "metrics": {}}]},
     "quantized", "transformers", "gptq"),
    ({"steps": PROV["steps"] + [{"id": "export", "stage": "export", "version": 1, "params": {"format": "onnx"},
                                 "metrics": {}}]}, "finetune", "onnx", "onnx"),
])
def test_relation_library_and_usage_follow_the_artifact(change, relation, library, tag):
    prov = dict(PROV, **change)
    prov["name"] = "m"
    text = card.render_card(prov, BASE_META, model_id="acme/m")
    data = parse(text).data
    assert data.base_model_relation == relation and data.library_name == library and tag in data.tags
    if library == "onnx":
        assert "onnxruntime" in text and "ORTModelForCausalLM" not in text and "vllm" not in text
        assert 'snapshot_download("acme/m")' in text and "# m (ONNX (float32))" in text
    elif relation == "quantized":
        assert "gptqmodel" in text and "vllm serve acme/m" in text and "# m (GPTQ 4-bit)" in text
        assert 'dtype=torch.float32 if device == "cpu"' in text  # bfloat16 on CPU: minutes per answer
    if relation == "merge":
        assert "2 adapters merged" in text


def test_encoder_models_get_automodel_and_no_vllm():
    prov = dict(PROV, model={"architectures": ["BertModel"], "model_type": "bert"})
    text = card.render_card(prov, {}, model_id="acme/enc")
    assert "AutoModel.from_pretrained" in text and "generate" not in text and "vllm" not in text


TEMPLATE = """---
license: other
license_name: acme-model-license
tags: [support, lora]
datasets:
- acme/support-tickets
---
# Acme support assistant

Answers support tickets. Internal use.

## Usage

Call it through the Acme gateway.

## Limitations

English only.
"""


def test_user_template_overrides_sections_and_metadata_and_still_round_trips():
    tpl = card.parse_template(TEMPLATE)
    text = card.render_card(PROV, BASE_META, model_id="acme/support-bot", template=tpl)
    parsed = parse(text)
    data = parsed.data.to_dict()
    assert data["license"] == "other" and data["license_name"] == "acme-model-license"  # template wins
    assert data["datasets"] == ["acme/support-tickets"]
    assert data["tags"] == ["fuse", "merged-adapter", "lora", "support"]  # extended, no duplicates
    assert data["base_model_relation"] == "finetune" and data["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert str(parsed) == text
    body = parsed.text
    assert "# Acme support assistant" in body and "Answers support tickets." in body
    assert "merged into its weights by" not in body  # the intro was replaced
    assert "Call it through the Acme gateway." in body and "from_pretrained" not in body  # Usage replaced
    assert body.index("## Limitations") < body.index("## Files")  # added before Files
    assert "## Lineage" in body and "93efa2f097d58c2a74874c7e644dbc9b0cee75a2" in body  # the rest kept


def test_a_local_base_is_never_base_model_and_is_named_by_its_digest(tmp_path):
    base = {"kind": "local", "name": "SmolLM2-135M", "digest": "sha256:" + "ab" * 32}
    prov = dict(PROV, base=base)
    text = card.render_card(prov, BASE_META, model_id="dist/m", target="dir")
    meta = parse(text).data.to_dict()
    assert "base_model" not in meta and meta["base_model_relation"] == "finetune"
    assert "A local base model `SmolLM2-135M` (digest `sha256:" + "ab" * 32 + "`" in text
    assert '# "dist/m": the directory this model was published to' in text
    assert 'AutoModelForCausalLM.from_pretrained("dist/m")' in text
    # what may become base_model: only a Hub id, never a path
    (tmp_path / "models" / "llama").mkdir(parents=True)
    for value in ("/home/alice/models/llama", "../llama", "./llama", "~/llama", "C:\\models\\llama",
                  "models/llama", "", None, 7, "a/b/c"):
        assert card.hub_id(value, tmp_path) is None, value
    for value in ("HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "org/name"):
        assert card.hub_id(value, tmp_path) == value


def test_the_cards_digest_command_recomputes_fuses_tree_digest(tmp_path):
    """The shell line the card gives reproduces stages.manifest.tree_digest for a directory (nested,
    hidden files, names with spaces and non-ASCII) and, with `echo <file name>`, for a single file."""
    import shutil
    import subprocess

    from stages.manifest import StatCache

    if not all(shutil.which(t) for t in ("bash", "find", "sha256sum", "awk", "xargs")):
        pytest.skip("needs bash and GNU coreutils")
    text = card.render_card(PROV, BASE_META, model_id="acme/m")
    command = re.search(r"```bash\n(find .*?)\n```", text, re.S).group(1)
    assert command == card.DIGEST_COMMAND
    model = tmp_path / "model"
    (model / "sub" / "deeper").mkdir(parents=True)
    files = {"config.json": b"{}", "model.safetensors": bytes(range(256)) * 99, "sub/deeper/x.bin": b"x",
             ".hidden": b"h", "a file.txt": b"spaces", "sub/caf\u00e9.json": "\u00e9".encode(), "B.txt": b"upper"}
    for rel, data in files.items():
        (model / rel).write_bytes(data)
    want, _ = StatCache(None).tree(model)
    got = subprocess.run(["bash", "-c", command], cwd=model, capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}).stdout.split()[0]
    assert "sha256:" + got == want
    single = command.replace("find -L . -type f | sed 's|^\\./||' | LC_ALL=C sort", "echo model.safetensors")
    assert single != command
    got = subprocess.run(["bash", "-c", single], cwd=model, capture_output=True, text=True, check=True).stdout.split()[0]
    assert "sha256:" + got == StatCache(None).tree(model / "model.safetensors")[0]
