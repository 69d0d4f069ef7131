"""What the report shows, read from an output folder: pure data, no charts and no HTML.

Read: the manifest (funnel, recipe), the committed shards (every column but `media`) and the
rejects table. Thresholds come from the recipe's operator parameters: for an operator with
one float output column, each numeric `min_*` / `max_*` parameter is a bound on that column
(motion_filter's min_score on `flow`, aesthetic_filter's on `aes`, a Data-Juicer filter's
min/max on its `dj_*` stat).
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..output import MANIFEST, RUN_INFO, read_ledger
from ..schema import BASE_COLUMNS
from ..store import OutputError, Store, open_store, store_errors

# Numbers in reasons ("flow 0.012 < min_score 0.25") vary per sample: grouped without them.
NUMBER = re.compile(r"(?<![A-Za-z_])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


class ReportError(ValueError):
    """The report cannot be made; the message is one line."""


@dataclass
class Threshold:
    column: str
    op_label: str  # "3:motion_filter", as the rejects name it
    param: str  # "min_score"
    value: float

    @property
    def lower(self) -> bool:
        return self.param.startswith("min_")


@dataclass
class Rows:
    """One table as plain columns: {column: list}."""

    columns: dict[str, list]

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))

    def get(self, name: str) -> list:
        return self.columns.get(name) or [None] * len(self)

    def row(self, i: int) -> dict[str, Any]:
        return {k: v[i] for k, v in self.columns.items()}


@dataclass
class OutputData:
    store: Store
    manifest: dict[str, Any]
    kept: Rows  # committed shard rows, without media; `_shard`, `_group`, `_row` locate each
    rejects: Rows  # with `scores` parsed into `_scores` (dicts)
    score_columns: list[str] = field(default_factory=list)
    thresholds: list[Threshold] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be worked out, said in the report


def read_output(out: str | Store, manifest: dict[str, Any] | None = None) -> OutputData:
    """The output `out`; `manifest`, when given, is used instead of reading OUT/manifest.json
    (a run writes the report before its manifest)."""
    try:
        store = open_store(out)
    except OutputError as exc:
        raise ReportError(str(exc)) from None
    try:
        with store_errors(store):
            if not store.isfile(RUN_INFO):
                raise ReportError(f"{store.uri} is not a bricks-dj output (it has no {RUN_INFO})")
            if manifest is None:
                manifest = _read_manifest(store)
            ledger = read_ledger(store)
            kept = _read_kept(store, [s["file"] for e in ledger.entries for s in e["shards"]])
            rejects = _read_rejects(store, [name for e in ledger.entries for name in e["reject_files"]])
    except OutputError as exc:
        raise ReportError(str(exc)) from None
    data = OutputData(store, manifest, kept, rejects)
    data.score_columns = score_columns(manifest)
    data.thresholds, data.notes = thresholds(manifest, data.score_columns)
    return data


def from_rows(store: Store, manifest: dict[str, Any], kept: list[dict[str, Any]],
              rejects: list[dict[str, Any]]) -> OutputData:
    """An output held in memory (refilter's what-if): kept rows with their `media`, reject rows
    as the rejects table has them. Thumbnails then come from the rows' own media."""
    kept_columns = {name: [row.get(name) for row in kept] for name in dict.fromkeys(k for r in kept for k in r)}
    reject_columns = {name: [row.get(name) for row in rejects]
                      for name in dict.fromkeys(k for r in rejects for k in r)}
    reject_columns["_scores"] = [_parse_scores(row.get("scores")) for row in rejects]
    data = OutputData(store, manifest, Rows(kept_columns or {"sample_id": [], "kind": []}),
                      Rows(reject_columns if rejects else {"sample_id": [], "kind": [], "op": [], "status": [],
                                                           "reason": [], "_scores": []}))
    data.score_columns = score_columns(manifest)
    data.thresholds, data.notes = thresholds(manifest, data.score_columns)
    return data


def _read_manifest(store: Store) -> dict[str, Any]:
    if not store.isfile(MANIFEST):
        raise ReportError(f"{store.show(MANIFEST)} is missing: the run has not finished (rerun it to resume)")
    try:
        manifest = json.loads(store.read_text(MANIFEST))
    except (ValueError, UnicodeDecodeError):
        raise ReportError(f"{store.show(MANIFEST)} is not JSON") from None
    if not isinstance(manifest, dict) or not {"ops", "recipe", "columns"} <= set(manifest):
        raise ReportError(f"{store.show(MANIFEST)} is not a manifest bricks-dj wrote")
    return manifest


def _read_kept(store: Store, shards: list[str]) -> Rows:
    tables = []
    for shard in shards:
        with store.fs.open(store.path(shard), "rb") as f:
            parquet = pq.ParquetFile(f)
            names = [n for n in parquet.schema_arrow.names if n != "media"]
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group, columns=names)
                n = table.num_rows
                tables.append(table.append_column("_shard", pa.array([shard] * n, pa.string()))
                              .append_column("_group", pa.array([group] * n, pa.int64()))
                              .append_column("_row", pa.array(range(n), pa.int64())))
    if not tables:
        return Rows({"sample_id": [], "kind": []})
    # Shards of one output share a schema; "default" also lines up columns one of them lacks.
    return Rows(pa.concat_tables(tables, promote_options="default").to_pydict())


