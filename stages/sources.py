"""Where the base model comes from: a local directory, a GGUF file, or the Hugging Face Hub.

Whatever the source, stages get a plain local Hugging Face model directory and a
reference that pins it (a content digest, and for the Hub the commit sha, never a
branch name).
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .findings import FuseError
from .io.checks import check_loadable

_HUB = re.compile(r"^(?:hf://)?(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "*.txt", "*.model", "*.py", "*.md", "*.tiktoken"]


@dataclass
class BaseRef:
    """A resolved base: the directory stages read, and what pins it for the manifest."""

    dir: Path
    kind: str  # "local" | "gguf" | "hub"
    name: str  # what the user wrote (hub id or path)
    digest: str = ""
    revision: str | None = None  # hub commit sha
    files: list = field(default_factory=list)

    def describe(self) -> dict:
        d = {"kind": self.kind, "name": self.name, "digest": self.digest}
        if self.revision:
            d["revision"] = self.revision
        return d


def resolve_base(spec: str, workdir: Path, cache, log=print) -> BaseRef:
    """Turn the pipeline's ``base:`` into a local model directory.

    ``cache`` is the run's :class:`~stages.manifest.StatCache`, so a large base is hashed
    once, not on every run. A directory (local or from the Hub) must hold a config.json that
    transformers can load (:func:`stages.io.checks.check_loadable`, F205); a GGUF file is
    converted by transformers itself.
    """
    path = Path(spec)
    if path.is_dir():
        check_loadable(path)  # before hashing: a base no loader can load is refused before any stage runs
        digest, files = cache.tree(path)
        return BaseRef(dir=path, kind="local", name=spec, digest=digest, files=files)
    if path.is_file():
        if path.suffix != ".gguf":
            raise FuseError("F209", f"base '{path.name}' is a file but not a .gguf model", file=path,
                            fix="point base: at a model directory (config.json + *.safetensors) or a .gguf file")
        digest, files = cache.tree(path)
        out = workdir / ".bases" / f"gguf-{digest.split(':')[1][:16]}"
        if not (out / "config.json").exists():
            log(f"converting GGUF base {path.name} to safetensors (once; cached in {out})")
            from .io.gguf import gguf_to_hf_in_subprocess

            tmp = out.with_name(f".tmp-{out.name}-{uuid.uuid4().hex[:6]}")
            try:
                gguf_to_hf_in_subprocess(path, tmp)
                os.replace(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return BaseRef(dir=out, kind="gguf", name=path.name, digest=digest, files=files)
    m = _HUB.match(spec)
    if not m:
        raise FuseError("F105", f"base '{spec}' does not exist", key="base",
                        fix="give a local model directory, a .gguf file, or a hub id org/name@revision")
    return _from_hub(m["repo"], m["rev"], cache, log)


def _from_hub(repo: str, revision: str | None, cache, log) -> BaseRef:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    log(f"fetching base {repo}@{revision or 'main'} from the Hub (cached by huggingface_hub)")
    try:
        local = Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise FuseError("F205", f"base {repo} is not in the local Hub cache and the Hub cannot be reached",
                        key="base", fix="connect to the network once, or point base: at a local directory") from None
    except HfHubHTTPError as e:
        raise FuseError("F205", f"the Hub refused {repo}@{revision or 'main'}: {str(e).splitlines()[0]}",
                        key="base", fix="check the repo id and revision, and HF_TOKEN for private or gated repos")
    check_loadable(local)
    digest, files = cache.tree(local)
    # snapshot directories are named by the commit sha they hold
    return BaseRef(dir=local, kind="hub", name=repo, digest=digest, revision=local.name, files=files)
