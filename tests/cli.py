"""Run the real CLI (``python -m stages``) in a subprocess, as a user or CI would."""
from __future__ import annotations

import os
import subprocess
import sys


def fuse(*args, cwd, env=None, check=True, timeout=900) -> subprocess.CompletedProcess:
    """Offline, one torch thread unless the caller set more; ``check`` raises with the stderr tail."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                **(env or {})}
    r = subprocess.run([sys.executable, "-m", "stages", *args], cwd=cwd, capture_output=True, text=True,
                       env=full_env, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"fuse {' '.join(args)} exited {r.returncode}:\n{r.stderr[-4000:]}")
    return r
