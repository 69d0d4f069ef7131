"""Where an output lives: a local folder or a prefix on an object store (`s3://BUCKET/PREFIX`).

Every file the output module reads or writes goes through one fsspec filesystem and a root
path, so local folders and object stores run the same code. What differs is said here once:

- Writing a whole file: locally a temporary name, fsync and a rename; on an object store
  one PUT, which is atomic (the object appears complete or not at all).
- Moving a file: locally a rename; on an object store a server-side copy and a delete (no
  bytes pass through this process), so a move cut short leaves the copy, the original or both.
- Folders: local ones are made; an object store has none (a prefix exists while it holds
  objects), and a missing bucket is an error rather than something to create.

S3 credentials and the endpoint come from where boto looks for them: the AWS_* variables
(`AWS_ENDPOINT_URL` for an S3-compatible store), `~/.aws/config`, or fsspec's configuration
(`FSSPEC_S3_ENDPOINT_URL`, `~/.config/fsspec/s3.json`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from bricks.common.files import mount_point
from bricks.common.video import is_local

OBJECT_STORES = ("s3", "s3a")
# `Path("s3://b/k")` is `s3:/b/k`: not a local folder named `s3:`. (Two letters at least: `C:/`.)
COLLAPSED_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/(?!/)")
TEMP_SUFFIX = ".bricks-tmp"


class OutputError(ValueError):
    pass


def temp_name(name: str) -> str:
    """`.BASE.bricks-tmp` beside `name` (a path relative to the output)."""
    folder, _, base = name.rpartition("/")
    return f"{folder}/.{base}{TEMP_SUFFIX}" if folder else f".{base}{TEMP_SUFFIX}"


@dataclass(frozen=True)
class Store:
    """An output: `fs` and the folder `root` on it. Names are relative to the root, with `/`."""

    uri: str  # as the user gave it: what messages name
    fs: fsspec.AbstractFileSystem
    root: str

    @property
    def local(self) -> bool:
        return "file" in _protocols(self.fs)

    @property
    def bucket(self) -> str:
        return self.root.split("/", 1)[0]

    def path(self, name: str = "") -> str:
        return f"{self.root}/{name}" if name else self.root

    def show(self, name: str = "") -> str:
        return f"{self.uri.rstrip('/')}/{name}" if name else self.uri

    def isfile(self, name: str = "") -> bool:
        return self.fs.isfile(self.path(name))

    def isdir(self, name: str = "") -> bool:
        return self.fs.isdir(self.path(name))

    def list(self, name: str = "") -> list[tuple[str, bool]]:
        """The entries directly in folder `name`, as (base name, is a folder), sorted; none
        when there is no such folder."""
        here = self.path(name).rstrip("/")
        try:
            entries = self.fs.ls(here, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = {}
        for entry in entries:
            full = entry["name"].rstrip("/")
            if full != here:  # an object store's folder marker, or `here` being a file
                found[full.rsplit("/", 1)[-1]] = entry["type"] == "directory"
        return sorted(found.items())

    def read_text(self, name: str) -> str:
        return self.fs.cat_file(self.path(name)).decode()

    def write(self, name: str, data: bytes | str) -> None:
        """`name` holds `data` whole, or is as it was."""
        data = data.encode() if isinstance(data, str) else data
        if not self.local:
            self.fs.pipe_file(self.path(name), data)
            return
        tmp = self.path(temp_name(name))
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
                _sync(f)
            self.fs.mv(tmp, self.path(name))
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(tmp)

    def write_parquet(self, name: str, table: pa.Table, row_group_rows: int) -> int:
        """`table` as zstd Parquet at `name` (a temporary or staged name: a file cut short is
        removed, but on an object store it may have become visible first). Its size in bytes."""
        try:
            with self.fs.open(self.path(name), "wb") as f:
                pq.write_table(table, f, compression="zstd", row_group_size=row_group_rows)
                size = f.tell()
                if self.local:
                    _sync(f)
        except BaseException:
            self._discard(name)
            raise
        return size

    def move(self, src: str, dst: str) -> None:
        if self.local:
            self.fs.mv(self.path(src), self.path(dst))
        else:
            self.fs.cp_file(self.path(src), self.path(dst))  # CopyObject: server-side
            self.fs.rm_file(self.path(src))

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(name))

    def makedirs(self, name: str = "") -> None:
        if self.local:
            Path(self.path(name)).mkdir(parents=True, exist_ok=True)

    def _discard(self, name: str) -> None:
        # Cleaning up after a failed write, whose error is the one to report; what this leaves
        # has a temporary name, which the next run's `prepare` deletes.
        with contextlib.suppress(Exception):
            self.fs.rm_file(self.path(name))


def open_store(out: str | os.PathLike | Store) -> Store:
    """The store of an output given as a local path, a `file://` URI or `s3://BUCKET/PREFIX`."""
    if isinstance(out, Store):
        return out
    uri = os.fspath(out)
    if COLLAPSED_URI.match(uri):
        raise OutputError(f"output {uri}: a URI with its '//' collapsed (made into a Path?); "
                          "give it as text, such as s3://BUCKET/PREFIX")
    protocol = "file" if is_local(uri) else uri.split("://", 1)[0]
    if protocol not in ("file", *OBJECT_STORES):
        raise OutputError(f"output {uri}: {protocol}:// is not supported; "
                          "give a local or mounted folder, or s3://BUCKET/PREFIX")
    try:
        # No listings cache: other processes (workers, an earlier run) write here too.
        options = {} if protocol == "file" else {"use_listings_cache": False}
        fs, root = fsspec.core.url_to_fs(uri, **options)
    except ImportError:
        raise OutputError(f"output {uri}: {protocol}:// needs the 's3' extra: pip install 'bricks[s3]'") from None
    root = root.rstrip("/") or "/"
    if protocol != "file" and not root.strip("/"):
        raise OutputError(f"output {uri}: names no bucket; give {protocol}://BUCKET/PREFIX")
    return Store(uri, fs, root)


def bucket_missing(store: Store) -> bool:
    """Whether an object store's bucket is known not to exist. A store that refuses to say
    (credentials scoped to a prefix may not look at the bucket) is given the benefit of the
    doubt: the first write then tells."""
    try:
        store.fs.call_s3("head_bucket", Bucket=store.bucket)
    except FileNotFoundError:
        return True
    except PermissionError:
        return False
    return False


@contextlib.contextmanager
def store_errors(store: Store) -> Iterator[None]:
    """Errors met while using `store` as one-line `OutputError`s: a full disk, a folder that
    cannot be written, a bucket that is not there or not ours to write, an endpoint that does
    not answer."""
    try:
        yield
    except OSError as exc:
        if store.local:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                full = "no space left" if exc.errno == errno.ENOSPC else "disk quota exceeded"
                raise OutputError(f"{full} on {mount_point(Path(store.root))} (writing {store.uri}); "
                                  "rerun to resume") from None
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise OutputError(f"output {store.uri}: cannot write {exc.filename or store.uri}: "
                                  f"{exc.strerror}") from None
            raise
        if isinstance(exc, PermissionError):
            raise OutputError(f"output {store.uri}: access denied ({exc}); check the credentials "
                              "and the bucket's policy") from None
        if isinstance(exc, FileNotFoundError) and _quietly(bucket_missing, store):
            raise OutputError(f"output {store.uri}: bucket {store.bucket} does not exist") from None
        raise
    except unreachable_errors() as exc:
        raise OutputError(f"output {store.uri}: cannot reach the object store: {exc}") from None


def unreachable_errors() -> tuple[type[BaseException], ...]:
    """botocore's connection errors (not OSErrors), where botocore is in use."""
    exceptions = sys.modules.get("botocore.exceptions")
    return (exceptions.ConnectionError,) if exceptions is not None else ()


def relation(store: Store, folder: str) -> str | None:
    """"same" when the output is the (local or remote) folder `folder`, "inside" when it lies
    inside it, else None."""
    if is_local(folder) != store.local:
        return None
    if store.local:
        real, other = Path(os.path.realpath(store.root)), Path(os.path.realpath(open_store(folder).root))
        return "same" if real == other else "inside" if other in real.parents else None
    other = open_store(folder)
    if _protocols(other.fs) != _protocols(store.fs):
        return None
    if store.root == other.root:
        return "same"
    return "inside" if store.root.startswith(other.root.rstrip("/") + "/") else None


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _quietly(check, store: Store) -> bool:
    # Only choosing the message for an error already being raised: if the check fails too,
    # that error goes up as it is.
    try:
        return check(store)
    except Exception:
        return False
