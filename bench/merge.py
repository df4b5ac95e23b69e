"""Merge benchmark (DESIGN §9): Fuse vs peft ``merge_and_unload()`` + ``save_pretrained()`` vs a copy.

Three contenders, each a fresh process run under ``/usr/bin/time -v`` (process start and
imports included), interleaved round by round in one run on a warm page cache:

- **fuse**: ``python -m stages merge BASE ADAPTER OUT --dtype auto``
- **fuse-api** (only with ``--only``): ``stages.peft.merge.merge_model`` called from ``python -c``,
  the engine without the CLI (which hashes the base first)
- **peft**: a script that loads the base in bf16 with transformers, wraps it in
  ``PeftModel.from_pretrained``, ``merge_and_unload()``, ``save_pretrained()``
- **copy**: a script that reads, writes, fsyncs and sha256-hashes every byte of the
  base's files (``cp`` may reflink and tell nothing)

The model (generated once, cached under ``--cache``) is a Llama-shaped bf16 checkpoint:
``--size 1GB`` (default) is ~670M parameters (hidden 2048, intermediate 5632, 12 layers,
32 heads / 4 KV heads, vocab 32000, untied head; 1.34 GB in 3 shards of <= 500 MB), with a
real peft rank-16 LoRA on every linear layer. ``--size 12GB`` is Qwen2-7B-shaped with 22
layers (hidden 3584, intermediate 18944, vocab 152064: 12.4 GB in 4 shards) with a rank-16
LoRA on every linear layer and on ``lm_head`` (152064 x 3584: the tensor that must be
merged in row chunks); there only Fuse and the copy run (peft would need the whole model
in memory), to show Fuse's peak RSS stays under the same budget.

Usage::

    python bench/merge.py                      # 1 GB model, 5 rounds, all three contenders
    python bench/merge.py --rounds 3 --only fuse,copy
    python bench/merge.py --size 12GB          # checks free disk space first

Prints each run as it finishes, then a table (median and best wall time, peak RSS as
``/usr/bin/time -v`` reports it, GB/s of base weights) and the ratios Fuse/peft and
Fuse/copy; once per invocation it checks that Fuse's output equals peft's tensor by tensor
(identical or within 1 ulp). ``--json FILE`` saves everything.

Only the standard library is imported at module level: the copy contender runs this file
(``--copy-worker``) and must not pay for torch.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIME = "/usr/bin/time"

# name -> model shape, shard size, which modules get LoRA
SPECS = {
    "1GB": dict(model_type="llama", hidden=2048, intermediate=5632, layers=12, heads=32, kv_heads=4, vocab=32000,
                bias=False, shard_bytes=500_000_000, lora_head=False),
    "12GB": dict(model_type="qwen2", hidden=3584, intermediate=18944, layers=22, heads=28, kv_heads=4, vocab=152064,
                 bias=True, shard_bytes=4_000_000_000, lora_head=True),
}
RANK, ALPHA = 16, 32
SPEC_VERSION = 1  # bump when the generated files would change
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_CONTENDERS = {"1GB": ("fuse", "peft", "copy"), "12GB": ("fuse", "copy")}


# ---------------------------------------------------------------- the model and the adapter

def tensor_shapes(spec: dict) -> list[tuple[str, tuple]]:
    """The checkpoint's tensors in state-dict order (as transformers shards them)."""
    h, i, v = spec["hidden"], spec["intermediate"], spec["vocab"]
    kv = h // spec["heads"] * spec["kv_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(spec["layers"]):
        p = f"model.layers.{n}."
        out.append((p + "input_layernorm.weight", (h,)))
        for proj, shape in (("q_proj", (h, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, h))):
            out.append((f"{p}self_attn.{proj}.weight", shape))
            if spec["bias"] and proj != "o_proj":
                out.append((f"{p}self_attn.{proj}.bias", shape[:1]))
        out.append((p + "post_attention_layernorm.weight", (h,)))
        out += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def lora_targets(spec: dict) -> list[tuple[str, tuple]]:
    """``(module, (out, in))`` of every module that gets a LoRA."""
    targets = [(name.removesuffix(".weight"), shape) for name, shape in tensor_shapes(spec)
               if name.endswith(".weight") and name.rsplit(".", 2)[-2] in LINEAR]
    if spec["lora_head"]:
        targets.append(("lm_head", (spec["vocab"], spec["hidden"])))
    return targets


