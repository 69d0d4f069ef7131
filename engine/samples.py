"""Building samples: the source sample, clips of it, and still-image samples.

Operators only choose frame ranges (`clip_of`) or give an image (`image_of`); the engine then
fills in the derived columns (id, times, frame count) with `SourceContext.finalize`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .operator import Sample
from .schema import sample_id
from bricks.common.video import SourceInfo


@dataclass
class Dropped:
    """A fan-out child that is not kept, with the reason recorded in the rejects table."""

    sample: Sample
    reason: str


class Drop(Exception):
    """Raised by any operator to drop the current sample with a reason."""


def clip_of(parent: Sample, start: int, end: int, within_parent: bool = True) -> Sample:
    """A video sample covering source frames [start, end) of the parent's source."""
    if not start < end or (within_parent and not parent["start_frame"] <= start < end <= parent["end_frame"]):
        raise ValueError(
            f"clip [{start}, {end}) is outside its parent [{parent['start_frame']}, {parent['end_frame']})"
        )
    child = {k: v for k, v in parent.items() if not k.startswith("_")}
    child.update(kind="video", start_frame=start, end_frame=end, media=None, media_format=None)
    return child


def image_of(parent: Sample, index: int, rgb: np.ndarray, jpeg: bytes) -> Sample:
    """A still-image sample from source frame `index` (the RGB array stays attached for
    later operators in the same recipe; it is not written to the shard)."""
    child = {k: v for k, v in parent.items() if not k.startswith("_")}
    height, width = rgb.shape[:2]
    child.update(
        kind="image", start_frame=index, end_frame=index + 1, fps=None,
        height=height, width=width, media=jpeg, media_format="jpeg", _image=rgb,
    )
    return child


@dataclass
class SourceContext:
    """What is known about one source while it is processed."""

    info: SourceInfo
    recipe_key: str
    times: list[float] = field(default_factory=list)  # presentation time of each decoded frame, in seconds
    rotation: int = 0

    def source_sample(self, fields: dict | None = None) -> Sample:
        """The whole source as one sample, with the `fields` a data-set file gave it."""
        width, height = self.info.width, self.info.height
        num_frames = self.info.num_frames
        return self.finalize({
            "text": None, **(fields or {}),
            "kind": "video", "source_uri": self.info.uri, "path": self.info.uri,
            "start_frame": 0, "end_frame": num_frames, "fps": self.info.fps,
            "width": width, "height": height, "media": None, "media_format": None,
        })

    def oriented(self, sample: Sample) -> Sample:
        """The source sample with its displayed size, once the first frame showed rotation."""
        if self.rotation % 180:
            sample = dict(sample, width=self.info.height, height=self.info.width)
        return self.finalize(dict(sample))

    def decoded(self, sample: Sample) -> Sample:
        """The source sample once decoding has counted the real frames."""
        return self.finalize(dict(sample, end_frame=len(self.times)))

    def time_at(self, index: int) -> float:
        if not self.times:
            return index / self.info.fps
        if index < len(self.times):
            return self.times[index]
        return self.times[-1] + (index - len(self.times) + 1) / self.info.fps

    def finalize(self, sample: Sample) -> Sample:
        start, end = sample["start_frame"], sample["end_frame"]
        sample["num_frames"] = end - start
        sample["start_time"] = round(self.time_at(start), 6)
        sample["end_time"] = round(self.time_at(end) if sample["kind"] == "video" else self.time_at(start), 6)
        sample["aspect_ratio"] = sample["height"] / sample["width"]
        sample["resolution"] = sample["height"] * sample["width"]
        sample["sample_id"] = sample_id(self.info.uri, self.recipe_key, sample["kind"], start, end)
        return sample
