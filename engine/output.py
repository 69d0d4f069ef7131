"""The output folder: Parquet shards, the rejects table, the commit ledger and the manifest.

    OUT/shards/part-NNNNN.parquet    kept samples (zstd)
    OUT/rejects/part-NNNNN.parquet   every dropped or failed source or sample, with op and reason
    OUT/_state/commits.jsonl         one line per commit: its files and the sources it completes
    OUT/_state/run.json              the recipe key the folder belongs to
    OUT/manifest.json                recipe, versions, counts per operator, shards
    OUT/.bricks.lock                 held while a run writes (pid and host of the holder)

Sources are committed whole: their shard and reject files are written under temporary names
(`.NAME.bricks-tmp`), the ledger line is appended, and only then are they renamed. A run
killed at any point leaves temporary files that the next run deletes (the commit had not
happened) or renames (it had), so resuming never duplicates or loses a sample.

The folder is the user's: bricks deletes only its own files (those in its ledger, and its
temporary files), and refuses an output that holds anything else where it writes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # Windows: the lock is then the lock file's atomic creation and its pid
    fcntl = None

import pyarrow as pa
import pyarrow.parquet as pq

from bricks.common.files import mount_point, temp_path, write_atomic

from .pipeline import OpStats
from .schema import rejects_schema

LEDGER = "_state/commits.jsonl"
RUN_INFO = "_state/run.json"
LOCK = ".bricks.lock"
MANIFEST = "manifest.json"
# Temporary files: this version's, and those of versions that named them `.NAME.tmp`.
TEMP_FILE = re.compile(r"\..+\.bricks-tmp|\.(part-\d{5}(-\d{3})?\.parquet|manifest\.json|run\.json)\.tmp")

log = logging.getLogger("bricks")


class OutputError(ValueError):
    pass


class OutputLockedError(OutputError):
    pass


def write_parquet_staged(path: Path, table: pa.Table, row_group_rows: int) -> int:
    """Write `table` to `path`'s temporary name (durably); the caller renames it. Its size."""
    tmp = temp_path(path)
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_rows)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp.stat().st_size


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
        self.skipped_packets.update(entry.get("skipped_packets", {}))


@dataclass
class Ledger:
    """The commit ledger as read from disk."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    torn: bool = False  # its last line was cut short (killed, or out of space, while appending)

    @property
    def files(self) -> set[str]:
        return {s["file"] for e in self.entries for s in e["shards"]} | {f for e in self.entries for f in e["reject_files"]}


def read_ledger(out: Path) -> Ledger:
    path = out / LEDGER
    if not path.is_file():
        return Ledger()
    text = path.read_text()
    ledger = Ledger(torn=bool(text) and not text.endswith("\n"))
    for line in text.splitlines():
        try:
            ledger.entries.append(json.loads(line))
        except json.JSONDecodeError:  # the commit it was appending never happened
            ledger.torn = True
    return ledger


def check_location(out: Path, input_folders: list[Path] = ()) -> None:
    """Refuse an output that is not a local folder, or that lies in the input."""
    if "://" in str(out):
        raise OutputError(f"output {out}: must be a local or mounted folder (atomic renames are needed)")
    existing = next(p for p in (out, *out.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        what = "a file" if existing.is_file() else "not a folder"
        where = f"is {what}" if existing == out else f"is inside {existing}, which is {what}"
        raise OutputError(f"output {out} {where}; choose a folder")
    real = Path(os.path.realpath(out))
    for folder in input_folders:
        folder_real = Path(os.path.realpath(folder))
        if real == folder_real or folder_real in real.parents:
            where = "is the input folder" if real == folder_real else f"is inside the input folder {folder}"
            raise OutputError(f"output {out} {where}; choose an output folder outside the input")


def foreign_files(out: Path, ledger: Ledger) -> list[str]:
    """What `out` holds that bricks did not write, where bricks writes (names relative to `out`).

    In a bricks output, other files beside `shards/`, `rejects/` and `_state/` are the user's
    and left alone; a folder that is not one must hold nothing but bricks' own names."""
    if not out.is_dir():
        return []
    ours = ledger.files
    is_bricks_output = (out / RUN_INFO).is_file()
    foreign = []
    for entry in sorted(os.scandir(out), key=lambda e: e.name):
        if entry.name in ("shards", "rejects", "_state") and entry.is_dir():
            for inner in sorted(os.scandir(entry.path), key=lambda e: e.name):
                name = f"{entry.name}/{inner.name}"
                own = name in ours or name in (LEDGER, RUN_INFO) or TEMP_FILE.fullmatch(inner.name)
                if not own or inner.is_dir():
                    foreign.append(name + ("/" if inner.is_dir() else ""))
        elif entry.name == LOCK or TEMP_FILE.fullmatch(entry.name) or (entry.name == MANIFEST and is_bricks_output):
            continue
        elif not is_bricks_output:
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    return foreign


