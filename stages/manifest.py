"""The run manifest: one JSON file per workdir, the single commit point of every stage.

It records what went in (digests, parameters, library versions), what came out (every
file's size and sha256) and how it went (status, metrics, errors), so that a run can
resume, hop machines, and be audited. Writes are atomic: temp file, fsync,
``os.replace``, fsync of the directory.

The skip rule (DESIGN §3) lives here: a stage is fresh when its fingerprint equals the
recorded one and its recorded outputs still verify. Verification is cheap by default
(size, mtime and inode against what was recorded, as DVC's state db does) and full
(re-hash) on request.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import stat
import sys
import uuid
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from .findings import FuseError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
STAT_CACHE = ".fuse-statcache.json"
# libraries whose versions can change a stage's output; recorded for every run
TRACKED_LIBS = ("torch", "transformers", "peft", "safetensors", "huggingface_hub", "accelerate", "gguf",
                "tokenizers", "numpy", "pyyaml")
CHUNK = 8 << 20


def tool_version() -> str:
    try:
        return metadata.version("fuse-llm")
    except metadata.PackageNotFoundError:
        from . import __version__
        return __version__


def library_versions(names=TRACKED_LIBS) -> dict:
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def ci_context() -> dict:
    """GitHub Actions context, when present: enough to find the run that produced the outputs."""
    keys = ("GITHUB_REPOSITORY", "GITHUB_SHA", "GITHUB_REF", "GITHUB_RUN_ID", "GITHUB_RUN_ATTEMPT",
            "GITHUB_WORKFLOW_REF", "RUNNER_OS", "RUNNER_NAME")
    ctx = {k.lower(): os.environ[k] for k in keys if os.environ.get(k)}
    return ctx


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def fingerprint(obj) -> str:
    return "sha256:" + hashlib.sha256(canonical(obj)).hexdigest()


# --------------------------------------------------------------------------- hashing


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def file_record(root: Path, rel: str, sha256: str | None = None) -> dict:
    """size + sha256 + the stat fields the cheap verify compares."""
    st = os.stat(root / rel)
    return {"path": rel, "size": st.st_size, "sha256": sha256 or sha256_file(root / rel),
            "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def list_files(root: Path) -> list[str]:
    """Every regular file under root, relative, sorted (deterministic order)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def tree_digest(files: list[dict]) -> str:
    """One digest for a set of files: sha256 over sorted (path, sha256) pairs."""
    return fingerprint(sorted((f["path"], f["sha256"]) for f in files))


class StatCache:
    """sha256 of input files keyed by (path, size, mtime_ns, inode): re-hashing a 140 GB
    base on every run is not acceptable, and a changed file changes its stat."""

    def __init__(self, path: Path | None):
        self.path = path  # None: in memory only
        self.entries: dict = {}
        self.dirty = False
        try:
            entries = json.loads(path.read_text(encoding="utf-8")) if path else {}
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):  # missing, a directory, not JSON
            entries = {}
        # a cache: an entry of the wrong shape (or a file that is not a mapping) is dropped, never trusted
        self.entries = {k: v for k, v in entries.items() if _cache_entry_ok(k, v)} \
            if isinstance(entries, dict) else {}

    def sha256(self, file: Path) -> str:
        st = os.stat(file)
        key = str(Path(file).resolve())
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = self.entries.get(key)
        if hit and hit[:3] == stamp:
            return hit[3]
        digest = sha256_file(file)
        self.entries[key] = stamp + [digest]
        self.dirty = True
        return digest

    def tree(self, root: Path) -> tuple[str, list[dict]]:
        """Digest of a file or directory, and its per-file records (path, size, sha256)."""
        root = Path(root)
        if root.is_file():
            files = [{"path": root.name, "size": root.stat().st_size, "sha256": self.sha256(root)}]
        else:
            files = [{"path": rel, "size": (root / rel).stat().st_size, "sha256": self.sha256(root / rel)}
                     for rel in list_files(root)]
        return tree_digest(files), files

    def save(self):
        if self.dirty and self.path:
            atomic_write(self.path, canonical(self.entries))
            self.dirty = False