def _read_rejects(store: Store, files: list[str]) -> Rows:
    tables = []
    for name in files:
        with store.fs.open(store.path(name), "rb") as f:
            tables.append(pq.read_table(f))
    if not tables:
        return Rows({"sample_id": [], "kind": [], "op": [], "status": [], "reason": [], "_scores": []})
    columns = pa.concat_tables(tables).to_pydict()
    columns["_scores"] = [_parse_scores(s) for s in columns["scores"]]
    return Rows(columns)


def _parse_scores(text: str | None) -> dict[str, Any]:
    try:
        found = json.loads(text) if text else {}
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


# -- funnel ---------------------------------------------------------------------------------------

def funnel(data: OutputData) -> list[dict[str, Any]]:
    """Per operator, in recipe order: in, out, dropped, failed (the manifest's counts) and the
    reasons of its rejects, grouped with the numbers taken out, most frequent first."""
    reasons: dict[str, Counter] = {}
    for op, status, reason in zip(data.rejects.get("op"), data.rejects.get("status"), data.rejects.get("reason")):
        reasons.setdefault(op, Counter())[(status, reason_group(reason))] += 1
    steps = []
    for op in data.manifest["ops"]:
        label = f"{op['index']}:{op['name']}"
        steps.append({"label": label, "name": op["name"], "in": op["in"], "out": op["out"], "dropped": op["dropped"],
                      "failed": op["failed"], "seconds": op.get("seconds", 0.0),
                      "reasons": [(status, text, n) for (status, text), n in reasons.pop(label, Counter()).most_common()]})
    # Rejects no operator step accounts for: the source itself ("read").
    others = [(op, status, text, n) for op, counter in sorted(reasons.items())
              for (status, text), n in counter.most_common()]
    if others:
        steps.insert(0, {"label": "read", "name": "read", "in": None, "out": None,
                         "dropped": sum(n for _, s, _, n in others if s == "dropped"),
                         "failed": sum(n for _, s, _, n in others if s == "failed"), "seconds": None,
                         "reasons": [(s, f"{op}: {t}" if op != "read" else t, n) for op, s, t, n in others]})
    return steps


def reason_group(reason: str | None) -> str:
    return NUMBER.sub("#", reason or "(no reason given)")


# -- scores and thresholds ------------------------------------------------------------------------

def score_columns(manifest: dict[str, Any]) -> list[str]:
    """The operators' float columns (flow, aes, dj_*, a plug-in's)."""
    return [name for name, dtype in manifest["columns"].items()
            if name not in BASE_COLUMNS and dtype in ("double", "float", "halffloat")]


