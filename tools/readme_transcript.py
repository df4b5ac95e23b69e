"""Keep the README's "What the demo prints" transcript equal to what the demo prints.

``python tools/readme_transcript.py`` runs the embedded pipeline.yaml twice in a temporary copy (as a
new user's ``make demo`` would, ~2.5 min on 2 cores) and rewrites the two blocks between the
``<!-- transcript:first -->`` / ``<!-- transcript:second -->`` markers and their closing fences.
``--log FILE`` takes the first run's log from a file instead. tests/test_demo.py compares the README
with the demo it runs, numbers masked, so a change to what a stage prints fails until this is re-run.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
WIDTH = 200  # longer lines are cut with "..."
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?")
_HEX = re.compile(r"\b[0-9a-f]{8,}\b")


_PROGRESS = re.compile(r"^\s+\S+: \d+/\d+ ")  # "  check: 200/272 tensors probed": how many depends on speed


def shorten(log: str, root: str | os.PathLike | None = None) -> list[str]:
    """The lines a reader needs, as a user in ``root`` (the directory the demo ran in) sees them: paths
    relative to it, progress lines left out (their count depends on the machine's speed), each line
    cut to WIDTH characters."""
    if root is not None:
        log = log.replace(f"{Path(root).resolve()}/", "").replace(f"{Path(root)}/", "")
    lines = [ln.rstrip() for ln in log.splitlines() if ln.strip() and not _PROGRESS.match(ln)]
    return [ln if len(ln) <= WIDTH else ln[:WIDTH - 4].rstrip() + " ..." for ln in lines]


def masked(lines: list[str]) -> list[str]:
    """The same lines with numbers and digests replaced: what must not change between two machines."""
    return [_NUMBER.sub("N", _HEX.sub("H", ln.removesuffix(" ..."))) for ln in lines]


def block(text: str, marker: str) -> list[str]:
    """The fenced lines that follow ``<!-- transcript:MARKER -->`` in the README."""
    m = re.search(rf"<!-- transcript:{marker} -->\n```\n(.*?)\n```", text, re.S)
    if not m:
        raise SystemExit(f"README.md has no '<!-- transcript:{marker} -->' block")
    return m.group(1).splitlines()


def replace(text: str, marker: str, lines: list[str]) -> str:
    return re.sub(rf"(<!-- transcript:{marker} -->\n```\n).*?(\n```)", lambda m: m.group(1) + "\n".join(lines)
                  + m.group(2), text, count=1, flags=re.S)


def run_demo() -> tuple[list[str], list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copy(ROOT / "pipeline.yaml", root / "pipeline.yaml")
        shutil.copytree(ROOT / "demo" / "adapter", root / "demo" / "adapter")
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        runs = [subprocess.run([sys.executable, "-m", "stages", "run", "pipeline.yaml"], cwd=root, env=env,
                               capture_output=True, text=True) for _ in range(2)]
        for r in runs:
            if r.returncode:
                raise SystemExit(r.stderr)
        return shorten(runs[0].stderr, root), shorten(runs[1].stderr, root)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", help="the first run's log (default: run the demo now)")
    ap.add_argument("--second-log", help="the second run's log")
    ap.add_argument("--root", help="the directory the logged run ran in (its paths are shown relative to it)")
    args = ap.parse_args()
    if args.log:
        first = shorten(Path(args.log).read_text(), args.root)
        second = shorten(Path(args.second_log).read_text(), args.root) if args.second_log else None
    else:
        first, second = run_demo()
    text = replace(README.read_text(), "first", first)
    if second is not None:
        text = replace(text, "second", second)
    README.write_text(text)
    print("README.md transcript updated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
