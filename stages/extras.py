"""How to install Fuse's optional extras, for the fix text of F602.

fuse-llm is not on PyPI, so ``pip install 'fuse-llm[export]'`` is no fix. One table says what
an extra brings: pyproject.toml's ``[project.optional-dependencies]``, read back from the
installed distribution's metadata (or from pyproject.toml beside the package in a source
checkout that was never installed). Inside the GitHub Action (``FUSE_ACTION=1``, set by
action.yml) the fix is the action's ``extras`` input instead.
"""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

DIST = "fuse-llm"
_EXTRA_MARKER = re.compile(r"""^(?P<req>[^;]+?)\s*;\s*extra\s*==\s*["'](?P<extra>[^"']+)["']\s*$""")


def requirements(extra: str) -> list[str]:
    """The requirement strings of one extra (e.g. ``onnx>=1.17``), in pyproject's order; [] if unknown."""
    return _table().get(extra, [])


def _table() -> dict[str, list[str]]:
    from importlib import metadata

    try:
        lines = metadata.requires(DIST) or []
    except metadata.PackageNotFoundError:
        return _from_pyproject()
    table: dict[str, list[str]] = {}
    for line in lines:
        m = _EXTRA_MARKER.match(line)
        if m:
            table.setdefault(m["extra"], []).append(m["req"].replace(" ", ""))
    return table


def _from_pyproject() -> dict[str, list[str]]:
    try:
        import tomllib
    except ImportError:  # Python 3.10 without an installed distribution: no table
        return {}
    path = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if data.get("project", {}).get("name") != DIST:
        return {}
    return {k: [r.replace(" ", "") for r in v] for k, v in data["project"].get("optional-dependencies", {}).items()}


def install_fix(needs: dict) -> str:
    """The command (or action input) that installs the extras in ``needs`` (extra -> the modules
    wanted from it; those modules are named instead where the table does not know the extra)."""
    extras = sorted(needs)
    if os.environ.get("FUSE_ACTION") == "1":
        have = [e for e in re.split(r"[,\s]+", os.environ.get("FUSE_ACTION_EXTRAS", "")) if e]
        if any(e not in have for e in extras):
            return f"set the action's input `extras: {','.join(have + [e for e in extras if e not in have])}`"
        # the input names them, yet they are missing (a runner's own environment): name the packages
    reqs: list[str] = []
    for extra in extras:
        reqs += [r for r in requirements(extra) or sorted(needs[extra]) if r not in reqs]
    return "pip install " + " ".join(shlex.quote(r) for r in reqs)
