"""The output: Parquet shards, the rejects table, the commit ledger and the manifest, in a
local folder or under a prefix on an object store (`s3://BUCKET/PREFIX`; see `store`).

    OUT/shards/part-NNNNNN.parquet        kept samples (zstd), one file per staged part, numbered in order
    OUT/rejects/part-NNNNN.parquet        every dropped or failed source or sample, with op and reason
    OUT/_state/commits/NNNNN.json         the ledger: one object per commit, its files and sources
    OUT/_state/run.json                   the recipe key the output belongs to
    OUT/manifest.json                     recipe, versions, counts per operator, shards
    OUT/.bricks.lock                      held while a run writes (pid and host of the holder)

Kept rows never pass through the driver: the worker that holds them writes them to a staged
part (`stage_part`: `shards/.<uuid>.parquet.bricks-tmp`) and sends on only its name and counts.
The driver commits whole sources (`ShardWriter`): it writes their rejects under a temporary name,
then the commit's ledger object (which names each part's staged and final name), then moves
every staged file to its final name. A file is visible under a final name only once complete
(a rename, or on an object store a server-side copy of a complete object), and the ledger
object is written whole (one PUT, or a rename), never appended to. A run killed at any point
leaves staged files that the next run moves into place (their commit's ledger object is there)
or deletes (it is not), so resuming never duplicates or loses a sample.

A commit gathers sources until `rows_per_shard` or `shard_mb` is reached, as it did when the
driver wrote the shards. Workers keep each part within the limits; at commit, runs of small
parts are merged into one (`merge_parts`, run where the workers are), and each part left
becomes one shard file.

The output is the user's: bricks deletes only its own files (those in its ledger, its ledger
objects, and its temporary and staged files), and refuses an output that holds anything else
where it writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from bricks.common.video import local_path

from .dataset_card import CARD, card_is_ours
from .output_lock import ObjectLock, OutputLock, OutputLockedError  # noqa: F401 (OutputLockedError: API)
from .pipeline import OpStats
from .schema import rejects_schema
from .store import TEMP_SUFFIX, OutputError, Store, bucket_missing, open_store, relation, store_errors, temp_name

LEDGER_DIR = "_state/commits"
# Earlier versions' ledger, one appended line per commit: read (before the ledger objects) so
# their outputs resume, never written to again.
LEGACY_LEDGER = "_state/commits.jsonl"
LEDGER_OBJECT = re.compile(r"\d{5,}\.json")
RUN_INFO = "_state/run.json"
LOCK = ".bricks.lock"
MANIFEST = "manifest.json"
# Temporary and staged files: this version's, and those of versions that named them `.NAME.tmp`.
TEMP_FILE = re.compile(r"\..+\.bricks-tmp|\.(part-\d{5}(-\d{3})?\.parquet|manifest\.json|run\.json)\.tmp")

def ledger_object(part: int) -> str:
    return f"{LEDGER_DIR}/{part:05d}.json"


def stage_part(out: str | os.PathLike | Store, table: pa.Table, row_group_rows: int = 64) -> dict[str, Any]:
    """Write kept rows (in the shard schema) to a staged file under `OUT/shards/`, for a later
    commit to name; called where the rows are, so that their bytes never reach the driver.

    One part becomes one shard file: the caller keeps it within `rows_per_shard` and
    `shard_mb`. Returns what the commit needs: {"staged": name, "rows": n, "bytes": size,
    "samples": {"video": n, "image": n}}. A part no commit names is deleted by the next run."""
    if table.num_rows == 0:
        raise ValueError("stage_part: the table is empty; stage kept rows only")
    store = open_store(out)
    name = f"shards/.{uuid.uuid4().hex}.parquet{TEMP_SUFFIX}"
    with store_errors(store):
        size = store.write_parquet(name, table, row_group_rows)
    kinds = table.column("kind").to_pylist()
    return {"staged": name, "rows": table.num_rows, "bytes": size,
            "samples": {"video": kinds.count("video"), "image": kinds.count("image")}}


def merge_parts(out: str | os.PathLike | Store, parts: list[dict[str, Any]], row_group_rows: int = 64) -> dict[str, Any]:
    """Staged parts as one staged part, their rows in order; the parts merged are deleted.
    Run where a worker runs, so that their bytes never reach the driver."""
    store = open_store(out)
    with store_errors(store):
        tables = []
        for part in parts:
            with store.fs.open(store.path(part["staged"]), "rb") as f:
                tables.append(pq.read_table(f))
        merged = stage_part(store, pa.concat_tables(tables), row_group_rows)
        for part in parts:
            store.remove(part["staged"])
    return merged


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
    skipped_packets: dict[str, int] = field(default_factory=dict)  # per source, where any were
    nodes: dict[str, int] = field(default_factory=dict)  # sources processed per node (Ray node id or host)

    def record(self, entry: dict[str, Any]) -> None:
        self.done_sources.update(entry["sources"])
        self.next_part = max(self.next_part, entry["part"] + 1)
        self.shards.extend({k: v for k, v in s.items() if k != "staged"} for s in entry["shards"])
        for key in ("source_status", "rejects", "samples"):
            for name, count in entry[key].items():
                getattr(self, key)[name] = getattr(self, key).get(name, 0) + count
        for label, stats in entry["ops"].items():
            self.ops.setdefault(label, OpStats()).add(OpStats.from_dict(stats))
        self.frames_decoded += entry["frames_decoded"]
        self.decode_seconds += entry["decode_seconds"]
        self.skipped_packets.update(entry.get("skipped_packets", {}))
        for node, count in entry.get("nodes", {}).items():
            self.nodes[node] = self.nodes.get(node, 0) + count


@dataclass
class Ledger:
    """The commit ledger as read from the output."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def staged(self) -> dict[str, str]:
        """Each committed file's final name and the name it was staged under."""
        names = {}
        for entry in self.entries:
            for shard in entry["shards"]:
                names[shard["file"]] = shard.get("staged") or temp_name(shard["file"])
            for name in entry["reject_files"]:
                names[name] = temp_name(name)
        return names

    @property
    def files(self) -> set[str]:
        return set(self.staged)


