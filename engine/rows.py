"""A sample's row, from the decode pass to the writer: kept, dropped or failed, by which
operator and why. Every other part of the engine reads and marks rows through this module.

A source's results travel as one Arrow table (or several, when a model stage's batches split
it): its samples in the shard columns, plus the bookkeeping columns of `ROW_COLUMNS`. Rows are
never removed on the way, only marked, so every sample stays accounted for: a source is
complete when the rows received add up to `_source_rows`. Where kept rows are written to a
shard file (by the worker that holds them), they are replaced by one `written` row naming the
staged file and how many rows it holds (`_count`).
"""

from __future__ import annotations

import json
import pickle
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .operator import Filter, Frames, Operator, Sample
from .schema import REJECT_COLUMNS, fields_json, rejects_schema, scores_json

KEPT, DROPPED, FAILED, WRITTEN = "kept", "dropped", "failed", "written"

# One frame served to a model operator: raw pixels with their shape (uint8), not a pickle, so
# that they stay in Arrow buffers between the decode pass and the model's pre-processing.
FRAME = pa.struct([("step", pa.string()), ("request", pa.int32()), ("index", pa.int64()),
                   ("shape", pa.list_(pa.int32())), ("pixels", pa.large_binary())])

ROW_COLUMNS: dict[str, pa.DataType] = {
    "_source_index": pa.int64(),
    "_source_rows": pa.int64(),  # rows this source produced in all
    "_count": pa.int64(),  # rows this row stands for: 1, or a written part's rows
    "_status": pa.string(),  # kept | dropped | failed | written
    "_op": pa.string(),  # the step label that dropped or failed the sample
    "_reason": pa.string(),
    "_scores": pa.string(),  # JSON of the scores recorded before the decision
    "_fields": pa.string(),  # JSON of a per-source reject's sample (model stages keep the row itself)
    "_stats": pa.string(),  # JSON: the source's statistics, on one of its rows
    "_frames": pa.list_(FRAME),  # frames for the model operators still to run
    "_inputs": pa.binary(),  # a model operator's own inputs, between pre-processing and inference
    "_model_seconds": pa.string(),  # JSON: seconds per model operator spent on this row (or part)
    "_part": pa.string(),  # JSON of a written part: {"staged", "rows", "bytes"}
}

# Reject files hold the shard's identifying columns and these, without the underscore.
_REJECT_FIELDS = {"status": "_status", "op": "_op", "reason": "_reason", "scores": "_scores", "fields": "_fields"}


def result_schema(shard: pa.Schema) -> pa.Schema:
    return pa.schema(list(shard) + [pa.field(n, t) for n, t in ROW_COLUMNS.items()])


def reject_record(uri: str, sample: Sample | None, op: str, status: str, reason: str,
                  scores: dict[str, Any] | None = None) -> dict[str, Any]:
    """A dropped or failed sample (or, with no sample, the source itself) as a reject row."""
    sample = sample or {}
    return {"sample_id": sample.get("sample_id"), "kind": sample.get("kind", "source"), "source_uri": uri,
            "start_frame": sample.get("start_frame"), "end_frame": sample.get("end_frame"),
            "status": status, "op": op, "reason": reason, "scores": scores_json(scores or {}),
            "fields": fields_json(sample)}


def verdict(op: Operator, fields: dict[str, Any], stored: bool = False) -> str | None:
    """None when `op.keep(fields)` keeps the sample, else the reason it is dropped. `stored`:
    the scores are those an output stored (`bricks-dj refilter`), decided on by `keep_stored`."""
    decision = op.keep_stored(fields) if stored and isinstance(op, Filter) else op.keep(fields)
    if decision is True:
        return None
    return decision if isinstance(decision, str) else f"rejected by {op.name}"


