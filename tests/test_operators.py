"""Each built-in operator, run through the engine on generated videos with known cuts."""

from __future__ import annotations

import io

import av
import cv2
import numpy as np
import pytest
import scenedetect

from bricks.engine.recipe import from_dict
from bricks.engine.run import run

from conftest import read_manifest, read_rejects, read_shards, short_video


def run_process(tmp_path, input, process, **executor):
    out = tmp_path / "out"
    manifest = run(from_dict({"input": str(input), "output": str(out),
                              "executor": {"mode": "local", **executor}, "process": process}))
    return read_shards(out), read_rejects(out), manifest


def shots_by_source(table):
    shots = {}
    for row in table.to_pylist():
        if row["kind"] == "video":
            shots.setdefault(row["source_uri"], []).append((row["start_frame"], row["end_frame"]))
    return {uri: sorted(s) for uri, s in shots.items()}


@pytest.mark.parametrize("detector", ["content", "adaptive"])
def test_shot_split_equals_pyscenedetect_detect(tmp_path, corpus, detector):
    folder, truths = corpus
    shards, _, _ = run_process(tmp_path, folder, [{"shot_split": {"detector": detector}}])
    ours = shots_by_source(shards)
    make = scenedetect.ContentDetector if detector == "content" else scenedetect.AdaptiveDetector
    for truth in truths:
        theirs = [s[0].frame_num for s in scenedetect.detect(truth.path, make())]
        assert [start for start, _ in ours[truth.path]][1:] == theirs[1:], truth.path
        # Shots tile the whole video.
        assert ours[truth.path][0][0] == 0 and ours[truth.path][-1][1] == truth.num_frames


def test_shot_split_finds_the_cuts_that_were_made(tmp_path, corpus):
    folder, truths = corpus
    shards, _, _ = run_process(tmp_path, folder, [{"shot_split": {}}])
    ours = shots_by_source(shards)
    for truth in truths:
        # A shot shorter than min_scene_len (15) merges into its neighbour, as in PySceneDetect.
        expected = [c for prev, c in zip([0] + truth.cuts, truth.cuts + [truth.num_frames])
                    if c - prev >= 15 and c < truth.num_frames]
        found = [start for start, _ in ours[truth.path]][1:]
        assert found == [c for c in truth.cuts if c in expected or c in found]
        assert set(expected) <= set(found)


def test_clip_length_splits_long_shots_and_drops_short_ones(tmp_path, corpus):
    folder, truths = corpus
    shards, rejects, manifest = run_process(
        tmp_path, folder, [{"shot_split": {}}, {"clip_length": {"min_frames": 15, "max_frames": 200}}])
    lengths = [r["end_frame"] - r["start_frame"] for r in shards.to_pylist()]
    assert min(lengths) >= 15 and max(lengths) <= 200
    # The 260-frame shot of video 0 becomes a 200-frame window and a 60-frame rest.
    long_start = truths[0].cuts[0]
    clips0 = shots_by_source(shards)[truths[0].path]
    assert (long_start, long_start + 200) in clips0 and (long_start + 200, long_start + 260) in clips0
    dropped = [r for r in rejects.to_pylist() if r["op"] == "1:clip_length"]
    assert dropped and all("too short" in r["reason"] for r in dropped)
    op = manifest["ops"][1]
    assert op["in"] == manifest["ops"][0]["out"]


def test_clip_length_windows_and_a_short_last_window(tmp_path):
    video = short_video(tmp_path / "v.mp4", shots=((130, False), (40, False)))
    shards, rejects, _ = run_process(tmp_path, video.path, [
        {"shot_split": {}}, {"clip_length": {"min_frames": 20, "max_frames": 60}}])
    assert sorted(shots_by_source(shards)[video.path]) == [(0, 60), (60, 120), (130, 170)]
    (reject,) = rejects.to_pylist()
    assert (reject["start_frame"], reject["end_frame"]) == (120, 130) and "last window too short" in reject["reason"]


def test_clip_length_trims_both_ends(tmp_path):
    video = short_video(tmp_path / "v.mp4", shots=((40, False), (40, False)))
    shards, _, _ = run_process(tmp_path, video.path, [{"shot_split": {}}, {"clip_length": {"trim_frames": 3}}])
    assert sorted(shots_by_source(shards)[video.path]) == [(3, 37), (43, 77)]


def test_motion_filter_drops_static_shots_and_records_flow(tmp_path, corpus):
    folder, truths = corpus
    shards, rejects, _ = run_process(tmp_path, folder, [{"shot_split": {}}, {"motion_filter": {}}])
    static = {(t.path, s, e) for t in truths for s, e in t.static_shots}
    assert static, "the corpus should contain static shots"
    kept = {(r["source_uri"], r["start_frame"], r["end_frame"]) for r in shards.to_pylist()}
    assert not kept & static
    assert all(r["flow"] >= 0.25 for r in shards.to_pylist())
    motion_rejects = [r for r in rejects.to_pylist() if r["op"] == "1:motion_filter"]
    assert {(r["source_uri"], r["start_frame"], r["end_frame"]) for r in motion_rejects} == static
    assert all('"flow"' in r["scores"] for r in motion_rejects)


