"""Load ``pipeline.yaml``: schema, defaults, ``${...}`` interpolation, ``--set`` overrides.

Every mistake becomes a :class:`~stages.findings.FuseError` that names the file, the
line and the key, and says what would be valid. The YAML is composed into nodes first
(not loaded straight to dicts) so that each value keeps its line number.

A pipeline file is input from anyone: the loader has limits (size, nesting, values after
alias expansion, tags) so that no file can make it hang, exhaust memory or raise anything
but a finding; names that become file names are bounded; and secrets may not flow into
fields that are published or name paths (see :mod:`stages.secrets`).

Only PyYAML is imported here: a pipeline error is reported before torch would load.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from . import secrets as _secrets
from .findings import FuseError
from .secrets import is_secret_name  # noqa: F401  (importable from here, as before)

REQUIRED = object()
STAGE_MODULES = ("validate", "merge", "check", "quantize", "export", "publish")  # stage name == module name in stages.steps
_VAR = re.compile(r"\$\{([^}]*)\}")
_HUB_ID = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?$")

# limits on what a pipeline file may hold: far above any real pipeline, far below harm
MAX_BYTES = 256 * 1024  # the file (a real one is a few kB; PyYAML reads ~200 kB a second)
MAX_DEPTH = 32  # nesting of lists and mappings (a real pipeline nests 5 deep)
MAX_VALUES = 10_000  # values after expanding aliases (a real pipeline: a few hundred); an alias bomb stops here
MAX_STEPS = 100  # stages, and adapters
MAX_NAME_LEN = 100  # the name and stage ids become file and directory names
# the name and stage ids: ASCII letters, digits, '.', '_', '-', starting with a letter or digit
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
RESERVED_IDS = ("manifest.json", "logs")  # <workdir>/<id>/ must not be what Fuse keeps there (.lock, .bases, ...: dot names can't pass)
# explicit tags allowed: those of plain strings, numbers, booleans, null, lists and mappings
_SAFE_TAGS = {"tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null", "seq", "map")}


@dataclass(frozen=True)
class Param:
    """One stage parameter: its type, default and allowed values."""

    type: Any  # str, int, float, bool, dict, list, or "path" (resolved against the pipeline dir)
    default: Any = REQUIRED
    choices: tuple | None = None
    help: str = ""
    published: bool = False  # the value ends up in published files or on the target: no secret may flow in

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        name = "a path" if self.type == "path" else f"a {getattr(self.type, '__name__', self.type)}"
        return name


def params_reference(names=None) -> str:
    """Every stage's parameters as markdown (type, default, allowed values, help), from the stage
    modules' ``PARAMS``: ``python -m stages params`` prints it, docs/pipeline.md embeds it."""
    out = []
    for name in names or STAGE_MODULES:
        out += [f"### `{name}`", "", "| parameter | type | default | |", "|---|---|---|---|"]
        for key, spec in stage_module(name).PARAMS.items():
            kind = "path" if spec.type == "path" else getattr(spec.type, "__name__", str(spec.type))
            default = "required" if spec.default is REQUIRED else "—" if spec.default is None else \
                f"`{str(spec.default).lower() if isinstance(spec.default, bool) else spec.default}`"
            text = spec.help.replace("|", "/")
            if spec.choices:
                text += ("; " if text else "") + "one of " + ", ".join(f"`{c}`" for c in spec.choices)
            out.append(f"| `{key}` | {kind} | {default} | {text} |")
        out.append("")
    return "\n".join(out)


COMMON_PARAMS = {
    "id": Param(str, None, help="unique id of this step (default: the stage name)"),
    "from": Param(str, None, help="id of the upstream step whose output this step reads"),
}


@dataclass
class AdapterSpec:
    path: Path
    weight: float = 1.0
    line: int | None = None


@dataclass
class StageSpec:
    id: str
    name: str
    params: dict  # resolved values, used to run and to fingerprint
    recorded: dict  # the same with ${env.*} values kept as placeholders: safe to write down
    line: int | None
    from_id: str | None = None

    @property
    def module(self):
        return stage_module(self.name)