def thresholds(manifest: dict[str, Any], columns: list[str]) -> tuple[list[Threshold], list[str]]:
    from .. import registry

    found, notes = [], []
    for index, step in enumerate(manifest["recipe"].get("process", [])):
        (name, params), = step.items()
        bounds = {k: v for k, v in (params or {}).items()
                  if k.startswith(("min_", "max_")) and _bound(v)}
        if not bounds:
            continue
        try:
            cls = registry.get(name)
        except (registry.RegistryError, ImportError) as exc:
            notes.append(f"thresholds of {name} not drawn: {str(exc).splitlines()[0]}")
            continue
        outputs = cls.outputs
        declared = getattr(cls, "thresholds", ())  # an operator may name the parameters `keep` compares
        if declared:
            bounds = {k: v for k, v in bounds.items() if k in declared}
        floats = [c for c in outputs if c in columns]
        for param, value in bounds.items():
            column = floats[0] if len(floats) == 1 else _column_named(floats, param[4:])
            if column is not None:  # else a metadata filter (min_width: no score column)
                found.append(Threshold(column, f"{index}:{name}", param, float(value)))
    return found, notes


def _column_named(columns: list[str], suffix: str) -> str | None:
    """Of an operator's several score columns, the one a bound `min_<suffix>` is for
    (`min_width` -> `dj_video_width`); None unless exactly one matches."""
    named = [c for c in columns if c == suffix or c.endswith("_" + suffix)]
    return named[0] if len(named) == 1 else None


def _bound(value: Any) -> bool:
    """A number that bounds something: not a flag, and not "no bound" (Data-Juicer's filters
    default their maxima to the largest float)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < sys.float_info.max


def score_values(data: OutputData, column: str) -> dict[str, list[float]]:
    """Kept values, and dropped values split into those the column's own operator dropped and
    those later operators dropped (their scores were recorded before the decision)."""
    owners = {t.op_label for t in data.thresholds if t.column == column}
    values: dict[str, list[float]] = {"kept": [], "dropped here": [], "dropped later": []}
    values["kept"] = [float(v) for v in data.kept.get(column) if _finite(v)]
    for op, status, scores in zip(data.rejects.get("op"), data.rejects.get("status"), data.rejects.get("_scores")):
        value = scores.get(column)
        if status == "dropped" and _finite(value):
            values["dropped here" if op in owners else "dropped later"].append(float(value))
    return values


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def near_threshold(data: OutputData, threshold: Threshold, k: int = 3) -> dict[str, list[dict[str, Any]]]:
    """The `k` kept and the `k` dropped (by the threshold's operator) samples whose score is
    closest to the threshold; rows as dicts with `score`."""
    col = threshold.column
    kept = [dict(data.kept.row(i), score=float(v)) for i, v in enumerate(data.kept.get(col)) if _finite(v)]
    dropped = [dict(data.rejects.row(i), score=float(s[col]))
               for i, (op, status, s) in enumerate(zip(data.rejects.get("op"), data.rejects.get("status"),
                                                       data.rejects.get("_scores")))
               if op == threshold.op_label and status == "dropped" and _finite(s.get(col))]

    # Kept samples of the kinds the operator judged (an image cut from a clip inherits its score).
    kinds = {r["kind"] for r in dropped}
    if kinds:
        kept = [r for r in kept if r["kind"] in kinds]

    def closest(rows):
        return sorted(rows, key=lambda r: (abs(r["score"] - threshold.value), r["sample_id"]))[:k]

    return {"kept": closest(kept), "dropped": closest(dropped)}


def spread_sample(data: OutputData, k: int = 6) -> list[dict[str, Any]]:
    """`k` kept samples spread evenly over the shards' order (clips first, then images)."""
    kinds = data.kept.get("kind")
    order = [i for i, kind in enumerate(kinds) if kind == "video"] + [i for i, kind in enumerate(kinds) if kind != "video"]
    if len(order) <= k:
        return [data.kept.row(i) for i in order]
    step = len(order) / k
    return [data.kept.row(order[int(j * step)]) for j in range(k)]


# -- distributions ----------------------------------------------------------------------------------

def distributions(data: OutputData) -> dict[str, list[float]]:
    """Duration (clips), height, width, aspect ratio (height / width) and fps (clips) of the kept samples."""
    kept = data.kept
    video = [kind == "video" for kind in kept.get("kind")]
    frames, fps = kept.get("num_frames"), kept.get("fps")
    return {
        "duration": [n / f for n, f, v in zip(frames, fps, video) if v and n and f],
        "fps": [float(f) for f, v in zip(fps, video) if v and f],
        "aspect_ratio": [float(a) for a in kept.get("aspect_ratio") if a],
        "size": [f"{w}x{h}" for w, h in zip(kept.get("width"), kept.get("height")) if w and h],
    }
