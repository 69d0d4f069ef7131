"""`shot_split`: cut a source video into shots with PySceneDetect's detectors.

The detectors are PySceneDetect's own; the engine feeds them the frames of its single decode
pass made exactly as `detect()` makes them (BGR at full size, upright, shrunk by `cv2.resize` to
about 256 px on the long side: see `bricks.engine.pipeline.segmenter_frame`), so every frame's
score, and with it the cut list, equals what `detect()` computes.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from scenedetect import AdaptiveDetector, ContentDetector, ThresholdDetector
from scenedetect.common import FrameTimecode
from scenedetect.scene_manager import compute_downscale_factor

from bricks.engine.operator import OperatorParams, SegmentTracker, Segmenter
from bricks.engine.registry import register


class ShotSplitParams(OperatorParams):
    detector: Literal["content", "adaptive", "threshold"] = "content"
    threshold: float | None = None
    """Cut threshold; None keeps the detector's default (content 27, adaptive 3.0 as the
    ratio to neighbouring frames, threshold 12 on mean brightness)."""
    min_scene_len: int = 15
    """Frames a shot must last before another cut is allowed (PySceneDetect's default)."""
    min_content_val: float = 15.0
    """Adaptive detector only: minimum content score for a cut."""


@register
class ShotSplit(Segmenter):
    name = "shot_split"
    description = "Split a video into shots with PySceneDetect (content, adaptive or threshold detector)."
    Params = ShotSplitParams

    def frame_size(self, width: int, height: int) -> tuple[int, int]:
        # SceneManager.detect_scenes: a factor from the longest side of the upright frame, and
        # sizes rounded as its cv2.resize call rounds them.
        factor = compute_downscale_factor(max(width, height))
        if factor <= 1.0:
            return width, height
        return max(1, round(width / factor)), max(1, round(height / factor))

    def make_detector(self):
        p = self.params
        if p.detector == "content":
            kwargs = {} if p.threshold is None else {"threshold": p.threshold}
            return FastContentDetector(min_scene_len=p.min_scene_len, **kwargs)
        if p.detector == "adaptive":
            kwargs = {} if p.threshold is None else {"adaptive_threshold": p.threshold}
            return FastAdaptiveDetector(min_scene_len=p.min_scene_len, min_content_val=p.min_content_val, **kwargs)
        kwargs = {} if p.threshold is None else {"threshold": p.threshold}
        return ThresholdDetector(min_scene_len=p.min_scene_len, **kwargs)

    def start(self, sample) -> SegmentTracker:
        detector = self.make_detector()
        # Content and adaptive cuts come at most the flash filter's span behind; the threshold
        # detector places cuts mid-fade, any distance back.
        lag = None if self.params.detector == "threshold" else max(
            detector.event_buffer_length, self.params.min_scene_len) + 1
        return _DetectorTracker(detector, sample["fps"], lag)


class _ExactFastScore:
    """PySceneDetect's content score, the weighted mean over hue, saturation, value (and edges
    when weighted) of the mean absolute difference to the previous frame, summed by OpenCV
    from uint8 differences instead of through int32 copies: the same integers in the same
    order, so the same float (tested), at a fraction of the per-frame cost. With a
    `stats_manager` it records the same per-frame metrics as PySceneDetect's detector (edges
    included, as there)."""

    _previous: list[np.ndarray] | None = None

    def _calculate_frame_score(self, timecode, frame_img: np.ndarray) -> float:
        channels = list(cv2.split(cv2.cvtColor(frame_img, cv2.COLOR_BGR2HSV)))
        weights = self._weights
        if weights.delta_edges > 0.0 or self.stats_manager is not None:
            channels.append(self._detect_edges(channels[2]))
        previous, self._previous = self._previous, channels
        if previous is None:
            return 0.0
        pixels = float(frame_img.shape[0] * frame_img.shape[1])
        deltas = [cv2.sumElems(cv2.absdiff(now, before))[0] / pixels for now, before in zip(channels, previous)]
        deltas += [0.0] * (4 - len(deltas))  # no edge term unless it is weighted or recorded
        score = sum(d * w for d, w in zip(deltas, weights)) / sum(abs(w) for w in weights)
        if self.stats_manager is not None:
            components = ContentDetector.Components(*deltas)._asdict()
            self.stats_manager.set_metrics(timecode, {self.FRAME_SCORE_KEY: score, **components})
        return score


class FastContentDetector(_ExactFastScore, ContentDetector):
    pass


class FastAdaptiveDetector(_ExactFastScore, AdaptiveDetector):
    pass


class _DetectorTracker(SegmentTracker):
    def __init__(self, detector, fps: float, lag: int | None) -> None:
        self.detector = detector
        self.fps = fps
        self.lag = lag
        self.last_cut = 0

    def _accept(self, timecodes) -> list[int]:
        cuts = []
        for frame in sorted(tc.frame_num for tc in timecodes):
            if frame > self.last_cut:  # PySceneDetect de-duplicates and sorts its cut list too
                cuts.append(frame)
                self.last_cut = frame
        return cuts

    def push(self, index: int, frame: np.ndarray) -> list[int]:
        return self._accept(self.detector.process_frame(FrameTimecode(index, self.fps), frame))

    def finish(self, num_frames: int) -> list[int]:
        cuts = self._accept(self.detector.post_process(FrameTimecode(num_frames - 1, self.fps)))
        return [c for c in cuts if c < num_frames]