@dataclass
class Pipeline:
    path: Path
    sha256: str
    name: str
    base: str  # a local directory, a .gguf file or a hub id (org/name[@revision])
    adapters: list[AdapterSpec]
    workdir: Path
    stages: list[StageSpec]
    recorded: dict  # the resolved configuration as it may be written down (no secrets)
    secrets: set[str] = field(default_factory=set)
    lines: dict = field(default_factory=dict)

    def stage(self, stage_id: str) -> StageSpec:
        for s in self.stages:
            if s.id == stage_id:
                return s
        raise KeyError(stage_id)

    def base_is_local(self) -> bool:
        return Path(self.base).exists()


def stage_module(name: str):
    return importlib.import_module(f"stages.steps.{name}")


def known_stages() -> tuple[str, ...]:
    return STAGE_MODULES


# --------------------------------------------------------------------------- YAML with lines


class _Refused(Exception):
    """A limit of the loader was hit while composing (raised inside PyYAML, turned into F112)."""

    def __init__(self, message: str, line: int | None, fix: str):
        super().__init__(message)
        self.message, self.line, self.fix = message, line, fix


class _Loader(yaml.SafeLoader):
    """PyYAML's safe composer, refusing tags other than the plain ones and nesting past MAX_DEPTH
    (the composer recurses: 5000 levels would be a RecursionError)."""

    def __init__(self, text: str):
        super().__init__(text)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1
        tag = getattr(event, "tag", None)
        if tag not in (None, "!") and tag not in _SAFE_TAGS:
            raise _Refused(f"the tag {_show(tag)} is not allowed", line,
                           "remove the tag: a pipeline holds plain strings, numbers, booleans, lists and mappings")
        nested = isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent))
        if nested:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise _Refused(f"lists and mappings nest deeper than {MAX_DEPTH} levels", line,
                               "flatten the structure: a pipeline nests a few levels deep")
        try:
            return super().compose_node(parent, index)
        finally:
            if nested:
                self._depth -= 1


class _Located:
    """YAML data with the line (1-based) of every mapping key and sequence item.

    Building expands aliases; it stops at MAX_VALUES values (an alias bomb), at a value that
    contains itself (``&a [*a]``) and at MAX_DEPTH levels (aliases can stack depth)."""

    def __init__(self, file: str):
        self.file = file
        self.lines: dict[tuple, int] = {}
        self._count = 0
        self._open: set[int] = set()  # collection nodes being built: meeting one again is a cycle
        self._ctor = yaml.constructor.SafeConstructor()

    def build(self, node, path=()):
        line = node.start_mark.line + 1
        self._count += 1
        if self._count > MAX_VALUES:  # named at the top-level key whose value grew past the limit
            raise FuseError("F112", f"more than {MAX_VALUES} values once aliases (*name) are expanded",
                            file=self.file, line=self.lines.get(path[:1], line), key=_fmt(path[:1]) or None,
                            fix="write the values out; an alias that repeats a large anchor multiplies it")
        if len(path) > MAX_DEPTH:
            raise FuseError("F112", f"lists and mappings nest deeper than {MAX_DEPTH} levels once aliases are expanded",
                            file=self.file, line=line, key=_fmt(path[:4]) + "...",
                            fix="flatten the structure: a pipeline nests a few levels deep")
        self.lines.setdefault(path, line)
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            if id(node) in self._open:
                raise FuseError("F112", "an alias (*name) refers to a list or mapping that contains it",
                                file=self.file, line=line, key=_fmt(path) or None,
                                fix="an anchor (&name) cannot be used inside itself: write the value out")
            self._open.add(id(node))
            try:
                return self._mapping(node, path) if isinstance(node, yaml.MappingNode) else \
                    [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
            finally:
                self._open.discard(id(node))
        try:
            return self._ctor.construct_object(node)
        except Exception:  # noqa: BLE001 - PyYAML's scalar constructors raise ValueError, KeyError...
            kind = node.tag.rsplit(":", 1)[-1]
            raise FuseError("F103", f"{_show(node.value)} is not a valid {kind}", file=self.file, line=line,
                            key=_fmt(path) or None, fix=f"write a valid {kind}, or quote the value to make it a "
                                                        "string") from None

    def _mapping(self, node, path) -> dict:
        out = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise FuseError("F103", "mapping keys must be plain strings", file=self.file,
                                line=key_node.start_mark.line + 1, key=_fmt(path) or None)
            key = key_node.value
            if key in out:
                raise FuseError("F102", f"key {_show(key)} appears twice", file=self.file,
                                line=key_node.start_mark.line + 1, key=_fmt(path + (key,)),
                                fix="keep one of them")
            self.lines[path + (key,)] = key_node.start_mark.line + 1
            out[key] = self.build(value_node, path + (key,))
        return out

    def at(self, path) -> int | None:
        path = tuple(path)
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path)


