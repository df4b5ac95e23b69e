"""Walk a pipeline's stages: skip fresh ones, run stale ones, record everything.

The runner owns the workdir: one run at a time (a lock), temp output directories that
are renamed into place only when complete, the manifest writes, and the skip rule.
Stage modules only compute.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import manifest as mf
from .findings import Finding, FuseError
from .pipeline import Pipeline, StageSpec, secret_env_values, upstream_of
from .progress import Progress


@dataclass
class StageContext:
    """What a stage's ``run(ctx)`` gets. Everything it writes goes under ``output_dir``."""

    stage: StageSpec
    pipeline: Pipeline
    params: dict
    output_dir: Path
    workdir: Path
    manifest: mf.Manifest
    log: Callable[[str], None]
    input_dir: Path | None = None  # the upstream stage's output (for stages with an INPUT)
    input_stage: str | None = None
    hashes: dict = field(default_factory=dict)  # relpath -> sha256 the stage already computed
    warnings: list = field(default_factory=list)
    external: dict | None = None  # {"root": path, "files": [...]}: outputs written outside the workdir
    _base: object = None
    _resolve_base: Callable | None = None

    @property
    def base(self):
        """The resolved base (:class:`stages.sources.BaseRef`), resolved on first use."""
        if self._base is None:
            self._base = self._resolve_base()
        return self._base

    @property
    def adapters(self) -> list[tuple[Path, float]]:
        return [(a.path, a.weight) for a in self.pipeline.adapters]

    def progress(self, desc: str, total: int) -> Progress:
        return Progress(desc, total, log=self.log)

    def warn(self, code: str, message: str, **kw):
        f = Finding(code=code, message=message, severity="warning", **kw)
        self.warnings.append(f.to_dict())
        self.log(f.line_text())


@dataclass
class Evaluation:
    fresh: bool
    why: str


