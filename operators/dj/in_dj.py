"""Bricks' operators inside Data-Juicer: each joins DJ's OPERATORS registry as `bricks_<name>`.

Data-Juicer imports this module through its `data_juicer.ops` entry point (nothing in bricks
imports it, so bricks runs without Data-Juicer installed). A DJ recipe then names the operators
with their bricks parameters, validated by the operator's own `Params` when DJ builds it:

    process:
      - bricks_shot_split: {min_scene_len: 15}
      - bricks_motion_filter: {min_score: 0.5, any_or_all: any}

How each kind maps onto DJ's (every video of a DJ sample is one whole-file bricks sample:
frames 0..num_frames, its fps and displayed size, `text` the DJ text without special tokens):

- Filter -> DJ Filter. `compute_stats_single` decodes each video once, serving all the
  operator's frame requests from that pass, and stores `score()` in `__dj__stats__` under the
  bricks column names, one value per video; `process_single` applies `keep()` to every video and
  keeps the sample when any (or all, `any_or_all`) pass. Metadata filters decode nothing.
- Model operators (aesthetic_filter, vlm_caption) -> DJ Filter too: their fields go to the stats
  the same way (and a caption also becomes the sample's text), `keep()` decides. The model is
  loaded once per DJ worker process, on its first sample.
- Mapper (encode_clips) -> DJ Mapper: the encoded media is written as a file (under `save_dir`)
  and replaces the video's path; other fields it sets become sample fields, one value per video.
- Segmenter and FanOut (shot_split, clip_length, middle_frame) -> DJ Mapper, with DJ's
  video_split_by_scene_mapper's convention: one sample lists all the clips of its videos (clip
  files re-encoded from the decoded frames, so each holds exactly its shot's or window's frames;
  a video that stays one piece keeps its own path), each video token in the text becomes one per
  clip, and `__dj__source_file__` names each clip's source. Images (middle_frame) are written as
  JPEG files and appended to the sample's images. Clips a fan-out drops are left out.

Written files go where DJ's own video_split_by_scene_mapper puts them: `save_dir` when given,
else under DJ_PRODUCED_DATA_DIR, else `__dj__produced_data__/<op>/` beside the source.
"""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path
from typing import Any, ClassVar

from data_juicer.ops.base_op import OPERATORS
from data_juicer.ops.base_op import Filter as DJFilter
from data_juicer.ops.base_op import Mapper as DJMapper
from data_juicer.utils.constant import Fields
from data_juicer.utils.file_utils import add_suffix_to_filename, transfer_filename
from data_juicer.utils.mm_utils import SpecialTokens, remove_special_tokens
from loguru import logger
from pydantic import ValidationError

from bricks.common import video
from bricks.common.files import write_atomic
from bricks.common.settings import first_error
from bricks.engine import registry
from bricks.engine.extras import MissingExtraError, missing_extra
from bricks.engine.frames import BufferedFrames, FrameBuffer, RangeFrames, segmenter_frame
from bricks.engine.operator import (FanOut, Filter, FrameRequest, Mapper, ModelOperator, Operator, Sample,
                                    Segmenter)
from bricks.engine.model_stage import resolve_device
from bricks.engine.recipe import ExecutorConfig
from bricks.engine.samples import Dropped, SourceContext, clip_of

from .pyav_compat import patch_close_video

PREFIX = "bricks_"
RECIPE_KEY = "data-juicer"  # sample ids are not used on this side; any fixed key will do
ALL_FRAMES = FrameRequest("all")  # a clip file's frames: every one, as decoded


class BricksVideo:
    """One video file decoded once; its frames kept (scaled down to `keep_short_side`) to serve
    frame requests after the pass. Frames beyond the memory budget are given up, and requests
    needing them are served by decoding that range again (the engine's own fallback)."""

    def __init__(self, path: str, text: str | None, requests: tuple[FrameRequest, ...]) -> None:
        self.path, self.text, self.requests = path, text, requests
        self.info = video.probe(path)
        self.ctx = SourceContext(self.info, RECIPE_KEY)
        sizes = [r.short_side for r in requests]
        keep = None if not sizes or None in sizes else max(sizes)
        self.buffer = FrameBuffer(ExecutorConfig().frame_buffer_mb << 20, keep)
        self.pts: list[int | None] = []

    def metadata_sample(self) -> Sample:
        """The file as a bricks sample from its container alone (what metadata filters see)."""
        return dict(self.ctx.source_sample(), text=self.text)

    def decode(self):
        """Decode every frame once, keeping them for `serve`; yields each `DecodedFrame`."""
        for decoded in video.decode(self.path):
            if decoded.index == 0:
                self.ctx.rotation = video.display_rotation(decoded.frame)
            self.ctx.times.append(decoded.time)
            self.pts.append(decoded.pts)
            self.buffer.add(decoded.index, decoded.frame, self.ctx.rotation)
            yield decoded
        if not self.ctx.times:
            raise video.SourceError(f"{self.path}: no frames could be decoded")

    def decode_all(self) -> Sample:
        for _ in self.decode():
            pass
        return self.sample()

    def sample(self) -> Sample:
        """The whole decoded file as a bricks sample (its real frame count, displayed size)."""
        return dict(self.ctx.decoded(self.ctx.oriented(self.ctx.source_sample())), text=self.text)

    def frames(self) -> BufferedFrames:
        """Serves requests from the kept frames; call `close` when done with it."""
        self.close()
        self._fallback = RangeFrames(self.path, self.pts, self.info.fps, self.ctx.rotation, 0, self.requests)
        return BufferedFrames(self.buffer.frames, self.info.fps, self.ctx.rotation, self._fallback)

    def close(self) -> None:
        fallback, self._fallback = getattr(self, "_fallback", None), None
        if fallback is not None:
            fallback.close()


