"""Recipe validation: every mistake is one line naming the recipe, the item and a fix."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from bricks.engine.plan import build
from bricks.engine.recipe import RecipeError, load

from conftest import write_recipe

CLI = [sys.executable, "-m", "bricks.engine.cli"]


def recipe_file(tmp_path, corpus, process, **extra):
    return write_recipe(tmp_path, process, input=corpus[0], **extra)


@pytest.mark.parametrize("process, message", [
    ([{"shot_splt": {}}], "process[0]: unknown operator 'shot_splt'; did you mean 'shot_split'?"),
    ([{"shot_split": {}}, {"motion_filter": {"min_scor": 1}}],
     "process[1] motion_filter: unknown parameter 'min_scor'; did you mean 'min_score'?"),
    ([{"shot_split": {"detector": "contnet"}}], "process[0] shot_split: 'detector': Input should be"),
    ([{"clip_length": {"min_frames": "many"}}], "process[0] clip_length: 'min_frames': Input should be a valid integer"),
    ([{"clip_length": {"min_frames": 50, "max_frames": 20}}], "min_frames (50) > max_frames (20)"),
    ([{"shot_split": {}, "clip_length": {}}], "process[0]: each item is one `op_name: {params}` mapping"),
])
def test_operator_errors_name_the_item(tmp_path, corpus, process, message):
    path = recipe_file(tmp_path, corpus, process)
    with pytest.raises(RecipeError) as err:
        load(path)
    assert str(err.value).startswith(str(path) + ": ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_top_level_errors(tmp_path, corpus):
    path = recipe_file(tmp_path, corpus, [{"shot_split": {}}], executer={"mode": "local"})
    with pytest.raises(RecipeError, match="unknown parameter 'executer'; did you mean 'executor'"):
        load(path)
    path.write_text("input: [unclosed\n")
    with pytest.raises(RecipeError, match=r"not valid YAML \(line 2"):
        load(path)
    path.write_text(yaml.safe_dump({"input": "x", "process": [{"shot_split": {}}]}))
    with pytest.raises(RecipeError, match="missing required field 'output'"):
        load(path)
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load(tmp_path / "nope.yaml")


def test_operator_order_is_checked(tmp_path, corpus):
    path = recipe_file(tmp_path, corpus, [{"motion_filter": {}}, {"shot_split": {}}])
    with pytest.raises(RecipeError, match=r"process\[0\] motion_filter: must come after shot_split"):
        build(load(path))


def test_set_overrides(tmp_path, corpus):
    path = recipe_file(tmp_path, corpus, [{"shot_split": {}}, {"motion_filter": {"min_score": 0.25}}])
    recipe = load(path, ["executor.frame_buffer_mb=64", "process.motion_filter.min_score=0.5",
                         "process.0.shot_split.detector=adaptive", "name=x"])
    assert recipe.executor.frame_buffer_mb == 64
    assert recipe.ops[1].params.min_score == 0.5
    assert recipe.ops[0].params.detector == "adaptive"
    with pytest.raises(RecipeError, match="no item named 'motion_filtr'; did you mean 'motion_filter'"):
        load(path, ["process.motion_filtr.min_score=1"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load(path, ["executor.mode"])
    with pytest.raises(RecipeError, match="'executor.frame_buffer_mb': Input should be a valid integer"):
        load(path, ["executor.frame_buffer_mb=lots"])


def test_set_names_an_operator_whose_name_has_a_dot():
    from bricks.common.settings import apply_override, parse_overrides

    data = {"process": [{"shot_split": {}}, {"dj.text_length_filter": {"min_len": 1}}, {"dj": None}]}
    (keys, value), = parse_overrides(["process.dj.text_length_filter.min_len=10"])
    apply_override(data, keys, value, "recipe.yaml")
    assert data["process"][1] == {"dj.text_length_filter": {"min_len": 10}}
    assert keys == ["process", "dj", "text_length_filter", "min_len"]  # the caller's path is left as it was
    (keys, value), = parse_overrides(["process.dj.x=1"])  # an operator named `dj` alone is still found
    apply_override(data, keys, value, "recipe.yaml")
    assert data["process"][2] == {"dj": {"x": 1}}


def test_cli_validate_errors_are_one_line_with_status_2(tmp_path, corpus):
    path = recipe_file(tmp_path, corpus, [{"shot_split": {"treshold": 20}}])
    proc = subprocess.run(CLI + ["validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "unknown parameter 'treshold'; did you mean 'threshold'?" in proc.stderr

    missing = write_recipe(tmp_path, [{"shot_split": {}}], input=tmp_path / "no-such-folder")
    proc = subprocess.run(CLI + ["validate", str(missing)], capture_output=True, text=True)
    assert proc.returncode == 2 and "input not found" in proc.stderr and "Traceback" not in proc.stderr

    proc = subprocess.run(CLI + ["validate", str(missing), "--set", f"input={corpus[0]}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ok (3 sources; shot_split)" in proc.stdout


def test_cli_ops_lists_operators_with_parameters():
    proc = subprocess.run(CLI + ["ops", "--json"], capture_output=True, text=True, check=True)
    ops = yaml.safe_load(proc.stdout)
    for name in ("shot_split", "clip_length", "motion_filter", "middle_frame", "resolution_filter",
                 "duration_filter", "fps_filter", "encode_clips"):
        assert ops[name]["description"]
    assert ops["shot_split"]["kind"] == "segmenter"
    assert "min_scene_len" in ops["shot_split"]["params"]
    proc = subprocess.run(CLI + ["ops"], capture_output=True, text=True, check=True)
    assert "motion_filter" in proc.stdout and "sampling_fps" in proc.stdout


def test_inputs_folder_glob_and_list_file(tmp_path, corpus):
    from bricks.engine.inputs import InputError, list_sources

    folder, truths = corpus
    paths = sorted(t.path for t in truths)
    assert list_sources(str(folder)) == paths
    assert list_sources(str(folder / "*-00[01].mp4")) == paths[:2]
    listing = tmp_path / "videos.txt"
    listing.write_text(f"# two of them\n{paths[0]}\n\n{paths[2]}\n")
    assert list_sources(str(listing)) == [paths[0], paths[2]]
    assert list_sources([str(listing), paths[1]]) == paths
    with pytest.raises(InputError, match="matched no video files"):
        list_sources(str(tmp_path / "*.mkv"))
