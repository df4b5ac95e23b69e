"""The pre-flight (``validate``): what passes, what warns, what it refuses, what it never reads.

Most tests call :func:`stages.steps.validate.preflight` directly; a few run the pipeline to see the
findings land in the manifest. The catalogue of refused inputs is tests/test_bad_inputs.py.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import stages
from stages.findings import FuseError
from stages.steps.validate import preflight

from factory import make_lora_adapter, make_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    make_tiny_model("llama", root / "base", dtype=torch.bfloat16)
    make_lora_adapter(root / "base", root / "adapter", target_modules=["q_proj", "v_proj"])
    return root


def copy(good: Path, tmp: Path) -> tuple[Path, Path]:
    """A copy of the good inputs whose adapter names the copied base as the one it was trained on."""
    shutil.copytree(good / "base", tmp / "base")
    shutil.copytree(good / "adapter", tmp / "adapter")
    edit_config(tmp / "adapter" / "adapter_config.json", base_model_name_or_path=str(tmp / "base"))
    return tmp / "base", tmp / "adapter"


def edit_config(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def finding(fn, *args, **kwargs):
    with pytest.raises(FuseError) as e:
        fn(*args, **kwargs)
    return e.value.finding


def run_pipeline(root: Path, base: str = "base", adapter: str = "adapter", validate: str = "validate",
                 overrides=()) -> dict:
    (root / "pipeline.yaml").write_text(f"version: 1\nname: v\nbase: {base}\nadapter: {adapter}\n"
                                        f"workdir: runs/v\nstages:\n  - {validate}\n")
    stages.run(root / "pipeline.yaml", overrides=list(overrides), log=lambda m: None)
    return json.loads((root / "runs/v/manifest.json").read_text())["stages"]["validate"]


# ---------------------------------------------------------------- passes


def test_good_inputs_pass_with_a_report_and_no_warnings(good, tmp_path):
    rec = run_pipeline(tmp_path, base=str(good / "base"), adapter=str(good / "adapter"))
    assert rec["status"] == "done" and rec["warnings"] == []
    assert rec["metrics"]["tensors_updated"] == 4 and rec["metrics"]["adapter_tensors"] == 8
    report = json.loads((tmp_path / "runs/v/validate/report.json").read_text())
    assert report["plan"]["tensors_updated"] == 4
    assert report["adapters"][0]["nonfinite"] == 0
    assert report["disk"]["need_bytes"] == 0 and rec["metrics"]["disk_free_bytes"] > 0  # no merge in this pipeline
    assert "seconds" not in report  # the file is the same on every run; timings are in the manifest
    assert report["base"]["fingerprint"]["hidden_size"] == 64


def test_preflight_imports_no_torch(good):
    code = ("import sys; from stages.steps.validate import preflight; "
            f"r = preflight({str(good / 'base')!r}, [({str(good / 'adapter')!r}, 1.0)]); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(r['plan']['tensors_updated'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0 and r.stdout.strip() == "4", r.stderr


def _hub_cache(cache: Path, repo: str, source: Path) -> Path:
    """A Hugging Face cache entry for ``repo``: content-addressed blobs, a snapshot of relative
    links into them, refs/main; returns the snapshot directory."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir()
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    for f in sorted(source.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (folder / "blobs" / blob).write_bytes(data)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob)
    return snapshot


