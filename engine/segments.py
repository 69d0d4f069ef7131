"""Cut detection on one long source in parallel: key-frame segments scored apart, decided once.

One long source must not run on one core. Its video stream is split at key frames into
segments that decode independently; each segment scores its frames (a segmenter's per-frame
score depends only on the frame and the one before it), and the segmenter's decision logic, which
is sequential but cheap, then runs once over the stitched scores. The cuts equal those of the
single decode pass by construction:

1. `plan_segments` demuxes the stream without decoding: every frame's pts, in presentation
   order, and the key frames. Frame k of the source is the k-th pts, as the single pass counts
   frames. Segments start at key frames, each at least `segment_frames` long.
2. `score_segment` decodes one segment from its key frame up to and including the next
   segment's first frame, so that frame is scored against its predecessor (one frame of
   overlap). Frames presented before the key frame (an open GOP's leading frames) belong to the
   previous segment and are dropped there.
3. `detect_cuts_segmented` checks that the segments tile the plan (each decoded exactly the pts
   the demuxer listed for it, and each key frame decoded alike from both sides of its boundary),
   then hands the scores to the segmenter's `replay`.

Where that cannot be exact (packets without pts, undecodable packets, a decode that misses
frames of the plan or disagrees at a boundary) it raises `NotSegmentable` with the reason,
and the caller runs the ordinary single pass. The caller also chooses the parallelism:
`map_fn(fn, items)` is a thread pool locally (`thread_map`; FFmpeg and OpenCV release the GIL),
remote tasks on a cluster.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

import av
import numpy as np

from bricks.common.video import (DecodeError, DecodeStats, SourceError, decode, display_rotation, display_size,
                                 open_container, probe, scaler, video_stream)

from .operator import Sample
from .frames import segmenter_frame

MapFn = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]
"""`map_fn(fn, items)`: `fn` applied to every item, results in the items' order."""


class NotSegmentable(Exception):
    """Segmented detection cannot be exact for this source; the message says why. The caller
    runs the single decode pass instead."""


class ScoredSegmenter(Protocol):
    """What a segmenter offers for segmented detection (`ShotSplit` does)."""

    name: str

    def frame_size(self, width: int, height: int) -> tuple[int, int]: ...

    def frame_scorer(self) -> Callable[[np.ndarray], float]:
        """A fresh scorer: called with frames in order, it returns each frame's score, which
        depends only on that frame and the one before it."""

    def replay(self, sample: Sample, scores: Sequence[float]) -> list[int]:
        """The cuts of the single pass over a source whose frame k scores `scores[k]`."""


@dataclass(frozen=True)
class Segment:
    index: int
    first: int  # source index of its first frame
    end: int  # source index after its last frame: the next segment's first
    start_pts: int | None  # its key frame; None for the first segment, decoded from the start as the single pass
    end_pts: int | None  # the next segment's key frame, decoded as overlap; None for the last
    start_seconds: float

    @property
    def num_frames(self) -> int:
        return self.end - self.first


@dataclass(frozen=True)
class SegmentPlan:
    uri: str
    pts: tuple[int, ...] = field(repr=False)  # every frame's pts in presentation order
    segments: tuple[Segment, ...]
    time_base: Fraction

    @property
    def num_frames(self) -> int:
        return len(self.pts)


def plan_segments(uri: str, segment_frames: int) -> SegmentPlan:
    """Segments of at least `segment_frames` frames (the last included), each starting at a key
    frame, from the stream's packets alone (the file is read once, nothing is decoded). A short
    source or one with few key frames gets a single segment. Raises `NotSegmentable` when the
    packets do not give the frames' presentation order, `SourceError` when the source does not
    open."""
    if segment_frames < 1:
        raise ValueError(f"segment_frames must be >= 1, got {segment_frames}")
    presented: list[int] = []
    keys: list[int] = []
    with open_container(uri) as container:
        stream = video_stream(container)
        time_base = Fraction(stream.time_base)
        number = 0
        try:
            for number, packet in enumerate(container.demux(stream)):
                if packet.size == 0:  # the demuxer's closing empty packet
                    continue
                if packet.pts is None:
                    raise NotSegmentable(f"packet {number} has no pts: the frames' presentation order is unknown")
                if packet.is_discard:  # an edit list hides its frame; the decoder drops it
                    continue
                presented.append(packet.pts)
                if packet.is_keyframe:
                    keys.append(packet.pts)
        except av.FFmpegError as exc:
            raise NotSegmentable(f"demuxing stopped at packet {number}: {exc}") from exc
    presented.sort()
    for before, after in zip(presented, presented[1:]):
        if before == after:
            raise NotSegmentable(f"two packets share pts {after}: the frames' presentation order is ambiguous")
    starts = [0]
    for key in sorted(keys):
        rank = bisect.bisect_left(presented, key)
        if rank - starts[-1] >= segment_frames and len(presented) - rank >= segment_frames:
            starts.append(rank)
    bounds = starts + [len(presented)]
    segments = tuple(
        Segment(k, first, end, None if k == 0 else presented[first],
                presented[end] if end < len(presented) else None,
                float(presented[first] * time_base) if presented else 0.0)
        for k, (first, end) in enumerate(zip(bounds, bounds[1:])))
    return SegmentPlan(uri, tuple(presented), segments, time_base)


