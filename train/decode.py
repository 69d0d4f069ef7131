"""One sample's pixels at the bucket's size: [3, T, H, W] uint8.

They stay 8-bit until they reach the training device, where `normalize` maps them to
[-1, 1]: a quarter of the memory and of the host-to-GPU copy of float pixels.

Clips: `num_frames` frames `frame_interval` apart, from a random start (seeded per sample and
epoch), as Open-Sora's temporal crop takes them; scaled in libswscale so the frame covers the
bucket's size, then centre-cropped. Images: the same resize and crop, T = 1. Media come from
the shard's `media` bytes or, in reference mode, from `path` between `start_frame` and
`end_frame`. Every PyAV container is opened in a `with` block and closed at once: leaving
them to the garbage collector is what froze Lambda's Text2Bricks loader.
"""

from __future__ import annotations

import io

import av
import numpy as np
import torch


class BadSample(Exception):
    """This sample cannot be trained on (the reason is the message); the loader skips it."""


def temporal_indices(available: int, num_frames: int, frame_interval: int, rng: np.random.Generator) -> np.ndarray:
    """Open-Sora's temporal random crop: a window of num_frames * frame_interval frames at a
    random start, `num_frames` indices spread evenly over it."""
    span = num_frames * frame_interval
    if available < num_frames:
        raise BadSample(f"too few frames: {available} decoded, {num_frames} needed")
    start = int(rng.integers(0, max(available - span - 1, 0) + 1))
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
              rng: np.random.Generator, start_frame: int = 0, end_frame: int | None = None) -> torch.Tensor:
    """Frames of a clip: MP4 bytes, or a source file between `start_frame` and `end_frame`."""
    target_h, target_w = size
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else source) as container:
            if not container.streams.video:
                raise BadSample("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            declared = stream.frames or 0
            length = (end_frame - start_frame) if end_frame is not None else declared
            if length <= 0:
                # Frame count unknown: decode once to count, then pick from what was decoded.
                frames = list(container.decode(stream))
                length = len(frames)
            else:
                frames = None
            wanted = temporal_indices(length, num_frames, frame_interval, rng)
            picked = _pick_frames(container, stream, frames, wanted, start_frame)
            if len(picked) < num_frames:
                raise BadSample(f"too few frames: {len(picked)} decoded, {num_frames} needed")
            height, width = picked[0].height, picked[0].width
            scaled_h, scaled_w = _cover_size(height, width, target_h, target_w)
            arrays = [_center_crop(f.to_ndarray(format="rgb24", width=scaled_w, height=scaled_h,
                                                interpolation="BILINEAR"), target_h, target_w) for f in picked]
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise BadSample(f"undecodable video: {str(exc).splitlines()[0][:200]}") from None
    return _to_tensor(arrays)


def _pick_frames(container, stream, frames, wanted: np.ndarray, start_frame: int) -> list:
    """The frames at `wanted` positions (relative to start_frame), decoding no further than the last."""
    if frames is not None:
        return [frames[i] for i in wanted if i < len(frames)]
    targets = {start_frame + int(i) for i in wanted}  # distinct: temporal_indices never repeats one
    last = max(targets)
    picked: dict[int, object] = {}
    for position, frame in enumerate(container.decode(stream)):
        if position in targets:
            picked[position] = frame
        if position >= last:
            break
    return [picked[start_frame + int(i)] for i in wanted if start_frame + int(i) in picked]


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


def read_array(data: bytes, what: str) -> torch.Tensor:
    """A precomputed input stored as `.npy` bytes (float16 or float32) as a float32 tensor."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BadSample(f"{what}: not a .npy array ({str(exc)[:120]})") from None
    if array.dtype.kind != "f":
        raise BadSample(f"{what}: expected floats, got {array.dtype}")
    return torch.from_numpy(array.astype(np.float32, copy=False))
