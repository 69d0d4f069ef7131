"""`motion_filter`: mean optical-flow magnitude (OpenCV Farneback) over frames at a low rate.

The score is the mean per-pixel flow magnitude between consecutive sampled frames, in pixels
at the scored size (or a fraction of the frame diagonal with `relative`); it is stored in
`flow`. Static shots score near zero and are dropped by `min_score`.
"""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from bricks.engine.operator import Filter, FrameRequest, OperatorParams, check_ordered
from bricks.engine.registry import register


class MotionParams(OperatorParams):
    sampling_fps: float = Field(default=2.0, gt=0)
    short_side: int | None = Field(default=128, ge=16)
    """Frames are scaled to this short side before flow (None: as decoded)."""
    relative: bool = False
    """Divide magnitudes by the frame diagonal, making scores independent of size."""
    min_score: float = Field(default=0.25, ge=0)
    """Pixels at the scored size (a fraction of the diagonal with `relative`)."""
    max_score: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _sensible_range(self):
        check_ordered(self, ("min_score", "max_score"))
        if self.relative:
            # The default is in pixels: as a fraction of the diagonal it would drop every clip.
            if "min_score" not in self.model_fields_set:
                raise ValueError("relative: true scores in fractions of the frame diagonal: set min_score "
                                 "in those units too (e.g. 0.001; the default 0.25 is in pixels)")
            for name in ("min_score", "max_score"):
                value = getattr(self, name)
                if value is not None and value > 1:
                    raise ValueError(f"{name} ({value:g}) > 1: with relative: true, scores are fractions "
                                     "of the frame diagonal (at most 1); this looks like pixels")
        return self


@register
class MotionFilter(Filter):
    name = "motion_filter"
    description = "Score motion by Farneback optical flow on frames at sampling_fps; keep min_score..max_score."
    Params = MotionParams
    outputs = {"flow": pa.float64()}
    thresholds = ("min_score", "max_score")

    def applies_to(self, sample) -> bool:
        return sample["kind"] == "video"

    def frame_requests(self):
        p = self.params
        return (FrameRequest("fps", fps=p.sampling_fps, min_count=2, short_side=p.short_side, pixel_format="gray"),)

    def score(self, sample, frames):
        grays = frames[0].arrays
        if len(grays) < 2:
            return {"flow": 0.0}
        magnitudes = []
        for prev, nxt in zip(grays, grays[1:]):
            flow = cv2.calcOpticalFlowFarneback(prev, nxt, None, 0.5, 3, 15, 3, 5, 1.2, 0)
            magnitudes.append(float(cv2.magnitude(flow[..., 0], flow[..., 1]).mean()))
        score = float(np.mean(magnitudes))
        if self.params.relative:
            h, w = grays[0].shape
            score /= float(np.hypot(h, w))
        return {"flow": score}

    def keep(self, scores):
        p, flow = self.params, scores["flow"]
        if flow < p.min_score:
            return f"flow {flow:.3f} < min_score {p.min_score:g}"
        if p.max_score is not None and flow > p.max_score:
            return f"flow {flow:.3f} > max_score {p.max_score:g}"
        return True