class BricksOp:
    """What every `bricks_<name>` operator shares: the bricks operator it runs and its params."""

    bricks_class: ClassVar[type[Operator]]
    own_params: ClassVar[dict[str, Any]] = {}  # DJ-side parameters of this kind, with defaults

    def _build_bricks_op(self, kwargs: dict[str, Any]) -> None:
        cls, name = self.bricks_class, PREFIX + self.bricks_class.name
        defaults = {k: f.default for k, f in cls.Params.model_fields.items()}
        # DJ hands every declared parameter over, defaults included; passing on only those set to
        # something else keeps the bricks validators' "was it set" checks meaningful.
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in defaults}
        chosen = {k: v for k, v in given.items() if v != defaults[k]}
        try:
            self.bricks_op = cls(cls.Params.model_validate(chosen))
        except ValidationError as exc:
            raise ValueError(f"{name}: {first_error(exc, cls.Params)}") from None
        for key, default in self.own_params.items():
            setattr(self, key, kwargs.pop(key, default))
        self._ready = False

    def _setup(self) -> None:
        # In the DJ worker process, before its first sample (models load here, not in the parent).
        if self._ready:
            return
        op = self.bricks_op
        if isinstance(op, ModelOperator):
            problem = missing_extra(op.required_modules())
            if problem:
                raise MissingExtraError(f"{self._name} {problem}")
            op.check()
            op.load(resolve_device(op))
        else:
            op.setup()
        self._ready = True

    def _videos(self, sample: dict) -> list[str]:
        return list(sample.get(self.video_key) or [])

    def _bricks_text(self, sample: dict) -> str | None:
        text = sample.get(self.text_key)
        return remove_special_tokens(text) if isinstance(text, str) else None

    def _open(self, path: str, sample: dict) -> BricksVideo:
        return BricksVideo(path, self._bricks_text(sample), self.bricks_op.frame_requests())


class FilterOp(BricksOp):
    """A bricks Filter or model operator as a DJ Filter (see the module's docstring)."""

    own_params = {"any_or_all": "any"}

    def _check_own(self) -> None:
        if self.any_or_all not in ("any", "all"):
            raise ValueError(f"{self._name}: any_or_all must be 'any' or 'all', got {self.any_or_all!r}")

    def compute_stats_single(self, sample, context=False):
        self._setup()
        per_video = [self._fields(path, sample) for path in self._videos(sample)]
        stats = sample[Fields.stats]
        for column in dict.fromkeys(k for fields in per_video if fields for k in fields):
            stats[column] = [fields.get(column) if fields else None for fields in per_video]
        # Which videos the operator scored (vlm_caption skips captioned ones, for instance), so
        # that `process_single` knows which of them its verdict is about.
        stats[self._name] = [fields is not None for fields in per_video]
        if isinstance(self.bricks_op, ModelOperator) and any(f and "text" in f for f in per_video):
            sample[self.text_key] = with_tokens([f.get("text") if f else None for f in per_video])
        return sample

    def _fields(self, path: str, sample: dict) -> dict[str, Any] | None:
        op, source = self.bricks_op, self._open(path, sample)
        bricks_sample = source.decode_all() if op.needs_frames else source.metadata_sample()
        if not op.applies_to(bricks_sample):
            return None
        frames = source.frames()
        try:
            served = [frames.serve(bricks_sample, req) for req in op.frame_requests()]
        finally:
            source.close()
        if isinstance(op, ModelOperator):
            (output,) = op.infer([op.preprocess(bricks_sample, served)])
            return op.apply(bricks_sample, output)
        return op.score(bricks_sample, served)

    def process_single(self, sample):
        stats = sample[Fields.stats]
        scored = stats.get(self._name) or []
        verdicts = []
        for i, applies in enumerate(scored):
            if applies:  # every list of this length holds one value per video; the op reads its own
                fields = {c: v[i] for c, v in stats.items() if isinstance(v, list) and len(v) == len(scored)}
                verdicts.append(self.bricks_op.keep(fields) is True)
        if not verdicts:
            return True
        return any(verdicts) if self.any_or_all == "any" else all(verdicts)


