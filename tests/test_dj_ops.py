"""Data-Juicer's operators in bricks recipes (`dj.<op>`): its CPU video and caption filters
on generated clips with known lengths, sizes and motion, a text mapper, its errors on one
sample, parameter errors when the recipe is read, and a run on Ray."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("data_juicer")

from bricks.engine import registry
from bricks.engine.recipe import RecipeError, from_dict
from bricks.engine.run import run

from conftest import read_rejects, read_shards, short_video

FPS = 24
AV = {"video_backend": "av"}  # the ffmpeg program is not installed with bricks (PyAV bundles the libraries)

CAPTIONS = {  # (source, start_frame) -> caption, set by the plug-in below
    ("a.mp4", 0): "A yellow brick figure waves at the camera from a tall red tower!",
    ("a.mp4", 30): "Waves.",
    ("a.mp4", 90): "@@ ## $$ %% ^^ && a",
    ("b.mp4", 0): "A red brick car drives past two houses.",
    ("b.mp4", 40): "A red brick car drives past two houses.",
}

CAPTION_PLUGIN = f"""
from pathlib import Path

from bricks.engine.operator import Mapper
from bricks.engine.registry import register

CAPTIONS = {CAPTIONS!r}


@register
class TestCaptions(Mapper):
    name = "test_captions"
    description = "Captions from a table, by source and first frame."

    def process(self, sample, frames):
        sample["text"] = CAPTIONS[(Path(sample["source_uri"]).name, sample["start_frame"])]
        return sample
