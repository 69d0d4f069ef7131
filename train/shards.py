"""The training data as `bricks-dj` wrote it: Parquet shards, indexed without reading media.

`ShardIndex.build` reads only the small columns of every shard (ids, sizes, frame counts,
whether a caption and media are present, the source files of reference-mode rows) plus each
file's row-group layout. Media bytes are read later, one row group at a time, by the loader
worker that owns it. Shards are local paths or any fsspec URI; a `bricks-dj` output folder
stands for its `shards/`. A file that is not Parquet, or whose columns have other types than
`bricks-dj` writes, is a ShardError naming it.

Reference-mode rows (no `media`) are decoded from their `path` when trained on, so
`check_reference_sources` makes sure before training that those files are there: a relative
path (older `bricks-dj` outputs) is taken from the current folder, as the decoder would.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bricks.common.errors import first_line
from bricks.common.video import is_local, local_path

from .latents import LATENT_METADATA, LatentGroup

log = logging.getLogger("bricks")

INDEX_COLUMNS = ["sample_id", "kind", "num_frames", "height", "width", "fps", "text", "media", "path"]
# Optional precomputed model inputs (see `decode.read_array`): when every row of a batch has
# them, the trainer takes them instead of decoding media and running the VAE and T5.
PRECOMPUTED_COLUMNS = ["vae_latent", "t5_states"]
SAMPLE_COLUMNS = ["sample_id", "kind", "num_frames", "fps", "height", "width", "text", "media", "media_format",
                  "path", "start_frame", "end_frame", "start_time", *PRECOMPUTED_COLUMNS, "latent_dtype"]

_STRING, _INTEGER, _BINARY = "a string", "an integer", "binary"
_NUMBER = "a number"
# What the trainer reads, by the kind of Arrow type bricks-dj writes (all-null columns pass).
COLUMN_KINDS = {"sample_id": _STRING, "kind": _STRING, "num_frames": _INTEGER, "height": _INTEGER,
                "width": _INTEGER, "text": _STRING, "media": _BINARY, "media_format": _STRING, "path": _STRING,
                "fps": _NUMBER, "start_frame": _INTEGER, "end_frame": _INTEGER, "vae_latent": _BINARY,
                "t5_states": _BINARY, "latent_dtype": _STRING, "latent_bucket": _STRING,
                "latent_frame_interval": _INTEGER, "latent_vae": _STRING, "latent_text_encoder": _STRING}
_KIND_CHECKS = {
    _STRING: lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t),
    _INTEGER: pa.types.is_integer,
    _BINARY: lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t),
    _NUMBER: lambda t: pa.types.is_integer(t) or pa.types.is_floating(t),
}


class ShardError(ValueError):
    pass


def find_shards(sources: str | os.PathLike | list) -> list[str]:
    """Parquet files from folders (a `bricks-dj` output or a folder of shards), globs, files or
    URIs, in a stable order."""
    found: list[str] = []
    for source in [sources] if isinstance(sources, (str, os.PathLike)) else sources:
        source = os.fspath(source)
        fs, _, (root,) = fsspec.get_fs_token_paths(source)
        if fs.isdir(root):
            base = root.rstrip("/") + "/shards" if fs.isdir(root.rstrip("/") + "/shards") else root
            files = sorted(fs.glob(base.rstrip("/") + "/*.parquet"))
        elif any(c in source for c in "*?["):
            files = sorted(fs.glob(root))
        elif fs.isfile(root):
            files = [root]
        else:
            raise ShardError(f"data: {source} does not exist")
        if not files:
            raise ShardError(f"data: no .parquet shards in {source}")
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        found += [f if protocol in ("file", "local") else f"{protocol}://{f}" for f in files]
    return found


def open_parquet(uri: str) -> pq.ParquetFile:
    return pq.ParquetFile(fsspec.open(uri, "rb").open())


def _open_shard(uri: str) -> pq.ParquetFile:
    try:
        parquet = open_parquet(uri)
    except (pa.ArrowException, OSError) as exc:
        raise ShardError(f"{uri}: not a readable Parquet file, or cut short ({first_line(exc, 200)}); "
                         "take it out of --data or write it again with bricks-dj") from None
    schema = parquet.schema_arrow
    missing = sorted({"sample_id", "kind", "num_frames", "height", "width", "text"} - set(schema.names))
    if missing:
        raise ShardError(f"{uri}: not a bricks shard (no {', '.join(missing)} column)")
    for name, kind in COLUMN_KINDS.items():
        if name in schema.names:
            column_type = schema.field(name).type
            if not (pa.types.is_null(column_type) or _KIND_CHECKS[kind](column_type)):
                raise ShardError(f"{uri}: column {name} is {column_type}, the trainer reads it as {kind} "
                                 "(shards as bricks-dj writes them have that type)")
    return parquet



@dataclass
class ShardIndex:
    files: list[str]
    # Per row, in file order: where it is and what the planner needs.
    file: np.ndarray  # int32 index into files
    row_group: np.ndarray  # int32
    row: np.ndarray  # int32, within its row group
    sample_id: np.ndarray  # object (str)
    is_image: np.ndarray  # bool
    num_frames: np.ndarray  # int64
    height: np.ndarray
    width: np.ndarray
    usable: np.ndarray  # bool: has a caption and media (bytes or a path)
    fingerprint: str
    without_text: int = 0  # rows with no caption
    without_media: int = 0  # captioned rows with neither media nor a path
    reference_sources: dict[str, int] = field(default_factory=dict)
    """Usable rows per source file that they are decoded from (rows without `media`)."""
    latent_bucket: np.ndarray | None = None
    """object (str or None): the bucket of each row's stored latent (`encode_latents`); None
    when no shard has the column."""
    latent_groups: dict[LatentGroup, tuple[int, int]] = field(default_factory=dict)
    """Rows with stored latents, by how they were made: (count, an example row)."""

    def __len__(self) -> int:
        return len(self.sample_id)

    @classmethod
    def build(cls, sources: str | os.PathLike | list) -> "ShardIndex":
        files = find_shards(sources)
        columns: dict[str, list] = {k: [] for k in ("file", "row_group", "row", "sample_id", "is_image", "num_frames",
                                                  "height", "width", "usable")}
        digest = hashlib.sha1()
        counts = Counter()
        reference: Counter = Counter()
        latent_buckets: list[np.ndarray] = []
        groups: dict[LatentGroup, tuple[int, int]] = {}
        rows_before = 0
        for f, uri in enumerate(files):
            parquet = _open_shard(uri)
            names = [c for c in INDEX_COLUMNS if c in parquet.schema_arrow.names and c not in ("media", "path")]
            for g in range(parquet.metadata.num_row_groups):
                try:
                    table = parquet.read_row_group(g, columns=names)
                    media_present = _present(parquet, g, "media", table.num_rows)
                    path_present = _present(parquet, g, "path", table.num_rows)
                except (pa.ArrowException, OSError) as exc:
                    raise ShardError(f"{uri}: row group {g} cannot be read ({first_line(exc, 200)}); the file is "
                                     "damaged: take it out of --data or write it again with bricks-dj") from None
                n = table.num_rows
                text = table.column("text").to_pylist()
                columns["file"].append(np.full(n, f, dtype=np.int32))
                columns["row_group"].append(np.full(n, g, dtype=np.int32))
                columns["row"].append(np.arange(n, dtype=np.int32))
                ids = table.column("sample_id").to_pylist()
                columns["sample_id"].append(np.array(ids, dtype=object))
                columns["is_image"].append(np.array([k == "image" for k in table.column("kind").to_pylist()]))
                for name in ("num_frames", "height", "width"):
                    columns[name].append(np.array(table.column(name).fill_null(0).to_pylist(), dtype=np.int64))
                has_text = np.array([bool(t and t.strip()) for t in text], dtype=bool)
                usable = has_text & (media_present | path_present)
                columns["usable"].append(usable)
                counts["without_text"] += int((~has_text).sum())
                counts["without_media"] += int((has_text & ~usable).sum())
                by_path = usable & ~media_present
                if by_path.any():
                    paths = parquet.read_row_group(g, columns=["path"]).column("path").to_pylist()
                    reference.update(p for p, wanted in zip(paths, by_path) if wanted)
                latent_buckets.append(_latent_metadata(parquet, g, n, rows_before, groups))
                rows_before += n
                # Names, not locations: the same shards moved elsewhere are the same data.
                digest.update(f"{uri.rsplit('/', 1)[-1]}\x1f{g}\x1f{n}\x1f".encode())
                digest.update("\x1f".join(ids).encode())
        if not columns["file"]:
            raise ShardError(f"data: the shards in {sources} hold no rows")
        arrays = {k: np.concatenate(v) for k, v in columns.items()}
        stored = np.concatenate(latent_buckets) if groups else None
        return cls(files=files, fingerprint=digest.hexdigest(), without_text=counts["without_text"],
                   without_media=counts["without_media"], reference_sources=dict(reference), latent_bucket=stored,
                   latent_groups=groups, **arrays)


def check_reference_sources(index: ShardIndex) -> None:
    """A ShardError when reference-mode rows point at local files that cannot be read: training
    would skip every one of them (and, from another folder, every relative path)."""
    unreadable = {}
    for path, rows in index.reference_sources.items():
        problem = _unreadable(path)
        if problem is not None:
            unreadable[path] = (rows, problem)
    if not unreadable:
        return
    rows = sum(r for r, _ in unreadable.values())
    example = max(unreadable, key=lambda p: (unreadable[p][0], p))
    message = (f"data: {rows} of the {int(index.usable.sum())} usable samples are decoded from source files that "
               f"cannot be read ({len(unreadable)} of {len(index.reference_sources)} files; e.g. {example!r}: "
               f"{unreadable[example][1]})")
    if not os.path.isabs(local_path(example)):
        message += (f"; relative paths are taken from the current folder, {os.getcwd()}: run bricks-train from "
                    "the folder bricks-dj ran in, or run bricks-dj again (it records absolute paths)")
    else:
        message += "; put the files back, or run bricks-dj again on where they are now"
    raise ShardError(message)


def _unreadable(path: str) -> str | None:
    """Why a local source file cannot be read, or None (also for URLs, which only decoding tells)."""
    if not is_local(path):
        return None
    local = local_path(path)
    if not os.path.exists(local):
        return "no such file"
    if not os.path.isfile(local):
        return "not a file"
    if not os.access(local, os.R_OK):
        return "permission denied"
    return None


def _latent_metadata(parquet: pq.ParquetFile, group: int, n: int, first_row: int,
                     groups: dict[LatentGroup, tuple[int, int]]) -> np.ndarray:
    """Each row's stored latent bucket (None without one), counting the rows into `groups`."""
    buckets = np.full(n, None, dtype=object)
    names = parquet.schema_arrow.names
    if "latent_bucket" not in names or "vae_latent" not in names:
        return buckets
    present = _present(parquet, group, "vae_latent", n)
    if not present.any():
        return buckets
    table = parquet.read_row_group(group, columns=[c for c in LATENT_METADATA if c in names])
    values = {c: table.column(c).to_pylist() if c in table.column_names else [None] * n for c in LATENT_METADATA}
    for r in np.flatnonzero(present):
        if values["latent_bucket"][r] is None:
            continue  # a latent without metadata: the loader checks its shape against the bucket
        buckets[r] = values["latent_bucket"][r]
        key = LatentGroup(values["latent_bucket"][r], values["latent_frame_interval"][r], values["latent_vae"][r],
                          values["latent_text_encoder"][r], tuple(values["vae_latent_shape"][r] or ()))
        count, example = groups.get(key, (0, first_row + int(r)))
        groups[key] = (count + 1, example)
    return buckets


def _present(parquet: pq.ParquetFile, group: int, column: str, n: int) -> np.ndarray:
    """Which rows have a non-null `column`, reading only its validity where statistics allow."""
    if column not in parquet.schema_arrow.names:
        return np.zeros(n, dtype=bool)
    index = parquet.schema_arrow.names.index(column)
    stats = parquet.metadata.row_group(group).column(index).statistics
    if stats is not None and stats.null_count == n:
        return np.zeros(n, dtype=bool)
    if stats is not None and stats.null_count == 0:
        return np.ones(n, dtype=bool)
    return ~np.array(parquet.read_row_group(group, columns=[column]).column(column).is_null(), dtype=bool)
