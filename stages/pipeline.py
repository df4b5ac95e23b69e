"""Load ``pipeline.yaml``: schema, defaults, ``${...}`` interpolation, ``--set`` overrides.

Every mistake becomes a :class:`~stages.findings.FuseError` that names the file, the
line and the key, and says what would be valid. The YAML is composed into nodes first
(not loaded straight to dicts) so that each value keeps its line number.

Only PyYAML is imported here: a pipeline error is reported before torch would load.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from .findings import FuseError

REQUIRED = object()
STAGE_MODULES = ("validate", "merge", "check", "quantize", "export", "publish")  # stage name == module name in stages.steps
_VAR = re.compile(r"\$\{([^}]*)\}")
_HUB_ID = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?$")


@dataclass(frozen=True)
class Param:
    """One stage parameter: its type, default and allowed values."""

    type: Any  # str, int, float, bool, dict, list, or "path" (resolved against the pipeline dir)
    default: Any = REQUIRED
    choices: tuple | None = None
    help: str = ""

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


class _Located:
    """YAML data with the line (1-based) of every mapping key and sequence item."""

    def __init__(self, file: str):
        self.file = file
        self.lines: dict[tuple, int] = {}

    def build(self, node, path=()):
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise FuseError("F103", "mapping keys must be plain strings", file=self.file,
                                    line=key_node.start_mark.line + 1, key=_fmt(path))
                key = key_node.value
                if key in out:
                    raise FuseError("F102", f"key '{key}' appears twice", file=self.file,
                                    line=key_node.start_mark.line + 1, key=_fmt(path + (key,)),
                                    fix="keep one of them")
                self.lines[path + (key,)] = key_node.start_mark.line + 1
                out[key] = self.build(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        return yaml.SafeLoader("").construct_object(node) if node.tag else node.value

    def at(self, path) -> int | None:
        path = tuple(path)
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path)


def _fmt(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _compose(text: str, file: str) -> tuple[Any, _Located]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise FuseError("F101", f"{e.problem or e}".strip(), file=file, line=line,
                        fix="fix the YAML syntax at that line (indentation, quotes, ':' after keys)") from None
    except yaml.YAMLError as e:
        raise FuseError("F101", str(e).splitlines()[0], file=file) from None
    located = _Located(file)
    if node is None:
        raise FuseError("F104", "the pipeline file is empty", file=file, line=1,
                        fix="start from the README's example")
    return located.build(node), located


# --------------------------------------------------------------------------- interpolation


# a whole word of the variable name: HF_TOKEN, AWS_SECRET_ACCESS_KEY, DB_PASSWORD; not TOKENIZERS_PARALLELISM
_SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIALS?|AUTH)"
                          r"(_|$)", re.I)


def is_secret_name(var: str) -> bool:
    """Environment variables whose values are never printed or written (HF_TOKEN, AWS_SECRET_ACCESS_KEY...)."""
    return bool(_SECRET_NAME.search(var))


def secret_env_values() -> set[str]:
    return {v for k, v in os.environ.items() if v and is_secret_name(k)}


class _Interpolator:
    """Expands ``${name}``, ``${env.VAR}`` and ``${pkg.MODULE}`` in strings.

    Values that came from the environment are written down as their placeholder; those of
    secret-looking variables (tokens, keys, passwords) are also redacted from logs.
    """

    def __init__(self, top: dict, located: _Located):
        self.top = top
        self.located = located
        self.secrets: set[str] = set()

    def expand(self, value, path):
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
                    self.secrets.add(val)
                return val
            if expr.startswith("pkg."):
                return self._package_dir(expr[4:], path)
            if expr in ("name",) and isinstance(self.top.get(expr), str):
                return self.top[expr]
            raise FuseError("F110", f"unknown variable ${{{expr}}}", file=self.located.file,
                            line=self.located.at(path), key=_fmt(path),
                            fix="use ${name}, ${env.VAR} or ${pkg.MODULE}")

        resolved = _VAR.sub(sub, value)
        # what may be written down: env values stay as their placeholder
        recorded = value if "${env." in value else resolved
        return resolved, recorded

    def _package_dir(self, module: str, path) -> str:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise FuseError("F110", f"Python package '{module}' is not installed", file=self.located.file,
                            line=self.located.at(path), key=_fmt(path),
                            fix=f"pip install the distribution that provides '{module}'")
        return str(Path(list(spec.submodule_search_locations)[0]))


# --------------------------------------------------------------------------- loading


TOP_KEYS = {
    "version": Param(int, 1, choices=(1,)),
    "name": Param(str),
    "base": Param(str, help="local model directory, .gguf file, or hub id org/name[@revision]"),
    "adapter": Param(str, None, help="adapter directory"),
    "adapters": Param(list, None, help="list of {path, weight}"),
    "workdir": Param(str, "runs/${name}"),
    "stages": Param(list),
}


def load(path: str | os.PathLike, overrides: list[str] | tuple = ()) -> Pipeline:
    """Read and check a pipeline file. ``overrides`` are ``--set id.param=value`` strings."""
    path = Path(path)
    file = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FuseError("F105", "pipeline file not found", file=file,
                        fix="pass the path of an existing pipeline.yaml") from None
    except OSError as e:
        raise FuseError("F105", f"cannot read the pipeline file: {e.strerror}", file=file) from None
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
    name, _ = interp.expand(data["name"], ("name",))
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
        raise FuseError("F103", f"name '{name}' must be letters, digits, '.', '_' or '-'", file=file,
                        line=located.at(("name",)), key="name", fix="use a name like smollm2-support-v2")
    interp.top = dict(data, name=name)

    base, base_rec = interp.expand(data["base"], ("base",))
    base = _resolve_base(base, here, located)
    adapters = _load_adapters(data, here, interp, located)
    workdir_s, _ = interp.expand(data.get("workdir", TOP_KEYS["workdir"].default), ("workdir",))
    workdir = (here / workdir_s).resolve() if not os.path.isabs(workdir_s) else Path(workdir_s)

    stages = _load_stages(data["stages"], here, interp, located)
    _apply_overrides(stages, overrides, here, interp, located)
    _link_stages(stages, located)
    for s in stages:  # cross-parameter rules a stage declares (e.g. publish to: hub needs repo_id)
        check = getattr(s.module, "check_params", None)
        if check:
            check(SimpleNamespace(params=s.params, stage=s, pipeline=SimpleNamespace(path=path.resolve())))

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


def _resolve_base(base: str, here: Path, located: _Located) -> str:
    local = Path(base) if os.path.isabs(base) else here / base
    if local.exists():
        return str(local.resolve())
    hub = _HUB_ID.match(base)
    explicit_local = base.startswith((".", "/", "~")) or base.count("/") != 1
    if hub and not explicit_local:
        return base  # a hub id, resolved to a commit when the run starts
    raise FuseError("F105", f"base '{base}' does not exist", file=located.file, line=located.at(("base",)),
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
        value, _ = interp.expand(item["path"], p)
        full = Path(value) if os.path.isabs(value) else here / value
        if not full.exists():
            raise FuseError("F105", f"adapter '{value}' does not exist", file=file, line=located.at(p),
                            key=_fmt(p), fix="give the adapter directory (with adapter_config.json), "
                                             "relative to the pipeline file")
        weight = item.get("weight", 1.0)
        _check_type(weight, Param(float), p[:-1] + ("weight",), located)
        out.append(AdapterSpec(path=full.resolve(), weight=float(weight), line=located.at(p)))
    return out


def _load_stages(items, here, interp, located) -> list[StageSpec]:
    file = located.file
    if not isinstance(items, list) or not items:
        raise FuseError("F103", "'stages' must be a non-empty list", file=file, line=located.at(("stages",)),
                        key="stages", fix="e.g. stages: [validate, merge, publish]")
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
                raise FuseError("F103", f"parameters of '{name}' must be a mapping", file=file,
                                line=located.at(path), key=_fmt(path), fix=f"e.g. - {name}: {{key: value}}")
        else:
            raise FuseError("F103", "a stage is a name or a one-key mapping {name: {params}}", file=file,
                            line=located.at(path), key=_fmt(path), fix="e.g. - merge: {dtype: bfloat16}")
        if name not in STAGE_MODULES:
            raise FuseError("F107", f"unknown stage '{name}'", file=file, line=located.at(path), key=_fmt(path),
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
        if sid in seen:
            raise FuseError("F106", f"stage id '{sid}' is used twice (first at line {seen[sid]})", file=file,
                            line=located.at(path), key=_fmt(path),
                            fix=f"give one of them its own id, e.g. id: {sid}-2")
        seen[sid] = located.at(path)
        from_id = params.get("from")
        if from_id is not None:
            _check_type(from_id, Param(str), path + ("from",), located)
        out.append(StageSpec(id=sid, name=name, params=resolved, recorded=recorded,
                             line=located.at(path), from_id=from_id))
    return out


def _resolve_value(value, spec: Param, path, here, interp, located):
    value, recorded = interp.expand(value, path)
    value = _check_type(value, spec, path, located)
    if spec.type == "path" and value is not None:
        p = Path(os.path.expanduser(value))
        value = str(p if p.is_absolute() else (here / p).resolve())
        if "${env." not in str(recorded):
            recorded = value
    if "${env." not in str(recorded):
        recorded = value
    return value, recorded


def _check_keys(data: dict, schema: dict, path, located):
    for key in data:
        if key not in schema:
            raise FuseError("F102", f"unknown key '{key}'", file=located.file, line=located.at(path + (key,)),
                            key=_fmt(path + (key,)), fix=_suggest(key, list(schema), "key"))


def _check_type(value, spec: Param, path, located):
    """Check (and coerce int→float) one value; return it."""
    want = str if spec.type == "path" else spec.type
    ok = isinstance(value, want)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if want is float and isinstance(value, str):  # YAML 1.1 reads a bare 1e-12 as a string
        try:
            value, ok = float(value), True
        except ValueError:
            pass
    if want is int and isinstance(value, bool):
        ok = False
    if value is None and spec.default is None:
        ok = True
    if not ok:
        got = type(value).__name__ if value is not None else "nothing"
        raise FuseError("F103", f"expected {spec.describe()}, got {got} {value!r}"[:200], file=located.file,
                        line=located.at(path), key=_fmt(path))
    if spec.choices and value not in spec.choices:
        raise FuseError("F103", f"{value!r} is not allowed", file=located.file, line=located.at(path),
                        key=_fmt(path), fix=f"use {spec.describe()}")
    return value


def _suggest(word: str, options, what: str) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1)
    valid = ", ".join(str(o) for o in options)
    return (f"did you mean '{close[0]}'? " if close else "") + f"valid {what}s: {valid}"


def _apply_overrides(stages: list[StageSpec], overrides, here, interp, located):
    for text in overrides:
        m = re.fullmatch(r"([\w.-]+?)\.([\w-]+)=(.*)", text, re.S)
        if not m:
            raise FuseError("F109", f"cannot read --set '{text}'", file="--set",
                            fix="write --set <stage id>.<param>=<value>, e.g. --set merge.dtype=float16")
        sid, key, raw_value = m.groups()
        target = next((s for s in stages if s.id == sid), None)
        if target is None:
            raise FuseError("F109", f"--set names stage id '{sid}', which is not in the pipeline", file="--set",
                            key=text, fix=_suggest(sid, [s.id for s in stages], "stage id"))
        schema = target.module.PARAMS
        if key not in schema:
            raise FuseError("F109", f"stage '{target.name}' has no parameter '{key}'", file="--set", key=text,
                            fix=_suggest(key, list(schema), "parameter"))
        try:
            value = yaml.safe_load(raw_value) if raw_value != "" else ""
        except yaml.YAMLError:
            value = raw_value
        if schema[key].type in (str, "path") and not isinstance(value, str) and value is not None:
            value = raw_value
        sub = _Located("--set")
        sub.lines[()] = None
        try:
            value, rec = _resolve_value(value, schema[key], (sid, key), here, interp, sub)
        except FuseError as e:
            f = e.finding
            raise FuseError("F109", f"--set {text}: {f.message}", file="--set", key=text, fix=f.fix) from None
        target.params[key], target.recorded[key] = value, rec


def _link_stages(stages: list[StageSpec], located):
    """Check ``from:`` references and that each stage that needs an input has one upstream."""
    for i, s in enumerate(stages):
        before = stages[:i]
        if s.from_id is not None:
            if s.from_id not in [b.id for b in before]:
                raise FuseError("F108", f"'from: {s.from_id}' names no earlier stage", file=located.file,
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