@dataclass(frozen=True)
class SegmentTask:
    """One segment's work; plain data, so that it can travel to a remote worker."""

    uri: str
    segment: Segment
    op: ScoredSegmenter
    threads: int = 1  # FFmpeg decoding threads for this segment


@dataclass
class SegmentScores:
    """What one segment decoded: its frames' pts, times and scores, and the overlap frame."""

    index: int
    pts: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # the first is against no frame: replaced at stitching
    first_digest: bytes | None = None  # of its first frame as the segmenter sees it
    overlap_score: float | None = None  # the next segment's first frame, scored against this one's last
    overlap_digest: bytes | None = None
    rotation: int = 0
    size: tuple[int, int] | None = None
    frames_decoded: int = 0  # decoder output, overlap and dropped leading frames included
    decode_seconds: float = 0.0  # decoding and making segmenter frames
    score_seconds: float = 0.0
    problem: str | None = None  # why this segment cannot be used (returned, not raised, to cross any map_fn)


def _digest(frame: np.ndarray) -> bytes:
    return hashlib.blake2b(frame.tobytes(), digest_size=16).digest()


def score_segment(task: SegmentTask) -> SegmentScores:
    """Decode one segment and score its frames, plus the first frame of the next segment."""
    segment, op = task.segment, task.op
    out = SegmentScores(segment.index)
    stats = DecodeStats()
    scorer = op.frame_scorer()
    reformatter = scaler()
    started = time.perf_counter()
    try:
        with contextlib.closing(decode(task.uri, task.threads, seek_pts=segment.start_pts, stats=stats)) as frames:
            for decoded in frames:
                pts = decoded.pts
                if pts is None:
                    out.problem = "a decoded frame has no pts"
                    break
                if segment.start_pts is not None and pts < segment.start_pts:
                    continue  # presented before the key frame: the previous segment's
                if out.size is None:
                    out.rotation = display_rotation(decoded.frame)
                    out.size = op.frame_size(*display_size(decoded.frame.width, decoded.frame.height, out.rotation))
                if out.pts and pts <= out.pts[-1]:
                    out.problem = f"frames out of presentation order (pts {pts} after {out.pts[-1]})"
                    break
                small = segmenter_frame(reformatter, decoded.frame, out.rotation, out.size)
                scored = time.perf_counter()
                score = scorer(small)
                out.score_seconds += time.perf_counter() - scored
                if segment.end_pts is not None and pts >= segment.end_pts:
                    if pts != segment.end_pts:
                        out.problem = f"the next segment's key frame (pts {segment.end_pts}) did not decode"
                    out.overlap_score, out.overlap_digest = score, _digest(small)
                    break
                if not out.pts:
                    out.first_digest = _digest(small)
                out.pts.append(pts)
                out.times.append(decoded.time)
                out.scores.append(score)
            else:
                if segment.end_pts is not None:
                    out.problem = f"the decode ended before the next segment's key frame (pts {segment.end_pts})"
    except (DecodeError, SourceError) as exc:
        out.problem = str(exc)
    if stats.skipped_packets and out.problem is None:
        out.problem = f"{stats.skipped_packets} packets did not decode"
    out.frames_decoded = stats.frames
    out.decode_seconds = time.perf_counter() - started - out.score_seconds
    return out


@dataclass
class Stitched:
    scores: list[float]
    times: list[float]
    pts: list[int]
    rotation: int


