"""``to: dir``: a local directory (a mounted volume, a Docker build context).

**Ownership** (the one rule, :meth:`Publisher.claim`): Fuse overwrites or removes only the
files it recorded as its own in that directory: those its journal lists, or, for a directory
published before the journal existed, those its ``fuse-provenance.json`` and ``SHA256SUMS``
list (plus those two and ``README.md``). Anything else there (``EVAL.md``, a ``samples/``
folder, a ``Dockerfile``) is left alone; a file of someone else's at a path Fuse must write
is ``F509``, raised before anything is written.

**Journal** (``.fuse-publish.json``, written atomically before the first copy): the files
this publish is about to write, with their sha256 and size, and every path Fuse owns there.
A run killed half way, stopped by a full disk or missing its ``SHA256SUMS`` leaves a journal
that the next run reads: it recognises its own partial publish, removes its own leftover
temp files (``.<name>.<8 hex>.tmp`` next to a file it owns), and copies only the files
that are missing or differ. When every file verifies, the journal is rewritten with
``"complete": true`` and owns exactly the published files.

Each file is copied through a temp file, fsync and a rename (then the folder is fsynced),
so a reader never sees half a file. An ``OSError`` of the target is one finding naming the
path: ``F402`` for a full disk, ``F510`` otherwise.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from ..manifest import fsync_path, sha256_file
from .base import SUMS, LocalFile, Publisher as _Base, RemoteFile, kill_point, parse_sums

PROVENANCE = "fuse-provenance.json"
README = "README.md"
JOURNAL = ".fuse-publish.json"
JOURNAL_VERSION = 1
TEMP = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.tmp$")  # what _atomic_copy names its temp files
CHUNK = 1 << 20
# Weight files of another model in the target would be mixed with the published ones: a collision
# even when the names differ (a foreign model.safetensors beside Fuse's shards).
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.onnx", "*.onnx.data",
                "*.gguf", "*.pt", "*.pth")


def safe_rel(rel: str) -> bool:
    """A relative path that stays inside the target: no absolute path, ``..``, or empty part."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        return False
    parts = PurePosixPath(rel).parts
    return not PurePosixPath(rel).is_absolute() and all(p not in ("", ".", "..") for p in parts) \
        and "/".join(parts) == rel


def temp_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")


def _findings(step):
    """A step whose OSError (an unreadable folder, a read-only mount) is one finding, not a traceback."""
    @functools.wraps(step)
    def wrapped(self, *a, **kw):
        with self._fs(self.target):
            return step(self, *a, **kw)
    return wrapped