def config_dict(spec: dict) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        spec["model_type"], vocab_size=spec["vocab"], hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"], num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"], max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6)
    config.architectures = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[spec["model_type"]]]
    d = config.to_dict()
    d["dtype"] = "bfloat16"
    return d


def write_safetensors(path: Path, entries: list[tuple[str, tuple]], fill) -> None:
    """A bf16 safetensors file written chunk by chunk: names sorted as the safetensors library does;
    ``fill(name, start, count)`` returns the bytes of elements [start, start+count) of tensor ``name``."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    entries = sorted(entries)
    for name, shape in entries:
        size = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    step = 8 << 20  # elements per chunk: 16 MB
    with open(path, "xb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in entries:
            n = _numel(shape)
            for start in range(0, n, step):
                f.write(fill(name, start, min(step, n - start)))
        f.flush()
        os.fsync(f.fileno())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def generate(cache: Path, size: str) -> tuple[Path, Path]:
    """Make (once) the base model and the adapter for ``size``; returns their directories."""
    spec = SPECS[size]
    root = cache / f"llama-{size}" if size == "1GB" else cache / f"qwen2-{size}"
    stamp = {"spec": spec, "rank": RANK, "alpha": ALPHA, "version": SPEC_VERSION}
    base, adapter = root / "base", root / "adapter"
    if (root / "stamp.json").exists() and json.loads((root / "stamp.json").read_text()) == stamp:
        return base, adapter
    shapes = tensor_shapes(spec)
    total = 2 * sum(_numel(s) for _, s in shapes)
    need_free(cache, total + (200 << 20), f"generating the {size} bench model")
    shutil.rmtree(root, ignore_errors=True)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "base").mkdir(parents=True)
    (tmp / "adapter").mkdir()
    started = time.monotonic()
    print(f"generating the {size} bench model ({total / 1e9:.2f} GB, {total // 2 / 1e6:.0f}M parameters) in {root}",
          file=sys.stderr, flush=True)

    import torch

    gen = torch.Generator().manual_seed(1234)
    pool = (torch.randn(1 << 24, generator=gen) * 0.02).to(torch.bfloat16)  # 32 MB of values to draw from
    pool_bytes = pool.view(torch.uint8).numpy().tobytes()
    one = torch.ones(1, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()

    def fill(name, start, count):
        if "norm" in name:
            return one * count
        # deterministic offset per (tensor, chunk), so no two tensors are equal
        seed = int.from_bytes(hashlib.sha256(f"{name}:{start}".encode()).digest()[:8], "little")
        at = seed % ((1 << 24) - count)
        return pool_bytes[2 * at: 2 * (at + count)]

    # shards: greedy in state-dict order, as transformers' save_pretrained does
    shards, size_now = [[]], 0
    for name, shape in shapes:
        nbytes = 2 * _numel(shape)
        if shards[-1] and size_now + nbytes > spec["shard_bytes"]:
            shards.append([])
            size_now = 0
        shards[-1].append((name, shape))
        size_now += nbytes
    weight_map = {}
    for k, entries in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(tmp / "base" / fname, entries, fill)
        weight_map.update({name: fname for name, _ in entries})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "base" / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "base" / "config.json").write_text(json.dumps(config_dict(spec), indent=2) + "\n")
    (tmp / "base" / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")

    # a real peft LoRA: the config from peft itself, tensors under peft's saved key names
    from peft import LoraConfig
    from safetensors.torch import save_file

    targets = lora_targets(spec)
    modules = sorted({m.rsplit(".", 1)[-1] for m, _ in targets})
    LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=modules, lora_dropout=0.0, bias="none",
               task_type="CAUSAL_LM", base_model_name_or_path=str(base)).save_pretrained(tmp / "adapter")
    tensors = {}
    for module, (out_f, in_f) in targets:
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, in_f, generator=gen) / in_f ** 0.5
        tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, RANK, generator=gen) * 0.005
    save_file(tensors, tmp / "adapter" / "adapter_model.safetensors", metadata={"format": "pt"})
    (tmp / "stamp.json").write_text(json.dumps(stamp))
    tmp.rename(root)
    print(f"generated in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return base, adapter


def need_free(path: Path, nbytes: int, what: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < nbytes:
        sys.exit(f"not enough free disk space for {what}: need {nbytes / 1e9:.1f} GB in {path}, "
                 f"{free / 1e9:.1f} GB free (give --cache / --out on a larger disk)")


# ---------------------------------------------------------------- the contenders (worker processes)

def copy_worker(src: Path, dst: Path) -> None:
    """Read, write, fsync and sha256 every file of ``src`` into the new directory ``dst``."""
    dst.mkdir(parents=True)
    chunk = 8 << 20
    buf = bytearray(chunk)
    view = memoryview(buf)
    hashes = {}
    for path in sorted(src.iterdir()):
        if not path.is_file():
            continue
        sha = hashlib.sha256()
        with open(path, "rb", buffering=0) as fin, open(dst / path.name, "xb", buffering=0) as fout:
            while n := fin.readinto(buf):
                fout.write(view[:n])
                sha.update(view[:n])
            os.fsync(fout.fileno())
        hashes[path.name] = sha.hexdigest()
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    print(json.dumps(hashes), file=sys.stderr)


PEFT_SCRIPT = """\
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
model.save_pretrained(out)
"""


# Fuse's engine without the CLI around it (the one-shot CLI first hashes the base: see docs/performance.md)
FUSE_API_SCRIPT = """\
import sys
from stages.peft.merge import merge_model
merge_model(sys.argv[1], [(sys.argv[2], 1.0)], sys.argv[3])
"""


def commands(name: str, base: Path, adapter: Path, out: Path) -> list[str]:
    py = sys.executable
    if name == "fuse":
        return [py, "-m", "stages", "merge", str(base), str(adapter), str(out), "--dtype", "auto"]
    if name == "fuse-api":
        return [py, "-c", FUSE_API_SCRIPT, str(base), str(adapter), str(out)]
    if name == "peft":
        return [py, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out)]
    if name == "copy":
        return [py, str(Path(__file__).resolve()), "--copy-worker", str(base), str(out)]
    raise ValueError(name)


# ---------------------------------------------------------------- measuring

def run_one(name: str, base: Path, adapter: Path, out: Path) -> dict:
    """One contender in a fresh process: wall time, whole-process peak RSS (MB), exit status."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = commands(name, base, adapter, out)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    report = out.with_name(out.name + ".time")
    use_time = os.access(TIME, os.X_OK)
    if use_time:
        cmd = [TIME, "-v", "-o", str(report)] + cmd
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: the fallback peak RSS
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{name} failed (exit {proc.returncode}):\n{stderr.decode(errors='replace')[-3000:]}")
    rss_kb = usage.ru_maxrss
    if use_time:
        for line in report.read_text().splitlines():
            if "Maximum resident set size" in line:
                rss_kb = int(line.rsplit(":", 1)[1])
        report.unlink()
    return {"wall_s": wall, "peak_rss_mb": rss_kb / 1024, "source": "/usr/bin/time -v" if use_time else "wait4"}


