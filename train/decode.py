"""One sample's pixels at the bucket's size: [3, T, H, W] uint8.

They stay 8-bit until they reach the training device, where `normalize` maps them to
[-1, 1]: a quarter of the memory and of the host-to-GPU copy of float pixels.

Clips: `num_frames` frames `frame_interval` apart, from a random start (seeded per sample and
epoch), as Open-Sora's temporal crop takes them, or from the middle start (`data.temporal_crop:
center`, the crop `encode_latents` stores latents of); scaled in libswscale so the frame covers the
bucket's size, then centre-cropped. Images: the same resize and crop, T = 1. Media come from
the shard's `media` bytes or, in reference mode, from `path` (a path or fsspec URI) between
`start_frame` and `end_frame`.

Videos are opened, decoded and oriented by the code `bricks-dj` decodes with (`bricks.common.video`),
so a reference-mode clip has exactly the frames `bricks-dj` numbered: upright when the source
carries a display rotation, past the same undecodable packets, and found by seeking to the key
frame before the clip's `start_time` rather than decoding the source from its first frame.
Every container is closed at once: leaving them to the garbage collector is what froze
Lambda's Text2Bricks loader.
"""

from __future__ import annotations

import io

import av
import numpy as np
import torch

from bricks.common.video import (DecodeError, DecodeStats, SourceError, decode_stream, display_rotation, display_size,
                                 open_container, reformat, rotate, scaler, set_decode_threads, time_to_pts,
                                 video_stream)

# Shards store times rounded to the microsecond; frames are far more than this apart.
TIME_TOLERANCE = 1e-4


class BadSample(Exception):
    """This sample cannot be trained on (the reason is the message); the loader skips it."""


def temporal_indices(available: int, num_frames: int, frame_interval: int,
                     rng: np.random.Generator | None) -> np.ndarray:
    """Open-Sora's temporal random crop: a window of num_frames * frame_interval frames at a
    random start, `num_frames` indices spread evenly over it. `rng=None` takes the middle one
    of those starts instead (the deterministic crop that precomputed latents are made with)."""
    span = num_frames * frame_interval
    if available < num_frames:
        raise BadSample(f"too few frames: {available} decoded, {num_frames} needed")
    last_start = max(available - span - 1, 0)
    start = last_start // 2 if rng is None else int(rng.integers(0, last_start + 1))
    end = min(start + span, available)
    return np.linspace(start, end - 1, num_frames).astype(int)


def _cover_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    scale = max(target_h / height, target_w / width)
    return max(target_h, round(height * scale)), max(target_w, round(width * scale))


def _center_crop(array: np.ndarray, target_h: int, target_w: int) -> np.ndarray:
    top, left = (array.shape[0] - target_h) // 2, (array.shape[1] - target_w) // 2
    return array[top:top + target_h, left:left + target_w]


def _to_tensor(frames: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)  # [3, T, H, W] uint8, a view


