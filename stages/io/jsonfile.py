"""Read a JSON file as a finding-raising operation (configs, indexes, adapter configs)."""
from __future__ import annotations

import json
from pathlib import Path

from stages.findings import FuseError


def read_json(path, code: str, *, fix: str | None = None):
    """The file's data; a missing, unreadable, non-UTF-8, invalid or absurdly nested file is one finding naming it
    (and the line): never a traceback, whatever the bytes."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise FuseError(code, f"{path.name} cannot be read: {e.strerror or e}", file=path, fix=fix) from None
    except UnicodeDecodeError as e:
        raise FuseError(code, f"{path.name} is not UTF-8 text ({e.reason} at byte {e.start})", file=path,
                        fix=fix) from None
    except json.JSONDecodeError as e:
        raise FuseError(code, f"{path.name} is not valid JSON: {e.msg}", file=path, line=e.lineno, fix=fix) from None
    except RecursionError:  # the decoder recurses per nesting level: thousands of '[' exhaust the stack
        raise FuseError(code, f"{path.name} nests too deeply to be a configuration file", file=path, fix=fix) from None
    except ValueError as e:  # an integer past Python's digit limit (sys.get_int_max_str_digits)
        raise FuseError(code, f"{path.name} is not usable JSON: {str(e).split(';')[0][:120]}", file=path,
                        fix=fix) from None
