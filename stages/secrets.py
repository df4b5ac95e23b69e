"""The one redaction rule: which values are secrets, and how they are kept out of every exit.

A *secret* is

- the value of an environment variable whose name looks secret (:func:`is_secret_name`:
  ``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ``DB_PASSWORD``...), whether or not the pipeline
  uses it, and
- a credential a publisher found somewhere else (a token file, ``~/.aws/credentials``),
  handed to :func:`remember`.

Every such value of at least :data:`MIN_SECRET_LEN` characters (and each line of a
multi-line value) is replaced by :data:`PLACEHOLDER` in every line Fuse prints (the CLI's
streams pass through :class:`RedactingStream`; findings redact when rendered), and in
every file it writes (manifest, library logs it keeps, model card, provenance, job summary).
Where a secret would be published or become a path, the pipeline loader refuses it (F113).

Why 6: every common flag word (``1``, ``0``, ``true``, ``false``, ``yes``, ``none``, ``auto``)
is at most 5 characters long, and secret-named variables often hold one
(``HF_HUB_DISABLE_IMPLICIT_TOKEN=1``); replacing ``true`` or ``1`` everywhere would mangle
every log and record. Every real credential format is far longer (Hugging Face tokens 37
characters, AWS keys 20 and 40, GitHub tokens 40), so nothing real is missed.
"""
from __future__ import annotations

import io
import os
import re

PLACEHOLDER = "***"
MIN_SECRET_LEN = 6

# a whole word of the variable name: HF_TOKEN, AWS_SECRET_ACCESS_KEY, DB_PASSWORD; not TOKENIZERS_PARALLELISM
_SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIALS?|AUTH)"
                          r"(_|$)", re.I)
# ...unless the variable names where a secret is kept, not the secret (HF_TOKEN_PATH, AWS_SHARED_CREDENTIALS_FILE)
_LOCATION = re.compile(r"_(PATH|FILE|DIR)$", re.I)

_remembered: set[str] = set()


def is_secret_name(var: str) -> bool:
    """Environment variables whose values are never printed or written (HF_TOKEN, AWS_SECRET_ACCESS_KEY...)."""
    return bool(_SECRET_NAME.search(var)) and not _LOCATION.search(var)


def env_values(environ=None) -> set[str]:
    """Non-empty values of secret-named environment variables."""
    environ = os.environ if environ is None else environ
    return {v for k, v in environ.items() if v and is_secret_name(k)}


def env_secret_vars(value: str, environ=None) -> list[str]:
    """Names of secret-named environment variables whose (redactable) value occurs in ``value``."""
    environ = os.environ if environ is None else environ
    return sorted(k for k, v in environ.items()
                  if is_secret_name(k) and any(s in value for s in _pieces(v)))


def as_placeholders(text: str, environ=None) -> str:
    """``text`` with each secret-named variable's value written as ``${env.VAR}`` (a ``--set`` value
    the shell expanded from ``$MY_TOKEN`` is read as if the user had written the placeholder)."""
    environ = os.environ if environ is None else environ
    found = [(p, k) for k, v in environ.items() if v and is_secret_name(k) for p in _pieces(v) if p in text]
    for piece, var in sorted(found, key=lambda pv: (-len(pv[0]), pv[1])):
        text = text.replace(piece, "${env.%s}" % var)
    return text


def remember(values) -> None:
    """Credentials found outside the environment (a token file): redacted from here on, in this process."""
    _remembered.update(v for v in values if v)


def known() -> set[str]:
    return env_values() | _remembered


def _pieces(value: str) -> list[str]:
    """What of one secret is redacted: the value, and each line of a multi-line one."""
    out = {value, value.strip()} | {line.strip() for line in value.splitlines()}
    return [p for p in out if len(p) >= MIN_SECRET_LEN]


def redactable(secrets=()) -> list[str]:
    """The strings to replace, longest first (so that a secret containing another goes whole)."""
    out = set()
    for s in set(secrets) | known():
        if isinstance(s, str):
            out.update(_pieces(s))
    return sorted(out, key=lambda s: (-len(s), s))


def _apply(text: str, pieces) -> str:
    for s in pieces:
        if s in text:
            text = text.replace(s, PLACEHOLDER)
    return text


def redact(text: str, secrets=()) -> str:
    """``text`` with every secret (``secrets`` and all :func:`known` ones) replaced by the placeholder."""
    return _apply(str(text), redactable(secrets))


def redact_data(obj, secrets=()):
    """:func:`redact` applied to every string (keys too) of a JSON-like structure, so that JSON stays valid."""
    pieces = redactable(secrets)
    if not pieces:
        return obj

    def walk(o):
        if isinstance(o, str):
            return _apply(o, pieces)
        if isinstance(o, dict):
            return {walk(k): walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v) for v in o]
        return o

    return walk(obj)


def redact_file(path) -> None:
    """Rewrite a text file a library wrote for Fuse (a log it captured) with its secrets redacted."""
    pieces = redactable()
    if not pieces:
        return
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
        clean = _apply(text, pieces)
        if clean != text:
            with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
                f.write(clean)
    except OSError:
        pass


MASK_COMMAND = "::add-mask::"  # GitHub Actions' own masking: the one line that must carry the value


def _redact_lines(text: str) -> str:
    if MASK_COMMAND not in text:
        return redact(text)
    return "".join(line if line.startswith(MASK_COMMAND) else redact(line) for line in text.splitlines(True))


class RedactingStream(io.TextIOBase):
    """A text stream that redacts secrets line by line before passing the text on.

    Text is held back until a line ends (``\\n`` or ``\\r``) so that a secret written in two
    pieces is still caught; :meth:`flush` passes on what is held. A GitHub Actions
    ``::add-mask::`` line passes as it is: it is how the runner learns what to hide.
    """

    def __init__(self, stream):
        self.stream = stream
        self._held = ""

    def write(self, s) -> int:
        self._held += s
        cut = max(self._held.rfind("\n"), self._held.rfind("\r"))
        if cut >= 0 or len(self._held) > 1 << 16:
            end = cut + 1 if cut >= 0 else len(self._held)
            done, self._held = self._held[:end], self._held[end:]
            self.stream.write(_redact_lines(done))
        return len(s)

    def flush(self) -> None:
        if self._held:
            held, self._held = self._held, ""
            self.stream.write(_redact_lines(held))
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")

    @property
    def errors(self):
        return getattr(self.stream, "errors", "strict")
