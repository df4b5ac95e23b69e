"""Reporting a run for people and for CI: a markdown summary from the manifest, the
GitHub Actions outputs, log groups per stage and secret masks.

Everything here reads the manifest (and the pipeline file only to find the workdir); it
never changes a run. ``python -m stages summary TARGET`` prints the summary; with
``--github`` it appends it to ``$GITHUB_STEP_SUMMARY`` and writes the action's outputs
(``manifest``, ``model-dir``, ``stage-dirs``, ``published``, ``status``, ``workdir``) to ``$GITHUB_OUTPUT``.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .findings import FuseError, in_github_actions

# GitHub caps a step summary at 1 MiB; stay well below it.
SUMMARY_LIMIT = 900 * 1024

# Metrics worth a column, in the order they are shown: (key, label, kind). Stages may
# report others; up to MAX_NUMBERS known ones are shown, then unknown numeric ones.
KEY_METRICS = (
    ("tensors_merged", "tensors merged", "int"),
    ("tensors_updated", "tensors updated", "int"),
    ("adapter_tensors", "adapter tensors", "int"),
    ("logits_max_abs_diff", "max logit diff", "float"),   # check: merged vs base + adapter
    ("logits_kl_mean", "mean KL", "float"),
    ("logits_top1_agreement", "top-1 agreement", "float"),
    ("max_abs_diff", "max logit diff", "float"),          # quantize, export: vs the merged model
    ("kl_mean", "mean KL", "float"),
    ("top1_agreement", "top-1 agreement", "float"),
    ("ppl_ratio", "perplexity ratio", "float"),
    ("bytes_uploaded", "uploaded", "bytes"),              # publish
    ("bytes_copied", "sent", "bytes"),
    ("bytes_written", "written", "bytes"),
    ("files", "files", "int"),
)
SKIP_METRICS = {"seconds", "warnings", "disk_free_bytes", "disk_need_bytes"}  # machine facts, not the model's
MAX_NUMBERS = 3
STATUS_BY_EXIT = {0: "success", 1: "failed", 2: "invalid", 130: "interrupted"}
ICON = {"done": "✅ done", "ran": "✅ ran", "fresh": "⏭️ fresh, skipped", "failed": "❌ failed", "interrupted": "⚠️ interrupted",
        "not run": "➖ not run"}


@dataclass
class StageRow:
    id: str
    stage: str
    state: str  # ran | fresh | failed | interrupted | not run
    seconds: float | None
    numbers: list[str] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)  # findings recorded by the stage
    error: str | None = None
    published: str | None = None  # URL, for publish steps
    output_dir: Path | None = None
    output_kind: str | None = None


@dataclass
class Report:
    name: str
    status: str
    pipeline: str | None
    workdir: Path | None
    manifest: Path | None
    rows: list[StageRow]
    error: str | None = None  # a pipeline-file finding that stopped the run before any stage

    @property
    def published(self) -> list[str]:
        return [r.published for r in self.rows if r.published]

    @property
    def stage_dirs(self) -> dict[str, Path]:
        """Stage id -> output directory, for every done stage that writes one."""
        return {r.id: r.output_dir for r in self.rows if r.output_dir and r.state in ("done", "ran", "fresh")}

    @property
    def model_dir(self) -> Path | None:
        """The merged model: the last done stage that writes a full-precision Hugging Face model
        (merge), not a quantized or ONNX one (those are in ``stage_dirs``)."""
        dirs = [r.output_dir for r in self.rows
                if r.output_dir and r.state in ("done", "ran", "fresh") and r.output_kind == "hf-model"]
        return dirs[-1] if dirs else None

    def outputs(self) -> dict:
        return {
            "status": self.status,
            "manifest": str(self.manifest) if self.manifest else "",
            "model-dir": str(self.model_dir) if self.model_dir else "",
            "stage-dirs": json.dumps({k: str(v) for k, v in self.stage_dirs.items()}),
            "published": json.dumps(self.published),
            "workdir": str(self.workdir) if self.workdir else "",
        }


# --------------------------------------------------------------------------- building the report


def build(target, overrides=(), exit_code: int | None = None, ran: dict | None = None) -> Report:
    """Read the run of ``target`` (a pipeline file or a workdir).

    ``exit_code`` is the exit status of the ``run`` this report is about, ``ran`` what that
    run did (``{"ran": [ids], "skipped": [ids]}``, written by ``run`` to the file named by
    ``$FUSE_STAGES_OUTPUT``): its stages are shown as ran or fresh and skipped; without it,
    a stage is just done.
    """
    from .manifest import MANIFEST, Manifest

    target = Path(target)
    pipeline_path, name = None, target.stem
    if target.is_file():
        pipeline_path = str(target)
        try:
            from .pipeline import load

            p = load(target, list(overrides))
            workdir, name = p.workdir, p.name
        except FuseError as e:
            return Report(name=name, status=_status(exit_code, [], invalid=True), pipeline=pipeline_path,
                          workdir=None, manifest=None, rows=[], error=_clean(e.finding.line_text()))
    else:
        workdir = target
    try:
        m = Manifest.load(workdir)
    except FuseError as e:
        return Report(name=name, status=_status(exit_code, [], invalid=True), pipeline=pipeline_path,
                      workdir=workdir.resolve(), manifest=None, rows=[], error=_clean(e.finding.line_text()))
    resolved = m.data.get("pipeline", {}).get("resolved", {})
    name = resolved.get("name", name)
    order = [s["id"] for s in resolved.get("stages", [])]
    order += [sid for sid in m.stages if sid not in order]
    if pipeline_path:  # the pipeline as it is now wins over the recorded one
        order = [s.id for s in p.stages] + [sid for sid in order if sid not in {s.id for s in p.stages}
                                             and sid in m.stages]
    stage_names = {s["id"]: s.get("stage") for s in resolved.get("stages", [])}
    if pipeline_path:
        stage_names.update({s.id: s.name for s in p.stages})
    rows = [_row(sid, m.record(sid), stage_names.get(sid), m.workdir, ran) for sid in order]
    path = m.workdir / MANIFEST
    return Report(name=name, status=_status(exit_code, rows), pipeline=pipeline_path or resolved.get("path"),
                  workdir=m.workdir.resolve(), manifest=path.resolve() if path.exists() else None, rows=rows)


def _row(sid: str, rec: dict | None, stage_name: str | None, workdir: Path, ran: dict | None) -> StageRow:
    rec = rec or {}
    stage = rec.get("stage") or stage_name or sid
    status = rec.get("status")
    if status == "done":
        state = "done"
        if ran and sid in ran.get("ran", ()):
            state = "ran"
        elif ran and sid in ran.get("skipped", ()):
            state = "fresh"
    elif status == "failed":
        state = "failed"
    elif status == "running":
        state = "interrupted"
    else:
        state = "not run"
    row = StageRow(id=sid, stage=stage, state=state, seconds=rec.get("seconds"),
                   numbers=key_numbers(rec.get("metrics") or {}), warnings=list(rec.get("warnings") or []))
    if rec.get("error"):
        err = rec["error"]
        row.error = _clean(f"{err.get('code', '')} {err.get('message', '')}".strip())
    try:
        from .pipeline import stage_module

        row.output_kind = getattr(stage_module(stage), "OUTPUT", None)
    except ImportError:
        row.output_kind = None
    if status == "done" and (row.output_kind or stage == "publish"):  # publish keeps its card, provenance, SHA256SUMS
        row.output_dir = (workdir / rec.get("output_dir", sid)).resolve()
    if status == "done" and stage == "publish":
        row.published = _published_url(rec)
    return row


def _published_url(rec: dict) -> str | None:
    """Where a publish step put the model: a URL it reported, else its target directory as file:// URL."""
    ext = rec.get("external") or {}
    for src in (rec.get("metrics") or {}, ext):
        for key in ("commit_url", "url", "repo_url"):
            if isinstance(src.get(key), str) and src[key]:
                return src[key]
    root = ext.get("root")
    if not root:
        return None
    if "://" in root:
        return root
    return Path(root).resolve().as_uri()


