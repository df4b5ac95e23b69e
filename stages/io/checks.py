"""File-level checks for a model or adapter directory, from headers and metadata only.

What :mod:`stages.io.safetensors` does not check itself, and ``validate`` needs before
any heavy work (each safetensors file is checked whole by its reader,
:func:`~stages.io.safetensors.read_header`, wherever it is opened):

- :func:`check_links`: symlinks are followed only inside the directory, or into the
  Hugging Face cache's blob store (a hub snapshot is a directory of links into it);
- :func:`pickle_files`: which files are pickles (they can run code when loaded);
- :func:`read_index` / :func:`check_index`: ``model.safetensors.index.json`` against
  the shards (no missing shard, no shard outside the directory, no tensor the index
  does not list, ``total_size`` in bytes);
- :func:`check_loadable`: config.json is there and names what transformers' ``AutoConfig``
  needs to load the model (a ``model_type``, or custom code via ``auto_map``);
- :func:`scan_nonfinite`: NaN/Inf in one tensor, read from disk without torch;
- :func:`check_free_space`: room in a directory for the bytes a run will write.

No torch here: the pre-flight must not wait for it. Every problem is a
:class:`~stages.findings.FuseError` naming the file (and tensor).
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from stages.findings import FuseError
from stages.io.jsonfile import read_json
from stages.io.safetensors import INDEX_NAME, ITEMSIZE, ModelWeights, TensorInfo, read_config

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SKIP_DIRS = (".git", ".cache")  # never read by Fuse (merge skips them too)

# bit mask of the exponent field: a float is NaN or Inf exactly when all its exponent bits are set
_EXPONENT = {"F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000),
             "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80)}


# --------------------------------------------------------------------------- symlinks


def hf_blob_store(model_dir: Path) -> Path | None:
    """The blob store of a Hugging Face cache snapshot (``.../models--org--name/snapshots/<sha>``
    → ``.../models--org--name/blobs``), or None when ``model_dir`` is not a snapshot."""
    model_dir = Path(os.path.abspath(model_dir))
    for parent in [model_dir, *model_dir.parents]:
        if parent.parent.name == "snapshots":
            blobs = parent.parent.parent / "blobs"
            return blobs.resolve() if blobs.is_dir() else None
    return None


def check_links(model_dir, what: str = "model") -> int:
    """Refuse (F210) a symlink under ``model_dir`` that leads outside it (or, for a hub
    snapshot, outside its blob store), dangles, or loops. Returns the number of links seen.

    A link that leads elsewhere would make Fuse read, copy and publish a file the user
    never meant to ship (``tokenizer.json -> ~/.ssh/id_rsa``).
    """
    root = Path(model_dir)
    allowed = [root.resolve()]
    blobs = hf_blob_store(root)
    if blobs is not None:
        allowed.append(blobs)
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False: a linked dir is checked, not entered
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(dirnames) + sorted(filenames):
            path = Path(dirpath) / name
            if not path.is_symlink():
                continue
            seen += 1
            rel = path.relative_to(root)
            try:
                target = path.resolve(strict=True)
            except (OSError, RuntimeError) as e:  # dangling (FileNotFoundError) or a loop
                why = "a loop" if isinstance(e, RuntimeError) or e.errno == errno.ELOOP else "nothing"
                raise FuseError("F210", f"{rel} in the {what} directory is a symlink to {why} "
                                f"({os.readlink(path)})", file=path,
                                fix="replace the link with the file it should point to") from None
            if not any(target == a or a in target.parents for a in allowed):
                inside = "the directory" + (" or its Hugging Face blob store" if blobs else "")
                raise FuseError("F210", f"{rel} in the {what} directory is a symlink to {target}, outside "
                                f"{inside}", file=path,
                                fix="copy the file into the directory if it belongs to the model; Fuse does not "
                                    "follow links that lead elsewhere")
    return seen


# --------------------------------------------------------------------------- pickles


def pickle_files(model_dir) -> list[Path]:
    """Pickle files at the top of ``model_dir`` (``*.bin``, ``*.pt``, ...), sorted."""
    root = Path(model_dir)
    return sorted(p for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())


# --------------------------------------------------------------------------- config.json

LOADER_FIX = ("copy config.json from the model's original files (the repo it came from); transformers "
              "loads a model directory only with it")


def check_loadable(model_dir, what: str = "base model") -> dict:
    """F205 unless transformers' ``AutoConfig.from_pretrained(model_dir)`` finds what it needs; returns the config.

    What AutoConfig needs (transformers 5, ``configuration_auto.py``): a ``config.json`` that is a
    JSON object with either ``auto_map.AutoConfig`` (custom code, loaded with
    ``trust_remote_code``) or a ``model_type``; without both it raises "Unrecognized model ...
    Should have a `model_type` key". Checked from the JSON alone, so nothing heavy is imported:
    whether the installed transformers knows this ``model_type`` is left to the stages that load
    the model. A merge would copy the base's config.json as it is, so a base that fails here
    gives a published model no runtime can load.
    """
    root = Path(model_dir)
    path = root / "config.json"
    if not path.is_file():
        raise FuseError("F205", f"the {what} directory {root} has no config.json: transformers cannot load it, "
                        "and neither could anyone load the merged model", file=path, fix=LOADER_FIX)
    config = read_config(root)  # F205 when not JSON, not an object, or a key of the wrong type
    auto_map = config.get("auto_map")
    if isinstance(auto_map, dict) and isinstance(auto_map.get("AutoConfig"), str):
        return config
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type.strip():
        raise FuseError("F205", f"config.json of the {what} has no model_type: transformers' AutoConfig refuses it "
                        "(\"Unrecognized model\"), so the merged model could not be loaded either",
                        file=path, key="model_type",
                        fix="restore config.json from the model's original files; it names the architecture "
                            "(e.g. \"model_type\": \"llama\")")
    return config


# --------------------------------------------------------------------------- index


def read_index(model_dir) -> dict | None:
    """``model.safetensors.index.json`` checked on its own (F205/F206), or None when absent:
    ``{"weight_map": {tensor: shard}, "total_size": int | None, "shards": [names]}``."""
    root = Path(model_dir)
    index = root / INDEX_NAME
    if not index.exists():
        return None
    data = read_json(index, "F205")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map \
            or not all(isinstance(v, str) and v for v in weight_map.values()):
        raise FuseError("F205", f"{INDEX_NAME} needs a non-empty weight_map of tensor name -> shard file",
                        file=index, key="weight_map")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        norm = os.path.normpath(shard)
        if os.path.isabs(shard) or norm == os.pardir or norm.startswith(os.pardir + os.sep) or os.sep in norm:
            raise FuseError("F206", f"{INDEX_NAME} names shard {shard!r}, a path outside the model directory",
                            file=index, key=shard, fix="shard names in an index are plain file names")
        if not (root / shard).is_file():
            raise FuseError("F205", f"{INDEX_NAME} names shard {shard}, which is missing", file=index, key=shard,
                            fix="download the missing shard (an interrupted download?)")
    total = (data.get("metadata") or {}).get("total_size") if isinstance(data.get("metadata"), dict) else None
    return {"weight_map": weight_map, "total_size": total, "shards": shards}


def weight_files(model_dir) -> list[Path]:
    """The safetensors files :meth:`ModelWeights.open` will read (index shards, else
    ``model.safetensors``, else every ``*.safetensors``), without parsing them."""
    root = Path(model_dir)
    index = read_index(root)
    if index is not None:
        return [root / s for s in index["shards"]]
    single = root / "model.safetensors"
    return [single] if single.is_file() else sorted(root.glob("*.safetensors"))


def check_index(weights: ModelWeights) -> list[dict]:
    """The index against the shards' headers: every tensor the shards hold is listed (F205).
    Returns warnings (a ``total_size`` that is not the tensors' byte count)."""
    index = read_index(weights.dir)
    if index is None:
        return []
    path = weights.dir / INDEX_NAME
    listed = index["weight_map"]
    for name, info in weights.tensors.items():
        if name not in listed:
            raise FuseError("F205", f"{info.path.name} holds tensor {name!r}, which {INDEX_NAME} does not list "
                            "(transformers would not load it)", file=path, key=name,
                            fix="re-download the model: the index and the shards come from different versions")
    warnings = []
    total = index["total_size"]
    actual = sum(t.nbytes for t in weights.tensors.values())
    if isinstance(total, (int, float)) and int(total) != actual:
        warnings.append({"code": "F205", "file": str(path), "key": "metadata.total_size",
                         "message": f"{INDEX_NAME} says total_size {int(total):,}, but the shards hold "
                                    f"{actual:,} bytes of tensors",
                         "fix": "harmless for loading; re-save the model to fix the index"})
    return warnings


# --------------------------------------------------------------------------- tensor data


def scan_nonfinite(info: TensorInfo, chunk_bytes: int = 1 << 24) -> int:
    """How many NaN/Inf values one float tensor holds, read from its file in chunks (no torch).

    Works on the bit patterns, so bfloat16 needs no conversion: a value is NaN or Inf
    exactly when every bit of its exponent is set. Non-float tensors have none.
    """
    import numpy as np

    if info.dtype not in _EXPONENT or info.nbytes == 0:
        return 0
    np_dtype, mask = _EXPONENT[info.dtype]
    item = ITEMSIZE[info.dtype]
    step = max(item, chunk_bytes - chunk_bytes % item)
    count = 0
    fd = os.open(info.path, os.O_RDONLY)
    try:
        for offset in range(info.start, info.end, step):
            want = min(step, info.end - offset)
            buf = os.pread(fd, want, offset)
            if len(buf) != want:
                raise FuseError("F206", f"{info.path.name} ended while reading tensor {info.name!r}",
                                file=info.path, key=info.name, fix="re-download or re-save the file")
            bits = np.frombuffer(buf, dtype=np_dtype)
            count += int(np.count_nonzero((bits & mask) == mask))
    finally:
        os.close(fd)
    return count


# --------------------------------------------------------------------------- disk space


def free_bytes(path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_free_space(path, need: int, what: str) -> int:
    """F402 when the filesystem of ``path`` has less than ``need`` bytes free; returns the free bytes."""
    free = free_bytes(path)
    if need > free:
        raise FuseError("F402", f"{what} needs about {_size(need)} in {path}, but only {_size(free)} is free",
                        file=path, fix="free some space, or point workdir: at a larger disk")
    return free


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
