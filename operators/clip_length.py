"""`clip_length`: keep shots of a trainable length, splitting long ones instead of dropping them."""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from bricks.engine.operator import FanOut, OperatorParams
from bricks.engine.registry import register
from bricks.engine.samples import Dropped, clip_of


class ClipLengthParams(OperatorParams):
    min_frames: int = Field(default=15, ge=1)
    max_frames: int = Field(default=200, ge=1)
    trim_frames: int = Field(default=0, ge=0)
    """Frames removed at each end of a shot first (transition frames near cuts)."""

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_frames > self.max_frames:
            raise ValueError(f"min_frames ({self.min_frames}) > max_frames ({self.max_frames})")
        return self


@register
class ClipLength(FanOut):
    name = "clip_length"
    description = "Keep clips of min..max frames; split longer shots into equal pieces of at most max_frames."
    Params = ClipLengthParams

    def applies_to(self, sample) -> bool:
        return sample["kind"] == "video"

    def split(self, sample, frames):
        p = self.params
        start = sample["start_frame"] + p.trim_frames
        end = sample["end_frame"] - p.trim_frames
        length = end - start
        if length < p.min_frames:
            return [Dropped(sample, f"too short: {max(length, 0)} frames < min_frames={p.min_frames}")]
        # Equal pieces rather than max_frames windows plus a remainder: nothing is wasted and
        # no piece falls under min_frames when the shot itself does not.
        pieces = math.ceil(length / p.max_frames)
        bounds = [start + round(i * length / pieces) for i in range(pieces + 1)]
        out = []
        for a, b in zip(bounds, bounds[1:]):
            clip = clip_of(sample, a, b)
            # Only when min_frames is more than half of max_frames can a piece fall short.
            out.append(clip if b - a >= p.min_frames else
                       Dropped(clip, f"piece of a split shot too short: {b - a} frames < min_frames={p.min_frames}"))
        return out
