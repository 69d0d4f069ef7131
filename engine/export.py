"""`export`: a `bricks-dj` output as the files another tool reads.

    opensora    DIR/NAME.csv   Open-Sora 1.1's data-set CSV, one media file per row under DIR/media/
    dj          DIR/NAME.jsonl Data-Juicer's multimodal JSONL, media files under DIR/media/
    webdataset  DIR/shard-NNNNNN.tar  per sample KEY.mp4 or KEY.jpg beside KEY.json

NAME is the output folder's name unless given. Media files are named by `sample_id`: a clip's
MP4 bytes as `.mp4`, an image's JPEG as `.jpg`; a reference-mode clip (no `media`) is cut from
its source with exactly its frames (`export_media`). Every path written is absolute.

What each format carries besides the media:

- opensora: `path,text,num_frames,height,width,aspect_ratio,fps,resolution`, then `aes` and
  `flow` when the output has them, then the output's other operator columns (Open-Sora's
  reader ignores columns it does not use). Frame ranges and ids are left out: `path` names the
  clip itself. Images have `num_frames` 1 and an empty `fps`, as Open-Sora's own tools write
  them (its data sets tell images from videos by the path's extension, and give them 120 fps).
- dj: `videos: [path]` or `images: [path]`, `text` with Data-Juicer's special tokens
  (`<__dj__video> caption <|__dj__eoc|>`), and every other column as a field except `media`,
  `media_format` (what `media` held) and `path` (the source file, the same as `source_uri`).
- webdataset: KEY.json holds the row's columns except `media`.

Binary columns other than `media` (precomputed arrays, say) cannot be written as text and are
left out of every format; the summary names them.

The export is built in `.DIR.bricks-tmp` beside DIR and moved in place when complete. DIR must
be empty or missing; with `overwrite`, an earlier export there is replaced: only the files its
`export.json` lists are deleted, and anything else in DIR stays. It reads what the output's
ledger had committed when the export started, row group by row group.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from bricks.common.video import local_path

from .dataset_files import dj_tokens
from .export_media import MediaError, media_bytes, media_extension
from .output import RUN_INFO, read_ledger
from .schema import BASE_COLUMNS
from .store import OutputError, Store, open_store, store_errors

FORMATS = ("opensora", "dj", "webdataset")
RECORD = "export.json"
RECORD_KIND = "bricks-dj export"
OPENSORA_COLUMNS = ("path", "text", "num_frames", "height", "width", "aspect_ratio", "fps", "resolution")
OPENSORA_SCORES = ("aes", "flow")
# Data-Juicer's default special tokens (data_juicer.utils.mm_utils.SpecialTokens), used when it
# is not installed: they are its documented data format.
DJ_LEFT_OUT = ("media", "media_format", "path")

Progress = Callable[[int, int], None]


class ExportError(ValueError):
    """The export cannot be made; the message is one line."""


def export(out: str | os.PathLike, fmt: str, to: str | os.PathLike, *, overwrite: bool = False,
           progress: Progress | None = None, samples_per_tar: int = 1000, name: str | None = None) -> dict[str, Any]:
    """Export the output `out` (a local folder or `s3://...`) in format `fmt` into the local
    folder `to`. `progress(done, total)` is called as rows are written. Returns a summary:
    the format, the folder, row counts, the files written and the columns left out."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if samples_per_tar < 1:
        raise ExportError(f"samples per tar must be at least 1, not {samples_per_tar}")
    store, shards = _committed_shards(out)
    name = name if name is not None else _output_name(store)
    if not name or "/" in name or name.startswith("."):
        raise ExportError(f"export name {name!r}: give a plain file name")
    dest = Path(os.path.abspath(os.fspath(to)))
    previous = _previous_export(dest, overwrite)
    with _reading(store):
        schema = _schema(store, shards)
        keys = _sample_keys(store, shards)
    writer = WRITERS[fmt](dest, schema, name, samples_per_tar)
    _refuse_clashes(dest, previous, writer.planned(keys))
    tmp = dest.parent / f".{dest.name}.bricks-tmp"
    _fresh_folder(tmp)
    counts = {"rows": 0, "video": 0, "image": 0, "cut_from_source": 0}
    try:
        writer.open(tmp)
        if progress:
            progress(0, len(keys))
        with _reading(store):
            for shard, row in _rows(store, shards):
                try:
                    cut = writer.add(row)
                except MediaError as exc:
                    raise ExportError(f"{store.show(shard)}: sample {row['sample_id']}: {exc}") from None
                counts["rows"] += 1
                counts[row["kind"]] += 1
                counts["cut_from_source"] += cut
                if progress:
                    progress(counts["rows"], len(keys))
        files = writer.close()
        record = {"kind": RECORD_KIND, "format": fmt, "source": store.uri, "files": files,
                  "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **counts}
        _write_json(tmp / RECORD, record)
        _install(tmp, dest, previous, files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"format": fmt, "to": str(dest), **counts, "files": [f for f in files if not f.startswith("media/")],
            "left_out_columns": writer.left_out}


# -- the output ---------------------------------------------------------------------------------

def _committed_shards(out: str | os.PathLike) -> tuple[Store, list[str]]:
    """The output's store and its committed shards in order (a shard whose commit was cut short
    before its move is read under its staged name)."""
    try:
        store = open_store(out)
    except OutputError as exc:
        raise ExportError(str(exc)) from None
    with _reading(store):
        if store.local and not os.path.isdir(local_path(store.uri)):
            raise ExportError(f"output {store.uri} does not exist or is not a folder")
        if not store.isfile(RUN_INFO):
            raise ExportError(f"{store.uri} is not a bricks-dj output (it has no {RUN_INFO})")
        ledger = read_ledger(store)
        staged = ledger.staged
        shards = []
        for entry in ledger.entries:
            for shard in entry["shards"]:
                name = shard["file"]
                if not store.isfile(name):
                    name = staged[name]
                    if not store.isfile(name):
                        raise ExportError(f"output {store.uri}: {shard['file']} is in the commit ledger but missing")
                shards.append(name)
    if not shards:
        raise ExportError(f"output {store.uri} holds no kept samples: nothing to export")
    return store, shards


def _output_name(store: Store) -> str:
    return PurePosixPath(local_path(store.uri).rstrip("/")).name or "data"


@contextlib.contextmanager
def _reading(store: Store) -> Iterator[None]:
    """Errors reading the output as one-line `ExportError`s."""
    try:
        with store_errors(store):
            yield
    except OutputError as exc:
        raise ExportError(str(exc)) from None


def _schema(store: Store, shards: list[str]) -> pa.Schema:
    with store.fs.open(store.path(shards[0]), "rb") as f:
        return pq.ParquetFile(f).schema_arrow


def _sample_keys(store: Store, shards: list[str]) -> list[tuple[str, str]]:
    """(sample_id, kind) of every row, reading those two columns only."""
    keys = []
    for shard in shards:
        with store.fs.open(store.path(shard), "rb") as f:
            table = pq.read_table(f, columns=["sample_id", "kind"])
        keys += zip(table.column("sample_id").to_pylist(), table.column("kind").to_pylist())
    ids = [k for k, _ in keys]
    if len(set(ids)) != len(ids):
        raise ExportError(f"output {store.uri}: a sample_id occurs twice in its shards")
    return keys


def _rows(store: Store, shards: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each row with the shard it is in, one row group in memory at a time."""
    for shard in shards:
        with store.fs.open(store.path(shard), "rb") as f:
            parquet = pq.ParquetFile(f)
            for group in range(parquet.num_row_groups):
                for row in parquet.read_row_group(group).to_pylist():
                    yield shard, row


# -- the destination ----------------------------------------------------------------------------

def _previous_export(dest: Path, overwrite: bool) -> set[str] | None:
    """The files an earlier export wrote in `dest` (to replace), or None when `dest` is empty or
    missing; a folder holding anything else is refused."""
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"export folder {dest} is a file; choose a folder")
    if not dest.exists() or not any(dest.iterdir()):
        return None
    if not overwrite:
        raise ExportError(f"export folder {dest} is not empty; choose an empty folder, "
                          "or --overwrite to replace the export in it")
    record = dest / RECORD
    try:
        found = json.loads(record.read_text()) if record.is_file() else {}
        files = found["files"] if found.get("kind") == RECORD_KIND else None
    except (ValueError, KeyError, TypeError, AttributeError):
        files = None
    if not isinstance(files, list):
        raise ExportError(f"export folder {dest} is not empty and holds no bricks-dj export; "
                          "choose an empty folder")
    for name in files:
        parts = PurePosixPath(name).parts if isinstance(name, str) else ()
        if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
            raise ExportError(f"{record}: names {name!r}, not a file bricks-dj exports; choose an empty folder")
    return set(files)


def _refuse_clashes(dest: Path, previous: set[str] | None, planned: set[str]) -> None:
    """Before any work: the new files must not land on files that are not ours."""
    if not dest.is_dir():
        return
    ours = (previous or set()) | {RECORD}
    planned = planned | {RECORD}
    folders = {str(p) for name in planned for p in PurePosixPath(name).parents if str(p) != "."}
    for path in sorted(dest.rglob("*")):
        rel = path.relative_to(dest).as_posix()
        if rel in ours or (path.is_dir() and rel in folders):
            continue
        if rel in planned or rel in folders:
            raise ExportError(f"export folder {dest} holds {rel}, which bricks-dj did not write and would "
                              "replace; move it, or choose an empty folder")


def _fresh_folder(tmp: Path) -> None:
    # `.DIR.bricks-tmp` is bricks' own name: one left there is an export that was cut short.
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    tmp.mkdir(parents=True)


def _install(tmp: Path, dest: Path, previous: set[str] | None, files: list[str]) -> None:
    """The complete export in `tmp` as `dest`: renamed into place when `dest` is (or becomes)
    empty, else moved in file by file beside the files that are not ours, the record last."""
    if previous is not None:
        for name in sorted(previous):
            (dest / name).unlink(missing_ok=True)
        (dest / RECORD).unlink(missing_ok=True)
        for folder in sorted({p for name in previous for p in PurePosixPath(name).parents if str(p) != "."},
                             key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):  # kept when it holds files that are not ours
                (dest / folder).rmdir()
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    if not dest.exists():
        os.rename(tmp, dest)
        return
    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / name, dest / name)
    os.replace(tmp / RECORD, dest / RECORD)
    shutil.rmtree(tmp)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1))


# -- values -------------------------------------------------------------------------------------

def _is_binary(dtype: pa.DataType) -> bool:
    return pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype) or pa.types.is_fixed_size_binary(dtype)


def _plain(value: Any) -> Any:
    """A value as JSON holds it: a float that is not finite becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _json_line(data: dict[str, Any]) -> str:
    return json.dumps(_plain(data), ensure_ascii=False, allow_nan=False, default=str)


# -- the formats --------------------------------------------------------------------------------

class _Writer:
    """One format: `planned` names its files before the export starts, `open` starts writing in
    the temporary folder, `add` writes one row (True when its clip was cut from the source),
    `close` returns the files written (relative to the folder)."""

    def __init__(self, dest: Path, schema: pa.Schema, name: str, samples_per_tar: int) -> None:
        self.dest, self.schema, self.name, self.samples_per_tar = dest, schema, name, samples_per_tar
        binary = [f.name for f in schema if _is_binary(f.type)]
        self.left_out = [c for c in binary if c != "media"]
        self.columns = [f.name for f in schema if f.name not in binary]  # the text-friendly columns
        self.files: list[str] = []

    def planned(self, keys: list[tuple[str, str]]) -> set[str]:
        raise NotImplementedError

    def open(self, tmp: Path) -> None:
        self.tmp = tmp

    def add(self, row: dict[str, Any]) -> bool:
        raise NotImplementedError

    def close(self) -> list[str]:
        return self.files


class _MediaFiles(_Writer):
    """Formats that write one media file per row under `media/` and an index file."""

    suffix = ""

    def index_name(self) -> str:
        return f"{self.name}{self.suffix}"

    def planned(self, keys):
        return {self.index_name()} | {_media_name(sample_id, kind) for sample_id, kind in keys}

    def open(self, tmp):
        super().open(tmp)
        (tmp / "media").mkdir()
        self.index = open(tmp / self.index_name(), "w", newline="", encoding="utf-8")

    def write_media(self, row: dict[str, Any]) -> tuple[str, bool]:
        """The row's media file; its final absolute path, and whether it was cut."""
        data, cut = media_bytes(row)
        name = _media_name(row["sample_id"], row["kind"])
        (self.tmp / name).write_bytes(data)
        self.files.append(name)
        return str(self.dest / name), cut

    def close(self):
        self.index.close()
        self.files.append(self.index_name())
        return self.files


def _media_name(sample_id: str, kind: str) -> str:
    try:
        return f"media/{sample_id}{media_extension({'kind': kind})}"
    except MediaError as exc:
        raise ExportError(f"sample {sample_id}: {exc}") from None


class OpenSoraCSV(_MediaFiles):
    suffix = ".csv"

    def open(self, tmp):
        super().open(tmp)
        scores = [c for c in OPENSORA_SCORES if c in self.columns]
        others = [c for c in self.columns if c not in BASE_COLUMNS and c not in scores]
        self.header = [*OPENSORA_COLUMNS, *scores, *others]
        self.csv = csv.writer(self.index)
        self.csv.writerow(self.header)

    def add(self, row):
        path, cut = self.write_media(row)
        values = dict(row, path=path)
        if row["kind"] == "image":
            values.update(num_frames=1, fps=None)
        self.csv.writerow([_csv_value(values.get(c)) for c in self.header])
        return cut


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(_plain(value), default=str)
    return value


class DataJuicerJSONL(_MediaFiles):
    suffix = ".jsonl"

    def open(self, tmp):
        super().open(tmp)
        self.tokens = dj_tokens()

    def add(self, row):
        path, cut = self.write_media(row)
        media_key = "videos" if row["kind"] == "video" else "images"
        text = " ".join(t for t in (self.tokens[row["kind"]], row.get("text"), self.tokens["eoc"]) if t)
        line = {media_key: [path], "text": text}
        line.update((c, row[c]) for c in self.columns if c not in DJ_LEFT_OUT and c != "text")
        self.index.write(_json_line(line) + "\n")
        return cut


class WebDataset(_Writer):
    def planned(self, keys):
        return {_tar_name(k) for k in range(math.ceil(len(keys) / self.samples_per_tar))}

    def open(self, tmp):
        super().open(tmp)
        self.tar: tarfile.TarFile | None = None
        self.in_tar = 0
        self.mtime = int(time.time())

    def add(self, row):
        if self.tar is None or self.in_tar == self.samples_per_tar:
            self._next_tar()
        data, cut = media_bytes(row)
        key = row["sample_id"]
        self._member(f"{key}{media_extension(row)}", data)
        self._member(f"{key}.json", _json_line({c: row[c] for c in self.columns}).encode())
        self.in_tar += 1
        return cut

    def _next_tar(self) -> None:
        if self.tar is not None:
            self.tar.close()
        name = _tar_name(len(self.files))
        self.tar = tarfile.open(self.tmp / name, "w", format=tarfile.PAX_FORMAT)
        self.files.append(name)
        self.in_tar = 0

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), self.mtime, 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def close(self):
        if self.tar is not None:
            self.tar.close()
        return self.files


def _tar_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


WRITERS: dict[str, type[_Writer]] = {"opensora": OpenSoraCSV, "dj": DataJuicerJSONL, "webdataset": WebDataset}
