"""Settings files (recipes, training configs): YAML read with a safe loader, `--set KEY=VALUE`
overrides, and pydantic's validation errors as one line naming the field."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


class SettingsError(ValueError):
    """A settings file or override that cannot be used; its message is one line."""


def suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def parse_overrides(pairs: list[str]) -> list[tuple[list[str], Any]]:
    """`KEY=VALUE` pairs as (dotted key split, value read as YAML); a one-line `SettingsError`
    naming the pair when it is not one."""
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"--set {pair!r}: expected KEY=VALUE, e.g. executor.mode=local")
        try:
            parsed = yaml.safe_load(value) if value else None
        except yaml.YAMLError as exc:
            raise SettingsError(f"--set {pair!r}: the value is not valid YAML ({_yaml_problem(exc)}); "
                              f"quote it to set it as text, e.g. --set '{key.strip()}=\"...\"'") from None
        out.append((key.strip().split("."), parsed))
    return out


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's complaint about a one-line value, in one line."""
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"column {mark.column + 1}: {problem}" if mark else problem


def apply_override(data: dict, path: list[str], value: Any, where: str) -> None:
    node: Any = data
    path = list(path)
    i = 0
    while i < len(path):
        if isinstance(node, list):
            _join_name(node, path, i)  # an operator named with a dot: process.dj.text_length_filter
        part = path[i]
        last = i == len(path) - 1
        dotted = ".".join(path[: i + 1])
        if isinstance(node, list):
            node_index = _list_index(node, part, f"{where}: --set {dotted}")
            by_name = not part.lstrip("-").isdigit()
            if last:
                node[node_index] = {part: value} if by_name else value
                return
            node = node[node_index]
            if by_name:  # `process.motion_filter.min_score`: straight to the parameters
                if node[part] is None:
                    node[part] = {}
                node = node[part]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise SettingsError(f"{where}: --set {dotted}: cannot set a field inside a {type(node).__name__}")
        i += 1


def _join_name(items: list, path: list[str], i: int) -> None:
    """Where `path[i:k+1]` joined by dots names an item of `items`, the longest such name
    becomes one part of `path` (operator names may hold a dot: `dj.text_length_filter`)."""
    names = set(_item_names(items))
    for k in range(len(path) - 1, i, -1):
        joined = ".".join(path[i:k + 1])
        if joined in names:
            path[i:k + 1] = [joined]
            return


def _item_names(items: list) -> list[str]:
    """The names of a list's one-key items (`process`: the operators), in order."""
    return [next(iter(item)) for item in items if isinstance(item, dict) and len(item) == 1]


def _list_index(items: list, part: str, where: str) -> int:
    """A list element by position or, in `process`, by operator name (first match)."""
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(items) <= index < len(items):
            raise SettingsError(f"{where}: index out of range (the list has {len(items)} items)")
        return index
    names = _item_names(items)
    if part in names:
        return names.index(part)
    raise SettingsError(f"{where}: no item named '{part}'{suggest(part, names)}")


def read_yaml_mapping(path: Path, what: str, shape: str) -> dict:
    """A YAML file (safe loader) that holds a mapping; a one-line `SettingsError` naming the file
    (and the line of a syntax error) otherwise. Recipes and training configs read this way."""
    where = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SettingsError(f"{where}: cannot read {what}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise SettingsError(f"{where}: not UTF-8 text: byte {exc.start} (line {line}) is 0x{raw[exc.start]:02x}; "
                          f"save the {what} as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise SettingsError(f"{where}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{where}: {shape}")
    return data


def first_error(exc: ValidationError, model: type[BaseModel]) -> str:
    """The first validation error as one line, with the nearest field name for a misspelling."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        field = str(err["loc"][-1])
        known = _fields_at(model, err["loc"][:-1])
        return f"unknown parameter '{loc}'{suggest(field, known)}"
    if err["type"] == "missing":
        return f"missing required field '{loc}'"
    got = err.get("input")
    got_text = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    return f"'{loc}': {err['msg']}{got_text}" if loc else f"{err['msg']}{got_text}"


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return list(model.model_fields)
    return list(model.model_fields)
