"""Data-Juicer's filters and mappers as bricks operators: `- dj.<op_name>: {params}` in a recipe.

Each Data-Juicer operator gets an adapter class, `DJ_<op_name>` in this module, built when it
is first looked up (the module's `__getattr__`), so that pickle (and Ray, which ships operators
to its workers) finds it by reference like any class defined here.

- Parameters: a pydantic model made from the Data-Juicer operator's `__init__` signature (its
  names, annotations and defaults; an annotation pydantic cannot check is `Any` for that
  field), so a misspelt or ill-typed parameter is refused when the recipe is read. Operators
  without models are also built once there, so that Data-Juicer's own checks run early; the
  operator that runs is built in `setup`, on the worker.
- Filters: `score` converts the sample (`samples`), computes Data-Juicer's stats and its keep
  decision; the stats become columns `dj_<stat_key>`, and `keep` returns the decision, with a
  reason naming the stat and its value. `bricks-dj refilter` decides again from the stored
  columns with other thresholds (`decision`), without opening the media.
- Mappers: `process` runs the mapper; a changed text becomes the sample's caption (without
  Data-Juicer's special tokens), and the fields it adds, with its `__dj__meta__` tags, go
  into the JSON column `dj_meta`.

Data-Juicer opens the media files itself: the adapters ask bricks for no frames. Its deduplicators,
selectors, groupers and aggregators work on a whole data set and are refused by name.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import re
import shutil
import sys
import tempfile
import threading
import typing
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, TypeAdapter, create_model, model_validator

from bricks.common.errors import first_line
from bricks.common.settings import suggest
from bricks.engine.operator import Filter, Mapper, OperatorParams
from bricks.engine.pipeline import describe_error
from bricks.engine.registry import RegistryError

from . import decision, samples

PREFIX = "dj."
CLASS_PREFIX = "DJ_"
META_COLUMN = "dj_meta"

# Why each Data-Juicer base class other than Filter and Mapper cannot run on one sample at a time.
_WHOLE_DATASET = {
    "Deduplicator": "compares samples across the whole data set",
    "Selector": "selects among the samples of the whole data set",
    "Grouper": "groups the samples of the whole data set",
    "Aggregator": "aggregates groups of samples",
    "Pipeline": "runs a pipeline of its own over a data set",
}


class DJOperatorError(RuntimeError):
    """A Data-Juicer operator raised on a sample: that sample fails, naming the operator."""


@functools.cache
def data_juicer() -> SimpleNamespace:
    """Data-Juicer's operator registry and constants, imported once. Its loguru messages are
    switched off: it logs at import (plug-in discovery, timings) and per operator, which would
    drown bricks' own progress lines. Its video operators are made to close files the way the
    PyAV that bricks uses needs (`pyav_compat`)."""
    from loguru import logger

    logger.disable("data_juicer")
    import data_juicer.ops as ops
    from data_juicer.ops.op_fusion import LOADED_IMAGES, LOADED_VIDEOS
    from data_juicer.utils.constant import Fields, StatsKeysConstant
    from data_juicer.utils.lazy_loader import LazyLoader
    from data_juicer.utils.mm_utils import SpecialTokens

    from .pyav_compat import patch_close_video

    patch_close_video()
    return SimpleNamespace(
        ops=ops, registry=ops.OPERATORS.modules, loaded_videos=LOADED_VIDEOS.modules,
        loaded_images=LOADED_IMAGES.modules, stats_keys=StatsKeysConstant, LazyLoader=LazyLoader,
        keys=samples.DJKeys(stats=Fields.stats, meta=Fields.meta),
        tokens=samples.DJTokens(video=SpecialTokens.video, image=SpecialTokens.image, eoc=SpecialTokens.eoc),
    )


def __getattr__(name: str):
    """`DJ_<op_name>`: the adapter of Data-Juicer's `<op_name>`, built on first lookup."""
    if name.startswith(CLASS_PREFIX):
        try:
            return adapter_class(name[len(CLASS_PREFIX):])
        except RegistryError as exc:
            raise AttributeError(str(exc)) from None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def adapter_class(op_name: str) -> type:
    """The bricks operator class for Data-Juicer's `op_name`; a one-line `RegistryError` when
    there is no such operator or it cannot run in a bricks recipe."""
    dj = data_juicer()
    dj_cls = dj.registry.get(op_name)
    label = f"operator '{PREFIX}{op_name}'"
    if dj_cls is None:
        known = [PREFIX + n for n in dj.registry]
        raise RegistryError(f"unknown operator '{PREFIX}{op_name}'{suggest(PREFIX + op_name, known)}")
    if dj_cls.__module__.split(".")[0] == "bricks":
        raise RegistryError(f"{label} is one of bricks' own operators registered in Data-Juicer: "
                            "name it without 'dj.'")
    if issubclass(dj_cls, dj.ops.Filter):
        base = DJFilter
    elif issubclass(dj_cls, dj.ops.Mapper):
        base = DJMapper
        if "save_dir" in inspect.signature(dj_cls.__init__).parameters:
            raise RegistryError(f"{label} writes new media; not supported in bricks recipes")
    else:
        kind = next((k for k in _WHOLE_DATASET if issubclass(dj_cls, getattr(dj.ops, k))), None)
        why = _WHOLE_DATASET[kind] if kind else "is neither a Filter nor a Mapper"
        raise RegistryError(f"{label} is a Data-Juicer {(kind or 'operator').lower()}, which {why}; bricks "
                            "runs one sample at a time, so only Data-Juicer's filters and mappers run in recipes")
    class_name = CLASS_PREFIX + op_name
    source = _module_source(dj_cls)
    model_op = "prepare_model" in source
    attrs = {
        "__module__": __name__, "__qualname__": class_name, "__doc__": dj_cls.__doc__,
        "name": PREFIX + op_name, "description": _description(dj_cls, op_name),
        "Params": _params_model(dj_cls, op_name, class_name, check_early=not model_op),
        "dj_name": op_name, "modalities": _modalities(op_name),
    }
    if base is DJFilter:
        attrs["stat_kinds"] = _stat_kinds(source)
        attrs["outputs"] = {samples.column_of(key): pa.string() if kind == "string" else pa.float64()
                            for key, kind in attrs["stat_kinds"].items()}
        if attrs["stat_kinds"]:  # decided from stored stats by `bricks-dj refilter`
            attrs["thresholds"] = decision.decision_params(dj_cls, dj.ops.Filter)
    cls = type(class_name, (base,), attrs)
    globals()[class_name] = cls  # found directly from now on, as pickle looks it up
    return cls


