"""Samples between bricks and Data-Juicer.

A bricks sample is one row of the shard schema: one clip (a frame range of a source, or MP4
bytes in `media`) or one image (JPEG bytes), with its caption in `text`. A Data-Juicer sample
is a dict with `text`, lists of media files under `videos` and `images`, and its stats and
meta dicts. Data-Juicer's operators open their files themselves, so a clip becomes a file:
the source itself when the clip is all of it, else its bytes or its frames cut from the source,
written into a folder the caller owns (and removes).

Plain functions on plain dicts: nothing here imports Data-Juicer. The caller passes its
special tokens (`DJTokens`) and its field names.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from bricks.common.video import clip_arrays, encode_mp4, is_local, local_path, probe

# Stats Data-Juicer writes as text; every other stat is a number.
STRING_STATS = frozenset({"lang"})


@dataclass(frozen=True)
class DJTokens:
    """Data-Juicer's special tokens (`data_juicer.utils.mm_utils.SpecialTokens`), which it
    reads from the environment: pass them in rather than spelling them here."""

    video: str
    image: str
    eoc: str

    def all(self) -> tuple[str, ...]:
        return self.video, self.image, self.eoc


@dataclass(frozen=True)
class DJKeys:
    """Data-Juicer's field names (`data_juicer.utils.constant.Fields`)."""

    stats: str
    meta: str
    text: str = "text"
    videos: str = "videos"
    images: str = "images"


def text_only_sample(sample: dict[str, Any], keys: DJKeys) -> dict[str, Any]:
    """For operators that read the caption alone: the caption ("" when there is none), with
    the media lists naming the source (no file is made)."""
    videos, images = ([sample["source_uri"]], []) if sample["kind"] == "video" else ([], [sample["source_uri"]])
    return {keys.text: sample.get("text") or "", keys.videos: videos, keys.images: images,
            keys.stats: {}, keys.meta: {}}


def media_sample(sample: dict[str, Any], keys: DJKeys, tokens: DJTokens, folder: Path) -> dict[str, Any]:
    """For operators that open media: the caption between Data-Juicer's tokens, and the clip
    or image as a file (`media_file`)."""
    file = media_file(sample, folder)
    token = tokens.video if sample["kind"] == "video" else tokens.image
    text = " ".join(part for part in (token, sample.get("text") or "", tokens.eoc) if part)
    videos, images = ([file], []) if sample["kind"] == "video" else ([], [file])
    return {keys.text: text, keys.videos: videos, keys.images: images, keys.stats: {}, keys.meta: {}}


def media_file(sample: dict[str, Any], folder: Path) -> str:
    """A file holding the sample's pixels: the local source itself when the clip is all of it,
    else the sample's `media` bytes, else its frames cut from the source, re-encoded (written
    into `folder`)."""
    media = sample.get("media")
    if sample["kind"] == "image":
        if media is None:
            raise ValueError("image sample without JPEG bytes in `media`")
        return _write(folder / "image.jpg", media)
    if media is not None:
        return _write(folder / f"clip.{sample.get('media_format') or 'mp4'}", media)
    uri = sample["source_uri"]
    if covers_source(sample):
        return local_path(uri)
    return _write(folder / "clip.mp4", cut_clip(uri, sample["start_frame"], sample["end_frame"],
                                                 sample["start_time"], sample["fps"]))


def covers_source(sample: dict[str, Any]) -> bool:
    """Whether a reference-mode clip is its whole local source. The container's frame count
    is compared: where it overstates the frames that decode, the clip is cut instead (slower,
    never wrong)."""
    uri = sample["source_uri"]
    return is_local(uri) and sample["start_frame"] == 0 and sample["end_frame"] >= probe(uri).num_frames


def cut_clip(uri: str, start_frame: int, end_frame: int, start_time: float, fps: float) -> bytes:
    """Frames [start_frame, end_frame) of a source, upright, as MP4 bytes at `fps`."""
    return encode_mp4(clip_arrays(uri, start_frame, end_frame, start_time), fps, keep_size=True)


def _write(path: Path, data: bytes) -> str:
    # A scratch file in the caller's own temporary folder, removed with it: nothing to make atomic.
    path.write_bytes(data)
    return str(path)


def caption_from_dj(text: str | None, tokens: DJTokens) -> str | None:
    """A Data-Juicer text as a bricks caption: without its special tokens, trimmed."""
    if text is None:
        return None
    for token in tokens.all():
        text = text.replace(token, " ")
    return " ".join(text.split())


def stat_columns(stats: dict[str, Any], declared: dict[str, str], op_name: str) -> dict[str, Any]:
    """Data-Juicer stats as bricks columns `dj_<key>`. A bricks sample has one clip or image,
    so per-media lists hold one value and are unwrapped (an empty list is no value). `declared`
    maps each stat key the operator may write to "number" or "string"."""
    columns = {}
    for key, value in stats.items():
        kind = declared.get(key)
        if kind is None:
            raise ValueError(f"{op_name} wrote stat '{key}', which is not among the stats found in its source")
        if isinstance(value, (list, tuple, np.ndarray)):
            if len(value) > 1:
                raise ValueError(f"{op_name}: stat '{key}' has {len(value)} values for one sample")
            value = value[0] if len(value) else None
        columns[column_of(key)] = _stat_value(value, kind, key, op_name)
    return columns


def column_of(stat_key: str) -> str:
    return f"dj_{stat_key}"


def _stat_value(value: Any, kind: str, key: str, op_name: str) -> Any:
    if value is None:
        return None
    if kind == "string":
        if isinstance(value, str):
            return value
    elif isinstance(value, (int, float, np.integer, np.floating, Fraction)) and not isinstance(value, (bool, np.bool_)):
        return float(value)
    raise ValueError(f"{op_name}: stat '{key}' is a {type(value).__name__} ({_preview(value)}), "
                     f"not a {kind}")


def meta_json(previous: str | None, fields: dict[str, Any], op_name: str) -> str | None:
    """`previous` (a JSON object, or None) updated with `fields`, as JSON."""
    if not fields:
        return previous
    merged = json.loads(previous) if previous else {}
    for name, value in fields.items():
        merged[name] = _json_value(value, name, op_name)
    return json.dumps(merged, sort_keys=True)


def _json_value(value: Any, name: str, op_name: str) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(v, name, op_name) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v, f"{name}.{k}", op_name) for k, v in value.items()}
    raise ValueError(f"{op_name}: field '{name}' holds a {type(value).__name__}, which dj_meta (JSON) cannot hold")


def _preview(value: Any, limit: int = 60) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
