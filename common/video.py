"""Opening, probing, seeking and decoding videos with PyAV: local paths, fsspec URIs or bytes.

The data engine (`bricks-dj`) and the trainer's reference-mode clips both decode through this
module, so they agree on which frames a source has, how they are counted and oriented.

- Decoding goes on past packets the decoder refuses (a corrupt stretch of a file loses those
  frames, not the rest of the source); they are counted, and the first frame after such a gap
  is marked, so that no shot is cut across it.
- Frames are numbered in presentation order from the first decodable frame, as
  PySceneDetect counts them.
- Seeking starts at the key frame at or before a presentation timestamp, never after it.

Every container is closed on every path out (an unclosed PyAV container left to the garbage
collector is a known cause of stalls in long-running loaders).
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import io
import itertools
import os
import queue
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

import av
import fsspec
import numpy as np
from av.video.reformatter import VideoReformatter


# Key frames to step back when the one a seek lands on does not decode, before decoding from the start.
SEEK_ATTEMPTS = 4

# Still-image codecs. FFmpeg opens a lone picture as a one-frame video stream whatever the file is
# called (a PNG renamed .mp4 comes through `png_pipe`); one such frame is an image, not a video.
# Several frames of one (motion JPEG, an animated GIF or WebP) are a video.
IMAGE_CODECS = frozenset({
    "png", "apng", "mjpeg", "jpegls", "jpeg2000", "jpegxl", "bmp", "tiff", "webp", "gif", "qoi", "ppm",
    "pgm", "pgmyuv", "pbm", "pam", "pfm", "targa", "sgi", "dpx", "exr", "hdr", "pcx", "sunrast", "xbm",
    "xpm", "xwd", "psd", "dds", "phm", "vbn", "photocd",
})


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
def open_container(uri: str | bytes) -> Iterator[av.container.InputContainer]:
    """Open a source (a path, an fsspec URI or the file's bytes) for reading; errors become
    `SourceError` with a readable reason."""
    _without_python_log_callback()
    with contextlib.ExitStack() as stack:
        try:
            if isinstance(uri, bytes):
                if not uri:
                    raise SourceError("empty media (0 bytes)")
                target = io.BytesIO(uri)
            elif is_local(uri):
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


def _without_python_log_callback() -> None:
    """Keep FFmpeg's log messages away from Python, as PyAV does by default.

    Any `av.logging.set_level(...)` (torchvision's video module calls it on import) routes
    FFmpeg's messages through a Python callback that takes the GIL on FFmpeg's decoder threads.
    Closing a frame-threaded decoder from Python, which holds the GIL while FFmpeg waits for those
    threads, then deadlocks as soon as one of them logs (a seek into the middle of a stream is
    enough). Decoding errors still raise with their codes; only the logged lines are dropped."""
    if av.logging.get_level() is not None:
        av.logging.set_level(None)


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
        if ctx.name in IMAGE_CODECS and _packets_at_most_one(container, stream):
            raise SourceError(f"a still image ({ctx.name}, read by FFmpeg's {container.format.name} demuxer), "
                              "not a video: one frame of an image codec")
        size = os.path.getsize(local_path(uri)) if is_local(uri) else None
        return SourceInfo(uri, ctx.width, ctx.height, fps, num_frames, duration, ctx.name, size)


def _packets_at_most_one(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> bool:
    """Whether the stream holds one picture at most (reads two packets at most, decodes none)."""
    packets = (packet for packet in container.demux(stream) if packet.size)
    try:
        return sum(1 for _ in itertools.islice(packets, 2)) <= 1
    except av.FFmpegError:  # a broken stream is for the decoder to report
        return False


def set_decode_threads(stream: av.video.stream.VideoStream, threads: int) -> None:
    """FFmpeg's frame and slice threads for this stream (0: FFmpeg decides how many)."""
    stream.thread_type = "AUTO"
    stream.thread_count = threads


def display_rotation(frame: av.VideoFrame) -> int:
    """The display matrix's counter-clockwise rotation: 0, 90, 180 or 270."""
    return int(frame.rotation or 0) % 360


@dataclass
class DecodeStats:
    """What one decode met; filled in while it runs."""

    frames: int = 0  # frames the decoder produced (after a seek, also those before the target)
    skipped_packets: int = 0  # packets the decoder refused: their frames are lost


@dataclass
class DecodedFrame:
    index: int  # position in presentation order from the first decoded frame, as PySceneDetect counts
    time: float  # presentation time in seconds
    pts: int | None
    frame: av.VideoFrame
    after_gap: bool = False  # frames just before this one were lost to undecodable packets


def decode(uri: str | bytes, threads: int = 0, seek_pts: int | None = None,
           stats: DecodeStats | None = None) -> Iterator[DecodedFrame]:
    """Decode frames in order, past undecodable packets (counted in `stats`). With `seek_pts`,
    start at the key frame at or before it; the caller maps pts back to indices (indices then
    restart at 0)."""
    with open_container(uri) as container:
        stream = video_stream(container)
        set_decode_threads(stream, threads)
        yield from decode_stream(container, stream, seek_pts, stats)


def decode_stream(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                  seek_pts: int | None = None, stats: DecodeStats | None = None) -> Iterator[DecodedFrame]:
    """`decode` on a container just opened. Demux errors (the container itself is broken) end
    the frames with a `DecodeError`; packets the decoder refuses are skipped and counted."""
    stats = stats if stats is not None else DecodeStats()
    frames = _decode_packets(container.demux(stream), stream, stats) if seek_pts is None else \
        _from_key_frame(container, stream, seek_pts, stats)
    index = 0
    try:
        for frame, after_gap in frames:
            yield DecodedFrame(index, float(frame.time or 0.0), frame.pts, frame, after_gap and index > 0)
            index += 1
    except av.FFmpegError as exc:
        raise DecodeError(index, str(exc)) from exc


def time_to_pts(stream: av.video.stream.VideoStream, seconds: float) -> int:
    """The pts of a frame presented at `seconds` (a `DecodedFrame.time`) in `stream`."""
    return int(round(seconds / stream.time_base))


def _from_key_frame(container, stream, pts: int, stats: DecodeStats):
    """Frames from the key frame at or before `pts`. Where that key frame does not decode (or
    a demuxer lands after `pts`), decoding starts one key frame earlier, and so on, and at
    worst from the start: slower, never wrong."""
    target, sought = pts, False
    for _ in range(SEEK_ATTEMPTS):
        try:
            container.seek(target, stream=stream, backward=True, any_frame=False)
        except av.FFmpegError:
            break
        sought = True
        packets = container.demux(stream)
        landed = next(packets, None)
        if landed is None or landed.pts is None:
            break
        frames = _decode_packets(itertools.chain([landed], packets), stream, stats)
        first = next(frames, None)
        if first is None or first[0].pts is None or first[0].pts <= pts:
            if first is not None:
                yield first[0], False
                yield from frames
            return
        frames.close()
        packets.close()
        if landed.pts <= (stream.start_time or 0):
            break
        target = min(target, landed.pts) - 1
    if sought:
        container.seek(stream.start_time or 0, stream=stream, backward=True, any_frame=False)
    # else not seekable: a container just opened is at its first packet already
    yield from _decode_packets(container.demux(stream), stream, stats)


def _decode_packets(packets, stream, stats: DecodeStats):
    """(frame, after_gap) in presentation order, past packets the decoder refuses.

    `container.decode` stops at the first refused packet; here each packet is decoded on its
    own, so a corrupt stretch costs its own frames only. Where the lost frames were is found
    from timestamps, because a refusal surfaces late (frame threads, B-frame reordering): once a
    frame with pts P comes out, packets sent earlier with a pts below P whose frames never came
    out are lost, and P is the first frame after the gap. Only refusals make such a gap: packets
    that legitimately give no frame of their own (field pairs, hidden frames) are dropped from
    the bookkeeping without effect.
    """
    codec = stream.codec_context
    pending: list[int] = []  # heap: pts of packets sent whose frames have not come out yet
    unexplained = 0  # refused packets whose missing frames have not been located yet
    for packet in packets:
        if packet.pts is not None:
            heapq.heappush(pending, packet.pts)
        try:
            frames = codec.decode(packet)
        except av.FFmpegError as exc:
            if isinstance(exc, MemoryError):
                raise
            stats.skipped_packets += 1
            unexplained += 1
            continue
        for frame in frames:
            stats.frames += 1
            lost = 0
            if frame.pts is None:
                lost, pending = unexplained, []
            else:
                while pending and pending[0] <= frame.pts:
                    lost += heapq.heappop(pending) < frame.pts
            gap = unexplained > 0 and lost > 0
            if gap:
                unexplained = max(0, unexplained - lost)
            yield frame, gap


class DecodeError(Exception):
    """Decoding stopped early; frames before `index` were delivered."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"decode error at frame {index}: {message}")
        self.index = index


_END = object()


def decode_ahead(uri: str, threads: int = 0, depth: int = 16,
                 stats: DecodeStats | None = None) -> Iterator[DecodedFrame]:
    """`decode` in a background thread, `depth` frames ahead, so that operators' work on one
    frame overlaps with decoding the next (FFmpeg's frame threads only run while fed). `stats`
    is complete once the frames are."""
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
            for decoded in decode(uri, threads, stats=stats):
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


def display_size(width: int, height: int, rotation: int) -> tuple[int, int]:
    return (height, width) if rotation % 180 else (width, height)


def scaler() -> VideoReformatter:
    """One libswscale context per stream of frames: `VideoFrame.reformat` would build (and
    tear down, with a thread pool) a new one for every frame, which costs more than decoding."""
    return VideoReformatter()


def reformat(reformatter: VideoReformatter, frame: av.VideoFrame, width: int, height: int,
             fmt: str | None, interpolation: str = "AREA") -> av.VideoFrame:
    return reformatter.reformat(frame, width=width, height=height, format=fmt,
                                interpolation=interpolation, threads=1)


def rotate(array: np.ndarray, rotation: int) -> np.ndarray:
    # PyAV reports the display matrix's counter-clockwise angle.
    turns = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(array, k=turns)) if turns else array


# Shards store times rounded to the microsecond; frames are far more than this apart.
TIME_TOLERANCE = 1e-4


def clip_arrays(uri: str, start_frame: int, end_frame: int, start_time: float) -> list[np.ndarray]:
    """Frames [start_frame, end_frame) of a source as upright RGB arrays at full size, found as
    the trainer finds a reference-mode clip: a seek to the key frame before `start_time` (the
    presentation time of `start_frame`, right for variable frame rates too), then decoding from
    there. Raises ValueError when the source does not hold those frames (not the file the
    clip was cut from). The clip's frames are held in memory."""
    wanted = end_frame - start_frame
    reformatter = scaler()
    arrays: list[np.ndarray] = []
    with open_container(uri) as container:
        stream = video_stream(container)
        seek_pts = time_to_pts(stream, start_time) if start_frame > 0 else None
        for decoded in decode_stream(container, stream, seek_pts):
            if not arrays and seek_pts is not None:
                if decoded.time < start_time - TIME_TOLERANCE:
                    continue  # between the key frame and the clip
                if decoded.time > start_time + TIME_TOLERANCE:
                    raise ValueError(f"{uri} has no frame at {start_time:.6f} s (frame {start_frame}): "
                                     "is it the file the clip was cut from?")
            frame = decoded.frame
            rgb = reformat(reformatter, frame, frame.width, frame.height, "rgb24").to_ndarray()
            arrays.append(rotate(rgb, display_rotation(frame)))
            if len(arrays) == wanted:
                break
    if len(arrays) < wanted:
        raise ValueError(f"{uri} has {len(arrays)} of frames {start_frame}..{end_frame - 1}: "
                         "is it the file the clip was cut from?")
    return arrays


def encode_mp4(arrays, fps: float, codec: str = "libx264", crf: int = 23, preset: str = "veryfast",
               keep_size: bool = False) -> bytes:
    """RGB frames as an MP4 file's bytes, in yuv420p, which needs even sizes: a last odd row or
    column is dropped, unless `keep_size` asks for the exact size (then an odd-sized clip is
    yuv444p, which fewer players than decoders play)."""
    height, width = arrays[0].shape[:2]
    pix_fmt = "yuv444p" if keep_size and (height % 2 or width % 2) else "yuv420p"
    if pix_fmt == "yuv420p":
        height, width = height - height % 2, width - width % 2
        arrays = [a[:height, :width] for a in arrays]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        rate = Fraction(fps).limit_denominator(100000)
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = height, width
        stream.pix_fmt = pix_fmt
        stream.options = {"crf": str(crf), "preset": preset}
        for pts, array in enumerate(arrays):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = pts
            frame.time_base = 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()
