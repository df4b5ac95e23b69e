"""GGUF → Hugging Face model directory, once, through transformers' own GGUF loader.

A pipeline's ``base:`` may point at a ``.gguf`` file (llama.cpp's format). The merge
engine reads safetensors model directories only, so such a base is converted first into
a plain Hugging Face model directory: ``model.safetensors`` (or shards + index),
``config.json``, ``generation_config.json`` and the tokenizer files (``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja`` when the GGUF carries a template).
The caller (the runner) decides where that directory lives and caches it by content;
this module only converts.

Dequantization is transformers' (``from_pretrained(dir, gguf_file=name)``), which uses
gguf-py's reference dequantizers: Fuse does not re-implement GGUF block formats.

Example::

    from stages.io.gguf import gguf_to_hf
    gguf_to_hf("SmolLM2-135M-Instruct.Q4_1.gguf", "runs/x/base-hf")   # bf16 safetensors

Memory: transformers dequantizes tensor by tensor to float32 and casts each to the
target dtype right away, so the peak is about the model in the target dtype plus the
memory-mapped GGUF file plus one float32 tensor (~1 GB RSS for SmolLM2-135M in bf16).
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from stages.findings import FuseError

GGUF_MAGIC = b"GGUF"
GGUF_MIN_VERSION = "0.10.0"  # transformers' own floor for reading GGUF files

# general.file_type (llama.cpp's LlamaFileType) of unquantized files -> their float dtype
_UNQUANTIZED_FILE_TYPES = {0: "float32", 1: "float16", 32: "bfloat16"}
_DTYPES = ("bfloat16", "float16", "float32")

_PIP_FIX = "pip install 'gguf>=0.10' (transformers reads GGUF files through it)"


def is_gguf_file(path) -> bool:
    """True when ``path`` is a regular file that starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def gguf_to_hf(gguf_path, out_dir, *, dtype="auto") -> None:
    """Convert a GGUF file into a Hugging Face model directory at ``out_dir``.

    Args:
        gguf_path: a ``.gguf`` file (any quantization transformers can dequantize:
            F32/F16/BF16, Q4_0/Q4_1/Q5_x/Q8_0, K-quants, ...).
        out_dir: the directory to write; it is created, and must not exist or be empty.
            The caller makes it atomic (write to a temp dir, rename when this returns).
        dtype: dtype of the saved weights: ``"auto"`` (default), ``"bfloat16"``,
            ``"float16"``, ``"float32"`` or the matching ``torch.dtype``.

    Choice of ``"auto"``: an unquantized GGUF (general.file_type F32, F16 or BF16) keeps
    its own float type, so its values survive the round trip bit for bit. A quantized
    GGUF has no float type of its own; it becomes **bfloat16**: it is what SmolLM2,
    Llama, Qwen and most current checkpoints ship as and are fine-tuned in, so a merge
    onto the converted base behaves like one onto the published bf16 model; it halves
    the size of float32; and it keeps float32's exponent range, so no dequantized value
    can overflow (float16 can). What bf16 rounding loses (relative 2^-9) is far below
    what the 4/5/8-bit quantization already lost (one quantization step is 1/15 of a
    Q4 block's range). Ask for ``"float32"`` to keep the dequantized values exactly.
    RMSNorm weights, stored as F32 even in F16 GGUFs, are cast like every other tensor,
    as transformers does when it loads a model in one dtype.

    The output is deterministic: the same GGUF file, dtype and library versions give
    byte-identical files (safetensors orders tensors by name and its header has no
    timestamp; ``config.json`` records ``transformers_version`` and nothing else that
    changes between runs; no path of the GGUF file is written anywhere).

    Fixes applied on top of transformers' conversion (transformers 5.x):

    * special tokens are taken from the GGUF's ``tokenizer.ggml.*_token_id`` keys:
      transformers' GGUF Llama tokenizer converter sets ``eos_token`` to the BOS token
      (for SmolLM2: ``<|im_start|>`` instead of ``<|im_end|>``) and drops the pad token;
    * ``model_max_length`` is set from ``<arch>.context_length`` and
      ``clean_up_tokenization_spaces`` to False (it is destructive for byte-level BPE,
      and transformers ignores it for BPE anyway, with a warning);
    * the ``quantization_config`` that marks the loaded model as GGUF is removed, so
      the output is an ordinary dense model (transformers refuses to save it otherwise).

    Tied embeddings are kept tied: a GGUF without ``output.weight`` gives
    ``tie_word_embeddings: true`` and no ``lm_head.weight`` tensor in the output.

    Raises:
        FuseError F205: the file does not exist.
        FuseError F209: the file is not GGUF, it is corrupt, the ``gguf`` package is
            missing, or transformers cannot read this GGUF architecture.
        FuseError F103: ``dtype`` is not one of the values above.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise FuseError("F205", f"GGUF file not found: {gguf_path}", file=gguf_path,
                        fix="point `base:` at an existing .gguf file or a Hugging Face model directory")
    if not is_gguf_file(gguf_path):
        raise FuseError("F209", f"{gguf_path.name} is not a GGUF file (it does not start with the bytes 'GGUF')",
                        file=gguf_path,
                        fix="point `base:` at a .gguf file, or at a Hugging Face model directory "
                            "(config.json + *.safetensors)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"output directory {out_dir} exists and is not empty")  # the caller picks it: a bug

    meta, tensors, data_start = read_gguf_header(gguf_path)
    if meta.get("general.type") == "adapter":
        raise FuseError("F209", f"{gguf_path.name} is a llama.cpp LoRA adapter (general.type = adapter), "
                        "not a model", file=gguf_path,
                        fix="point `base:` at the model and `adapter:` at a PEFT adapter directory "
                            "(adapter_config.json + adapter_model.safetensors)")
    target = _resolve_dtype(dtype, meta)
    _require_gguf_package(gguf_path)
    _check_tensor_data(gguf_path, tensors, data_start)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils.quantization_config import GgufConfig

    torch_dtype = getattr(torch, target)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # deprecation chatter of transformers' own GGUF loader
    bars = transformers.logging.is_progress_bar_enabled()
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    gguf_tqdm = gguf_utils.tqdm
    if not sys.stderr.isatty():  # a CI log gets no carriage-return progress bars
        transformers.logging.disable_progress_bar()
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)  # this one ignores the switch above
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                src_dir, gguf_file=name, dtype=torch_dtype, local_files_only=True,
                # unpack every block now, even where a GGUF matmul kernel could keep them packed
                quantization_config=GgufConfig(dequantize=True),
            )
            tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name, local_files_only=True)
        except (ValueError, KeyError, NotImplementedError) as e:
            raise FuseError("F209", f"transformers {transformers.__version__} cannot convert {gguf_path.name} "
                            f"(architecture {meta.get('general.architecture')!r}): {e}", file=gguf_path,
                            fix="use a GGUF of an architecture transformers supports, a newer transformers, "
                                "or the original Hugging Face checkpoint") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        gguf_utils.tqdm = gguf_tqdm
        if bars:
            transformers.logging.enable_progress_bar()

    _make_dense(model)
    _fix_tokenizer(tokenizer, meta)
    gen = model.generation_config if model.generation_config is not None else GenerationConfig()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(gen, key, None) is None and getattr(model.config, key, None) is not None:
            setattr(gen, key, getattr(model.config, key))
    model.generation_config = gen

    out_dir.mkdir(parents=True, exist_ok=True)
    if not sys.stderr.isatty():
        transformers.logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    finally:
        if bars:
            transformers.logging.enable_progress_bar()
    _write_card(out_dir, gguf_path, meta)
    _respect_umask(out_dir)


def _write_card(out_dir: Path, gguf_path: Path, meta: dict) -> None:
    """A minimal README.md carrying the GGUF's licence, so model cards made from it keep it."""
    lines = ["---"]
    if isinstance(meta.get("general.license"), str):
        lines.append(f"license: {meta['general.license']}")
    lines += ["---", "", f"Converted from `{gguf_path.name}` (dequantized to safetensors) by Fuse.", ""]
    (out_dir / "README.md").write_text("\n".join(lines), encoding="utf-8")


