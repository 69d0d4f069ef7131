"""Bad input: every source gets an outcome, a clear reason, and the run finishes."""

from __future__ import annotations

import subprocess
import sys

import av
import cv2
import numpy as np
import pytest

from bricks.engine.recipe import from_dict
from bricks.engine.run import run
from bricks.common.synthetic import ShotSpec, write_vfr_video, write_video

from conftest import CPU_PROCESS, read_manifest, read_rejects, read_shards, write_recipe


def reasons_by_source(rejects):
    out = {}
    for row in rejects.to_pylist():
        if row["kind"] == "source":
            out.setdefault(row["source_uri"], []).append((row["status"], row["op"], row["reason"]))
    return out


def test_bad_inputs_are_reported_and_the_run_goes_on(tmp_path, bad_inputs):
    out = tmp_path / "out"
    listing = tmp_path / "inputs.txt"
    uris = [str(p) for p in bad_inputs.values()] + [str(tmp_path / "missing.mp4")]
    listing.write_text("\n".join(uris) + "\n")
    manifest = run(from_dict({"input": str(listing), "output": str(out), "executor": {"mode": "local"},
                              "process": CPU_PROCESS}))
    reasons = reasons_by_source(read_rejects(out))
    expect = {
        "zero_byte": "empty file (0 bytes)",
        "not_video": "cannot open as a media file",
        "audio_only": "no video stream (streams: audio)",
        "truncated": "cannot open as a media file",
    }
    for name, text in expect.items():
        (status, op, reason), = reasons[str(bad_inputs[name])]
        assert status == "failed" and op == "read" and text in reason, (name, reason)
    (status, _, reason), = reasons[str(tmp_path / "missing.mp4")]
    assert status == "failed" and "file not found" in reason
    # Garbage in the middle of the stream: its packets are skipped and counted, the shots on
    # either side of it are kept (tests/test_media_robustness.py has the details).
    assert str(bad_inputs["corrupt"]) not in reasons
    corrupt_rows = [r for r in read_shards(out).to_pylist() if r["source_uri"] == str(bad_inputs["corrupt"])]
    assert max(r["start_frame"] for r in corrupt_rows) > _frames_before_first_error(bad_inputs["corrupt"])
    assert manifest["decode"]["skipped_packets_by_source"].get(str(bad_inputs["corrupt"]), 0) > 0
    good_rows = [r for r in read_shards(out).to_pylist() if r["source_uri"] == str(bad_inputs["good"])]
    assert good_rows
    sources = manifest["sources"]
    assert sources["total"] == len(uris) == sources["kept"] + sources["dropped"] + sources["failed"]
    assert sources["failed"] >= 5 and manifest["accounted"]


def _frames_before_first_error(path) -> int:
    """Where PyAV's `container.decode` alone would have stopped."""
    count = 0
    with av.open(str(path)) as container:
        try:
            for _ in container.decode(video=0):
                count += 1
        except av.FFmpegError:
            pass
    return count


def test_strict_exit_status(tmp_path, bad_inputs):
    recipe = write_recipe(tmp_path, [{"shot_split": {}}], input=[bad_inputs["good"], bad_inputs["zero_byte"]])
    cli = [sys.executable, "-m", "bricks.engine.cli", "run", str(recipe), "--local"]
    assert subprocess.run(cli, capture_output=True).returncode == 0
    proc = subprocess.run(cli + ["--strict", "--overwrite"], capture_output=True, text=True)
    assert proc.returncode == 1 and "1 failures" in proc.stderr


def test_limits_reject_huge_sources_before_decoding(tmp_path, bad_inputs):
    manifest = run(from_dict({"input": str(bad_inputs["good"]), "output": str(tmp_path / "out"),
                              "executor": {"mode": "local"}, "limits": {"max_pixels": 320 * 100},
                              "process": [{"shot_split": {}}]}))
    assert manifest["decode"]["frames"] == 0 and manifest["sources"]["dropped"] == 1
    (reason,) = read_rejects(tmp_path / "out").column("reason").to_pylist()
    assert "exceeds limits.max_pixels" in reason


def test_operator_failure_on_one_sample_is_recorded(tmp_path, bad_inputs):
    plugin = tmp_path / "explode.py"
    plugin.write_text(
        "from bricks.engine.operator import Mapper\nfrom bricks.engine.registry import register\n"
        "@register\nclass Explode(Mapper):\n    name = 'explode_on_second'\n    description = 'fails on one clip'\n"
        "    def process(self, sample, frames):\n"
        "        if sample['start_frame'] > 0:\n            raise ValueError('boom')\n        return sample\n")
    out = tmp_path / "out"
    run(from_dict({"input": str(bad_inputs["good"]), "output": str(out), "executor": {"mode": "local"},
                   "plugins": [str(plugin)], "process": [{"shot_split": {}}, {"explode_on_second": {}}]}))
    assert read_shards(out).column("start_frame").to_pylist() == [0]
    failed = read_rejects(out).to_pylist()
    assert failed and all(r["status"] == "failed" and r["reason"].startswith("ValueError: boom") for r in failed)


