"""Serving operators' frame requests from frames decoded once.

The decode pass keeps the frames of the shot still open in a `FrameBuffer` (PyAV frames,
scaled down in libswscale when no operator wants full size). When the shot closes (or a
window of it settles), its clips' requests are resolved to frame indices and converted
(scale, pixel format, rotation) from the buffer. When a shot outgrows the memory budget its frames are given up, and requests
that need them are served by decoding just that range again (`RangeFrames`).
"""

from __future__ import annotations

import math
import threading
from typing import Protocol

import av
import cv2
import numpy as np
from av.video.reformatter import VideoReformatter

from bricks.common.video import display_size, reformat, rotate, scaler

from .operator import FrameRequest, Frames, Sample


def request_indices(req: FrameRequest, start: int, end: int, fps: float) -> list[int]:
    """Source frame indices that `req` asks for in the clip [start, end)."""
    n = end - start
    if n <= 0:
        return []
    if req.positions == "all":
        return list(range(start, end))
    if req.positions == "fractions":
        return [start + min(int(f * n), n - 1) for f in req.fractions]
    step = fps / req.fps  # frames between samples
    count = int(math.floor((n - 1) / step)) + 1 if step > 0 else n
    if count >= req.min_count:
        return [start + int(round(k * step)) for k in range(count)]
    count = min(req.min_count, n)
    return sorted({start + int(round(x)) for x in np.linspace(0, n - 1, count)})