def _cache_entry_ok(key, value) -> bool:
    """[size, mtime_ns, inode, sha256 hex]: what :meth:`StatCache.sha256` writes."""
    return (isinstance(key, str) and isinstance(value, list) and len(value) == 4
            and all(type(v) is int for v in value[:3]) and isinstance(value[3], str)
            and _HEX64.fullmatch(value[3]) is not None)


# --------------------------------------------------------------------------- atomic writes


_crash_hits: dict = {}


def crash_point(name: str) -> None:
    """Test hook: ``FUSE_TEST_KILL_AT=NAME`` (or ``NAME@N``, the N-th time) ends the process here at
    once, as ``kill -9`` would (no cleanup, no finally). The one hook of the package: stage boundaries,
    manifest writes, publishers (as ``kill_point``); tests/test_kill.py names the points.
    One environment lookup when the variable is unset."""
    want = os.environ.get("FUSE_TEST_KILL_AT")
    if not want:
        return
    point, _, nth = want.partition("@")
    if point == name:
        _crash_hits[name] = _crash_hits.get(name, 0) + 1
        if _crash_hits[name] == int(nth or 1):
            os._exit(137)


def fsync_path(path: Path):
    """fsync a file or a directory (a directory's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes):
    """temp file in the same directory, fsync, rename over, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        crash_point("atomic-write:" + path.name)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


# --------------------------------------------------------------------------- the manifest


