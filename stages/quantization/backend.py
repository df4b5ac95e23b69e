"""GPTQ and AWQ through GPTQModel: a merged Hugging Face model in, a standard quantized checkpoint out.

Why GPTQModel (``docs/quantize-export.md``): it is what transformers 5 and optimum load GPTQ
and AWQ checkpoints through, it quantizes on CPU as well as on CUDA, and it writes the
formats vLLM, SGLang and transformers read as they are (``quant_method: gptq`` /
``quant_method: awq, version: gemm``). AutoAWQ is archived and cannot run its outputs on CPU.

Known quirks handled here (GPTQModel 7.6, see ``docs/quantize-export.md``):

- on machines with 2 or fewer cores its CPU pool is too small for its model loader: set
  ``GPTQMODEL_CPU_WORKERS`` (the default we set: at least 2) before it is imported;
- AWQ on CPU needs the torch kernel (``BACKEND.AWQ_TORCH``);
- it insists on loading a tokenizer; a model without one is quantized from token ids;
- its default block packer is a C++ extension compiled on first use (~1 min on 2 cores):
  the pure-torch packer is used on CPU, where models are small;
- it records a temp path (``offload_to_disk_path``) in ``quantization_config``, and writes
  ``quant_log.csv`` with timings: both are machine-specific, so they are scrubbed / moved
  out of the model directory, keeping the output deterministic;
- it writes ``logs/gptq_log_*.log`` under the *current directory* (a relative path in
  ``gptqmodel.looper.loop_processor``, no setting): the call runs inside the stage's log
  directory with that path pointed there (:func:`files_kept_in`).
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..findings import FuseError
from .capture import captured

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class QuantizeResult:
    seconds: float
    loss_max: float | None = None  # GPTQ/AWQ's own per-module loss, the worst one
    loss_mean: float | None = None
    losses: dict = field(default_factory=dict)  # module -> loss


def set_cpu_workers() -> None:
    """GPTQModel 7.6 asks for 2 model-loader workers but gives its CPU pool (cores + 1) // 2:
    on a 2-core machine that is 1, and ``quantize()`` fails. Give it at least 2 (before import)."""
    cores = os.cpu_count() or 1
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (cores + 1) // 2)))


def quantize_model(model_dir: Path, out_dir: Path, *, method: str, bits: int, group_size: int, sym: bool,
                   desc_act: bool, samples: list[list[int]], device: str, log_file: Path | None = None
                   ) -> QuantizeResult:
    """Quantize the model at ``model_dir`` into ``out_dir`` (a Hugging Face checkpoint with
    ``quantization_config``). ``samples``: calibration token ids. ``device``: ``cpu`` or ``cuda``.

    Example::

        quantize_model(Path("runs/x/merge"), Path("out"), method="gptq", bits=4, group_size=128,
                       sym=True, desc_act=False, samples=[[1, 17, 42, 99]], device="cpu")
    """
    import time

    set_cpu_workers()
    started = time.perf_counter()
    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir).resolve()  # the call runs in another directory
    log_file = Path(log_file).resolve() if log_file else None
    with captured(log_file), files_kept_in(log_file.parent if log_file else None):
        try:
            import gptqmodel
            from gptqmodel import BACKEND, AWQConfig, GPTQConfig, GPTQModel
        except ImportError as e:
            from ..extras import install_fix
            raise FuseError("F602", f"quantize needs GPTQModel, which is not installed ({e})",
                            fix=install_fix({"quantize": []}) + " (on CPU keep "
                                "gptqmodel 7.6.0: 7.7 pulls a CUDA build of torch)") from None
        common = dict(bits=bits, group_size=group_size, sym=sym, offload_to_disk=False,
                      pack_impl="gpu" if device.startswith("cuda") else "original")
        if method == "gptq":
            # act_group_aware reorders columns within groups: with one group per row there is none
            cfg = GPTQConfig(desc_act=desc_act, act_group_aware=group_size > 0, **common)
        else:
            cfg = AWQConfig(**common)
        data = [{"input_ids": s, "attention_mask": [1] * len(s)} for s in samples]
        kwargs = {}
        if method == "awq" and not device.startswith("cuda"):
            kwargs["backend"] = BACKEND.AWQ_TORCH
        with _no_tokenizer_needed(model_dir, gptqmodel):
            try:
                model = GPTQModel.load(str(model_dir), cfg, device="cuda:0" if device == "cuda" else device)
                model.quantize(data, batch_size=1, **kwargs)
                model.save(str(out_dir))
            except FuseError:
                raise
            except Exception as e:
                from .capture import tail

                lines = tail(log_file) if log_file else []
                raise FuseError("F602", f"GPTQModel could not {method}-quantize this model: {type(e).__name__}: "
                                        f"{str(e).splitlines()[0][:300] if str(e) else ''}",
                                file=str(log_file) if log_file else None,
                                fix="see the log for its output; GPTQModel supports the architectures listed in its "
                                    "docs (a custom architecture needs a GPTQModel model definition)",
                                log_tail=lines) from e
    result = QuantizeResult(seconds=time.perf_counter() - started)
    _read_quant_log(out_dir, result)
    scrub_config(out_dir)
    return result


@contextlib.contextmanager
def files_kept_in(log_dir: Path | None):
    """Run inside ``log_dir`` (created), with GPTQModel's log directory pointed at ``log_dir/gptqmodel``:
    what it writes by a relative path (its ``logs/gptq_log_*.log``, anything a later version adds)
    stays in the workdir instead of the user's current directory. None: leave both alone."""
    if log_dir is None:
        yield
        return
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        from gptqmodel.looper import loop_processor
    except ImportError:  # another layout: the chdir still keeps its relative paths in log_dir
        loop_processor = None
    saved = getattr(loop_processor, "_PROJECT_LOG_DIR", None)
    if saved is not None:
        loop_processor._PROJECT_LOG_DIR = log_dir / "gptqmodel"
    cwd = os.getcwd()
    os.chdir(log_dir)
    try:
        yield
    finally:
        os.chdir(cwd)
        if saved is not None:
            loop_processor._PROJECT_LOG_DIR = saved