class WriterOp(BricksOp):
    """Operators that write media files: where those go."""

    own_params = {"save_dir": None}

    def _check_own(self) -> None:
        if self.save_dir:
            os.makedirs(self.save_dir, exist_ok=True)

    def _base(self, path: str) -> str:
        """Where files made from `path` go, as DJ names them (a hash of the parameters, the process
        and the time: one per video, so that its clips share it)."""
        params = self.bricks_op.params.model_dump(mode="json")
        return transfer_filename(path, self._name, self.save_dir, **params)

    @staticmethod
    def _target(base: str, suffix: str, ext: str) -> str:
        return os.path.splitext(add_suffix_to_filename(base, suffix))[0] + ext


class MapperOp(WriterOp):
    """A bricks Mapper as a DJ Mapper: encoded media replace the video, other fields are set."""

    def process_single(self, sample, context=False):
        self._setup()
        videos, values, texts = self._videos(sample), {}, []
        for i, path in enumerate(videos):
            source = self._open(path, sample)
            bricks_sample = source.decode_all()
            if not self.bricks_op.applies_to(bricks_sample):
                texts.append(None)
                continue
            before, frames = dict(bricks_sample), source.frames()
            try:
                served = [frames.serve(bricks_sample, r) for r in self.bricks_op.frame_requests()]
            finally:
                source.close()
            after = self.bricks_op.process(bricks_sample, served)
            changed = {k: v for k, v in after.items() if not k.startswith("_") and before.get(k) is not v}
            media = changed.pop("media", None)
            if media is not None:
                ext = "." + (changed.pop("media_format", None) or after.get("media_format") or "mp4")
                videos[i] = self._target(self._base(path), "", ext)
                write_atomic(Path(videos[i]), media)
            texts.append(changed.pop("text", None))
            for key, value in changed.items():
                values.setdefault(key, [None] * len(videos))[i] = value
        sample[self.video_key] = videos
        sample.update(values)
        if any(t is not None for t in texts):
            sample[self.text_key] = with_tokens(texts)
        return sample


class SplitterOp(WriterOp):
    """A bricks Segmenter or FanOut as a DJ Mapper writing its clips and images as files."""

    def process_single(self, sample, context=False):
        self._setup()
        videos = self._videos(sample)
        if not videos:
            sample[Fields.source_file] = []
            return sample
        clips, images = [], list(sample.get(self.image_key) or [])
        for path in videos:
            pieces, stills = self._split(path, sample)
            clips.append(pieces)
            images.extend(stills)
        counts = iter([len(c) for c in clips])
        if isinstance(sample.get(self.text_key), str):
            sample[self.text_key] = re.sub(re.escape(SpecialTokens.video),
                                           lambda m: SpecialTokens.video * next(counts, 1), sample[self.text_key])
        sample[Fields.source_file] = [src for src, c in zip(videos, clips) for _ in c]
        sample[self.video_key] = [clip for c in clips for clip in c]
        if images:
            sample[self.image_key] = images
        return sample

    def _split(self, path: str, sample: dict) -> tuple[list[str], list[str]]:
        """The clip files and image files that the operator makes of one video."""
        op = self.bricks_op
        requests = op.frame_requests() or (ALL_FRAMES,)  # no requests of its own: it cuts clips
        source = BricksVideo(path, self._bricks_text(sample), requests)
        if isinstance(op, Segmenter):
            return self._shots(source), []
        whole = source.decode_all()
        if not op.applies_to(whole):
            return [path], []
        frames = source.frames()
        try:
            return self._write_children(path, frames, whole, op.split(whole, [frames.serve(whole, r) for r in
                                                                            op.frame_requests()]))
        finally:
            source.close()

    def _write_children(self, path: str, frames: BufferedFrames, whole: Sample, children: list) -> tuple:
        clips, stills, base = [], [], self._base(path)
        for child in children:
            if isinstance(child, Dropped):
                logger.debug(f"{self._name}: {path} [{child.sample['start_frame']}, "
                             f"{child.sample['end_frame']}) dropped: {child.reason}")
            elif child["kind"] == "image":
                stills.append(self._write_image(base, child))
            elif (child["start_frame"], child["end_frame"]) == (whole["start_frame"], whole["end_frame"]):
                clips.append(path)  # the whole file: no copy
            else:
                clips.append(self._write_clip(base, frames, child, whole["fps"]))
        return clips, stills

    def _shots(self, source: BricksVideo) -> list[str]:
        """Cut detection in the one decode pass; each shot is written as soon as it closes."""
        op, scaler = self.bricks_op, video.scaler()
        tracker, size, shot_start, written = None, (0, 0), 0, []
        base = self._base(source.path)

        def close(end: int) -> None:
            nonlocal shot_start
            if end > shot_start:
                shot = dict(source.sample(), start_frame=shot_start, end_frame=end)
                try:
                    written.append(self._write_clip(base, source.frames(), shot, source.info.fps))
                finally:
                    source.close()
                source.buffer.release_before(end)
                source.buffer.start_shot()
                shot_start = end

        for decoded in source.decode():
            if tracker is None:
                tracker = op.start(source.metadata_sample())
                size = op.frame_size(*video.display_size(decoded.frame.width, decoded.frame.height,
                                                         source.ctx.rotation))
            for cut in tracker.push(decoded.index, segmenter_frame(scaler, decoded.frame, source.ctx.rotation, size)):
                close(cut)
        num_frames = len(source.ctx.times)
        for cut in tracker.finish(num_frames):
            close(cut)
        if not written:
            return [source.path]  # one shot: the file itself, as video_split_by_scene_mapper keeps it
        close(num_frames)
        return written

    def _write_clip(self, base: str, frames: BufferedFrames, clip: Sample, fps: float) -> str:
        clip = clip_of(clip, clip["start_frame"], clip["end_frame"], within_parent=False)
        arrays = frames.serve(clip, ALL_FRAMES).arrays
        target = self._target(base, f"_{clip['start_frame']:06d}_{clip['end_frame']:06d}", ".mp4")
        write_atomic(Path(target), video.encode_mp4(arrays, fps))
        return target

    def _write_image(self, base: str, image: Sample) -> str:
        target = self._target(base, f"_{image['start_frame']:06d}", "." + (image.get("media_format") or "jpeg"))
        write_atomic(Path(target), image["media"])
        return target