def read_ledger(out: str | os.PathLike | Store) -> Ledger:
    store = open_store(out)
    ledger = Ledger(_read_legacy_ledger(store))
    objects = [name for name, is_dir in store.list(LEDGER_DIR) if not is_dir and LEDGER_OBJECT.fullmatch(name)]
    for name in sorted(objects, key=lambda n: int(n.split(".")[0])):
        text = store.read_text(f"{LEDGER_DIR}/{name}")
        try:
            entry = json.loads(text)
            if not isinstance(entry, dict) or "part" not in entry:
                raise ValueError("not a commit")
        except ValueError:
            # Written whole, a ledger object cannot be torn: something else changed it.
            raise OutputError(f"output {store.uri}: the ledger object {store.show(f'{LEDGER_DIR}/{name}')} "
                              "is not a commit bricks-dj wrote; restore it, or choose another output") from None
        ledger.entries.append(entry)
    return ledger


def _read_legacy_ledger(store: Store) -> list[dict[str, Any]]:
    if not store.isfile(LEGACY_LEDGER):
        return []
    entries = []
    for line in store.read_text(LEGACY_LEDGER).splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # cut short while being appended: that commit never happened
            continue
    return entries


def check_location(out: str | os.PathLike | Store, input_folders: list[str | os.PathLike] = ()) -> None:
    """Refuse an output that is not a folder (a local one, or a prefix in an existing bucket),
    or that lies in the input."""
    store = open_store(out)
    if store.local:
        given = Path(local_path(store.uri))
        existing = next(p for p in (given, *given.parents) if p.exists() or p.is_symlink())
        if not existing.is_dir():
            what = "a file" if existing.is_file() else "not a folder"
            where = f"is {what}" if existing == given else f"is inside {existing}, which is {what}"
            raise OutputError(f"output {store.uri} {where}; choose a folder")
    else:
        with store_errors(store):
            if bucket_missing(store):
                raise OutputError(f"output {store.uri}: bucket {store.bucket} does not exist")
            if store.isfile():
                raise OutputError(f"output {store.uri} is an object, not a prefix; choose a folder")
    for folder in input_folders:
        folder = os.fspath(folder)
        found = relation(store, folder)
        if found:
            where = "is the input folder" if found == "same" else f"is inside the input folder {folder}"
            raise OutputError(f"output {store.uri} {where}; choose an output folder outside the input")


