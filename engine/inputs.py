"""Turning a recipe's `input` into the list of source URIs to process."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import fsspec

from .video import is_local, local_path

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp"}
LIST_EXTENSIONS = {".txt", ".list", ".lst"}


class InputError(ValueError):
    pass


def list_sources(spec: str | list[str]) -> list[str]:
    """Sorted, de-duplicated sources. Folders are walked for video files; globs are expanded;
    list files hold one path or URI per line (`#` comments; relative to the list's folder)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise InputError("input is empty")
    found: set[str] = set()
    for item in specs:
        found.update(_expand(item))
    if not found:
        raise InputError(f"input {specs if len(specs) > 1 else specs[0]!r} matched no video files")
    return sorted(found)


def _expand(item: str) -> list[str]:
    if any(ch in item for ch in "*?["):
        return _glob(item)
    if is_local(item):
        path = Path(local_path(item))
        if path.is_dir():
            return [str(p) for p in sorted(path.rglob("*")) if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()]
        if path.suffix.lower() in LIST_EXTENSIONS:
            if not path.is_file():
                raise InputError(f"input list file not found: {path}")
            return _read_list(path.read_text(), str(path.parent))
        if not path.exists():
            raise InputError(f"input not found: {path}")
        return [str(path)]
    if Path(item).suffix.lower() in LIST_EXTENSIONS:
        with fsspec.open(item, "rt") as f:
            return _read_list(f.read(), item.rsplit("/", 1)[0])
    return [item]  # a single remote URI; unreadable ones are reported per source at run time


def _glob(pattern: str) -> list[str]:
    if is_local(pattern):
        return [p for p in sorted(glob.glob(local_path(pattern), recursive=True)) if os.path.isfile(p)]
    fs, _, paths = fsspec.get_fs_token_paths(pattern)
    return [fs.unstrip_protocol(p) for p in sorted(paths)]


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
