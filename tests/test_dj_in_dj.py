"""Bricks' operators inside Data-Juicer (`bricks_<name>`): registered by DJ's plug-in loader,
run by DJ's own executor on generated videos with known cuts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("data_juicer")

from data_juicer.ops import OPERATORS  # noqa: E402  (loads the bricks plug-in)
from data_juicer.ops.base_op import Filter as DJFilter, Mapper as DJMapper  # noqa: E402
from data_juicer.utils.constant import Fields  # noqa: E402

from bricks.common import video  # noqa: E402
from bricks.engine import registry  # noqa: E402
from bricks.engine.operator import Filter, FrameRequest  # noqa: E402
from bricks.operators.dj import in_dj  # noqa: E402

from conftest import short_video  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "<__dj__video>"


def frame_count(path: str) -> int:
    return sum(1 for _ in video.decode(path))


def dj_sample(*paths, text=f"{TOKEN} a brick film <|__dj__eoc|>") -> dict:
    return {"videos": [str(p) for p in paths], "text": text, Fields.stats: {}}


@pytest.fixture
def decodes(monkeypatch) -> list:
    """Every call of bricks' decode entry, by path."""
    calls, real = [], video.decode

    def counting(uri, *args, **kwargs):
        calls.append(uri)
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(video, "decode", counting)
    return calls


def test_every_bricks_operator_is_in_djs_registry_with_its_kind():
    # bricks' own operators (other tests register plug-ins after Data-Juicer was imported)
    bricks_ops = {name for name, cls in registry.all_operators().items()
                  if cls.__module__.startswith("bricks.operators.")}
    assert {"shot_split", "motion_filter", "vlm_caption"} <= bricks_ops
    assert {f"bricks_{name}" for name in bricks_ops} <= set(OPERATORS.modules)
    assert issubclass(OPERATORS.modules["bricks_motion_filter"], DJFilter)
    assert issubclass(OPERATORS.modules["bricks_aesthetic_filter"], DJFilter)
    for name in ("shot_split", "clip_length", "middle_frame", "encode_clips"):
        assert issubclass(OPERATORS.modules[f"bricks_{name}"], DJMapper)


def test_a_bad_parameter_is_one_error_naming_the_operator():
    with pytest.raises(ValueError, match=r"^bricks_motion_filter: 'min_score': Input should be greater"):
        OPERATORS.modules["bricks_motion_filter"](min_score=-1)
    with pytest.raises(ValueError, match=r"^bricks_shot_split: unknown parameter|^bricks_shot_split: 'detector'"):
        OPERATORS.modules["bricks_shot_split"](detector="histogram")
    with pytest.raises(ValueError, match="any_or_all must be 'any' or 'all'"):
        OPERATORS.modules["bricks_fps_filter"](any_or_all="most")


