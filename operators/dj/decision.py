"""A Data-Juicer filter's decision apart from its stats, for `bricks-dj refilter`.

A Data-Juicer filter computes stats (`compute_stats_*`), then decides from them
(`process_single` or `process_batched`). A parameter that only the deciding methods read is a
threshold: changing it changes the decision and leaves the stats, so the stored stat columns
can be decided on again. Data-Juicer does not declare which parameters those are; they are
found in the operator's source:

- in `__init__`, a parameter that is only stored on `self` (or checked by an `if ...: raise`)
  feeds those attributes; any other use of it (a model, a helper's argument) makes it a
  parameter of the stats;
- a parameter is a threshold when every attribute it feeds is read in the deciding methods
  alone, and those methods read the sample's stats and nothing else of it.

Plain functions on Data-Juicer's classes and plain dicts; nothing here imports Data-Juicer.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Any

DECIDING = ("process_single", "process_batched")


def decision_params(dj_cls: type, filter_base: type) -> tuple[str, ...]:
    """The parameters of `dj_cls` (a subclass of `filter_base`, Data-Juicer's Filter) that only
    its decision reads, in signature order; () where its source cannot say."""
    params = list(inspect.signature(dj_cls.__init__).parameters)[1:]
    feeds: dict[str, set[str]] = {}
    stats_params: set[str] = set()
    readers: dict[str, set[str]] = {}  # attribute -> the methods that read it
    decides = False
    for cls in dj_cls.__mro__:
        if cls is filter_base or not issubclass(cls, filter_base):
            continue
        node = _class_node(cls)
        if node is None:
            return ()
        for method in node.body:
            if not isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if method.name == "__init__":
                if cls is dj_cls:
                    _init_uses(method, set(params), feeds, stats_params)
                continue
            if method.name in DECIDING:
                if not _reads_only_stats(method):
                    return ()
                decides = True
            for attribute in _self_reads(method):
                readers.setdefault(attribute, set()).add(method.name)
    if not decides:
        return ()
    found = []
    for name in params:
        if name in stats_params or name not in feeds:
            continue
        read_in = set().union(*(readers.get(a, set()) for a in feeds[name]))
        if read_in and read_in <= set(DECIDING):
            found.append(name)
    return tuple(found)


def stats_candidates(columns: dict[str, Any], keys: dict[str, str]) -> list[dict[str, Any]]:
    """The stats a filter may have written, rebuilt from their stored columns (`keys`: stat key
    -> column): per-media lists of one value (none where the column is empty), as media filters
    write them, then single values, as text filters do. A filter's decision fails on the shape
    it does not read."""
    as_lists = {key: [] if columns.get(column) is None else [columns[column]] for key, column in keys.items()}
    as_values = {key: columns[column] for key, column in keys.items() if columns.get(column) is not None}
    return [as_lists, as_values]


def _class_node(cls: type) -> ast.ClassDef | None:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return None
    node = tree.body[0] if tree.body else None
    return node if isinstance(node, ast.ClassDef) else None


def _init_uses(init: ast.FunctionDef, params: set[str], feeds: dict[str, set[str]], stats_params: set[str]) -> None:
    for statement in init.body:
        names = {n.id for n in ast.walk(statement) if isinstance(n, ast.Name) and n.id in params}
        if not names or _is_check(statement):
            continue
        targets = _self_targets(statement)
        if targets:
            for name in names:
                feeds.setdefault(name, set()).update(targets)
        else:
            stats_params.update(names)


def _self_targets(statement: ast.stmt) -> list[str]:
    """`self.a = ...` (every target an attribute of self): the attribute names; else []."""
    if isinstance(statement, ast.Assign):
        targets = statement.targets
    elif isinstance(statement, ast.AnnAssign):
        targets = [statement.target]
    else:
        return []
    names = [t.attr for t in targets if isinstance(t, ast.Attribute) and _is_self(t.value)]
    return names if len(names) == len(targets) else []


def _is_check(statement: ast.stmt) -> bool:
    """`assert ...` or `if ...: raise ...`: validates a parameter, uses it for nothing."""
    return isinstance(statement, ast.Assert) or (
        isinstance(statement, ast.If) and not statement.orelse and all(isinstance(s, ast.Raise) for s in statement.body))


def _self_reads(method: ast.AST) -> set[str]:
    return {n.attr for n in ast.walk(method) if isinstance(n, ast.Attribute) and _is_self(n.value)}


def _reads_only_stats(method: ast.FunctionDef) -> bool:
    """The deciding method subscripts its sample argument with `Fields.stats` alone."""
    args = method.args.args
    if len(args) < 2:
        return False
    sample = args[1].arg
    for node in ast.walk(method):
        if isinstance(node, ast.Name) and node.id == sample and not _stats_subscript(node, method):
            return False
    return True


def _stats_subscript(name: ast.Name, method: ast.FunctionDef) -> bool:
    for node in ast.walk(method):
        if isinstance(node, ast.Subscript) and node.value is name:
            key = node.slice
            return isinstance(key, ast.Attribute) and key.attr == "stats"
    return False


def _is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"
