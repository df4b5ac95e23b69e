"""The streaming merge: bounded memory, exact row chunks, errors from its threads.

- Peak memory (whole-process RSS, measured in a fresh process, ``import torch`` included)
  does not grow with the model: a 16x larger model with a 128 MB LoRA-merged lm_head peaks
  within a few buffers of the small one, and under the default 600 MB budget; so do OFT and BOFT
  on a 16384-wide down_proj, whose dense rotation alone (peft's way) would take 1 GiB.
- Merging in row chunks gives the same bytes as merging whole tensors, for every update kind
  that is chunked (the buffers are shrunk so the tiny test models are split).
- The BLAS property row chunking relies on, checked directly: a row of ``B @ A`` does not depend
  on how many rows are computed with it (from ``MIN_ROWS`` rows up).
No timing assertions: timings live in bench/merge.py.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import stages.peft.merge as engine
from stages.findings import FuseError
from stages.io.safetensors import FileReader, ShardedWriter
from stages.peft.merge import merge_model

from factory import make_lora_adapter, make_peft_adapter, make_tiny_model

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- peak memory

def llama_like(out: Path, vocab: int, hidden: int, layers: int, seed: int) -> tuple[Path, Path]:
    """A bf16 Llama-shaped checkpoint (safetensors + config) and a rank-8 LoRA on q_proj and lm_head."""
    gen = torch.Generator().manual_seed(seed)
    base, adapter = out / "base", out / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    tensors = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
               "model.norm.weight": (hidden,)}
    for n in range(layers):
        tensors[f"model.layers.{n}.self_attn.q_proj.weight"] = (hidden, hidden)
    save_file({k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in tensors.items()},
              base / "model.safetensors", metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False,
                                                  "vocab_size": vocab, "hidden_size": hidden}))
    lora = {}
    for module, (out_f, in_f) in [(f"model.layers.{n}.self_attn.q_proj", (hidden, hidden)) for n in range(layers)] \
            + [("lm_head", (vocab, hidden))]:
        lora[f"base_model.model.{module}.lora_A.weight"] = torch.randn(8, in_f, generator=gen) * 0.05
        lora[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, 8, generator=gen) * 0.05
    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "lm_head"],
        "task_type": "CAUSAL_LM", "bias": "none", "fan_in_fan_out": False}))
    return base, adapter


# VmHWM: this process image's peak RSS. Not ru_maxrss: exec keeps the peak of the image it replaced,
# here a fork of the (large) pytest process.
PEAK = textwrap.dedent("""
    import json, sys
    from stages.peft.merge import merge_model
    report = merge_model(sys.argv[1], [(a, 1.0) for a in sys.argv[3:]], sys.argv[2])
    status = open("/proc/self/status").read().split("VmHWM:")[1].split()
    print(json.dumps({"peak": int(status[0]) * 1024, "merged": report.metrics["tensors_merged"]}))
