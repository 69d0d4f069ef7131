"""The output folder: Parquet shards, the rejects table, the commit ledger and the manifest.

    OUT/shards/part-NNNNN.parquet    kept samples (zstd)
    OUT/rejects/part-NNNNN.parquet   every dropped or failed source or sample, with op and reason
    OUT/_state/commits.jsonl         one line per commit: its files and the sources it completes
    OUT/manifest.json                recipe, versions, counts per operator, shards

Sources are committed whole: their shard and reject files are written under temporary names,
renamed, and only then is the ledger line appended. A run killed at any point leaves files
that the next run either finds in the ledger (done) or deletes (partial), so resuming never
duplicates or loses a sample.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .pipeline import OpStats
from .schema import rejects_schema

LEDGER = "_state/commits.jsonl"
RUN_INFO = "_state/run.json"


class OutputError(ValueError):
    pass


def write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_parquet_atomic(path: Path, table: pa.Table, row_group_rows: int) -> int:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_rows)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


@dataclass
class Progress:
    """What the ledger says is done: carried across resumed runs."""

    done_sources: set[str] = field(default_factory=set)
    next_part: int = 0
    shards: list[dict[str, Any]] = field(default_factory=list)
    source_status: dict[str, int] = field(default_factory=lambda: {"kept": 0, "dropped": 0, "failed": 0})
    rejects: dict[str, int] = field(default_factory=lambda: {"dropped": 0, "failed": 0})
    samples: dict[str, int] = field(default_factory=lambda: {"video": 0, "image": 0})
    ops: dict[str, OpStats] = field(default_factory=dict)
    frames_decoded: int = 0
    decode_seconds: float = 0.0

    def record(self, entry: dict[str, Any]) -> None:
        self.done_sources.update(entry["sources"])
        self.next_part = max(self.next_part, entry["part"] + 1)
        self.shards.extend(entry["shards"])
        for key in ("source_status", "rejects", "samples"):
            for name, count in entry[key].items():
                getattr(self, key)[name] = getattr(self, key).get(name, 0) + count
        for label, stats in entry["ops"].items():
            self.ops.setdefault(label, OpStats()).add(OpStats.from_dict(stats))
        self.frames_decoded += entry["frames_decoded"]
        self.decode_seconds += entry["decode_seconds"]


def prepare(out: Path, recipe_key: str, overwrite: bool) -> Progress:
    """Create the output folder, or pick up a previous run of the same recipe in it."""
    if "://" in str(out):
        raise OutputError(f"output {out}: must be a local or mounted folder (atomic renames are needed)")
    if overwrite and out.exists():
        for name in ("shards", "rejects", "_state", "manifest.json"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    for sub in ("shards", "rejects", "_state"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    info_path = out / RUN_INFO
    if info_path.exists():
        previous = json.loads(info_path.read_text()).get("recipe_key")
        if previous != recipe_key:
            raise OutputError(
                f"output {out} holds a run of a different recipe (or operator parameters); "
                "use --overwrite to start over, or another output folder"
            )
    else:
        write_atomic(info_path, json.dumps({"recipe_key": recipe_key}))
    progress = Progress()
    committed: set[str] = set()
    ledger = out / LEDGER
    if ledger.exists():
        for line in ledger.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill: its files are cleaned up below
            progress.record(entry)
            committed.update(s["file"] for s in entry["shards"])
            committed.update(entry["reject_files"])
    # Files not in the ledger belong to a commit that never finished.
    for sub in ("shards", "rejects"):
        for path in (out / sub).iterdir():
            if f"{sub}/{path.name}" not in committed:
                path.unlink()
    return progress


class ShardWriter:
    """Collects whole sources and commits them as shards, rejects and one ledger line."""

    def __init__(self, out: Path, schema: pa.Schema, progress: Progress, rows_per_shard: int,
                 shard_bytes: int, row_group_rows: int = 64) -> None:
        self.out = out
        self.schema = schema
        self.progress = progress
        self.rows_per_shard = rows_per_shard
        self.shard_bytes = shard_bytes
        self.row_group_rows = row_group_rows
        self._reset()

    def _reset(self) -> None:
        self.kept: list[pa.Table] = []
        self.rejects: list[pa.Table] = []
        self.sources: list[str] = []
        self.stats: list[dict[str, Any]] = []
        self.pending_rows = 0
        self.pending_bytes = 0

    def add(self, uri: str, kept: pa.Table, rejects: pa.Table, stats: dict[str, Any]) -> None:
        self.kept.append(kept)
        self.rejects.append(rejects)
        self.sources.append(uri)
        self.stats.append(stats)
        self.pending_rows += kept.num_rows
        self.pending_bytes += kept.nbytes
        if self.pending_rows >= self.rows_per_shard or self.pending_bytes >= self.shard_bytes:
            self.commit()

    def commit(self) -> None:
        if not self.sources:
            return
        part = self.progress.next_part
        kept = pa.concat_tables(self.kept).cast(self.schema) if self.kept else self.schema.empty_table()
        rejects = pa.concat_tables(self.rejects) if self.rejects else rejects_schema().empty_table()
        shards = []
        for k, chunk in enumerate(self._chunks(kept)):
            name = f"shards/part-{part:05d}.parquet" if k == 0 else f"shards/part-{part:05d}-{k:03d}.parquet"
            size = write_parquet_atomic(self.out / name, chunk, self.row_group_rows)
            shards.append({"file": name, "rows": chunk.num_rows, "bytes": size})
        reject_files = []
        if rejects.num_rows:
            name = f"rejects/part-{part:05d}.parquet"
            write_parquet_atomic(self.out / name, rejects, self.row_group_rows)
            reject_files.append(name)
        entry = self._ledger_entry(part, shards, reject_files, kept, rejects)
        with open(self.out / LEDGER, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.progress.record(entry)
        self._reset()

    def _chunks(self, table: pa.Table):
        if table.num_rows == 0:
            return []
        # Split a commit that is far over the limits (one source with very many clips).
        per_row = max(1, table.nbytes // table.num_rows)
        rows = max(1, min(self.rows_per_shard, self.shard_bytes // per_row))
        return [table.slice(i, rows) for i in range(0, table.num_rows, rows)]

    def _ledger_entry(self, part, shards, reject_files, kept, rejects) -> dict[str, Any]:
        ops: dict[str, OpStats] = {}
        status = {"kept": 0, "dropped": 0, "failed": 0}
        for stats in self.stats:
            status[stats["status"]] += 1
            for label, op in stats["ops"].items():
                ops.setdefault(label, OpStats()).add(OpStats.from_dict(op))
        kinds = kept.column("kind").to_pylist() if kept.num_rows else []
        statuses = rejects.column("status").to_pylist() if rejects.num_rows else []
        return {
            "part": part, "shards": shards, "reject_files": reject_files, "sources": self.sources,
            "source_status": status,
            "samples": {"video": kinds.count("video"), "image": kinds.count("image")},
            "rejects": {"dropped": statuses.count("dropped"), "failed": statuses.count("failed")},
            "ops": {k: v.to_dict() for k, v in ops.items()},
            "frames_decoded": sum(s["frames_decoded"] for s in self.stats),
            "decode_seconds": round(sum(s["decode_seconds"] for s in self.stats), 4),
        }
