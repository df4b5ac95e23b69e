"""merge_model: fold adapters into a base model, streaming tensor by tensor.

Per output tensor: read it from the base (``preadv``), apply every update in float32,
round once to the output dtype, write it (hashing as it goes), drop it. Large tensors go
in row chunks, so peak memory is a few buffers under a budget (600 MB for the whole
process by default), whatever the model's size; reading ahead, merging, and writing with
hashing run on three threads. The base is only ever opened for reading. Numbers and design:
docs/performance.md.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import mmap
import os
import queue
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from stages.findings import FuseError
from stages.io.safetensors import (FLOAT_DTYPES, ITEMSIZE, ShardedWriter, TensorInfo, copy_file, fsync_dir,
                                   torch_dtype, write_file)
from stages.peft import family_for
from stages.peft.adapter import load_adapter
from stages.peft.combine import check_method, combine
from stages.peft.plan import HEAD, MergePlan, plan_merge
from stages.peft.quantized import DequantizedWeights, nf4_round_trip, nf4_targets, open_base

DTYPES = ("auto", "float32", "bfloat16", "float16")
BASE_PRECISIONS = ("original", "nf4")
# Update kinds that add a ΔW independent of the tensor they are added to (the rest are functions of W0).
ADDITIVE = ("linear", "embedding", "bias", "conv", "experts", "additive")

# Weight files of the base: the merged output replaces them, so they are never copied.
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json",
                   "*.pth", "*.pt", "*.ckpt", "*.gguf", "tf_model*.h5", "flax_model*.msgpack*")
ADAPTER_PATTERNS = ("adapter_config.json", "adapter_model.*")
# Files of the adapter directory that win over the base's: the tokenizer and chat template it was trained with.
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                      "spiece.model", "sentencepiece*.model", "chat_template*")
SKIP_DIRS = (".git", ".cache")


@dataclass
class MergeReport:
    metrics: dict
    hashes: dict[str, str]  # relpath in out_dir -> sha256, for every file written


def merge_model(base_dir, adapters, out_dir, dtype: str = "auto", max_shard_bytes=5_000_000_000,
                on_bytes=None, log=None, *, method: str = "linear", density: float | None = None,
                seed: int | None = None, base_precision: str = "original",
                nf4_double_quant: bool = False, memory_budget: int | str | None = None) -> MergeReport:
    """Merge ``adapters`` (``[(path, weight)]``) into the model at ``base_dir``, writing ``out_dir``.

    ``dtype="auto"`` keeps every tensor's dtype; otherwise float tensors are written in
    ``dtype``. ``on_bytes(n)`` is called with the base bytes processed after each tensor.
    ``out_dir`` may exist but must be empty; on failure what was written is removed.
    Same inputs give byte-identical outputs.

    ``method``: ``linear`` (W0 + Σ wᵢ·ΔWᵢ, adapters applied in order), or ``ties`` /
    ``dare_linear`` / ``dare_ties`` on the full updates ΔWᵢ = Wᵢ − W0 (``density``; DARE needs
    ``seed``); see docs/merging.md. ``base_precision="nf4"`` merges into the NF4 round trip of
    the base (QLoRA); a bitsandbytes 4/8-bit base is always dequantized.

    ``memory_budget`` (bytes, or a size such as ``"600MB"``; default 600 MB): the whole-process peak
    RSS to stay under, Python and torch included. The merge streams in pieces sized from what the
    budget leaves, so its peak does not grow with the model; only tensors whose updates need them
    whole (OFT, IA3, TIES/DARE, NF4, ...) are held whole, and a log line names any that may not fit.
    """
    started = time.monotonic()
    log = log or (lambda message: None)
    if dtype not in DTYPES:
        raise FuseError("F103", f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", key="dtype")
    if base_precision not in BASE_PRECISIONS:
        raise FuseError("F103", f"base_precision must be one of {', '.join(BASE_PRECISIONS)}, got {base_precision!r}",
                        key="base_precision")
    density = check_method(method, density, seed, len(adapters))
    budget = memory_budget_bytes(memory_budget)
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    adapter_list = [load_adapter(Path(path), weight) for path, weight in adapters]
    _check_output(out_dir, base_dir, [a.path for a in adapter_list])
    base = open_base(base_dir)
    if isinstance(base, DequantizedWeights):
        log(f"the base is a {base.quantization} checkpoint: dequantizing each weight as it is read")
        if base_precision == "nf4":
            raise FuseError("F103", "base_precision: nf4 round-trips a 16-bit base; this base is already quantized "
                            f"({base.quantization}) and is merged into its dequantized weights", key="base_precision",
                            fix="drop base_precision, or point base at the 16-bit model")
    plan = plan_merge(base, adapter_list, method=method)
    plan.options = {"density": density, "seed": seed,
                    "nf4": nf4_targets(base) if base_precision == "nf4" else set(), "double_quant": nf4_double_quant}

    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = [(name, _out_dtype(info.dtype, dtype), plan.shape(name))
              for name, info in plan.outputs.items()]
    writer = ShardedWriter(out_dir, layout, max_shard_bytes)
    try:
        counts = _write_weights(plan, writer, dtype, on_bytes, log, budget)
        hashes = writer.close()
        side_hashes, side_bytes = _write_side_files(plan, out_dir, dtype)
        hashes.update(side_hashes)
        fsync_dir(out_dir)
    except BaseException:  # out_dir was empty: everything in it is ours, and half-written
        writer.abort()
        for child in out_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
        if created:
            out_dir.rmdir()
        raise
    metrics = dict(counts, bytes_written=writer.bytes_written + side_bytes, files_written=len(hashes),
                   untied_embeddings=plan.untie, seconds=round(time.monotonic() - started, 3), method=method,
                   base_precision=base_precision, memory_budget=budget)
    if plan.vocab_size is not None:
        metrics["vocab_size"] = plan.vocab_size
    if isinstance(base, DequantizedWeights):
        metrics["dequantized"] = base.quantization
    return MergeReport(metrics=metrics, hashes=dict(sorted(hashes.items())))


def _check_output(out_dir: Path, base_dir: Path, adapter_dirs: list[Path]) -> None:
    """F207 when writing ``out_dir`` could touch the base or an adapter, or clobber files."""
    out = out_dir.resolve()
    for what, src in [("base model", base_dir)] + [("adapter", a) for a in adapter_dirs]:
        src = src.resolve()
        if out == src or src in out.parents or out in src.parents:
            raise FuseError("F207", f"output {out_dir} overlaps the {what} directory {src}", file=out_dir,
                            fix="write the merged model to a directory outside the base and adapter directories")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FuseError("F207", f"output {out_dir} already exists and is not an empty directory", file=out_dir,
                        fix="give a new or empty directory")


def _out_dtype(base_dtype: str, dtype: str) -> str:
    """Safetensors dtype of an output tensor: float tensors follow ``dtype``, others keep theirs."""
    if dtype == "auto" or base_dtype not in FLOAT_DTYPES:
        return base_dtype
    return {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]


def _write_weights(plan: MergePlan, writer: ShardedWriter, dtype: str, on_bytes, log, budget: int) -> dict:
    """Every output tensor in the writer's order: read, merge in float32, round once, write.

    Streaming (see :class:`_Stream`): a reader thread reads the next pieces ahead into a few
    reused buffers, this thread merges them, a writer thread writes and hashes them. Tensors
    without updates in their own dtype are copied as bytes; tensors whose updates act row by
    row (LoRA, DoRA, embedding LoRA, trained tokens, replacements) go in row chunks; the rest
    (functions of the whole tensor: OFT, IA3, TIES/DARE, NF4 round trips, ...) whole.
    """
    import torch

    if plan.untie:
        log(f"the adapter changes {HEAD} or the embedding it is tied to: writing {HEAD} on its own and setting "
            "tie_word_embeddings=false")
    nf4 = plan.options.get("nf4", set())
    if nf4:
        log(f"base_precision nf4: merging into the NF4 round trip of {len(nf4)} linear weights")
    buffer_bytes = _buffer_bytes(budget, log)
    buffer_bytes = max(buffer_bytes, _widest_rows(plan, writer, dtype))
    jobs = _jobs(plan, writer, dtype, buffer_bytes)
    _warn_whole(jobs, budget, buffer_bytes, log)
    kept = Retention()
    merged = 0
    threads = torch.get_num_threads()
    stream = _Stream(plan, writer, jobs, buffer_bytes)
    work = _Work(buffer_bytes)
    try:
        with torch.no_grad():
            rows = None
            for item in stream:
                job = item.job
                if item.kind == "raw":
                    stream.write(job.name, item.buffer, item.nbytes, stream.read_pool)
                    progress = item.nbytes
                elif item.kind == "rows":
                    if torch.get_num_threads() != 1:  # one core merges, one writes and hashes: more contend
                        torch.set_num_threads(1)
                    if item.first:
                        rows = _Rows(plan, job, work)
                        merged += bool(job.updates)
                    out = stream.out_buffer()
                    try:
                        nbytes = rows.chunk(item, out, kept)
                    except BaseException:
                        stream.out_pool.put(out)
                        raise
                    finally:
                        stream.read_pool.put(item.buffer)
                    stream.write(job.name, out, nbytes, stream.out_pool)
                    progress = item.base_bytes
                    if item.last:
                        kept.finish(job.name)
                else:
                    # a large tensor merged whole may use every core (OFT's rotations are big products);
                    # switching costs ~10 ms (the thread pool restarts), so small ones stay on one
                    cores = threads if math.prod(job.shape) >= WHOLE_THREADED or _thread_sensitive(job) else 1
                    if cores != torch.get_num_threads():
                        torch.set_num_threads(cores)
                    result = _whole(plan, job, item.tensor, kept)
                    merged += bool(job.updates)
                    stream.write(job.name, result, None, None)
                    progress = job.info.nbytes
                if on_bytes and job.name in plan.base:  # progress counts base bytes; an untied lm_head is extra
                    on_bytes(progress)
            stream.finish()
    finally:
        stream.close()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return {"tensors_merged": merged, "tensors_copied": len(writer.order) - merged,
            "adapter_tensors": sum(len(a.tensors) for a in plan.adapters), **kept.metrics(), "nf4_tensors": len(nf4)}


# ---------------------------------------------------------------- streaming: memory, jobs, threads

DEFAULT_MEMORY_BUDGET = 600_000_000  # whole-process peak RSS the merge stays under (import torch included)
MAX_BUFFER = 16 << 20   # bytes per buffer: larger pieces gain nothing and leave the caches
MIN_BUFFER = 4 << 20
MAX_WIDE_BUFFER = 64 << 20  # the largest buffer very wide rows may ask for (_widest_rows)
CHUNK_BYTES = 4 << 20  # float32 bytes merged at a time: small enough to stay in the caches between steps
MIN_ROWS = 16           # the fewest rows a row chunk of a matrix product has (see _bounds)
BUFFERS = 12            # buffer-sized blocks a streaming merge holds at most: 3 read, 3 out, work, W0, temporaries
HEADROOM = 48 << 20     # adapter tensors, Python objects, library workspaces
READ_BUFFERS = OUT_BUFFERS = 3
WHOLE_THREADED = 1 << 22  # elements from which a tensor merged whole gets all of torch's threads
# Update kinds applied row chunk by row chunk: each output row depends on the same row of the base
# (or of a replacement) alone. fan_in_fan_out DoRA and DoRA on embeddings normalise columns: whole.
ROW_KINDS = {"LORA": ("linear", "dora_linear", "embedding", "tokens"), "TRAINABLE_TOKENS": ("tokens",)}


def memory_budget_bytes(value) -> int:
    """The merge's memory budget in bytes from an int, or a size such as ``"600MB"`` (decimal units, as
    ``max_shard_size``; ``MiB``/``GiB`` binary); None: the default."""
    if value is None:
        return DEFAULT_MEMORY_BUDGET
    if isinstance(value, str):
        units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
        text = value.strip().upper().replace(" ", "")
        unit = next((u for u in sorted(units, key=len, reverse=True) if text.endswith(u)), "B")
        number = text[: len(text) - len(unit)] if text.endswith(unit) else text
        value = float(number) * units[unit] if number.replace(".", "", 1).isdigit() else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise FuseError("F103", f"memory_budget must be a positive size, got {value!r}", key="merge.memory_budget",
                        fix="write e.g. 600MB or 2GB")
    return int(value)


def _rss() -> int:
    """This process's resident memory now, in bytes (its peak so far where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _buffer_bytes(budget: int, log) -> int:
    """Size of each streaming buffer: what the budget leaves after the process as it is now (Python,
    torch) and a headroom, shared among :data:`BUFFERS` blocks, within [MIN_BUFFER, MAX_BUFFER]."""
    held = _rss()
    spare = budget - held - HEADROOM
    size = min(MAX_BUFFER, max(MIN_BUFFER, spare // BUFFERS // MIN_BUFFER * MIN_BUFFER))
    if spare < BUFFERS * MIN_BUFFER:
        log(f"memory budget {budget / 1e6:.0f} MB: the process already holds {held / 1e6:.0f} MB (Python and "
            f"torch); merging in the smallest pieces ({BUFFERS} x {MIN_BUFFER >> 20} MiB), which may pass the budget")
    return size


def _widest_rows(plan: MergePlan, writer: ShardedWriter, dtype: str) -> int:
    """The buffer size that holds ``2 * MIN_ROWS`` rows of the widest tensor merged in row chunks (whole
    otherwise): a model with very wide rows (e.g. down_proj of a 53248-wide MLP) gets larger buffers
    rather than float32 copies of whole tensors. Capped at :data:`MAX_WIDE_BUFFER`."""
    widest = 0
    for name in writer.order:
        info, updates = plan.outputs[name], plan.updates.get(name)
        if updates and not _needs_whole(plan, info, updates, tuple(plan.shape(name))):
            out = _out_dtype(info.dtype, dtype)
            widest = max(widest, math.prod(plan.shape(name)[1:]) * max(4, ITEMSIZE[info.dtype], ITEMSIZE[out]))
    need = -(-2 * MIN_ROWS * widest // MIN_BUFFER) * MIN_BUFFER
    return min(need, MAX_WIDE_BUFFER)


@dataclass
class _Job:
    """One output tensor and how it is streamed: ``raw`` (bytes copied), ``rows`` (row chunks
    ``bounds`` of rows of ``row`` elements), or ``whole``."""

    name: str
    info: TensorInfo   # the base tensor it starts from
    dtype: str         # output dtype (safetensors)
    shape: tuple       # output shape
    updates: list
    mode: str
    row: int = 1       # rows: elements per row
    bounds: list = field(default_factory=list)  # rows: [(first row, end row)] of each chunk
    why: str = ""      # whole: why


def _jobs(plan: MergePlan, writer: ShardedWriter, dtype: str, buffer_bytes: int) -> list[_Job]:
    jobs = []
    for name in writer.order:
        info = plan.outputs[name]
        out, shape, updates = _out_dtype(info.dtype, dtype), tuple(plan.shape(name)), plan.updates.get(name, [])
        job = _Job(name, info, out, shape, updates, "whole")
        job.why = _needs_whole(plan, info, updates, shape)
        widest = max(4 if updates else 1, ITEMSIZE[info.dtype], ITEMSIZE[out])
        if job.why:
            pass
        elif not updates and out == info.dtype:
            job.mode = "raw"
        elif not updates:  # a dtype change alone: flat pieces
            job.mode, job.row = "rows", 1
            job.bounds = _bounds(math.prod(shape), max(1, buffer_bytes // widest), 1)
        else:
            job.row = math.prod(shape[1:])
            most = buffer_bytes // (job.row * widest)  # rows a buffer holds
            most = min(most, max(2 * MIN_ROWS, CHUNK_BYTES // (job.row * widest)))
            if shape[0] > most and most < 2 * MIN_ROWS:
                job.why = f"{2 * MIN_ROWS} rows of it ({2 * MIN_ROWS * job.row * widest >> 20} MiB in float32) are " \
                          "more than a buffer holds"
            elif shape[0] > most:
                job.mode, job.bounds = "rows", _bounds(shape[0], most, MIN_ROWS)
            # else: it fits in one chunk, merged whole by _merge_tensor, as peft would (and the same bytes)
        jobs.append(job)
    return jobs


def _bounds(total: int, most: int, least: int) -> list[tuple[int, int]]:
    """``total`` rows in chunks of at most ``most`` rows, as even as possible: every chunk has at least
    ``most // 2`` rows (when there are several), so none is a tiny remainder. That matters for
    exactness: torch's CPU BLAS (MKL) computes each row of ``B @ A`` bit for bit the same whether the
    product has 12 rows or thousands, but not for a handful of rows (tested in
    tests/test_merge_memory.py); chunks of ``least`` rows or more keep row chunking exact."""
    n = -(-total // most)
    size, extra = divmod(total, n)
    bounds, r0 = [], 0
    for k in range(n):
        r1 = r0 + size + (k < extra)
        bounds.append((r0, r1))
        r0 = r1
    assert n == 1 or size >= least, (total, most, least)
    return bounds


def _needs_whole(plan: MergePlan, info: TensorInfo, updates: list, shape: tuple) -> str:
    """Why the tensor must be in memory whole, or "" when it can stream."""
    if info.nbytes == 0 or math.prod(shape) == 0:
        return "empty"
    if info.name in plan.options.get("nf4", ()):
        return "base_precision nf4 round-trips it whole"
    if info.name in getattr(plan.base, "parts", {}):
        return "it is dequantized from bitsandbytes whole"
    if not updates:
        return ""
    if plan.method != "linear":
        return f"{plan.method} works on whole updates"
    if len(shape) != 2:
        return f"a {len(shape)}-D tensor"
    for u in updates:
        if u.kind == "replace":
            continue
        if u.kind not in ROW_KINDS.get(u.peft_type, ()) or (u.kind == "dora_linear" and u.fan_in_fan_out):
            return f"{u.peft_type} {u.kind} updates need the whole tensor"
    replacements = _chosen_replacements([u for u in updates if u.kind == "replace"])
    if any(tuple(plan.adapters[u.adapter].tensors[u.tensors["tensor"]].shape) != shape for u in replacements):
        return "a replacement of another shape"
    if tuple(shape) != tuple(info.shape) and not replacements:
        return "resized"
    return ""


def _warn_whole(jobs: list, budget: int, buffer_bytes: int, log) -> None:
    """One line naming the tensors that must be merged whole and may take the process past the budget."""
    spare = budget - _rss() - HEADROOM - (READ_BUFFERS + OUT_BUFFERS) * buffer_bytes
    big = []
    for job in jobs:
        if job.mode == "whole" and job.why and job.why != "empty":
            need = math.prod(job.shape) * 4 * 3  # the float32 tensor, its start and one temporary
            if need > spare:
                big.append(f"{job.name} (~{need / 1e6:.0f} MB: {job.why})")
    if big:
        more = f" and {len(big) - 3} more" if len(big) > 3 else ""
        log(f"merged whole, which may pass the memory budget of {budget / 1e6:.0f} MB: {'; '.join(big[:3])}{more}")


def _chosen_replacements(replacements: list) -> list:
    copies = [u for u in replacements if not u.extra.get("original")]
    return copies or replacements  # a trained copy supersedes the (resized) module it was made from


@dataclass
class _Item:
    """A piece of the model read ahead: raw bytes, rows ``[r0, r1)`` (``base_bytes`` of them from the
    base: none past the end of a resized tensor), or a whole tensor."""

    kind: str
    job: _Job
    buffer: object = None
    nbytes: int = 0
    r0: int = 0
    r1: int = 0
    base_bytes: int = 0
    first: bool = False
    last: bool = False
    tensor: object = None


class _Stopped(Exception):
    """The stream was stopped: another thread failed, or the merge did."""


class _Stream:
    """Read ahead on one thread, write and hash on another; iterate to get the pieces in order.

    Memory is bounded by the buffer pools: the reader waits for a free read buffer, the merge for
    a free output buffer, the writer hands them back once written. Whole tensors travel one at a
    time (queues of length 1). An error on either thread stops the stream and surfaces here.
    """

    def __init__(self, plan: MergePlan, writer: ShardedWriter, jobs: list, buffer_bytes: int):
        self.plan, self.writer, self.jobs, self.buffer_bytes = plan, writer, jobs, buffer_bytes
        self.read_pool, self.out_pool = queue.Queue(), queue.Queue()
        for _ in range(READ_BUFFERS):
            self.read_pool.put(mmap.mmap(-1, buffer_bytes))
        for _ in range(OUT_BUFFERS):
            self.out_pool.put(mmap.mmap(-1, buffer_bytes))
        self.inbox, self.outbox = queue.Queue(maxsize=1), queue.Queue(maxsize=OUT_BUFFERS)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self._owner = threading.current_thread()
        self._whole = threading.Semaphore(1)  # a whole tensor on its way to the writer
        self._reader = threading.Thread(target=self._read, name="fuse-read", daemon=True)
        self._writer = threading.Thread(target=self._write, name="fuse-write", daemon=True)
        self._reader.start()
        self._writer.start()

    def __iter__(self):
        while True:
            item = self._take(self.inbox)
            if item is None:
                return
            yield item

    def out_buffer(self):
        return self._take(self.out_pool)

    def write(self, name: str, data, nbytes, pool) -> None:
        """Hand ``data`` (a pooled buffer holding ``nbytes``, or a whole tensor) to the writer thread.
        A whole tensor waits until the previous one is written: one in flight at a time."""
        if pool is None:
            while not self._whole.acquire(timeout=0.05):
                self._check()
        self._give(self.outbox, (name, data, nbytes, pool))

    def finish(self) -> None:
        """Wait until everything handed over is written; raise what the threads raised."""
        self._give(self.outbox, None)
        self._writer.join()
        self._raise()

    def close(self) -> None:
        self.stop.set()
        self._reader.join()
        self._writer.join()

    def _raise(self):
        if self.errors:
            raise self.errors[0]

    def _take(self, q):
        while True:
            self._check()
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                pass

    def _give(self, q, item) -> None:
        while True:
            self._check()
            try:
                q.put(item, timeout=0.05)
                return
            except queue.Full:
                pass

    def _check(self) -> None:
        """Stop waiting once the stream is stopped: with the error that stopped it, on the merging thread."""
        if self.stop.is_set():
            if self.errors and threading.current_thread() is self._owner:
                raise self.errors[0]
            raise _Stopped()

    def _fail(self, e: BaseException) -> None:
        self.errors.append(e)
        self.stop.set()

    def _read(self) -> None:
        from stages.io.safetensors import FileReader

        try:
            with FileReader() as files:
                for job in self.jobs:
                    info = job.info
                    if job.mode == "raw":
                        for start in range(0, info.nbytes, self.buffer_bytes):
                            n = min(self.buffer_bytes, info.nbytes - start)
                            buf = self._take(self.read_pool)
                            files.read(info, start, memoryview(buf)[:n])
                            self._give(self.inbox, _Item("raw", job, buf, n))
                    elif job.mode == "rows":
                        width = job.row * ITEMSIZE[info.dtype]
                        base_rows = info.nbytes // width
                        total = job.bounds[-1][1]
                        for r0, r1 in job.bounds:
                            stop = min(r1, base_rows)
                            buf = self._take(self.read_pool)
                            if stop > r0:
                                files.read(info, r0 * width, memoryview(buf)[: (stop - r0) * width])
                            self._give(self.inbox, _Item("rows", job, buf, r0=r0, r1=r1,
                                                         base_bytes=max(0, stop - r0) * width, first=r0 == 0,
                                                         last=r1 == total))
                    else:  # dequantized when the base is a bitsandbytes checkpoint
                        self._give(self.inbox, _Item("whole", job, tensor=self.plan.base.load(info.name)))
            self._give(self.inbox, None)
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the merging thread
            self._fail(e)

    def _write(self) -> None:
        while True:
            try:
                item = self._take(self.outbox)
            except _Stopped:
                return
            if item is None:
                return
            name, data, nbytes, pool = item
            try:
                if not self.errors:
                    self.writer.write(name, data if nbytes is None else memoryview(data)[:nbytes])
            except BaseException as e:  # noqa: BLE001 - handed to the merging thread
                self._fail(e)
            finally:
                if pool is not None:
                    pool.put(data)
                else:
                    self._whole.release()


class _Work:
    """The float32 scratch a row chunk is merged in (and DoRA's copy of its start), made once."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self._W = self._W0 = None

    def W(self, shape):
        import torch

        if self._W is None:
            self._W = torch.empty(self.nbytes // 4, dtype=torch.float32)
        return self._W[: math.prod(shape)].view(shape)

    def W0(self, shape):
        import torch

        if self._W0 is None:
            self._W0 = torch.empty(self.nbytes // 4, dtype=torch.float32)
        return self._W0[: math.prod(shape)].view(shape)


class _Rows:
    """Merges one output tensor row chunk by row chunk with the exact per-row formulas of its family
    (the family's own ``apply`` on row slices of W and of the adapter tensors), so every row comes out
    as it would from the whole tensor."""

    def __init__(self, plan: MergePlan, job: _Job, work: _Work):
        self.plan, self.job, self.work = plan, job, work
        self.deltas = []
        for u in job.updates:
            if u.kind != "replace":
                adapter = plan.adapters[u.adapter]
                self.deltas.append((u, {role: adapter.load(key).float() for role, key in u.tensors.items()}, adapter))
        self.replacements = _chosen_replacements([u for u in job.updates if u.kind == "replace"])
        self.dora = any(u.kind.startswith("dora_") for u in job.updates)
        self.retain = bool(job.updates) and tuple(job.shape) == tuple(job.info.shape)

    def chunk(self, item: _Item, out_buffer, kept: "Retention") -> int:
        """Merge rows ``[item.r0, item.r1)`` into ``out_buffer`` (the output dtype); returns its byte count."""
        import torch

        job, r0, r1 = self.job, item.r0, item.r1
        shape = (r1 - r0,) + tuple(job.shape[1:]) if job.row > 1 or len(job.shape) > 1 else (r1 - r0,)
        if job.row == 1:  # flat pieces of a tensor of any shape
            shape = (r1 - r0,)
        in_dtype, out_dtype = torch_dtype(job.info.dtype), torch_dtype(job.dtype)
        base_rows = item.base_bytes // (job.row * in_dtype.itemsize)
        src = torch.frombuffer(item.buffer, dtype=in_dtype, count=base_rows * job.row) if base_rows else \
            torch.empty(0, dtype=in_dtype)  # rows past the end of a resized tensor: none from the base
        src = src.view((base_rows,) + shape[1:])
        n = math.prod(shape)
        out = torch.frombuffer(out_buffer, dtype=out_dtype, count=n).view(shape)
        if not job.updates:
            out.copy_(src)
            if not _all_finite(out) and _all_finite(src):
                _raise_overflow(job.name, out)
            return n * out_dtype.itemsize
        W = self.work.W(shape)
        if self.replacements:
            W.copy_(self._replacement_rows(r0, r1))
        else:
            W.copy_(src)
        W0 = self.work.W0(shape).copy_(W) if self.dora else None
        for u, t, adapter in self.deltas:
            W = self._apply(u, t, adapter, W, W0, r0, r1)
        out.copy_(W)
        if not _all_finite(out):  # NaN/Inf in W reach the output: one check on the (smaller) output
            if not _all_finite(W):
                raise _nan_error(self.plan, job.name, job.updates)
            _raise_overflow(job.name, out)
        if self.retain:
            kept.add(job.name, src, W, out, offset=r0 * job.row, numel=math.prod(job.shape))
        return n * out_dtype.itemsize

    def _replacement_rows(self, r0: int, r1: int):
        import torch

        first, *others = [_adapter_rows(self.plan.adapters[u.adapter], u.tensors["tensor"], r0, r1).float()
                          for u in self.replacements]
        if any(not torch.equal(first, other) for other in others):
            raise FuseError("F202", f"two adapters replace {self.job.name} with different tensors; Fuse cannot tell "
                            "which should win", key=self.job.name, fix="merge these adapters one at a time")
        return first

    @staticmethod
    def _apply(u, t, adapter, W, W0, r0, r1):
        if u.kind == "linear" and not u.fan_in_fan_out and _power_of_two(u.scaling) and _power_of_two(u.weight):
            # W + (B@A)·s·w in one pass: scaling by a power of two is exact, so this equals the
            # two-step formula bit for bit, without a float32 delta the size of the chunk
            return W.addmm_(t["B"][r0:r1], t["A"], alpha=u.scaling * u.weight)
        if u.kind in ("linear", "dora_linear") and not u.fan_in_fan_out:
            t = dict(t, B=t["B"][r0:r1], **({"m": t["m"][r0:r1]} if "m" in t else {}))
        elif u.kind == "linear":  # fan_in_fan_out: W is (in, out), its rows are A's columns
            t = dict(t, A=t["A"][:, r0:r1])
        elif u.kind == "embedding":  # W is (vocab, dim), its rows are lora_embedding_A's columns
            t = dict(t, emb_A=t["emb_A"][:, r0:r1])
        elif u.kind == "tokens":
            rows = u.extra["rows"]
            keep = [k for k, i in enumerate(rows) if r0 <= i < r1]
            if not keep:
                return W
            t = {"tokens": t["tokens"][keep]}
            u = dataclasses.replace(u, extra={**u.extra, "rows": [rows[k] - r0 for k in keep]})
        return family_for(u.peft_type).apply(W, W0, u, t, adapter=adapter)


def _thread_sensitive(job: _Job) -> bool:
    """Whether the tensor's merge may round differently with another number of torch threads: anything
    but matrix products and elementwise steps (convolutions, reductions such as DoRA's norms, peft's
    layers, TIES/DARE, NF4). Those run with the caller's threads, as peft's own merge would; plain
    LoRA (MKL's products do not depend on the thread count) stays on one."""
    return job.why != "" or any(u.kind not in ("linear", "embedding", "tokens", "replace") for u in job.updates)


def _power_of_two(x: float) -> bool:
    return x != 0 and abs(math.frexp(x)[0]) == 0.5


def _adapter_rows(adapter, key: str, r0: int, r1: int):
    """Rows ``[r0, r1)`` of an adapter tensor, read from its file (or an allowed pickle in memory)."""
    from stages.io.safetensors import load_rows

    if key in adapter._in_memory:
        return adapter._in_memory[key][r0:r1]
    return load_rows(adapter.tensors[key], r0, r1)


def _whole(plan: MergePlan, job: _Job, source, kept: "Retention"):
    """One tensor merged whole: the float32 tensor, every update, one rounding."""
    import torch

    target = torch_dtype(job.dtype)
    if job.info.name in plan.options.get("nf4", ()):
        source = nf4_round_trip(source, plan.options.get("double_quant", False))
    if job.updates:
        # float() of a float32 tensor is that tensor: keep the start apart for the retention metric
        W = _merge_tensor(plan, job.name, source.clone() if source.dtype == torch.float32 else source.float())
        result = W.to(target)  # the one rounding
        if result.dtype != W.dtype:
            _check_range(job.name, result, W)
        kept.add(job.name, source, W, result)
        kept.finish(job.name)
    else:
        result = source.to(target)
        if result.dtype != source.dtype:
            _check_range(job.name, result, source)
    return result.contiguous()


class Retention:
    """How much of the update survives rounding to the output dtype, over the whole run.

    Per merged tensor, with W_start the tensor the adapters started from (after a dequantization
    or an NF4 round trip), Δ = W_merged − W_start in float32 and Δ_eff = round(W_merged) −
    round(W_start) the update actually written (round: to the output dtype):
    ``update_rel_error`` = ‖Δ_eff − Δ‖ / ‖Δ‖ over all merged elements (0 = every bit survived),
    ``update_zeroed_fraction`` = the share of changed elements whose change rounded away
    entirely, and the tensor where the relative error is worst. Tensors above ``SAMPLE``
    elements are measured on ``SAMPLE`` evenly spaced ones (deterministic, and the same whether
    the tensor is merged whole or in row chunks), which keeps the cost a small fraction of the merge.
    """

    SAMPLE = 1 << 14

    def __init__(self):
        self.delta2 = self.error2 = 0.0
        self.changed = self.zeroed = 0
        self.worst = ("", 0.0)
        self._tensor = {}  # name -> (step, [source samples], [W samples], [result samples]) while it is merged

    def add(self, name, source, W, result, offset: int = 0, numel: int | None = None) -> None:
        """Sample ``W`` (float32) rounded to ``result``, from ``source``: the whole tensor, or the piece
        of it that starts at flat element ``offset`` of a tensor of ``numel`` elements."""
        if tuple(source.shape) != tuple(W.shape):
            return  # resized: there is no "before" for the new rows
        numel = W.numel() if numel is None else numel
        step = -(-numel // self.SAMPLE)
        s, w, r = source.reshape(-1), W.reshape(-1), result.reshape(-1)
        if step > 1:
            first = -offset % step
            s, w, r = s[first::step], w[first::step], r[first::step]
        samples = self._tensor.setdefault(name, (step, [], [], []))
        for kept, t in zip(samples[1:], (s, w, r)):
            kept.append(t.clone())

    def finish(self, name) -> None:
        """The tensor ``name`` is complete: add its samples to the run's totals."""
        import torch

        if name not in self._tensor:
            return
        step, *parts = self._tensor.pop(name)
        s, w, r = (torch.cat(p) if len(p) > 1 else p[0] for p in parts)
        start = s.float()
        delta = w - start
        before = s if s.dtype == r.dtype else s.to(r.dtype)  # a dtype change alone is not a lost update
        effective = r.float() - before.float()
        d2 = float(torch.dot(delta, delta)) * step
        error = effective.sub_(delta)
        e2 = float(torch.dot(error, error)) * step
        changed = delta != 0
        self.changed += int(changed.sum())
        self.zeroed += int((changed & (r == before)).sum())
        self.delta2 += d2
        self.error2 += e2
        if d2 > 0 and (e2 / d2) ** 0.5 > self.worst[1]:
            self.worst = (name, (e2 / d2) ** 0.5)

    def metrics(self) -> dict:
        if not self.delta2:
            return {}
        return {"update_rel_error": round((self.error2 / self.delta2) ** 0.5, 6),
                "update_zeroed_fraction": round(self.zeroed / max(self.changed, 1), 6),
                "update_worst_tensor": self.worst[0], "update_worst_rel_error": round(self.worst[1], 6)}


def _merge_tensor(plan: MergePlan, name: str, W):
    """Apply ``name``'s updates to float32 ``W`` (changed in place): a replacement first, then
    each adapter's weight·delta in adapter order (``linear``), or the TIES/DARE combination of the
    adapters' full updates."""
    updates = plan.updates[name]
    replacements = [u for u in updates if u.kind == "replace"]
    if replacements:
        W = _replacement(plan, name, replacements)
    deltas = [u for u in updates if u.kind != "replace"]
    if plan.method == "linear":
        W0 = W.clone() if any(u.kind.startswith("dora_") for u in deltas) else None
        for u in deltas:
            W = _apply(plan, u, W, W0)
    elif deltas:
        W = _combine(plan, name, W, deltas)
    if not _all_finite(W):
        raise _nan_error(plan, name, updates)
    return W


def _nan_error(plan: MergePlan, name: str, updates: list) -> FuseError:
    sources = sorted({str(plan.adapters[u.adapter].path) for u in updates})
    return FuseError("F301", f"merged tensor {name} has NaN or Inf values", key=name,
                     file=sources[0] if len(sources) == 1 else None,
                     fix="the adapter is broken (NaN/Inf in its tensors, or exploded training); check its "
                         "training logs")


def _apply(plan: MergePlan, u, W, W0):
    adapter = plan.adapters[u.adapter]
    load = _shared_load if "piece" in u.extra else (lambda a, key: a.load(key).float())
    tensors = {role: load(adapter, key) for role, key in u.tensors.items()}
    return family_for(u.peft_type).apply(W, W0, u, tensors, adapter=adapter)


PIECE_CACHE = 4  # adapter tensors kept: lora_A and lora_B of a layer's two fused expert parameters


def _shared_load(adapter, key: str):
    """An adapter tensor in float32 that several checkpoint tensors take a piece of (each of Mixtral's per-expert
    w1/w3/w2 takes one expert of the same lora_A / lora_B): read once while they come one after another."""
    cache = adapter._cache.setdefault("pieces", {})
    if key not in cache:
        if len(cache) >= PIECE_CACHE:
            del cache[next(iter(cache))]
        cache[key] = adapter.load(key).float()
    return cache[key]


def _combine(plan: MergePlan, name: str, W, deltas: list):
    """TIES / DARE: each adapter's full update ΔWᵢ = (W with adapter i alone) − W, combined (combine.py)."""
    import dataclasses

    import torch

    order = list(dict.fromkeys(u.adapter for u in deltas))
    task_vectors = []
    for i in order:
        mine = [dataclasses.replace(u, weight=1.0) for u in deltas if u.adapter == i]
        if all(u.kind in ADDITIVE for u in mine):  # ΔW itself, not (W + ΔW) − W, which loses its low bits
            Wi = torch.zeros_like(W)
            for u in mine:
                Wi = _apply(plan, u, Wi, None)
            task_vectors.append(Wi)
            continue
        Wi = W.clone()
        W0 = W.clone() if any(u.kind.startswith("dora_") for u in mine) else None
        for u in mine:
            Wi = _apply(plan, u, Wi, W0)
        task_vectors.append(Wi.sub_(W))
    weights = [plan.adapters[i].weight for i in order]
    return W.add_(combine(plan.method, task_vectors, weights, plan.options["density"], plan.options["seed"], name,
                          order))


def _replacement(plan: MergePlan, name: str, replacements: list):
    """The full tensor the adapters put in place of ``name``; several adapters must agree on it."""
    import torch

    copies = [u for u in replacements if not u.extra.get("original")]
    replacements = copies or replacements  # a trained copy supersedes the (resized) module it was made from
    first, *others = [plan.adapters[u.adapter].load(u.tensors["tensor"]).float() for u in replacements]
    if any(not torch.equal(first, other) for other in others):
        raise FuseError("F202", f"two adapters replace {name} with different tensors; Fuse cannot tell which "
                        "should win", key=name, fix="merge these adapters one at a time")
    return first


def _all_finite(t) -> bool:
    """No NaN or Inf in ``t``. Fast path: NaN/Inf make the sum non-finite; only a non-finite sum
    (finite values can overflow it) needs the exact elementwise test, which is ~30x slower. float16
    sums in float32 (its own range is too small); bfloat16 and wider sum in their own dtype (torch
    accumulates bfloat16 in float32, and its range is float32's)."""
    import torch

    total = t.sum(dtype=torch.float32) if t.dtype == torch.float16 else t.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def _check_range(name: str, result, source) -> None:
    """F302 when a finite tensor became non-finite in the (narrower) output dtype; fp16 tops out at 65504."""
    if not _all_finite(result) and _all_finite(source):
        _raise_overflow(name, result)


def _raise_overflow(name: str, result):
    raise FuseError("F302", f"{name} overflows {str(result.dtype).removeprefix('torch.')}: values beyond "
                    "its range became Inf", key=name, fix="write bfloat16 or float32 instead (merge dtype)")


def _write_side_files(plan: MergePlan, out_dir: Path, dtype: str) -> tuple[dict, int]:
    """Copy every non-weight file of the base, recursively; the adapters' tokenizer files win;
    config.json is rewritten when the dtype or the embedding tie changes."""
    sources = dict(_base_side_files(plan.base.dir, plan.base.files))
    for adapter in reversed(plan.adapters):  # the first adapter listed wins over later ones
        for src in sorted(adapter.path.iterdir()):
            if src.is_file() and _matches(src.name, TOKENIZER_PATTERNS):
                sources[src.name] = src
    hashes, total = {}, 0
    for rel in sorted(sources):
        dst = out_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel == "config.json" and (config := _updated_config(sources[rel], dtype, plan)) is not None:
            data = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
            hashes[rel], size = write_file(dst, data), len(data)
        else:
            hashes[rel], size = copy_file(sources[rel], dst)
        total += size
    return hashes, total


def _base_side_files(base_dir: Path, weight_files: list[Path]):
    """``(relpath, path)`` of every file to carry over from the base, in a stable order."""
    skip = {p.resolve() for p in weight_files}
    for root, dirs, files in os.walk(base_dir):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for fname in sorted(files):
            path = Path(root) / fname
            if path.resolve() in skip or _matches(fname, WEIGHT_PATTERNS + ADAPTER_PATTERNS):
                continue
            yield path.relative_to(base_dir).as_posix(), path


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _updated_config(path: Path, dtype: str, plan: MergePlan) -> dict | None:
    """config.json with the output dtype, tie flag and vocab_size, without the quantization_config of a
    dequantized base; None when nothing changes (copied as is)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    sections = [config] + [config[k] for k in ("text_config",) if isinstance(config.get(k), dict)]
    changed = False
    if isinstance(plan.base, DequantizedWeights) and "quantization_config" in config:
        del config["quantization_config"]
        changed = True
        if dtype == "auto":  # the dequantized weights' dtype
            dtypes = {plan.outputs[n].dtype for n in plan.base.parts}
            dtype = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(dtypes.pop(), "auto") \
                if len(dtypes) == 1 else "auto"
    for section in sections:
        if dtype != "auto":
            keys = [k for k in ("dtype", "torch_dtype") if k in section] or (["dtype"] if section is config else [])
            for key in keys:
                changed |= section.get(key) != dtype
                section[key] = dtype
        if plan.untie and (section is config or "tie_word_embeddings" in section):
            changed |= section.get("tie_word_embeddings") is not False
            section["tie_word_embeddings"] = False
        if plan.vocab_size is not None and (section is config or "vocab_size" in section):
            if "vocab_size" in section or section is config and "text_config" not in config:
                changed |= section.get("vocab_size") != plan.vocab_size
                section["vocab_size"] = plan.vocab_size
    return config if changed else None
