"""What operators hand back is checked: values must fit their columns, parameters must make sense."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from bricks.engine.recipe import RecipeError, from_dict
from bricks.engine.run import run
from bricks.engine.schema import ColumnTypeError, fit_value

from conftest import read_rejects, read_shards, short_video, write_recipe

# Shots of three 30-frame shots: [0, 30), [30, 60), [60, 90). Each operator misbehaves on one.
PLUGIN = '''
from typing import Any

import numpy as np
import pyarrow as pa

from bricks.engine.operator import Filter, Mapper, ModelOperator, ModelParams, OperatorParams
from bricks.engine.registry import register


@register
class WordyScore(Filter):
    name = "wordy_score"
    description = "Scores the second shot with a word instead of a number."
    outputs = {"wordiness": pa.float64()}

    def score(self, sample, frames):
        return {"wordiness": "high" if sample["start_frame"] == 30 else np.float32(1.5)}

    def keep(self, scores):
        return True


class SetParams(OperatorParams):
    column: str
    value: Any = None


@register
class SetOnSecond(Mapper):
    name = "set_on_second"
    description = "Sets `column` to `value` on the second shot."
    Params = SetParams
    outputs = {"level": pa.int64()}

    def process(self, sample, frames):
        if sample["start_frame"] == 30:
            sample[self.params.column] = self.params.value
        return sample


class ShotParams(ModelParams):
    pass


@register
class ShotScore(ModelOperator):
    name = "shot_score"
    description = "A model that answers the third shot with a word."
    Params = ShotParams
    outputs = {"shot": pa.float64()}

    def load(self, device):
        self.model = "loaded"

    def preprocess(self, sample, frames):
        return sample["start_frame"]

    def infer(self, inputs):
        return inputs

    def apply(self, sample, output):
        return {"shot": "third" if output == 60 else output}
'''


@pytest.fixture
def three_shots(tmp_path):
    video = short_video(tmp_path / "three.mp4", shots=((30, False), (30, False), (30, False)))
    plugin = tmp_path / "misbehaving_ops.py"
    plugin.write_text(PLUGIN)
    return video.path, plugin


def run_three_shots(tmp_path, three_shots, steps, mode="local"):
    video, plugin = three_shots
    out = tmp_path / mode
    manifest = run(from_dict({"input": video, "output": str(out), "plugins": [str(plugin)],
                              "executor": {"mode": mode, "num_cpus": 2},
                              "process": [{"shot_split": {}}, *steps]}))
    return read_shards(out), read_rejects(out), manifest


@pytest.mark.parametrize("mode", ["local", "ray"])
def test_a_score_of_the_wrong_type_fails_only_its_sample(tmp_path, three_shots, mode):
    shards, rejects, manifest = run_three_shots(
        tmp_path, three_shots, [{"wordy_score": {}}, {"shot_score": {"device": "cpu", "batch_size": 4}}], mode)
    # The first shot is kept, its numpy score stored as a float; the others failed alone.
    assert shards.to_pylist()[0]["start_frame"] == 0 and shards.num_rows == 1
    assert shards.column("wordiness").to_pylist() == [1.5] and shards.column("shot").to_pylist() == [0.0]
    failed = {r["start_frame"]: r for r in rejects.to_pylist()}
    assert set(failed) == {30, 60} and all(r["status"] == "failed" for r in failed.values())
    assert failed[30]["op"] == "1:wordy_score"
    assert failed[30]["reason"] == "column 'wordiness' is double, but wordy_score returned a str: 'high'"
    assert failed[60]["op"] == "2:shot_score"
    assert "column 'shot' is double, but shot_score returned a str: 'third'" in failed[60]["reason"]
    assert manifest["accounted"] and manifest["ops"][1]["failed"] == 1 and manifest["ops"][2]["failed"] == 1


@pytest.mark.parametrize("column, value, reason", [
    ("mood", "calm", "set_on_second returned 'mood', which is not a column: declare it in the operator's `outputs`"),
    ("text", 5, "column 'text' is string, but set_on_second returned a int: 5"),
    ("level", 2.5, "column 'level' is int64, but set_on_second returned a float: 2.5"),
    ("level", True, "column 'level' is int64, but set_on_second returned a bool: True"),
])
def test_a_mapper_field_that_does_not_fit_fails_only_its_sample(tmp_path, three_shots, column, value, reason):
    shards, rejects, _ = run_three_shots(tmp_path, three_shots, [{"set_on_second": {"column": column, "value": value}}])
    assert shards.column("start_frame").to_pylist() == [0, 60]
    (failed,) = rejects.to_pylist()
    assert (failed["start_frame"], failed["status"], failed["op"]) == (30, "failed", "1:set_on_second")
    assert failed["reason"] == reason


def test_a_mapper_field_that_fits_is_stored(tmp_path, three_shots):
    shards, rejects, _ = run_three_shots(tmp_path, three_shots, [{"set_on_second": {"column": "level", "value": 3.0}},
                                                                 {"set_on_second": {"column": "text", "value": "ok"}}])
    assert rejects is None
    assert shards.column("level").to_pylist() == [None, 3, None]
    assert shards.column("text").to_pylist() == [None, "ok", None]


@pytest.mark.parametrize("value, dtype, expected", [
    (1, pa.float64(), 1.0), (np.float32(0.5), pa.float64(), 0.5), (np.int64(7), pa.int64(), 7),
    (4.0, pa.int64(), 4), (None, pa.float64(), None), (np.bool_(True), pa.bool_(), True),
    (b"\x00\x01", pa.binary(), b"\x00\x01"), (np.array([1, 2]), pa.list_(pa.float64()), [1.0, 2.0]),
])
def test_values_that_fit_are_converted(value, dtype, expected):
    fitted = fit_value(value, dtype, "c", "op")
    assert fitted == expected and type(fitted) is type(expected)


@pytest.mark.parametrize("value, dtype", [
    ("1.5", pa.float64()), (True, pa.float64()), (2.5, pa.int64()), (2**70, pa.int64()), (1, pa.bool_()),
    (b"text", pa.string()), ("jpeg", pa.binary()), (object(), pa.float64()), (["a"], pa.list_(pa.float64())),
])
def test_values_that_do_not_fit_are_refused(value, dtype):
    with pytest.raises(ColumnTypeError, match=f"column 'c' is {dtype}, but op returned a {type(value).__name__}"):
        fit_value(value, dtype, "c", "op")


@pytest.mark.parametrize("params, message", [
    ({"motion_filter": {"min_score": 2, "max_score": 1}}, "min_score (2) > max_score (1)"),
    ({"motion_filter": {"min_score": -0.5}}, "'min_score': Input should be greater than or equal to 0"),
    ({"motion_filter": {"max_score": -1}}, "'max_score': Input should be greater than or equal to 0"),
    ({"motion_filter": {"relative": True}}, "set min_score in those units too"),
    ({"motion_filter": {"relative": True, "min_score": 0.25 * 100}}, "min_score (25) > 1: with relative: true"),
    ({"motion_filter": {"relative": True, "min_score": 0.001, "max_score": 2}}, "max_score (2) > 1"),
    ({"aesthetic_filter": {"min_score": 6, "max_score": 5}}, "min_score (6) > max_score (5)"),
    ({"aesthetic_filter": {"max_score": 4.5}}, "min_score (5) > max_score (4.5)"),
    ({"aesthetic_filter": {"min_score": -1}}, "'min_score': Input should be greater than or equal to 0"),
    ({"resolution_filter": {"min_width": 640, "max_width": 320}}, "min_width (640) > max_width (320)"),
    ({"resolution_filter": {"min_height": 360, "max_height": 180}}, "min_height (360) > max_height (180)"),
    ({"duration_filter": {"min_duration": 5, "max_duration": 2.5}}, "min_duration (5) > max_duration (2.5)"),
    ({"fps_filter": {"min_fps": 30, "max_fps": 24}}, "min_fps (30) > max_fps (24)"),
    ({"fps_filter": {"min_fps": -1}}, "'min_fps': Input should be greater than or equal to 0"),
])
def test_threshold_ranges_that_keep_nothing_are_refused(params, message):
    name = next(iter(params))
    with pytest.raises(RecipeError) as err:
        from_dict({"input": "videos/", "output": "out/", "process": [{"shot_split": {}}, params]}, where="r.yaml")
    assert str(err.value).startswith(f"r.yaml: process[1] {name}: ")
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("params", [
    {"motion_filter": {"min_score": 0.5, "max_score": 0.5}},
    {"motion_filter": {"relative": True, "min_score": 0.001, "max_score": 0.05}},
    {"aesthetic_filter": {"min_score": 4, "max_score": 6}},
    {"duration_filter": {"min_duration": 1, "max_duration": 1}},
])
def test_sensible_ranges_are_accepted(params):
    from_dict({"input": "videos/", "output": "out/", "process": [{"shot_split": {}}, params]})


def test_cli_validate_refuses_a_reversed_range_with_status_2(tmp_path, corpus):
    path = write_recipe(tmp_path, [{"shot_split": {}}, {"motion_filter": {"min_score": 1.0, "max_score": 0.5}}],
                        input=corpus[0])
    proc = subprocess.run([sys.executable, "-m", "bricks.engine.cli", "validate", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"bricks-dj: error: {path}: process[1] motion_filter: "
                                   "Value error, min_score (1) > max_score (0.5)")