def _status(exit_code: int | None, rows: list[StageRow], invalid: bool = False) -> str:
    if exit_code is not None:
        return STATUS_BY_EXIT.get(exit_code, "failed")
    if invalid:
        return "invalid"
    states = {r.state for r in rows}
    if "failed" in states:
        return "failed"
    if "interrupted" in states:
        return "interrupted"
    return "success" if rows and states <= {"done", "ran", "fresh"} else "incomplete"


def key_numbers(metrics: dict) -> list[str]:
    out, seen_labels = [], set()
    for key, label, kind in KEY_METRICS:
        v = metrics.get(key)
        if _is_number(v) and v != 0 and label not in seen_labels:
            out.append(f"{label} {_fmt(v, kind)}")
            seen_labels.add(label)
    known = {k for k, _, _ in KEY_METRICS} | SKIP_METRICS
    for key, v in metrics.items():
        if key not in known and _is_number(v) and v != 0:
            out.append(f"{key.replace('_', ' ')} {_fmt(v, 'bytes' if key.startswith('bytes') else 'auto')}")
    return out[:MAX_NUMBERS]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v, kind: str) -> str:
    if kind == "bytes":
        return _bytes(v)
    if kind == "int" or (kind == "auto" and float(v).is_integer()):
        return f"{int(v):,}"
    if abs(v) and (abs(v) < 1e-3 or abs(v) >= 1e6):
        return f"{v:.2e}"
    return f"{v:.4g}"