def runnable_operators() -> dict[str, type]:
    """{"dj.<name>": adapter class} of every Data-Juicer operator that runs in bricks recipes."""
    found = {}
    for op_name in sorted(data_juicer().registry):
        try:
            found[PREFIX + op_name] = adapter_class(op_name)
        except RegistryError:
            continue  # whole-data-set operators, media writers, bricks' own
    return found


def _module_source(dj_cls: type) -> str:
    try:
        return inspect.getsource(sys.modules[dj_cls.__module__])
    except (OSError, TypeError, KeyError):
        return ""


def _description(dj_cls: type, op_name: str) -> str:
    """The docstring's first sentence (Data-Juicer wraps its first sentences over lines)."""
    paragraph = inspect.cleandoc(dj_cls.__doc__ or "").split("\n\n")[0]
    text = " ".join(paragraph.split())
    sentence = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    return sentence or f"Data-Juicer's {op_name}."


def _modalities(op_name: str) -> frozenset[str]:
    """Sample kinds the operator handles: media operators (those that load videos or images,
    or are named for them) see only their kind; text operators see every sample."""
    dj = data_juicer()
    kinds = set()
    if op_name in dj.loaded_videos or op_name.startswith("video_"):
        kinds.add("video")
    if op_name in dj.loaded_images or op_name.startswith("image_"):
        kinds.add("image")
    return frozenset(kinds)


def _stat_kinds(source: str) -> dict[str, str]:
    """Stat keys the filter may write, each "number" or "string". Data-Juicer declares no stat
    keys up front (its StatsKeys only logs those used once stats were computed), but the shard
    schema is fixed before the run: the keys are read from `StatsKeys.<name>` in the operator's
    module. A stat found only at run time fails its sample, naming it."""
    constants = data_juicer().stats_keys
    keys = [getattr(constants, n) for n in dict.fromkeys(re.findall(r"\bStatsKeys\.(\w+)", source))
            if isinstance(getattr(constants, n, None), str)]
    return {key: "string" if key in samples.STRING_STATS else "number" for key in keys}


# ---- parameters ----

def _params_model(dj_cls: type, op_name: str, class_name: str, check_early: bool) -> type[OperatorParams]:
    signature = inspect.signature(dj_cls.__init__)
    hints = _type_hints(dj_cls.__init__)
    fields: dict[str, Any] = {}
    for param in list(signature.parameters.values())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if hasattr(BaseModel, param.name):
            raise RegistryError(f"operator '{PREFIX}{op_name}': parameter '{param.name}' "
                                "cannot be a pydantic field")
        annotation = hints.get(param.name, Any) if param.annotation is not param.empty else Any
        default = param.default if param.default is not param.empty else ...
        fields[param.name] = (_checkable(annotation), default)
    validators = {"_data_juicer_checks": model_validator(mode="after")(_early_checks(dj_cls, check_early))}
    model = create_model(f"{class_name}Params", __base__=OperatorParams, __module__=__name__,
                         __validators__=validators, **fields)
    model.__qualname__ = f"{class_name}.Params"
    return model