def with_tokens(texts: list[str | None]) -> str:
    """Per-video texts as one DJ text: each video's chunk led by its video token."""
    return " ".join(f"{SpecialTokens.video} {t or ''} {SpecialTokens.eoc}".replace("  ", " ") for t in texts)


def _kind(cls: type[Operator]) -> tuple[type[BricksOp], type]:
    if issubclass(cls, (Filter, ModelOperator)):
        return FilterOp, DJFilter
    if issubclass(cls, (Segmenter, FanOut)):
        return SplitterOp, DJMapper
    if issubclass(cls, Mapper):
        return MapperOp, DJMapper
    raise TypeError(f"{cls.__qualname__}: not a bricks Filter, Mapper, FanOut, Segmenter or model operator")


def _signature(cls: type[Operator], own: dict[str, Any]) -> inspect.Signature:
    """The parameters DJ's config parser shows and accepts: the bricks Params' fields (left
    untyped: their own validation runs when the operator is built) and this kind's own."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    fields = {k: f.default for k, f in cls.Params.model_fields.items()}
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(k, keyword, default=v) for k, v in {**fields, **own}.items()]
    params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(params)


def dj_operator(cls: type[Operator]) -> type:
    """A Data-Juicer operator class running the bricks operator `cls`."""
    mixin, base = _kind(cls)

    class BricksDJOperator(mixin, base):
        bricks_class = cls

        def __init__(self, *args, **kwargs):
            self._build_bricks_op(kwargs)
            super().__init__(*args, **kwargs)
            self._check_own()

    name = PREFIX + cls.name
    BricksDJOperator.__init__.__signature__ = _signature(cls, mixin.own_params)
    BricksDJOperator.__name__ = BricksDJOperator.__qualname__ = _class_name(name)
    BricksDJOperator.__doc__ = f"bricks' `{cls.name}` operator: {cls.description}"
    BricksDJOperator.__module__ = __name__
    return BricksDJOperator


def _class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def register_all() -> list[str]:
    """Register every bricks operator in DJ's registry; returns the names registered. DJ's own
    base parameters (batch_size, num_cpus...) keep their DJ meaning where a bricks operator has a
    parameter of the same name: that one goes to the bricks operator."""
    names = []
    for cls in registry.all_operators().values():
        if "." in cls.name:  # Data-Juicer's own operators wrapped for bricks recipes: not again
            continue
        op_class = dj_operator(cls)
        globals()[op_class.__name__] = op_class  # importable by name, so DJ's workers can unpickle it
        OPERATORS.register_module(PREFIX + cls.name, op_class, force=True)
        names.append(PREFIX + cls.name)
    return names


REGISTERED = register_all()
# Data-Juicer's own video operators in the same run read through PyAV too, the version bricks
# installs: make their closing of files work with it (see `pyav_compat`).
patch_close_video()