def foreign_files(out: str | os.PathLike | Store, ledger: Ledger) -> list[str]:
    """What the output holds that bricks did not write, where bricks writes (names relative to
    it). In a bricks output, other files beside `shards/`, `rejects/` and `_state/` are the
    user's and left alone; a folder that is not one must hold nothing but bricks' own names."""
    store = open_store(out)
    ours = ledger.files
    is_bricks_output = store.isfile(RUN_INFO)
    foreign = []
    for name, is_dir in store.list():
        if name in ("shards", "rejects", "_state") and is_dir:
            for inner, inner_dir in store.list(name):
                path = f"{name}/{inner}"
                if path == LEDGER_DIR and inner_dir:
                    foreign += [f"{path}/{n}" + ("/" if d else "") for n, d in store.list(path)
                                if d or not (LEDGER_OBJECT.fullmatch(n) or TEMP_FILE.fullmatch(n))]
                    continue
                own = path in ours or path in (LEGACY_LEDGER, RUN_INFO) or TEMP_FILE.fullmatch(inner)
                if not own or inner_dir:
                    foreign.append(path + ("/" if inner_dir else ""))
        elif name == LOCK or TEMP_FILE.fullmatch(name) or (name == MANIFEST and is_bricks_output):
            continue
        elif not is_bricks_output:
            foreign.append(name + ("/" if is_dir else ""))
    return foreign


def refuse_foreign(out: str | os.PathLike | Store, ledger: Ledger) -> None:
    store = open_store(out)
    foreign = foreign_files(store, ledger)
    if not foreign:
        return
    named = ", ".join(foreign[:2]) + (f" and {len(foreign) - 2} more" if len(foreign) > 2 else "")
    if store.isfile(RUN_INFO):
        raise OutputError(f"output {store.uri} holds files that bricks-dj did not write ({named}); "
                          "move them elsewhere or choose another output folder")
    raise OutputError(f"output {store.uri} is not empty and holds no bricks-dj run ({named}); "
                      "choose a new or empty folder")


def prepare(out: str | os.PathLike | Store, recipe_key: str, overwrite: bool) -> Progress:
    """Pick up a previous run of the same recipe in `out`, or start afresh; call it holding
    the output (`claim`), before any worker stages a part. Interrupted commits are finished or
    discarded; `overwrite` deletes bricks' own files only, and nothing happens to an output
    that holds files of others."""
    store = open_store(out)
    with store_errors(store):
        ledger = read_ledger(store)
        refuse_foreign(store, ledger)
        if overwrite:
            _remove_own_files(store, ledger)
            ledger = Ledger()
        else:
            if store.isfile(RUN_INFO) and _recorded_key(store) != recipe_key:
                raise OutputError(
                    f"output {store.uri} holds a run of a different recipe (or operator parameters); "
                    "use --overwrite to start over, or another output folder"
                )
            _refuse_relative_sources(store, ledger)
            _finish_commits(store, ledger)
        for sub in ("_state", LEDGER_DIR, "shards", "rejects"):
            store.makedirs(sub)
        if not store.isfile(RUN_INFO):
            store.write(RUN_INFO, json.dumps({"recipe_key": recipe_key}))
    progress = Progress()
    for entry in ledger.entries:
        progress.record(entry)
    return progress


def _recorded_key(store: Store) -> str | None:
    try:
        return json.loads(store.read_text(RUN_INFO)).get("recipe_key")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise OutputError(f"{store.show(RUN_INFO)}: not the run record bricks-dj writes; "
                          "use --overwrite to start over") from None


def _refuse_relative_sources(store: Store, ledger: Ledger) -> None:
    # Earlier versions recorded sources as given; they would not match the absolute paths now
    # listed, and every source would be processed (and written) a second time.
    relative = next((s for e in ledger.entries for s in e["sources"] if "://" not in s and not os.path.isabs(s)), None)
    if relative is not None:
        raise OutputError(f"output {store.uri} records relative source paths (such as {relative}) from an earlier "
                          "bricks-dj; use --overwrite to start over")


