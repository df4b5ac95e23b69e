"""Walk a pipeline's stages: skip fresh ones, run stale ones, record everything.

The runner owns the workdir: one run at a time (a lock), temp output directories that
are renamed into place only when complete, the manifest writes, and the skip rule.
Stage modules only compute.
"""
from __future__ import annotations

import errno
import fcntl
import os
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
        self.workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.workdir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = ""
            try:
                holder = (self.workdir / ".lock").read_text().strip()
            except OSError:
                pass
            raise FuseError("F401", f"another Fuse run{' (' + holder + ')' if holder else ''} holds this workdir",
                            file=self.workdir, fix="wait for it to finish, or use another workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())
        self._lock_fd = fd

    def unlock(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def clean_temp(self):
        """Remove what a killed run left: temp output dirs and old outputs awaiting deletion."""
        for p in self.workdir.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        for p in self.workdir.glob(".trash-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in (self.workdir / ".bases").glob(".tmp-*") if (self.workdir / ".bases").exists() else []:
            shutil.rmtree(p, ignore_errors=True)

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
        checkout lives elsewhere, still finds its stages fresh.
        """
        if self._input_digests is None:
            adapters = []
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
            return Evaluation(False, "interrupted in an earlier run")
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
        self.lock()
        try:
            self.clean_temp()
            self.open()
            self._check_requirements(selected)
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
        mods = sorted({f"{m} (fuse-llm[{extra}])" for ms in need.values() for m, extra in ms})
        extras = ",".join(sorted({extra for ms in need.values() for _, extra in ms}))
        raise FuseError("F602", f"stage{'s' if len(need) > 1 else ''} {', '.join(need)} need"
                        f"{'' if len(need) > 1 else 's'} packages that are not installed: {', '.join(mods)}",
                        file=self.p.path, line=stage.line, key=stage.id,
                        fix=f"pip install 'fuse-llm[{extras}]' (or run the stages before it here and the rest "
                            "where they are installed: --until / --from)")

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
        self.manifest.save()
        tmp = self.workdir / f".tmp-{s.name}-{s.id}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        up = upstream_of(s, self.p.stages) if mod.INPUT else None
        ctx = StageContext(stage=s, pipeline=self.p, params=dict(s.params), output_dir=tmp,
                           workdir=self.workdir, manifest=self.manifest, log=self.log,
                           input_dir=(self.workdir / up.id) if up else None, input_stage=up.id if up else None,
                           _resolve_base=self.base)
        try:
            self._check_space(s, ctx)
            metrics = mod.run(ctx) or {}
            files = [mf.file_record(tmp, rel, ctx.hashes.get(rel)) for rel in mf.list_files(tmp)]
            for rel in mf.list_files(tmp):
                mf.fsync_path(tmp / rel)
            mf.fsync_path(tmp)
            self._swap_into_place(tmp, self.workdir / s.id)
        except BaseException as e:  # record the failure, leave nothing half-written
            shutil.rmtree(tmp, ignore_errors=True)
            finding = _finding_for(e, s, tmp, self.workdir)
            rec = self.manifest.stages[s.id]
            rec.update(status="failed", finished_at=mf.now(), seconds=round(time.time() - started, 3),
                       error=finding.to_dict())
            self.manifest.save()
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
        self.manifest.save()
        self.log(f"[{s.id}] done in {rec['seconds']:.1f}s"
                 + (f": {_short_metrics(metrics)}" if metrics else ""))

    def _swap_into_place(self, tmp: Path, final: Path):
        """Rename the finished output into place; the old one goes to a trash dir first."""
        trash = None
        if final.exists() or final.is_symlink():
            trash = self.workdir / f".trash-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
        os.replace(tmp, final)
        mf.fsync_path(self.workdir)
        if trash:
            shutil.rmtree(trash, ignore_errors=True)

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
        self.open()
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
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return Finding("F402", f"disk full while stage '{s.id}' was writing "
                               f"{e.filename or tmp} ({_gb(shutil.disk_usage(workdir).free)} free now)",
                       file=str(e.filename or workdir),
                       fix="free space (the stage's partial output was removed) and run again: it resumes here")
    if isinstance(e, KeyboardInterrupt):
        return Finding("F406", f"stage '{s.id}' was interrupted", fix="run again: it resumes here")
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    return Finding("F406", f"stage '{s.id}' failed: {type(e).__name__}: {e}", fix="this is a bug in Fuse; "
                   "please report it with the traceback (FUSE_DEBUG=1 prints it)", extra={"traceback": tb[-3:]})


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