def _show(value, limit: int = 80) -> str:
    """A user's string quoted for a one-line message: secrets redacted (before escaping could hide
    them from the redactor), control characters escaped, long ones cut."""
    text = _secrets.redact(str(value))
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"'{text}'"


def _fmt(path) -> str:
    out = ""
    for p in path:
        p = p if isinstance(p, int) else _show(p, 60)[1:-1]
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _compose(text: str, file: str) -> tuple[Any, _Located]:
    loader = None
    try:
        loader = _Loader(text)  # the reader refuses control characters here already
        node = loader.get_single_node()
    except _Refused as e:
        raise FuseError("F112", e.message, file=file, line=e.line, fix=e.fix) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise FuseError("F101", f"{e.problem or e}".strip(), file=file, line=line,
                        fix="fix the YAML syntax at that line (indentation, quotes, ':' after keys)") from None
    except yaml.reader.ReaderError as e:
        raise FuseError("F101", f"character {e.character:#06x} is not allowed in YAML", file=file,
                        line=text.count("\n", 0, max(e.position, 0)) + 1,
                        fix="remove the control character (save the file as plain UTF-8 text)") from None
    except yaml.YAMLError as e:
        raise FuseError("F101", str(e).splitlines()[0], file=file) from None
    except RecursionError:  # a limit above should have stopped it first
        raise FuseError("F112", "the YAML nests too deeply", file=file,
                        fix="flatten the structure: a pipeline nests a few levels deep") from None
    finally:
        if loader is not None:
            loader.dispose()
    located = _Located(file)
    if node is None:
        raise FuseError("F104", "the pipeline file is empty", file=file, line=1,
                        fix="start from the README's example")
    return located.build(node), located


# --------------------------------------------------------------------------- interpolation


def secret_env_values() -> set[str]:
    return _secrets.env_values()


class _Interpolator:
    """Expands ``${name}``, ``${env.VAR}`` and ``${pkg.MODULE}`` in strings.

    Values that came from the environment are written down as their placeholder; those of
    secret-looking variables (tokens, keys, passwords) are also redacted from logs.
    """

    def __init__(self, top: dict, located: _Located):
        self.top = top
        self.located = located
        self.secrets: set[str] = set()

    def expand(self, value, path, no_secret: str | None = None):
        """(value to use, value to write down). ``no_secret``: why no secret may flow into this field
        (:data:`PUBLISHED`, :data:`A_PATH`); such a use is F113."""
        if no_secret and isinstance(value, str):
            _refuse_secret(value, path, self.located, no_secret)
        if not isinstance(value, str) or "${" not in value:
            return value, value

        def sub(m):
            expr = m.group(1).strip()
            if expr.startswith("env."):
                var = expr[4:]
                if var not in os.environ:
                    raise FuseError("F110", f"environment variable {var} is not set", file=self.located.file,
                                    line=self.located.at(path), key=_fmt(path),
                                    fix=f"export {var}=... before running, or remove ${{env.{var}}}")
                val = os.environ[var]
                if val and is_secret_name(var):
                    if no_secret:
                        raise _secret_here(f"${{env.{var}}} is a secret", path, self.located, no_secret)
                    self.secrets.add(val)
                return val
            if expr.startswith("pkg."):
                return self._package_dir(expr[4:], path)
            if expr in ("name",) and isinstance(self.top.get(expr), str):
                return self.top[expr]
            raise FuseError("F110", f"unknown variable ${{{_show(expr)[1:-1]}}}", file=self.located.file,
                            line=self.located.at(path), key=_fmt(path),
                            fix="use ${name}, ${env.VAR} or ${pkg.MODULE}")

        resolved = _VAR.sub(sub, value)
        if no_secret:  # a non-secret-named variable whose value is a secret all the same
            _refuse_secret(resolved, path, self.located, no_secret)
        # what may be written down: env values stay as their placeholder
        recorded = value if "${env." in value else resolved
        return resolved, recorded

    def _package_dir(self, module: str, path) -> str:
        spec = None
        if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module):
            try:
                spec = importlib.util.find_spec(module)
            except Exception:  # noqa: BLE001 - find_spec imports parent packages, which may raise anything
                spec = None
        if spec is None or not spec.submodule_search_locations:
            raise FuseError("F110", f"Python package {_show(module)} is not installed", file=self.located.file,
                            line=self.located.at(path), key=_fmt(path),
                            fix="pip install the distribution that provides it")
        return str(Path(list(spec.submodule_search_locations)[0]))


