"""Send what a chatty library prints (banners, tables, progress bars, compiler output) to a log file.

Redirects the process's file descriptors 1 and 2, so output from C extensions and child
processes is caught too; Python's ``sys.stdout``/``sys.stderr`` are flushed around it.
On an exception the tail of the log is kept on the exception (``captured_tail``) for the
error message.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path


@contextlib.contextmanager
def captured(log_file: Path | None):
    """Everything written to stdout/stderr inside goes to ``log_file`` (appended); None: no capture."""
    if log_file is None:
        yield
        return
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            yield
        except BaseException as e:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            e.captured_tail = tail(log_file)
            raise
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in saved + [fd]:
            os.close(f)
        from ..secrets import redact_file

        redact_file(log_file)  # a log Fuse keeps is a file it writes: no secret in it (stages/secrets.py)


def tail(path: Path, lines: int = 8) -> list[str]:
    """The last non-empty lines of a text file (for an error message)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [line.rstrip() for line in text.replace("\r", "\n").splitlines() if line.strip()][-lines:]
