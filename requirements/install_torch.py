"""Install the pinned torch as a CPU build unless asked for CUDA (``make install TORCH=cuda``).

PyPI's Linux torch wheel is a CUDA build (several GB of nvidia-* packages). This asks pip, without
installing anything, which wheel ``torch==VERSION`` resolves to; if that wheel is already a CPU
build (a local ``+cpu`` wheel, macOS, or a machine whose pip is configured for one) it installs it
as it is, with no extra index. Otherwise it installs from PyTorch's CPU index, with a short timeout
and one retry so an unreachable index fails in seconds instead of stalling the install.

Usage: python requirements/install_torch.py VERSION cpu|cuda|skip
"""
from __future__ import annotations

import json
import subprocess
import sys

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def pip(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], **kw)


def installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, requires, version

    try:
        v = version("torch")
    except PackageNotFoundError:
        return None
    cuda = any(r.startswith("nvidia-") for r in (requires("torch") or []))
    return f"{v} {'cuda' if cuda else 'cpu'}"


def resolves_to_cpu(spec: str) -> bool | None:
    """True if ``pip install spec`` would take a CPU build (its metadata needs no nvidia-* packages)."""
    out = pip("install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet", "--report", "-", spec,
              capture_output=True, text=True)
    if out.returncode != 0:
        return None
    items = json.loads(out.stdout or "{}").get("install", [])
    if not items:
        return None
    meta = items[0].get("metadata", {})
    return not any(r.startswith("nvidia-") for r in meta.get("requires_dist", []))


def main(version: str, build: str) -> int:
    spec = f"torch=={version}"
    have = installed_version()
    if build == "skip":
        return 0
    if have and have.split()[0].split("+")[0] == version and have.split()[1] == build:
        return 0
    if build == "cuda" or resolves_to_cpu(spec):
        return pip("install", "-q", spec).returncode
    print(f"torch {version}: the default index offers a CUDA build; installing the CPU build from {CPU_INDEX} "
          "(make install TORCH=cuda for the CUDA build)", flush=True)
    rc = pip("install", "-q", "--timeout", "20", "--retries", "1", "--index-url", CPU_INDEX, spec).returncode
    if rc:
        print(f"could not install {spec} from {CPU_INDEX}. Install a torch {version} build yourself "
              "(pip install torch==%s --index-url <an index you can reach>), then run make install TORCH=skip"
              % version, file=sys.stderr)
    return rc


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[2] not in ("cpu", "cuda", "skip"):
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
