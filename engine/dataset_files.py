"""Data-set files as input: a Data-Juicer JSONL or an Open-Sora CSV names the videos and carries
what is already known of them (captions, scores, other fields) into their samples.

- Data-Juicer JSONL: one JSON object per line; `videos` lists video paths, `text` holds the
  caption with Data-Juicer's special tokens (one `<__dj__video>` per video, chunks closed by
  `<|__dj__eoc|>`), so each video gets the text of its own chunk. `__dj__stats__` entries become
  `dj_<key>` columns (the columns `dj.` filters write), `__dj__meta__` a JSON `dj_meta` column.
- Open-Sora CSV: `path` names the video, `text` its caption; its other columns (`aes`, `flow`,
  `match`, ids...) carry over.

Relative paths are relative to the data-set file's folder. Columns that bricks measures from
the file itself (`num_frames`, `fps`, `height`, `width`, ...) are measured again, not copied.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv

from bricks.common.video import is_local, local_path

from .schema import BASE_COLUMNS

JSONL_EXTENSIONS = {".jsonl", ".ndjson"}
CSV_EXTENSIONS = {".csv"}

# Data-Juicer's special tokens by default (its documented data format), so that its data sets
# are read and written without Data-Juicer installed; `dj_tokens` takes its own where it is.
DJ_TOKENS = {"video": "<__dj__video>", "image": "<__dj__image>", "audio": "<__dj__audio>", "eoc": "<|__dj__eoc|>"}
DJ_STATS, DJ_META = "__dj__stats__", "__dj__meta__"
_DJ_MEDIA_FIELDS = {"videos", "images", "audios"}

# Base columns a data set may name but bricks measures from the file (or derives) itself.
MEASURED = set(BASE_COLUMNS) - {"text"}


def dj_tokens() -> dict[str, str]:
    """Data-Juicer's special tokens as it is configured here, or its defaults without it."""
    try:
        from data_juicer.utils.mm_utils import SpecialTokens
    except ImportError:
        return dict(DJ_TOKENS)
    return {"video": SpecialTokens.video, "image": SpecialTokens.image, "audio": SpecialTokens.audio,
            "eoc": SpecialTokens.eoc}


class DatasetError(ValueError):
    pass


@dataclass
class DatasetInput:
    """Videos named by data-set files, each with the fields its row carries."""

    uris: list[str] = field(default_factory=list)
    fields: dict[str, dict[str, Any]] = field(default_factory=dict)  # uri -> column values
    columns: dict[str, pa.DataType] = field(default_factory=dict)  # carried columns, in file order

    def add(self, other: "DatasetInput") -> None:
        for uri in other.uris:
            if uri in self.fields:
                raise DatasetError(f"input: {uri} is named by two data-set files")
        self.uris += other.uris
        self.fields.update(other.fields)
        for name, dtype in other.columns.items():
            self.columns[name] = _common_type(self.columns.get(name, dtype), dtype, name, "input")


def is_dataset_file(item: str) -> bool:
    return Path(item).suffix.lower() in JSONL_EXTENSIONS | CSV_EXTENSIONS


