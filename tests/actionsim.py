"""Run the shell steps of a composite action (action.yml) locally, as the runner would.

Just enough of GitHub Actions for the tests: ``${{ inputs.* }}``, ``${{ steps.*.outputs.* }}``,
``${{ env.* }}`` and ``${{ github.* }}`` expressions, step ``env:``, ``if: always()``, the
``$GITHUB_OUTPUT`` / ``$GITHUB_STEP_SUMMARY`` files and the composite ``outputs:``. Steps
that ``uses:`` another action (setup-python, cache) are skipped and the install step is
replaced by the python running the tests: the full action runs under act in
``.ci/lint-actions``.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
_EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def evaluate(text, ctx: dict) -> str:
    """Expand ``${{ a.b.c }}`` (dotted lookups in ``ctx`` only; a missing value is '')."""
    if not isinstance(text, str):
        return "" if text is None else str(text).lower() if isinstance(text, bool) else str(text)

    def sub(m):
        expr = m.group(1)
        if not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", expr):
            raise ValueError(f"expression not supported by the simulator: {expr}")
        value = ctx
        for part in expr.split("."):
            value = value.get(part, "") if isinstance(value, dict) else ""
        return "" if value is None else str(value)

    return _EXPR.sub(sub, text)


def parse_output_file(path: Path) -> dict:
    """``name=value`` lines and ``name<<DELIM ... DELIM`` blocks (the runner's format)."""
    out, lines, i = {}, path.read_text(encoding="utf-8").splitlines() if path.exists() else [], 0
    while i < len(lines):
        line = lines[i]
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delim = line.split("<<", 1)
            j = lines.index(delim, i + 1)
            out[name] = "\n".join(lines[i + 1:j])
            i = j + 1
            continue
        if "=" in line:
            name, value = line.split("=", 1)
            out[name] = value
        i += 1
    return out


@dataclass
class ActionRun:
    outputs: dict
    steps: dict  # step id -> {"outcome", "outputs", "log"}
    summary: str
    log: str = ""
    failed: bool = field(default=False)


def run_action(with_: dict, *, cwd: Path, env: dict | None = None, python: str = sys.executable,
               action: Path = ROOT / "action.yml", tmp: Path | None = None) -> ActionRun:
    spec = yaml.safe_load(action.read_text())
    inputs = {k: (v or {}).get("default", "") for k, v in spec.get("inputs", {}).items()}
    unknown = set(with_) - set(inputs)
    if unknown:
        raise ValueError(f"inputs the action does not declare: {sorted(unknown)}")
    inputs.update({k: "" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
                   for k, v in with_.items()})
    tmp = Path(tmp or cwd / ".actionsim")
    tmp.mkdir(parents=True, exist_ok=True)
    steps: dict = {"install": {"outcome": "success", "outputs": {"python": python}}}
    ctx = {"inputs": inputs, "steps": steps, "github": {"action_path": str(action.parent)}}
    failed, logs, summaries = False, [], []
    base_env = {**os.environ, **(env or {}), "GITHUB_ACTIONS": "true", "GITHUB_WORKSPACE": str(cwd),
                "GITHUB_ACTION_PATH": str(action.parent), "RUNNER_TEMP": str(tmp)}
    for n, step in enumerate(spec["runs"]["steps"]):
        sid = step.get("id", f"step{n}")
        if "uses" in step or sid in ("prep", "install"):
            continue  # setup-python, cache and the install: see the module docstring
        cond = str(step.get("if", "success()"))
        if failed and "always()" not in cond:
            steps[sid] = {"outcome": "skipped", "outputs": {}}
            continue
        out_file, summary_file = tmp / f"{sid}.output", tmp / f"{sid}.summary"
        out_file.write_text("")
        summary_file.write_text("")
        step_env = {k: evaluate(v, ctx) for k, v in (step.get("env") or {}).items()}
        r = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], cwd=cwd,
                           env={**base_env, **step_env, "GITHUB_OUTPUT": str(out_file),
                                "GITHUB_STEP_SUMMARY": str(summary_file)},
                           capture_output=True, text=True, timeout=600)
        log = r.stdout + r.stderr
        logs.append(log)
        summaries.append(summary_file.read_text())
        steps[sid] = {"outcome": "success" if r.returncode == 0 else "failure",
                      "outputs": parse_output_file(out_file), "log": log}
        failed = failed or r.returncode != 0
    outputs = {k: evaluate(v.get("value", ""), ctx) for k, v in spec.get("outputs", {}).items()}
    return ActionRun(outputs=outputs, steps=steps, summary="".join(summaries), log="".join(logs), failed=failed)
