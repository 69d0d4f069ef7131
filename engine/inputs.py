"""Turning a recipe's `input` into the list of source URIs to process.

Local sources are absolute, normalised paths (so shards and their sample ids do not depend
on the folder a run started in); fsspec URIs are kept as given, and remote folders
(`s3://BUCKET/PREFIX/`) are listed for video files like local ones.
"""

from __future__ import annotations

import contextlib
import glob
import os
from pathlib import Path
from typing import Iterator

import fsspec

from bricks.common.video import broken_link_reason, is_local, local_path

from .dataset_files import DatasetError, DatasetInput, is_dataset_file, read_dataset
from .store import OBJECT_STORES, unreachable_errors

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp"}
LIST_EXTENSIONS = {".txt", ".list", ".lst"}
# Data-set files other than a Data-Juicer JSONL or an Open-Sora CSV (see `dataset_files`).
UNREAD_DATASET_EXTENSIONS = {".tsv", ".json", ".parquet"}


class InputError(ValueError):
    pass


def list_sources(spec: str | list[str]) -> list[str]:
    """Sorted, de-duplicated sources. Folders are walked for video files; globs are expanded;
    list files hold one path or URI per line (`#` comments; relative to the list's folder);
    data-set files name theirs (see `read_inputs`)."""
    return read_inputs(spec).uris


def read_inputs(spec: str | list[str]) -> DatasetInput:
    """Every source of `input` (`uris`, as `list_sources`), with the fields that data-set files
    (a Data-Juicer JSONL, an Open-Sora CSV) give their videos, and those fields' columns."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise InputError("input is empty")
    found: set[str] = set()
    datasets = DatasetInput()
    for item in specs:
        if is_dataset_file(item):
            try:
                datasets.add(read_dataset(item))
            except DatasetError as exc:
                raise InputError(str(exc)) from None
        else:
            found.update(_absolute(uri) for uri in _expand(item))
    found.update(datasets.uris)
    if not found:
        raise InputError(f"input {specs if len(specs) > 1 else specs[0]!r} matched no video files")
    datasets.uris = sorted(found)
    return datasets


def input_folders(spec: str | list[str]) -> list[str]:
    """The folders that `input` reads from, local (absolute paths) and remote (URIs): folders,
    and the fixed part of globs. An object-store item not named like a file is taken for one."""
    folders = []
    for item in [spec] if isinstance(spec, str) else list(spec):
        path = local_path(item) if is_local(item) else item
        if any(ch in path for ch in "*?["):
            fixed = os.path.dirname(path[: min(path.find(ch) for ch in "*?[" if ch in path)])
            if is_local(item):
                folders.append(_absolute(fixed or "."))
            elif "://" in fixed:
                folders.append(fixed)
        elif is_local(item):
            if os.path.isdir(path):
                folders.append(_absolute(path))
        elif _on_object_store(item) and Path(item).suffix.lower() not in VIDEO_EXTENSIONS | LIST_EXTENSIONS:
            folders.append(item.rstrip("/"))
    return folders


def _absolute(uri: str) -> str:
    return os.path.abspath(uri) if "://" not in uri else uri


def _expand(item: str) -> list[str]:
    suffix = Path(item).suffix.lower()
    if suffix in UNREAD_DATASET_EXTENSIONS:
        raise InputError(f"input {item}: {suffix[1:].upper()} data-set files are not read; give a Data-Juicer "
                         "JSONL, an Open-Sora CSV, a folder, a glob or a .txt list of video paths")
    if any(ch in item for ch in "*?["):
        return _glob(item)
    if is_local(item):
        path = Path(local_path(item))
        if path.is_dir():
            return _walk(str(path), frozenset())
        if suffix in LIST_EXTENSIONS:
            if not path.is_file():
                raise InputError(_missing("input list file", path))
            return _read_list(path.read_text(), str(path.parent))
        if not path.exists():
            raise InputError(_missing("input", path))
        return [str(path)]
    if suffix in LIST_EXTENSIONS:
        with _remote_errors(item), fsspec.open(item, "rt") as f:
            return _read_list(f.read(), item.rsplit("/", 1)[0])
    if suffix in VIDEO_EXTENSIONS or not _on_object_store(item):
        return [item]  # a single remote file; unreadable ones are reported per source at run time
    return _walk_remote(item)


def _missing(what: str, path: Path) -> str:
    reason = broken_link_reason(str(path))
    return f"{what} {path}: {reason}" if reason else f"{what} not found: {path}"


def _walk(folder: str, walking: frozenset) -> list[str]:
    """Video files under `folder`, following symlinked folders (like `find -L`).

    A symlink that cannot be followed (broken, or a loop) is listed when it is named like a
    video or has no extension (it may have been a folder of them): reading it then fails
    with the reason, so it is a reject row rather than silently missing."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
        walking = walking | {_identity(folder)}
    except OSError as exc:
        raise InputError(f"input folder {folder}: cannot be read: {exc.strerror or exc}") from None
    found = []
    for entry in entries:
        suffix = os.path.splitext(entry.name)[1].lower()
        try:
            is_dir, is_file = entry.is_dir(), entry.is_file()
        except OSError:  # a symlink loop
            is_dir = is_file = False
        if is_dir:
            # A symlink back to a folder being walked holds nothing that is not listed already.
            if _identity(entry.path) not in walking:
                found.extend(_walk(entry.path, walking))
        elif is_file:
            if suffix in VIDEO_EXTENSIONS:
                found.append(entry.path)
        elif entry.is_symlink() and (suffix in VIDEO_EXTENSIONS or not suffix) and not os.path.exists(entry.path):
            found.append(entry.path)
    return found