def test_a_hub_style_base_passes_by_id_and_by_snapshot_path(good, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = _hub_cache(cache, "acme/tiny", good / "base")
    shutil.copytree(good / "adapter", tmp_path / "adapter")
    edit_config(tmp_path / "adapter" / "adapter_config.json", base_model_name_or_path="acme/tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    rec = run_pipeline(tmp_path, base="acme/tiny")
    assert rec["status"] == "done" and rec["warnings"] == [], rec["warnings"]
    assert rec["sources"]["base"]["revision"] == snapshot.name
    # the snapshot directory given as a path: its links lead into the blob store, the name is the repo's
    report = preflight(snapshot, [(tmp_path / "adapter", 1.0)], base_name=str(snapshot))
    assert report["warnings"] == []
    assert report["adapters"][0]["trained_on_config"].endswith("config.json")  # found in the cache, offline


# ---------------------------------------------------------------- which base


def test_a_different_name_with_the_same_config_is_a_warning_and_strict_makes_it_an_error(good, tmp_path):
    base, adapter = copy(good, tmp_path)
    mirror = tmp_path / "mirror"
    shutil.copytree(good / "base", mirror)  # the model the adapter names: same config, other place
    edit_config(adapter / "adapter_config.json", base_model_name_or_path=str(mirror))
    rec = run_pipeline(tmp_path)
    assert rec["status"] == "done"
    [w] = rec["warnings"]
    assert w["code"] == "F211" and "configs match" in w["message"] and w["severity"] == "warning"
    assert w["file"].endswith("adapter_config.json")
    with pytest.raises(FuseError) as e:
        run_pipeline(tmp_path, overrides=["validate.strict=true"])
    assert e.value.finding.code == "F211" and "strict" in e.value.finding.message
    rec = json.loads((tmp_path / "runs/v/manifest.json").read_text())["stages"]["validate"]
    assert rec["status"] == "failed" and rec["error"]["code"] == "F211"


def test_configs_that_differ_are_an_error_unless_allowed(good, tmp_path):
    base, adapter = copy(good, tmp_path)
    trained_on = tmp_path / "trained-on"
    trained_on.mkdir()
    config = json.loads((base / "config.json").read_text())
    (trained_on / "config.json").write_text(json.dumps(dict(config, intermediate_size=999)))
    edit_config(adapter / "adapter_config.json", base_model_name_or_path=str(trained_on))
    f = finding(preflight, base, [(adapter, 1.0)])
    assert f.code == "F211" and "intermediate_size 999 vs 128" in f.message and "allow_base_mismatch" in f.fix
    report = preflight(base, [(adapter, 1.0)], allow_base_mismatch=True)
    [w] = report["warnings"]
    assert w["code"] == "F211" and "allowed by allow_base_mismatch" in w["message"]
    assert report["adapters"][0]["config_differences"] == {"intermediate_size": {"adapter_base": 999, "base": 128}}


def test_an_unknown_name_is_a_warning_that_says_what_was_not_compared(good, tmp_path):
    base, adapter = copy(good, tmp_path)
    edit_config(adapter / "adapter_config.json", base_model_name_or_path="acme/not-in-any-cache")
    [w] = preflight(base, [(adapter, 1.0)], base_name="models/mine")["warnings"]
    assert w["code"] == "F211" and "cannot read acme/not-in-any-cache's config offline" in w["message"]


# ---------------------------------------------------------------- files


def test_symlink_policy(good, tmp_path):
    base, adapter = copy(good, tmp_path)
    (base / "sub").mkdir()
    (base / "sub" / "inside.json").symlink_to(base / "config.json")  # inside: fine
    (adapter / "config-link.json").symlink_to("adapter_config.json")  # relative, inside: fine
    assert preflight(base, [(adapter, 1.0)])["warnings"] == []

    (base / "dangling.json").symlink_to(tmp_path / "nowhere.json")
    f = finding(preflight, base, [(adapter, 1.0)])
    assert f.code == "F210" and "symlink to nothing" in f.message and f.file.endswith("dangling.json")
    (base / "dangling.json").unlink()

    (base / "loop").symlink_to("loop")
    f = finding(preflight, base, [(adapter, 1.0)])
    assert f.code == "F210" and "a loop" in f.message
    (base / "loop").unlink()

    outside = tmp_path / "secrets"
    outside.mkdir()
    (outside / "token").write_text("hf_xxx")
    (adapter / "tokenizer_config.json").symlink_to(outside / "token")
    f = finding(preflight, base, [(adapter, 1.0)])
    assert f.code == "F210" and "in the adapter directory" in f.message and str(outside) in f.message
    (adapter / "tokenizer_config.json").unlink()
    (base / "linked-dir").symlink_to(outside, target_is_directory=True)
    assert finding(preflight, base, [(adapter, 1.0)]).code == "F210"


def test_a_pickled_adapter_loads_only_when_allowed_and_never_runs_code(good, tmp_path):
    base, adapter = copy(good, tmp_path)
    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter / "adapter_model.bin")
    assert finding(preflight, base, [(adapter, 1.0)]).code == "F209"
    report = preflight(base, [(adapter, 1.0)], allow_pickle=True)
    assert report["plan"]["tensors_updated"] == 4 and report["adapters"][0]["file"] == "adapter_model.bin"

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Evil()}, adapter / "adapter_model.bin")
    f = finding(preflight, base, [(adapter, 1.0)], allow_pickle=True)
    assert f.code == "F208" and not marker.exists()  # weights_only=True refused to unpickle it


