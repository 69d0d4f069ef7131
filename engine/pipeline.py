"""Processing one source: probe, metadata operators, one decode pass, per-shot operators.

`process_source` is the unit of work that runners distribute. It never raises for bad input:
every outcome (kept sample, dropped or failed sample, unreadable source) becomes a row, so
that every input is accounted for.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bricks.common.video import (DecodeError, DecodeStats, SourceError, decode_ahead, display_rotation, display_size,
                                 probe, scaler)

from .frames import BufferedFrames, FrameBuffer, FrameSource, RangeFrames, segmenter_frame
from .live_frames import frame_counter
from .operator import FanOut, Filter, Frames, FrameRequest, Mapper, Sample
from .plan import Plan, Step
from .rows import DROPPED, FAILED, KEPT, reject_record, verdict
from .samples import Drop, Dropped, SourceContext, clip_of
from .segments import MapFn, NotSegmentable, detect_cuts_segmented, plan_segments
from .schema import BASE_COLUMNS, ColumnTypeError, fit_columns

log = logging.getLogger("bricks")


@dataclass
class OpStats:
    """Per operator: samples in, samples out, dropped, failed, seconds spent."""

    n_in: int = 0
    n_out: int = 0
    dropped: int = 0
    failed: int = 0
    seconds: float = 0.0

    def add(self, other: "OpStats") -> None:
        self.n_in += other.n_in
        self.n_out += other.n_out
        self.dropped += other.dropped
        self.failed += other.failed
        self.seconds += other.seconds

    def to_dict(self) -> dict[str, Any]:
        return {"in": self.n_in, "out": self.n_out, "dropped": self.dropped,
                "failed": self.failed, "seconds": round(self.seconds, 4)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OpStats":
        return cls(d["in"], d["out"], d["dropped"], d["failed"], d["seconds"])


@dataclass
class SourceResult:
    uri: str
    kept: list[Sample] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    ops: dict[str, OpStats] = field(default_factory=lambda: defaultdict(OpStats))
    frames_decoded: int = 0
    decode_seconds: float = 0.0
    buffer_peak_bytes: int = 0
    skipped_packets: int = 0  # refused by the decoder; their frames are lost
    segments: int = 1  # key-frame segments its cuts were detected in, in parallel

    def reject(self, sample: Sample | None, step: str, status: str, reason: str,
               scores: dict[str, Any] | None = None) -> None:
        self.rejects.append(reject_record(self.uri, sample, step, status, reason, scores))

    @property
    def status(self) -> str:
        """The source's own outcome: kept if any sample survived, else dropped or failed."""
        if self.kept:
            return KEPT
        if any(r["status"] == FAILED for r in self.rejects):
            return FAILED
        return DROPPED

    def stats(self) -> dict[str, Any]:
        return {
            "status": self.status, "ops": {k: v.to_dict() for k, v in self.ops.items()},
            "frames_decoded": self.frames_decoded, "decode_seconds": round(self.decode_seconds, 4),
            "buffer_peak_bytes": self.buffer_peak_bytes, "skipped_packets": self.skipped_packets,
            "segments": self.segments,
        }


class NoFrames:
    def serve(self, sample: Sample, req: FrameRequest) -> Frames:
        raise RuntimeError("an operator asked for frames where none are decoded")


def run_steps(samples: list[Sample], steps: list[Step], frames: FrameSource,
              ctx: SourceContext, result: SourceResult) -> list[Sample]:
    """Run samples through operators in order; rejects go to `result`, survivors are returned.

    Depth first: a sample goes through every operator before the next sample starts, so the
    frames of one clip are asked for together (which keeps re-decoding of long shots to one
    pass, see `RangeFrames`)."""
    if not steps:
        return samples
    survivors: list[Sample] = []
    for sample in samples:
        survivors.extend(run_steps(apply_step(steps[0], sample, frames, ctx, result), steps[1:], frames, ctx, result))
    return survivors


