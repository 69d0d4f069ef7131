"""The operator registry: names to operator classes, from built-ins, entry points and plug-ins.

Built-in operators live in `bricks.operators`; third-party packages expose theirs through the
`bricks.operators` entry-point group; a recipe may also name modules or `.py` files to import
(`plugins:`). Importing any of these registers the operators they decorate with `@register`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path

from bricks.common.settings import suggest

from .operator import FanOut, Filter, Mapper, ModelOperator, Operator, Segmenter

ENTRY_POINT_GROUP = "bricks.operators"

_OPERATORS: dict[str, type[Operator]] = {}
_FILE_PLUGINS: dict[str, object] = {}  # path -> module, for Ray to ship by value
_discovered = False


class RegistryError(ValueError):
    pass


def register(cls: type[Operator]) -> type[Operator]:
    """Class decorator: make an operator available to recipes under `cls.name`."""
    if not (isinstance(cls, type) and issubclass(cls, (Mapper, Filter, FanOut, Segmenter, ModelOperator))):
        raise RegistryError(f"{cls!r} must subclass Mapper, Filter, FanOut, Segmenter or ModelOperator")
    for attr in ("name", "description"):
        if not isinstance(getattr(cls, attr, None), str) or not getattr(cls, attr):
            raise RegistryError(f"operator {cls.__qualname__} needs a non-empty `{attr}`")
    existing = _OPERATORS.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise RegistryError(
            f"operator name '{cls.name}' is taken by {existing.__module__}.{existing.__qualname__}"
        )
    _OPERATORS[cls.name] = cls
    return cls


def discover() -> None:
    """Import built-in operators and every `bricks.operators` entry point (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    importlib.import_module("bricks.operators")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken plug-in must not hide the others
            raise RegistryError(f"entry point '{ep.name} = {ep.value}' failed to load: {exc}") from exc


def load_plugin(spec: str, base_dir: Path | None = None) -> None:
    """Import a plug-in given as a module name or a path to a `.py` file."""
    if spec.endswith(".py"):
        path = Path(spec)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise RegistryError(f"plug-in file not found: {path}")
        path = path.resolve()
        if str(path) in _FILE_PLUGINS:
            return
        module_name = f"bricks_plugin_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise RegistryError(f"plug-in {path} failed to import: {exc}") from exc
        _FILE_PLUGINS[str(path)] = module
    else:
        try:
            importlib.import_module(spec)
        except ImportError as exc:
            raise RegistryError(f"plug-in module '{spec}' cannot be imported: {exc}") from exc


def file_plugin_modules() -> list:
    return list(_FILE_PLUGINS.values())


def get(name: str) -> type[Operator]:
    if name.startswith(DJ_PREFIX):
        return _dj_operator(name)
    discover()
    try:
        return _OPERATORS[name]
    except KeyError:
        raise RegistryError(f"unknown operator '{name}'{suggest(name, _OPERATORS)}") from None


DJ_PREFIX = "dj."


def _dj_operator(name: str) -> type[Operator]:
    """The adapter that runs Data-Juicer's operator `name[3:]` (the optional `dj` extra)."""
    if importlib.util.find_spec("data_juicer") is None:
        raise RegistryError(f"operator '{name}' needs Data-Juicer: pip install 'bricks[dj]'")
    from bricks.operators.dj import in_bricks  # imports Data-Juicer: only when a recipe names one of its ops

    return in_bricks.adapter_class(name[len(DJ_PREFIX):])


def dj_operators() -> dict[str, type[Operator]]:
    """{"dj.<name>": adapter} of Data-Juicer's operators that run in recipes (its filters and
    mappers); empty without the `dj` extra."""
    if importlib.util.find_spec("data_juicer") is None:
        return {}
    from bricks.operators.dj import in_bricks

    return in_bricks.runnable_operators()


def all_operators() -> dict[str, type[Operator]]:
    discover()
    return dict(sorted(_OPERATORS.items()))


def kind_of(cls: type[Operator]) -> str:
    for base, label in ((Segmenter, "segmenter"), (FanOut, "fan-out"), (Filter, "filter"), (Mapper, "mapper"),
                        (ModelOperator, "model")):
        if issubclass(cls, base):
            return label
    return "operator"
