"""Safetensors from headers, ranged tensor reads, and a streaming sharded writer.

Why hand-written: the ``safetensors`` library reads a whole file through mmap and
writes a whole state dict at once. Fuse must plan from headers alone (validate never
touches tensor data), read one tensor at a time without mapping multi-GB shards, and
write the output tensor by tensor while hashing it, so that peak memory does not grow
with the model or its shard size. The format itself is small: an 8-byte little-endian
header length, a JSON header ``{name: {dtype, shape, data_offsets}, "__metadata__": {}}``
and the raw little-endian tensor bytes; tests check our files with ``safe_open``.

``torch`` is imported lazily: reading headers (validate, planning) must not wait for it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from stages.findings import FuseError
from stages.io.jsonfile import read_json

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype string -> bytes per element
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # dtypes the merge may compute in and convert between


def torch_dtype(st_dtype: str):
    """The torch dtype of a safetensors dtype string."""
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    }[st_dtype]


def st_dtype(dtype) -> str:
    """The safetensors dtype string of a torch dtype."""
    for name in ITEMSIZE:
        if torch_dtype(name) == dtype:
            return name
    raise ValueError(f"torch dtype {dtype} has no safetensors equivalent")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``start``/``end`` are absolute byte offsets in ``path``."""

    name: str
    dtype: str
    shape: tuple
    path: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path) -> tuple[list[TensorInfo], dict]:
    """Parse and check one safetensors header: ``(tensors in file order, metadata)``.

    The one reader contract: every entry point (validate, merge, check, quantize, export, the
    one-shot merge) reads weights through here, and here the whole file is checked before any
    tensor byte is read: the 8-byte length is bounded and fits the file, the header is a JSON
    object ``{name: {dtype, shape, data_offsets}}`` plus an optional ``__metadata__`` of
    strings, each tensor's byte range is exactly its shape times its dtype's size, and the
    ranges tile the data area from 0 to the end of the file (no overlap, no gap, no trailing
    byte) -- what the safetensors library itself refuses. A file that breaks any of it is F206
    naming the file (and tensor): read as it is, it would be a shifted or truncated model.
    Reads the 8 + header bytes only, so it is cheap on a multi-GB shard.
    """
    path = Path(path)

    def corrupt(why: str, key: str | None = None, fix: str = _FIX):
        return FuseError("F206", f"{path.name} is not a valid safetensors file: {why}", file=path, key=key, fix=fix)

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # before open: a FIFO would block it
            raise corrupt("it is not a regular file", fix="point at the .safetensors file itself")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise corrupt(f"{size} bytes, fewer than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise corrupt(f"it declares a {n:,}-byte header, over the {MAX_HEADER_BYTES:,}-byte limit of the "
                              "format")
            if 8 + n > size:
                raise corrupt(f"it declares a {n:,}-byte header but the file has only {size:,} bytes")
            raw = f.read(n)
    except OSError as e:
        raise FuseError("F206", f"cannot read {path.name}: {e.strerror or e}", file=path,
                        fix="check that the file exists and is readable") from None
    if len(raw) != n:
        raise corrupt("the file shrank while its header was read")
    if not raw.startswith(b"{"):  # as the safetensors library: the header starts with "{"
        raise corrupt("the header does not start with '{' (the 8-byte length may be wrong)")

    def checked_object(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise corrupt(f"duplicate key {_show(next(k for k in keys if keys.count(k) > 1))} in the header")
        if any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in pairs):  # as the format's JSON parser
            raise corrupt("the header holds a \\u escape of half a UTF-16 surrogate pair, which is not text")
        return dict(pairs)

    def finite(text):  # NaN, Infinity and 1e400 are no JSON numbers to the format's parser
        value = float(text)
        if not math.isfinite(value):
            raise corrupt(f"the header holds the number {_show(text)}, which is not finite")
        return value

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=checked_object, parse_float=finite,
                            parse_constant=finite)
    except UnicodeDecodeError as e:
        raise corrupt(f"the header is not UTF-8 (byte {e.start})") from None
    except RecursionError:
        raise corrupt("the header nests too deeply to be a safetensors header") from None
    except ValueError as e:  # JSONDecodeError, or an integer past Python's digit limit
        raise corrupt(f"the header is not JSON ({str(e).split(';')[0][:120]})") from None
    if not isinstance(header, dict):
        raise corrupt(f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt("__metadata__ must map strings to strings", key="__metadata__")

    data_start, data_size = 8 + n, size - 8 - n
    tensors = []
    for name, entry in header.items():
        shown, key = _show(name), _key(name)
        if not isinstance(entry, dict):
            raise corrupt(f"the entry of tensor {shown} is a JSON {type(entry).__name__}, not an object", key=key)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise corrupt(f"tensor {shown} has dtype {_show(dtype)}, not a dtype name", key=key)
        if dtype not in ITEMSIZE:
            if dtype in SAFETENSORS_DTYPES:
                raise FuseError("F209", f"{path.name}: tensor {shown} has dtype {dtype}, which Fuse does not support",
                                file=path, key=key, fix="convert the model to float16, bfloat16 or float32")
            raise corrupt(f"tensor {shown} has dtype {_show(dtype)}, which is no safetensors dtype", key=key)
        if not isinstance(shape, list) or not all(_count(d) for d in shape):
            raise corrupt(f"tensor {shown} has shape {_show(shape)}, not a list of non-negative integers", key=key)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise corrupt(f"tensor {shown} has data_offsets {_show(offsets)}, not [begin, end] with "
                          "0 <= begin <= end", key=key)
        begin, end = offsets
        need = _nbytes(shape, ITEMSIZE[dtype], data_size)
        if need != end - begin:
            needs = f"{need:,} bytes" if need is not None else f"more than the file's {data_size:,} data bytes"
            raise corrupt(f"tensor {shown} is {dtype} {shape}, which needs {needs}, but its data_offsets "
                          f"[{begin:,}, {end:,}) hold {end - begin:,}", key=key)
        if end > data_size:
            raise corrupt(f"tensor {shown} ends at data byte {end:,}, past the {data_size:,} bytes the file holds "
                          "(truncated?)", key=key)
        tensors.append(TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end))
    tensors.sort(key=lambda t: (t.start, t.end))
    pos, prev = data_start, None
    for t in tensors:  # the byte ranges tile the data area: no overlap, no gap
        if t.start < pos:
            raise corrupt(f"tensors {_show(prev.name)} and {_show(t.name)} overlap", key=_key(t.name))
        if t.start > pos:
            raise corrupt(f"{t.start - pos:,} unused bytes before tensor {_show(t.name)} (tensors must follow "
                          "each other)", key=_key(t.name))
        pos, prev = t.end, t
    if pos != size:
        raise corrupt(f"{size - pos:,} bytes after the last tensor: the header does not describe this file "
                      "(appended to, or a wrong header length?)")
    return tensors, metadata


