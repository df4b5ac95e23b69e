"""Published files are the same bytes in any checkout, name no local path, and each card's snippet runs.

One small pipeline (a trained tiny Llama with a real BPE tokenizer and a chat template, a LoRA:
validate -> merge -> check -> quantize (GPTQ 8-bit) -> export (ONNX) -> three directory
publishes) runs in two checkouts at different paths: the Fuse package is copied into each
(so torch's exporter sees a different source path for ``stages/onnx/exporter.py``), and the
project (pipeline, base, adapter, calibration) too. Oracles: the bytes of every published
file; a grep of every published file (raw bytes, and the ONNX graph's decoded strings) for the
checkouts' paths, the repository's, ``$HOME`` and the user name; and the python block of each
card run as a user would, against the published directory, with the Hub offline.
"""
from __future__ import annotations

import getpass
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from factory import SENTENCES, make_lora_adapter, make_tiny_model

REPO = Path(__file__).resolve().parents[1]
HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))
HAVE_GPTQ = all(importlib.util.find_spec(m) for m in ("gptqmodel", "optimum"))
pytestmark = pytest.mark.skipif(not HAVE_ONNX, reason="onnx, onnxscript and onnxruntime are not installed "
                                                      "(pip install 'fuse-llm[export]')")

TEXT = ["the cat sat on the mat", "a dog ran in the park", "what is the capital of france",
        "paris is the capital of france", "one two three four five", "hello how are you today"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PIPELINE = """\
version: 1
name: tiny-repro
base: base
adapter: adapter
workdir: runs/tiny
stages:
  - validate
  - merge: {dtype: float32}
  - check: {probes: 4}
%(quantize)s  - export: {optimize: false, prompts: ["the cat sat on the mat", "what is the capital of france"], greedy_tokens: 4, greedy_prompts: 1}
  - publish: {to: dir, path: dist/merged, from: merge}
%(publish_gptq)s  - publish: {id: publish-onnx, to: dir, path: dist/onnx, from: export}
"""
QUANTIZE = ("  - quantize: {method: gptq, bits: 8, group_size: 32, calibration: {dataset: calib.jsonl}, "
            'prompts: ["the cat sat on the mat", "what is the capital of france"], greedy_tokens: 4, '
            "greedy_prompts: 1}\n")
PUBLISH_GPTQ = "  - publish: {id: publish-gptq, to: dir, path: dist/gptq, from: quantize}\n"
DISTS = ("merged", "gptq", "onnx")


def make_tokenizer(out_dir: Path, *, chat_template: bool = True) -> None:
    """A real BPE tokenizer (``tokenizers``) that fits the tiny models' 256-token vocabulary, saved the
    way transformers saves one (tokenizer.json, tokenizer_config.json, a chat template)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    tok.train_from_iterator(TEXT * 4, trainers.BpeTrainer(vocab_size=200, special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def make_project(root: Path, quantize: bool) -> Path:
    root.mkdir(parents=True)
    make_tiny_model("llama", root / "base", hidden=64, train_steps=60)
    make_tokenizer(root / "base")
    make_lora_adapter(root / "base", root / "adapter", target_modules=["q_proj", "v_proj", "down_proj"], scale=0.05)
    (root / "calib.jsonl").write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in SENTENCES * 4))
    (root / "pipeline.yaml").write_text(PIPELINE % {"quantize": QUANTIZE if quantize else "",
                                                    "publish_gptq": PUBLISH_GPTQ if quantize else ""})
    return root


def checkout(root: Path, project: Path) -> tuple[Path, Path]:
    """A copy of the Fuse package and of the project under ``root``: (package dir, project dir)."""
    code = root / "fuse-checkout"
    shutil.copytree(REPO / "stages", code / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    work = root / "project"
    shutil.copytree(project, work, symlinks=True)
    return code, work


def env_for(code: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same pipeline run in two checkouts at paths of different lengths, side by side."""
    tmp = tmp_path_factory.mktemp("repro")
    src = make_project(tmp / "src", quantize=HAVE_GPTQ)
    roots = [tmp / "a", tmp / "a-much-longer-checkout-path" / "nested" / "deeper"]
    procs = []
    for root in roots:
        code, work = checkout(root, src)
        procs.append((root, code, work, subprocess.Popen(
            [sys.executable, "-m", "stages", "run", "pipeline.yaml"], cwd=work, env=env_for(code),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    out = []
    for root, code, work, proc in procs:
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr[-4000:]
        out.append({"root": root, "code": code, "work": work, "stderr": stderr})
    return {"tmp": tmp, "src": src, "runs": out}


def published(work: Path) -> dict[str, bytes]:
    files = {}
    for dist in DISTS:
        d = work / "dist" / dist
        if d.is_dir():
            files.update({f"{dist}/{p.relative_to(d).as_posix()}": p.read_bytes()
                          for p in sorted(d.rglob("*")) if p.is_file()})
    return files


def test_each_checkout_ran_its_own_copy_of_fuse(runs):
    for run in runs["runs"]:
        r = subprocess.run([sys.executable, "-c", "import stages; print(stages.__file__)"], cwd=run["work"],
                           env=env_for(run["code"]), capture_output=True, text=True, check=True)
        assert Path(r.stdout.strip()).is_relative_to(run["code"]), r.stdout


def test_every_published_file_is_byte_identical_across_checkouts(runs):
    a, b = (published(r["work"]) for r in runs["runs"])
    expected = {"merged", "onnx"} | ({"gptq"} if HAVE_GPTQ else set())
    assert {name.split("/")[0] for name in a} == expected
    assert "onnx/model.onnx" in a and "merged/model.safetensors" in a and "merged/README.md" in a
    assert sorted(a) == sorted(b)
    differ = [name for name in a if a[name] != b[name]]
    assert not differ, differ


def stage_outputs(work: Path) -> dict[str, bytes]:
    """Every file of every stage's output directory in the workdir (not the manifest, logs or caches)."""
    workdir = work / "runs" / "tiny"
    return {p.relative_to(workdir).as_posix(): p.read_bytes() for d in sorted(workdir.iterdir())
            if d.is_dir() and not d.name.startswith(".") and d.name != "logs" for p in sorted(d.rglob("*"))
            if p.is_file()}


def test_every_stage_output_is_byte_identical_across_checkouts(runs):
    """Not only what is published: each stage's own output (validate's and check's reports included) is the
    same bytes at another path, so a workdir's outputs can be compared or moved between machines."""
    a, b = (stage_outputs(r["work"]) for r in runs["runs"])
    assert {"validate/report.json", "check/report.json", "merge/model.safetensors", "export/model.onnx"} <= set(a)
    assert sorted(a) == sorted(b)
    differ = [name for name in a if a[name] != b[name]]
    assert not differ, differ


def needles(runs) -> dict[str, bytes]:
    """Strings no published file may hold: the checkouts, the project source, the repository, $HOME,
    the user name (when long enough not to occur by chance in weights)."""
    out = {"tmp": str(runs["tmp"]), "src": str(runs["src"]), "repo": str(REPO), "home": os.path.expanduser("~")}
    for i, run in enumerate(runs["runs"]):
        out[f"checkout{i}"] = str(run["root"])
    user = getpass.getuser()
    if len(user) >= 4:
        out["user"] = user
    found = {k: v.encode() for k, v in out.items() if v and v != "/"}
    return found


def onnx_strings(path: Path) -> list[str]:
    """Every string field of the ONNX graph, decoded: names, doc strings, metadata keys and values,
    external-data locations."""
    import onnx
    from google.protobuf.descriptor import FieldDescriptor

    strings = []

    def walk(msg):
        for field, value in msg.ListFields():
            values = [value] if hasattr(value, "DESCRIPTOR") or isinstance(value, (str, bytes, int, float)) else value
            for v in values:
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    walk(v)
                elif field.type == FieldDescriptor.TYPE_STRING:
                    strings.append(v)
                elif field.type == FieldDescriptor.TYPE_BYTES and field.name != "raw_data":
                    strings.append(v.decode("utf-8", "replace"))

    walk(onnx.load(str(path), load_external_data=False))
    return strings


def test_no_published_file_names_a_local_path(runs):
    bad = needles(runs)
    for run in runs["runs"]:
        files = published(run["work"])
        hits = [(name, what) for name, data in files.items() for what, needle in bad.items() if needle in data]
        assert not hits, hits
        strings = onnx_strings(run["work"] / "dist/onnx/model.onnx")
        assert strings and not [s for s in strings if "pkg.torch" in s or 'File "' in s or s.startswith("/")]
        assert not [s for s in strings for needle in bad.values() if needle.decode() in s]
        card = files["merged/README.md"].decode()
        assert "base_model:" not in card  # the adapter's base_model_name_or_path is a local path: no Hub id
        assert "read from a local path, not a Hub id" in card
        prov = json.loads(files["merged/fuse-provenance.json"])
        assert prov["adapters"][0]["base_model_name_or_path"] is None and "hub_id" not in prov["base"]


def test_the_onnx_graph_keeps_no_exporter_metadata(runs):
    import onnx

    work = runs["runs"][0]["work"]
    m = onnx.load(str(work / "dist/onnx/model.onnx"), load_external_data=False)
    keys = {p.key for n in m.graph.node for p in n.metadata_props} | {p.key for p in m.graph.metadata_props}
    keys |= {p.key for v in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info)
             for p in v.metadata_props}
    assert not [k for k in keys if k.startswith("pkg.torch") or k == "namespace"], keys
    rec = json.loads((work / "runs/tiny/manifest.json").read_text())["stages"]["export"]
    assert rec["metrics"]["max_abs_diff"] <= 1e-3  # the scrubbed graph still is the model


def cards(runs) -> dict[str, str]:
    work = runs["runs"][0]["work"]
    return {d: (work / "dist" / d / "README.md").read_text() for d in DISTS if (work / "dist" / d).is_dir()}


def test_each_card_describes_its_own_artifact(runs):
    c = cards(runs)
    titles = {d: re.search(r"^# (.+)$", text, re.M).group(1) for d, text in c.items()}
    assert titles["merged"] == "tiny-repro (merged model)" and titles["onnx"] == "tiny-repro (ONNX (float32))"
    assert len(set(titles.values())) == len(titles)
    checks = {d: text[text.index("## Checks"):text.index("## Files")] for d, text in c.items()}
    # the merged model: check's numbers with their bounds; no other artifact's gate
    assert "**`check`** (check v" in checks["merged"] and "| probe_worst_ratio |" in checks["merged"]
    assert re.search(r"\| logits_top1_agreement \| [\d.]+ \| >= 0\.99 \|", checks["merged"])
    assert "`export`" not in checks["merged"] and "`quantize`" not in checks["merged"]
    # the ONNX card: its own export gate (float32 bounds), nothing else
    assert "**`export`** (export v2)" in checks["onnx"] and "`check`" not in checks["onnx"]
    assert re.search(r"\| decode_max_abs_diff \| [\d.e-]+ \| <= 0\.001 \|", checks["onnx"])
    assert "onnxruntime" in c["onnx"] and "ORTModelForCausalLM" not in c["onnx"] and "vllm" not in c["onnx"]
    assert 'path = "dist/onnx"' in c["onnx"] and 'AutoModelForCausalLM.from_pretrained("dist/merged")' in c["merged"]
    for text in c.values():
        assert "pypi.org" not in text and "apply_chat_template" in text
    if "gptq" in c:
        assert titles["gptq"] == "tiny-repro (GPTQ 8-bit)"
        assert "**`quantize`** (quantize v" in checks["gptq"] and "`export`" not in checks["gptq"]
        assert "`check`" not in checks["gptq"]
        assert re.search(r"\| greedy_agreement \| [\d.]+ \| informational \|", checks["gptq"])
        assert "float32" in c["gptq"] and 'dtype=torch.float32 if device == "cpu"' in c["gptq"]


def python_block(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(blocks) == 1, blocks
    return blocks[0]


@pytest.mark.parametrize("dist", DISTS)
def test_each_cards_snippet_runs_against_the_published_model(runs, dist):
    """The python block of the card, as it is, run from the pipeline's directory (where the dir
    publish's path is relative to), offline, without Fuse on the path."""
    if dist == "gptq" and not HAVE_GPTQ:
        pytest.skip("gptqmodel/optimum not installed")
    work = runs["runs"][0]["work"]
    code = python_block(cards(runs)[dist])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip(), r.stderr[-2000:]  # it printed a continuation