@pytest.mark.parametrize("rotate", [90, 270])
def test_rotated_video_is_served_upright(tmp_path, rotate):
    truth = write_video(tmp_path / "r.mp4", [ShotSpec(30), ShotSpec(30, seed=1)], rotate=rotate)
    out = tmp_path / "out"
    run(from_dict({"input": truth.path, "output": str(out), "executor": {"mode": "local"},
                   "process": [{"shot_split": {}}, {"middle_frame": {}}]}))
    rows = read_shards(out).to_pylist()
    assert [r["start_frame"] for r in rows if r["kind"] == "video"] == [0, 30]
    assert all((r["width"], r["height"]) == (180, 320) for r in rows)
    # OpenCV applies the display rotation when it reads; our image must match it.
    capture = cv2.VideoCapture(truth.path)
    reference = [capture.read()[1] for _ in range(60)]
    for image in (r for r in rows if r["kind"] == "image"):
        ours = cv2.imdecode(np.frombuffer(image["media"], np.uint8), cv2.IMREAD_COLOR)
        assert ours.shape == reference[image["start_frame"]].shape
        assert np.abs(ours.astype(int) - reference[image["start_frame"]]).mean() < 3


def test_variable_frame_rate_uses_presentation_times(tmp_path):
    truth = write_vfr_video(tmp_path / "vfr.mp4")
    out = tmp_path / "out"
    run(from_dict({"input": truth.path, "output": str(out), "executor": {"mode": "local"},
                   "process": [{"shot_split": {}}]}))
    rows = read_shards(out).to_pylist()
    assert [r["start_frame"] for r in rows] == [0] + truth.cuts
    times = truth.frame_times
    for row in rows:
        assert row["start_time"] == pytest.approx(times[row["start_frame"]] - times[0], abs=1e-3)
    assert rows[-1]["end_time"] > rows[-1]["start_time"]


def test_a_crashing_segmenter_fails_only_its_source(tmp_path, corpus):
    plugin = tmp_path / "crash.py"
    plugin.write_text(
        "from bricks.engine.operator import Segmenter, SegmentTracker\nfrom bricks.engine.registry import register\n"
        "class Tracker(SegmentTracker):\n    def push(self, index, frame):\n"
        "        if index == 5:\n            raise RuntimeError('detector broke')\n        return []\n"
        "    def finish(self, n):\n        return []\n"
        "@register\nclass Crash(Segmenter):\n    name = 'crashing_segmenter'\n    description = 'fails at frame 5'\n"
        "    def start(self, sample):\n        return Tracker()\n")
    out = tmp_path / "out"
    manifest = run(from_dict({"input": str(corpus[0]), "output": str(out), "executor": {"mode": "local"},
                              "plugins": [str(plugin)], "process": [{"crashing_segmenter": {}}]}))
    assert manifest["sources"]["failed"] == 3 and manifest["accounted"]
    reasons = read_rejects(out).column("reason").to_pylist()
    assert all(r.startswith("RuntimeError: detector broke") for r in reasons)


def _mjpeg_avi(path, frames: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=24)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuvj420p"
        for i in range(frames):
            rgb = np.full((64, 96, 3), (i * 7) % 256, np.uint8)
            rgb[:, : 10 + i] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_a_still_image_in_a_video_file_is_not_a_video(tmp_path):
    """FFmpeg opens a PNG renamed .mp4 as a one-frame stream: it is refused as an image, while a
    motion-JPEG video (an image codec, many frames) goes through."""
    picture = np.zeros((64, 96, 3), np.uint8)
    picture[:, 40:] = (200, 30, 30)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "png_renamed.mp4").write_bytes(cv2.imencode(".png", picture)[1].tobytes())
    (folder / "jpeg_renamed.mov").write_bytes(cv2.imencode(".jpg", picture)[1].tobytes())
    _mjpeg_avi(folder / "one_frame_mjpeg.avi", 1)
    _mjpeg_avi(folder / "mjpeg_video.avi", 48)
    out = tmp_path / "out"
    manifest = run(from_dict({"input": str(folder), "output": str(out), "executor": {"mode": "local"},
                              "process": [{"shot_split": {}}]}))
    reasons = reasons_by_source(read_rejects(out))
    for name, codec in [("png_renamed.mp4", "png"), ("jpeg_renamed.mov", "mjpeg"), ("one_frame_mjpeg.avi", "mjpeg")]:
        (status, op, reason), = reasons[str(folder / name)]
        assert (status, op) == ("failed", "read") and reason.startswith(f"a still image ({codec},"), (name, reason)
        assert reason.endswith("not a video: one frame of an image codec")
    kept = read_shards(out).to_pylist()
    assert {r["source_uri"] for r in kept} == {str(folder / "mjpeg_video.avi")}
    assert all(r["kind"] == "video" for r in kept) and sum(r["end_frame"] - r["start_frame"] for r in kept) == 48
    assert manifest["sources"]["failed"] == 3 and manifest["accounted"]