def normalize(video: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to floats in [-1, 1], as the VAE takes them."""
    return video.float().div_(127.5).sub_(1.0)


def read_clip(source: bytes | str, num_frames: int, frame_interval: int, size: tuple[int, int],
              rng: np.random.Generator | None, start_frame: int = 0, end_frame: int | None = None,
              start_time: float | None = None, stats: DecodeStats | None = None) -> torch.Tensor:
    """Frames of a clip: MP4 bytes, or a source file between `start_frame` and `end_frame`.

    `start_time` is the shard's presentation time of `start_frame`: decoding then starts at the
    key frame before it, and the frame shown at that time is `start_frame`. Without it, frames
    are counted from the first one of the file. `stats` counts what was decoded."""
    target_h, target_w = size
    try:
        with open_container(source) as container:
            stream = video_stream(container)
            set_decode_threads(stream, 0)
            length = (end_frame - start_frame) if end_frame is not None else (stream.frames or 0)
            if length <= 0:
                # Frame count unknown: decode once to count, then pick from what was decoded.
                frames = [d.frame for d in decode_stream(container, stream, stats=stats)]
                picked = [frames[i] for i in temporal_indices(len(frames), num_frames, frame_interval, rng)]
            else:
                wanted = temporal_indices(length, num_frames, frame_interval, rng)
                picked = _pick_frames(container, stream, wanted, start_frame, start_time, stats)
            if len(picked) < num_frames:
                raise BadSample(f"too few frames: {len(picked)} decoded, {num_frames} needed")
            arrays = _upright_rgb(picked, target_h, target_w)
    except (SourceError, DecodeError, av.FFmpegError, OSError, ValueError) as exc:
        raise BadSample(f"undecodable video: {str(exc).splitlines()[0][:200]}") from None
    return _to_tensor(arrays)


def _pick_frames(container, stream, wanted: np.ndarray, start_frame: int, start_time: float | None,
                 stats: DecodeStats | None) -> list:
    """The frames at `wanted` positions (relative to start_frame), decoding no further than the last."""
    targets = {int(i) for i in wanted}  # distinct: temporal_indices never repeats one
    last = max(targets)
    seek_pts = None if start_time is None else time_to_pts(stream, start_time)
    picked: dict[int, object] = {}
    position: int | None = None
    for decoded in decode_stream(container, stream, seek_pts, stats):
        if seek_pts is None:
            position = decoded.index - start_frame
        elif position is not None:
            position += 1
        elif decoded.time < start_time - TIME_TOLERANCE:
            continue  # between the key frame and the clip
        elif decoded.time > start_time + TIME_TOLERANCE:
            raise BadSample(f"no frame at {start_time:.6f} s (frame {start_frame}) in the source: "
                            "is it the file the shard was made from?")
        else:
            position = 0
        if position in targets:
            picked[position] = decoded.frame
        if position >= last:
            break
    return [picked[int(i)] for i in wanted if int(i) in picked]


def _upright_rgb(frames: list, target_h: int, target_w: int) -> list[np.ndarray]:
    """RGB arrays that cover (target_h, target_w) as displayed, centre-cropped to it. Scaling
    happens in libswscale on the coded frame; the display rotation is applied after."""
    rotation = display_rotation(frames[0])
    width, height = display_size(frames[0].width, frames[0].height, rotation)
    scaled_h, scaled_w = _cover_size(height, width, target_h, target_w)
    coded_w, coded_h = display_size(scaled_w, scaled_h, rotation)
    reformatter = scaler()
    arrays = []
    for frame in frames:
        rgb = reformat(reformatter, frame, coded_w, coded_h, "rgb24", "BILINEAR").to_ndarray()
        arrays.append(_center_crop(rotate(rgb, rotation), target_h, target_w).copy())  # own the pixels
    return arrays


def read_image(source: bytes | str, size: tuple[int, int]) -> torch.Tensor:
    """A still image (JPEG/PNG bytes or a file) as [3, 1, H, W]."""
    from PIL import Image, UnidentifiedImageError

    target_h, target_w = size
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image = image.convert("RGB")
            scaled_h, scaled_w = _cover_size(image.height, image.width, target_h, target_w)
            array = np.asarray(image.resize((scaled_w, scaled_h), Image.BILINEAR))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise BadSample(f"undecodable image: {str(exc)[:200]}") from None
    return _to_tensor([_center_crop(array, target_h, target_w)])


def read_sample(row: dict, num_frames: int, size: tuple[int, int], frame_interval: int,
                rng: np.random.Generator | None) -> torch.Tensor:
    """A shard row's pixels at the bucket's size, as the trainer trains on them: an image, or
    a clip from `media` or (reference mode) from `path` between its start and end frames."""
    source = row.get("media") if row.get("media") is not None else row.get("path")
    if source is None:
        raise BadSample("no media and no path")
    if row.get("kind") == "image" or num_frames == 1 and row.get("media_format") == "jpeg":
        return read_image(source, size)
    if row.get("media") is not None:
        return read_clip(source, num_frames, frame_interval, size, rng)
    return read_clip(source, num_frames, frame_interval, size, rng, int(row.get("start_frame") or 0),
                     row.get("end_frame"), row.get("start_time"))


def read_array(data: bytes, what: str, dtype: str | None = None) -> torch.Tensor:
    """A precomputed input stored as `.npy` bytes as a float32 tensor: float16 or float32, or,
    with `dtype="bf16"` (the row's `latent_dtype`), uint16 holding bfloat16 bit patterns,
    since .npy has no bfloat16. Both stored forms convert to float32 exactly."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BadSample(f"{what}: not a .npy array ({str(exc)[:120]})") from None
    if dtype == "bf16":
        if array.dtype != np.uint16:
            raise BadSample(f"{what}: latent_dtype is bf16, so the array should be uint16 bit patterns, got {array.dtype}")
        return torch.from_numpy((array.astype(np.uint32) << 16).view(np.float32))
    if dtype not in (None, "fp16"):
        raise BadSample(f"{what}: unknown latent_dtype {dtype!r} (bf16 or fp16)")
    if array.dtype.kind != "f":
        raise BadSample(f"{what}: expected floats, got {array.dtype}")
    return torch.from_numpy(array.astype(np.float32, copy=False))