def _on_object_store(uri: str) -> bool:
    # Where a URI not named like a file is a folder (a prefix) to list; an http:// one is not.
    return uri.split("://", 1)[0] in OBJECT_STORES


def _walk_remote(item: str) -> list[str]:
    """Video files under the remote folder `item`; `item` itself when it names a file, or
    names nothing and has no trailing `/` (then it is a source that fails, with the reason)."""
    with _remote_errors(item):
        fs, path = fsspec.core.url_to_fs(item)
        found = fs.find(path.rstrip("/"), detail=True)
    if not item.endswith("/") and (not found or list(found) == [path.rstrip("/")]):
        return [item]
    return [fs.unstrip_protocol(p) for p, info in sorted(found.items())
            if info["type"] == "file" and os.path.splitext(p)[1].lower() in VIDEO_EXTENSIONS]


@contextlib.contextmanager
def _remote_errors(item: str) -> Iterator[None]:
    """A remote input that cannot be listed or read is one line naming it."""
    try:
        yield
    except ImportError:
        raise InputError(f"input {item}: needs the filesystem for {item.split('://')[0]}:// "
                         "(for s3://: pip install 'bricks[s3]')") from None
    except FileNotFoundError as exc:
        raise InputError(f"input {item}: not found ({exc})") from None
    except PermissionError as exc:
        raise InputError(f"input {item}: access denied ({exc})") from None
    except unreachable_errors() as exc:
        raise InputError(f"input {item}: cannot reach the object store: {exc}") from None


def _identity(folder: str) -> tuple[int, int]:
    stat = os.stat(folder)
    return stat.st_dev, stat.st_ino


def _glob(pattern: str) -> list[str]:
    if is_local(pattern):
        return [p for p in sorted(glob.glob(local_path(pattern), recursive=True))
                if os.path.isfile(p) or (os.path.islink(p) and not os.path.exists(p))]
    with _remote_errors(pattern):
        fs, path = fsspec.core.url_to_fs(pattern)
        found = fs.glob(path, detail=True)
    return [fs.unstrip_protocol(p) for p, info in sorted(found.items()) if info["type"] == "file"]


def _read_list(text: str, base: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if is_local(line) and not os.path.isabs(local_path(line)) and "://" not in base:
            line = os.path.join(base, line)
        elif "://" not in line and "://" in base:
            line = f"{base}/{line}"
        out.append(line)
    return out
