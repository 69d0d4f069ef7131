"""A shard row's media as file bytes, for `export`: the stored MP4 or JPEG as it is, or, in
reference mode, the clip cut from its source.

A reference-mode clip is the source's frames [start_frame, end_frame), found the way the
trainer finds them (`bricks.common.video.clip_arrays`), upright RGB at full size, encoded as
H.264 at the source's frame rate, so the file has the row's `num_frames`, `width` and `height`
(an odd side is kept: such a clip is yuv444p).
"""

from __future__ import annotations

from typing import Any

import av

from bricks.common.video import DecodeError, SourceError, clip_arrays, encode_mp4
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
    """The row's frames of its source as MP4 bytes, at the row's exact size."""
    width, height = row["width"], row["height"]
    try:
        arrays = clip_arrays(row["path"], row["start_frame"], row["end_frame"], row["start_time"])
    except ValueError as exc:
        raise MediaError(f"source {exc}") from None
    except (SourceError, DecodeError, av.FFmpegError) as exc:
        raise MediaError(f"source {row['path']}: {str(exc).splitlines()[0]}") from None
    got_h, got_w = arrays[0].shape[:2]
    if (got_w, got_h) != (width, height):
        raise MediaError(f"source {row['path']} decodes at {got_w}x{got_h}, the row says {width}x{height}")
    return encode_mp4(arrays, row["fps"], keep_size=True)
