"""`middle_frame`: add each clip's middle frame as a still-image sample (JPEG).

Training on the middle frames as images teaches the model object appearance in detail; the
clip itself is kept beside its image.
"""

from __future__ import annotations

import cv2
from pydantic import Field

from bricks.engine.operator import FanOut, FrameRequest, OperatorParams
from bricks.engine.registry import register
from bricks.engine.samples import image_of


class MiddleFrameParams(OperatorParams):
    short_side: int | None = Field(default=None, ge=16)
    """Scale the image down to this short side (None: as decoded)."""
    jpeg_quality: int = Field(default=95, ge=1, le=100)


@register
class MiddleFrame(FanOut):
    name = "middle_frame"
    description = "Add the middle frame of every clip as an image sample (JPEG), keeping the clip."
    Params = MiddleFrameParams
    keeps_parent = True  # the clip, then its image

    def applies_to(self, sample) -> bool:
        return sample["kind"] == "video"

    def frame_requests(self):
        return (FrameRequest("fractions", fractions=(0.5,), short_side=self.params.short_side),)

    def split(self, sample, frames):
        (index,), (rgb,) = frames[0].indices, frames[0].arrays
        ok, jpeg = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, self.params.jpeg_quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        return [sample, image_of(sample, index, rgb, jpeg.tobytes())]