def test_middle_frame_adds_an_image_per_clip(tmp_path):
    video = short_video(tmp_path / "v.mp4", shots=((31, False), (40, False)))
    shards, _, _ = run_process(tmp_path, video.path, [{"shot_split": {}}, {"middle_frame": {}}])
    rows = shards.to_pylist()
    images = [r for r in rows if r["kind"] == "image"]
    assert [r["start_frame"] for r in images] == [15, 31 + 20]
    with av.open(video.path) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    for image in images:
        assert image["media_format"] == "jpeg" and image["num_frames"] == 1
        jpeg = cv2.imdecode(np.frombuffer(image["media"], np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        assert jpeg.shape == (180, 320, 3)
        assert np.abs(jpeg.astype(int) - decoded[image["start_frame"]]).mean() < 3  # JPEG noise only
    videos = [r for r in rows if r["kind"] == "video"]
    assert len(videos) == 2 and all(r["media"] is None for r in videos)  # reference mode


def test_metadata_filters_need_no_decoding(tmp_path, corpus):
    folder, _ = corpus
    shards, rejects, manifest = run_process(tmp_path, folder, [
        {"resolution_filter": {"min_width": 640}}, {"shot_split": {}}])
    assert shards is None
    assert manifest["decode"]["frames"] == 0
    assert all("width 320 < 640" in r for r in rejects.column("reason").to_pylist())


def test_duration_and_fps_filters(tmp_path):
    video = short_video(tmp_path / "v.mp4", shots=((24, False), (72, False)), fps=24)
    shards, rejects, _ = run_process(tmp_path, video.path, [
        {"fps_filter": {"min_fps": 20, "max_fps": 30}}, {"shot_split": {}},
        {"duration_filter": {"min_duration": 2.0}}])
    assert [(r["start_frame"], r["end_frame"]) for r in shards.to_pylist()] == [(24, 96)]
    assert rejects.column("reason").to_pylist() == ["duration (s) 1 < 2"]
    shards, rejects, _ = run_process(tmp_path / "b", video.path, [{"fps_filter": {"min_fps": 25}}])
    assert shards is None and rejects.column("reason").to_pylist() == ["fps 24 < 25"]


def test_encode_clips_stores_decodable_mp4(tmp_path):
    video = short_video(tmp_path / "v.mp4", shots=((30, False), (36, False)))
    shards, _, _ = run_process(tmp_path, video.path, [
        {"shot_split": {}}, {"encode_clips": {"short_side": 90, "fps": 12}}])
    for row in shards.to_pylist():
        assert row["media_format"] == "mp4" and (row["width"], row["height"]) == (160, 90)
        with av.open(io.BytesIO(row["media"])) as c:
            stream = c.streams.video[0]
            frames = list(c.decode(stream))
            assert float(stream.average_rate) == pytest.approx(12)
        assert len(frames) == row["num_frames"] == (row["end_frame"] - row["start_frame"]) // 2
        assert (frames[0].width, frames[0].height) == (160, 90)


def test_outputs_are_deterministic_and_ids_stable(tmp_path, corpus):
    folder, _ = corpus
    process = [{"shot_split": {}}, {"clip_length": {}}, {"motion_filter": {}}, {"middle_frame": {}}]
    a, _, _ = run_process(tmp_path / "a", folder, process)
    b, _, _ = run_process(tmp_path / "b", folder, process)
    assert a.equals(b)
    assert len(set(a.column("sample_id").to_pylist())) == a.num_rows
    c, _, _ = run_process(tmp_path / "c", folder, process[:3] + [{"middle_frame": {"jpeg_quality": 80}}])
    assert set(c.column("sample_id").to_pylist()).isdisjoint(a.column("sample_id").to_pylist())


@pytest.mark.parametrize("detector", ["content", "adaptive"])
def test_fast_content_score_is_pyscenedetects_to_the_bit(corpus, detector):
    from scenedetect.common import FrameTimecode

    from bricks.operators.shot_split import FastAdaptiveDetector, FastContentDetector

    ours, theirs = ((FastContentDetector(), scenedetect.ContentDetector()) if detector == "content"
                    else (FastAdaptiveDetector(), scenedetect.AdaptiveDetector()))
    with av.open(corpus[1][0].path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            bgr = frame.to_ndarray(format="bgr24")
            cuts = (ours.process_frame(FrameTimecode(i, 24.0), bgr), theirs.process_frame(FrameTimecode(i, 24.0), bgr))
            assert ours._frame_score == theirs._frame_score, i
            assert cuts[0] == cuts[1]
