"""Tests for the synthetic brick-film generator: its ground truth must hold for real decoders."""

from __future__ import annotations

import json
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import scenedetect

from bricks.common.synthetic import (
    ShotSpec,
    VideoTruth,
    generate_corpus,
    main,
    render_shot_frames,
    write_vfr_video,
    write_video,
)


def _decode_rgb(path: str) -> list[np.ndarray]:
    with av.open(path) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def _detected_cuts(path: str) -> list[int]:
    scenes = scenedetect.detect(path, scenedetect.ContentDetector())
    return [start.frame_num for start, _ in scenes[1:]]


def _flow(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Farneback magnitude between two RGB frames, at a 128-px short side."""

    def grey(rgb: np.ndarray) -> np.ndarray:
        g = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        h, w = g.shape
        scale = 128 / min(h, w)
        return cv2.resize(g, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)

    flow = cv2.calcOpticalFlowFarneback(grey(a), grey(b), None, 0.5, 3, 15, 3, 5, 1.2, 0)
    return float(np.linalg.norm(flow, axis=2).mean())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[VideoTruth]]:
    out = tmp_path_factory.mktemp("corpus")
    return out, generate_corpus(out, num_videos=2, seed=0)


def test_detect_finds_exactly_the_true_cuts(corpus: tuple[Path, list[VideoTruth]]) -> None:
    _, truths = corpus
    for truth in truths:
        assert _detected_cuts(truth.path) == truth.cuts, truth.path


def test_corpus_shape_and_truth_json(corpus: tuple[Path, list[VideoTruth]]) -> None:
    out, truths = corpus
    assert sorted(p.name for p in out.iterdir()) == [
        "brickfilm-000.mp4",
        "brickfilm-001.mp4",
        "truth.json",
    ]
    assert [VideoTruth.from_dict(d) for d in json.loads((out / "truth.json").read_text())] == truths
    lengths = [e - s for t in truths for s, e in t.shot_ranges()]
    assert max(lengths) > 200 and min(lengths) < 15
    assert any(t.static_shots for t in truths)
    for truth in truths:
        assert 3 <= len(truth.cuts) + 1 <= 5
        assert len(_decode_rgb(truth.path)) == truth.num_frames


def test_corpus_is_deterministic(tmp_path: Path) -> None:
    a = generate_corpus(tmp_path / "a", num_videos=1, seed=7)
    b = generate_corpus(tmp_path / "b", num_videos=1, seed=7)
    assert [t.cuts for t in a] == [t.cuts for t in b]
    assert [t.static_shots for t in a] == [t.static_shots for t in b]


def test_render_is_deterministic_and_on_twos() -> None:
    spec = ShotSpec(8, seed=3)
    frames = list(render_shot_frames(spec, 320, 180, 1))
    again = list(render_shot_frames(spec, 320, 180, 1))
    assert all(np.array_equal(x, y) for x, y in zip(frames, again))
    assert frames[0].shape == (180, 320, 3) and frames[0].dtype == np.uint8
    for i in range(0, 8, 2):
        assert np.array_equal(frames[i], frames[i + 1])
    assert not np.array_equal(frames[1], frames[2])


def test_static_shot_is_still_after_decoding(tmp_path: Path) -> None:
    truth = write_video(
        tmp_path / "static.mp4", [ShotSpec(24, seed=1), ShotSpec(30, static=True, seed=2)]
    )
    (start, end), = truth.static_shots
    frames = _decode_rgb(truth.path)
    for i in range(start + 1, end):
        diff = np.abs(frames[i].astype(np.int16) - frames[start].astype(np.int16)).mean()
        assert diff < 1.0, i
    assert _flow(frames[start], frames[end - 1]) < 0.05
    # The moving shot, sampled 12 frames apart (2 fps at 24 fps), clearly moves.
    assert _flow(frames[0], frames[12]) > 0.5


def test_vfr_video_has_variable_frame_durations(tmp_path: Path) -> None:
    truth = write_vfr_video(tmp_path / "vfr.mp4")
    with av.open(truth.path) as container:
        times = [float(f.time) for f in container.decode(video=0)]
    assert len(times) == truth.num_frames
    durations = np.round(np.diff(times), 4)
    assert set(durations) == {round(1 / 24, 4), round(1 / 12, 4)}
    assert truth.frame_times is not None and np.allclose(times, truth.frame_times)
    assert truth.fps == pytest.approx(16.0)


@pytest.mark.parametrize("rotate", [90, 180, 270])
def test_rotation_metadata_reads_back(tmp_path: Path, rotate: int) -> None:
    truth = write_video(tmp_path / "rot.mp4", [ShotSpec(4)], rotate=rotate)
    with av.open(truth.path) as container:
        rotations = {f.rotation % 360 for f in container.decode(video=0)}
    assert rotations == {rotate} and truth.rotation == rotate


def test_gop_and_atomic_write(tmp_path: Path) -> None:
    truth = write_video(tmp_path / "gop.mp4", [ShotSpec(40, seed=5)], gop=10)
    with av.open(truth.path) as container:
        keyframes = [i for i, f in enumerate(container.decode(video=0)) if f.key_frame]
    assert keyframes[:4] == [0, 10, 20, 30]
    assert [p.name for p in tmp_path.iterdir()] == ["gop.mp4"]


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_video(tmp_path / "x.mp4", [ShotSpec(4)], rotate=45)
    with pytest.raises(ValueError):
        write_video(tmp_path / "x.mp4", [ShotSpec(4)], width=321)
    assert not any(tmp_path.iterdir())


def test_cli_writes_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "--num-videos", "1", "--width", "160", "--height", "90"]) == 0
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert len(truth) == 1 and truth[0]["width"] == 160
    assert "brickfilm-000.mp4" in capsys.readouterr().out
