"""Path safety: every path a run writes is checked against what it reads, before anything runs.

A write path (the workdir, each ``publish: {to: dir, path}``, one-shot ``merge OUT``) is
resolved, symlinks included, and refused with ``F111`` (exit 2) when it

- equals, lies inside, or contains a path the run reads: the base model, an adapter, a file a
  stage parameter names (quantize's calibration file, publish's card template), or the
  Hugging Face cache (``huggingface_hub.constants.HF_HUB_CACHE``);
- equals or contains the pipeline file's directory (inside it is normal: ``runs/``, ``dist/``);
- *is* ``/``, ``$HOME``, the git top level of the pipeline file's directory, or
  ``$GITHUB_WORKSPACE``;
- (a publish path) equals, lies inside or contains the workdir, or another publish path.

Stage ids name directories in the workdir: the pipeline loader checks them (one rule,
``stages.pipeline._check_name`` and ``RESERVED_IDS``). The rules are stated in docs/safety.md.
"""
from __future__ import annotations

import os
from pathlib import Path

from .findings import FuseError



def resolved(p) -> Path:
    """Absolute, with every symlink of the part that exists followed (``~`` expanded)."""
    return Path(os.path.expanduser(str(p))).resolve()


def relation(write: Path, read: Path) -> str | None:
    """How two resolved paths overlap: 'is', 'is inside', 'contains', or None."""
    if write == read:
        return "is"
    if read in write.parents:
        return "is inside"
    if write in read.parents:
        return "contains"
    return None


def hf_cache() -> Path | None:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a dependency
        return None
    return resolved(constants.HF_HUB_CACHE)


def git_top(start: Path) -> Path | None:
    """The git work tree that holds ``start`` (a ``.git`` dir or file), without running git."""
    for d in (start, *start.parents):
        if (d / ".git").exists():
            return d
    return None


def protected(here: Path | None) -> list[tuple[str, Path]]:
    """Directories a run may never write as a whole: /, $HOME, the git top level, $GITHUB_WORKSPACE."""
    out = [("the file system root", Path("/"))]
    if os.environ.get("HOME"):
        out.append(("$HOME", resolved(os.environ["HOME"])))
    if os.environ.get("GITHUB_WORKSPACE"):
        out.append(("$GITHUB_WORKSPACE", resolved(os.environ["GITHUB_WORKSPACE"])))
    top = git_top(here) if here else None
    if top:
        out.append(("the git top level of the pipeline", top))
    return out


def check_write(write, reads: list[tuple[str, Path]], *, what: str, here: Path | None = None,
                fix: str, **where) -> None:
    """F111 unless ``write`` keeps clear of every read path, the pipeline's directory and the
    protected directories. ``where`` is the finding's file/line/key."""
    w = resolved(write)
    for label, p in protected(here):
        if w == p:
            raise FuseError("F111", f"{what} {w} is {label}", fix=fix, **where)
    if here is not None:
        rel = relation(w, here)
        if rel in ("is", "contains"):
            raise FuseError("F111", f"{what} {w} {rel} the pipeline file's directory {here}", fix=fix, **where)
    for label, p in reads:
        rel = relation(w, resolved(p))
        if rel:
            raise FuseError("F111", f"{what} {w} {rel} {label} {p}, which the run reads", fix=fix, **where)


def run_reads(pipeline) -> list[tuple[str, Path]]:
    """What a pipeline reads: the local base, the adapters, files stage parameters name, the HF cache."""
    reads: list[tuple[str, Path]] = []
    if pipeline.base_is_local():
        reads.append(("the base model", Path(pipeline.base)))
    reads += [("the adapter", a.path) for a in pipeline.adapters]
    for s in pipeline.stages:
        files = getattr(s.module, "input_files", None)
        if files:
            reads += [(f"a file stage '{s.id}' reads", Path(f)) for f in files(s.params)]
    cache = hf_cache()
    if cache is not None:
        reads.append(("the Hugging Face cache", cache))
    return reads


def check_run_paths(pipeline) -> None:
    """Every path the pipeline writes, checked once before the workdir is created (F111)."""
    here = pipeline.path.parent
    file = str(pipeline.path)
    reads = run_reads(pipeline)
    workdir_line = (getattr(pipeline, "lines", None) or {}).get(("workdir",))
    check_write(pipeline.workdir, reads, what="workdir", here=here, file=file, line=workdir_line, key="workdir",
                fix="point workdir: at its own directory, e.g. runs/${name} next to the pipeline file")
    published: list[tuple[str, Path]] = []
    for s in pipeline.stages:
        if s.name != "publish" or s.params.get("to") != "dir" or not s.params.get("path"):
            continue
        target = s.params["path"]
        check_write(target, reads + [("the workdir", pipeline.workdir)] + published, what="publish path",
                    here=here, file=file, line=s.line, key=f"{s.id}.path",
                    fix="publish to a new directory of its own, outside the base, the adapters and the workdir "
                        "(e.g. dist/${name} next to the pipeline file)")
        published.append((f"the publish path of '{s.id}'", resolved(target)))


def check_merge_output(out, base, adapters) -> None:
    """One-shot ``merge BASE ADAPTER OUT``: OUT keeps clear of what the merge reads and of /, $HOME..."""
    reads = []
    if Path(base).exists():
        reads.append(("the base model", Path(base)))
    reads += [("the adapter", Path(a)) for a in adapters]
    cache = hf_cache()
    if cache is not None:
        reads.append(("the Hugging Face cache", cache))
    check_write(out, reads, what="output", here=None, file=str(out),
                fix="write the merged model to a new directory outside the base, the adapters and the "
                    "Hugging Face cache")


def portable(value, here: Path):
    """``value`` with every absolute path made relative to ``here`` (the pipeline's directory), or cut to
    its last part when outside it: what Fuse writes for others to read (published files, stage reports)
    must be the same bytes in every checkout, and must not carry a user's home directory."""
    if isinstance(value, dict):
        return {k: portable(v, here) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, here) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        try:
            return Path(value).resolve().relative_to(Path(here).resolve()).as_posix()
        except (ValueError, OSError, RuntimeError):
            return Path(value).name
    if isinstance(value, str):  # a message that names a path inside the pipeline's directory
        for prefix in {f"{Path(here).resolve()}{os.sep}", f"{Path(here).absolute()}{os.sep}"}:
            value = value.replace(prefix, "")
    return value

