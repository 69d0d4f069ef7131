"""Filters on container metadata: frame size, duration and frame rate. Nothing is decoded."""

from __future__ import annotations

from pydantic import Field, model_validator

from bricks.engine.operator import Filter, OperatorParams, check_ordered
from bricks.engine.registry import register


def _within(value: float, low: float | None, high: float | None, what: str) -> bool | str:
    if low is not None and value < low:
        return f"{what} {value:g} < {low:g}"
    if high is not None and value > high:
        return f"{what} {value:g} > {high:g}"
    return True


class ResolutionParams(OperatorParams):
    min_width: int = Field(default=1, ge=1)
    max_width: int | None = Field(default=None, ge=1)
    min_height: int = Field(default=1, ge=1)
    max_height: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _bounds(self):
        return check_ordered(self, ("min_width", "max_width"), ("min_height", "max_height"))


@register
class ResolutionFilter(Filter):
    name = "resolution_filter"
    description = "Keep videos whose displayed width and height lie within the given bounds."
    Params = ResolutionParams
    thresholds = ("min_width", "max_width", "min_height", "max_height")

    def score(self, sample, frames):
        return {"width": sample["width"], "height": sample["height"]}

    def keep(self, scores):
        p = self.params
        ok = _within(scores["width"], p.min_width, p.max_width, "width")
        return ok if ok is not True else _within(scores["height"], p.min_height, p.max_height, "height")


class DurationParams(OperatorParams):
    min_duration: float = Field(default=0.0, ge=0)
    max_duration: float | None = Field(default=None, gt=0)
    """Seconds."""

    @model_validator(mode="after")
    def _bounds(self):
        return check_ordered(self, ("min_duration", "max_duration"))


@register
class DurationFilter(Filter):
    name = "duration_filter"
    description = "Keep videos (or clips) lasting min_duration to max_duration seconds."
    Params = DurationParams
    thresholds = ("min_duration", "max_duration")

    def applies_to(self, sample) -> bool:
        return sample["kind"] == "video"

    def score(self, sample, frames):
        # Scores are columns; the duration is not one, its ends are.
        return {"start_time": sample["start_time"], "end_time": sample["end_time"]}

    def keep(self, scores):
        duration = round(scores["end_time"] - scores["start_time"], 6)
        return _within(duration, self.params.min_duration, self.params.max_duration, "duration (s)")


class FpsParams(OperatorParams):
    min_fps: float = Field(default=0.0, ge=0)
    max_fps: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _bounds(self):
        return check_ordered(self, ("min_fps", "max_fps"))


@register
class FpsFilter(Filter):
    name = "fps_filter"
    description = "Keep videos whose average frame rate lies within min_fps..max_fps."
    Params = FpsParams
    thresholds = ("min_fps", "max_fps")

    def applies_to(self, sample) -> bool:
        return sample["kind"] == "video"

    def score(self, sample, frames):
        return {"fps": sample["fps"]}

    def keep(self, scores):
        return _within(scores["fps"], self.params.min_fps, self.params.max_fps, "fps")
