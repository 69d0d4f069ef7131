"""Opening, probing and decoding source videos with PyAV (local paths or fsspec URIs).

Every container is closed on every path out (an unclosed PyAV container left to the garbage
collector is a known cause of stalls in long-running loaders).
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

import av
import fsspec


class SourceError(Exception):
    """The source cannot be used; the message is the reason recorded in the rejects table."""


@dataclass(frozen=True)
class SourceInfo:
    uri: str
    width: int  # coded size; the decoded frames may carry a display rotation
    height: int
    fps: float  # average frame rate
    num_frames: int  # container's estimate; the decode pass counts the real number
    duration: float  # seconds
    codec: str
    size_bytes: int | None


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def broken_link_reason(path: str) -> str | None:
    """`broken symlink -> TARGET` or `symlink loop` when `path` is a symlink that cannot be
    followed; None otherwise."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        return f"broken symlink -> {os.readlink(path)}"
    return None


@contextlib.contextmanager
def open_container(uri: str) -> Iterator[av.container.InputContainer]:
    """Open a source for reading; errors become `SourceError` with a readable reason."""
    with contextlib.ExitStack() as stack:
        try:
            if is_local(uri):
                path = local_path(uri)
                if not os.path.exists(path):
                    raise SourceError(broken_link_reason(path) or f"file not found: {path}")
                if os.path.getsize(path) == 0:
                    raise SourceError("empty file (0 bytes)")
                target = path
            else:
                target = stack.enter_context(fsspec.open(uri, "rb"))
            container = av.open(target, "r")
        except SourceError:
            raise
        except FileNotFoundError as exc:
            raise SourceError(f"not found: {exc}") from exc
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise SourceError(f"cannot open as a media file: {exc}") from exc
        stack.callback(container.close)
        yield container


def video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        detail = f" (streams: {', '.join(kinds)})" if kinds else ""
        raise SourceError(f"no video stream{detail}")
    return container.streams.video[0]


def probe(uri: str) -> SourceInfo:
    """Container metadata only: no frame is decoded."""
    with open_container(uri) as container:
        stream = video_stream(container)
        ctx = stream.codec_context
        if not ctx.width or not ctx.height:
            raise SourceError("video stream has no frame size")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate:
            raise SourceError("video stream has no frame rate")
        fps = float(Fraction(rate))
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = 0.0
        num_frames = stream.frames or int(round(duration * fps))
        size = os.path.getsize(local_path(uri)) if is_local(uri) else None
        return SourceInfo(uri, ctx.width, ctx.height, fps, num_frames, duration, ctx.name, size)


@dataclass
class DecodedFrame:
    index: int  # position in decode order from the first frame, as PySceneDetect counts
    time: float  # presentation time in seconds
    pts: int | None
    frame: av.VideoFrame


def decode(uri: str, threads: int = 0, seek_pts: int | None = None) -> Iterator[DecodedFrame]:
    """Decode frames in order. With `seek_pts`, start at the key frame at or before it; the
    caller maps pts back to indices (indices then restart at 0)."""
    with open_container(uri) as container:
        stream = video_stream(container)
        stream.thread_type = "AUTO"
        stream.thread_count = threads
        if seek_pts is not None:
            container.seek(seek_pts, stream=stream, backward=True, any_frame=False)
        index = 0
        try:
            for frame in container.decode(stream):
                yield DecodedFrame(index, float(frame.time or 0.0), frame.pts, frame)
                index += 1
        except av.FFmpegError as exc:
            raise DecodeError(index, str(exc)) from exc


class DecodeError(Exception):
    """Decoding stopped early; frames before `index` were delivered."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"decode error at frame {index}: {message}")
        self.index = index


_END = object()


def decode_ahead(uri: str, threads: int = 0, depth: int = 16) -> Iterator[DecodedFrame]:
    """`decode` in a background thread, `depth` frames ahead, so that operators' work on one
    frame overlaps with decoding the next (FFmpeg's frame threads only run while fed)."""
    frames: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                frames.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for decoded in decode(uri, threads):
                if not put(decoded):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    worker = threading.Thread(target=work, name="bricks-decode", daemon=True)
    worker.start()
    try:
        while True:
            item = frames.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()