""")


def peak_of(base: Path, adapter: Path, out: Path, *more: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", PEAK, str(base), str(out), str(adapter), *map(str, more)], cwd=ROOT,
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc (Linux)")
def test_peak_memory_does_not_grow_with_the_model(tmp_path):
    small = llama_like(tmp_path / "small", vocab=4096, hidden=1024, layers=2, seed=1)      # 21 MB
    big = llama_like(tmp_path / "big", vocab=65536, hidden=1024, layers=8, seed=2)         # 285 MB
    s = peak_of(*small, tmp_path / "small-out")
    b = peak_of(*big, tmp_path / "big-out")
    assert s["merged"] == 3 and b["merged"] == 9
    # Whole tensors would add the 128 MB bf16 lm_head, its 256 MB float32 copy and a float32 delta
    # (~640 MB); streaming adds at most its buffers (a few x 16 MiB) and the LoRA factors.
    assert b["peak"] - s["peak"] < 120e6, (s, b)
    assert b["peak"] < engine.DEFAULT_MEMORY_BUDGET, b


def wide_rotations(out: Path, wide: int = 16384, hidden: int = 64) -> tuple[Path, Path, Path]:
    """A bf16 Llama-shaped checkpoint whose down_proj has ``wide`` in_features, and an OFT and a BOFT
    adapter (blocks of 8) on it, written directly: peft's BOFT layer alone would hold two dense
    wide x wide matrices while making one."""
    from peft import BOFTConfig, OFTConfig

    gen = torch.Generator().manual_seed(3)
    base = out / "base"
    base.mkdir(parents=True)
    shapes = {"model.embed_tokens.weight": (256, hidden), "lm_head.weight": (256, hidden),
              "model.norm.weight": (hidden,), "model.layers.0.mlp.down_proj.weight": (hidden, wide)}
    save_file({k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()},
              base / "model.safetensors", metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False,
                                                  "vocab_size": 256, "hidden_size": hidden}))
    key = "base_model.model.model.layers.0.mlp.down_proj."
    adapters = []
    for config, tensors in [
            (OFTConfig(r=0, oft_block_size=8, target_modules=["down_proj"]), {"oft_R.weight": (wide // 8, 28)}),
            (BOFTConfig(boft_block_size=8, target_modules=["down_proj"]),
             {"boft_R": (1, wide // 8, 8, 8), "boft_s": (hidden, 1)})]:
        path = out / config.peft_type.value.lower()
        config.save_pretrained(path)
        save_file({key + k: torch.randn(s, generator=gen) * 0.1 + (k == "boft_s") for k, s in tensors.items()},
                  path / "adapter_model.safetensors", metadata={"format": "pt"})
        adapters.append(path)
    return base, *adapters


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc (Linux)")
def test_rotations_of_a_wide_layer_stay_in_budget(tmp_path):
    """OFT then BOFT on a down_proj with in_features 16384: peft's dense R (1 GiB in float32; BOFT's
    layer holds two more) would pass the default budget alone; Fuse builds R a few rows at a time
    (stages/peft/oft.py). Measured: 1.68 GB (OFT) and 4.9 GB (BOFT) peaks before, ~0.47 GB after."""
    base, oft, boft = wide_rotations(tmp_path)
    p = peak_of(base, oft, tmp_path / "out", boft)
    assert p["merged"] == 1
    assert p["peak"] < engine.DEFAULT_MEMORY_BUDGET, p


# ---------------------------------------------------------------- row chunks are exact

def hashes(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


def merge_both_ways(base, adapter, tmp_path, monkeypatch, dtype="auto", chunks=True) -> None:
    """Merge with the default buffers (every test tensor whole in one chunk) and with buffers so small
    that the tensors are split in row chunks (``chunks``; else they must stay whole); the outputs must
    be byte-identical."""
    whole = merge_model(base, [(adapter, 1.0)], tmp_path / "whole", dtype=dtype)
    monkeypatch.setattr(engine, "MAX_BUFFER", 32 << 10)
    monkeypatch.setattr(engine, "MIN_BUFFER", 32 << 10)
    monkeypatch.setattr(engine, "CHUNK_BYTES", 8 << 10)
    chunked = []
    real = engine._jobs

    def spy(*args):
        jobs = real(*args)
        chunked.extend(j.name for j in jobs if j.mode == "rows" and j.updates and len(j.bounds) > 1)
        return jobs

    monkeypatch.setattr(engine, "_jobs", spy)
    rows = merge_model(base, [(adapter, 1.0)], tmp_path / "rows", dtype=dtype)
    assert bool(chunked) == chunks, chunked
    assert rows.hashes == whole.hashes
    assert hashes(tmp_path / "rows") == hashes(tmp_path / "whole")
    assert rows.metrics["update_rel_error"] == pytest.approx(whole.metrics["update_rel_error"], rel=1e-6)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=1)


@pytest.mark.parametrize("kind", ["lora", "rslora-patterns", "dora", "weighted", "bf16-to-fp16"])
def test_row_chunks_give_the_same_bytes(llama, tmp_path, monkeypatch, kind):
    targets = ["q_proj", "v_proj", "down_proj", "lm_head"]
    options = {"lora": dict(r=4, alpha=8),  # scaling 2: the fused addmm path
               "rslora-patterns": dict(r=4, alpha=3, use_rslora=True, rank_pattern={"down_proj": 6},
                                       alpha_pattern={"q_proj": 5}),  # scalings that are no power of two
               "dora": dict(r=4, alpha=8, use_dora=True),
               "weighted": dict(r=4, alpha=8),
               "bf16-to-fp16": dict(r=4, alpha=8)}[kind]
    adapter = make_lora_adapter(llama, tmp_path / "lora", target_modules=targets, seed=2, **options)
    if kind == "weighted":
        whole = merge_model(llama, [(adapter, 0.75)], tmp_path / "whole")
        monkeypatch.setattr(engine, "MAX_BUFFER", 32 << 10)
        monkeypatch.setattr(engine, "MIN_BUFFER", 32 << 10)
        monkeypatch.setattr(engine, "CHUNK_BYTES", 8 << 10)
        assert merge_model(llama, [(adapter, 0.75)], tmp_path / "rows").hashes == whole.hashes
        return
    merge_both_ways(llama, adapter, tmp_path, monkeypatch, dtype="float16" if kind == "bf16-to-fp16" else "auto")


@pytest.mark.parametrize("dora", [False, True])
def test_row_chunks_fan_in_fan_out(tmp_path, monkeypatch, dora):
    """GPT-2 Conv1D weights are (in, out): LoRA's rows are lora_A's columns. DoRA there normalises
    columns of the stored weight, so it is merged whole."""
    base = make_tiny_model("gpt2", tmp_path / "gpt2", seed=6)
    adapter = make_lora_adapter(base, tmp_path / "lora", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                use_dora=dora, seed=7)
    merge_both_ways(base, adapter, tmp_path, monkeypatch, chunks=not dora)


@pytest.mark.parametrize("how", ["embedding_lora", "modules_to_save", "tokens"])
def test_row_chunks_embeddings(llama, tmp_path, monkeypatch, how):
    from peft import LoraConfig

    # resized vocabularies too (256 -> 330 rows): whole chunks of rows past the base's come from the adapter alone
    if how == "embedding_lora":
        config = LoraConfig(r=2, target_modules=["q_proj", "embed_tokens", "lm_head"])
        adapter = make_peft_adapter(llama, tmp_path / "a", config, seed=3, vocab_size=330, save_embedding_layers=True)
    elif how == "modules_to_save":
        config = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
        adapter = make_peft_adapter(llama, tmp_path / "a", config, seed=3, vocab_size=330)
    else:
        config = LoraConfig(r=2, target_modules=["q_proj", "lm_head"], trainable_token_indices=[3, 5, 100, 200])
        adapter = make_peft_adapter(llama, tmp_path / "a", config, seed=4)
    merge_both_ways(llama, adapter, tmp_path, monkeypatch)


@pytest.mark.parametrize("threads", [1, 2])
def test_blas_rows_do_not_depend_on_the_chunk(threads):
    """Row chunking is exact because torch's CPU BLAS computes each row (and each column) of ``B @ A``
    the same whatever else is computed with it, from ``MIN_ROWS`` rows up; if a BLAS update breaks
    that, this test says so before a merge drifts from peft's."""
    gen = torch.Generator().manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for out_f, in_f, r in [(1000, 777, 7), (2048, 512, 16), (600, 96, 64)]:
            A, B = torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen)
            full = B @ A
            for size in (2 * engine.MIN_ROWS, 2 * engine.MIN_ROWS + 3, 100, 333):
                for r0, r1 in engine._bounds(out_f, size, engine.MIN_ROWS):
                    assert torch.equal(B[r0:r1] @ A, full[r0:r1]), (out_f, in_f, r, size, r0, r1)
                for c0, c1 in engine._bounds(in_f, size, engine.MIN_ROWS):
                    assert torch.equal(B @ A[:, c0:c1], full[:, c0:c1]), (out_f, in_f, r, size, c0, c1)
    finally:
        torch.set_num_threads(before)