def refuse_foreign(out: Path, ledger: Ledger) -> None:
    foreign = foreign_files(out, ledger)
    if not foreign:
        return
    named = ", ".join(foreign[:2]) + (f" and {len(foreign) - 2} more" if len(foreign) > 2 else "")
    if (out / RUN_INFO).is_file():
        raise OutputError(f"output {out} holds files that bricks-dj did not write ({named}); "
                          "move them elsewhere or choose another output folder")
    raise OutputError(f"output {out} is not empty and holds no bricks-dj run ({named}); "
                      "choose a new or empty folder")


def prepare(out: Path, recipe_key: str, overwrite: bool) -> Progress:
    """Pick up a previous run of the same recipe in `out`, or start afresh; call it holding
    the folder (`claim`). Interrupted commits are finished or discarded; `overwrite` deletes
    bricks' own files only, and nothing happens to an output that holds files of others."""
    with output_errors(out):
        ledger = read_ledger(out)
        refuse_foreign(out, ledger)
        info_path = out / RUN_INFO
        if overwrite:
            _remove_own_files(out, ledger)
            ledger = Ledger()
        else:
            if info_path.exists() and _recorded_key(info_path) != recipe_key:
                raise OutputError(
                    f"output {out} holds a run of a different recipe (or operator parameters); "
                    "use --overwrite to start over, or another output folder"
                )
            _refuse_relative_sources(out, ledger)
            _finish_commits(out, ledger)
        for sub in ("_state", "shards", "rejects"):
            (out / sub).mkdir(exist_ok=True)
        if not info_path.exists():
            write_atomic(info_path, json.dumps({"recipe_key": recipe_key}))
    progress = Progress()
    for entry in ledger.entries:
        progress.record(entry)
    return progress


def _recorded_key(info_path: Path) -> str | None:
    try:
        return json.loads(info_path.read_text()).get("recipe_key")
    except (json.JSONDecodeError, AttributeError):
        raise OutputError(f"{info_path}: not the run record bricks-dj writes; use --overwrite to start over") from None


def _refuse_relative_sources(out: Path, ledger: Ledger) -> None:
    # Earlier versions recorded sources as given; they would not match the absolute paths now
    # listed, and every source would be processed (and written) a second time.
    relative = next((s for e in ledger.entries for s in e["sources"] if "://" not in s and not os.path.isabs(s)), None)
    if relative is not None:
        raise OutputError(f"output {out} records relative source paths (such as {relative}) from an earlier "
                          "bricks-dj; use --overwrite to start over")


def _temp_files(out: Path) -> list[Path]:
    found = [p for p in out.iterdir() if TEMP_FILE.fullmatch(p.name)]
    for sub in ("shards", "rejects", "_state"):
        if (out / sub).is_dir():
            found += [p for p in (out / sub).iterdir() if TEMP_FILE.fullmatch(p.name)]
    return found


def _finish_commits(out: Path, ledger: Ledger) -> None:
    for name in sorted(ledger.files):
        final = out / name
        if final.exists():
            continue
        if not temp_path(final).exists():
            raise OutputError(f"output {out}: {name} is in the commit ledger but missing; "
                              "use --overwrite to start over")
        os.replace(temp_path(final), final)  # committed, killed before the rename
    for path in _temp_files(out):  # commits that never happened, or an unfinished manifest
        path.unlink()
    if ledger.torn:
        write_atomic(out / LEDGER, "".join(json.dumps(e) + "\n" for e in ledger.entries))


def _remove_own_files(out: Path, ledger: Ledger) -> None:
    for name in ledger.files:
        (out / name).unlink(missing_ok=True)
    for path in _temp_files(out):
        path.unlink()
    for name in (LEDGER, RUN_INFO, MANIFEST):
        (out / name).unlink(missing_ok=True)


@contextlib.contextmanager
def claim(out: Path, input_folders: list[Path] = ()) -> Iterator[None]:
    """Hold `out` for one run: checked (not in the input, not someone else's folder), created,
    and locked against other runs until the block ends."""
    check_location(out, input_folders)
    with output_errors(out):
        if not (out / RUN_INFO).is_file():  # nothing is created in a folder that is not ours
            refuse_foreign(out, Ledger())
        out.mkdir(parents=True, exist_ok=True)
        lock = OutputLock(out / LOCK)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