PUBLISHED = "ends up in the published model (card, provenance, target name or commit)"
A_PATH = "is a path (paths are printed, and written in logs, reports and the manifest)"


def _secret_here(what: str, path, located, why: str) -> FuseError:
    return FuseError("F113", f"{what}, and {_fmt(path)} {why}", file=located.file, line=located.at(path),
                     key=_fmt(path), fix="pass credentials through the environment (HF_TOKEN, AWS_ACCESS_KEY_ID/"
                                         "AWS_SECRET_ACCESS_KEY: the publisher reads them), never through a "
                                         "field; if the value is not a secret, give the variable a name that "
                                         "does not look secret")


def _refuse_secret(value: str, path, located, why: str) -> None:
    """A field whose text holds the value of a secret-named variable, however it got there."""
    names = _secrets.env_secret_vars(value)
    if names:
        raise _secret_here("the value holds that of " + ", ".join(names) + " (a secret)", path, located, why)


def _no_secret(spec: Param) -> str | None:
    return PUBLISHED if spec.published else A_PATH if spec.type == "path" else None


# --------------------------------------------------------------------------- loading


TOP_KEYS = {
    "version": Param(int, 1, choices=(1,)),
    "name": Param(str, published=True),
    "base": Param(str, help="local model directory, .gguf file, or hub id org/name[@revision]", published=True),
    "adapter": Param(str, None, help="adapter directory", published=True),  # its directory name is in the card
    "adapters": Param(list, None, help="list of {path, weight}", published=True),
    "workdir": Param(str, "runs/${name}"),
    "stages": Param(list),
}