def scaled_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) with the short side at most `short_side`, even sizes, aspect kept."""
    if short_side is None or min(width, height) <= short_side:
        return width, height
    scale = short_side / min(width, height)
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def segmenter_frame(reformatter: VideoReformatter, frame: av.VideoFrame, rotation: int,
                    size: tuple[int, int]) -> np.ndarray:
    """`frame` as PySceneDetect's `detect()` hands it to a detector, bit for bit: OpenCV's capture
    converts it to BGR at full size in libswscale (bicubic flags, the frame's colour matrix and
    range) and turns it upright, then the SceneManager shrinks it to `size` with `cv2.resize`'s
    bilinear interpolation. Shrinking in libswscale straight from YUV is a little cheaper (0.26
    against 0.35 ms for a 720p frame) but rounds differently: on real footage that moved content
    scores by up to 0.7, enough to add or lose a cut at the threshold."""
    bgr = rotate(reformat(reformatter, frame, frame.width, frame.height, "bgr24", "BICUBIC").to_ndarray(), rotation)
    if (bgr.shape[1], bgr.shape[0]) != size:
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_LINEAR)
    return bgr


def to_array(frame: av.VideoFrame, req: FrameRequest, rotation: int, reformatter: VideoReformatter) -> np.ndarray:
    """Scale in libswscale (not on a full-size array), convert, then apply display rotation."""
    dw, dh = display_size(frame.width, frame.height, rotation)
    tw, th = scaled_size(dw, dh, req.short_side)
    cw, ch = display_size(tw, th, rotation)  # back to coded orientation
    fmt = req.pixel_format
    if (cw, ch) != (frame.width, frame.height) or frame.format.name != fmt:
        frame = reformat(reformatter, frame, cw, ch, fmt)
    # to_ndarray() is a view into the frame's buffer, which FFmpeg may recycle once the frame
    # object is gone: own the pixels.
    array = np.array(frame.to_ndarray(), copy=True)
    return rotate(array, rotation)


class FrameSource(Protocol):
    def serve(self, sample: Sample, req: FrameRequest) -> Frames: ...


class FrameBuffer:
    """Frames of the open shot, keyed by source index, with a memory budget."""

    def __init__(self, budget_bytes: int, keep_short_side: int | None) -> None:
        self.budget_bytes = budget_bytes
        self.keep_short_side = keep_short_side
        self.frames: dict[int, av.VideoFrame] = {}
        self.bytes = 0
        self.peak_bytes = 0
        self.overflowed = False  # frames of the open shot are being given up
        self._scaler = scaler()
        # Frames are added by the decoding thread and released by the shot worker.
        self._lock = threading.Lock()

    def add(self, index: int, frame: av.VideoFrame, rotation: int) -> None:
        if self.overflowed:
            return
        if self.keep_short_side is not None:
            dw, dh = display_size(frame.width, frame.height, rotation)
            tw, th = display_size(*scaled_size(dw, dh, self.keep_short_side), rotation)
            if (tw, th) != (frame.width, frame.height):
                frame = reformat(self._scaler, frame, tw, th, None)
        size = sum(p.buffer_size for p in frame.planes)
        with self._lock:
            if self.bytes + size > self.budget_bytes:
                self.frames.clear()
                self.bytes = 0
                self.overflowed = True
                return
            self.frames[index] = frame
            self.bytes += size
            self.peak_bytes = max(self.peak_bytes, self.bytes)

    def release_before(self, index: int) -> None:
        with self._lock:
            for i in [i for i in self.frames if i < index]:
                frame = self.frames.pop(i)
                self.bytes -= sum(p.buffer_size for p in frame.planes)

    def start_shot(self) -> None:
        # Frames of the next shot that arrived before this call were not kept; requests that
        # need them go to the fallback.
        self.overflowed = False


class BufferedFrames:
    """Serves requests from frames held in memory, or from `fallback` (a `RangeFrames`) for
    requests whose frames the buffer gave up."""

    def __init__(self, frames: dict[int, av.VideoFrame], fps: float, rotation: int,
                 fallback: "RangeFrames | None" = None) -> None:
        self.frames = frames
        self.fps = fps
        self.rotation = rotation
        self.fallback = fallback
        self._cache: dict[tuple, np.ndarray] = {}
        self._scaler = scaler()

    def serve(self, sample: Sample, req: FrameRequest) -> Frames:
        image = sample.get("_image")
        if image is not None:
            return serve_image(image, req)
        indices = request_indices(req, sample["start_frame"], sample["end_frame"], self.fps)
        try:
            return Frames(indices, [self._array(i, req) for i in indices])
        except KeyError:
            # Given up by the buffer (over budget), possibly while this shot waited its turn.
            if self.fallback is None:
                raise LookupError(f"frames of [{sample['start_frame']}, {sample['end_frame']}) "
                                  "were not decoded (source ended early?)") from None
            return self.fallback.serve(sample, req)

    def _array(self, index: int, req: FrameRequest) -> np.ndarray:
        key = (index, req.short_side, req.pixel_format)
        if key not in self._cache:
            self._cache[key] = to_array(self.frames[index], req, self.rotation, self._scaler)
        return self._cache[key]


def serve_image(image: np.ndarray, req: FrameRequest) -> Frames:
    """An image sample answers every request with its single (RGB) frame."""
    h, w = image.shape[:2]
    tw, th = scaled_size(w, h, req.short_side)
    if (tw, th) != (w, h):
        image = cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA)
    if req.pixel_format == "bgr24":
        image = image[:, :, ::-1].copy()
    elif req.pixel_format == "gray":
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return Frames([0], [image])


class RangeFrames:
    """Serves requests of a shot that overflowed the buffer by decoding a clip's range again.

    The first request for a clip decodes, in one seek-and-decode pass, the frames that every
    request of the recipe (`requests`) would ask for in that clip, so the clip's range is
    decoded once whichever operators then ask. `pts_by_index` (recorded in the main pass) maps
    decoded frames back to source indices, which also holds for variable frame rates.
    """

    def __init__(self, uri: str, pts_by_index: list[int | None], fps: float, rotation: int, threads: int,
                 requests: tuple[FrameRequest, ...] = ()) -> None:
        self.uri = uri
        self.pts_by_index = list(pts_by_index)  # a snapshot: decoding goes on while shots are served
        self.index_by_pts = {p: i for i, p in enumerate(self.pts_by_index) if p is not None}
        self.fps = fps
        self.rotation = rotation
        self.threads = threads
        self.requests = requests
        self.frames_decoded = 0
        self._scaler = scaler()
        self._clip: tuple[int, int] | None = None
        self._stream = None  # an open decoder, positioned after `_position`
        self._position = -1
        self._cache: dict[tuple, np.ndarray] = {}  # (index, short_side, format) of the current clip

    def serve(self, sample: Sample, req: FrameRequest) -> Frames:
        image = sample.get("_image")
        if image is not None:
            return serve_image(image, req)
        start, end = sample["start_frame"], sample["end_frame"]
        indices = request_indices(req, start, end, self.fps)
        if self._clip != (start, end) or any(self._key(i, req) not in self._cache for i in indices):
            self._load(start, end, req)
        return Frames(indices, [self._cache[self._key(i, req)] for i in indices])

    @staticmethod
    def _key(index: int, req: FrameRequest) -> tuple:
        return index, req.short_side, req.pixel_format

    def _load(self, start: int, end: int, req: FrameRequest) -> None:
        if self._clip != (start, end):
            self._clip, self._cache = (start, end), {}
        wanted: dict[int, list[FrameRequest]] = {}
        for r in dict.fromkeys((req, *self.requests)):
            for i in request_indices(r, start, end, self.fps):
                if self._key(i, r) not in self._cache:
                    wanted.setdefault(i, []).append(r)
        last = max(wanted)
        for index, frame in self._decode_from(min(wanted)):
            for r in wanted.pop(index, ()):
                self._cache[self._key(index, r)] = to_array(frame, r, self.rotation, self._scaler)
            if index >= last:
                break
        if any(self._key(i, req) not in self._cache for i in request_indices(req, start, end, self.fps)):
            raise LookupError(f"frames of [{start}, {end}) could not be decoded again")

    def _decode_from(self, first: int):
        """Frames from index `first` on; clips of a shot come in order, so a decoder already
        past the previous clip carries on instead of seeking back to a key frame."""
        if self._stream is None or self._position >= first:
            self.close()
            self._stream = self._open_at(first)
        for index, frame in self._stream:
            self._position = index
            if index >= first:
                yield index, frame

    def _open_at(self, first: int):
        from bricks.common.video import decode  # local: frames.py stays free of I/O for the common path

        seek_pts = self.pts_by_index[first] if first < len(self.pts_by_index) else None
        if seek_pts is None or len(self.index_by_pts) != len(self.pts_by_index):
            seek_pts = None  # no reliable pts: decode from the start, counting frames
        for decoded in decode(self.uri, self.threads, seek_pts=seek_pts):
            self.frames_decoded += 1
            index = self.index_by_pts.get(decoded.pts) if seek_pts is not None else decoded.index
            if index is not None:
                yield index, decoded.frame

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()  # closes the container
            self._stream = None
