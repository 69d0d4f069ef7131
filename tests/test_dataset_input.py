"""Data-set files as input: Data-Juicer JSONL and Open-Sora CSV, their captions and fields carried
into the samples, and vlm_caption's skip_existing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from bricks.engine.inputs import InputError, read_inputs
from bricks.engine.recipe import from_dict
from bricks.engine.run import run
from conftest import read_manifest, read_rejects, read_shards, short_video


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return [Path(short_video(folder / f"v{i}.mp4", shots=((30, False), (30, False))).path) for i in range(3)]


def _run(tmp_path, input, process, mode="local", **executor):
    out = tmp_path / "out"
    manifest = run(from_dict({"input": input if isinstance(input, list) else str(input), "output": str(out),
                              "executor": {"mode": mode, **executor}, "process": process}))
    return out, manifest


def _by_source(table: pa.Table) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        grouped.setdefault(row["source_uri"], []).append(row)
    return grouped


@pytest.mark.parametrize("mode", ["local", "ray"])
def test_dj_jsonl_captions_and_fields_carry_into_every_clip(tmp_path, videos, mode):
    a, b, c = videos
    lines = [
        # two videos in one sample: each gets the text of its own chunk
        {"videos": [str(a), str(b)], "text": "<__dj__video> a red car <|__dj__eoc|> <__dj__video> a blue boat <|__dj__eoc|>",
         "source_id": "s1", "__dj__stats__": {"video_duration": [2.0, 2.5]}},
        # a relative path, one video, no special tokens
        {"videos": [c.name], "text": "a green tree", "source_id": "s2", "__dj__stats__": {"video_duration": [2.0]},
         "__dj__meta__": {"tag": "x"}},
    ]
    dataset = c.parent / "clips.jsonl"
    dataset.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out, manifest = _run(tmp_path, dataset, [{"shot_split": {"min_scene_len": 15}}], mode=mode,
                         **({"num_cpus": 2} if mode == "ray" else {}))
    shards = read_shards(out)
    assert "source_id" in shards.column_names and "dj_meta" in shards.column_names
    by_source = _by_source(shards)
    assert sorted(by_source) == sorted(str(v) for v in videos)
    expected = {str(a): ("a red car", "s1"), str(b): ("a blue boat", "s1"), str(c): ("a green tree", "s2")}
    for uri, rows in by_source.items():
        assert len(rows) == 2  # the two shots of each video
        assert {(r["text"], r["source_id"]) for r in rows} == {expected[uri]}
    # Data-Juicer's per-video statistics become the columns that dj. filters write
    assert shards.schema.field("dj_video_duration").type == pa.float64()
    assert {uri: rows[0]["dj_video_duration"] for uri, rows in by_source.items()} == {str(a): 2.0, str(b): 2.5,
                                                                                       str(c): 2.0}
    assert json.loads(by_source[str(c)][0]["dj_meta"]) == {"tag": "x"}
    assert by_source[str(a)][0]["dj_meta"] is None
    assert manifest["sources"]["total"] == 3


def test_opensora_csv_keeps_scores_and_remeasures_the_file(tmp_path, videos):
    a, b, _ = videos
    dataset = tmp_path / "meta.csv"
    # stale num_frames/height: measured again from the file; aes (integers here) carries; flow is
    # rewritten by motion_filter, which writes it as float64
    dataset.write_text(f"path,text,num_frames,height,aes,flow\n{a},\"a red car, moving\",999,1,5,0.5\n"
                       f"{b},,999,1,6,0.25\n")
    out, _ = _run(tmp_path, dataset, [{"motion_filter": {"min_score": 0.0}}])
    shards = read_shards(out)
    rows = {r["source_uri"]: r for r in shards.to_pylist()}
    assert rows[str(a)]["text"] == "a red car, moving" and rows[str(b)]["text"] is None
    assert rows[str(a)]["num_frames"] == 60 and rows[str(a)]["height"] != 1
    assert [rows[str(v)]["aes"] for v in (a, b)] == [5, 6]
    assert shards.schema.field("flow").type == pa.float64()
    assert rows[str(a)]["flow"] != 0.5  # the operator's measure, not the file's


def test_data_sets_mix_with_folders_and_fields_fill_only_their_videos(tmp_path, videos):
    a, _, _ = videos
    dataset = tmp_path / "meta.csv"
    dataset.write_text(f"path,text\n{a},captioned\n")
    out, _ = _run(tmp_path, [str(dataset), str(a.parent)], [{"fps_filter": {"min_fps": 1}}])
    texts = {r["source_uri"]: r["text"] for r in read_shards(out).to_pylist()}
    assert texts == {str(v): ("captioned" if v == a else None) for v in videos}


def test_missing_videos_of_a_data_set_are_rejects_not_lost(tmp_path, videos):
    dataset = tmp_path / "meta.csv"
    dataset.write_text(f"path,text\n{videos[0]},one\nmissing.mp4,two\n")
    out, manifest = _run(tmp_path, dataset, [{"fps_filter": {"min_fps": 1}}])
    rejects = read_rejects(out).to_pylist()
    assert [(r["source_uri"], r["op"]) for r in rejects] == [(str(tmp_path / "missing.mp4"), "read")]
    assert read_manifest(out)["sources"]["total"] == 2 == manifest["sources"]["total"]


@pytest.mark.parametrize("name, text, message", [
    ("bad.jsonl", '{"videos": ["a.mp4"]}\n{"videos": \n', r"bad.jsonl:2: not JSON"),
    ("bad.jsonl", '{"images": ["a.jpg"], "text": "x"}\n', r"bad.jsonl:1: no `videos` \(only images: bricks recipes read videos\)"),
    ("bad.jsonl", '{"videos": "a.mp4", "n": 1}\n{"videos": ["b.mp4"], "n": "one"}\n', r"field 'n' mixes int and str"),
    ("bad.jsonl", '{"videos": ["a.mp4"]}\n{"videos": ["./a.mp4"]}\n', r"bad.jsonl:2: .*a.mp4 is already named at .*bad.jsonl:1"),
    ("bad.jsonl", '{"videos": ["a.mp4"], "_x": 1}\n', r"field '_x': names starting with '_'"),
    ("bad.csv", "text,aes\nx,1\n", r"an Open-Sora CSV has a `path` column \(columns: text, aes\)"),
    ("bad.csv", "path,text\na.jpg,x\n", r"bad.csv:2: a.jpg is an image"),
    ("empty.csv", "path,text\n", r"empty.csv: the data set has no rows"),
])
def test_bad_data_sets_are_one_line_errors_before_any_work(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(InputError, match=message):
        read_inputs(str(tmp_path / name))


def test_bad_data_set_on_the_command_line_is_one_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"input: {tmp_path / 'bad.jsonl'}\noutput: {tmp_path / 'out'}\nprocess:\n  - fps_filter: {{}}\n")
    proc = subprocess.run([sys.executable, "-m", "bricks.engine.cli", "validate", str(recipe)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "bad.jsonl:1: not JSON" in proc.stderr and not (tmp_path / "out").exists()


def test_a_column_an_operator_writes_as_another_type_is_refused(tmp_path, videos):
    dataset = tmp_path / "meta.csv"
    dataset.write_text(f"path,flow\n{videos[0]},fast\n")
    with pytest.raises(Exception, match=r"column 'flow' is string, but an operator writes it as double"):
        _run(tmp_path, dataset, [{"motion_filter": {}}])


def test_vlm_caption_skip_existing_keeps_given_captions_in_ray_mode(tmp_path, videos):
    pytest.importorskip("transformers")
    a, b, _ = videos
    dataset = tmp_path / "meta.csv"
    dataset.write_text(f"path,text\n{a},kept as given\n{b},\n")
    caption = {"backend": "transformers", "preset": "tiny", "device": "cpu", "batch_size": 4, "max_new_tokens": 4,
               "skip_existing": True}
    out, _ = _run(tmp_path, dataset, [{"shot_split": {"min_scene_len": 15}}, {"vlm_caption": caption}],
                         mode="ray", num_cpus=2)
    by_source = _by_source(read_shards(out))
    assert [r["text"] for r in by_source[str(a)]] == ["kept as given"] * 2
    assert all(r["text"] and r["text"] != "kept as given" for r in by_source[str(b)])