def test_index_total_size_and_pickled_side_files_are_warnings(good, tmp_path):
    base, adapter = copy(good, tmp_path)
    tensors = load_file(base / "model.safetensors")
    save_file(tensors, base / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    (base / "model.safetensors").unlink()
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": len(tensors)}, "weight_map": {k: "model-00001-of-00001.safetensors"
                                                                 for k in tensors}}))
    torch.save({"lr": 1e-4}, base / "training_args.bin")
    warnings = preflight(base, [(adapter, 1.0)])["warnings"]
    assert [w["code"] for w in warnings] == ["F205", "F209"]
    assert "total_size" in warnings[0]["message"] and "training_args.bin" in warnings[1]["message"]


# ---------------------------------------------------------------- adapter config and vocabulary


def test_config_inconsistent_with_the_weights_is_a_warning(good, tmp_path):
    base, adapter = copy(good, tmp_path)
    edit_config(adapter / "adapter_config.json", target_modules=["q_proj"], rank_pattern={"qkv_proj": 4})
    warnings = preflight(base, [(adapter, 1.0)])["warnings"]
    assert [w["code"] for w in warnings] == ["F214", "F214"]
    assert "v_proj" in warnings[0]["message"] and "qkv_proj" in warnings[1]["message"]


def test_a_resized_vocabulary_travels_with_the_adapter_and_bounds_the_tokenizer(good, tmp_path):
    base, adapter = copy(good, tmp_path)
    stored = load_file(base / "model.safetensors")
    extra = torch.randn(44, 64, dtype=torch.bfloat16)
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.model.embed_tokens.weight"] = torch.cat([stored["model.embed_tokens.weight"], extra])
    tensors["base_model.model.lm_head.weight"] = torch.cat([stored["lm_head.weight"], extra])
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    vocab = {f"t{i}": i for i in range(300)}
    (adapter / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}, "added_tokens": []}))
    report = preflight(base, [(adapter, 1.0)])
    assert report["tokenizer"] == {"file": str(adapter / "tokenizer.json"), "tokens": 300, "embedding_rows": 300}
    (adapter / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}, "added_tokens": [
        {"id": 300, "content": "<new>"}]}))
    f = finding(preflight, base, [(adapter, 1.0)])
    assert f.code == "F213" and "301 tokens" in f.message and "300 rows" in f.message


def test_no_room_for_the_outputs(good, tmp_path, monkeypatch):
    base, adapter = copy(good, tmp_path)
    free = preflight(base, [(adapter, 1.0)], room=(tmp_path, 1))["disk"]["free_bytes"]
    f = finding(preflight, base, [(adapter, 1.0)], room=(tmp_path / "new" / "workdir", free + 10**9))
    assert f.code == "F402" and "is free" in f.message


# ---------------------------------------------------------------- a 15 GB model from headers


