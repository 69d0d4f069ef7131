"""Open-Sora 1.1's buckets: which (resolution, frames, aspect ratio) a sample trains at.

A config is `{resolution: {num_frames: (keep_prob, batch_size)}}`, e.g. Text2Bricks' 64-frame
stage, `{"360p": {1: (1.0, 256), 32: (1.0, 8), 64: (1.0, 4)}}`. A sample goes to the largest
resolution that it has at least 0.8x the pixels of; within it, a still image goes to the
T = 1 bucket, a video to the longest T whose `T * frame_interval` frames it has more than.
With probability 1 - keep_prob it falls through to the next lower resolution; a sample that
fits no bucket is left out. The aspect ratio is the nearest of the resolution's table.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from bricks.model.aspect import closest_ratio, resolutions

PIXEL_TOLERANCE = 0.8  # a sample may have this fraction of a resolution's pixels and still use it


@dataclass(frozen=True, order=True)
class BucketKey:
    resolution: str
    num_frames: int
    ratio: str

    def __str__(self) -> str:
        return f"{self.resolution}/{self.num_frames}f/{self.ratio}"


class BucketConfigError(ValueError):
    pass


def parse_bucket_config(raw: dict) -> dict[str, dict[int, tuple[float, int]]]:
    """Validate a bucket config as YAML or Python gives it (frame keys may be strings, pairs lists)."""
    if not isinstance(raw, dict) or not raw:
        raise BucketConfigError("bucket_config must be a non-empty mapping {resolution: {num_frames: [keep_prob, batch_size]}}")
    known = resolutions()
    config: dict[str, dict[int, tuple[float, int]]] = {}
    for resolution, frames in raw.items():
        if resolution not in known:
            raise BucketConfigError(f"bucket_config: unknown resolution {resolution!r} (known: {', '.join(known)})")
        if not isinstance(frames, dict) or not frames:
            raise BucketConfigError(f"bucket_config.{resolution}: expected {{num_frames: [keep_prob, batch_size]}}")
        config[resolution] = {}
        for t, entry in frames.items():
            where = f"bucket_config.{resolution}.{t}"
            try:
                num_frames = int(t)
                keep_prob, batch_size = entry
                keep_prob, batch_size = float(keep_prob), int(batch_size)
            except (TypeError, ValueError):
                raise BucketConfigError(f"{where}: expected [keep_prob, batch_size], got {entry!r}") from None
            if num_frames < 1 or not 0 <= keep_prob <= 1 or batch_size < 1:
                raise BucketConfigError(f"{where}: need num_frames >= 1, keep_prob in [0, 1], batch_size >= 1")
            config[resolution][num_frames] = (keep_prob, batch_size)
    return config


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from any values, the same in every process (unlike hash())."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class Buckets:
    def __init__(self, config: dict, frame_interval: int = 1) -> None:
        self.config = parse_bucket_config(config)
        if frame_interval < 1:
            raise BucketConfigError(f"frame_interval must be at least 1, got {frame_interval}")
        self.frame_interval = frame_interval
        table = resolutions()
        # Largest resolution first; within one, longest clips first.
        self.order = sorted(self.config, key=lambda r: table[r]["pixels"], reverse=True)
        self.pixels = {r: table[r]["pixels"] for r in self.order}
        self.sizes = {r: table[r]["sizes"] for r in self.order}

    def assign(self, num_frames: int, height: int, width: int, is_image: bool, seed: object,
               draw: bool = True) -> BucketKey | None:
        """The bucket of one sample, or None. `seed` (e.g. the run seed, epoch and sample id)
        makes the keep_prob draws reproducible. `draw=False` takes the first choice instead (no
        fall-through, but never a bucket of keep_prob 0): the bucket of precomputed latents."""
        area = height * width
        for resolution in self.order:
            if area < self.pixels[resolution] * PIXEL_TOLERANCE:
                continue
            lengths = self.config[resolution]
            if is_image or num_frames == 1:
                chosen = 1 if 1 in lengths else None
            else:
                chosen = next((t for t in sorted(lengths, reverse=True)
                               if t != 1 and num_frames > t * self.frame_interval), None)
            if chosen is None:
                continue
            keep_prob = lengths[chosen][0]
            if not draw:
                if keep_prob > 0:
                    return BucketKey(resolution, chosen, closest_ratio(height / width, resolution))
                continue
            if keep_prob >= 1 or np.random.default_rng(stable_seed(seed, resolution, chosen)).random() < keep_prob:
                return BucketKey(resolution, chosen, closest_ratio(height / width, resolution))
        return None

    def requirements(self) -> str:
        """The least a sample needs to fit a bucket, in words (for messages about those that fit none)."""
        smallest = self.order[-1]
        needs = [f"{round(self.pixels[smallest] * PIXEL_TOLERANCE)} pixels or more (0.8x {smallest})"]
        clip_lengths = [t * self.frame_interval for lengths in self.config.values() for t in lengths if t != 1]
        if clip_lengths:
            needs.append(f"a clip more than {min(clip_lengths)} frames")
        words = "a sample needs " + ", and ".join(needs)
        if not any(1 in lengths for lengths in self.config.values()):
            words += "; no bucket takes still images"
        return words

    def frame_size(self, key: BucketKey) -> tuple[int, int, int]:
        """(frames, height, width) that samples of `key` are cut to."""
        height, width = self.sizes[key.resolution][key.ratio]
        return key.num_frames, height, width

    def batch_size(self, key: BucketKey) -> int:
        return self.config[key.resolution][key.num_frames][1]
