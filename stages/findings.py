"""Findings: every user-facing problem is one of these, with a stable code.

A finding says what went wrong, where (file, line, key or tensor) and how to fix it.
The CLI prints it as one line (or a GitHub ``::error`` annotation) and exits non-zero;
the runner records it in the manifest. Code that detects a user mistake raises
:class:`FuseError`; nothing else should reach the user as a traceback.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from .secrets import redact

# code -> short title. Codes are stable: tests, docs and users' scripts rely on them.
CODES = {
    # pipeline file
    "F101": "pipeline file is not valid YAML",
    "F102": "unknown key",
    "F103": "wrong type or invalid value",
    "F104": "missing required key",
    "F105": "path does not exist",
    "F106": "duplicate stage id",
    "F107": "unknown stage",
    "F108": "bad stage reference",
    "F109": "bad --set override",
    "F110": "undefined variable",
    "F111": "a path the run writes overlaps what it reads or a protected directory",
    "F112": "pipeline file uses YAML that Fuse refuses (tags, alias expansion, nesting, size)",
    "F113": "secret value in a field that is published",
    # inputs: base model, adapter
    "F201": "adapter config missing or invalid",
    "F202": "adapter type cannot be merged",
    "F203": "adapter tensor maps to no base tensor",
    "F204": "adapter tensor shape does not fit the base tensor",
    "F205": "base model missing or invalid",
    "F206": "safetensors file is corrupt",
    "F207": "output would overwrite the base or the adapter",
    "F208": "adapter file missing or unreadable",
    "F209": "model file format not supported",
    "F210": "symlink leads outside the model directory",
    "F211": "adapter was trained on a different base model",
    "F212": "adapter tensor has NaN or Inf",
    "F213": "vocabulary size does not match the embedding",
    "F214": "adapter config does not match its tensors",
    "F215": "base model is quantized",
    # merge numerics
    "F301": "merged tensor has NaN or Inf",
    "F302": "merged tensor overflows the output dtype",
    "F303": "merged tensor differs from base + adapter",
    "F304": "merged model's outputs differ from base + adapter",
    # runner, manifest, disk
    "F401": "workdir is locked by another run",
    "F402": "not enough disk space",
    "F403": "output does not match the manifest",
    "F404": "manifest is unreadable",
    "F405": "stage has no input to read",
    "F406": "stage failed",
    "F407": "stage was interrupted",
    "F408": "workdir entry was not written by Fuse",
    "F409": "workdir cannot be written",
    # publish
    "F501": "publish target invalid",
    "F502": "publish credentials missing or rejected",
    "F503": "release tag already points at different content",
    "F504": "publish target changed during the publish",
    "F505": "upload to the publish target failed",
    "F506": "published file does not verify on the target",
    "F507": "model card template invalid",
    "F508": "publish target settings differ from the pipeline",
    "F509": "publish target holds a file Fuse did not publish where it must write",
    "F510": "publish target cannot be written",
    # quantize and export
    "F601": "quantization would take too long or need too much memory here",
    "F602": "optional packages of a stage missing, or the quantizer/exporter failed",
    "F603": "calibration data invalid",
    "F604": "quantized model fails its quality gate",
    "F605": "adapter update smaller than the quantization step",
    "F606": "ONNX export failed",
    "F607": "exported ONNX model fails its quality gate",
    "F608": "model cannot be quantized with these parameters",
}


@dataclass
class Finding:
    code: str
    message: str
    severity: str = "error"  # "error" | "warning"
    file: str | None = None
    line: int | None = None
    key: str | None = None
    fix: str | None = None
    extra: dict = field(default_factory=dict)

    def where(self) -> str:
        parts = []
        if self.file:
            parts.append(str(self.file) + (f":{self.line}" if self.line else ""))
        if self.key:
            parts.append(self.key)
        return ":".join(parts)

    def line_text(self) -> str:
        """One terminal line: ``error F102 pipeline.yaml:7:stages[1].merge.dtyp: unknown key ... (fix: ...)``."""
        where = self.where()
        text = f"{self.severity} {self.code} " + (f"{where}: " if where else "") + self.message
        if self.fix:
            text += f" (fix: {self.fix})"
        return redact(text)  # no secret is ever printed (stages/secrets.py)

    def annotation(self) -> str:
        """GitHub Actions workflow command, shown on the file's line in the PR/run view."""
        props = []
        if self.file:
            props.append(f"file={_escape_prop(redact(str(self.file)))}")
        if self.line:
            props.append(f"line={self.line}")
        props.append(f"title={_escape_prop(self.code + ' ' + CODES.get(self.code, ''))}")
        msg = redact(self.message + (f" Fix: {self.fix}" if self.fix else ""))  # before escaping
        kind = "error" if self.severity == "error" else "warning"
        return f"::{kind} {','.join(props)}::{_escape_data(msg)}"

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v not in (None, {}, [])}
        return d


class FuseError(Exception):
    """A user-facing error: carries one :class:`Finding`."""

    def __init__(self, code: str, message: str, *, file=None, line=None, key=None, fix=None, **extra):
        self.finding = Finding(code=code, message=message, file=str(file) if file else None,
                               line=line, key=key, fix=fix, extra=extra)
        super().__init__(self.finding.line_text())


def in_github_actions() -> bool:
    return os.environ.get("GITHUB_ACTIONS") == "true"


def render(finding: Finding) -> str:
    """How a finding is shown on stderr here: an annotation under Actions, a plain line elsewhere."""
    if in_github_actions():
        return finding.annotation()
    return finding.line_text()


def _escape_data(s: str) -> str:
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_prop(s: str) -> str:
    return _escape_data(s).replace(":", "%3A").replace(",", "%2C")