def source_table(schema: pa.Schema, index: int, uri: str, kept: list[Sample], rejects: list[dict[str, Any]],
                 stats: dict[str, Any]) -> pa.Table:
    """One source's outcome as rows of `schema` (a `result_schema`)."""
    rows = []
    for sample in kept:
        row = dict(sample, _status=KEPT)
        if sample.get("_frames"):
            row["_frames"] = encode_frames(sample["_frames"])
        rows.append(row)
    for record in rejects:
        rows.append({_REJECT_FIELDS.get(k, k): v for k, v in record.items()})
    if not rows:  # e.g. every sample went through an operator that keeps nothing
        rows.append({_REJECT_FIELDS.get(k, k): v for k, v in
                     reject_record(uri, None, "pipeline", DROPPED, "no samples were produced").items()})
    for row in rows:
        row["_source_index"] = index
        row["_source_rows"] = len(rows)
        row["_count"] = 1
    rows[0]["_stats"] = json.dumps(dict(stats, uri=uri))
    return pa.table({f.name: [row.get(f.name) for row in rows] for f in schema}, schema=schema)


def encode_frames(attached: dict[str, list[Frames]]) -> list[dict[str, Any]]:
    """Per step, one entry saying how many requests it made (`index` null), then its frames."""
    entries = []
    for label, served in attached.items():
        entries.append({"step": label, "request": len(served), "index": None, "shape": None, "pixels": None})
        entries += [{"step": label, "request": k, "index": index, "shape": list(array.shape),
                     "pixels": np.ascontiguousarray(array, dtype=np.uint8).tobytes()}
                    for k, frames in enumerate(served) for index, array in zip(frames.indices, frames.arrays)]
    return entries


def decode_frames(cell: list[dict[str, Any]] | None, label: str) -> list[Frames] | None:
    """The frames served for step `label`, one `Frames` per request; None if the step does not
    apply to the sample."""
    mine = [f for f in cell or () if f["step"] == label]
    if not mine:
        return None
    served = [Frames([], []) for _ in range(next(f["request"] for f in mine if f["index"] is None))]
    for f in mine:
        if f["index"] is not None:
            served[f["request"]].indices.append(f["index"])
            served[f["request"]].arrays.append(np.frombuffer(f["pixels"], np.uint8).reshape(f["shape"]))
    return served


def is_kept(table: pa.Table) -> pa.ChunkedArray:
    return pc.equal(table.column("_status"), KEPT)


def samples(table: pa.Table, indices: list[int], shard: pa.Schema) -> list[Sample]:
    """Rows `indices` as samples: their shard columns only (what operators see)."""
    return table.select(shard.names).take(pa.array(indices, pa.int64())).to_pylist()


def set_values(table: pa.Table, name: str, indices: list[int], values: list[Any]) -> pa.Table:
    """`table` with column `name` set to `values` at rows `indices`."""
    position = table.schema.get_field_index(name)
    column = table.column(position).to_pylist()
    for i, value in zip(indices, values):
        column[i] = value
    return table.set_column(position, table.schema.field(position), pa.array(column, table.schema.field(position).type))


def mark(table: pa.Table, marks: dict[int, tuple[str, str, str, str | None]]) -> pa.Table:
    """`table` with rows marked dropped or failed: row -> (status, step label, reason, scores)."""
    if not marks:
        return table
    indices = list(marks)
    for k, name in enumerate(("_status", "_op", "_reason", "_scores")):
        table = set_values(table, name, indices, [marks[i][k] for i in indices])
    return table


def clear(table: pa.Table, name: str) -> pa.Table:
    position = table.schema.get_field_index(name)
    field = table.schema.field(position)
    return table.set_column(position, field, pa.nulls(table.num_rows, field.type))


def pickled(value: Any) -> bytes:
    # A model operator's inputs are its own objects (tensors, prompts); they live only from its
    # pre-processing stage to its actors.
    return pickle.dumps(value)


def unpickled(data: bytes) -> Any:
    return pickle.loads(data)


def split(table: pa.Table, shard: pa.Schema) -> tuple[pa.Table, pa.Table, list[dict[str, Any]]]:
    """A complete source's rows: (kept rows in the shard schema, reject rows in the rejects
    schema, written parts)."""
    status = table.column("_status")
    kept = table.filter(pc.equal(status, KEPT)).select(shard.names).cast(shard)
    parts = [json.loads(p) for p in table.filter(pc.equal(status, WRITTEN)).column("_part").to_pylist()]
    rejected = _with_fields(table.filter(pc.invert(pc.is_in(status, pa.array([KEPT, WRITTEN])))), shard)
    rejects = rejected.select([_REJECT_FIELDS.get(n, n) for n in REJECT_COLUMNS]).rename_columns(list(REJECT_COLUMNS))
    return kept, rejects.cast(rejects_schema()), parts