def test_the_recipe_runs_in_dj_process_and_gives_each_shot_as_a_clip(tmp_path, corpus):
    """recipes/dj_brickfilm.yaml as shipped, only its paths moved, on one video of four shots."""
    truth = corpus[1][1]  # four moving shots, the last one 10 frames long
    data = tmp_path / "videos.jsonl"
    data.write_text(json.dumps({"videos": [truth.path], "text": f"{TOKEN} a brick film <|__dj__eoc|>"}) + "\n")
    recipe = yaml.safe_load((ROOT / "recipes" / "dj_brickfilm.yaml").read_text())
    recipe.update(dataset_path=str(data), export_path=str(tmp_path / "out" / "result.jsonl"), np=1)
    for step in recipe["process"]:
        if "bricks_shot_split" in step:
            step["bricks_shot_split"]["save_dir"] = str(tmp_path / "clips")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = dict(os.environ, DJ_PRODUCED_DATA_DIR=str(tmp_path / "produced"))
    proc = subprocess.run([str(Path(sys.executable).with_name("dj-process")), "--config", str(tmp_path / "recipe.yaml")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in (tmp_path / "out" / "result.jsonl").read_text().splitlines()]
    clips = row["videos"]
    assert [frame_count(c) for c in clips] == [b - a for a, b in truth.shot_ranges()]
    assert all(Path(c).parent == tmp_path / "clips" for c in clips)
    assert row["text"].count(TOKEN) == len(clips) and row[Fields.source_file] == [truth.path] * len(clips)
    (stats,) = [json.loads(line)[Fields.stats] for line in (tmp_path / "out" / "result_stats.jsonl").read_text().splitlines()]
    assert len(stats["flow"]) == len(clips) and min(stats["flow"]) > 0.25
    # Data-Juicer's own, on bricks' clips (its PyAV reader works with bricks' PyAV once the plug-in loaded)
    assert len(stats["video_motion_score"]) == len(clips)
    assert stats["video_duration"] == pytest.approx([(b - a) / truth.fps for a, b in truth.shot_ranges()], abs=0.05)
    assert stats["end_time"][0] == pytest.approx(truth.cuts[0] / truth.fps, abs=1e-3)


def test_filters_decode_each_video_once_and_keep_by_any_or_all(tmp_path, decodes):
    moving = short_video(tmp_path / "moving.mp4", shots=((40, False),))
    still = short_video(tmp_path / "still.mp4", shots=((40, True),))
    sample = dj_sample(moving.path, still.path, text=f"{TOKEN}{TOKEN} two")
    for any_or_all, kept in (("any", True), ("all", False)):
        op = OPERATORS.modules["bricks_motion_filter"](min_score=0.25, any_or_all=any_or_all)
        decodes.clear()
        scored = op.compute_stats(dict(sample, **{Fields.stats: {}}))
        assert decodes == [moving.path, still.path]
        flow = scored[Fields.stats]["flow"]
        assert flow[0] > 0.25 > flow[1]
        assert bool(op.process(scored)) is kept
    # Metadata filters read the container only.
    decodes.clear()
    op = OPERATORS.modules["bricks_fps_filter"](min_fps=30)
    scored = op.compute_stats(dict(sample, **{Fields.stats: {}}))
    assert decodes == [] and scored[Fields.stats]["fps"] == [moving.fps, still.fps]
    assert not op.process(scored)


class TwoRequests(Filter):
    """A filter asking for two kinds of frames: both come from the one decode."""

    name = "test_two_requests"
    description = "Counts the frames it is served."

    def frame_requests(self):
        return (FrameRequest("fractions", fractions=(0.0, 0.5, 1.0)),
                FrameRequest("fps", fps=4.0, short_side=32, pixel_format="gray"))

    def score(self, sample, frames):
        assert sample["text"] == "two"  # DJ's text without its special tokens
        return {"width": len(frames[0].arrays), "height": len(frames[1].arrays)}

    def keep(self, scores):
        return True


def test_all_of_an_operators_frame_requests_come_from_one_decode(tmp_path, decodes):
    clip = short_video(tmp_path / "clip.mp4", shots=((48, False),), fps=24)
    op = in_dj.dj_operator(TwoRequests)()
    stats = op.compute_stats(dj_sample(clip.path, text=f"{TOKEN} two"))[Fields.stats]
    assert decodes == [clip.path]
    assert stats["width"] == [3] and stats["height"] == [8]


def test_fan_outs_write_their_clips_and_images_as_files(tmp_path, decodes):
    source = short_video(tmp_path / "long.mp4", shots=((130, False),))
    op = OPERATORS.modules["bricks_clip_length"](min_frames=15, max_frames=60, save_dir=str(tmp_path / "out"))
    out = op.process(dj_sample(source.path))
    assert decodes == [source.path]
    assert [frame_count(c) for c in out["videos"]] == [60, 60]  # the last 10 frames are too short
    assert out["text"].count(TOKEN) == 2
    decodes.clear()
    op = OPERATORS.modules["bricks_middle_frame"](short_side=32, save_dir=str(tmp_path / "out"))
    out = op.process(dj_sample(source.path))
    assert decodes == [source.path] and out["videos"] == [source.path]  # the clip itself stays
    (image,) = out["images"]
    assert image.endswith(".jpeg") and Path(image).stat().st_size > 0


def test_a_video_of_one_shot_keeps_its_file(tmp_path):
    source = short_video(tmp_path / "one.mp4", shots=((40, False),))
    op = OPERATORS.modules["bricks_shot_split"](save_dir=str(tmp_path / "clips"))
    out = op.process(dj_sample(source.path))
    assert out["videos"] == [source.path] and not any((tmp_path / "clips").iterdir())


def test_model_filters_run_their_tiny_preset(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    source = short_video(tmp_path / "clip.mp4", shots=((30, False),))
    op = OPERATORS.modules["bricks_aesthetic_filter"](preset="tiny", device="cpu", min_score=0.0)
    scored = op.compute_stats(dj_sample(source.path))
    (aes,) = scored[Fields.stats]["aes"]
    assert isinstance(aes, float) and op.process(scored) == (aes >= 0.0)
