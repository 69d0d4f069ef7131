"""`clip_length`: keep shots of a trainable length, splitting long ones instead of dropping them."""

from __future__ import annotations

from pydantic import Field, model_validator

from bricks.engine.operator import FanOut, OperatorParams, check_ordered
from bricks.engine.registry import register
from bricks.engine.samples import Dropped, clip_of


class ClipLengthParams(OperatorParams):
    min_frames: int = Field(default=15, ge=1)
    max_frames: int = Field(default=200, ge=1)
    trim_frames: int = Field(default=0, ge=0)
    """Frames removed at each end of a shot first (transition frames near cuts)."""

    @model_validator(mode="after")
    def _ordered(self):
        return check_ordered(self, ("min_frames", "max_frames"))


@register
class ClipLength(FanOut):
    name = "clip_length"
    description = ("Keep clips of min..max frames; split longer shots into max_frames windows "
                   "(a last window under min_frames is dropped).")
    Params = ClipLengthParams

    def applies_to(self, sample) -> bool:
        return sample["kind"] == "video"

    def split(self, sample, frames):
        p = self.params
        start = sample["start_frame"] + p.trim_frames
        end = sample["end_frame"] - p.trim_frames
        if end - start < p.min_frames:
            return [Dropped(sample, f"too short: {max(end - start, 0)} frames < min_frames={p.min_frames}")]
        # Windows from the shot's start: each is settled as soon as the shot is known to reach
        # past it, so long shots are cut while they are still being decoded (`final_before`).
        out = []
        for a in range(start, end, p.max_frames):
            b = min(a + p.max_frames, end)
            clip = clip_of(sample, a, b)
            out.append(clip if b - a >= p.min_frames else
                       Dropped(clip, f"last window too short: {b - a} frames < min_frames={p.min_frames}"))
        return out

    def final_before(self, sample, known_end: int) -> int:
        p = self.params
        start = sample["start_frame"] + p.trim_frames
        settled = known_end - p.trim_frames - start  # frames that will not be trimmed away
        return start + max(0, settled // p.max_frames) * p.max_frames if settled > 0 else sample["start_frame"]