class Manifest:
    """The manifest of one workdir. ``data['stages'][id]`` is one stage's record."""

    def __init__(self, workdir: Path, data: dict | None = None, secrets=()):
        self.workdir = Path(workdir)
        self.path = self.workdir / MANIFEST
        self.secrets = {s for s in secrets if s}
        self.data = data or {"schema_version": SCHEMA_VERSION, "stages": {}}
        self.dirty = False

    @classmethod
    def load(cls, workdir: Path, secrets=()) -> "Manifest":
        """The workdir's manifest (an empty one when there is none). Anything that is not a manifest
        of this schema, down to the field types the readers rely on, is F404: never a traceback."""
        path = Path(workdir) / MANIFEST

        def unreadable(why: str):
            return FuseError("F404", f"{MANIFEST} {why}", file=path,
                             fix=f"move the workdir aside (mv {workdir} {workdir}.old) and run again, or restore "
                                 "the manifest from the run's artifact")
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(workdir, secrets=secrets)
        except IsADirectoryError:
            raise unreadable("is a directory, not a file") from None
        except UnicodeDecodeError:
            raise unreadable("is not UTF-8 text") from None
        except OSError as e:
            raise unreadable(f"cannot be read: {e.strerror}") from None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise unreadable(f"is not valid JSON ({str(e)[:200]})") from None
        try:
            check_schema(data)
        except SchemaError as e:
            raise unreadable(f"is not a Fuse manifest of schema {SCHEMA_VERSION}: {e}") from None
        return cls(workdir, data, secrets)

    @property
    def stages(self) -> dict:
        return self.data["stages"]

    def record(self, stage_id: str) -> dict | None:
        return self.stages.get(stage_id)

    def begin_run(self, pipeline) -> None:
        """Top-level facts of this invocation. A resumed run keeps a pointer to the previous run id."""
        previous = self.data.get("run_id")
        self.data.update({
            "schema_version": SCHEMA_VERSION,
            "run_id": uuid.uuid4().hex,
            "previous_run_id": previous,
            "started_at": now(),
            "tool": {"name": "fuse-llm", "version": tool_version()},
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "libraries": library_versions(),
            "ci": ci_context(),
            "pipeline": {"path": str(pipeline.path), "sha256": pipeline.sha256, "resolved": pipeline.recorded},
        })

    def save(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        data = redact_data(self.data, self.secrets)  # on the values, so the JSON stays valid
        text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, default=str)
        atomic_write(self.path, text.encode("utf-8"))
        self.dirty = False

    # -- verification -------------------------------------------------------------------

    def verify_outputs(self, stage_id: str, full: bool = False) -> list[str]:
        """Problems with the recorded outputs of one stage (empty list: they verify).

        Cheap mode re-hashes only files whose size, mtime or inode moved (e.g. a workdir
        copied from another runner); a file that still hashes right gets its new stat
        recorded, so the next check is cheap again.
        """
        problems = []
        for root, files in self.recorded_files(stage_id):
            if root == self.workdir / (self.record(stage_id) or {}).get("output_dir", stage_id):
                problems += [f"{root / rel}: extra file, not in the manifest" for rel in self.extra_files(stage_id)]
            for f in files:
                p = root / f["path"]
                try:
                    st = os.stat(p)
                    if not stat.S_ISREG(st.st_mode):
                        problems.append(f"{p}: not a regular file")
                    elif st.st_size != f["size"]:
                        problems.append(f"{p}: size {st.st_size} bytes, the manifest says {f['size']}")
                    elif full or st.st_mtime_ns != f.get("mtime_ns") or st.st_ino != f.get("inode"):
                        if sha256_file(p) != f["sha256"]:
                            problems.append(f"{p}: sha256 differs from the manifest")
                        elif (f.get("mtime_ns"), f.get("inode")) != (st.st_mtime_ns, st.st_ino):
                            f["mtime_ns"], f["inode"] = st.st_mtime_ns, st.st_ino
                            self.dirty = True
                except (FileNotFoundError, NotADirectoryError):
                    problems.append(f"{p}: missing")
                except OSError as e:  # unreadable: it does not verify, and the message says why
                    problems.append(f"{p}: cannot be read ({e.strerror})")
        return problems

    def extra_files(self, stage_id: str) -> list[str]:
        """Files in a done stage's output directory that its record does not list (someone added them).
        The output directory is Fuse's; a file added to it is not, and makes the output not verify."""
        rec = self.record(stage_id) or {}
        root = self.workdir / rec.get("output_dir", stage_id)
        if rec.get("status") != "done" or not root.is_dir():
            return []
        recorded = {f["path"] for f in rec.get("outputs", [])}
        return [rel for rel in list_files(root) if rel not in recorded]

    # -- ownership: the one place that says which workdir entries are Fuse's ----------

    def owns_output(self, stage_id: str) -> bool:
        """``<workdir>/<id>/`` is Fuse's when a record says it wrote (or is writing) it there.
        A record without ``output_dir`` was written by Fuse before 0.2, which recorded the output
        directory only when a stage finished, so a later running or failed record lost it while
        the directory stayed: that directory is Fuse's too."""
        rec = self.record(stage_id)
        if not rec:
            return False
        return rec.get("output_dir", stage_id) == stage_id

    def leftovers(self) -> list[Path]:
        """What killed runs left in the workdir and only Fuse may remove: the temp and trash entries
        a ``running`` record names (plus the legacy temp dirs of a pre-0.2 ``running`` record), and
        atomic-write temp files of the manifest and stat cache (exact name pattern, regular files)."""
        out = []
        names = set(os.listdir(self.workdir)) if self.workdir.is_dir() else set()
        for sid, rec in self.stages.items():
            if "temp" in rec:  # a running (killed) or failed record, or a done one whose trash stayed
                out += [self.workdir / n for n in sorted(names)
                        if n in rec["temp"] or any(n.startswith(t + "-scratch-") for t in rec["temp"])]
            elif rec.get("status") == "running":  # before 0.2: .tmp-<stage>-<id>-<8 hex>, export's scratch dirs
                legacy = re.compile(re.escape(f".tmp-{rec.get('stage')}-{sid}-") + r"([0-9a-f]{8}|scratch-\w+)")
                out += [self.workdir / n for n in sorted(names) if legacy.fullmatch(n)]
        for n in sorted(names):
            if _WRITE_TMP.fullmatch(n) and (self.workdir / n).is_file() and not (self.workdir / n).is_symlink():
                out.append(self.workdir / n)
        return out

    def recorded_files(self, stage_id: str) -> list[tuple[Path, list[dict]]]:
        """(root, file records) of a stage: its output dir, and any external target (publish to dir)."""
        rec = self.record(stage_id) or {}
        out = [(self.workdir / rec.get("output_dir", stage_id), rec.get("outputs", []))]
        ext = rec.get("external")
        if ext:
            out.append((Path(ext["root"]), ext.get("files", [])))
        return out