"""


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """a.mp4: 320x180, shots of 30 (moving), 60 (static) and 48 (moving) frames at 24 fps;
    b.mp4: 180x180, two moving shots of 40 frames; c.mp4: 320x240, two moving shots of 30."""
    folder = tmp_path_factory.mktemp("dj_videos")
    short_video(folder / "a.mp4", shots=((30, False), (60, True), (48, False)), fps=FPS)
    short_video(folder / "b.mp4", shots=((40, False), (40, False)), width=180, height=180, fps=FPS)
    short_video(folder / "c.mp4", shots=((30, False), (30, False)), width=320, height=240, fps=FPS)
    return folder


def recipe(folder: Path, out: Path, process: list, files=("a.mp4", "b.mp4"), mode="local", **extra):
    return from_dict({"input": [str(folder / f) for f in files], "output": str(out),
                      "executor": {"mode": mode, **({"num_cpus": 2} if mode == "ray" else {})},
                      "process": process, **extra})


def clips(table) -> set[tuple[str, int, int]]:
    return {(Path(r["source_uri"]).name, r["start_frame"], r["end_frame"]) for r in table.to_pylist()}


def rejects_by_clip(out: Path) -> dict[tuple[str, int, int], dict]:
    return {(Path(r["source_uri"]).name, r["start_frame"], r["end_frame"]): r
            for r in read_rejects(out).to_pylist()}


def test_video_filters_keep_and_drop_by_data_juicer_stats(tmp_path, videos, monkeypatch):
    made = []  # temporary folders the adapters made: all of them must be gone after the run
    mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(*args, **kwargs):
        made.append(mkdtemp(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", recording_mkdtemp)
    out = tmp_path / "out"
    run(recipe(videos, out, [
        {"shot_split": {}},
        {"dj.video_duration_filter": {"min_duration": 1.5, **AV}},
        {"dj.video_motion_score_filter": {"min_score": 0.1}},
        {"dj.video_resolution_filter": {"min_width": 100, "max_width": 1000}},
        {"dj.video_aspect_ratio_filter": {"min_ratio": "3/2"}},
    ]))
    kept = read_shards(out)
    assert clips(kept) == {("a.mp4", 90, 138)}
    row = kept.to_pylist()[0]
    assert abs(row["dj_video_duration"] - (row["end_time"] - row["start_time"])) <= 1 / FPS
    assert (row["dj_video_width"], row["dj_video_height"]) == (320.0, 180.0)
    assert row["dj_video_aspect_ratios"] == pytest.approx(320 / 180)
    assert row["dj_video_motion_score"] > 0.1

    rejects = rejects_by_clip(out)
    assert set(rejects) == {("a.mp4", 0, 30), ("a.mp4", 30, 90), ("b.mp4", 0, 40), ("b.mp4", 40, 80)}
    assert all(r["status"] == "dropped" for r in rejects.values())
    short = rejects[("a.mp4", 0, 30)]
    assert short["op"] == "1:dj.video_duration_filter"
    assert short["reason"] == "dj.video_duration_filter: video_duration 1.25 outside [1.5, inf]"
    assert json.loads(short["scores"])["dj_video_duration"] == pytest.approx(30 / FPS, abs=1 / FPS)
    static = rejects[("a.mp4", 30, 90)]
    assert static["op"] == "2:dj.video_motion_score_filter"
    assert static["reason"].startswith("dj.video_motion_score_filter: video_motion_score ")
    assert json.loads(static["scores"])["dj_video_motion_score"] < 0.1
    square = rejects[("b.mp4", 0, 40)]
    assert square["op"] == "4:dj.video_aspect_ratio_filter"
    assert square["reason"] == "dj.video_aspect_ratio_filter: video_aspect_ratios 1 outside [1.5, 2.33333]"
    assert json.loads(square["scores"]) == {"dj_video_aspect_ratios": 1.0}

    assert made and not any(Path(folder).exists() for folder in made)


def test_caption_filters_and_a_text_mapper(tmp_path, videos):
    (tmp_path / "captions.py").write_text(CAPTION_PLUGIN)
    out = tmp_path / "out"
    run(recipe(videos, out, [
        {"shot_split": {}},
        {"test_captions": {}},
        {"dj.text_length_filter": {"min_len": 10}},
        {"dj.special_characters_filter": {"max_ratio": 0.5}},
        {"dj.words_num_filter": {"min_num": 10}},
        {"dj.remove_specific_chars_mapper": {"chars_to_remove": "!"}},
    ], plugins=[str(tmp_path / "captions.py")]))
    kept = read_shards(out).to_pylist()
    assert [(Path(r["source_uri"]).name, r["start_frame"]) for r in kept] == [("a.mp4", 0)]
    assert kept[0]["text"] == "A yellow brick figure waves at the camera from a tall red tower"
    assert (kept[0]["dj_text_len"], kept[0]["dj_num_words"]) == (64.0, 13.0)
    assert kept[0]["dj_meta"] is None  # the mapper only changed the text
    reasons = {k[:2]: r["reason"] for k, r in rejects_by_clip(out).items()}
    assert reasons == {
        ("a.mp4", 30): "dj.text_length_filter: text_len 6 outside [10, inf]",
        ("a.mp4", 90): "dj.special_characters_filter: special_char_ratio 0.947368 outside [0, 0.5]",
        ("b.mp4", 0): "dj.words_num_filter: num_words 8 outside [10, inf]",
        ("b.mp4", 40): "dj.words_num_filter: num_words 8 outside [10, inf]",
    }


def test_image_filters_see_images_and_mapper_fields_go_to_dj_meta(tmp_path, videos):
    out = tmp_path / "out"
    run(recipe(videos, out, [
        {"shot_split": {}}, {"middle_frame": {}},
        {"dj.image_shape_filter": {"min_width": 10}},
        {"dj.python_lambda_mapper": {"lambda_str": "lambda s: {**s, 'note': len(s['text'])}"}},
    ], files=("b.mp4",)))
    rows = read_shards(out).to_pylist()
    assert sorted((r["kind"], r["dj_image_width"]) for r in rows) == \
        [("image", 180.0), ("image", 180.0), ("video", None), ("video", None)]
    assert all(json.loads(r["dj_meta"]) == {"note": 0} for r in rows)


@pytest.mark.parametrize("mode", ["local", "ray"])
def test_caption_filters_after_vlm_caption_in_one_recipe(tmp_path, videos, monkeypatch, mode):
    CaptionServer = pytest.importorskip("test_vlm_caption").CaptionServer
    # clips (three frames) and middle-frame images (one) get different captions
    server = CaptionServer({3: 'Caption: "A yellow figure waves."', 1: "A red brick house with a green door"})
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # loopback: no key needed
    try:
        manifest = run(recipe(videos, tmp_path / "out", [
            {"shot_split": {}}, {"middle_frame": {}},
            {"vlm_caption": {"backend": "openai", "model": "test-model", "batch_size": 4,
                             "retries": 1, "base_url": server.url}},
            {"dj.words_num_filter": {"min_num": 4}},
            {"dj.text_length_filter": {"min_len": 10, "max_len": 100}},
            {"dj.special_characters_filter": {"max_ratio": 0.19}},  # Data-Juicer counts spaces too
        ], files=("b.mp4",), mode=mode))
    finally:
        server.close()
    kept = read_shards(tmp_path / "out").to_pylist()
    assert [(r["kind"], r["text"]) for r in kept] == [("video", "A yellow figure waves.")] * 2
    assert all((r["dj_num_words"], r["dj_text_len"], round(r["dj_special_char_ratio"], 6)) == (4, 22, 0.181818)
               for r in kept)
    dropped = [r for r in read_rejects(tmp_path / "out").to_pylist() if r["op"] == "5:dj.special_characters_filter"]
    assert [r["kind"] for r in dropped] == ["image"] * 2
    assert all(r["reason"] == "dj.special_characters_filter: special_char_ratio 0.2 outside [0, 0.19]"
               for r in dropped)
    assert [manifest["ops"][i]["in"] for i in (3, 4, 5)] == [4, 4, 4]
    assert manifest["ops"][5]["dropped"] == 2 and manifest["accounted"]


def test_a_data_juicer_op_raising_fails_that_sample_only(tmp_path, videos, monkeypatch):
    from data_juicer.ops.filter.text_length_filter import TextLengthFilter

    compute = TextLengthFilter.compute_stats_batched

    def raising(self, samples, *args, **kwargs):
        if any("Waves." == text for text in samples["text"]):
            raise ValueError("boom")
        return compute(self, samples, *args, **kwargs)

    monkeypatch.setattr(TextLengthFilter, "compute_stats_batched", raising)
    (tmp_path / "captions.py").write_text(CAPTION_PLUGIN)
    out = tmp_path / "out"
    run(recipe(videos, out, [{"shot_split": {}}, {"test_captions": {}}, {"dj.text_length_filter": {"min_len": 1}}],
               plugins=[str(tmp_path / "captions.py")]))
    assert len(read_shards(out)) == 4
    (failed,) = rejects_by_clip(out).values()
    assert (failed["start_frame"], failed["status"], failed["op"]) == (30, "failed", "2:dj.text_length_filter")
    assert "dj.text_length_filter raised ValueError: boom" in failed["reason"]


@pytest.mark.parametrize("params, message", [
    ({"min_duraton": 1, **AV}, "unknown parameter 'min_duraton'; did you mean 'min_duration'?"),
    ({"min_duration": "long", **AV}, "'min_duration': Input should be a valid number"),
    ({"any_or_all": "some", **AV}, "Data-Juicer refused these parameters: Keep strategy [some] is not supported"),
    ({"min_duration": 1}, "video_backend 'ffmpeg' needs the ffmpeg program"),
])
def test_parameter_errors_are_one_line_naming_the_item(tmp_path, params, message, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)  # no ffmpeg program, wherever this runs
    with pytest.raises(RecipeError) as err:
        recipe(tmp_path, tmp_path / "out", [{"shot_split": {}}, {"dj.video_duration_filter": params}])
    text = str(err.value)
    assert "\n" not in text and "process[1] dj.video_duration_filter: " in text and message in text


@pytest.mark.parametrize("name, message", [
    ("dj.video_duraton_filter", "unknown operator 'dj.video_duraton_filter'; did you mean 'dj.video_duration_filter'?"),
    ("dj.document_deduplicator", "is a Data-Juicer deduplicator, which compares samples across the whole data set"),
    ("dj.video_split_by_duration_mapper", "writes new media; not supported in bricks recipes"),
])
def test_operators_that_cannot_run_are_refused_by_name(tmp_path, name, message):
    with pytest.raises(RecipeError, match=r"process\[1\]: .*" + message.replace("[", r"\[").replace("?", r"\?")):
        recipe(tmp_path, tmp_path / "out", [{"shot_split": {}}, {name: {}}])


def test_without_data_juicer_a_dj_operator_names_the_extra(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "data_juicer" else find_spec(name, *a))
    with pytest.raises(registry.RegistryError, match=r"^operator 'dj.text_length_filter' needs Data-Juicer: "
                                                     r"pip install 'bricks\[dj\]'$"):
        registry.get("dj.text_length_filter")
    assert registry.dj_operators() == {}


def test_bricks_operators_do_not_import_data_juicer():
    code = "import sys, bricks.operators; from bricks.engine import registry; registry.discover(); " \
           "print('data_juicer' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_adapters_pickle_by_reference_and_are_listed():
    cls = registry.get("dj.video_motion_score_filter")
    assert (cls.__module__, cls.__qualname__) == ("bricks.operators.dj.in_bricks", "DJ_video_motion_score_filter")
    assert pickle.loads(pickle.dumps(cls)) is cls and len(pickle.dumps(cls)) < 200
    op = cls(cls.Params.model_validate({"min_score": 0.5, "sampling_fps": 4}))
    op.setup()
    copy = pickle.loads(pickle.dumps(op))
    assert type(copy) is cls and copy.params == op.params and copy._dj is None
    assert cls.description == "Filter to keep samples with video motion scores from OpenCV within a specific range."
    listed = registry.dj_operators()
    assert {"dj.video_duration_filter", "dj.text_length_filter", "dj.remove_specific_chars_mapper"} <= set(listed)
    assert not {"dj.document_deduplicator", "dj.video_split_by_duration_mapper"} & set(listed)
    assert not any(name.startswith("dj.bricks_") for name in listed)


def test_on_ray(tmp_path, videos):
    out = tmp_path / "out"
    run(recipe(videos, out, [
        {"dj.video_duration_filter": {"max_duration": 5, **AV}},  # on whole sources: a.mp4 lasts 5.75 s
        {"shot_split": {}},
        {"dj.video_resolution_filter": {"min_width": 200}},
    ], files=("a.mp4", "b.mp4", "c.mp4"), mode="ray"))
    kept = read_shards(out)
    assert clips(kept) == {("c.mp4", 0, 30), ("c.mp4", 30, 60)}
    assert kept.column("dj_video_width").to_pylist() == [320.0, 320.0]
    rejects = rejects_by_clip(out)
    assert rejects[("a.mp4", 0, 138)]["reason"] == "dj.video_duration_filter: video_duration 5.75 outside [0, 5]"
    assert rejects[("b.mp4", 0, 40)]["reason"] == "dj.video_resolution_filter: video_width 180 outside [200, inf]"
    assert len(rejects) == 3


def test_ops_lists_data_juicer_operators_with_their_defaults():
    proc = subprocess.run([sys.executable, "-m", "bricks.engine.cli", "ops", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert listed["shot_split"]["kind"] == "segmenter"
    duration = listed["dj.video_duration_filter"]
    assert duration["kind"] == "filter" and duration["params"]["min_duration"]["default"] == 0
    assert "dj.words_num_filter" in listed and "dj.document_deduplicator" not in listed  # only filters and mappers
    proc = subprocess.run([sys.executable, "-m", "bricks.engine.cli", "ops", "--json", "--no-dj"],
                          capture_output=True, text=True)
    assert not any(name.startswith("dj.") for name in json.loads(proc.stdout))