def _temp_files(store: Store) -> list[str]:
    found = []
    for folder in ("", "shards", "rejects", "_state", LEDGER_DIR):
        prefix = f"{folder}/" if folder else ""
        found += [prefix + name for name, is_dir in store.list(folder) if not is_dir and TEMP_FILE.fullmatch(name)]
    return found


def _finish_commits(store: Store, ledger: Ledger) -> None:
    present = {f"{sub}/{name}" for sub in ("shards", "rejects") for name, is_dir in store.list(sub) if not is_dir}
    for name, staged in sorted(ledger.staged.items()):
        if name in present:
            continue
        if staged not in present:
            raise OutputError(f"output {store.uri}: {name} is in the commit ledger but missing; "
                              "use --overwrite to start over")
        store.move(staged, name)  # committed, killed before (or while) moving
    for name in _temp_files(store):  # staged for commits that never happened, or copied already
        store.remove(name)


def discard_uncommitted(out: str | os.PathLike | Store) -> None:
    """After a run stopped on an error, holding the output still: finish any commit whose
    moves were cut short and delete the staged parts no commit names, so that a full disk gets
    its space back now rather than at the next run's `prepare`. A part a worker stages after
    this is only left for that `prepare`: no commit can name it."""
    store = open_store(out)
    with store_errors(store):
        _finish_commits(store, read_ledger(store))


def _remove_own_files(store: Store, ledger: Ledger) -> None:
    # Ledger objects after the files they name: cut short, this leaves a ledger that
    # `--overwrite` (not a resume) clears.
    for name in sorted(ledger.files):
        store.remove(name)
    for name in _temp_files(store):
        store.remove(name)
    for name, is_dir in store.list(LEDGER_DIR):
        if not is_dir and LEDGER_OBJECT.fullmatch(name):
            store.remove(f"{LEDGER_DIR}/{name}")
    for name in (LEGACY_LEDGER, MANIFEST, RUN_INFO):
        store.remove(name)
    if card_is_ours(store):  # describes the run being discarded; someone else's card stays
        store.remove(CARD)
    from .refilter import WHATIF, WHATIF_REPORT, whatif_is_ours  # both read outputs with this module
    from .report.page import REPORT, report_is_ours

    for report in (REPORT, WHATIF_REPORT):  # the same: these describe the discarded run
        if report_is_ours(store, report):
            store.remove(report)
    if whatif_is_ours(store):
        store.remove(WHATIF)


@contextlib.contextmanager
def claim(out: str | os.PathLike | Store, input_folders: list[str | os.PathLike] = ()) -> Iterator[Store]:
    """Hold the output for one run: checked (not in the input, not someone else's folder),
    created, and locked against other runs until the block ends. Yields its store."""
    store = open_store(out)
    check_location(store, input_folders)
    with store_errors(store):
        if not store.isfile(RUN_INFO):  # nothing is created in a folder that is not ours
            refuse_foreign(store, Ledger())
        store.makedirs()
        lock = OutputLock(Path(store.root) / LOCK) if store.local else ObjectLock(store, LOCK)
        lock.acquire()
    try:
        yield store
    finally:
        with store_errors(store):
            lock.release()


def write_manifest(out: str | os.PathLike | Store, manifest: dict[str, Any]) -> None:
    store = open_store(out)
    with store_errors(store):
        store.write(MANIFEST, json.dumps(manifest, indent=2))