# --------------------------------------------------------------------------- schema

_HEX64 = re.compile(r"[0-9a-f]{64}")
_ENTRY = re.compile(r"[A-Za-z0-9][\w.-]{0,127}")  # a plain workdir entry: no '/', not '.' or '..'
_TEMP = re.compile(r"\.(tmp|trash)-[\w.-]{1,200}")
_WRITE_TMP = re.compile(r"\.(" + re.escape(MANIFEST) + "|" + re.escape(STAT_CACHE) + r")\.[0-9a-f]{8}\.tmp")
STATUSES = ("running", "done", "failed")


class SchemaError(ValueError):
    """Where a manifest departs from the schema, e.g. ``stages.merge.outputs[2].size: not an integer``."""


def _need(ok: bool, where: str, what: str):
    if not ok:
        raise SchemaError(f"{where}: {what}" if where else what)


def _typed(d: dict, where: str, key: str, types, what: str, required=False):
    """``d[key]`` when it has one of ``types`` (a bool is not a number), None when absent."""
    if key not in d:
        _need(not required, where, f"'{key}' is missing")
        return None
    v = d[key]
    types = types if isinstance(types, tuple) else (types,)
    ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
    _need(ok, f"{where}.{key}" if where else key, f"{what}, not {type(v).__name__} {_short(v)}")
    return v


def _short(v) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _file_records(files, where: str):
    _need(isinstance(files, list), where, "not a list")
    for i, f in enumerate(files):
        w = f"{where}[{i}]"
        _need(isinstance(f, dict), w, "not an object")
        path = _typed(f, w, "path", str, "a relative path", required=True)
        parts = path.split("/")
        _need(not path.startswith("/") and all(p not in ("", ".", "..") for p in parts) and "\0" not in path,
              f"{w}.path", f"{_short(path)} is not a plain relative path")
        size = _typed(f, w, "size", int, "a size in bytes", required=True)
        _need(size >= 0, f"{w}.size", "negative")
        sha = _typed(f, w, "sha256", str, "a sha256", required=True)
        _need(_HEX64.fullmatch(sha) is not None, f"{w}.sha256", "not 64 lowercase hex digits")
        _typed(f, w, "mtime_ns", int, "an integer")
        _typed(f, w, "inode", int, "an integer")