def _respect_umask(out_dir: Path) -> None:
    """safetensors 0.8 writes its files with mode 0600 (a private temp file renamed into
    place); give them the mode every other file gets, as ``open()`` would."""
    mask = os.umask(0)
    os.umask(mask)
    for p in out_dir.rglob("*"):
        if p.is_file():
            os.chmod(p, 0o666 & ~mask)


def read_gguf_metadata(path) -> dict:
    """The GGUF header's key/value metadata, read directly (no ``gguf`` package, no torch).

    Scalars and strings come back as Python values; arrays of numbers or strings
    (the vocabulary, merges, token types: hundreds of thousands of entries) are skipped
    and come back as their length only, as ``{"array_len": n}``. Reading SmolLM2's
    header this way takes milliseconds, where ``gguf.GGUFReader`` decodes the whole
    vocabulary (seconds).

    Raises FuseError F209 when the file is not GGUF or its header is damaged.
    """
    return read_gguf_header(path)[0]


def read_gguf_header(path) -> tuple[dict, list[tuple[str, tuple[int, ...], int, int]], int]:
    """``(metadata, tensors, data_start)``: tensors as ``(name, shape, ggml_type, offset)``.

    Shapes are in GGUF order (fastest-varying dimension first); offsets are relative to
    ``data_start``, the aligned end of the header.
    """
    import struct

    try:
        with open(path, "rb") as f:
            data = f.read(8 << 20)  # headers are well under 8 MiB once arrays are skipped ...
            if data[:4] != GGUF_MAGIC:
                raise FuseError("F209", f"{Path(path).name} is not a GGUF file", file=path,
                                fix="point `base:` at a .gguf file or a Hugging Face model directory")
            r = _HeaderReader(f, data)
            version = struct.unpack("<I", data[4:8])[0]
            if version > 0xFFFF:  # a big-endian file (s390x builds of llama.cpp)
                r.endian = ">"
                version = struct.unpack(">I", data[4:8])[0]
            if version not in (2, 3):
                raise FuseError("F209", f"GGUF version {version} is not supported (only 2 and 3)", file=path,
                                fix="convert the model with a current llama.cpp `convert_hf_to_gguf.py`")
            r.pos = 8
            tensor_count, kv_count = r.unpack("QQ")
            meta = {"GGUF.version": version}
            for _ in range(kv_count):
                key = r.string()
                (vtype,) = r.unpack("I")
                meta[key] = r.value(vtype)
            tensors = []
            for _ in range(tensor_count):
                name = r.string()
                (n_dims,) = r.unpack("I")
                shape = r.unpack("Q" * n_dims) if n_dims else ()
                ggml_type, offset = r.unpack("IQ")
                tensors.append((name, tuple(shape), ggml_type, offset))
            alignment = meta.get("general.alignment", 32)
            if not isinstance(alignment, int) or alignment <= 0:
                alignment = 32
            data_start = -(-r.pos // alignment) * alignment
            return meta, tensors, data_start
    except FuseError:
        raise
    except (OSError, struct.error, ValueError, UnicodeDecodeError, KeyError, MemoryError) as e:
        raise FuseError("F209", f"GGUF header of {Path(path).name} is damaged or truncated ({e})", file=path,
                        fix="re-download the file; check it with `gguf-dump`") from None


def _check_tensor_data(path: Path, tensors, data_start: int) -> None:
    """A cut-off download fails here, with the right fix, instead of deep in numpy's reshape."""
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        return  # _require_gguf_package says so next
    size = path.stat().st_size
    for name, shape, ggml_type, offset in tensors:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise FuseError("F209", f"tensor {name} has GGML type {ggml_type}, unknown to gguf-py", file=path,
                            key=name, fix="upgrade gguf (pip install -U gguf), or use another quantization "
                                          "of the model") from None
        n = 1
        for d in shape:
            n *= d
        end = data_start + offset + n // block * type_size
        if end > size:
            raise FuseError("F209", f"GGUF file is truncated: tensor {name} ends at byte {end}, "
                            f"the file has {size}", file=path, key=name,
                            fix="the download or copy was cut short: fetch the file again")


class _HeaderReader:
    # GGUF value types -> struct format (8: string, 9: array)
    _SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def __init__(self, f, data: bytes):
        self.f, self.data, self.pos, self.endian = f, data, 0, "<"

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.data):  # header larger than the first read: read the rest in
            more = self.f.read(max(n, 8 << 20))
            if not more:
                raise ValueError("unexpected end of file")
            self.data += more

    def unpack(self, fmt: str):
        import struct

        size = struct.calcsize(self.endian + fmt)
        self._need(size)
        out = struct.unpack_from(self.endian + fmt, self.data, self.pos)
        self.pos += size
        return out

    def string(self) -> str:
        (n,) = self.unpack("Q")
        self._need(n)
        s = self.data[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in self._SCALARS:
            return self.unpack(self._SCALARS[vtype])[0]
        if vtype == 8:
            return self.string()
        if vtype == 9:
            (etype,), (n,) = self.unpack("I"), self.unpack("Q")
            if etype in self._SCALARS:
                import struct

                size = struct.calcsize(self._SCALARS[etype]) * n
                self._need(size)
                self.pos += size
            else:
                for _ in range(n):
                    self.value(etype)
            return {"array_len": n}
        raise ValueError(f"unknown GGUF value type {vtype}")


def _require_gguf_package(path) -> None:
    """transformers dequantizes through gguf-py; say so before importing torch, not after."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise FuseError("F209", "converting a GGUF base needs the `gguf` package, which is not installed",
                        file=path, fix=_PIP_FIX) from None
    from importlib import metadata

    try:
        version = metadata.version("gguf")
    except metadata.PackageNotFoundError:
        return  # a source checkout; let transformers judge it
    try:
        from packaging.version import Version

        too_old = Version(version) < Version(GGUF_MIN_VERSION)
    except Exception:
        return
    if too_old:
        raise FuseError("F209", f"gguf {version} is too old to convert a GGUF base (needs {GGUF_MIN_VERSION})",
                        file=path, fix=_PIP_FIX)


def _resolve_dtype(dtype, meta) -> str:
    if dtype is None or dtype == "auto":
        return _UNQUANTIZED_FILE_TYPES.get(meta.get("general.file_type"), "bfloat16")
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise FuseError("F103", f"dtype {dtype!r} is not supported for GGUF conversion", key="dtype",
                        fix="use one of: auto, " + ", ".join(_DTYPES))
    return name


def _make_dense(model) -> None:
    """Drop the GGUF quantization marker once every weight is a plain floating tensor."""
    import torch

    for pname, p in model.named_parameters():
        if not torch.is_floating_point(p) or type(p).__name__ not in ("Parameter", "Tensor"):
            raise RuntimeError(f"GGUF tensor {pname} was not dequantized ({type(p).__name__}, {p.dtype})")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    else:
        getattr(model.config, "__dict__", {}).pop("quantization_config", None)
    # the GGUF's general.name ends up in `_model_name_or_path`; it names no loadable model
    model.config.__dict__.pop("_model_name_or_path", None)
    model.config._name_or_path = ""
    model.name_or_path = ""


def _fix_tokenizer(tokenizer, meta) -> None:
    for attr, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        idx = meta.get(f"tokenizer.ggml.{key}")
        if isinstance(idx, int) and 0 <= idx < len(tokenizer):
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(idx))
    ctx = meta.get(f"{meta.get('general.architecture')}.context_length")
    if isinstance(ctx, int) and ctx > 0:
        tokenizer.model_max_length = ctx
    tokenizer.clean_up_tokenization_spaces = False
    tokenizer.name_or_path = ""
    init = getattr(tokenizer, "init_kwargs", None)
    if isinstance(init, dict):
        for k in ("name_or_path", "vocab_file", "gguf_file", "is_local", "local_files_only"):
            init.pop(k, None)
        init["clean_up_tokenization_spaces"] = False
        if isinstance(ctx, int) and ctx > 0:
            init["model_max_length"] = ctx


def gguf_to_hf_in_subprocess(gguf_path, out_dir, *, dtype="auto") -> None:
    """:func:`gguf_to_hf` in a child process, so that the ~1 GB it takes (transformers' GGUF
    loader, the dequantized model) is given back to the system before the merge starts: a merge
    promises bounded memory, and a Python process keeps what it once held. Findings cross back."""
    import json
    import subprocess

    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-m", "stages.io.gguf", "--finding-json", str(gguf_path), str(out_dir), dtype],
                       capture_output=True, text=True, env=env)
    if r.returncode == 0:
        return
    lines = r.stdout.strip().splitlines()
    try:
        f = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = [line for line in r.stderr.strip().splitlines() if line.strip()][-3:]
        raise FuseError("F209", f"converting {Path(gguf_path).name} failed (exit {r.returncode}): "
                        + " / ".join(tail), file=gguf_path,
                        fix="run python -m stages.io.gguf IN.gguf OUT_DIR to see the whole output") from None
    raise FuseError(f["code"], f["message"], file=f.get("file"), line=f.get("line"), key=f.get("key"),
                    fix=f.get("fix"), **f.get("extra", {}))


def _main(argv=None) -> int:  # python -m stages.io.gguf [--finding-json] IN.gguf OUT_DIR [dtype]
    import json

    args = sys.argv[1:] if argv is None else list(argv)
    as_json = bool(args) and args[0] == "--finding-json"
    args = args[1:] if as_json else args
    if len(args) not in (2, 3):
        print("usage: python -m stages.io.gguf IN.gguf OUT_DIR [auto|bfloat16|float16|float32]", file=sys.stderr)
        return 2
    try:
        gguf_to_hf(args[0], args[1], dtype=args[2] if len(args) == 3 else "auto")
    except FuseError as e:
        print(json.dumps(e.finding.to_dict()) if as_json else e.finding.line_text(),
              file=sys.stdout if as_json else sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