def _bytes(n) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _secs(s) -> str:
    if s is None:
        return "–"
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(round(s), 60)
    return f"{m} min {s} s" if m < 60 else f"{m // 60} h {m % 60} min"


def _clean(text: str) -> str:
    """One line, with secret-looking environment values redacted."""
    from .manifest import redact
    from .pipeline import secret_env_values

    return redact(" ".join(str(text).split()), secret_env_values())


def _cell(text: str) -> str:
    return _clean(text).replace("|", "\\|")


# --------------------------------------------------------------------------- markdown


def markdown(r: Report) -> str:
    icon = {"success": "✅", "failed": "❌", "invalid": "❌", "interrupted": "⚠️"}.get(r.status, "ℹ️")
    ran = sum(1 for row in r.rows if row.state == "ran")
    fresh = sum(1 for row in r.rows if row.state == "fresh")
    lines = [f"### {icon} Fuse `{_cell(r.name)}`: {r.status}", ""]
    if r.rows:
        if ran or fresh:
            lines.append(f"{len(r.rows)} stages: {ran} ran, {fresh} fresh and skipped.")
        else:
            lines.append(f"{len(r.rows)} stages.")
        lines.append("")
    if r.error:
        lines += [f"> **Pipeline error** in `{_cell(r.pipeline or '')}`: {_cell(r.error)}", ""]
    if r.rows:
        lines += ["| Stage | Status | Time | Key numbers |", "|---|---|---|---|"]
        for row in r.rows:
            stage = f"`{_cell(row.id)}`" + (f" ({_cell(row.stage)})" if row.stage != row.id else "")
            secs = _secs(row.seconds) + (" (earlier)" if row.state == "fresh" and row.seconds is not None else "")
            nums = ", ".join(_cell(n) for n in row.numbers)
            if row.warnings:
                n = len(row.warnings)
                nums = f"⚠️ {n} warning{'s' if n > 1 else ''}" + (", " + nums if nums else "")
            if row.error:
                nums = (nums + "<br>" if nums else "") + f"**{_cell(row.error)}**"
            if row.published:
                nums = (nums + "<br>" if nums else "") + f"→ {_link(row.published)}"
            lines.append(f"| {stage} | {ICON[row.state]} | {secs} | {nums or '–'} |")
        lines.append("")
    if r.published:
        lines.append("**Published:** " + ", ".join(_link(u) for u in r.published))
        lines.append("")
    if r.manifest:
        lines.append(f"Manifest: `{_cell(str(r.manifest))}`"
                     + (f" · model: `{_cell(str(r.model_dir))}`" if r.model_dir else ""))
        lines.append("")
    text = "\n".join(lines)
    if len(text.encode()) > SUMMARY_LIMIT:
        text = text.encode()[:SUMMARY_LIMIT].decode(errors="ignore") + "\n\n_(truncated: see the manifest)_\n"
    return text


def _link(url: str) -> str:
    if url.startswith(("http://", "https://")):
        return f"[{_cell(url)}]({url.replace(')', '%29').replace(' ', '%20')})"
    return f"`{_cell(url)}`"  # file:// links do not open from a browser: show them as text


# --------------------------------------------------------------------------- GitHub Actions


def write_github(r: Report, env=os.environ) -> None:
    """Append the summary to $GITHUB_STEP_SUMMARY and the outputs to $GITHUB_OUTPUT."""
    summary = env.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(markdown(r) + "\n")
    out = env.get("GITHUB_OUTPUT")
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(github_outputs(r.outputs()))


def github_outputs(values: dict) -> str:
    """``name<<DELIM`` blocks with a random delimiter, safe for any value (docs: workflow commands)."""
    chunks = []
    for k, v in values.items():
        delim = f"ghadelimiter_{uuid.uuid4().hex}"
        chunks.append(f"{k}<<{delim}\n{v}\n{delim}\n")
    return "".join(chunks)