def _type_hints(function) -> dict[str, Any]:
    try:
        return typing.get_type_hints(function)
    except Exception:  # a forward reference that does not resolve: each field on its own
        module = sys.modules.get(function.__module__)
        hints = {}
        for name, annotation in getattr(function, "__annotations__", {}).items():
            if isinstance(annotation, str):
                try:
                    annotation = eval(annotation, vars(module) if module else {})
                except Exception:
                    annotation = Any
            hints[name] = annotation
        return hints


def _checkable(annotation: Any) -> Any:
    """The annotation where pydantic can check it, else Any (for that field only)."""
    try:
        TypeAdapter(annotation)
    except Exception:
        return Any
    return annotation


def _early_checks(dj_cls: type, build: bool):
    """What would otherwise fail every sample on the workers, checked when the recipe is read:
    a `video_backend` of "ffmpeg" without the ffmpeg program (bricks decodes with PyAV, which
    bundles FFmpeg's libraries but not the program), and, for operators without models (cheap
    to build), Data-Juicer's own checks in its `__init__`."""
    def check(params):
        if getattr(params, "video_backend", None) == "ffmpeg" and shutil.which("ffmpeg") is None:
            raise ValueError("video_backend 'ffmpeg' needs the ffmpeg program, which is not on PATH; "
                             "set video_backend: av")
        if build:
            try:
                dj_cls(**dj_kwargs(params))
            except Exception as exc:
                raise ValueError(f"Data-Juicer refused these parameters: {first_line(exc)}") from None
        return params
    return check


def dj_kwargs(params: OperatorParams) -> dict[str, Any]:
    """The parameters the recipe set, for the Data-Juicer operator: the others keep
    Data-Juicer's own defaults."""
    return {name: getattr(params, name) for name in params.model_fields_set}


# ---- the adapters ----

_LAST_VERDICT = threading.local()  # score -> keep, in the thread that runs both for one sample