def apply_step(step: Step, sample: Sample, frames: FrameSource, ctx: SourceContext,
               result: SourceResult) -> list[Sample]:
    op, stats = step.op, result.ops[step.label]
    if not op.applies_to(sample):
        return [sample]
    stats.n_in += 1
    started = time.perf_counter()
    scores: dict[str, Any] = {}
    columns = {**BASE_COLUMNS, **op.outputs}  # what this operator may write
    try:
        served = [frames.serve(sample, req) for req in op.frame_requests()]
        if isinstance(op, Filter):
            scores = returned_dict(op.score(sample, served), f"{op.name}.score")
            scores = fit_columns(scores, columns, op.name)
            sample.update(scores)
            reason = verdict(op, scores)
            if reason is not None:
                raise Drop(reason)
            out = [sample]
        elif isinstance(op, FanOut):
            out, dropped_children, failed_children = [], 0, 0
            before = dict(sample)
            for child in op.split(sample, served):
                if isinstance(child, Dropped):
                    ctx.finalize(child.sample)
                    result.reject(child.sample, step.label, DROPPED, child.reason)
                    dropped_children += 1
                    continue
                child = ctx.finalize(returned_dict(child, f"{op.name}.split"))
                try:
                    child.update(fit_columns(changed_fields(before, child), columns, op.name))
                except ColumnTypeError as exc:  # that child fails, its siblings go on
                    result.reject(child, step.label, FAILED, str(exc))
                    failed_children += 1
                    continue
                out.append(child)
            stats.dropped += dropped_children
            stats.failed += failed_children
            if not out and not dropped_children and not failed_children:
                raise Drop(f"{op.name} produced no samples")
        elif isinstance(op, Mapper):
            before = dict(sample)  # the operator may change the sample in place
            returned = returned_dict(op.process(sample, served), f"{op.name}.process")
            returned.update(fit_columns(changed_fields(before, returned), columns, op.name))
            out = [returned]
        else:
            raise TypeError(f"{type(op).__name__} is not a Mapper, Filter or FanOut")
    except Drop as drop:
        result.reject(sample, step.label, DROPPED, str(drop), scores)
        stats.dropped += 1
        out = []
    except ColumnTypeError as exc:  # the engine's own check: no traceback location to add
        result.reject(sample, step.label, FAILED, str(exc), scores)
        stats.failed += 1
        out = []
    except Exception as exc:  # one bad sample must not stop the source
        result.reject(sample, step.label, FAILED, describe_error(exc), scores)
        stats.failed += 1
        out = []
    stats.seconds += time.perf_counter() - started
    stats.n_out += len(out)
    return out


def returned_dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ColumnTypeError(f"{where} returned a {type(value).__name__}, not a dict of fields")
    return value


def changed_fields(before: Sample, after: Sample) -> dict[str, Any]:
    """Fields an operator set or replaced (`_` fields are the engine's bookkeeping)."""
    return {k: v for k, v in after.items() if not k.startswith("_") and (k not in before or before[k] is not v)}


def attach_model_frames(sample: Sample, plan: Plan, frames: FrameSource, result: SourceResult) -> None:
    """Serve the model operators' frames now, while the decode pass still has them; they
    travel with the sample to the model stages."""
    attached = {}
    try:
        for step in plan.model_steps:
            if step.op.applies_to(sample):
                attached[step.label] = [frames.serve(sample, req) for req in step.op.frame_requests()]
    except Exception as exc:
        result.reject(sample, plan.model_steps[0].label, FAILED, f"frames for model operators: {describe_error(exc)}")
        sample["_status"] = FAILED
        return
    if attached:
        sample["_frames"] = attached


def process_source(plan: Plan, uri: str, segment_map: MapFn | None = None,
                   fields: dict[str, Any] | None = None) -> SourceResult:
    """`segment_map`, where given, runs a long source's cut detection in key-frame segments
    (see `segments`): threads in-process, Ray tasks on a cluster. `fields`: what a data-set
    file says of the source (a caption, scores), carried into all its samples."""
    result = SourceResult(uri)
    try:
        info = probe(uri)
    except SourceError as exc:
        result.reject(None, "read", FAILED, str(exc))
        return result
    except Exception as exc:
        result.reject(None, "read", FAILED, describe_error(exc))
        return result
    limits = plan.limits
    if info.width * info.height > limits.max_pixels:
        result.reject(None, "limits", DROPPED,
                      f"frame size {info.width}x{info.height} exceeds limits.max_pixels={limits.max_pixels}")
        return result
    if info.duration > limits.max_duration:
        result.reject(None, "limits", DROPPED,
                      f"duration {info.duration:.0f}s exceeds limits.max_duration={limits.max_duration:.0f}s")
        return result
    ctx = SourceContext(info, plan.recipe_key)
    sources = run_steps([ctx.source_sample(fields)], plan.pre, NoFrames(), ctx, result)
    if not sources:
        return result
    if plan.segmenter is None and not plan.post_needs_frames:
        result.kept = run_steps(sources, plan.post, NoFrames(), ctx, result)
        return result
    try:
        if not (segment_map and _segmented_pass(plan, sources[0], ctx, result, segment_map)):
            _decode_pass(plan, sources[0], ctx, result)
    except Exception as exc:  # e.g. a segmenter bug: the source fails, the run goes on
        result.reject(None, "decode", FAILED, describe_error(exc))
    return result