_FIX = "re-download or re-save the file (safetensors' save_file writes a valid one); it is truncated or damaged"

# every dtype name of the safetensors format; those not in ITEMSIZE are valid files Fuse cannot merge (F209)
SAFETENSORS_DTYPES = frozenset(ITEMSIZE) | {"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "C64"}


def _lone_surrogate(value) -> bool:
    """A string (or list of them, nested) with a lone surrogate, which Python's JSON decoder lets
    through from an escape such as ``\\ud800`` and the safetensors library refuses. Objects
    inside are checked by their own hook call."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    return isinstance(value, list) and any(_lone_surrogate(v) for v in value)


def _count(value) -> bool:
    """A JSON non-negative integer (``true`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _nbytes(shape: list, itemsize: int, limit: int) -> int | None:
    """Bytes of a tensor of ``shape``; None when past ``limit`` (so a shape of huge numbers costs nothing)."""
    if 0 in shape:
        return 0
    total = itemsize
    for d in shape:
        total *= d
        if total > limit:
            return None
    return total


def _key(name: str) -> str:
    """A tensor name as a finding's key: itself, unless it would break the one-line finding."""
    return name if name.isprintable() and len(name) <= 200 else _show(name)


def _show(value, limit: int = 80) -> str:
    """A header value for a one-line message: repr'd (control characters escaped) and bounded."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_into(fd: int, offset: int, view: memoryview, info: TensorInfo | None = None) -> None:
    """Fill ``view`` with the bytes of the open file ``fd`` from ``offset`` (``os.preadv``, no mmap: a
    merge must not map whole shards); F206 when the file ends first."""
    done, size = 0, len(view)
    while done < size:  # preadv returns at most ~2 GiB per call on Linux
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            where = f" while reading tensor {info.name!r}" if info else ""
            raise FuseError("F206", f"{(info.path.name if info else 'a file')} ended{where} (the file shrank or is "
                            "truncated)", file=info.path if info else None, key=info.name if info else None)
        done += n


def load_tensor(info: TensorInfo):
    """Read one tensor with ``os.preadv`` (no mmap: a merge must not map whole shards)."""
    return load_rows(info, 0, info.shape[0] if info.shape else 1)


def load_rows(info: TensorInfo, start: int, stop: int):
    """Rows ``[start, stop)`` (along the first dimension) of one tensor, read with ``os.preadv``."""
    import torch

    dtype = torch_dtype(info.dtype)
    shape = (stop - start,) + tuple(info.shape[1:]) if info.shape else ()
    row = math.prod(info.shape[1:]) * ITEMSIZE[info.dtype] if info.shape else info.nbytes
    nbytes = row * (stop - start)
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    buf = bytearray(nbytes)
    fd = os.open(info.path, os.O_RDONLY)
    try:
        read_into(fd, info.start + start * row, memoryview(buf), info)
    finally:
        os.close(fd)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


class FileReader:
    """Keeps the files it reads open: ranged reads of many tensors, one ``open`` per file.

    Example::

        with FileReader() as files:
            files.read(info, 0, memoryview(buf)[: info.nbytes])   # the first bytes of a tensor
    """

    def __init__(self):
        self._fds: dict[Path, int] = {}

    def read(self, info: TensorInfo, offset: int, view: memoryview) -> None:
        """Bytes ``[offset, offset + len(view))`` of tensor ``info``'s data into ``view``."""
        if offset < 0 or offset + len(view) > info.nbytes:
            raise ValueError(f"{info.name}: bytes [{offset}, {offset + len(view)}) outside its {info.nbytes}")
        fd = self._fds.get(info.path)
        if fd is None:
            fd = self._fds[info.path] = os.open(info.path, os.O_RDONLY)
        read_into(fd, info.start + offset, view, info)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class ModelWeights:
    """Every tensor of a Hugging Face model directory, from headers only."""

    dir: Path
    tensors: dict[str, TensorInfo]  # in file order: shard by shard, by offset
    files: list[Path]               # weight files (and the index) read
    config: dict = field(default_factory=dict)  # config.json, {} when absent

    @classmethod
    def open(cls, model_dir) -> ModelWeights:
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FuseError("F205", f"base model directory {model_dir} does not exist", file=model_dir)
        if (model_dir / "adapter_config.json").exists():
            raise FuseError("F205", f"{model_dir} holds an adapter (adapter_config.json), not a base model",
                            file=model_dir, fix="point base at the model the adapter was trained on")
        index = model_dir / INDEX_NAME
        if index.exists():
            shards = _shards_from_index(model_dir, index)
            files = [model_dir / s for s in shards] + [index]
        else:  # as transformers: model.safetensors alone when it is there (not consolidated.safetensors)
            single = model_dir / "model.safetensors"
            files = [single] if single.is_file() else sorted(model_dir.glob("*.safetensors"))
            if not files:
                other = sorted(p.name for p in model_dir.iterdir()
                               if p.suffix in (".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf"))
                if other:
                    raise FuseError("F209", f"{model_dir} has weights only as {', '.join(other)}; Fuse reads "
                                    "safetensors only (pickle files can run code when loaded)", file=model_dir,
                                    fix="convert the model with transformers: from_pretrained(...)."
                                        "save_pretrained(dir) writes safetensors")
                raise FuseError("F205", f"no *.safetensors weights in {model_dir}", file=model_dir)
            shards = [p.name for p in files]
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            for t in read_header(model_dir / shard)[0]:
                if t.name in tensors:
                    raise FuseError("F205", f"tensor {t.name!r} is stored twice: in {tensors[t.name].path.name} "
                                    f"and {shard}", file=model_dir / shard, key=t.name)
                tensors[t.name] = t
        if index.exists():
            _check_index_names(index, tensors)
        return cls(dir=model_dir, tensors=tensors, files=files, config=read_config(model_dir))

    def __contains__(self, name) -> bool:
        return name in self.tensors

    def __getitem__(self, name) -> TensorInfo:
        return self.tensors[name]

    def load(self, name):
        return load_tensor(self.tensors[name])


# config.json keys Fuse reads (at the top or in a ``text_config``), with the JSON types transformers writes
CONFIG_TYPES = {"model_type": str, "text_config": dict, "quantization_config": dict, "tie_word_embeddings": bool,
                "vocab_size": int, "bos_token_id": int, "architectures": list, "auto_map": dict}


def read_config(model_dir: Path) -> dict:
    """config.json ({} when absent), with the keys Fuse reads of the types transformers writes (F205)."""
    path = model_dir / "config.json"
    if not path.exists():
        return {}
    fix = "restore config.json from the model's original files"
    config = read_json(path, "F205", fix=fix)
    if not isinstance(config, dict):
        raise FuseError("F205", f"config.json is a JSON {type(config).__name__}, not an object", file=path, fix=fix)
    sections = [("", config)] + ([("text_config.", config["text_config"])]
                                 if isinstance(config.get("text_config"), dict) else [])
    for prefix, section in sections:
        for key, kind in CONFIG_TYPES.items():
            value = section.get(key)
            if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
                shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:60] + "..."
                raise FuseError("F205", f"config.json: {prefix}{key} must be a JSON {_JSON_NAMES[kind]}, got {shown}",
                                file=path, key=prefix + key, fix=fix)
    return config


_JSON_NAMES = {str: "string", dict: "object", bool: "boolean", int: "integer", list: "array"}


def _load_index(index: Path) -> dict:
    data = read_json(index, "F205", fix="re-download the model's index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FuseError("F205", f"{index.name} is not a valid index: it needs a weight_map of tensor name -> "
                        "shard file", file=index, key="weight_map", fix="re-download the model's index")
    return weight_map


def _shards_from_index(model_dir: Path, index: Path) -> list[str]:
    """The index's shard files, sorted, each checked to stay inside the directory.

    The check is on the path as written, not its resolved target: in a Hugging Face cache
    snapshot every shard is a symlink into ``../../blobs/``, and that is fine.
    """
    shards = sorted(set(_load_index(index).values()))
    for shard in shards:
        norm = os.path.normpath(shard)
        if os.path.isabs(shard) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
            raise FuseError("F206", f"{index.name} names shard {shard!r}, which lies outside {model_dir}",
                            file=index, key=shard, fix="shard paths in an index are file names in the model directory")
        if not (model_dir / shard).is_file():
            raise FuseError("F205", f"{index.name} names shard {shard}, which is missing", file=index, key=shard,
                            fix="download the missing shard (an interrupted download?)")
    return shards


def _check_index_names(index: Path, tensors: dict) -> None:
    for name, shard in _load_index(index).items():
        if name not in tensors or tensors[name].path != index.parent / shard:
            raise FuseError("F205", f"{index.name} puts tensor {name!r} in {shard}, but that shard does not hold it",
                            file=index, key=name)


class ShardedWriter:
    """Write a safetensors model tensor by tensor, hashing every byte as it is written.

    Hand-written because ``safetensors.torch.save_file`` needs the whole state dict in
    memory. The shards are planned up front from ``layout`` (name, dtype, shape; the dtype a
    torch dtype or a safetensors string such as ``"BF16"``): tensors fill
    ``model-0000k-of-0000N.safetensors`` in layout order until the next one would pass
    ``max_shard_bytes`` (a single larger tensor gets a shard of its own); one shard is named
    ``model.safetensors``. Within a shard tensors are ordered by element size, largest first,
    as the safetensors library does, so every tensor stays aligned. Call :meth:`write` in
    :attr:`order` (a tensor whole, or its bytes in pieces), then :meth:`close`.

    While it writes, the kernel is asked to start writing each finished piece back to disk
    (Linux ``sync_file_range``), so that the ``fsync`` that ends each shard has little left to
    wait for and the written pages do not pile up as dirty memory.

    Example::

        w = ShardedWriter(out, [("w", torch.float32, (2, 2))], max_shard_bytes=5e9)
        for name in w.order:
            w.write(name, tensors[name])
        hashes = w.close()   # {"model.safetensors": "<sha256>"}
    """

    WRITEBACK_BYTES = 32 << 20  # start writeback every this many bytes

    def __init__(self, out_dir, layout, max_shard_bytes=5_000_000_000):
        self.out_dir = Path(out_dir)
        self._entries = {name: (dtype if isinstance(dtype, str) else st_dtype(dtype), tuple(shape))
                         for name, dtype, shape in layout}
        if len(self._entries) != len(layout):
            raise ValueError("layout names a tensor twice")
        if unknown := [d for d, _ in self._entries.values() if d not in ITEMSIZE]:
            raise ValueError(f"unknown safetensors dtype {unknown[0]}")
        nbytes = {n: math.prod(s) * ITEMSIZE[d] for n, (d, s) in self._entries.items()}
        self._nbytes = nbytes
        self.total_size = sum(nbytes.values())

        groups, size = [[]], 0
        for name, _, _ in layout:
            if groups[-1] and size + nbytes[name] > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += nbytes[name]
        count = len(groups)
        self.shards = []  # (file name, [tensor names in write order])
        for k, names in enumerate(groups, 1):
            names.sort(key=lambda n: -ITEMSIZE[self._entries[n][0]])  # stable: layout order within a size
            fname = "model.safetensors" if count == 1 else f"model-{k:05d}-of-{count:05d}.safetensors"
            self.shards.append((fname, names))
        self.order = [n for _, names in self.shards for n in names]
        self._shard_at = [k for k, (_, names) in enumerate(self.shards) for _ in names]  # position -> shard
        self.weight_map = {n: fname for fname, names in self.shards for n in names}
        self.hashes: dict[str, str] = {}
        self.bytes_written = 0
        self.files_created: list[Path] = []
        self._next = 0
        self._filled = 0    # bytes of the current tensor written so far
        self._file = None
        self._sha = None
        self._offset = 0    # bytes written to the current file
        self._synced = 0    # bytes of it whose writeback was started

    def nbytes(self, name: str) -> int:
        """Bytes of tensor ``name`` in the output."""
        return self._nbytes[name]

    def write(self, name: str, data) -> None:
        """Append ``data`` to tensor ``name``, which must be the next in :attr:`order`: a tensor (the
        whole tensor, with its planned dtype and shape) or a bytes-like object (the next piece of the
        tensor's raw little-endian bytes; the tensor is complete when all its bytes are given)."""
        if self._next >= len(self.order) or name != self.order[self._next]:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing (all written)"
            raise ValueError(f"ShardedWriter expected {expected}, got {name}")
        dtype, shape = self._entries[name]
        if hasattr(data, "dtype") and hasattr(data, "detach"):  # a torch tensor: the whole tensor
            import torch

            if self._filled:
                raise ValueError(f"{name}: a whole tensor after {self._filled} of its bytes")
            if data.dtype != torch_dtype(dtype) or tuple(data.shape) != shape:
                raise ValueError(f"{name}: planned {dtype} {list(shape)}, got {data.dtype} {list(data.shape)}")
            data = memoryview(data.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        else:
            data = memoryview(data).cast("B")
        if self._filled + len(data) > self._nbytes[name]:
            raise ValueError(f"{name}: {self._filled + len(data)} bytes given, it has {self._nbytes[name]}")
        fname, names = self.shards[self._shard_at[self._next]]
        if self._file is None:
            self._open(fname, names)
        if len(data):
            self._emit(data)
        self._filled += len(data)
        if self._filled < self._nbytes[name]:
            return
        self._next += 1
        self._filled = 0
        if self._next == len(self.order) or self._shard_at[self._next] != self._shard_at[self._next - 1]:
            self._finish(fname)

    def close(self) -> dict[str, str]:
        """Finish the files (index json when sharded), fsync, return ``{relpath: sha256}``."""
        if self._next != len(self.order):
            raise ValueError(f"ShardedWriter closed after {self._next} of {len(self.order)} tensors")
        if not self.order:  # an empty model still gets its (empty) file
            self._open(self.shards[0][0], [])
            self._finish(self.shards[0][0])
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            data = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
            self.hashes[INDEX_NAME] = write_file(self.out_dir / INDEX_NAME, data)
            self.files_created.append(self.out_dir / INDEX_NAME)
            self.bytes_written += len(data)
        fsync_dir(self.out_dir)
        return dict(self.hashes)

    def _open(self, fname: str, names: list) -> None:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for n in names:
            dtype, shape = self._entries[n]
            size = math.prod(shape) * ITEMSIZE[dtype]
            header[n] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # pad so tensor data starts 8-byte aligned
        path = self.out_dir / fname
        self._file = open(path, "xb", buffering=0)  # never overwrite a file that is already there
        self.files_created.append(path)
        self._sha = hashlib.sha256()
        self._offset = self._synced = 0
        self._emit(struct.pack("<Q", len(raw)) + raw)

    def _emit(self, data) -> None:
        view = memoryview(data)
        while view:  # an unbuffered write may be short
            n = self._file.write(view)
            view = view[n:]
        self._sha.update(data)
        self.bytes_written += len(data)
        self._offset += len(data)
        if self._offset - self._synced >= self.WRITEBACK_BYTES:
            start_writeback(self._file.fileno(), self._synced, self._offset - self._synced)
            self._synced = self._offset

    def _finish(self, fname: str) -> None:
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self.hashes[fname] = self._sha.hexdigest()

    def abort(self) -> None:
        """Close and delete what was written (used when a merge fails half-way)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for path in self.files_created:
            path.unlink(missing_ok=True)


_SYNC_FILE_RANGE = []  # [libc function or None], looked up once


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + nbytes)`` of ``fd`` to disk without waiting
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``); a no-op where that does not exist."""
    if not _SYNC_FILE_RANGE:
        func = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                func = ctypes.CDLL(None, use_errno=True).sync_file_range
                func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            except (OSError, AttributeError):
                func = None
        _SYNC_FILE_RANGE.append(func)
    if _SYNC_FILE_RANGE[0] is not None:
        _SYNC_FILE_RANGE[0](fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; a failure only loses the head start


def write_file(path: Path, data: bytes) -> str:
    """Write ``data`` to a new file, fsync it, return its sha256."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def copy_file(src: Path, dst: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    """Copy ``src`` to a new file ``dst`` in chunks, hashing and fsyncing; returns (sha256, bytes)."""
    sha, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while block := fin.read(chunk):
            fout.write(block)
            sha.update(block)
            size += len(block)
        fout.flush()
        os.fsync(fout.fileno())
    return sha.hexdigest(), size


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