def load(path: str | os.PathLike, overrides: list[str] | tuple = ()) -> Pipeline:
    """Read and check a pipeline file. ``overrides`` are ``--set id.param=value`` strings."""
    path = Path(path)
    file = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)  # never more: /dev/zero or a 10 GB file is refused, not read
    except FileNotFoundError:
        raise FuseError("F105", "pipeline file not found", file=file,
                        fix="pass the path of an existing pipeline.yaml") from None
    except (OSError, ValueError) as e:
        raise FuseError("F105", f"cannot read the pipeline file: {getattr(e, 'strerror', None) or e}",
                        file=file, fix="pass the path of a readable pipeline.yaml") from None
    if len(raw) > MAX_BYTES:
        raise FuseError("F112", f"the pipeline file is larger than {MAX_BYTES // 1024} KiB", file=file,
                        fix="a pipeline is a few kB: keep data (prompts, calibration texts) in files it names")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FuseError("F101", f"not UTF-8 text (byte {e.start})", file=file, fix="save the file as UTF-8") from None
    data, located = _compose(text, file)
    if not isinstance(data, dict):
        raise FuseError("F103", "the pipeline file must be a mapping of keys (name, base, adapter, stages, ...)",
                        file=file, line=1)
    here = path.resolve().parent

    _check_keys(data, TOP_KEYS, (), located)
    for key, spec in TOP_KEYS.items():
        if spec.default is REQUIRED and key not in data:
            raise FuseError("F104", f"missing required key '{key}'", file=file, line=1, key=key,
                            fix=f"add '{key}:' ({spec.help or spec.describe()})")
    if "adapter" in data and "adapters" in data:
        raise FuseError("F103", "give either 'adapter' or 'adapters', not both", file=file,
                        line=located.at(("adapters",)), key="adapters")
    for key in ("version", "name", "base", "workdir", "adapter"):
        if key in data:
            _check_type(data[key], TOP_KEYS[key], (key,), located)

    interp = _Interpolator(data, located)
    name, _ = interp.expand(data["name"], ("name",), PUBLISHED)
    _check_name(name, ("name",), located, what="name", example="smollm2-support-v2")
    interp.top = dict(data, name=name)

    base, base_rec = interp.expand(data["base"], ("base",), PUBLISHED)
    _check_path_text(base, ("base",), located)
    base = _resolve_base(base, here, located)
    adapters = _load_adapters(data, here, interp, located)
    workdir_s, _ = interp.expand(data.get("workdir", TOP_KEYS["workdir"].default), ("workdir",), A_PATH)
    _check_path_text(workdir_s, ("workdir",), located)
    workdir = Path(workdir_s) if os.path.isabs(workdir_s) else _resolve(Path(workdir_s), here, ("workdir",), located)

    stages = _load_stages(data["stages"], here, interp, located)
    _apply_overrides(stages, overrides, here, interp, located)
    _link_stages(stages, located)
    for s in stages:  # cross-parameter rules a stage declares (e.g. publish to: hub needs repo_id)
        check = getattr(s.module, "check_params", None)
        if not check:
            continue
        try:
            check(SimpleNamespace(params=s.params, stage=s, pipeline=SimpleNamespace(path=path.resolve())))
        except (OSError, ValueError) as e:  # a parameter names a path the system refuses (too long, NUL byte)
            what = getattr(e, "strerror", None) or str(e)
            raise FuseError("F103", f"a parameter of stage '{s.id}' cannot be used: {_show(what, 120)[1:-1]}"
                            + (f" ({_show(e.filename)})" if getattr(e, "filename", None) else ""),
                            file=file, line=s.line, key=s.id, fix="give a path the file system can hold") from None

    recorded = {
        "version": data.get("version", 1),
        "name": name,
        "base": base_rec if "${env." in str(data["base"]) else base,
        "adapters": [{"path": str(a.path), "weight": a.weight} for a in adapters],
        "workdir": str(workdir),
        "stages": [{"id": s.id, "stage": s.name, "from": s.from_id, "params": s.recorded} for s in stages],
    }
    return Pipeline(path=path.resolve(), sha256=hashlib.sha256(raw).hexdigest(), name=name, base=base,
                    adapters=adapters, workdir=workdir, stages=stages, recorded=recorded,
                    secrets=interp.secrets, lines=located.lines)


def _check_name(value: str, path, located, what: str, example: str) -> None:
    """A name that becomes a file or directory name (the workdir's default, a step's output dir)."""
    if len(value) > MAX_NAME_LEN:
        raise FuseError("F103", f"{what} is {len(value)} characters long; at most {MAX_NAME_LEN}", file=located.file,
                        line=located.at(path), key=_fmt(path), fix=f"use a shorter {what}, like {example}")
    if not _NAME.fullmatch(value):
        raise FuseError("F103", f"{what} {_show(value)} must be ASCII letters, digits, '.', '_' or '-', starting "
                                "with a letter or digit", file=located.file, line=located.at(path), key=_fmt(path),
                        fix=f"use a {what} like {example}")


def _check_path_text(value: str, path, located) -> None:
    """A path the OS would refuse (NUL byte, a component past 255 bytes) is a finding, not an OSError."""
    problem = None
    if "\0" in value:
        problem = "contains a NUL character"
    elif len(value.encode("utf-8", "surrogatepass")) > 4000:
        problem = "is longer than 4000 bytes"
    elif any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in value.split("/")):
        problem = "has a file or directory name longer than 255 bytes"
    if problem:
        raise FuseError("F103", f"path {_show(value)} {problem}", file=located.file, line=located.at(path),
                        key=_fmt(path), fix="give a path the file system can hold")


def _resolve(p: Path, here: Path, path, located) -> Path:
    """Absolute, symlinks resolved; relative paths against the pipeline file's directory."""
    try:
        return (p if p.is_absolute() else here / p).resolve()
    except (OSError, RuntimeError, ValueError) as e:
        raise FuseError("F105", f"path {_show(p)} cannot be resolved: {getattr(e, 'strerror', None) or e}",
                        file=located.file, line=located.at(path), key=_fmt(path),
                        fix="give a path without symlink loops") from None


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except (OSError, ValueError):  # a parent that cannot be searched, an over-long name
        return False


