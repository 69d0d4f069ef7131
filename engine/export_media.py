"""A shard row's media as file bytes, for `export`: the stored MP4 or JPEG as it is, or, in
reference mode, the clip cut from its source.

A reference-mode clip is the source's frames [start_frame, end_frame), found the way the
trainer finds them (`train/decode.py`): a seek to the key frame before `start_time`, then the
frame presented at `start_time` is `start_frame`. The frames are made upright RGB at full size
and encoded as H.264 at the source's frame rate, so the file has the row's `num_frames`,
`width` and `height`.
"""

from __future__ import annotations

from typing import Any

import av

from bricks.common.video import (DecodeError, SourceError, decode_stream, display_rotation, encode_mp4,
                                 open_container, reformat, rotate, scaler, set_decode_threads, time_to_pts,
                                 video_stream)

# Shards store times rounded to the microsecond; frames are far more than this apart.
TIME_TOLERANCE = 1e-4
EXTENSIONS = {"video": ".mp4", "image": ".jpg"}


class MediaError(Exception):
    """This row's media cannot be written; the message says why (without the sample id)."""


def media_extension(row: dict[str, Any]) -> str:
    kind = row["kind"]
    if kind not in EXTENSIONS:
        raise MediaError(f"kind {kind!r} is neither 'video' nor 'image'")
    return EXTENSIONS[kind]


def media_bytes(row: dict[str, Any]) -> tuple[bytes, bool]:
    """The file for `row` and whether it was cut from the source (reference mode)."""
    kind, media, fmt = row["kind"], row.get("media"), row.get("media_format")
    if media is not None:
        expected = "mp4" if kind == "video" else "jpeg"
        if fmt != expected:
            raise MediaError(f"a {kind} whose media_format is {fmt!r}, not {expected!r}")
        return media, False
    if kind == "image":
        raise MediaError("an image without media (its JPEG bytes are missing)")
    return cut_clip(row), True


def cut_clip(row: dict[str, Any]) -> bytes:
    """The row's frames of its source as MP4 bytes."""
    width, height = row["width"], row["height"]
    if width % 2 or height % 2:
        # encode_mp4 writes yuv420p, which would drop the odd column or row.
        raise MediaError(f"{width}x{height} has an odd side, which an H.264 (yuv420p) clip cannot keep")
    start, end = row["start_frame"], row["end_frame"]
    try:
        frames = _source_frames(row["path"], start, end, row["start_time"])
        if len(frames) != end - start:
            raise MediaError(f"source {row['path']} has {len(frames)} of frames {start}..{end - 1}: "
                             "is it the file the shard was made from?")
        arrays = _upright_rgb(frames)
    except (SourceError, DecodeError, av.FFmpegError) as exc:
        raise MediaError(f"source {row['path']}: {str(exc).splitlines()[0]}") from None
    got_h, got_w = arrays[0].shape[:2]
    if (got_w, got_h) != (width, height):
        raise MediaError(f"source {row['path']} decodes at {got_w}x{got_h}, the row says {width}x{height}")
    return encode_mp4(arrays, row["fps"])


def _source_frames(path: str, start: int, end: int, start_time: float) -> list[av.VideoFrame]:
    with open_container(path) as container:
        stream = video_stream(container)
        set_decode_threads(stream, 0)
        frames: list[av.VideoFrame] = []
        found = False
        for decoded in decode_stream(container, stream, time_to_pts(stream, start_time)):
            if not found:
                if decoded.time < start_time - TIME_TOLERANCE:
                    continue  # between the key frame and the clip
                if decoded.time > start_time + TIME_TOLERANCE:
                    raise MediaError(f"source {path} has no frame at {start_time:.6f} s (frame {start}): "
                                     "is it the file the shard was made from?")
                found = True
            frames.append(decoded.frame)
            if len(frames) == end - start:
                break
        return frames


def _upright_rgb(frames: list[av.VideoFrame]) -> list:
    rotation = display_rotation(frames[0])
    reformatter = scaler()
    arrays = []
    for frame in frames:
        rgb = reformat(reformatter, frame, frame.width, frame.height, "rgb24").to_ndarray()
        arrays.append(rotate(rgb, rotation))
    return arrays