class ShardWriter:
    """Commits whole sources: their staged parts as shards, their rejects, one ledger object."""

    def __init__(self, out: str | os.PathLike | Store, progress: Progress, rows_per_shard: int,
                 shard_bytes: int, row_group_rows: int = 64,
                 merge: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None) -> None:
        self.store = open_store(out)
        # Merges consecutive small parts into one (`merge_parts`, where the runner's workers
        # are), so that many short sources make few shards; None keeps one shard per part.
        self.merge = merge
        self.progress = progress
        self.rows_per_shard = rows_per_shard
        self.shard_bytes = shard_bytes
        self.row_group_rows = row_group_rows
        self._reset()

    def _reset(self) -> None:
        self.parts: list[dict[str, Any]] = []
        self.rejects: list[pa.Table] = []
        self.sources: list[str] = []
        self.stats: list[dict[str, Any]] = []
        self.pending_rows = 0
        self.pending_bytes = 0

    def add(self, uri: str, parts: list[dict[str, Any]], rejects: pa.Table, stats: dict[str, Any]) -> None:
        """One finished source: the parts `stage_part` wrote of its kept rows, and its rejects."""
        self.parts.extend(parts)
        self.rejects.append(rejects)
        self.sources.append(uri)
        self.stats.append(stats)
        self.pending_rows += sum(p["rows"] for p in parts)
        self.pending_bytes += sum(p["bytes"] for p in parts)
        if self.pending_rows >= self.rows_per_shard or self.pending_bytes >= self.shard_bytes:
            self.commit()

    def commit(self) -> None:
        if not self.sources:
            return
        part = self.progress.next_part
        self.parts = self._merged(self.parts)
        rejects = pa.concat_tables(self.rejects) if self.rejects else rejects_schema().empty_table()
        # Numbered across commits, so that the files' names sort in the order of their rows.
        first = len(self.progress.shards)
        shards = [{"file": f"shards/part-{first + k:06d}.parquet", "staged": p["staged"], "rows": p["rows"],
                   "bytes": p["bytes"]} for k, p in enumerate(self.parts)]
        with store_errors(self.store):
            reject_files = []
            if rejects.num_rows:
                name = f"rejects/part-{part:05d}.parquet"
                self.store.write_parquet(temp_name(name), rejects, self.row_group_rows)
                reject_files.append(name)
            entry = self._ledger_entry(part, shards, reject_files, rejects)
            # The commit: from here on, its files are moved into place (now, or by the next run).
            self.store.write(ledger_object(part), json.dumps(entry))
            for shard in shards:
                self.store.move(shard["staged"], shard["file"])
            for name in reject_files:
                self.store.move(temp_name(name), name)
        self.progress.record(entry)
        self._reset()

    def _merged(self, parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`parts` with each run of consecutive parts under a quarter of the shard size merged,
        up to the shard limits."""
        if self.merge is None:
            return parts
        merged: list[dict[str, Any]] = []
        run: list[dict[str, Any]] = []

        def close_run() -> None:
            merged.extend([self.merge(run)] if len(run) > 1 else run)
            run.clear()

        for p in parts:
            if p["bytes"] >= self.shard_bytes // 4:
                close_run()
                merged.append(p)
                continue
            if run and (sum(r["rows"] for r in run) + p["rows"] > self.rows_per_shard
                        or sum(r["bytes"] for r in run) + p["bytes"] > self.shard_bytes):
                close_run()
            run.append(p)
        close_run()
        return merged

    def _ledger_entry(self, part, shards, reject_files, rejects) -> dict[str, Any]:
        ops: dict[str, OpStats] = {}
        status = {"kept": 0, "dropped": 0, "failed": 0}
        for stats in self.stats:
            status[stats["status"]] += 1
            for label, op in stats["ops"].items():
                ops.setdefault(label, OpStats()).add(OpStats.from_dict(op))
        statuses = rejects.column("status").to_pylist() if rejects.num_rows else []
        return {
            "part": part, "shards": shards, "reject_files": reject_files, "sources": self.sources,
            "source_status": status,
            "samples": {kind: sum(p["samples"][kind] for p in self.parts) for kind in ("video", "image")},
            "rejects": {"dropped": statuses.count("dropped"), "failed": statuses.count("failed")},
            "ops": {k: v.to_dict() for k, v in ops.items()},
            "frames_decoded": sum(s["frames_decoded"] for s in self.stats),
            "decode_seconds": round(sum(s["decode_seconds"] for s in self.stats), 4),
            "skipped_packets": {s["uri"]: s["skipped_packets"] for s in self.stats if s.get("skipped_packets")},
            "nodes": dict(Counter(s["node"] for s in self.stats if s.get("node"))),
        }