def _bench():
    spec = importlib.util.spec_from_file_location("preflight_sparse", ROOT / "bench" / "preflight_sparse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_15_gb_sparse_model_passes_without_reading_its_tensor_data(tmp_path, monkeypatch):
    """The timing is bench/preflight_sparse.py's job; this checks the pre-flight works on the
    full-size model and never reads a byte of the base's tensor data (only headers and JSON)."""
    bench = _bench()
    base, total = bench.make_sparse_model(tmp_path / "base")
    adapter = bench.make_lora(tmp_path / "adapter", rank=4, targets=("q_proj", "v_proj"))
    assert total > 14e9 and sum(p.stat().st_blocks * 512 for p in base.iterdir()) < 50e6

    shards = {}
    for p in base.glob("*.safetensors"):
        with open(p, "rb") as f:
            shards[str(p.resolve())] = 8 + int.from_bytes(f.read(8), "little")
    read_bytes = dict.fromkeys(shards, 0)
    preads = []

    class Counting:
        """A file object that counts the bytes read from it."""

        def __init__(self, f, path):
            self._f, self._path = f, path

        def read(self, *args):
            data = self._f.read(*args)
            read_bytes[self._path] += len(data)
            return data

        def readinto(self, buf):
            n = self._f.readinto(buf)
            read_bytes[self._path] += n
            return n

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    real_open = open

    def spy_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        path = os.path.realpath(file) if isinstance(file, (str, os.PathLike)) else None
        return Counting(f, path) if path in shards else f

    for name in ("pread", "preadv"):
        real = getattr(os, name)

        def spy(fd, *args, _real=real):
            if os.readlink(f"/proc/self/fd/{fd}") in shards:
                preads.append(os.readlink(f"/proc/self/fd/{fd}"))
            return _real(fd, *args)
        monkeypatch.setattr(os, name, spy)
    monkeypatch.setattr("builtins.open", spy_open)

    report = preflight(base, [(adapter, 1.0)], room=(tmp_path, total))
    assert report["plan"]["tensors_updated"] == 64 and report["base"]["weight_bytes"] == total
    assert report["tokenizer"]["tokens"] == 32768
    assert preads == []
    assert all(0 < read_bytes[p] <= shards[p] + 16 for p in shards), (read_bytes, shards)  # each header once


def test_a_base_transformers_cannot_load_is_refused_with_the_fix(good, tmp_path):
    """Issue 12: weights without config.json (or without model_type) used to validate, merge and publish."""
    base, adapter = copy(good, tmp_path)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").unlink()
    f = finding(preflight, base, [(adapter, 1.0)])
    assert f.code == "F205" and f.file == str(base / "config.json") and "config.json" in f.fix
    (base / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "model_type"}))
    f = finding(preflight, base, [(adapter, 1.0)])
    assert f.code == "F205" and f.key == "model_type" and f.fix
    (base / "config.json").write_text(json.dumps(dict(config, text_config=["not", "an", "object"])))
    assert finding(preflight, base, [(adapter, 1.0)]).key == "text_config"


def test_whole_file_checks_are_the_readers(good, tmp_path):
    """validate has no safetensors checks of its own: a file the reader refuses is refused here the same way."""
    from stages.io.safetensors import read_header

    base, adapter = copy(good, tmp_path)
    with open(adapter / "adapter_model.safetensors", "ab") as f:
        f.write(b"\0" * 3)
    with pytest.raises(FuseError) as e:
        read_header(adapter / "adapter_model.safetensors")
    assert finding(preflight, base, [(adapter, 1.0)]) == e.value.finding


def test_tokenizer_files_of_the_wrong_shape_are_not_a_crash(good, tmp_path):
    base, adapter = copy(good, tmp_path)
    (adapter / "tokenizer.json").write_text(json.dumps({"model": [1, 2], "added_tokens": 5}))
    assert preflight(base, [(adapter, 1.0)])["plan"]["tensors_updated"] == 4
    (adapter / "tokenizer.json").write_text("[" * 100_000 + "]" * 100_000)
    f = finding(preflight, base, [(adapter, 1.0)])
    assert f.code == "F208" and f.file == str(adapter / "tokenizer.json")