def _with_fields(rejected: pa.Table, shard: pa.Schema) -> pa.Table:
    """Rows a model stage (or a stage after it) marked still hold the sample's columns:
    their `_fields` are made from those, as the per-source rejects' are from the sample."""
    cells = rejected.column("_fields").to_pylist()
    todo = [i for i, (cell, sid) in enumerate(zip(cells, rejected.column("sample_id").to_pylist()))
            if cell is None and sid is not None]
    if not todo:
        return rejected
    names = [n for n in shard.names if n != "media"]
    made = [fields_json(row) for row in rejected.select(names).take(pa.array(todo, pa.int64())).to_pylist()]
    return set_values(rejected, "_fields", todo, made)


def write_kept(table: pa.Table, shard: pa.Schema, write: Callable[[pa.Table], list[dict[str, Any]]]) -> pa.Table:
    """`table` with each source's kept rows handed to `write` (which stores them and returns
    the parts it wrote) and replaced by one `written` row per part, which carries the source's
    statistics and its rows' model seconds on its first part."""
    kept = is_kept(table)
    if not pc.any(kept).as_py():
        return table
    written, kept_rows = [], table.filter(kept)
    for index in pc.unique(kept_rows.column("_source_index")).to_pylist():
        mine = kept_rows.filter(pc.equal(kept_rows.column("_source_index"), index))
        stats = next((s for s in mine.column("_stats").to_pylist() if s is not None), None)
        seconds: dict[str, float] = {}
        for cell in mine.column("_model_seconds").to_pylist():
            for label, spent in json.loads(cell or "{}").items():
                seconds[label] = seconds.get(label, 0.0) + spent
        for k, part in enumerate(write(mine.select(shard.names).cast(shard))):
            first = k == 0
            written.append({"_source_index": index, "_source_rows": mine.column("_source_rows")[0].as_py(),
                            "_count": part["rows"], "_status": WRITTEN, "_part": json.dumps(part),
                            "_stats": stats if first else None,
                            "_model_seconds": json.dumps(seconds) if first and seconds else None})
    schema = table.schema
    parts = pa.table({f.name: [w.get(f.name) for w in written] for f in schema}, schema=schema)
    return pa.concat_tables([table.filter(pc.invert(kept)), parts])


def row_count(table: pa.Table) -> int:
    """How many of a source's rows `table` (a piece of its results) stands for."""
    return int(pc.sum(pc.fill_null(table.column("_count"), 1)).as_py() or 0)


def source_stats(table: pa.Table) -> dict[str, Any]:
    return json.loads(next(s for s in table.column("_stats").to_pylist() if s is not None))


def add_model_stats(labels: list[str], table: pa.Table, stats: dict[str, Any]) -> None:
    """Model operators (and the filters and mappers after them) only mark rows: count their ins
    and outs from a complete source's rows."""
    rows = table.select(["_status", "_op", "_model_seconds", "_count"]).to_pylist()
    for k, label in enumerate(labels):
        later = set(labels[k:])
        survived = [r for r in rows if r["_status"] in (KEPT, WRITTEN)]
        reached = sum(r["_count"] or 1 for r in survived) + sum(1 for r in rows if r["_op"] in later)
        dropped = sum(1 for r in rows if r["_op"] == label and r["_status"] == DROPPED)
        failed = sum(1 for r in rows if r["_op"] == label and r["_status"] == FAILED)
        seconds = sum(json.loads(r["_model_seconds"] or "{}").get(label, 0.0) for r in rows)
        stats["ops"][label] = {"in": reached, "out": reached - dropped - failed,
                               "dropped": dropped, "failed": failed, "seconds": round(seconds, 4)}
    # A source whose samples all fell to model operators is dropped (or failed), not kept.
    if stats["status"] == KEPT and not any(r["_status"] in (KEPT, WRITTEN) for r in rows):
        stats["status"] = FAILED if any(r["_status"] == FAILED for r in rows) else DROPPED