def test_bounds_are_even():
    for total in range(1, 400):
        for most in (1, 7, 32, 33, 50, 128):
            bounds = engine._bounds(total, most, 1)
            sizes = [r1 - r0 for r0, r1 in bounds]
            assert bounds[0][0] == 0 and bounds[-1][1] == total and sum(sizes) == total
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(sizes) <= most and max(sizes) - min(sizes) <= 1
            if len(bounds) > 1:
                assert min(sizes) >= most // 2


# ---------------------------------------------------------------- budget, writer, errors from the threads

def test_memory_budget_values():
    assert engine.memory_budget_bytes(None) == 600_000_000
    assert engine.memory_budget_bytes("2GB") == 2_000_000_000
    assert engine.memory_budget_bytes(123456789) == 123456789
    for bad in ("lots", -5, 0, True):
        with pytest.raises(FuseError, match="F103"):
            engine.memory_budget_bytes(bad)
    from stages.steps.merge import PARAMS

    assert PARAMS["memory_budget"].default == "600MB"


def test_tight_budget_still_merges_and_says_so(llama, tmp_path):
    adapter = make_lora_adapter(llama, tmp_path / "lora", target_modules=["q_proj"], seed=2)
    said = []
    whole = merge_model(llama, [(adapter, 1.0)], tmp_path / "a")
    tight = merge_model(llama, [(adapter, 1.0)], tmp_path / "b", memory_budget="10MB", log=said.append)
    assert tight.hashes == whole.hashes and tight.metrics["memory_budget"] == 10_000_000
    assert any("memory budget 10 MB" in line for line in said), said


