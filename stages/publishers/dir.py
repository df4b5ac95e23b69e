"""``to: dir``: a local directory (a mounted volume, a Docker build context).

Only files whose sha256 differs are copied, each through a temp file, fsync and a rename,
so a re-publish of an unchanged model copies nothing and a reader never sees half a file.
Files of an earlier publish that are no longer part of the model are removed. The
directory must be new, empty, or hold an earlier Fuse publish (``fuse-provenance.json``),
and must not be inside the workdir.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from ..manifest import list_files, sha256_file
from .base import LocalFile, Publisher as _Base, RemoteFile

PROVENANCE = "fuse-provenance.json"


class Publisher(_Base):
    kind = "dir"

    def __init__(self, params: dict, *, workdir: Path | None = None, **kw):
        super().__init__(params, **kw)
        self.target = Path(params["path"])
        self.workdir = workdir
        self.copied: list[LocalFile] = []

    def describe(self) -> str:
        return f"dir {self.target}"

    def open(self):
        target = self.target.resolve()
        if self.workdir is not None:
            inside = Path(self.workdir).resolve()
            if target == inside or inside in target.parents:
                raise self.error("F501", f"publish path {target} is inside the workdir", key="path",
                                 fix="publish to a directory outside the workdir")
        if target.exists() and any(target.iterdir()) and not (target / PROVENANCE).exists():
            raise self.error("F501", f"publish path {target} is not empty and holds no earlier Fuse publish",
                             key="path", fix="choose an empty or new directory (Fuse replaces files it published "
                                             "before)")
        target.mkdir(parents=True, exist_ok=True)

    def remote(self, files):
        """Hash only files whose size already matches (a different size is a different file)."""
        out = {}
        for f in files:
            p = self.target / f.path
            if p.is_file():
                size = p.stat().st_size
                out[f.path] = RemoteFile(size=size, sha256=sha256_file(p) if size == f.size else None)
        return out

    def previous(self, remote, files):
        return set(list_files(self.target))  # whatever is not part of the model now goes

    def push(self, upload, delete, files):
        for f in upload:
            dest = self.target / f.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                shutil.copyfile(f.source, tmp)
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
            self.copied.append(f)
        for rel in delete:
            (self.target / rel).unlink(missing_ok=True)

    def verify(self, files):
        """Re-hash what was copied now; the rest was hashed by :meth:`remote` a moment ago."""
        copied = {f.path for f in self.copied}
        problems = []
        for f in files:
            p = self.target / f.path
            if not p.is_file():
                problems.append(f"{p}: missing")
            elif p.stat().st_size != f.size or (f.path in copied and sha256_file(p) != f.sha256):
                problems.append(f"{p}: content differs")
        return problems