def warning_annotations(r: Report, env=os.environ) -> list[str]:
    """``::warning`` commands for the findings of the stages that ran in this run, with file
    paths relative to the workspace so that GitHub shows them on the file."""
    from .findings import Finding

    workspace = env.get("GITHUB_WORKSPACE")
    out = []
    for row in r.rows:
        if row.state != "ran":
            continue
        for w in row.warnings:
            f = Finding(**{k: w[k] for k in ("code", "message", "severity", "file", "line", "key", "fix") if k in w})
            if f.file and workspace:
                with contextlib.suppress(ValueError):
                    f.file = str(Path(f.file).resolve().relative_to(Path(workspace).resolve()))
            out.append(_clean(f.annotation()))
    return out


def mask_secrets(stream=None) -> int:
    """``::add-mask::`` every secret-looking environment value (and each line of a multi-line
    one), so that nothing a library prints can show it. Returns how many were masked."""
    from .secrets import redactable  # the one redaction rule

    stream = stream or sys.stdout
    values = sorted(v for v in redactable() if "\n" not in v)
    for v in values:
        stream.write(f"::add-mask::{v}\n")
    stream.flush()
    return len(values)


class StageGroups:
    """A log function for the runner: notes which stages ran and which were skipped, and
    under GitHub Actions folds each stage's lines into a ``::group::``.

    The runner announces a stage with ``[id] running: why`` (or ``[id] fresh, skipped``) and
    ends it with ``[id] done in ...``; a stage that fails raises, and :meth:`close` ends its
    group before the error annotation is printed.
    """

    def __init__(self, stream=None, groups: bool = True):
        self.stream = stream or sys.stderr
        self.groups = groups
        self.open = None
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def __call__(self, msg: str):
        msg = str(msg)
        sid = _stage_prefix(msg)
        rest = msg[len(sid) + 2:].lstrip() if sid else ""
        if sid and rest.startswith("running"):
            self.close()
            self.ran.append(sid)
            if self.groups:
                self._write(f"::group::{msg}")
                self.open = sid
                return
        elif sid and rest.startswith("fresh"):
            self.skipped.append(sid)
        self._write(msg)
        if sid and sid == self.open and rest.startswith("done"):
            self.close()

    def close(self):
        if self.open is not None:
            self._write("::endgroup::")
            self.open = None

    def _write(self, line: str):
        # under Actions, a line of the run that begins with '::' would be read as a command
        if self.groups and line.startswith("::") and not line.startswith(("::group::", "::endgroup::")):
            line = " " + line
        self.stream.write(line + "\n")
        self.stream.flush()


def _stage_prefix(msg: str) -> str | None:
    if msg.startswith("[") and "]" in msg:
        return msg[1:msg.index("]")]
    return None


@contextlib.contextmanager
def stage_log():
    """The log function ``run`` should use.

    Under GitHub Actions: secret-looking environment values masked first, one log group per
    stage. With ``$FUSE_STAGES_OUTPUT`` set: which stages ran and which were skipped are
    written there as JSON when the run ends, however it ends (the action's summary reads it).
    Elsewhere: ``None``, the runner's default.
    """
    gha, out = in_github_actions(), os.environ.get("FUSE_STAGES_OUTPUT")
    if not gha and not out:
        yield None
        return
    if gha:
        mask_secrets(sys.stderr)
    log = StageGroups(groups=gha)
    try:
        yield log
    finally:
        log.close()
        if out:
            with contextlib.suppress(OSError):
                Path(out).write_text(json.dumps({"ran": log.ran, "skipped": log.skipped}))


def cli(args) -> int:
    """``python -m stages summary TARGET [--github] [--json] [--exit-code N] [--stages-file F] [--set ...]``."""
    ran = None
    if args.stages_file:
        with contextlib.suppress(OSError, ValueError):
            ran = json.loads(Path(args.stages_file).read_text())
    r = build(args.target, overrides=args.overrides, exit_code=args.exit_code, ran=ran)
    if args.github:
        write_github(r)
        for line in warning_annotations(r):
            print(line, file=sys.stderr)
        print(f"fuse: {r.status}" + (f", manifest {r.manifest}" if r.manifest else ""), file=sys.stderr)
    elif args.json:
        print(json.dumps(dict(r.outputs(), published=r.published), indent=2))
    else:
        print(markdown(r))
    return 0