def read_dataset(item: str) -> DatasetInput:
    """The videos and fields of one data-set file (`item`: a local path or an fsspec URI)."""
    suffix = Path(item).suffix.lower()
    try:
        with fsspec.open(item, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DatasetError(f"input data set not found: {item}") from None
    except OSError as exc:
        raise DatasetError(f"input {item}: cannot be read: {exc}") from None
    base = os.path.dirname(local_path(item)) if is_local(item) else item.rsplit("/", 1)[0]
    rows = _dj_rows(item, data, base) if suffix in JSONL_EXTENSIONS else _opensora_rows(item, data, base)
    if not rows:
        raise DatasetError(f"input {item}: the data set has no rows")
    return _collect(item, rows)


def _dj_rows(item: str, data: bytes, base: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(where, uri, fields) per video of each line of a Data-Juicer JSONL."""
    out = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{item}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: a line is a JSON object, not a {type(row).__name__}")
        videos = row.get("videos") or []
        if isinstance(videos, str):
            videos = [videos]
        if not isinstance(videos, list) or not all(isinstance(v, str) and v for v in videos):
            raise DatasetError(f"{where}: `videos` is a list of paths")
        if not videos:
            other = sorted(k for k in _DJ_MEDIA_FIELDS - {"videos"} if row.get(k))
            raise DatasetError(f"{where}: no `videos`" + (f" (only {', '.join(other)}: bricks recipes read videos)"
                                                          if other else ""))
        texts = _dj_texts(row.get("text"), len(videos), where)
        for k, (video, text) in enumerate(zip(videos, texts)):
            out.append((where, _resolve(video, base), dict(_dj_fields(row, where, k, len(videos)), text=text)))
    return out


def _dj_texts(text: Any, num_videos: int, where: str) -> list[str | None]:
    """Each video's caption: the text of the chunk holding its `<__dj__video>` token, tokens
    removed. Without tokens (or with one video) the whole text is every video's caption."""
    if text is None:
        return [None] * num_videos
    if not isinstance(text, str):
        raise DatasetError(f"{where}: `text` is a string, not a {type(text).__name__}")
    tokens = dj_tokens()
    chunks = [c for c in text.split(tokens["eoc"]) if c.strip()]
    per_video = [strip_dj_tokens(c) for c in chunks for _ in range(c.count(tokens["video"]))]
    if num_videos > 1 and len(per_video) == num_videos:
        return per_video
    caption = strip_dj_tokens(text)
    return [caption] * num_videos


def strip_dj_tokens(text: str) -> str | None:
    """`text` without Data-Juicer's special tokens and the spaces around them; None if empty."""
    pattern = re.compile("|".join(re.escape(token) for token in dj_tokens().values()))
    cleaned = " ".join(pattern.sub(" ", text).split())
    return cleaned or None


def _dj_fields(row: dict[str, Any], where: str, k: int, num_videos: int) -> dict[str, Any]:
    """The fields of the row's `k`-th video."""
    fields = {}
    for key, value in row.items():
        if key in _DJ_MEDIA_FIELDS or key == "text" or key in MEASURED:
            continue
        if key == DJ_STATS:
            if not isinstance(value, dict):
                raise DatasetError(f"{where}: `{DJ_STATS}` is a mapping of statistics")
            for stat, stat_value in value.items():
                # Data-Juicer keeps one value per video; a bricks sample is one video.
                if isinstance(stat_value, list) and len(stat_value) == num_videos:
                    stat_value = stat_value[k]
                fields[f"dj_{stat}"] = stat_value
        elif key == DJ_META:
            fields["dj_meta"] = json.dumps(value, sort_keys=True)
        elif key.startswith("__dj__"):
            continue  # Data-Juicer's own bookkeeping (source file, context)
        else:
            fields[key] = value
    return fields


def _opensora_rows(item: str, data: bytes, base: str) -> list[tuple[str, str, dict[str, Any]]]:
    try:
        # An empty cell is no value (no caption yet), not an empty string.
        table = pa_csv.read_csv(pa.py_buffer(data), convert_options=pa_csv.ConvertOptions(strings_can_be_null=True))
    except pa.ArrowInvalid as exc:
        raise DatasetError(f"input {item}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    if "path" not in table.column_names:
        raise DatasetError(f"input {item}: an Open-Sora CSV has a `path` column "
                           f"(columns: {', '.join(table.column_names[:8])})")
    keep = [name for name in table.column_names if name not in MEASURED]
    out = []
    for number, (path, row) in enumerate(zip(table.column("path").to_pylist(), table.select(keep).to_pylist()), 2):
        where = f"{item}:{number}"
        if not isinstance(path, str) or not path.strip():
            raise DatasetError(f"{where}: `path` is empty")
        if "text" in row and row["text"] is not None and not isinstance(row["text"], str):
            row["text"] = str(row["text"])
        if Path(path).suffix.lower() in IMAGE_EXTENSIONS:
            raise DatasetError(f"{where}: {path} is an image; bricks recipes read videos")
        out.append((where, _resolve(path.strip(), base), row))
    return out


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


def _resolve(path: str, base: str) -> str:
    if "://" in path and not path.startswith("file://"):
        return path
    path = local_path(path) if path.startswith("file://") else os.path.expanduser(path)
    if os.path.isabs(path):
        return os.path.normpath(path)
    return os.path.normpath(os.path.join(base, path)) if "://" not in base else f"{base}/{path}"


def _collect(item: str, rows: list[tuple[str, str, dict[str, Any]]]) -> DatasetInput:
    dataset = DatasetInput()
    first_row: dict[str, str] = {}
    for where, uri, fields in rows:
        if uri in first_row:
            raise DatasetError(f"{where}: {uri} is already named at {first_row[uri]} "
                               "(one row per video: its samples carry that row's fields)")
        first_row[uri] = where
        dataset.uris.append(uri)
        dataset.fields[uri] = fields
    names = list(dict.fromkeys(name for _, _, fields in rows for name in fields))
    for name in names:
        if name.startswith("_"):
            raise DatasetError(f"input {item}: field '{name}': names starting with '_' are bricks' own bookkeeping")
        values = [fields.get(name) for _, _, fields in rows]
        try:
            dtype = pa.array(values).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            kinds = sorted({type(v).__name__ for v in values if v is not None})
            raise DatasetError(f"input {item}: field '{name}' mixes {' and '.join(kinds)} values") from None
        dataset.columns[name] = pa.string() if pa.types.is_null(dtype) else dtype
    dataset.columns.pop("text", None)  # the base column
    return dataset


def _common_type(a: pa.DataType, b: pa.DataType, name: str, where: str) -> pa.DataType:
    if a == b:
        return a
    if pa.types.is_integer(a) and pa.types.is_floating(b) or pa.types.is_floating(a) and pa.types.is_integer(b):
        return pa.float64()
    raise DatasetError(f"{where}: column '{name}' is {a} in one data-set file and {b} in another")


def merge_columns(carried: dict[str, pa.DataType], outputs: dict[str, pa.DataType]) -> dict[str, pa.DataType]:
    """Carried columns that an operator writes too take the operator's type (a data set's `aes`
    becomes the aesthetic filter's float64 column), provided the values convert."""
    merged = {}
    for name, dtype in carried.items():
        target = outputs.get(name, dtype)
        if target != dtype and not _castable(dtype, target):
            raise DatasetError(f"input: column '{name}' is {dtype}, but an operator writes it as {target}")
        merged[name] = target
    return merged


def _castable(source: pa.DataType, target: pa.DataType) -> bool:
    numeric = (pa.types.is_integer, pa.types.is_floating)
    if any(f(source) for f in numeric) and pa.types.is_floating(target):
        return True
    return pa.types.is_null(source)