def worker(*args) -> object:
    """Run this file with ``args`` in a child process; its last stdout line is JSON."""
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"bench/merge.py {' '.join(args)} failed (exit {r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


def warm(paths) -> None:
    """Read every file once so that every contender starts from a warm page cache."""
    for root in paths:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file():
                with open(path, "rb", buffering=0) as f:
                    while f.read(16 << 20):
                        pass


def check_equal(fuse_out: Path, peft_out: Path) -> dict:
    """Fuse's tensors vs peft's, tensor by tensor: identical, or within 1 ulp (same dtype)."""
    import torch
    from safetensors import safe_open

    def tensors(root):
        files = {}
        for f in sorted(root.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                files.update({k: f for k in h.keys()})
        return files

    ours, theirs = tensors(fuse_out), tensors(peft_out)
    result = {"tensors": len(ours), "identical": 0, "within_1_ulp": 0, "worse": [], "missing": [],
              "extra": sorted(set(ours) - set(theirs)), "max_ulp": 0.0}
    result["missing"] = sorted(set(theirs) - set(ours))
    for name in sorted(set(ours) & set(theirs)):
        with safe_open(ours[name], "pt") as f:
            a = f.get_tensor(name)
        with safe_open(theirs[name], "pt") as f:
            b = f.get_tensor(name)
        if a.dtype != b.dtype or a.shape != b.shape:
            result["worse"].append(f"{name}: {a.dtype} {list(a.shape)} vs {b.dtype} {list(b.shape)}")
            continue
        if torch.equal(a, b):
            result["identical"] += 1
            continue
        ref = b.abs()
        ulp = (torch.nextafter(ref, torch.full_like(ref, float("inf"))) - ref).float()
        worst = ((a.float() - b.float()).abs() / ulp).max().item()
        result["max_ulp"] = max(result["max_ulp"], worst)
        if worst <= 1.0:
            result["within_1_ulp"] += 1
        else:
            result["worse"].append(f"{name}: {worst:.2f} ulp")
    result["ok"] = not (result["worse"] or result["missing"] or result["extra"])
    return result


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    from importlib.metadata import version

    libs = {}
    for lib in ("torch", "transformers", "peft", "safetensors"):
        try:
            libs[lib] = version(lib)
        except Exception:  # noqa: BLE001 - a missing library is just not listed
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mb": mem, "kernel": platform.release(),
            "python": platform.python_version(), "load_average": os.getloadavg(), **libs}


