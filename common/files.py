"""Writing files so that a reader never sees half of one, and naming the disk a full-disk
message is about. Shared by the data engine, the trainer and the sampler."""

from __future__ import annotations

import os
from pathlib import Path


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.bricks-tmp")


def write_atomic(path: Path, data: bytes | str) -> None:
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def mount_point(path: Path) -> str:
    """The mount point of the file system that holds `path` (or would hold it, if it does not
    exist yet): the device a full-disk message names."""
    path = Path(os.path.realpath(path))
    while not os.path.ismount(path):
        path = path.parent
    return str(path)