def _resolve_base(base: str, here: Path, located: _Located) -> str:
    local = Path(base) if os.path.isabs(base) else here / base
    if _exists(local):
        return str(_resolve(local, here, ("base",), located))
    hub = _HUB_ID.match(base)
    explicit_local = base.startswith((".", "/", "~")) or base.count("/") != 1
    if hub and not explicit_local:
        return base  # a hub id, resolved to a commit when the run starts
    raise FuseError("F105", f"base {_show(base)} does not exist", file=located.file, line=located.at(("base",)),
                    key="base", fix="give a local model directory (relative to the pipeline file), "
                                    "a .gguf file, or a hub id like org/name@revision")


def _load_adapters(data, here, interp, located) -> list[AdapterSpec]:
    file = located.file
    if "adapter" in data and data["adapter"] is not None:
        items = [{"path": data["adapter"]}]
        paths = [("adapter",)]
    elif data.get("adapters") is not None:
        if not isinstance(data["adapters"], list) or not data["adapters"]:
            raise FuseError("F103", "'adapters' must be a non-empty list of {path, weight}", file=file,
                            line=located.at(("adapters",)), key="adapters")
        if len(data["adapters"]) > MAX_STEPS:
            raise FuseError("F103", f"{len(data['adapters'])} adapters; at most {MAX_STEPS}", file=file,
                            line=located.at(("adapters",)), key="adapters", fix="combine fewer adapters per pipeline")
        items, paths = [], []
        for i, item in enumerate(data["adapters"]):
            if isinstance(item, str):
                item = {"path": item}
            if not isinstance(item, dict):
                raise FuseError("F103", "each adapter must be a path or {path, weight}", file=file,
                                line=located.at(("adapters", i)), key=f"adapters[{i}]")
            _check_keys(item, {"path": Param(str), "weight": Param(float, 1.0)}, ("adapters", i), located)
            items.append(item)
            paths.append(("adapters", i, "path") if "path" in item else ("adapters", i))
    else:
        raise FuseError("F104", "missing required key 'adapter'", file=file, line=1, key="adapter",
                        fix="add 'adapter: path/to/adapter' (the directory with adapter_config.json)")
    out = []
    for item, p in zip(items, paths):
        if "path" not in item:
            raise FuseError("F104", "adapter entry has no 'path'", file=file, line=located.at(p), key=_fmt(p))
        _check_type(item["path"], Param(str), p, located)
        value, _ = interp.expand(item["path"], p, PUBLISHED)  # the directory's name is in the card
        _check_path_text(value, p, located)
        full = Path(value) if os.path.isabs(value) else here / value
        if not _exists(full):
            raise FuseError("F105", f"adapter {_show(value)} does not exist", file=file, line=located.at(p),
                            key=_fmt(p), fix="give the adapter directory (with adapter_config.json), "
                                             "relative to the pipeline file")
        weight = item.get("weight", 1.0)
        weight = _check_type(weight, Param(float), p[:-1] + ("weight",), located)
        if not math.isfinite(weight):
            raise FuseError("F103", f"weight {weight} is not a finite number", file=file,
                            line=located.at(p[:-1] + ("weight",)), key=_fmt(p[:-1] + ("weight",)),
                            fix="give a number like 1.0 or 0.5")
        out.append(AdapterSpec(path=_resolve(full, here, p, located), weight=float(weight), line=located.at(p)))
    return out