class Publisher(_Base):
    kind = "dir"

    def __init__(self, params: dict, *, workdir: Path | None = None, **kw):
        super().__init__(params, **kw)
        self.target = Path(params["path"])
        self.workdir = workdir
        self.copied: list[LocalFile] = []
        self.owned: set[str] = set()  # what Fuse recorded as its own here before this publish
        self._lock_fd = None

    def describe(self) -> str:
        return f"dir {self.target}"

    # -- errors ----------------------------------------------------------------------

    @contextmanager
    def _fs(self, path: Path):
        """An OSError while touching ``path`` becomes one finding naming it."""
        try:
            yield
        except OSError as e:
            raise self._os_error(e, Path(e.filename) if e.filename else path) from None

    def _os_error(self, e: OSError, path: Path):
        reason = e.strerror or type(e).__name__
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            try:
                free = f"{shutil.disk_usage(self.target).free / 1e6:.1f} MB free now"
            except OSError:
                free = "free space unknown"
            return self.error("F402", f"disk full in publish path {self.target} while writing {path} ({free})",
                              key="path", fix="free space there (or publish to a larger disk) and run again: the "
                                              "publish resumes from its journal, copying only files that are "
                                              "missing or differ")
        return self.error("F510", f"cannot write publish path {path}: {reason}", key="path",
                          fix=f"make {self.target} writable for this user (a read-only mount, permissions), or "
                              f"publish to another path")

    # -- steps -----------------------------------------------------------------------

    @_findings
    def open(self):
        target = self.target.resolve()
        if self.workdir is not None:
            inside = Path(self.workdir).resolve()
            if target == inside or inside in target.parents:
                raise self.error("F501", f"publish path {target} is inside the workdir", key="path",
                                 fix="publish to a directory outside the workdir")
        if target.exists() and not target.is_dir():
            raise self.error("F501", f"publish path {target} is a file, not a directory", key="path",
                             fix="give a directory (new, empty, an earlier Fuse publish, or one whose files do not "
                                 "collide with the model's)")
        self.target = target
        with self._fs(target):
            target.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(target, os.O_RDONLY)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise self.error("F501", f"another Fuse run is publishing to {target}", key="path",
                             fix="wait for it to finish, then run again") from None
        except OSError:
            pass  # a file system without locks (some network mounts): publish unlocked, as before
        self.owned = self._recorded()

    def close(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def _recorded(self) -> set[str]:
        """The files Fuse recorded as its own here: the journal, else an earlier publish's
        provenance and SHA256SUMS (directories published before the journal existed)."""
        journal = self.target / JOURNAL
        if journal.exists() or journal.is_symlink():
            data = self._read_journal(journal)
            return {p for p in data["owned"] if safe_rel(p)}
        prov = self.target / PROVENANCE
        if not prov.is_file():
            return set()
        owned = {PROVENANCE, README, SUMS}
        with self._fs(prov):
            try:
                owned |= set((json.loads(prov.read_text(encoding="utf-8")) or {}).get("files") or {})
            except (ValueError, AttributeError, TypeError, RecursionError):
                pass  # not readable as JSON: SHA256SUMS alone says what else was ours
        sums = self.target / SUMS
        if sums.is_file():
            with self._fs(sums):
                owned |= set(parse_sums(sums.read_text(encoding="utf-8", errors="replace")))
        return {p for p in owned if safe_rel(p)}

    def _read_journal(self, journal: Path) -> dict:
        bad = None
        try:
            if journal.is_symlink() or not journal.is_file() or journal.stat().st_size > 64 << 20:
                raise ValueError("not a regular file of a sane size")
            data = json.loads(journal.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("fuse_publish") != JOURNAL_VERSION:
                raise ValueError(f"not a version-{JOURNAL_VERSION} Fuse publish journal")
            if not (isinstance(data.get("owned"), list) and all(isinstance(p, str) for p in data["owned"])
                    and isinstance(data.get("files"), dict)):
                raise ValueError("'owned' or 'files' is missing or of the wrong type")
            return data
        except OSError as e:
            raise self._os_error(e, journal) from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            bad = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise self.error("F501", f"{journal} cannot be read as Fuse's publish journal ({bad}): Fuse cannot tell "
                                 f"which files in {self.target} are its own", key="path",
                         fix=f"publish to a new directory, or move {self.target} aside (Fuse never guesses which "
                             f"files it may replace)")

    @_findings
    def claim(self, files):
        """The ownership rule, in one place: every path this publish writes must be free or Fuse's
        own, and no weight file of someone else's may lie where the model's weights go (``F509``
        otherwise, before anything is written); then the journal records the claim."""
        foreign = self._foreign([f.path for f in files], self.owned)
        if foreign:
            raise self._collision(foreign)
        wanted = {f.path: f for f in files}
        self._clean_temps(set(wanted) | self.owned | {JOURNAL})
        self._write_journal(files, sorted(set(wanted) | self.owned), complete=False)
        kill_point("dir:journal")

    def preflight(self, names) -> None:
        """The same rule before any stage runs (the runner calls this), for the paths known then
        (``names``: Fuse's own files, the model's files when its stage already ran). Reads only."""
        target = self.target.resolve()
        if not target.is_dir():
            return
        self.target = target
        with self._fs(target):
            foreign = self._foreign(list(names), self._recorded())
        if foreign:
            raise self._collision(foreign)

    def _foreign(self, names: list[str], owned: set[str]) -> list[str]:
        """What stands in the way: each of ``names`` that exists and is not ``owned`` (or that
        :meth:`_blocked` refuses), and each weight file at the top of the target that is not owned."""
        weights = {p.name for p in self.target.iterdir() if p.is_file() and any(p.match(g) for g in WEIGHT_FILES)} \
            if self.target.is_dir() else set()
        foreign = []
        for rel in dict.fromkeys([*names, *sorted(weights)]):  # in the model's order, then the rest
            problem = self._blocked(rel)
            if problem is None and rel not in owned and rel != JOURNAL:
                dest = self.target / rel
                if dest.exists() or dest.is_symlink():
                    problem = f"{rel} (not published by Fuse)"
            if problem:
                foreign.append(problem)
        return foreign

    def _collision(self, foreign: list[str]):
        names = [p.split(" (")[0] for p in foreign]
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        return self.error("F509", f"publish path {self.target} already holds {foreign[0]}{more}, where Fuse must "
                                  f"write the model; Fuse overwrites or removes only files it published there",
                          key="path", fix=f"move or rename {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                                          f", or publish to another path")

    def _blocked(self, rel: str) -> str | None:
        """Why Fuse may not write or remove ``rel`` here, whatever the records say (None: it may)."""
        if not safe_rel(rel):
            return f"{rel!r} (a path outside the directory)"
        here = self.target
        for part in PurePosixPath(rel).parts[:-1]:
            here = here / part
            if here.is_symlink():
                return f"{here.relative_to(self.target)} (a symlink where Fuse needs a folder)"
            if here.exists() and not here.is_dir():
                return f"{here.relative_to(self.target)} (a file where Fuse needs a folder)"
        dest = here / PurePosixPath(rel).name
        if dest.is_dir() and not dest.is_symlink():
            return f"{rel} (a folder)"
        return None

    def _clean_temps(self, names: set[str]):
        """Temp files an interrupted run left: only those named after a file Fuse owns or writes."""
        by_dir: dict[Path, set[str]] = {}
        for rel in names:
            if self._blocked(rel) is None:
                p = self.target / rel
                by_dir.setdefault(p.parent, set()).add(p.name)
        for folder, owned_names in by_dir.items():
            if not folder.is_dir():
                continue
            with self._fs(folder):
                for entry in os.scandir(folder):
                    m = TEMP.match(entry.name)
                    if m and m["name"] in owned_names and entry.is_file(follow_symlinks=False):
                        os.unlink(entry.path)
                        self.log(f"{self.describe()}: removed {Path(entry.path).relative_to(self.target)}, a temp "
                                 f"file of an interrupted publish")

    def _write_journal(self, files, owned: list[str], *, complete: bool):
        data = {"fuse_publish": JOURNAL_VERSION, "complete": complete,
                "files": {f.path: {"sha256": f.sha256, "size": f.size} for f in sorted(files, key=lambda f: f.path)},
                "owned": owned}
        text = (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()
        dest = self.target / JOURNAL
        if dest.is_file() and not dest.is_symlink() and dest.read_bytes() == text:
            return
        self._atomic_write(dest, lambda fh: fh.write(text))

    def _atomic_write(self, dest: Path, fill):
        """Write through a temp file, fsync, rename, fsync the folder: all or nothing, durable."""
        tmp = temp_name(dest)
        with self._fs(dest):
            try:
                with open(tmp, "xb") as fh:
                    fill(fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                kill_point(f"dir:renaming:{dest.name}")  # complete in its temp file, not in place
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
            fsync_path(dest.parent)

    @_findings
    def remote(self, files):
        """Hash only files whose size already matches (a different size is a different file)."""
        out = {}
        for f in files:
            p = self.target / f.path
            with self._fs(p):
                if p.is_file():
                    size = p.stat().st_size
                    out[f.path] = RemoteFile(size=size, sha256=sha256_file(p) if size == f.size else None)
        return out

    @_findings
    def previous(self, remote, files):
        """Files Fuse recorded as its own here that are still there (those no longer wanted go)."""
        return {rel for rel in self.owned if self._blocked(rel) is None and (self.target / rel).is_file()}

    @_findings
    def push(self, upload, delete, files):
        for f in upload:
            kill_point(f"dir:before:{f.path}")
            dest = self.target / f.path
            with self._fs(dest.parent):
                dest.parent.mkdir(parents=True, exist_ok=True)
            self._atomic_write(dest, lambda out, f=f: _copy(f.source, out))
            self.copied.append(f)
        for rel in delete:
            p = self.target / rel
            with self._fs(p):
                p.unlink(missing_ok=True)
                for parent in p.parents:  # folders left empty by the removal (a user's file keeps one)
                    if parent == self.target or self.target not in parent.parents:
                        break
                    try:
                        parent.rmdir()
                    except OSError:
                        break
        kill_point("dir:pushed")

    @_findings
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

    @_findings
    def seal(self, files):
        kill_point("dir:seal")
        self._write_journal(files, sorted(f.path for f in files), complete=True)
        return {}


def _copy(source: Path, out) -> None:
    with open(source, "rb") as src:
        first = True
        while chunk := src.read(CHUNK):
            out.write(chunk)
            if first:
                out.flush()
                kill_point("dir:mid-copy")  # a temp file holding part of the file
                first = False