def test_writer_takes_a_tensor_in_pieces(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(33, 7, generator=gen).to(torch.bfloat16), "b": torch.randn(5, generator=gen),
               "empty": torch.zeros(0, 3), "c": torch.randn(3, 3, generator=gen).to(torch.float16)}
    layout = [(k, v.dtype, v.shape) for k, v in tensors.items()]
    w1 = ShardedWriter(tmp_path / "whole", layout, max_shard_bytes=200)
    w2 = ShardedWriter(tmp_path / "pieces", [(k, {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}
                                              [d], s) for k, d, s in layout], max_shard_bytes=200)
    (tmp_path / "whole").mkdir()
    (tmp_path / "pieces").mkdir()
    for name in w1.order:
        w1.write(name, tensors[name])
        raw = tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        for start in range(0, max(len(raw), 1), 10):
            w2.write(name, raw[start:start + 10])
    assert w1.close() == w2.close()
    assert hashes(tmp_path / "whole") == hashes(tmp_path / "pieces")
    w3 = ShardedWriter(tmp_path / "x", [("a", "F32", (2,))], 100)
    with pytest.raises(ValueError, match="9 bytes given"):
        w3.write("a", b"\0" * 9)


def test_read_error_on_the_reader_thread_is_raised_and_cleans_up(llama, tmp_path, monkeypatch):
    adapter = make_lora_adapter(llama, tmp_path / "lora", target_modules=["q_proj"], seed=2)
    calls = []

    def failing(self, info, offset, view):
        calls.append(info.name)
        if len(calls) == 3:
            raise FuseError("F206", f"{info.path.name} ended while reading tensor {info.name!r}")
        return real(self, info, offset, view)

    real = FileReader.read
    monkeypatch.setattr(FileReader, "read", failing)
    with pytest.raises(FuseError, match="F206"):
        merge_model(llama, [(adapter, 1.0)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_write_error_on_the_writer_thread_is_raised_and_cleans_up(llama, tmp_path, monkeypatch):
    adapter = make_lora_adapter(llama, tmp_path / "lora", target_modules=["q_proj"], seed=2)
    real = ShardedWriter._emit

    def full_disk(self, data):
        if self.bytes_written > 10_000:
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(ShardedWriter, "_emit", full_disk)
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError, match="No space left"):
        merge_model(llama, [(adapter, 1.0)], tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_wide_rows_get_larger_buffers_not_whole_tensors(llama, tmp_path, monkeypatch):
    """Buffers too small for 2 x MIN_ROWS rows grow to hold them (up to MAX_WIDE_BUFFER), so wide rows
    (down_proj of a wide MLP) still stream in row chunks."""
    adapter = make_lora_adapter(llama, tmp_path / "lora", target_modules=["down_proj"], seed=2)
    whole = merge_model(llama, [(adapter, 1.0)], tmp_path / "whole")
    for name, value in [("MAX_BUFFER", 4096), ("MIN_BUFFER", 4096), ("CHUNK_BYTES", 4096)]:
        monkeypatch.setattr(engine, name, value)
    modes = {}
    real = engine._jobs

    def spy(plan, writer, dtype, buffer_bytes):
        jobs = real(plan, writer, dtype, buffer_bytes)
        modes.update({j.name: (j.mode, len(j.bounds), buffer_bytes) for j in jobs if j.updates})
        return jobs

    monkeypatch.setattr(engine, "_jobs", spy)
    assert merge_model(llama, [(adapter, 1.0)], tmp_path / "rows").hashes == whole.hashes
    row = 128 * 4  # down_proj is (64, 128): 128 float32 a row, 32 rows = 16 KiB
    assert modes and all(mode == "rows" and chunks == 2 and size >= 2 * engine.MIN_ROWS * row
                         for mode, chunks, size in modes.values()), modes


def test_tensors_needed_whole_are_named_when_the_budget_is_short(llama, tmp_path):
    a = make_lora_adapter(llama, tmp_path / "a", target_modules=["q_proj"], seed=1)
    b = make_lora_adapter(llama, tmp_path / "b", target_modules=["q_proj"], seed=2)
    said = []
    merge_model(llama, [(a, 0.5), (b, 0.5)], tmp_path / "out", method="ties", density=0.5, memory_budget="10MB",
                log=said.append)
    [line] = [s for s in said if s.startswith("merged whole")]
    assert "model.layers.0.self_attn.q_proj.weight" in line and "ties works on whole updates" in line