def _segmented_pass(plan: Plan, source: Sample, ctx: SourceContext, result: SourceResult,
                    segment_map: MapFn) -> bool:
    """A long source's cuts from key-frame segments scored in parallel, equal to the single
    pass's; then its shots through the per-shot operators, their frames decoded again by range.
    False where the source is short or cannot be segmented exactly: the single pass runs."""
    seconds, segmenter = plan.executor.segment_seconds, plan.segmenter
    if segmenter is None or seconds is None or ctx.info.duration < 2 * seconds:
        return False
    segment_frames = max(1, round(seconds * ctx.info.fps))
    try:
        layout = plan_segments(ctx.info.uri, segment_frames)
        if len(layout.segments) < 2:
            return False
        found = detect_cuts_segmented(ctx.info.uri, segmenter.op, segment_frames, segment_map,
                                      source=source, plan=layout)
    except NotSegmentable as exc:
        log.info("%s: cut in one decode pass (%s)", ctx.info.uri, exc)
        return False
    ctx.rotation, ctx.times = found.rotation, list(found.times)
    shots = _ShotRunner(plan, ctx.oriented(source), ctx, result)
    shots.pts_by_index = list(found.pts)
    stats = result.ops[segmenter.label]
    stats.n_in += 1
    try:
        for cut in [*found.cuts, found.num_frames]:
            stats.n_out += 1
            shots.close(cut)
    finally:
        shots.finish()
    stats.seconds += found.score_seconds + found.replay_seconds
    result.frames_decoded += found.frames_decoded
    result.decode_seconds += found.decode_seconds
    result.segments = found.segments
    return True


class _ShotRunner:
    """Runs the per-shot operators on the parts of the decoded video that are settled.

    Deciding what is settled happens on the decoding thread; running the operators on it
    happens on one worker thread, so that optical flow, encoding and the like overlap with
    decoding and shot detection (OpenCV and FFmpeg release the GIL). At most `MAX_PENDING`
    jobs wait, which bounds the frames held for them."""

    MAX_PENDING = 2

    def __init__(self, plan: Plan, source: Sample, ctx: SourceContext, result: SourceResult) -> None:
        self.plan, self.source, self.ctx, self.result = plan, source, ctx, result
        executor = plan.executor
        self.buffer = FrameBuffer(executor.frame_buffer_mb << 20, plan.keep_short_side) if plan.post_needs_frames else None
        self.pts_by_index: list[int | None] = []
        self.shot_start = 0
        # With a windowing fan-out first (clip_length), windows of the open shot that can no
        # longer change are processed before the shot ends; frames before this are done.
        self.settled = 0
        first = plan.post[0] if plan.post else None
        self.windowing = first if isinstance(getattr(first, "op", None), FanOut) and not first.op.needs_frames else None
        self.waited = 0.0  # the decoding thread's time blocked on the worker
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bricks-shots")
        self._pending: deque[Future] = deque()

    def shot(self, end: int) -> Sample:
        return self.ctx.finalize(clip_of(self.source, self.shot_start, end, within_parent=False))

    def _submit(self, samples: list[Sample], steps: list[Step], release_before: int) -> None:
        self._pending.append(self._worker.submit(self._run, samples, steps, release_before))
        while len(self._pending) > self.MAX_PENDING:
            self._wait_one()

    def _wait_one(self) -> None:
        started = time.perf_counter()
        try:
            self._pending.popleft().result()  # re-raises what went wrong in the worker
        finally:
            self.waited += time.perf_counter() - started

    def finish(self) -> None:
        try:
            while self._pending:
                self._wait_one()
        finally:
            self._worker.shutdown(wait=True, cancel_futures=True)

    def _run(self, samples: list[Sample], steps: list[Step], release_before: int) -> None:
        ctx, buffer = self.ctx, self.buffer
        fallback = RangeFrames(ctx.info.uri, self.pts_by_index, ctx.info.fps, ctx.rotation,
                               self.plan.executor.decode_threads, self.plan.frame_requests)
        frames = BufferedFrames(buffer.frames if buffer else {}, ctx.info.fps, ctx.rotation, fallback)
        try:
            kept = run_steps(samples, steps, frames, ctx, self.result)
            for sample in kept:
                attach_model_frames(sample, self.plan, frames, self.result)
            self.result.kept.extend(s for s in kept if s.get("_status") != FAILED)
        finally:
            fallback.close()
        self.result.frames_decoded += fallback.frames_decoded
        if buffer is not None:
            self.result.buffer_peak_bytes = max(self.result.buffer_peak_bytes, buffer.peak_bytes)
            buffer.release_before(release_before)

    def settle(self, known_end: int) -> None:
        """The open shot lasts at least until `known_end`: process the windows that settles."""
        if self.windowing is None or known_end <= max(self.settled, self.shot_start):
            return
        op = self.windowing.op
        partial = dict(self.source, start_frame=self.shot_start, end_frame=known_end)
        until = op.final_before(partial, known_end)
        if until > max(self.settled, self.shot_start):
            windows = [self.ctx.finalize(c) for c in op.split(self.shot(known_end), [])
                       if not isinstance(c, Dropped) and self.settled <= c["start_frame"] and c["end_frame"] <= until]
            self.result.ops[self.windowing.label].n_out += len(windows)
            self._submit(windows, self.plan.post[1:], until)
            self.settled = until

    def close(self, end: int, whole_source: bool = False) -> None:
        if end <= self.shot_start:
            return
        if whole_source:
            self._submit([self.ctx.decoded(self.source)], self.plan.post, end)
        elif self.settled > self.shot_start:
            # Part of this shot went ahead in windows: split it again, run only the rest.
            step = self.windowing
            stats = self.result.ops[step.label]
            children = apply_step(step, self.shot(end), NoFrames(), self.ctx, self.result)
            rest = [c for c in children if c["start_frame"] >= self.settled]
            stats.n_out -= len(children) - len(rest)
            self._submit(rest, self.plan.post[1:], end)
        else:
            self._submit([self.shot(end)], self.plan.post, end)
        if self.buffer is not None:
            self.buffer.start_shot()
        self.shot_start = end