@contextlib.contextmanager
def _no_tokenizer_needed(model_dir: Path, gptqmodel):
    """GPTQModel loads a tokenizer with the model; with none on disk it fails. Calibration is
    token ids already, so none is needed: let its loader return None for such a model."""
    if any((Path(model_dir) / f).exists() for f in TOKENIZER_FILES):
        yield
        return
    from gptqmodel.models import loader

    original = loader.load_hf_tokenizer
    loader.load_hf_tokenizer = lambda *a, **k: None
    try:
        yield
    finally:
        loader.load_hf_tokenizer = original


def _read_quant_log(out_dir: Path, result: QuantizeResult) -> None:
    """Keep GPTQModel's per-module losses (``quant_log.csv``) as numbers; the file itself holds
    timings, so it leaves the model directory."""
    path = Path(out_dir) / "quant_log.csv"
    if not path.exists():
        return
    with contextlib.suppress(OSError, ValueError, csv.Error), path.open(newline="") as f:
        for row in csv.DictReader(f):
            name = f"layers.{row.get('layer')}.{row.get('module')}"
            with contextlib.suppress(TypeError, ValueError):
                result.losses[name] = float(row.get("loss"))
    path.unlink()
    if result.losses:
        result.loss_max = max(result.losses.values())
        result.loss_mean = sum(result.losses.values()) / len(result.losses)


def scrub_config(out_dir: Path) -> None:
    """Drop machine-specific values (a temp path) from ``quantization_config`` in config.json and
    quantize_config.json; nothing else changes."""
    for name in ("config.json", "quantize_config.json"):
        path = Path(out_dir) / name
        if not path.exists():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        qc = data.get("quantization_config", data) if name == "config.json" else data
        meta = qc.get("meta") if isinstance(qc, dict) else None
        changed = False
        if isinstance(meta, dict) and meta.get("offload_to_disk_path"):
            meta["offload_to_disk_path"] = None
            changed = True
        if changed:
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def quantization_config(model_dir: Path) -> dict:
    """The ``quantization_config`` a checkpoint declares ({} when none)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    qc = config.get("quantization_config")
    return qc if isinstance(qc, dict) else {}