class OutputLock:
    """An exclusive lock on an output folder, so that two runs never write one at once.

    The lock file names its holder (pid, host, start). The holder also holds an `flock` on
    it, which the kernel drops when the holder dies however it dies, so a lock file left on
    this host by a killed run is stale and taken over. A lock from another host is respected:
    its holder cannot be checked from here."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        for _ in range(5):  # the holder may release (remove the file) between our open and lock
            fd = self._open()
            try:
                if self._take(fd):
                    self._fd = fd
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise OutputLockedError(f"output {self.path.parent}: its lock file keeps changing; is another run starting?")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()
        finally:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int:
        if fcntl is not None:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        while True:  # no flock: the file's atomic creation is the lock
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_holder_file(self.path)
                if holder.get("host") != socket.gethostname() or _alive(holder.get("pid")):
                    raise OutputLockedError(self._in_use(holder)) from None
                log.warning("%s", self._taking_over(holder))
                self.path.unlink(missing_ok=True)

    def _take(self, fd: int) -> bool:
        """Lock the open lock file and write ourselves in; False if it was replaced meanwhile."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputLockedError(self._in_use(_read_holder(fd))) from None
            if not _same_file(fd, self.path):
                return False
            holder = _read_holder(fd)
            if holder and holder.get("host") != socket.gethostname():
                raise OutputLockedError(
                    f"output {self.path.parent} is locked by {_holder_text(holder)}; if that run has "
                    f"ended, delete {self.path} and rerun")
            if holder:
                log.warning("%s", self._taking_over(holder))
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        return True

    def _in_use(self, holder: dict) -> str:
        return (f"output {self.path.parent} is in use by another bricks-dj run ({_holder_text(holder)}); "
                "wait for it to finish or choose another output folder")

    def _taking_over(self, holder: dict) -> str:
        return f"output {self.path.parent}: taking over the stale lock of {_holder_text(holder)}, which has ended"


def _holder_text(holder: dict) -> str:
    if not holder:
        return "its lock file is being written"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _read_holder_file(path: Path) -> dict:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return {}
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def output_errors(out: Path) -> Iterator[None]:
    """OS errors met while writing `out` as one-line `OutputError`s: a full disk, a folder that
    cannot be written. The ledger stays consistent, so a rerun resumes."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            full = "no space left" if exc.errno == errno.ENOSPC else "disk quota exceeded"
            raise OutputError(f"{full} on {mount_point(out)} (writing {out}); rerun to resume") from None
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise OutputError(f"output {out}: cannot write {exc.filename or out}: {exc.strerror}") from None
        raise


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    with output_errors(out):
        write_atomic(out / MANIFEST, json.dumps(manifest, indent=2))


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
        with output_errors(self.out):
            # Staged under temporary names; renamed once the ledger line is down (see the top).
            shards, reject_files = self._stage(part, kept, rejects)
            entry = self._ledger_entry(part, shards, reject_files, kept, rejects)
            with open(self.out / LEDGER, "a") as f:
                f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())
            for name in [s["file"] for s in shards] + reject_files:
                os.replace(temp_path(self.out / name), self.out / name)
        self.progress.record(entry)
        self._reset()

    def _stage(self, part: int, kept: pa.Table, rejects: pa.Table) -> tuple[list[dict[str, Any]], list[str]]:
        """The commit's files under their temporary names; if one fails, none is left behind
        (a full disk gets its space back)."""
        shards, reject_files = [], []
        try:
            for k, chunk in enumerate(self._chunks(kept)):
                name = f"shards/part-{part:05d}.parquet" if k == 0 else f"shards/part-{part:05d}-{k:03d}.parquet"
                size = write_parquet_staged(self.out / name, chunk, self.row_group_rows)
                shards.append({"file": name, "rows": chunk.num_rows, "bytes": size})
            if rejects.num_rows:
                name = f"rejects/part-{part:05d}.parquet"
                write_parquet_staged(self.out / name, rejects, self.row_group_rows)
                reject_files.append(name)
        except BaseException:
            for name in [s["file"] for s in shards] + reject_files:
                temp_path(self.out / name).unlink(missing_ok=True)
            raise
        return shards, reject_files

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
            "skipped_packets": {s["uri"]: s["skipped_packets"] for s in self.stats if s.get("skipped_packets")},
        }
