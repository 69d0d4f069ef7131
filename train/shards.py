"""The training data as `bricks-dj` wrote it: Parquet shards, indexed without reading media.

`ShardIndex.build` reads only the small columns of every shard (ids, sizes, frame counts,
whether a caption and media are present) plus each file's row-group layout. Media bytes are
read later, one row group at a time, by the loader worker that owns it. Shards are local
paths or any fsspec URI; a `bricks-dj` output folder stands for its `shards/`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow.parquet as pq

log = logging.getLogger("bricks")

INDEX_COLUMNS = ["sample_id", "kind", "num_frames", "height", "width", "fps", "text", "media", "path"]
# Optional precomputed model inputs (see `decode.read_array`): when every row of a batch has
# them, the trainer takes them instead of decoding media and running the VAE and T5.
PRECOMPUTED_COLUMNS = ["vae_latent", "t5_states"]
SAMPLE_COLUMNS = ["sample_id", "kind", "num_frames", "fps", "height", "width", "text", "media", "media_format",
                  "path", "start_frame", "end_frame", *PRECOMPUTED_COLUMNS]


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

    def __len__(self) -> int:
        return len(self.sample_id)

    @classmethod
    def build(cls, sources: str | os.PathLike | list) -> "ShardIndex":
        files = find_shards(sources)
        columns: dict[str, list] = {k: [] for k in ("file", "row_group", "row", "sample_id", "is_image", "num_frames",
                                                  "height", "width", "usable")}
        digest = hashlib.sha1()
        for f, uri in enumerate(files):
            parquet = open_parquet(uri)
            missing = sorted({"sample_id", "kind", "num_frames", "height", "width", "text"} - set(parquet.schema_arrow.names))
            if missing:
                raise ShardError(f"{uri}: not a bricks shard (no {', '.join(missing)} column)")
            names = [c for c in INDEX_COLUMNS if c in parquet.schema_arrow.names and c not in ("media", "path")]
            for g in range(parquet.metadata.num_row_groups):
                table = parquet.read_row_group(g, columns=names)
                n = table.num_rows
                media_present = _present(parquet, g, "media", n)
                path_present = _present(parquet, g, "path", n)
                text = table.column("text").to_pylist()
                columns["file"].append(np.full(n, f, dtype=np.int32))
                columns["row_group"].append(np.full(n, g, dtype=np.int32))
                columns["row"].append(np.arange(n, dtype=np.int32))
                ids = table.column("sample_id").to_pylist()
                columns["sample_id"].append(np.array(ids, dtype=object))
                columns["is_image"].append(np.array([k == "image" for k in table.column("kind").to_pylist()]))
                for name in ("num_frames", "height", "width"):
                    columns[name].append(np.array(table.column(name).fill_null(0).to_pylist(), dtype=np.int64))
                has_text = np.array([bool(t and t.strip()) for t in text])
                columns["usable"].append(has_text & (media_present | path_present))
                # Names, not locations: the same shards moved elsewhere are the same data.
                digest.update(f"{uri.rsplit('/', 1)[-1]}\x1f{g}\x1f{n}\x1f".encode())
                digest.update("\x1f".join(ids).encode())
        if not columns["file"]:
            raise ShardError(f"data: the shards in {sources} hold no rows")
        arrays = {k: np.concatenate(v) for k, v in columns.items()}
        return cls(files=files, fingerprint=digest.hexdigest(), **arrays)


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