class _DJOperator:
    dj_name: ClassVar[str]
    modalities: ClassVar[frozenset[str]]
    reruns_on_fields: ClassVar[bool] = False  # it opens the media, or a model, itself
    _dj: Any = None

    def setup(self) -> None:
        if self._dj is None:
            self._dj = data_juicer().registry[self.dj_name](**dj_kwargs(self.params))

    def applies_to(self, sample) -> bool:
        return not self.modalities or sample["kind"] in self.modalities

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_dj", None)  # built again by setup where it runs
        return state

    @contextlib.contextmanager
    def _dj_sample(self, sample):
        """The sample as Data-Juicer takes it; media files made for it live until the call ends."""
        dj = data_juicer()
        if not self.modalities:
            yield samples.text_only_sample(sample, dj.keys)
            return
        folder = Path(tempfile.mkdtemp(prefix="bricks-dj-"))
        try:
            yield samples.media_sample(sample, dj.keys, dj.tokens, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _run(self, method, *args):
        self.setup()
        try:
            return method(*args)
        except Exception as exc:
            raise DJOperatorError(f"{self.name} raised {describe_error(exc)}") from exc


class DJFilter(_DJOperator, Filter):
    stat_kinds: ClassVar[dict[str, str]] = {}

    def score(self, sample, frames):
        with self._dj_sample(sample) as dj_sample:
            stats, keep = self._run(self._stats_and_decision, dj_sample)
        columns = samples.stat_columns(stats, self.stat_kinds, self.name)
        reason = None if keep else drop_reason(self.name, self._dj, {k: columns[samples.column_of(k)] for k in stats})
        _LAST_VERDICT.value = (self, columns, reason)
        return columns

    def _stats_and_decision(self, dj_sample):
        op = self._dj
        if op.is_batched_op():
            batch = op.compute_stats_batched({k: [v] for k, v in dj_sample.items()})
            dj_sample = {k: v[0] for k, v in batch.items()}
        else:
            dj_sample = op.compute_stats_single(dj_sample)
        return dj_sample[data_juicer().keys.stats], self._decision(dj_sample)

    def keep(self, scores):
        op, columns, reason = getattr(_LAST_VERDICT, "value", (None, None, None))
        if op is not self or not _same(columns, scores):
            raise RuntimeError(f"{self.name}.keep called without score on the same sample")
        _LAST_VERDICT.value = (None, None, None)
        return True if reason is None else reason

    def keep_stored(self, scores):
        """Data-Juicer's decision from the stored stat columns alone, with this operator's
        parameters: its stats rebuilt from them, in the shape its decision reads."""
        keys = {key: samples.column_of(key) for key in self.stat_kinds}
        stats_key = data_juicer().keys.stats
        failure = None
        for stats in decision.stats_candidates(scores, keys):
            try:
                keep = self._run(self._decision, {stats_key: stats})
            except DJOperatorError as exc:
                failure = exc
                continue
            return True if keep else drop_reason(self.name, self._dj, {k: scores.get(c) for k, c in keys.items()
                                                                       if scores.get(c) is not None})
        raise DJOperatorError(f"{failure}, deciding again from the stored stats")

    def _decision(self, dj_sample):
        """Data-Juicer's keep decision on a sample whose stats are computed."""
        op = self._dj
        if op.is_batched_op():
            return bool(list(op.process_batched({k: [v] for k, v in dj_sample.items()}))[0])
        return bool(op.process_single(dj_sample))


class DJMapper(_DJOperator, Mapper):
    outputs: ClassVar[dict[str, pa.DataType]] = {META_COLUMN: pa.string()}

    def process(self, sample, frames):
        keys = data_juicer().keys
        with self._dj_sample(sample) as dj_sample:
            given = dict(dj_sample)
            out = self._run(self._mapped, dj_sample)
        for media_key in (keys.videos, keys.images):
            if out.get(media_key) != given[media_key]:
                raise DJOperatorError(f"{self.name} changed '{media_key}': it writes new media, "
                                      "which bricks recipes do not support")
        if out.get(keys.text) != given[keys.text]:
            sample["text"] = samples.caption_from_dj(out.get(keys.text), data_juicer().tokens)
        added = {k: v for k, v in out.items() if k not in given}
        added.update(out.get(keys.meta) or {})
        meta = samples.meta_json(sample.get(META_COLUMN), added, self.name)
        if meta != sample.get(META_COLUMN):
            sample[META_COLUMN] = meta
        return sample

    def _mapped(self, dj_sample):
        op = self._dj
        if not op.is_batched_op():
            return op.process_single(dj_sample)
        batch = op.process_batched({k: [v] for k, v in dj_sample.items()})
        counts = {len(v) for v in batch.values()}
        if counts != {1}:
            raise ValueError(f"returned {max(counts)} samples for one; bricks mappers return one")
        return {k: v[0] for k, v in batch.items()}


# ---- reasons ----

def drop_reason(op_name: str, dj_op, stats: dict[str, Any]) -> str:
    """Why Data-Juicer's filter dropped the sample: each stat outside its bounds (the operator's
    `min_X`/`max_X` attributes), e.g. "dj.video_duration_filter: video_duration 1.2 outside
    [2, 10]"; where no stat can be matched to bounds, every stat and its value."""
    pairs = _bounds(dj_op)
    parts = []
    for key, value in stats.items():
        bounds = pairs[next(iter(pairs))] if len(pairs) == 1 and len(stats) == 1 else \
            next((b for suffix, b in pairs.items() if key.endswith(suffix)), None)
        if bounds is None or not isinstance(value, (int, float)):
            continue
        low, high = bounds
        try:
            inside = dj_op.get_keep_boolean(value, low, high)
        except TypeError:
            continue
        if not inside:
            where = "inside" if getattr(dj_op, "reversed_range", False) else "outside"
            parts.append(f"{key} {_number(value)} {where} [{_number(low)}, {_number(high)}]")
    if parts:
        return f"{op_name}: {', '.join(parts)}"
    shown = ", ".join(f"{k}={_number(v)}" for k, v in stats.items())
    return f"{op_name} dropped it ({shown})" if shown else f"{op_name} dropped it"


def _bounds(dj_op) -> dict[str, tuple[Any, Any]]:
    """{suffix: (min, max)} from the operator's numeric `min_<suffix>` and `max_<suffix>`
    attributes (not the flags `min_closed_interval`... of every filter)."""
    def bound(value):
        return value is None or (isinstance(value, (int, float, Fraction)) and not isinstance(value, bool))

    found = {}
    for name, low in vars(dj_op).items():
        high = getattr(dj_op, "max_" + name[4:], False)
        if name.startswith("min_") and bound(low) and bound(high):
            found[name[4:]] = (low, high)
    return found


def _number(value: Any) -> str:
    if isinstance(value, Fraction):
        value = float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isinf(value) or abs(value) >= 1e15:  # sys.maxsize and float max mean no bound
            return "inf" if value > 0 else "-inf"
        return f"{value:g}"
    return str(value)


def _same(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    if a is None or a.keys() != b.keys():
        return False
    return all(x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
               for x, y in ((a[k], b[k]) for k in a))
