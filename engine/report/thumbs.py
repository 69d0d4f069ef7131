"""Thumbnails: a strip of 3 frames of a clip (at 1/6, 1/2 and 5/6 of it) or the image, as JPEG.

A kept sample's frames come from its `media` (MP4 or JPEG) or, in reference mode, from its
source file; a rejected sample has no media, so its frames are read from the source. Each
source is decoded once for all the frames wanted from it, up to the last of them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import av
import cv2
import numpy as np
import pyarrow.parquet as pq

from bricks.common.video import DecodeError, SourceError, decode, display_rotation, reformat, rotate, scaler

from ..store import Store

HEIGHT = 120  # pixels of each frame in a strip
QUALITY = 80


def frame_positions(start: int, end: int) -> list[int]:
    """Frames of [start, end) a strip shows: one for a single frame, else three."""
    n = max(end - start, 1)
    if n == 1:
        return [start]
    return sorted({start + min(n - 1, (n * k) // 6) for k in (1, 3, 5)})


def thumbnails(store: Store, rows: list[dict[str, Any]]) -> dict[str, bytes | str]:
    """{sample_id: JPEG bytes, or the reason there is none} for kept rows (from shards, with
    `_shard`/`_group`/`_row`) and rejected rows alike."""
    made: dict[str, bytes | str] = {}
    wanted: dict[str, dict[int, None]] = defaultdict(dict)  # source -> frame indices (ordered set)
    from_source: dict[str, tuple[str, list[int]]] = {}
    for row in rows:
        sid = row["sample_id"]
        if sid in made or sid in from_source:
            continue
        if row.get("kind") not in ("video", "image"):
            made[sid] = f"a {row.get('kind')} reject has no frames"
            continue
        if row.get("media") is not None and row.get("media_format") is not None:  # a row held in memory
            made[sid] = _from_bytes(row["media"], row)
            continue
        if row.get("_shard") is not None and row.get("media_format") is not None:
            made[sid] = _from_media(store, row)
            continue
        uri = row.get("path") or row.get("source_uri")
        if not uri or row.get("start_frame") is None:
            made[sid] = "no media and no source to read frames from"
            continue
        end = row["end_frame"] if row.get("end_frame") is not None else row["start_frame"] + 1
        positions = frame_positions(row["start_frame"], end) if row["kind"] == "video" else [row["start_frame"]]
        from_source[sid] = (uri, positions)
        wanted[uri].update(dict.fromkeys(positions))
    frames = {uri: _source_frames(uri, set(indices)) for uri, indices in wanted.items()}
    for sid, (uri, positions) in from_source.items():
        found = frames[uri]
        if isinstance(found, str):
            made[sid] = found
        elif any(p not in found for p in positions):
            made[sid] = f"{uri} has fewer frames than the sample's range"
        else:
            made[sid] = _jpeg([found[p] for p in positions])
    return made


def _from_media(store: Store, row: dict[str, Any]) -> bytes | str:
    with store.fs.open(store.path(row["_shard"]), "rb") as f:
        media = pq.ParquetFile(f).read_row_group(row["_group"], columns=["media"]).column("media")[row["_row"]].as_py()
    if media is None:
        return "the row's media is empty"
    return _from_bytes(media, row)


def _from_bytes(media: bytes, row: dict[str, Any]) -> bytes | str:
    if row["kind"] == "image":
        image = cv2.imdecode(np.frombuffer(media, np.uint8), cv2.IMREAD_COLOR)
        return "its JPEG does not decode" if image is None else _jpeg([cv2.cvtColor(image, cv2.COLOR_BGR2RGB)])
    positions = frame_positions(0, row.get("num_frames") or 1)
    found = _source_frames(media, set(positions))
    if isinstance(found, str):
        return found
    if not found:
        return "its MP4 holds no frames"
    return _jpeg([found.get(p, found[max(found)]) for p in positions])


def _source_frames(uri: str | bytes, indices: set[int]) -> dict[int, np.ndarray] | str:
    """Frames `indices` (presentation order, as the engine counts) as upright RGB at thumbnail
    height, or why they cannot be read."""
    found: dict[int, np.ndarray] = {}
    last = max(indices)
    reformatter = scaler()
    try:
        for decoded in decode(uri):
            if decoded.index in indices:
                frame = decoded.frame
                rotation = display_rotation(frame)
                # Scaled before turning: the side that becomes the height is the width when turned.
                side = frame.width if rotation % 180 else frame.height
                scale = HEIGHT / side
                w, h = max(2, round(frame.width * scale)), max(2, round(frame.height * scale))
                rgb = reformat(reformatter, frame, w, h, "rgb24").to_ndarray()
                found[decoded.index] = rotate(rgb, rotation)
            if decoded.index >= last:
                break
    except (SourceError, DecodeError, av.FFmpegError, OSError) as exc:
        where = "its MP4" if isinstance(uri, bytes) else uri
        return f"{where}: {(str(exc) or type(exc).__name__).splitlines()[0]}"
    return found


def _jpeg(frames: list[np.ndarray]) -> bytes:
    resized = [f if f.shape[0] == HEIGHT else
               cv2.resize(f, (max(2, round(f.shape[1] * HEIGHT / f.shape[0])), HEIGHT), interpolation=cv2.INTER_AREA)
               for f in frames]
    gap = np.full((HEIGHT, 4, 3), 255, np.uint8)
    strip = np.concatenate([part for f in resized for part in (f, gap)][:-1], axis=1)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(strip, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, QUALITY])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG thumbnail")
    return data.tobytes()