def _load_stages(items, here, interp, located) -> list[StageSpec]:
    file = located.file
    if not isinstance(items, list) or not items:
        raise FuseError("F103", "'stages' must be a non-empty list", file=file, line=located.at(("stages",)),
                        key="stages", fix="e.g. stages: [validate, merge, publish]")
    if len(items) > MAX_STEPS:
        raise FuseError("F103", f"{len(items)} stages; at most {MAX_STEPS}", file=file, line=located.at(("stages",)),
                        key="stages", fix="split the work into several pipelines")
    out, seen = [], {}
    for i, item in enumerate(items):
        path = ("stages", i)
        if isinstance(item, str):
            name, params = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            name, params = next(iter(item.items()))
            params = {} if params is None else params
            path = path + (name,)
            if not isinstance(params, dict):
                raise FuseError("F103", f"parameters of {_show(name)} must be a mapping", file=file,
                                line=located.at(path), key=_fmt(path),
                                fix=f"e.g. - {_show(name)[1:-1]}: {{key: value}}")
        else:
            raise FuseError("F103", "a stage is a name or a one-key mapping {name: {params}}", file=file,
                            line=located.at(path), key=_fmt(path), fix="e.g. - merge: {dtype: bfloat16}")
        if name not in STAGE_MODULES:
            raise FuseError("F107", f"unknown stage {_show(name)}", file=file, line=located.at(path), key=_fmt(path),
                            fix=_suggest(name, STAGE_MODULES, "stage"))
        module = stage_module(name)
        schema = {**COMMON_PARAMS, **module.PARAMS}
        _check_keys(params, schema, path, located)
        resolved, recorded = {}, {}
        for key, spec in module.PARAMS.items():
            p = path + (key,)
            if key in params:
                value, rec = _resolve_value(params[key], spec, p, here, interp, located)
            elif spec.default is REQUIRED:
                raise FuseError("F104", f"stage '{name}' needs '{key}'", file=file, line=located.at(path),
                                key=_fmt(p), fix=f"add {key}: ({spec.help or spec.describe()})")
            else:
                value = rec = spec.default
            resolved[key], recorded[key] = value, rec
        sid = params.get("id", name)
        _check_type(sid, Param(str), path + ("id",), located)
        _check_name(sid, path + ("id",) if "id" in params else path, located, what="stage id", example=f"{name}-2")
        if sid.lower() in RESERVED_IDS:
            raise FuseError("F103", f"stage id {_show(sid)} is an entry Fuse keeps in the workdir", file=file,
                            line=located.at(path + ("id",)), key=_fmt(path + ("id",)), fix=f"use id: {name}-2")
        if sid.lower() in seen:  # merge and Merge would share a directory where case does not count (macOS)
            raise FuseError("F106", f"stage id {_show(sid)} is used twice (first at line {seen[sid.lower()]})",
                            file=file, line=located.at(path), key=_fmt(path),
                            fix=f"give one of them its own id, e.g. id: {sid}-2")
        seen[sid.lower()] = located.at(path)
        from_id = params.get("from")
        if from_id is not None:
            _check_type(from_id, Param(str), path + ("from",), located)
        out.append(StageSpec(id=sid, name=name, params=resolved, recorded=recorded,
                             line=located.at(path), from_id=from_id))
    return out


def _resolve_value(value, spec: Param, path, here, interp, located):
    value, recorded = interp.expand(value, path, _no_secret(spec))
    value = _check_type(value, spec, path, located)
    if spec.type == "path" and value is not None:
        _check_path_text(value, path, located)
        value = str(_resolve(Path(os.path.expanduser(value)), here, path, located))
    if "${env." not in str(recorded):
        recorded = value
    return value, recorded


def _check_keys(data: dict, schema: dict, path, located):
    for key in data:
        if key not in schema:
            raise FuseError("F102", f"unknown key {_show(key)}", file=located.file, line=located.at(path + (key,)),
                            key=_fmt(path + (key,)), fix=_suggest(key, list(schema), "key"))


def _check_type(value, spec: Param, path, located):
    """Check (and coerce int→float) one value; return it."""
    want = str if spec.type == "path" else spec.type
    ok = isinstance(value, want)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value, ok = float(value), True
        except OverflowError:  # an int past 1e308
            ok = False
    if want is float and isinstance(value, str):  # YAML 1.1 reads a bare 1e-12 as a string
        try:
            value, ok = float(value), True
        except ValueError:
            pass
    if want is int and isinstance(value, bool):
        ok = False
    if want is float and ok and math.isnan(value):
        ok = False
    if value is None and spec.default is None:
        ok = True
    if not ok:
        got = type(value).__name__ if value is not None else "nothing"
        raise FuseError("F103", f"expected {spec.describe()}, got {got} {_show_value(value)}", file=located.file,
                        line=located.at(path), key=_fmt(path))
    if spec.choices and value not in spec.choices:
        raise FuseError("F103", f"{_show_value(value)} is not allowed", file=located.file, line=located.at(path),
                        key=_fmt(path), fix=f"use {spec.describe()}")
    return value


