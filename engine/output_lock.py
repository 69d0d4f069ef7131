"""One run writes an output at a time: the lock file `OUT/.bricks.lock` names its holder.

Locally the holder also holds an `flock` on the file (`OutputLock`); on an object store, which
has none, the lock object's conditional creation makes one run its holder (`ObjectLock`).
Either way a lock left on this host by a run that has ended is taken over with a warning, and
one from another host is respected: its holder cannot be checked from here.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: the lock is then the lock file's atomic creation and its pid
    fcntl = None

from .store import OutputError, Store

log = logging.getLogger("bricks")


class OutputLockedError(OutputError):
    pass


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
                    raise OutputLockedError(_in_use(self.path.parent, holder)) from None
                log.warning("%s", _taking_over(self.path.parent, holder))
                self.path.unlink(missing_ok=True)

    def _take(self, fd: int) -> bool:
        """Lock the open lock file and write ourselves in; False if it was replaced meanwhile."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputLockedError(_in_use(self.path.parent, _read_holder(fd))) from None
            if not _same_file(fd, self.path):
                return False
            holder = _read_holder(fd)
            if holder and holder.get("host") != socket.gethostname():
                raise OutputLockedError(_other_host(self.path.parent, holder, self.path))
            if holder:
                log.warning("%s", _taking_over(self.path.parent, holder))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_me()).encode(), 0)
        os.fsync(fd)
        return True


class ObjectLock:
    """The lock on an output on an object store, which has no flock.

    The lock object is created only if there is none (a conditional PUT, `If-None-Match: *`),
    so of two runs starting together one gets it and the other is refused. A lock left on this
    host by a run whose pid is gone is taken over by a PUT conditional on the stale object's
    ETag (`If-Match`), so two runs taking it over at once cannot both succeed. Stores that
    ignore these conditions (some older S3-compatible ones) leave a window of one request
    between looking for the lock and writing it. A run killed here leaves its lock object; as
    locally, a rerun on this host takes it over, and one from another host must be deleted."""

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name
        self._token: str | None = None

    def acquire(self) -> None:
        fs, path, where = self.store.fs, self.store.path(self.name), self.store.uri
        me = dict(_me(), token=uuid.uuid4().hex)
        data = json.dumps(me).encode()
        for _ in range(5):  # the lock may come and go between our requests
            try:
                etag = fs.info(path)["ETag"]
            except FileNotFoundError:
                try:
                    fs.pipe_file(path, data, mode="create")
                except FileExistsError:
                    continue  # another run created it meanwhile
                self._token = me["token"]
                return
            try:
                holder = _parse_holder(fs.cat_file(path))
            except FileNotFoundError:
                continue
            if not holder:
                raise OutputLockedError(f"output {where} is locked by a lock file that bricks-dj cannot read; "
                                        f"if no run is writing the output, delete {self.store.show(self.name)} and rerun")
            if holder.get("host") != socket.gethostname():
                raise OutputLockedError(_other_host(where, holder, self.store.show(self.name)))
            if _alive(holder.get("pid")):
                raise OutputLockedError(_in_use(where, holder))
            try:
                fs.pipe_file(path, data, IfMatch=etag)
            except OSError as exc:
                if _precondition_failed(exc):
                    continue  # someone else took it over, or it was released, since we read it
                raise
            log.warning("%s", _taking_over(where, holder))
            self._token = me["token"]
            return
        raise OutputLockedError(f"output {where}: its lock file keeps changing; is another run starting?")

    def release(self) -> None:
        if self._token is None:
            return
        fs, path = self.store.fs, self.store.path(self.name)
        try:
            holder = _parse_holder(fs.cat_file(path))
        except FileNotFoundError:
            holder = {}
        # Only this run's own lock: no other run takes over a lock whose holder is alive.
        if holder.get("token") == self._token:
            fs.rm_file(path)
        self._token = None


def _in_use(where, holder: dict) -> str:
    return (f"output {where} is in use by another bricks-dj run ({_holder_text(holder)}); "
            "wait for it to finish or choose another output folder")


def _taking_over(where, holder: dict) -> str:
    return f"output {where}: taking over the stale lock of {_holder_text(holder)}, which has ended"


def _other_host(where, holder: dict, lock_file) -> str:
    return f"output {where} is locked by {_holder_text(holder)}; if that run has ended, delete {lock_file} and rerun"


def _precondition_failed(exc: OSError) -> bool:
    response = getattr(exc.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") in ("PreconditionFailed", "412")


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _holder_text(holder: dict) -> str:
    if not holder:
        return "its lock file is being written"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"


def _read_holder(fd: int) -> dict:
    return _parse_holder(os.pread(fd, 4096, 0))


def _parse_holder(data: bytes) -> dict:
    try:
        holder = json.loads(data or b"{}")
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


