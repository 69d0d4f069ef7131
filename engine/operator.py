"""What an operator is: its kinds, its parameters, its resources and the frames it asks for.

An operator is a small class with a `name`, a one-line `description`, a pydantic `Params`
model (validated before any work starts) and one processing method. Three kinds:

- `Mapper.process(sample, frames) -> sample` changes or adds fields.
- `Filter.score(sample, frames) -> {field: value}` records scores; `Filter.keep(scores)` says
  whether the sample stays. Scores are recorded on kept and dropped samples alike.
- `FanOut.split(sample, frames) -> [samples]` turns one sample into many (a video into clips,
  a clip into a clip plus an image).

Operators never open or decode a video themselves: they declare `FrameRequest`s and the
engine serves every request of a recipe from one sequential decode pass per source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

Sample = dict[str, Any]
"""One row of the output: the shard schema's columns (see `bricks.engine.schema`)."""


class OperatorParams(BaseModel):
    """Base of every operator's parameters: unknown or ill-typed fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_ordered(params: OperatorParams, *pairs: tuple[str, str]) -> OperatorParams:
    """For a params validator: each lower bound at most its upper bound (an upper bound of None
    is open), so that a range that can keep nothing is refused when the recipe is read."""
    for low, high in pairs:
        lo, hi = getattr(params, low), getattr(params, high)
        if hi is not None and lo > hi:
            raise ValueError(f"{low} ({_number(lo)}) > {high} ({_number(hi)})")
    return params


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Resources:
    """What one instance of the operator needs; fractions are allowed. The runner reserves the
    largest of the per-source operators' for each source's task, and a model operator's for
    each actor of its pool (model operators derive theirs from their parameters)."""

    cpus: float = 1.0
    gpus: float = 0.0


@dataclass(frozen=True)
class FrameRequest:
    """Decoded frames an operator needs for each sample it sees.

    Positions are relative to the sample's [start_frame, end_frame) range:
    - `fractions`: one frame at each fraction of the clip (0.5 is the middle frame);
    - `fps`: frames every 1/fps seconds from the clip start (at least `min_count`);
    - `all`: every frame.
    `short_side` scales (never up) keeping the aspect ratio; None keeps the decoded size.
    """

    positions: Literal["fractions", "fps", "all"]
    fractions: tuple[float, ...] = ()
    fps: float | None = None
    min_count: int = 1
    short_side: int | None = None
    pixel_format: Literal["rgb24", "bgr24", "gray"] = "rgb24"

    def __post_init__(self) -> None:
        if self.positions == "fractions" and not self.fractions:
            raise ValueError("FrameRequest(positions='fractions') needs fractions")
        if any(not 0.0 <= f <= 1.0 for f in self.fractions):
            raise ValueError(f"FrameRequest fractions must lie in [0, 1], got {self.fractions}")
        if self.positions == "fps" and not (self.fps and self.fps > 0):
            raise ValueError("FrameRequest(positions='fps') needs fps > 0")


@dataclass
class Frames:
    """Frames served for one request: source frame indices and HxWxC (or HxW) uint8 arrays."""

    indices: list[int]
    arrays: list[np.ndarray] = field(repr=False)


class Operator:
    """Base of all operators. Subclass one of `Mapper`, `Filter`, `FanOut` (or `Segmenter`)."""

    name: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type[OperatorParams]] = OperatorParams
    resources: ClassVar[Resources] = Resources()
    # Columns this operator adds to the shard schema (scores, captions...), with Arrow types.
    outputs: ClassVar[dict[str, pa.DataType]] = {}
    # A filter's parameters that only `keep` reads (min_score...): `bricks-dj refilter` may
    # change them and decide again from the stored scores. Any other parameter may change
    # the scores themselves, which needs the frames or the model again.
    thresholds: ClassVar[tuple[str, ...]] = ()
    # Whether `bricks-dj refilter` may run the operator again on a sample's stored fields where
    # it asks for no frames and is no model operator: score the sample again, or map one the new
    # thresholds bring back. Operators that open media or models themselves (Data-Juicer's)
    # say False: refilter decides from their stored scores, and never runs them.
    reruns_on_fields: ClassVar[bool] = True

    def __init__(self, params: OperatorParams | None = None) -> None:
        # Cheap: runs where the pipeline is built. Load models in `setup`.
        self.params = params if params is not None else self.Params()

    def setup(self) -> None:
        """Runs once in the worker before the first sample (model loading goes here)."""

    def required_modules(self) -> tuple[str, ...]:
        """Modules of an optional extra that the operator imports (a model operator in `load`,
        others in `setup`; see `bricks.engine.extras`), checked when a recipe is validated or
        run, before any video is decoded."""
        return ()

    def frame_requests(self) -> tuple[FrameRequest, ...]:
        """Frames this operator needs per sample, served in this order to its method."""
        return ()

    def applies_to(self, sample: Sample) -> bool:
        """Samples this operator handles; others pass through untouched."""
        return True

    @property
    def needs_frames(self) -> bool:
        return bool(self.frame_requests())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"


class Mapper(Operator):
    def process(self, sample: Sample, frames: list[Frames]) -> Sample:
        raise NotImplementedError


class Filter(Operator):
    def score(self, sample: Sample, frames: list[Frames]) -> dict[str, Any]:
        raise NotImplementedError

    def keep(self, scores: dict[str, Any]) -> bool | str:
        """True to keep; False or a reason string to drop."""
        raise NotImplementedError

    def keep_stored(self, scores: dict[str, Any]) -> bool | str:
        """`keep` on the scores an output stored, for `bricks-dj refilter`: the same, unless
        `keep` needs more than the stored scores (Data-Juicer's filters)."""
        return self.keep(scores)


class FanOut(Operator):
    # `split` returns the sample itself first, then samples within its frame range that carry
    # its fields (`middle_frame`): `bricks-dj refilter` may then change filters before it.
    keeps_parent: ClassVar[bool] = False

    def split(self, sample: Sample, frames: list[Frames]) -> list[Sample]:
        raise NotImplementedError

    def final_before(self, sample: Sample, known_end: int) -> int:
        """For a shot still being decoded, known to last at least until `known_end`: the frame
        before which `split`'s outputs can no longer change, whatever the shot's real end.
        The engine then processes those outputs early and releases their frames, which bounds
        memory on long shots. The default promises nothing."""
        return sample["start_frame"]


class Segmenter(Operator):
    """A fan-out driven by every frame of a source video, fed while it is decoded.

    `start(sample)` returns a `SegmentTracker`; the engine pushes each decoded frame to it in
    order and closes shots as soon as the tracker reports cuts, so frames of finished shots are
    released while the rest of the video is still being decoded. Where frames were lost to
    undecodable packets, the engine finishes the tracker at the gap, cuts there, and starts a
    new tracker for the frames after it.
    """

    def frame_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) frames are scaled to before they are pushed."""
        return width, height

    def start(self, sample: Sample) -> "SegmentTracker":
        raise NotImplementedError


class SegmentTracker:
    lag: int | None = 0
    """How many frames behind the newest pushed frame a cut may still be reported (None:
    unbounded). Lets the engine know how much of the open shot is settled."""

    def push(self, index: int, frame: np.ndarray) -> list[int]:
        """Feed frame `index` (BGR uint8); return cut indices confirmed so far (ascending)."""
        raise NotImplementedError

    def finish(self, num_frames: int) -> list[int]:
        """No more frames; return any remaining cuts."""
        raise NotImplementedError


class ModelParams(OperatorParams):
    """Parameters every model operator has: where it runs and how it is batched."""

    device: Literal["auto", "cuda", "cpu"] = "auto"
    """`auto` needs a GPU; `cpu` runs on CPU (slow, with a warning). Ignored by operators whose
    model runs elsewhere (`vlm_caption` on an endpoint)."""
    num_gpus: float = Field(default=1.0, ge=0)
    """GPUs per actor (fractions share a GPU between actors)."""
    batch_size: int = Field(default=16, ge=1)
    pool_size: int = Field(default=1, ge=1)
    """Actors in the pool: each loads the model once."""
    num_cpus: float = Field(default=0.25, ge=0)
    """CPUs reserved per actor. Small: an actor mostly waits on its GPU, and on a small machine
    whole CPUs held by idle actors would leave none for decoding."""


class ModelOperator(Operator):
    """An operator with a model, run after the per-source operators in a pool of actors.

    Its frames are served in the decode pass and travel with the sample; `preprocess` turns
    them into model inputs in a CPU stage of its own (so the GPU never waits on it); `load`
    runs once per actor; `infer` runs a batch; `apply` turns one output into fields of the
    sample, and `keep` (for filters) decides. A failing batch is retried sample by sample,
    so one bad sample is dropped with its reason and the rest go on.
    """

    Params = ModelParams
    model: Any = None

    @property
    def resources(self) -> Resources:  # per actor
        p = self.params
        local_gpu = self.loads_model_here and p.device != "cpu"
        return Resources(cpus=p.num_cpus, gpus=p.num_gpus if local_gpu else 0.0)

    @property
    def loads_model_here(self) -> bool:
        """False when the model runs elsewhere (a remote endpoint): `device` then means nothing,
        no GPU is asked for, and `check` is where the model's availability is proven."""
        return True

    def model_files(self) -> list:
        """`bricks.common.weights.ModelFile`s this operator loads (none for tiny presets)."""
        return []

    @property
    def tiny_preset(self) -> bool:
        """True when the operator runs a random-init test model (it then says so when loaded)."""
        return getattr(self.params, "preset", None) == "tiny"

    def check(self) -> None:
        """Runs before any video is decoded (e.g. that an endpoint answers)."""

    def load(self, device: str) -> None:
        raise NotImplementedError

    def preprocess(self, sample: Sample, frames: list[Frames]) -> Any:
        raise NotImplementedError

    def infer(self, inputs: list[Any]) -> list[Any]:
        raise NotImplementedError

    def apply(self, sample: Sample, output: Any) -> dict[str, Any]:
        raise NotImplementedError

    def keep(self, fields: dict[str, Any]) -> bool | str:
        return True


class FatalModelError(RuntimeError):
    """Raised by a model operator when no sample can succeed (an endpoint is down): the run
    stops with this message instead of failing every sample."""
