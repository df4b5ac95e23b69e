"""Pre-flight (``validate``) on a ~15 GB model made of real headers and sparse files.

The model is a Mistral-7B-shaped bf16 checkpoint (7.25 B parameters, 14.5 GB, three
shards + index, a 32k-token tokenizer.json): every shard has a real safetensors header
and is then extended with ``os.truncate``, so it takes a few MB of disk and a second to
make. The adapter is a real LoRA file (random float32 factors). The pre-flight reads
headers, configs and the adapter, never the base's tensor data, so its time does not
depend on the 14.5 GB.

    python bench/preflight_sparse.py [--dir /tmp/fuse-sparse] [--rank 16] [--runs 5]

prints, for each run, the wall time of a fresh ``python -c`` process that imports Fuse and
runs :func:`stages.steps.validate.preflight` (process start and imports included), and the
time ``preflight`` itself reports. The builder is imported by tests/test_validate.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

MISTRAL_7B = dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=32768)
SHARD_BYTES = 5_000_000_000


def _tensors(hidden, layers, heads, kv_heads, intermediate, vocab):
    """(name, shape) of a Llama/Mistral checkpoint, in transformers' order."""
    head_dim = hidden // heads
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "mlp.down_proj.weight", (hidden, intermediate)
        yield p + "mlp.gate_proj.weight", (intermediate, hidden)
        yield p + "mlp.up_proj.weight", (intermediate, hidden)
        yield p + "post_attention_layernorm.weight", (hidden,)
        yield p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)
        yield p + "self_attn.o_proj.weight", (hidden, hidden)
        yield p + "self_attn.q_proj.weight", (hidden, hidden)
        yield p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def _write_sparse_shard(path: Path, entries: list, dtype: str, item: int) -> int:
    """A safetensors file whose header is real and whose data is a hole (``os.truncate``)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        size = math.prod(shape) * item
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
    os.truncate(path, 8 + len(raw) + offset)
    return offset


def make_sparse_model(out_dir, *, hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=32768,
                      shard_bytes=SHARD_BYTES) -> tuple[Path, int]:
    """A bf16 Llama-architecture model directory at ``out_dir`` whose shards are sparse files.
    Returns (directory, total bytes of tensor data)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards, size = [[]], 0
    for name, shape in _tensors(hidden, layers, heads, kv_heads, intermediate, vocab):
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for k, entries in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        total += _write_sparse_shard(out / fname, entries, "BF16", 2)
        weight_map.update({name: fname for name, _ in entries})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate, "vocab_size": vocab, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    vocab_map = {f"tok{i}": i for i in range(vocab - 8)}
    added = [{"id": i, "content": f"<extra_{i}>", "special": True} for i in range(vocab - 8, vocab)]
    (out / "tokenizer.json").write_text(json.dumps({"version": "1.0", "added_tokens": added,
                                                    "model": {"type": "BPE", "vocab": vocab_map, "merges": []}}))
    return out, total


def make_lora(out_dir, *, hidden=4096, layers=32, heads=32, kv_heads=8, rank=16,
              targets=("q_proj", "k_proj", "v_proj", "o_proj"), base_name="mistralai/Mistral-7B-v0.1") -> Path:
    """A real LoRA adapter file for :func:`make_sparse_model`'s architecture (random float32 factors)."""
    import numpy as np

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    dims = {"q_proj": (hidden, hidden), "k_proj": (kv_heads * head_dim, hidden),
            "v_proj": (kv_heads * head_dim, hidden), "o_proj": (hidden, hidden)}
    rng = np.random.default_rng(0)
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for i in range(layers):
        for t in targets:
            out_f, in_f = dims[t]
            for role, shape in (("lora_A", (rank, in_f)), ("lora_B", (out_f, rank))):
                data = (rng.standard_normal(shape, dtype=np.float32) * 0.01).tobytes()
                name = f"base_model.model.model.layers.{i}.self_attn.{t}.{role}.weight"
                header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
                blobs.append(data)
                offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(out / "adapter_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for blob in blobs:
            f.write(blob)
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": base_name, "r": rank, "lora_alpha": 2 * rank,
        "target_modules": list(targets), "fan_in_fan_out": False, "bias": "none", "task_type": "CAUSAL_LM"}))
    return out


TIMED = """
import sys, time
t = time.perf_counter()
from stages.steps.validate import preflight
r = preflight(sys.argv[1], [(sys.argv[2], 1.0)], room=(sys.argv[3], int(sys.argv[4])))
print(f"{time.perf_counter() - t:.3f} {r['seconds']:.3f} {r['plan']['tensors_updated']} {len(r['warnings'])}")
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/fuse-sparse-bench")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    root = Path(args.dir)
    t = time.perf_counter()
    base, total = make_sparse_model(root / "base")
    adapter = make_lora(root / "adapter", rank=args.rank)
    disk = sum(os.stat(p).st_blocks * 512 for p in root.rglob("*") if p.is_file())
    print(f"model: {total / 1e9:.2f} GB of bf16 tensors in {len(list(base.glob('*.safetensors')))} sparse shards "
          f"({disk / 1e6:.1f} MB on disk with the adapter), built in {time.perf_counter() - t:.1f}s")
    print("run  process_s  preflight_s  tensors_updated  warnings")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for i in range(args.runs):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", TIMED, str(base), str(adapter), str(root), str(total)],
                           capture_output=True, text=True, env=env, check=True)
        wall = time.perf_counter() - t
        _, inner, updated, warnings = r.stdout.split()
        print(f"{i + 1:>3}  {wall:9.3f}  {float(inner):11.3f}  {updated:>15}  {warnings:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