class Runner:
    def __init__(self, pipeline: Pipeline, *, force: bool = False, log: Callable[[str], None] | None = None,
                 full_verify: bool = False):
        self.p = pipeline
        self.secrets = set(pipeline.secrets) | secret_env_values()
        self.workdir = pipeline.workdir
        self.force = force
        self.full_verify = full_verify
        self._log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.cache: mf.StatCache | None = None
        self.manifest: mf.Manifest | None = None
        self._base = None
        self._input_digests = None
        self._lock_fd = None

    # -- logging: every line passes the redactor ---------------------------------------

    def log(self, msg: str):
        self._log(mf.redact(str(msg), self.secrets))

    # -- workdir lock and housekeeping --------------------------------------------------

    def lock(self):
        if self.workdir.exists() and not self.workdir.is_dir():
            raise FuseError("F409", f"workdir {self.workdir} is a file, not a directory", file=self.workdir,
                            fix="point workdir: at a directory (Fuse creates it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.workdir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        for _ in range(10):  # `status` probes the lock with a shared lock for an instant: not a run
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.05)
        else:
            os.close(fd)
            holder = ""
            try:
                holder = (self.workdir / ".lock").read_text().strip()
            except OSError:
                pass
            raise FuseError("F401", f"another Fuse run{' (' + holder + ')' if holder else ''} holds this workdir",
                            file=self.workdir, fix="wait for it to finish, or use another workdir") from None
        held = os.pread(fd, 256, 0)
        if held and not re.fullmatch(rb"pid \d+ on [^\n]*", held):  # Fuse writes nothing else there
            os.close(fd)
            raise FuseError("F408", f"{self.workdir / '.lock'} was not written by Fuse, and Fuse keeps its lock "
                                    "there", file=self.workdir / ".lock",
                            fix="move it out of the workdir, or point workdir: at another directory")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())
        self._lock_fd = fd

    def unlock(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def clean_temp(self):
        """Remove what a killed run left, and only that: the temp and trash entries the manifest
        names (:meth:`Manifest.leftovers`), and GGUF conversion temp dirs in ``.bases/``. A user's
        ``.tmp-*`` entry is never touched."""
        doomed = self.manifest.leftovers()
        bases = self.workdir / ".bases"
        if bases.is_dir() and not bases.is_symlink():
            doomed += [p for p in bases.iterdir() if _GGUF_TMP.fullmatch(p.name)]
        for p in doomed:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

    def check_workdir(self, selected: list[StageSpec]) -> None:
        """Before any stage runs: every entry a selected stage will replace is Fuse's (F408 otherwise).
        A user's ``<workdir>/<id>/`` (or a file someone added to Fuse's output there, or a log file
        Fuse did not write) would be deleted by the run: name it instead."""
        fix = "move it out of the workdir (Fuse replaces a stage's output directory as a whole), or point " \
              "workdir: at another directory"
        for s in selected:
            final = self.workdir / s.id
            if final.exists() or final.is_symlink():
                if not self.manifest.owns_output(s.id):
                    raise FuseError("F408", f"{final} was not written by Fuse, and stage '{s.id}' writes its "
                                            "output there", file=final, fix=fix)
                if final.is_symlink() or not final.is_dir():
                    raise FuseError("F408", f"{final} is not the directory Fuse wrote (a link or a file took "
                                            "its place)", file=final, fix=fix)
                extra = self.manifest.extra_files(s.id)
                if extra:
                    raise FuseError("F408", f"{final / extra[0]} was not written by Fuse (stage '{s.id}' "
                                            f"records {len(self.manifest.record(s.id).get('outputs', []))} "
                                            "files, not this one)" + (f" nor {len(extra) - 1} more" if
                                                                       len(extra) > 1 else ""),
                                    file=final / extra[0], fix=fix)
            log_file = self.workdir / "logs" / f"{s.id}.log"
            if s.name in LOG_WRITERS and (log_file.exists() or log_file.is_symlink()) \
                    and self.manifest.record(s.id) is None:
                raise FuseError("F408", f"{log_file} was not written by Fuse, and stage '{s.id}' writes its "
                                        "log there", file=log_file, fix="move it out of the workdir")

    def open(self):
        self.cache = mf.StatCache(self.workdir / mf.STAT_CACHE)
        self.manifest = mf.Manifest.load(self.workdir, secrets=self.secrets)

    # -- inputs and fingerprints --------------------------------------------------------

    def base(self):
        if self._base is None:
            from .sources import resolve_base

            self._base = resolve_base(self.p.base, self.workdir, self.cache, log=self.log)
        return self._base

    def input_digests(self) -> dict:
        """Digests of the base and adapters (hashed once per file thanks to the stat cache).

        Content only, no local paths: a workdir copied to another machine, where the
        checkout lives elsewhere, still finds its stages fresh. Every safetensors header is
        checked first, so a malformed or absurd file (a 1 TiB sparse adapter) is refused in
        milliseconds instead of after hashing it.
        """
        if self._input_digests is None:
            adapters = []
            self._check_headers()
            try:
                for a in self.p.adapters:
                    digest, _ = self.cache.tree(a.path)
                    adapters.append({"digest": digest, "weight": a.weight})
                base = {k: v for k, v in self.base().describe().items() if k != "name"}
            except OSError as e:  # a dangling link, a link loop, an unreadable file
                raise FuseError("F205", f"cannot read input file {e.filename}: {e.strerror}", file=e.filename,
                                fix="fix or remove that file (a broken symlink?) in the base or adapter directory"
                                ) from None
            self._input_digests = {"base": base, "adapters": adapters}
        return self._input_digests

    def _check_headers(self) -> None:
        from .io.safetensors import read_header

        roots = [a.path for a in self.p.adapters]
        if self.p.base_is_local():
            roots.append(Path(self.p.base))
        for root in roots:
            try:
                files = [root] if root.is_file() else sorted(root.rglob("*.safetensors"))
            except OSError:
                continue  # input_digests names the unreadable file
            for f in files:
                if f.suffix == ".safetensors" and f.is_file():
                    read_header(f)

    def input_sources(self) -> dict:
        """Where the inputs were read from, for the audit trail (not fingerprinted)."""
        return {"base": self.base().describe(), "adapters": [str(a.path) for a in self.p.adapters]}

    def fingerprint_inputs(self, s: StageSpec) -> dict:
        mod = s.module
        inputs: dict = {}
        up = upstream_of(s, self.p.stages)
        if mod.INPUT:
            rec = self.manifest.record(up.id) if up else None
            inputs["upstream"] = {"id": up.id, "digest": (rec or {}).get("output_digest")} if up else None
        else:
            inputs.update(self.input_digests())
        extra = getattr(mod, "input_files", None)  # files a parameter names, e.g. a card template
        if extra:
            inputs["files"] = [self.cache.tree(Path(f))[0] for f in extra(s.params)]
        other = getattr(mod, "READS_PARAMS_OF", {})  # another stage's parameters this one acts on
        for name, keys in other.items():
            target = next((t for t in self.p.stages if t.name == name), None)
            if target is not None:
                inputs.setdefault("stage_params", {}).update({f"{target.id}.{k}": target.params.get(k) for k in keys})
        return {
            "stage": s.name,
            "version": mod.VERSION,
            "params": s.params,
            "inputs": inputs,
            "libraries": mf.library_versions(getattr(mod, "LIBS", ())),
        }

    def evaluate(self, s: StageSpec) -> Evaluation:
        rec = self.manifest.record(s.id)
        if not rec:
            return Evaluation(False, "never ran")
        status = rec.get("status")
        if status == "running":
            return Evaluation(False, "interrupted in an earlier run (killed, or the machine stopped)")
        if status != "done":
            return Evaluation(False, f"{status} last time")
        fp_inputs = self.fingerprint_inputs(s)
        if mf.fingerprint(fp_inputs) != rec.get("fingerprint"):
            return Evaluation(False, _why_changed(rec.get("fingerprint_inputs", {}), fp_inputs))
        problems = self.manifest.verify_outputs(s.id, full=self.full_verify)
        if problems:
            return Evaluation(False, "outputs changed: " + problems[0])
        return Evaluation(True, "fingerprint and outputs match")

    # -- running ------------------------------------------------------------------------

    def select(self, from_id: str | None, only: str | None, until: str | None = None) -> list[StageSpec]:
        """The stages to run: all, ``--only ID``, or ``--from ID`` and/or ``--until ID`` (both included),
        so that one pipeline splits across machines (``--until merge`` on CPU, ``--from quantize`` on GPU)."""
        ids = [s.id for s in self.p.stages]
        for name, value in (("--from", from_id), ("--only", only), ("--until", until)):
            if value is not None and value not in ids:
                raise FuseError("F108", f"{name} {value}: no stage has that id", file=self.p.path,
                                fix="stage ids in this pipeline: " + ", ".join(ids))
        if only and (from_id or until):
            raise FuseError("F108", "--only runs one stage; it does not combine with --from or --until",
                            file=self.p.path, fix="use --only ID alone, or --from/--until")
        if only:
            return [self.p.stage(only)]
        start = ids.index(from_id) if from_id else 0
        stop = ids.index(until) + 1 if until else len(ids)
        if stop <= start:
            raise FuseError("F108", f"--until {until} comes before --from {from_id} in the pipeline",
                            file=self.p.path, fix="stage order: " + ", ".join(ids))
        return self.p.stages[start:stop]

    def run(self, from_id: str | None = None, only: str | None = None, until: str | None = None) -> dict:
        selected = self.select(from_id, only, until)
        from .paths import check_run_paths

        check_run_paths(self.p)  # before the workdir is even created
        try:
            return self._run(selected)
        except OSError as e:  # the runner's own I/O: the lock, the manifest, temp dirs, the rename
            raise io_error(e, self.workdir) from None

    def _run(self, selected: list[StageSpec]) -> dict:
        self.lock()
        try:
            self.open()
            self.clean_temp()
            self.check_workdir(selected)
            self._check_requirements(selected)
            self._check_publish_dirs(selected)
            started = False
            summary = {}
            for s in selected:
                self._check_upstream_done(s, selected)
                ev = self.evaluate(s)
                if ev.fresh and not self.force:
                    self.log(f"[{s.id}] fresh, skipped ({ev.why})")
                    summary[s.id] = "skipped"
                    continue
                if not started:
                    self.manifest.begin_run(self.p)
                    started = True
                self.log(f"[{s.id}] running: {'forced' if self.force and ev.fresh else ev.why}")
                self._run_stage(s)
                summary[s.id] = "done"
            if self.manifest.dirty:
                self.manifest.save()
            self.cache.save()
            return summary
        finally:
            self.unlock()

    def _check_requirements(self, selected: list[StageSpec]) -> None:
        """Before any stage runs: every stage that will run has its optional packages (quantize needs
        gptqmodel, export onnxruntime...), so a missing extra is not found after an hour of merging.
        Stages that are fresh now, before the first one that will run, are skipped and need nothing."""
        missing = {s.id: [(m, extra) for m, extra in getattr(s.module, "requires", lambda p: {})(s.params).items()
                          if not _installed(m)] for s in selected}
        if not any(missing.values()):
            return
        first_to_run = next((i for i, s in enumerate(selected) if self.force or not self.evaluate(s).fresh), None)
        if first_to_run is None:
            return
        need = {s.id: missing[s.id] for s in selected[first_to_run:] if missing[s.id]}
        if not need:
            return
        stage = self.p.stage(next(iter(need)))
        from .extras import install_fix

        mods = sorted({f"{m} (extra '{extra}')" for ms in need.values() for m, extra in ms})
        by_extra: dict = {}
        for m, extra in (pair for ms in need.values() for pair in ms):
            by_extra.setdefault(extra, []).append(m)
        raise FuseError("F602", f"stage{'s' if len(need) > 1 else ''} {', '.join(need)} need"
                        f"{'' if len(need) > 1 else 's'} packages that are not installed: {', '.join(mods)}",
                        file=self.p.path, line=stage.line, key=stage.id,
                        fix=f"{install_fix(by_extra)} (or run the stages before it here and the rest "
                            "where they are installed: --until / --from)")

    def _check_publish_dirs(self, selected: list[StageSpec]) -> None:
        """Before any stage runs: a ``to: dir`` publish that will run finds no file of someone else's
        where it must write (F509), for the names known now: Fuse's own files, and the model's files
        when the stage it publishes already ran. The publish checks the exact list again when it starts."""
        from .card import PROVENANCE, SUMS
        from .publishers.dir import README, Publisher

        for s in selected:
            if s.name != "publish" or s.params.get("to") != "dir" or not s.params.get("path"):
                continue
            if not self.force and self.evaluate(s).fresh:
                continue
            names = [README, PROVENANCE, SUMS]
            up = upstream_of(s, self.p.stages)
            rec = self.manifest.record(up.id) if up else None
            if rec and rec.get("status") == "done":
                names = [f["path"] for f in rec.get("outputs", []) if isinstance(f.get("path"), str)] + names
            Publisher(s.params, log=self.log, stage_id=s.id, file=self.p.path, line=s.line).preflight(names)

    def _check_upstream_done(self, s: StageSpec, selected: list[StageSpec]):
        up = upstream_of(s, self.p.stages) if s.module.INPUT else None
        if up is None or up in selected:
            return
        rec = self.manifest.record(up.id)
        if not rec or rec.get("status") != "done":
            raise FuseError("F405", f"stage '{s.id}' reads the output of '{up.id}', which has not run here",
                            file=self.workdir, fix=f"run without --from/--only, or bring the workdir with "
                                                   f"'{up.id}' done from the machine that ran it")
        problems = self.manifest.verify_outputs(up.id, full=self.full_verify)
        if problems:
            raise FuseError("F403", f"output of '{up.id}' does not match the manifest: {problems[0]}",
                            file=self.workdir, fix=f"run '{up.id}' again (drop --from/--only)")

    def _run_stage(self, s: StageSpec):
        mod = s.module
        fp_inputs = self.fingerprint_inputs(s)
        started = time.time()
        self.manifest.stages[s.id] = {
            "stage": s.name, "status": "running", "started_at": mf.now(), "params": s.recorded,
            "fingerprint": mf.fingerprint(fp_inputs), "fingerprint_inputs": _recordable(fp_inputs, s),
            "version": mod.VERSION,
        }
        if not mod.INPUT:
            self.manifest.stages[s.id]["sources"] = self.input_sources()
        # recorded before they exist, so that a killed run's leftovers are known to be Fuse's
        token = uuid.uuid4().hex[:8]
        tmp, trash = self.workdir / f".tmp-{s.name}-{s.id}-{token}", self.workdir / f".trash-{s.id}-{token}"
        self.manifest.stages[s.id].update(output_dir=s.id, temp=[tmp.name, trash.name])
        self.manifest.save()
        mf.crash_point("stage-start:" + s.id)
        up = upstream_of(s, self.p.stages) if mod.INPUT else None
        ctx = StageContext(stage=s, pipeline=self.p, params=dict(s.params), output_dir=tmp,
                           workdir=self.workdir, manifest=self.manifest, log=self.log,
                           input_dir=(self.workdir / up.id) if up else None, input_stage=up.id if up else None,
                           _resolve_base=self.base)
        made = False
        try:
            tmp.mkdir()
            made = True  # from here the temp dir is ours to remove
            self._check_space(s, ctx)
            metrics = mod.run(ctx) or {}
            files = [mf.file_record(tmp, rel, ctx.hashes.get(rel)) for rel in mf.list_files(tmp)]
            for rel in mf.list_files(tmp):
                mf.fsync_path(tmp / rel)
            mf.fsync_path(tmp)
            mf.crash_point("stage-output:" + s.id)
            self._swap_into_place(tmp, self.workdir / s.id, trash)
        except BaseException as e:  # record the failure, leave nothing half-written
            if made:
                shutil.rmtree(tmp, ignore_errors=True)
            finding = _finding_for(e, s, tmp, self.workdir)
            rec = self.manifest.stages[s.id]
            rec.update(status="failed", finished_at=mf.now(), seconds=round(time.time() - started, 3),
                       error=finding.to_dict())
            if not trash.exists():
                rec.pop("temp", None)
            try:
                self.manifest.save()
            except OSError:  # the disk that failed the stage may refuse the record too: the finding matters more
                pass
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise FuseError(**_as_kwargs(finding)) from (None if isinstance(e, FuseError) else e)
        # paths in the manifest are relative to the new location; stat again after the rename
        files = [dict(f, **_stat(self.workdir / s.id / f["path"])) for f in files]
        rec = self.manifest.stages[s.id]
        rec.update(status="done", finished_at=mf.now(), seconds=round(time.time() - started, 3),
                   output_dir=s.id, outputs=files, output_digest=mf.tree_digest(files),
                   metrics=metrics, warnings=ctx.warnings)
        if ctx.external:
            rec["external"] = ctx.external
        rec.pop("error", None)
        if not trash.exists():
            rec.pop("temp", None)
        self.manifest.save()
        mf.crash_point("stage-done:" + s.id)
        self.log(f"[{s.id}] done in {rec['seconds']:.1f}s"
                 + (f": {_short_metrics(metrics)}" if metrics else ""))

    def _swap_into_place(self, tmp: Path, final: Path, trash: Path):
        """Rename the finished output into place; the old one (Fuse's: :meth:`check_workdir` made sure)
        goes to the trash name the manifest recorded first, and is removed after the rename."""
        old = final.exists() or final.is_symlink()
        if old:
            os.replace(final, trash)
            mf.crash_point("swap:" + final.name)
        os.replace(tmp, final)
        mf.fsync_path(self.workdir)
        if old:
            shutil.rmtree(trash, ignore_errors=True)  # what stays is named in the record: the next run retries

    def _check_space(self, s: StageSpec, ctx: StageContext):
        estimate = getattr(s.module, "estimate_bytes", None)
        if estimate is None:
            return
        need = int(estimate(ctx))
        free = shutil.disk_usage(self.workdir).free
        if need > free:
            raise FuseError("F402", f"stage '{s.id}' needs about {_gb(need)} in {self.workdir}, "
                                    f"only {_gb(free)} is free", file=self.workdir,
                            fix="free some space or point workdir: at a larger disk")

    # -- status -------------------------------------------------------------------------

    def status(self) -> list[dict]:
        """Each stage: done / fresh / stale / failed / running, with the reason (no lock, no writes)."""
        try:
            return self._status()
        except OSError as e:
            raise io_error(e, self.workdir) from None

    def live_holder(self) -> str | None:
        """Who holds the workdir lock now (a live run), or None. Reads only: never creates the lock file."""
        try:
            fd = os.open(self.workdir / ".lock", os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return (self.workdir / ".lock").read_text(errors="replace").strip()[:200] or "another process"
            except OSError:
                return "another process"
        finally:
            os.close(fd)  # closing drops a shared lock we may have taken
        return None

    def _status(self) -> list[dict]:
        self.open()
        holder = self.live_holder()
        rows, stale = [], set()
        for s in self.p.stages:
            rec = self.manifest.record(s.id) or {}
            up = upstream_of(s, self.p.stages) if s.module.INPUT else None
            try:
                ev = self.evaluate(s)
                if ev.fresh and up is not None and up.id in stale:
                    ev = Evaluation(False, f"upstream '{up.id}' is stale and will run first")
                state = "fresh" if ev.fresh else ("failed" if rec.get("status") == "failed" else
                                                  "interrupted" if rec.get("status") == "running" else "stale")
                why = ev.why
                if rec.get("status") == "running" and holder:
                    state, why = "running", f"running now ({holder})"
            except FuseError as e:
                state, why = "unknown", e.finding.message
            if state != "fresh":
                stale.add(s.id)
            rows.append({"id": s.id, "stage": s.name, "status": rec.get("status", "never ran"), "state": state,
                         "why": why, "seconds": rec.get("seconds"), "finished_at": rec.get("finished_at"),
                         "error": (rec.get("error") or {}).get("message")})
        return rows


# --------------------------------------------------------------------------- helpers


def _why_changed(old: dict, new: dict) -> str:
    if old.get("version") != new.get("version"):
        return f"stage implementation changed (v{old.get('version')} → v{new.get('version')})"
    op, np_ = old.get("params", {}), new.get("params", {})
    changed = sorted(k for k in set(op) | set(np_) if op.get(k) != np_.get(k))
    if changed:
        k = changed[0]
        return f"parameter {k} changed ({op.get(k)!r} → {np_.get(k)!r})" if len(changed) == 1 else \
            "parameters changed: " + ", ".join(changed)
    oi, ni = old.get("inputs", {}), new.get("inputs", {})
    os_, ns = oi.get("stage_params", {}), ni.get("stage_params", {})
    moved = sorted(k for k in set(os_) | set(ns) if os_.get(k) != ns.get(k))
    if moved:
        return f"parameter {moved[0]} changed ({os_.get(moved[0])!r} → {ns.get(moved[0])!r})"
    for key in ("upstream", "base", "adapters", "files"):
        if oi.get(key) != ni.get(key) and key in ni:
            return {"upstream": "upstream output changed", "base": "base model changed",
                    "adapters": "adapter changed", "files": "a file named by a parameter changed"}[key]
    if old.get("libraries") != new.get("libraries"):
        ol, nl = old.get("libraries", {}), new.get("libraries", {})
        diff = [f"{k} {ol.get(k)} → {nl.get(k)}" for k in sorted(set(ol) | set(nl)) if ol.get(k) != nl.get(k)]
        return "library versions changed: " + ", ".join(diff)
    return "fingerprint changed"


def _recordable(fp_inputs: dict, s: StageSpec) -> dict:
    """The fingerprint's inputs as written down: parameters with ${env.*} placeholders kept."""
    return dict(fp_inputs, params=s.recorded)


def _finding_for(e: BaseException, s: StageSpec, tmp: Path, workdir: Path) -> Finding:
    if isinstance(e, FuseError):
        return e.finding
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return Finding("F402", f"disk full while stage '{s.id}' was writing "
                               f"{e.filename or tmp} ({_gb(_free(workdir))} free now)",
                       file=str(e.filename or workdir),
                       fix="free space (the stage's partial output was removed) and run again: it resumes here")
    if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
        return io_error(e, workdir, stage=s.id).finding
    if isinstance(e, KeyboardInterrupt):
        return Finding("F407", f"stage '{s.id}' was interrupted", fix="run again: it resumes here")
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    return Finding("F406", f"stage '{s.id}' failed: {type(e).__name__}: {e}", fix="this is a bug in Fuse; "
                   "please report it with the traceback (FUSE_DEBUG=1 prints it)", extra={"traceback": tb[-3:]})


ENVIRONMENT_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ENOSPC, errno.EDQUOT,
                      errno.EMFILE, errno.EIO, errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ELOOP)
LOG_WRITERS = ("quantize", "export")  # stages that write <workdir>/logs/<id>.log
_GGUF_TMP = re.compile(r"\.tmp-gguf-[0-9a-f]{16}-[0-9a-f]{6}")  # sources.resolve_base's conversion dir


def io_error(e: OSError, workdir: Path, stage: str | None = None) -> FuseError:
    """An OSError of the machine (read-only disk, full disk, permissions, a name too long) as one
    finding naming the path: the user fixes the machine, Fuse has no bug to report."""
    path = e.filename or workdir
    during = f" while stage '{stage}' ran" if stage else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return FuseError("F402", f"disk full writing {path}{during} ({_gb(_free(workdir))} free now)", file=path,
                         fix="free space and run again: it resumes here")
    why = {errno.EROFS: "is on a read-only file system", errno.EACCES: "is not writable (permission denied)",
           errno.EPERM: "is not writable (operation not permitted)",
           errno.ENAMETOOLONG: "has a name too long for the file system"}.get(e.errno, f"failed: {e.strerror}")
    return FuseError("F409", f"{path} {why}{during}", file=path,
                     fix="make the workdir writable, or point workdir: at a directory you can write "
                         "(with a shorter path)")


def _free(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _as_kwargs(f: Finding) -> dict:
    return dict(code=f.code, message=f.message, file=f.file, line=f.line, key=f.key, fix=f.fix, **f.extra)


def _stat(p: Path) -> dict:
    st = os.stat(p)
    return {"mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _short_metrics(m: dict) -> str:
    items = [f"{k}={v}" for k, v in m.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    return ", ".join(items[:6])


def _installed(module: str) -> bool:
    """Importable without importing it (a None in sys.modules means "blocked", as import treats it)."""
    import importlib.util
    import sys

    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
