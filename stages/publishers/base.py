"""The interface every publish target implements, and the one algorithm that drives them.

:func:`sync` is the whole publish, the same for every target:

1. ``authenticate()``: find and check credentials. A missing or rejected credential is one
   ``F502`` finding here, before anything is created or sent.
2. ``open()``: make sure the destination exists (create the Hub repo, check the bucket)
   and note its current state (the branch head for the Hub).
3. ``check_release(files)``: a release marker that already exists (a Hub tag) must point at
   exactly these files, or the publish stops (``F503``) before sending anything.
   ``claim(files)``: a target that must protect what it does not own (``dir``, ``s3``)
   refuses a path held by someone else (``F509``), and a directory records what it is about
   to write (its journal), before anything is written.
4. ``remote(files)``: size and sha256 of what the target already holds at those paths.
   Files whose sha256 already matches are not sent: an unchanged re-publish sends 0 bytes,
   and a publish interrupted half way sends only what is missing.
5. ``previous()``: the files an earlier Fuse publish put there (its ``SHA256SUMS``); those
   that are no longer part of the model are deleted, nothing else is touched.
6. ``push(upload, delete)``: send what is missing, in the order given (model files first,
   ``SHA256SUMS`` last), as one commit where the target has commits.
7. ``verify(files)``: every file's sha256 and size, read back from the target.
8. ``seal()``: tag (Hub), mark the journal complete (dir), and what to record: commit, URL, tag.

:func:`kill_point` marks the places where the kill tests end the process.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..findings import FuseError

SUMS = "SHA256SUMS"


@dataclass(frozen=True)
class LocalFile:
    path: str  # relative, with "/" separators: the path on the target
    source: Path  # where the bytes are on this machine
    size: int
    sha256: str  # from the manifest: computed once, when the file was written


@dataclass(frozen=True)
class RemoteFile:
    size: int
    sha256: str | None = None  # content sha256, where the target keeps it (Hub LFS oid, S3 metadata)
    blob_id: str | None = None  # git blob sha1 (Hub files stored in git, not LFS)


def git_blob_sha1(path: Path) -> str:
    """git's object id of a file's content (how the Hub names a non-LFS file)."""
    h = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def matches(local: LocalFile, remote: RemoteFile | None) -> bool:
    """Does the target hold exactly this file? Compares sha256 where the target knows it."""
    if remote is None or remote.size != local.size:
        return False
    if remote.sha256:
        return remote.sha256 == local.sha256
    if remote.blob_id:
        return remote.blob_id == git_blob_sha1(local.source)
    return False


def parse_sums(text: str) -> dict[str, str]:
    """``SHA256SUMS`` (``sha256sum`` format) -> {path: sha256}."""
    out = {}
    for line in text.splitlines():
        sha, sep, path = line.partition("  ")
        if sep and len(sha) == 64:
            out[path] = sha
    return out


from ..secrets import redact  # noqa: E402,F401  (the one redaction rule: stages/secrets.py)


class Publisher:
    """One publish target. Subclasses set ``kind`` and implement the steps of :func:`sync`."""

    kind = ""

    def __init__(self, params: dict, *, log: Callable[[str], None], warn: Callable[..., None] | None = None,
                 stage_id: str = "publish", file=None, line=None, sleep: Callable[[float], None] | None = None):
        self.params = params
        self.secrets: set[str] = set()  # credentials this publisher found: never printed or recorded
        self._log = log
        self._warn = warn or (lambda code, message, **kw: log(f"warning {code} {message}"))
        self.stage_id = stage_id
        self.file, self.line = file, line
        self.sleep = sleep or (lambda seconds: time.sleep(seconds))

    # -- helpers shared by targets -------------------------------------------------------

    def log(self, msg: str):
        self._log(redact(str(msg), self.secrets))

    def warn(self, code: str, msg: str, **kw):
        self._warn(code, redact(msg, self.secrets), **kw)

    def error(self, code: str, msg: str, *, fix: str | None = None, key: str | None = None) -> FuseError:
        """A finding about this step, with any credential scrubbed out of the text."""
        return FuseError(code, redact(msg, self.secrets), file=self.file, line=self.line,
                         key=f"{self.stage_id}.{key}" if key else None,
                         fix=redact(fix, self.secrets) if fix else None)

    # -- the steps ---------------------------------------------------------------------

    def describe(self) -> str:
        raise NotImplementedError

    def authenticate(self) -> None:
        pass

    def open(self) -> None:
        pass

    def check_release(self, files: list[LocalFile]) -> None:
        pass

    def remote(self, files: list[LocalFile]) -> dict[str, RemoteFile]:
        """What the target holds at the paths of ``files``: {path: RemoteFile}."""
        raise NotImplementedError

    def previous(self, remote: dict[str, RemoteFile], files: list[LocalFile]) -> set[str]:
        """Paths an earlier Fuse publish left on the target (default: none known)."""
        return set()

    def claim(self, files: list[LocalFile]) -> None:
        """Before anything is written: refuse paths Fuse does not own, record what it will write."""

    def close(self) -> None:
        """Release what :meth:`open` holds (the dir target's lock); runs whatever happened."""

    def push(self, upload: list[LocalFile], delete: list[str], files: list[LocalFile]) -> None:
        raise NotImplementedError

    def verify(self, files: list[LocalFile]) -> list[str]:
        raise NotImplementedError

    def seal(self, files: list[LocalFile]) -> dict:
        return {}


@dataclass
class Outcome:
    files: int
    uploaded: list[LocalFile]
    deleted: list[str]
    record: dict  # what seal() returned: commit, url, tag...

    @property
    def bytes_uploaded(self) -> int:
        return sum(f.size for f in self.uploaded)


def sync(pub: Publisher, files: list[LocalFile]) -> Outcome:
    """Publish ``files`` to ``pub``'s target: idempotent, resumable, verified. See the module doc."""
    try:
        return _sync(pub, files)
    finally:
        pub.close()


def _sync(pub: Publisher, files: list[LocalFile]) -> Outcome:
    pub.authenticate()
    pub.open()
    pub.check_release(files)
    pub.claim(files)
    remote = pub.remote(files)
    upload = [f for f in files if not matches(f, remote.get(f.path))]
    wanted = {f.path for f in files}
    delete = sorted(p for p in pub.previous(remote, files) if p not in wanted)
    if upload or delete:
        pub.log(f"{pub.describe()}: {len(upload)} of {len(files)} files to send "
                f"({sum(f.size for f in upload) / 1e6:.1f} MB)" + (f", {len(delete)} to delete" if delete else ""))
        pub.push(upload, delete, files)
    else:
        pub.log(f"{pub.describe()}: all {len(files)} files already there, nothing to send")
    problems = pub.verify(files)
    if problems:
        raise pub.error("F506", f"{len(problems)} published file(s) do not match after upload: "
                                + "; ".join(problems[:3]),
                        fix="run again: files that do not match are sent again")
    record = pub.seal(files)
    return Outcome(files=len(files), uploaded=upload, deleted=delete, record=record)


from ..manifest import crash_point as kill_point  # noqa: E402,F401  (the one test kill hook)


def retrying(pub: Publisher, what: str, fn: Callable, *, retry_status=(429, 500, 502, 503, 504), tries: int = 5,
             status_of: Callable[[BaseException], int | None], retry_after_of: Callable[[BaseException], float | None],
             transient: tuple = ()):
    """Call ``fn()``; on a rate limit or a transient server/network error wait and try again.

    Honours ``Retry-After`` (capped at 5 minutes). Only for idempotent calls: never wrap a
    commit in this.
    """
    wait = 1.0
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - filtered just below
            status = status_of(e)
            if not ((status in retry_status) or isinstance(e, transient)) or attempt == tries:
                raise
            delay = retry_after_of(e)
            delay = min(float(delay), 300.0) if delay is not None else wait
            pub.log(f"{pub.describe()}: {what} got {status or type(e).__name__}; retrying in {delay:g}s "
                    f"({attempt}/{tries - 1})")
            pub.sleep(delay)
            wait = min(wait * 2, 30.0)