def _show_value(value) -> str:
    """A value of any type for a message: strings as :func:`_show`, others as repr, cut to one short line."""
    return _show(value) if isinstance(value, str) else _show(repr(value))[1:-1]


def _suggest(word: str, options, what: str) -> str:
    close = difflib.get_close_matches(str(word)[:100], [str(o) for o in options], n=1)
    valid = ", ".join(str(o) for o in options)
    return (f"did you mean '{close[0]}'? " if close else "") + f"valid {what}s: {valid}"


def _set_value(text: str):
    """The value of ``--set id.param=TEXT``: YAML with the file's limits, else the text itself."""
    if text == "":
        return ""
    try:
        return _compose(text, "--set")[0]
    except FuseError:
        return text


def _apply_overrides(stages: list[StageSpec], overrides, here, interp, located):
    for text in overrides:
        # a value typed (or expanded by the shell: --set x.y=$MY_TOKEN) that is a secret-named variable's value
        # is read as ${env.VAR}: recorded as the placeholder, never printed, refused in a path or published field
        text = _secrets.as_placeholders(text)
        m = re.fullmatch(r"([\w.-]+?)\.([\w-]+)=(.*)", text, re.S)
        if not m:
            raise FuseError("F109", f"cannot read --set {_show(text)}", file="--set",
                            fix="write --set <stage id>.<param>=<value>, e.g. --set merge.dtype=float16")
        sid, key, raw_value = m.groups()
        shown = _show(text)[1:-1]
        target = next((s for s in stages if s.id == sid), None)
        if target is None:
            raise FuseError("F109", f"--set names stage id {_show(sid)}, which is not in the pipeline", file="--set",
                            key=shown, fix=_suggest(sid, [s.id for s in stages], "stage id"))
        schema = target.module.PARAMS
        if key not in schema:
            raise FuseError("F109", f"stage '{target.name}' has no parameter {_show(key)}", file="--set", key=shown,
                            fix=_suggest(key, list(schema), "parameter"))
        value = _set_value(raw_value)
        if schema[key].type in (str, "path") and not isinstance(value, str) and value is not None:
            value = raw_value
        sub = _Located("--set")
        sub.lines[()] = None
        try:
            value, rec = _resolve_value(value, schema[key], (sid, key), here, interp, sub)
        except FuseError as e:
            f = e.finding
            raise FuseError("F113" if f.code == "F113" else "F109", f"--set {shown}: {f.message}", file="--set",
                            key=shown, fix=f.fix) from None
        target.params[key], target.recorded[key] = value, rec


def _link_stages(stages: list[StageSpec], located):
    """Check ``from:`` references and that each stage that needs an input has one upstream."""
    for i, s in enumerate(stages):
        before = stages[:i]
        if s.from_id is not None:
            if s.from_id not in [b.id for b in before]:
                raise FuseError("F108", f"'from: {_show(s.from_id)[1:-1]}' names no earlier stage", file=located.file,
                                line=s.line, key=f"{s.id}.from",
                                fix=_suggest(s.from_id, [b.id for b in before], "earlier stage id"))
            up = next(b for b in before if b.id == s.from_id)
            if not accepts(s, up):
                raise FuseError("F108", f"stage '{s.id}' cannot read the output of '{up.id}' "
                                        f"({up.module.OUTPUT}; it accepts {', '.join(s.module.INPUT)})",
                                file=located.file, line=s.line, key=f"{s.id}.from")
        elif s.module.INPUT and upstream_of(s, before) is None:
            raise FuseError("F108", f"stage '{s.id}' needs an earlier stage that produces "
                                    f"{' or '.join(s.module.INPUT)}", file=located.file, line=s.line,
                            key=s.id, fix="add a merge stage before it")


def accepts(stage: StageSpec, upstream: StageSpec) -> bool:
    return bool(stage.module.INPUT) and upstream.module.OUTPUT in stage.module.INPUT


def upstream_of(stage: StageSpec, stages: list[StageSpec]) -> StageSpec | None:
    """The step whose output ``stage`` reads: ``from:`` if given, else the nearest earlier one it accepts."""
    before = stages[: stages.index(stage)] if stage in stages else stages
    if stage.from_id:
        return next((b for b in before if b.id == stage.from_id), None)
    for up in reversed(before):
        if accepts(stage, up):
            return up
    return None