def check_schema(data) -> None:
    """Raise :class:`SchemaError` unless ``data`` has the shape every reader of the manifest relies on
    (runner, ``status``, ``show``, ``verify``, ``summary``): types of the fields they read, output
    paths that stay inside their roots, names of workdir entries without a '/'."""
    _need(isinstance(data, dict), "", f"the file holds a JSON {type(data).__name__}, not an object")
    v = data.get("schema_version")
    if isinstance(v, str) and v.strip().isdigit():
        raise SchemaError(f"schema_version is the string {_short(v)}, not the number {int(v)}")
    _need("schema_version" in data, "", "'schema_version' is missing")
    _need(type(v) is int, "schema_version", f"not an integer: {_short(v)}")
    _need(v == SCHEMA_VERSION, "", f"schema_version {v} is from "
          f"{'a newer' if v > SCHEMA_VERSION else 'an older'} Fuse; this one reads {SCHEMA_VERSION}")
    for key in ("run_id", "previous_run_id", "started_at", "python", "platform"):
        _typed(data, "", key, (str, type(None)), "text")
    for key in ("tool", "libraries", "ci", "pipeline"):
        _typed(data, "", key, dict, "an object")
    for key in ("libraries", "ci"):
        for k, val in data.get(key, {}).items():
            _need(isinstance(val, str), f"{key}.{k}", "not text")
    for key in ("name", "version"):
        _typed(data.get("tool", {}), "tool", key, str, "text")
    pipe = data.get("pipeline", {})
    for key in ("path", "sha256"):
        _typed(pipe, "pipeline", key, str, "text")
    resolved = _typed(pipe, "pipeline", "resolved", dict, "an object") or {}
    for i, item in enumerate(_typed(resolved, "pipeline.resolved", "stages", list, "a list") or []):
        _need(isinstance(item, dict), f"pipeline.resolved.stages[{i}]", "not an object")
        _typed(item, f"pipeline.resolved.stages[{i}]", "id", str, "a stage id")
    stages = _typed(data, "", "stages", dict, "an object of stage records", required=True)
    for sid, rec in stages.items():
        w = f"stages.{sid}"
        _need(isinstance(rec, dict), w, "not an object")
        _typed(rec, w, "stage", str, "a stage name")
        status = _typed(rec, w, "status", str, "a status", required=True)
        _need(status in STATUSES, f"{w}.status", f"{_short(status)} is not one of {', '.join(STATUSES)}")
        for key in ("started_at", "finished_at", "fingerprint", "output_digest"):
            _typed(rec, w, key, (str, type(None)), "text")
        _typed(rec, w, "seconds", (int, float, type(None)), "a number")
        for key in ("params", "metrics", "fingerprint_inputs", "sources", "error"):
            _typed(rec, w, key, dict, "an object")
        if "error" in rec:
            _typed(rec["error"], f"{w}.error", "message", str, "text")
            _typed(rec["error"], f"{w}.error", "code", str, "text")
        for i, warning in enumerate(_typed(rec, w, "warnings", list, "a list") or []):
            _need(isinstance(warning, dict), f"{w}.warnings[{i}]", "not an object")
        out_dir = _typed(rec, w, "output_dir", str, "a directory name")
        _need(out_dir is None or _ENTRY.fullmatch(out_dir) is not None, f"{w}.output_dir",
              f"{_short(out_dir)} is not a plain directory name in the workdir")
        for i, n in enumerate(_typed(rec, w, "temp", list, "a list of names") or []):
            _need(isinstance(n, str) and _TEMP.fullmatch(n) is not None, f"{w}.temp[{i}]",
                  f"{_short(n)} is not a Fuse temp name (.tmp-* or .trash-*)")
        if "outputs" in rec:
            _need(out_dir is not None, w, "has outputs but no output_dir")
            _file_records(rec["outputs"], f"{w}.outputs")
        ext = _typed(rec, w, "external", dict, "an object")
        if ext is not None:
            root = _typed(ext, f"{w}.external", "root", str, "a directory", required=True)
            _need(os.path.isabs(root), f"{w}.external.root", "not an absolute path")
            _need("files" in ext, f"{w}.external", "'files' is missing")
            _file_records(ext["files"], f"{w}.external.files")
        _check_fingerprint_inputs(rec.get("fingerprint_inputs", {}), f"{w}.fingerprint_inputs")
        src = rec.get("sources", {})
        _typed(src, f"{w}.sources", "base", dict, "an object")
        for i, a in enumerate(_typed(src, f"{w}.sources", "adapters", list, "a list") or []):
            _need(isinstance(a, str), f"{w}.sources.adapters[{i}]", "not text")


def _check_fingerprint_inputs(fi: dict, w: str):
    for key in ("params", "inputs", "libraries"):
        _typed(fi, w, key, dict, "an object")
    inputs = fi.get("inputs", {})
    _typed(inputs, f"{w}.inputs", "stage_params", dict, "an object")
    base = _typed(inputs, f"{w}.inputs", "base", dict, "an object")
    if base is not None:
        _typed(base, f"{w}.inputs.base", "digest", str, "text")
        for key in ("kind", "revision"):
            _typed(base, f"{w}.inputs.base", key, (str, type(None)), "text")
    for i, a in enumerate(_typed(inputs, f"{w}.inputs", "adapters", list, "a list") or []):
        aw = f"{w}.inputs.adapters[{i}]"
        _need(isinstance(a, dict), aw, "not an object")
        _typed(a, aw, "digest", str, "text", required=True)
        _typed(a, aw, "weight", (int, float), "a number", required=True)
    up = _typed(inputs, f"{w}.inputs", "upstream", (dict, type(None)), "an object")
    if up:
        _typed(up, f"{w}.inputs.upstream", "id", str, "a stage id", required=True)
        _typed(up, f"{w}.inputs.upstream", "digest", (str, type(None)), "text", required=True)


# one redaction rule for every exit (stages/secrets.py); the names stay importable from here
from .secrets import MIN_SECRET_LEN, redact, redact_data  # noqa: E402,F401


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