def summarize(runs: dict, weights_bytes: int) -> dict:
    table = {}
    for name, rs in runs.items():
        walls = [r["wall_s"] for r in rs]
        med = statistics.median(walls)
        table[name] = {"runs": len(rs), "median_s": med, "best_s": min(walls),
                       "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                       "gb_per_s": weights_bytes / 1e9 / med, "walls": walls}
    return table


def print_table(table: dict, budget_mb: float) -> None:
    print(f"\n{'contender':<10}{'runs':>5}{'median s':>10}{'best s':>9}{'peak RSS MB':>13}{'GB/s':>7}")
    for name, row in table.items():
        print(f"{name:<10}{row['runs']:>5}{row['median_s']:>10.2f}{row['best_s']:>9.2f}"
              f"{row['peak_rss_mb']:>13.0f}{row['gb_per_s']:>7.2f}")
    if "fuse" in table:
        fuse = table["fuse"]
        for other in ("peft", "copy"):
            if other in table:
                o = table[other]
                print(f"fuse/{other}: median {fuse['median_s'] / o['median_s']:.2f}x, best "
                      f"{fuse['best_s'] / o['best_s']:.2f}x  ({other} takes {o['median_s'] / fuse['median_s']:.2f}x "
                      f"Fuse's median time)")
        verdict = "within" if fuse["peak_rss_mb"] <= budget_mb else "ABOVE"
        print(f"fuse peak RSS {fuse['peak_rss_mb']:.0f} MB: {verdict} the {budget_mb:.0f} MB budget")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SPECS), default="1GB")
    p.add_argument("--cache", type=Path, default=Path("/tmp/fuse-bench"), help="where the model is generated, once")
    p.add_argument("--out", type=Path, default=None, help="where outputs are written (default: CACHE/out)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of all contenders (default 5; 12GB: 1)")
    p.add_argument("--only", default=None, help="comma-separated contenders (fuse, fuse-api, peft, copy)")
    p.add_argument("--no-check", action="store_true", help="skip the Fuse vs peft tensor comparison")
    p.add_argument("--budget-mb", type=float, default=600, help="the peak RSS Fuse must stay under")
    p.add_argument("--json", type=Path, default=None, help="write runs, table and machine to this file")
    p.add_argument("--copy-worker", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    p.add_argument("--generate-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--check-worker", nargs=2, metavar=("FUSE", "PEFT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.copy_worker:
        copy_worker(Path(args.copy_worker[0]), Path(args.copy_worker[1]))
        return 0
    if args.generate_worker:
        print(json.dumps([str(d) for d in generate(args.cache, args.size)]))
        return 0
    if args.check_worker:
        print(json.dumps(check_equal(Path(args.check_worker[0]), Path(args.check_worker[1]))))
        return 0

    if not os.access(TIME, os.X_OK):
        print(f"{TIME} is missing (Debian: apt-get install time); peak RSS comes from wait4()'s ru_maxrss instead",
              file=sys.stderr)
    contenders = tuple(args.only.split(",")) if args.only else DEFAULT_CONTENDERS[args.size]
    rounds = args.rounds or (5 if args.size == "1GB" else 1)
    # torch work (generating, comparing) runs in child processes: this one stays small, so that a peak
    # RSS from wait4() (no /usr/bin/time) is not inflated by the parent it was forked from
    base, adapter = map(Path, worker("--generate-worker", "--size", args.size, "--cache", str(args.cache)))
    out_root = args.out or args.cache / "out"
    weights = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    need_free(out_root, int(weights * 1.05) + (1 << 30), f"one {args.size} output at a time")
    print(f"base {base} ({weights / 1e9:.2f} GB of weights), adapter {adapter}; outputs in {out_root}",
          file=sys.stderr)
    warm([base, adapter])
    runs = {name: [] for name in contenders}
    check = None
    for k in range(rounds):
        order = contenders[k % len(contenders):] + contenders[:k % len(contenders)]  # rotate who goes first
        for name in order:
            out = out_root / name
            r = run_one(name, base, adapter, out)
            runs[name].append(r)
            print(f"round {k + 1}/{rounds} {name:<5} {r['wall_s']:7.2f} s  peak RSS {r['peak_rss_mb']:6.0f} MB",
                  file=sys.stderr, flush=True)
            keep = check is None and not args.no_check and name in ("fuse", "peft") and \
                {"fuse", "peft"} <= set(contenders)
            if not keep:
                shutil.rmtree(out, ignore_errors=True)
        if check is None and not args.no_check and {"fuse", "peft"} <= set(contenders):
            check = worker("--check-worker", str(out_root / "fuse"), str(out_root / "peft"))
            print(f"check: {check['tensors']} tensors, {check['identical']} identical, {check['within_1_ulp']} "
                  f"within 1 ulp, max {check['max_ulp']:.2f} ulp: {'OK' if check['ok'] else 'MISMATCH'}",
                  file=sys.stderr, flush=True)
            shutil.rmtree(out_root / "fuse", ignore_errors=True)
            shutil.rmtree(out_root / "peft", ignore_errors=True)
    table = summarize(runs, weights)
    print(f"\n{args.size} model: {weights / 1e9:.2f} GB of bf16 weights, rank-{RANK} LoRA; {rounds} rounds, "
          f"interleaved; warm page cache; process start included")
    print_table(table, args.budget_mb)
    if check is not None:
        print(f"fuse == peft: {check['identical']} tensors identical, {check['within_1_ulp']} within 1 ulp "
              f"(max {check['max_ulp']:.2f}){'' if check['ok'] else ', MISMATCH: ' + '; '.join(check['worse'][:5])}")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "weights_bytes": weights, "rounds": rounds, "runs": runs,
                                         "table": table, "check": check, "machine": machine()}, indent=2) + "\n")
    return 0 if check is None or check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