def stitch(plan: SegmentPlan, results: Iterable[SegmentScores]) -> Stitched:
    """The source's per-frame scores from its segments' results; `NotSegmentable` where the
    segments do not tile the plan exactly."""
    done = sorted(results, key=lambda r: r.index)
    if [r.index for r in done] != [s.index for s in plan.segments]:
        raise RuntimeError(f"map_fn returned results for segments {[r.index for r in done]} "
                           f"of {len(plan.segments)}")
    first = done[0]
    scores: list[float] = []
    times: list[float] = []
    pts: list[int] = []
    for segment, result in zip(plan.segments, done):
        where = f"segment {segment.index + 1} of {len(plan.segments)} (from {segment.start_seconds:.3f}s)"
        if result.problem is not None:
            raise NotSegmentable(f"{where}: {result.problem}")
        expected = plan.pts[segment.first:segment.end]
        if tuple(result.pts) != expected:
            raise NotSegmentable(f"{where}: decoded {len(result.pts)} frames, not the {len(expected)} "
                                 "the demuxer lists for it")
        if (result.rotation, result.size) != (first.rotation, first.size):
            raise NotSegmentable(f"{where}: frames turned {result.rotation} at {result.size}, not as the first "
                                 f"segment's ({first.rotation} at {first.size})")
        if segment.index == 0:
            scores += result.scores
        else:
            before = done[segment.index - 1]
            if result.first_digest != before.overlap_digest:
                raise NotSegmentable(f"{where}: its key frame decodes differently from where the previous "
                                     "segment reaches it (not a clean random-access point)")
            scores.append(before.overlap_score)
            scores += result.scores[1:]
        times += result.times
        pts += result.pts
    return Stitched(scores, times, pts, first.rotation)


@dataclass
class SegmentedCuts:
    """Cuts of one source as its single pass finds them, with its frames' timing."""

    cuts: list[int]  # frame indices where shots 2..n start, ascending
    num_frames: int
    times: list[float] = field(repr=False)  # presentation time of each frame, seconds
    pts: list[int] = field(repr=False)  # each frame's pts in the stream's time base
    rotation: int  # display rotation of the frames, as the single pass reads it from its first
    segments: int
    frames_decoded: int  # by all segments, overlap frames and dropped leading frames included
    decode_seconds: float  # summed over segments
    score_seconds: float  # summed over segments
    replay_seconds: float
    wall_seconds: float


def detect_cuts_segmented(uri: str, op: ScoredSegmenter, segment_frames: int, map_fn: MapFn, *,
                          source: Sample | None = None, threads: int = 1,
                          plan: SegmentPlan | None = None) -> SegmentedCuts:
    """The cuts `op` finds in `uri`, its segments scored through `map_fn`.

    `source` is the sample the single pass hands to `op.start` (by default one with the probed
    frame rate); `threads` are FFmpeg's per segment; `plan` reuses a `plan_segments` result.
    Raises `NotSegmentable` (with the reason) where the result could differ from the single
    pass's, and `SourceError` where the source does not open."""
    started = time.perf_counter()
    if not (callable(getattr(op, "frame_scorer", None)) and callable(getattr(op, "replay", None))):
        raise NotSegmentable(f"{op.name} has no per-frame scores to replay")
    plan = plan or plan_segments(uri, segment_frames)
    if plan.num_frames == 0:
        raise NotSegmentable("the stream lists no frames")
    source = source if source is not None else {"fps": probe(uri).fps}
    tasks = [SegmentTask(uri, segment, op, threads) for segment in plan.segments]
    results = list(map_fn(score_segment, tasks))
    stitched = stitch(plan, results)
    replayed = time.perf_counter()
    cuts = op.replay(source, stitched.scores)
    done = time.perf_counter()
    return SegmentedCuts(
        cuts, len(stitched.scores), stitched.times, stitched.pts, stitched.rotation, len(plan.segments),
        sum(r.frames_decoded for r in results), sum(r.decode_seconds for r in results),
        sum(r.score_seconds for r in results), done - replayed, done - started)


def thread_map(workers: int) -> MapFn:
    """A `map_fn` running up to `workers` items at once in threads of this process."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    def map_fn(fn, items):
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bricks-segment") as pool:
            return list(pool.map(fn, items))

    return map_fn
