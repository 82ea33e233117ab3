"""Load `inventory/<env>.yaml` into a `Fleet`, keeping YAML line numbers for every error.

PyYAML's C composer gives nodes with marks; we turn nodes into plain data ourselves so that each path
keeps its line, duplicate keys are caught (PyYAML silently keeps the last one), and alias bombs stop.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path as FsPath
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from primespark.fleet.checks import cross_check
from primespark.fleet.errors import FleetError, Path, Problem, dotted, sort_problems
from primespark.fleet.model import ALERT_NAME_PATTERN, DURATION_PATTERN, SECRET_REF_PATTERN, Fleet

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MAX_NODES = 500_000  # ~15,000 hosts; more is an alias bomb
_MAX_DEPTH = 64
LineMap = dict[Path, int]


class _Converter:
    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: LineMap = {}
        self.nodes = 0
        self.constructor = yaml.constructor.SafeConstructor()

    def _key(self, key_node: yaml.Node, path: Path) -> Any:
        if not isinstance(key_node, yaml.ScalarNode):
            raise FleetError.single(
                self.file, f"{dotted(path)}: a mapping key must be a plain value",
                "use a name such as `pi-1:` as the key", key_node.start_mark.line + 1,
            )
        return self.constructor.construct_object(key_node)

    def _reject_duplicate_keys(self, node: yaml.MappingNode, path: Path) -> None:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self._key(key_node, path)
            line = key_node.start_mark.line + 1
            try:
                seen = key in first_line
            except TypeError:  # an unhashable key such as `? [a]`
                raise FleetError.single(self.file, f"{dotted(path)}: a mapping key must be a plain value",
                                        "use a name as the key", line) from None
            if seen:
                raise FleetError([Problem(
                    (*path, key), f"duplicate key {key!r} (first at line {first_line[key]})",
                    "each name may appear once; rename or merge the two entries", "duplicate-key", self.file, line,
                )])
            first_line[key] = line

    def convert(self, node: yaml.Node, path: Path = ()) -> Any:
        self.nodes += 1
        line = node.start_mark.line + 1
        if self.nodes > _MAX_NODES or len(path) > _MAX_DEPTH:
            raise FleetError.single(
                self.file, "the document is too large or too deeply nested (alias expansion?)",
                "write the fleet out plainly; anchors that refer to themselves are not supported", line,
            )
        self.lines.setdefault(path, line)
        if isinstance(node, yaml.MappingNode):
            self._reject_duplicate_keys(node, path)
            self.constructor.flatten_mapping(node)  # `<<: *anchor` merges come first; own keys override them
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self._key(key_node, path)
                self.lines[(*path, key)] = key_node.start_mark.line + 1
                out[key] = self.convert(value_node, (*path, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(item, (*path, i)) for i, item in enumerate(node.value)]
        return self.constructor.construct_object(node, deep=True)


def parse_yaml(text: str, file: str) -> tuple[Any, LineMap]:
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise FleetError.single(
            file, f"not valid YAML: {exc.problem or exc.context}", "check indentation and quoting there", line
        ) from None
    except yaml.YAMLError as exc:
        raise FleetError.single(file, f"not valid YAML: {exc}", "check the file's syntax") from None
    if root is None:
        return None, {}
    converter = _Converter(file)
    try:
        return converter.convert(root), converter.lines
    except yaml.YAMLError as exc:  # a scalar that its tag cannot build, e.g. `!!int x`
        raise FleetError.single(file, f"a value cannot be read: {exc}", "quote the value or remove the tag") from None
    except (RecursionError, TypeError, ValueError) as exc:
        raise FleetError.single(file, f"the YAML cannot be read as data: {exc}", "write the fleet out plainly") \
            from None


def line_of(lines: LineMap, path: Path) -> int | None:
    for cut in range(len(path), -1, -1):
        if (found := lines.get(tuple(path[:cut]))) is not None:
            return found
    return None


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = args[0] if len(args) == 1 else annotation
            if len(args) != 1:
                return annotation
        else:
            return annotation


def _model_at(path: Path) -> type[BaseModel] | None:
    """The pydantic model that owns the value at `path`, to suggest valid field names."""
    current: Any = Fleet
    for part in path:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif typing.get_origin(current) in (dict, list, tuple):
            current = typing.get_args(current)[-1]
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _fix_extra(path: Path) -> str:
    if not path:
        return "remove it"
    owner = _model_at(path[:-1])
    allowed = sorted(owner.model_fields) if owner else []
    close = difflib.get_close_matches(str(path[-1]), allowed, n=1)
    hint = f"did you mean `{close[0]}`? " if close else ""
    return f"{hint}remove it or use one of: {', '.join(allowed)}" if allowed else "remove it"


def _fix_pattern(pattern: str) -> str:
    if pattern == SECRET_REF_PATTERN:
        return "write a reference, not a secret: `vault:<mount>/<path>#<key>` or `local:<name>`"
    if "a-z][a-z0-9-]" in pattern:
        return "use lower-case letters, digits and dashes, starting with a letter (2-32 characters)"
    if pattern.startswith("^/"):
        return "use an absolute path starting with /"
    if "\\S+\\s+" in pattern:
        return "use a five-field cron expression such as `0 2 * * *`"
    if pattern == DURATION_PATTERN:
        return "write a Prometheus duration, largest unit first, such as `30s`, `5m`, `1h30m` or `0s`"
    if pattern == ALERT_NAME_PATTERN:
        return "name an alert in CamelCase, as the rules do (`spark monitoring alerts` lists them)"
    return f"the value must match {pattern}"


# Error types (or their prefixes) whose fix does not depend on the value.
_PLAIN_FIXES: list[tuple[tuple[str, ...], str]] = [
    (("ip_v4", "ip_any"),
     "write an IPv4 address such as 192.0.2.10, or a network such as 192.0.2.0/24 with host bits zero"),
    (("int_parsing", "int_type", "float_parsing", "float_type"), "write a number without units"),
    (("dict_type", "model_type"), "write a mapping (`key: value` lines) here"),
    (("string_type",), "quote the value (YAML read it as a number, a date or a boolean)"),
    (("list_type",), "write a list (`- item` lines) here"),
]


# Bounds: the fix names the bound (pydantic's context holds it).
_BOUNDS = {"less_than_equal": ("le", "use {} or less"), "less_than": ("lt", "use less than {}"),
           "greater_than_equal": ("ge", "use {} or more"), "greater_than": ("gt", "use more than {}")}


def _fix_for(error: Any, path: Path) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if "fix" in ctx:  # the model's own rules (PydanticCustomError) say how to fix what they refuse
        return str(ctx["fix"])
    if kind == "missing":
        return f"add `{path[-1]}:` here" if path else "add the missing field"
    if kind == "extra_forbidden":
        return _fix_extra(path)
    if kind in ("enum", "literal_error"):
        return f"use one of: {ctx.get('expected', '')}"
    if kind == "string_pattern_mismatch":
        return _fix_pattern(ctx.get("pattern", ""))
    if kind == "finite_number":
        return "write a finite number (YAML reads `.inf`, and pydantic `1e400`, as infinity)"
    if kind in _BOUNDS:
        key, words = _BOUNDS[kind]
        return words.format(ctx[key]) if key in ctx else "choose a value within the stated range"
    return next((fix for kinds, fix in _PLAIN_FIXES if kind.startswith(kinds)), "correct the value")


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def problems_of_validation(exc: ValidationError, file: str, lines: LineMap) -> list[Problem]:
    problems = []
    for error in exc.errors(include_url=False):
        path: Path = tuple(p for p in error["loc"] if not (isinstance(p, str) and "[" in p))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "string_pattern_mismatch":
            message = "the value does not have the required form"
        if error["type"] not in ("missing",) and "input" in error and not isinstance(error["input"], dict | list):
            message = f"{message} (got {_shown(error['input'])})"
        problems.append(Problem(path, message, _fix_for(error, path), error["type"], file, line_of(lines, path)))
    return problems


def validate_data(data: Any, file: str, lines: LineMap | None = None, skip: frozenset[str] = frozenset()) -> Fleet:
    lines = lines or {}
    if not isinstance(data, dict):
        raise FleetError.single(
            file, "the fleet file must be a mapping with name, sites and hosts", "see inventory/lab.yaml"
        )
    try:
        fleet = Fleet.model_validate(data)
    except ValidationError as exc:
        raise FleetError(sort_problems(problems_of_validation(exc, file, lines))) from None
    problems = [p.located(file, line_of(lines, p.path)) for p in cross_check(fleet) if p.code not in skip]
    if problems:
        raise FleetError(sort_problems(problems))
    return fleet


def load_text(text: str, file: str = "<fleet>", skip: frozenset[str] = frozenset()) -> Fleet:
    data, lines = parse_yaml(text, file)
    return validate_data(data, file, lines, skip)


def inventory_dir() -> FsPath:
    from primespark.settings import get_settings

    return get_settings().inventory_dir


def resolve(env_or_file: str | FsPath) -> FsPath:
    """`lab` → inventory/lab.yaml; a path is taken as it is."""
    candidate = FsPath(env_or_file)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists() or "/" in str(env_or_file):
        return candidate
    return inventory_dir() / f"{env_or_file}.yaml"


def load_fleet(env_or_file: str | FsPath, skip: frozenset[str] = frozenset()) -> Fleet:
    known = sorted(p.stem for p in inventory_dir().glob("*.yaml"))
    if not str(env_or_file).strip():
        raise FleetError.single("--env", "no environment named: the value is empty",
                                f"name an environment ({', '.join(known) or 'none found'}) or a fleet file")
    path = resolve(env_or_file)
    if path.is_dir():
        raise FleetError.single(str(path), "is a folder, not a fleet file",
                                f"name an environment ({', '.join(known) or 'none found'}) or a fleet file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FleetError.single(
            str(path), "no such fleet file", f"name an environment ({', '.join(known) or 'none found'}) or a file"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FleetError.single(str(path), f"cannot read the file: {exc}", "check its permissions and encoding") \
            from None
    return load_text(text, str(path), skip)
