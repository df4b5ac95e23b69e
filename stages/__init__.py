"""Fuse: turn a base model + PEFT adapter into one standalone, verified, published model.

The Python API mirrors the CLI (``python -m stages``)::

    import stages

    stages.run("pipeline.yaml")                       # validate -> merge -> ... -> publish
    stages.run("pipeline.yaml", overrides=["merge.dtype=float16"], from_stage="merge")
    stages.merge("models/base", "outputs/lora", "merged/")   # one-shot merge, no pipeline

Nothing heavy is imported here: torch loads only when a stage that needs it runs.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["run", "status", "verify", "merge", "FuseError", "__version__"]

from .findings import FuseError


def run(pipeline, *, overrides=(), from_stage=None, until=None, only=None, force=False, full_verify=False,
        log=None) -> dict:
    """Run a pipeline file; returns ``{stage id: "done" | "skipped"}``. Raises :class:`FuseError`."""
    from .pipeline import load
    from .runner import Runner

    p = load(pipeline, overrides)
    return Runner(p, force=force, full_verify=full_verify, log=log).run(from_id=from_stage, only=only, until=until)


def status(pipeline, *, overrides=()) -> list[dict]:
    """Each stage's state (fresh / stale / failed ...) and why, without running anything."""
    from .pipeline import load
    from .runner import Runner

    return Runner(load(pipeline, overrides)).status()


def verify(workdir) -> list[str]:
    """Re-hash every output recorded in ``workdir/manifest.json``; returns the problems found."""
    from pathlib import Path

    from .manifest import Manifest

    m = Manifest.load(Path(workdir))
    if not m.path.exists():
        raise FuseError("F404", "no manifest.json here", file=m.path, fix="pass the workdir of a run")
    problems = []
    for stage_id, rec in m.stages.items():
        if rec.get("status") == "done":
            problems += m.verify_outputs(stage_id, full=True)
    return problems


def merge(base, adapter, output, *, dtype="auto", max_shard_size="5GB", weight=1.0, log=None, **options) -> dict:
    """Merge an adapter into a base, without a pipeline or manifest. ``output`` must not exist.

    ``adapter`` is a directory, or a list of ``(directory, weight)`` to combine several;
    ``options`` are the merge stage's other parameters (``method``, ``density``, ``seed``,
    ``base_precision``, ...). The output appears only when complete (written to a temp
    sibling, then renamed). Returns the merge metrics.

    >>> stages.merge("models/base", "outputs/lora", "merged/", dtype="bfloat16")  # doctest: +SKIP
    """
    import shutil
    import uuid
    from pathlib import Path

    from .manifest import StatCache
    from .steps.merge import parse_size
    from .peft.merge import merge_model
    from .sources import resolve_base

    from .paths import check_merge_output

    adapter_dirs = [p for p, _ in adapter] if isinstance(adapter, (list, tuple)) else [adapter]
    check_merge_output(output, base, adapter_dirs)  # F111 before anything is read or written
    output = Path(output).resolve()
    if output.exists():
        raise FuseError("F207", f"output {output} already exists", file=output,
                        fix="give a new directory (Fuse never merges over an existing one)")
    log = log or (lambda m: print(m, flush=True))
    tmp = output.with_name(f".tmp-{output.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        if Path(base).is_dir():  # a local model: no digest needed, there is no manifest to record it in
            from .io.checks import check_loadable

            base_dir = Path(base)
            check_loadable(base_dir)  # F205: a base transformers cannot load gives an output no one can load
        else:  # a .gguf file or a hub id
            base_dir = resolve_base(str(base), tmp.parent / f".bases-{output.name}", StatCache(None), log=log).dir
        adapters = [(Path(p), float(w)) for p, w in adapter] if isinstance(adapter, (list, tuple)) \
            else [(Path(adapter), float(weight))]
        report = merge_model(base_dir, adapters, tmp, dtype=dtype, max_shard_bytes=parse_size(max_shard_size),
                             log=log, **options)
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp.parent / f".bases-{output.name}", ignore_errors=True)
    return report.metrics
