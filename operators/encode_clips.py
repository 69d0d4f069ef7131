"""`encode_clips`: store each clip in `media` as an H.264 MP4 (otherwise shards reference sources).

With `short_side` or `fps` set, `width`, `height`, `fps` and `num_frames` describe the encoded
media; `start_frame`/`end_frame` stay in source frame indices.
"""

from __future__ import annotations

import av
from pydantic import Field

from bricks.common.video import encode_mp4
from bricks.engine.operator import FrameRequest, Mapper, OperatorParams
from bricks.engine.registry import register


class EncodeParams(OperatorParams):
    short_side: int | None = Field(default=None, ge=16)
    """Scale down to this short side (None: as the source)."""
    fps: float | None = Field(default=None, gt=0)
    """Lower the frame rate by keeping frames at this rate (None: as the source)."""
    codec: str = "libx264"
    crf: int = Field(default=23, ge=0, le=51)
    preset: str = "veryfast"


@register
class EncodeClips(Mapper):
    name = "encode_clips"
    description = "Encode each clip as H.264 MP4 into `media`, optionally at a smaller size or lower fps."
    Params = EncodeParams

    def applies_to(self, sample) -> bool:
        return sample["kind"] == "video"

    def setup(self) -> None:
        if self.params.codec not in av.codecs_available:
            raise RuntimeError(f"encoder '{self.params.codec}' is not available in this FFmpeg build")

    def frame_requests(self):
        p = self.params
        if p.fps is None:
            return (FrameRequest("all", short_side=p.short_side),)
        return (FrameRequest("fps", fps=p.fps, short_side=p.short_side),)

    def process(self, sample, frames):
        arrays = frames[0].arrays
        fps = self.params.fps if self.params.fps is not None and self.params.fps < sample["fps"] else sample["fps"]
        p = self.params
        sample["media"] = encode_mp4(arrays, fps, p.codec, p.crf, p.preset)
        height, width = (d - d % 2 for d in arrays[0].shape[:2])
        sample.update(media_format="mp4", fps=fps, num_frames=len(arrays), height=height, width=width,
                      aspect_ratio=height / width, resolution=height * width)
        return sample
