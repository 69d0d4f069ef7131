"""The shard schema: the contract between `bricks-dj` and `bricks-train`.

One row per sample (a video clip or an image). Column names follow Open-Sora's data-set
columns so its tools read our shards too. Operators add score or caption columns through
`Operator.outputs`; `shard_schema` puts them after the base columns.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import pyarrow as pa

SCHEMA_VERSION = 1

BASE_COLUMNS: dict[str, pa.DataType] = {
    "sample_id": pa.string(),  # stable: same input and recipe give the same id
    "kind": pa.string(),  # "video" | "image"
    "source_uri": pa.string(),
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
    "path": pa.string(),  # the source file, to read frames from in reference mode
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
    return json.dumps(scores, sort_keys=True, default=float) if scores else None