def _decode_pass(plan: Plan, source: Sample, ctx: SourceContext, result: SourceResult) -> None:
    """One sequential decode; shots are processed as soon as the segmenter closes them."""
    runners: list[_ShotRunner] = []
    try:
        _decode_and_cut(plan, source, ctx, result, runners)
    finally:
        for shots in runners:  # wait for the shots still being processed, whatever happened
            shots.finish()


def _decode_and_cut(plan: Plan, source: Sample, ctx: SourceContext, result: SourceResult,
                    runners: list) -> None:
    segmenter = plan.segmenter
    tracker = segmenter.op.start(source) if segmenter else None
    seg_stats = result.ops[segmenter.label] if segmenter else None
    detect_size = (0, 0)
    detect_scaler = scaler()
    shots: _ShotRunner | None = None
    started = time.perf_counter()
    error: DecodeError | None = None
    count_frames = frame_counter(ctx.info.uri, ctx.info.num_frames)  # for the progress display
    decode_stats = DecodeStats()
    try:
        for decoded in decode_ahead(ctx.info.uri, plan.executor.decode_threads, stats=decode_stats):
            count_frames(decoded.index + 1)
            if decoded.index == 0:
                ctx.rotation = display_rotation(decoded.frame)
                shots = _ShotRunner(plan, ctx.oriented(source), ctx, result)
                runners.append(shots)
                if segmenter is not None:
                    upright = display_size(decoded.frame.width, decoded.frame.height, ctx.rotation)
                    detect_size = segmenter.op.frame_size(*upright)
            elif decoded.after_gap and tracker is not None:
                # Frames were lost to undecodable packets: the open shot ends at the gap and the
                # frames after it are segmented afresh, so no shot (nor a clip of one) spans it.
                for cut in [c for c in tracker.finish(decoded.index) if c < decoded.index] + [decoded.index]:
                    seg_stats.n_out += 1
                    shots.close(cut)
                tracker = segmenter.op.start(source)
            ctx.times.append(decoded.time)
            shots.pts_by_index.append(decoded.pts)
            if shots.buffer is not None:
                shots.buffer.add(decoded.index, decoded.frame, ctx.rotation)
            if tracker is not None:
                seg_started = time.perf_counter()
                small = segmenter_frame(detect_scaler, decoded.frame, ctx.rotation, detect_size)
                cuts = tracker.push(decoded.index, small)
                seg_stats.seconds += time.perf_counter() - seg_started
                for cut in cuts:
                    seg_stats.n_out += 1
                    shots.close(cut)
                if tracker.lag is not None:
                    shots.settle(decoded.index + 1 - tracker.lag)
    except DecodeError as exc:
        error = exc
    except SourceError as exc:
        result.reject(None, "decode", FAILED, str(exc))
        return
    result.skipped_packets += decode_stats.skipped_packets
    num_frames = len(ctx.times)
    result.frames_decoded += num_frames
    elapsed = time.perf_counter() - started
    result.decode_seconds += elapsed - (shots.waited if shots else 0.0) - (seg_stats.seconds if seg_stats else 0.0)
    if num_frames == 0:
        result.reject(None, "decode", FAILED, str(error) if error else "no frames could be decoded")
        return
    if error is not None:
        result.reject({"kind": "source", "start_frame": error.index}, "decode", FAILED,
                      f"{error}; the frames before it were processed")
    if tracker is None:
        shots.close(num_frames, whole_source=True)
        return
    seg_stats.n_in += 1
    for cut in tracker.finish(num_frames):
        seg_stats.n_out += 1
        shots.close(cut)
    seg_stats.n_out += 1
    shots.close(num_frames)


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" ({where.filename.rsplit('/', 1)[-1]}:{where.lineno})" if where else ""
    return f"{type(exc).__name__}: {text}{at}"
