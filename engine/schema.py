"""The shard schema: the contract between `bricks-dj` and `bricks-train`.

One row per sample (a video clip or an image). Column names follow Open-Sora's data-set
columns (`path`, `text`, `num_frames`, `aes`, `flow`...), but Open-Sora's own tools read a CSV of
one media file per row: `bricks-dj export --format opensora` writes one. Operators add score or caption columns through
`Operator.outputs`; `shard_schema` puts them after the base columns.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1

BASE_COLUMNS: dict[str, pa.DataType] = {
    "sample_id": pa.string(),  # stable: same input and recipe give the same id
    "kind": pa.string(),  # "video" | "image"
    "source_uri": pa.string(),  # an absolute local path, or the fsspec URI as given
    "start_frame": pa.int64(),  # in source frame indices
    "end_frame": pa.int64(),  # exclusive
    "start_time": pa.float64(),  # seconds from the first frame
    "end_time": pa.float64(),
    "num_frames": pa.int64(),
    "fps": pa.float64(),
    "height": pa.int64(),  # as displayed (rotation applied)
    "width": pa.int64(),
    "aspect_ratio": pa.float64(),  # height / width
    "resolution": pa.int64(),  # height * width
    "text": pa.string(),  # caption; null until captioned
    "media": pa.binary(),  # encoded clip (mp4) or image (jpeg); null in reference mode
    "media_format": pa.string(),  # "mp4" | "jpeg" | null
    "path": pa.string(),  # the source file (as source_uri), to read frames from in reference mode
}

REJECT_COLUMNS: dict[str, pa.DataType] = {
    "sample_id": pa.string(),
    "kind": pa.string(),  # "source", "video" or "image"
    "source_uri": pa.string(),
    "start_frame": pa.int64(),
    "end_frame": pa.int64(),
    "status": pa.string(),  # "dropped" | "failed"
    "op": pa.string(),  # the operator (or "read" for the source itself)
    "reason": pa.string(),
    "scores": pa.string(),  # JSON of the scores recorded before the decision
    # JSON of the sample's columns (all but `media`) as they were at the decision, so that a
    # what-if (`bricks-dj refilter`) can bring the sample back without decoding it again.
    "fields": pa.string(),
}


def shard_schema(extra: dict[str, pa.DataType]) -> pa.Schema:
    clash = sorted(set(extra) & set(BASE_COLUMNS))
    if clash:
        raise ValueError(f"operator output columns clash with base columns: {clash}")
    fields = [pa.field(n, t) for n, t in BASE_COLUMNS.items()]
    fields += [pa.field(n, t) for n, t in extra.items()]
    return pa.schema(fields, metadata={"bricks.schema_version": str(SCHEMA_VERSION)})


def rejects_schema() -> pa.Schema:
    return pa.schema([pa.field(n, t) for n, t in REJECT_COLUMNS.items()])


def sample_id(source_uri: str, recipe_key: str, kind: str, start: int, end: int) -> str:
    """A short stable id: the same source, recipe and range always give the same id."""
    key = f"{source_uri}\x1f{recipe_key}\x1f{kind}\x1f{start}\x1f{end}"
    return hashlib.sha1(key.encode()).hexdigest()[:20]


def to_table(rows: Iterable[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    rows = list(rows)
    columns = {f.name: [row.get(f.name) for row in rows] for f in schema}
    return pa.table(columns, schema=schema)


def scores_json(scores: dict[str, Any]) -> str | None:
    return json.dumps(scores, sort_keys=True, default=_json_value) if scores else None


def fields_json(sample: dict[str, Any]) -> str | None:
    """A sample's columns for the rejects' `fields`: not its media, nor the engine's `_` fields."""
    fields = {k: v for k, v in sample.items() if k != "media" and not k.startswith("_")}
    return json.dumps(fields, sort_keys=True, default=_json_value) if fields else None


def _json_value(value: Any) -> Any:
    # Scores are recorded even when they are what made a sample fail, so anything goes here.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    return repr(value)


class ColumnTypeError(TypeError):
    """An operator returned a field that the shard schema cannot hold; fails that sample."""


def fit_columns(fields: dict[str, Any], columns: dict[str, pa.DataType], op_name: str) -> dict[str, Any]:
    """`fields` as the values their columns hold (numpy scalars become Python ones), checked
    against `columns` (the base columns and the operator's own `outputs`).

    Checked where the operator returns, so that a wrong value fails its one sample, naming
    the operator and the column, instead of the Arrow conversion of a whole source's rows."""
    fitted = {}
    for name, value in fields.items():
        dtype = columns.get(name)
        if dtype is None:
            raise ColumnTypeError(f"{op_name} returned '{name}', which is not a column: "
                                  "declare it in the operator's `outputs`")
        fitted[name] = fit_value(value, dtype, name, op_name)
    return fitted


def fit_value(value: Any, dtype: pa.DataType, name: str, op_name: str) -> Any:
    if value is not None:
        try:
            if _fits(value, dtype):
                return pa.array([value], type=dtype)[0].as_py()
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            pass
        raise ColumnTypeError(f"column '{name}' is {dtype}, but {op_name} returned a "
                              f"{type(value).__name__}: {_preview(value)}")
    return None


def _fits(value: Any, dtype: pa.DataType) -> bool:
    """Stricter than Arrow's own conversion, which turns 2.5 into 2 in an integer column and
    True into 1.0 in a float one."""
    if pa.types.is_boolean(dtype):
        return isinstance(value, (bool, np.bool_))
    if isinstance(value, (bool, np.bool_)):  # a bool is not a number (declare pa.bool_())
        return False
    if pa.types.is_integer(dtype):
        if isinstance(value, (float, np.floating)):
            return float(value).is_integer()  # lossless only
        return isinstance(value, (int, np.integer))
    if pa.types.is_floating(dtype):
        return isinstance(value, (int, float, np.integer, np.floating))
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return isinstance(value, str)
    if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype):
        return isinstance(value, (bytes, bytearray, memoryview))
    return True  # nested, temporal and other types: Arrow's conversion decides


def _preview(value: Any, limit: int = 60) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
