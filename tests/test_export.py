"""`export`: a bricks-dj output as Open-Sora's CSV, Data-Juicer's JSONL and WebDataset tars.

Each written media file is opened and checked against its shard row (frame count, size), in
both encoded and reference mode; Open-Sora's own data-set classes read the CSV when
BRICKS_OPENSORA_SRC names an Open-Sora v1.1.0 checkout.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from bricks.engine.dataset_files import dj_tokens
from bricks.engine.export import OPENSORA_COLUMNS, ExportError, export
from bricks.engine.recipe import from_dict
from bricks.engine.run import run

from conftest import read_shards, short_video

MODES = ["brick_shards", "reference_shards"]  # clips encoded in `media`, and clips referencing their sources


def shard_rows(out: Path) -> dict[str, dict]:
    return {r["sample_id"]: r for r in read_shards(out).to_pylist()}


def video_frames(source) -> list[np.ndarray]:
    with av.open(source) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def check_media(path, row: dict) -> None:
    """`path` (a file or bytes) plays as the row says: frame count and size."""
    if row["kind"] == "video":
        frames = video_frames(path)
        assert (len(frames), *frames[0].shape[:2]) == (row["num_frames"], row["height"], row["width"])
    else:
        with Image.open(path) as image:
            assert image.format == "JPEG" and (image.height, image.width) == (row["height"], row["width"])


@pytest.fixture(scope="module")
def flow_output(tmp_path_factory) -> Path:
    """A small reference-mode output with a score column (`flow`) and no captions."""
    folder = tmp_path_factory.mktemp("flow")
    short_video(folder / "videos" / "a.mp4", shots=((20, False), (20, False)))
    out = folder / "out"
    run(from_dict({"input": str(folder / "videos"), "output": str(out), "executor": {"mode": "local"},
                   "process": [{"shot_split": {}}, {"clip_length": {"min_frames": 10}},
                               {"motion_filter": {"min_score": 0}}, {"middle_frame": {}}]}))
    return out


@pytest.mark.parametrize("mode", MODES)
def test_opensora_csv_names_playable_clips_of_the_rows(mode, request, tmp_path):
    out = request.getfixturevalue(mode)
    rows = shard_rows(out)
    summary = export(out, "opensora", tmp_path / "os")
    with open(tmp_path / "os" / "out.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == OPENSORA_COLUMNS  # no score columns in this output
        lines = list(reader)
    assert len(lines) == len(rows) == summary["rows"]
    assert summary["cut_from_source"] == (summary["video"] if mode == "reference_shards" else 0)
    for line in lines:
        path = Path(line["path"])
        row = rows[path.stem]
        assert path.is_absolute() and path.parent == tmp_path / "os" / "media"
        assert path.suffix == (".mp4" if row["kind"] == "video" else ".jpg")
        check_media(path, row)
        assert line["text"] == row["text"]
        for column in ("num_frames", "height", "width", "resolution"):
            assert int(line[column]) == row[column]
        assert float(line["aspect_ratio"]) == row["aspect_ratio"]
        # Open-Sora's own tools give images one frame and no frame rate.
        assert line["fps"] == ("" if row["kind"] == "image" else str(row["fps"]))


def test_opensora_csv_puts_scores_after_its_columns(flow_output, tmp_path):
    export(flow_output, "opensora", tmp_path / "os", name="flow")
    with open(tmp_path / "os" / "flow.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == [*OPENSORA_COLUMNS, "flow"]


def test_reference_clip_has_the_source_frames(reference_shards, tmp_path):
    export(reference_shards, "opensora", tmp_path / "os")
    rows = [r for r in shard_rows(reference_shards).values() if r["kind"] == "video"]
    row = max(rows, key=lambda r: r["start_frame"])  # one that starts well into its source
    assert row["start_frame"] > 0
    source = video_frames(row["path"])[row["start_frame"]:row["end_frame"]]
    clip = video_frames(str(tmp_path / "os" / "media" / f"{row['sample_id']}.mp4"))
    assert len(clip) == len(source)
    errors = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(clip, source)]
    shifted = np.abs(clip[0].astype(int) - video_frames(row["path"])[row["start_frame"] - 1].astype(int)).mean()
    assert max(errors) < 4 and shifted > max(errors)  # H.264 at crf 23: close, and not a frame off


@pytest.mark.parametrize("mode", MODES)
def test_dj_jsonl_uses_data_juicers_tokens(mode, request, tmp_path):
    out = request.getfixturevalue(mode)
    rows = shard_rows(out)
    export(out, "dj", tmp_path / "dj")
    tokens = dj_tokens()
    SpecialTokens = pytest.importorskip("data_juicer.utils.mm_utils").SpecialTokens
    assert tokens == {"video": SpecialTokens.video, "image": SpecialTokens.image, "audio": SpecialTokens.audio,
                      "eoc": SpecialTokens.eoc}
    lines = [json.loads(line) for line in (tmp_path / "dj" / "out.jsonl").read_text().splitlines()]
    assert len(lines) == len(rows)
    for line in lines:
        row = rows[line["sample_id"]]
        key = "videos" if row["kind"] == "video" else "images"
        assert key in line and ("images" if key == "videos" else "videos") not in line
        (path,) = line[key]
        check_media(path, row)
        # an empty caption (the tiny captioner can answer nothing) leaves no gap between the tokens
        assert line["text"] == " ".join(t for t in (tokens[row["kind"]], row["text"], tokens["eoc"]) if t)
        expected = {k: v for k, v in row.items() if k not in ("media", "media_format", "path", "text")}
        assert {k: v for k, v in line.items() if k not in (key, "text")} == expected


def test_dj_loads_the_jsonl(brick_shards, tmp_path):
    load_formatter = pytest.importorskip("data_juicer.format.load").load_formatter

    export(brick_shards, "dj", tmp_path / "dj")
    dataset = load_formatter(str(tmp_path / "dj" / "out.jsonl")).load_dataset()
    assert len(dataset) == len(shard_rows(brick_shards))
    assert sorted(dataset.column_names) == sorted(["videos", "images", "text", "sample_id", "kind", "source_uri",
                                                   "start_frame", "end_frame", "start_time", "end_time",
                                                   "num_frames", "fps", "height", "width", "aspect_ratio",
                                                   "resolution"])


@pytest.mark.parametrize("mode", MODES)
def test_webdataset_pairs_media_with_the_row(mode, request, tmp_path):
    out = request.getfixturevalue(mode)
    rows = shard_rows(out)
    summary = export(out, "webdataset", tmp_path / "wds", samples_per_tar=10)
    tars = sorted((tmp_path / "wds").glob("shard-*.tar"))
    assert [t.name for t in tars] == summary["files"]
    assert len(tars) == -(-len(rows) // 10)
    seen = []
    for index, tar in enumerate(tars):
        with tarfile.open(tar) as archive:
            names = archive.getnames()
            keys = list(dict.fromkeys(n.split(".", 1)[0] for n in names))
            assert len(keys) == (10 if index < len(tars) - 1 else len(rows) - 10 * index)
            for key in keys:
                row = rows[key]
                media = f"{key}.mp4" if row["kind"] == "video" else f"{key}.jpg"
                assert [n for n in names if n.startswith(key + ".")] == [media, f"{key}.json"]
                data = json.loads(archive.extractfile(f"{key}.json").read())
                assert data == {k: v for k, v in row.items() if k != "media"}
                check_media(archive.extractfile(media), row)
            seen += keys
    assert sorted(seen) == sorted(rows)


def test_progress_counts_every_row(flow_output, tmp_path):
    calls = []
    summary = export(flow_output, "webdataset", tmp_path / "wds", progress=lambda done, total: calls.append((done, total)))
    total = summary["rows"]
    assert calls == [(done, total) for done in range(total + 1)]


def test_bad_arguments_are_one_line_errors(flow_output, tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    cases = [((flow_output, "csv", tmp_path / "a"), "unknown export format 'csv'"),
             ((tmp_path / "missing", "dj", tmp_path / "a"), "does not exist"),
             ((tmp_path / "plain", "dj", tmp_path / "a"), "is not a bricks-dj output"),
             ((flow_output, "dj", tmp_path / "plain" / "notes.txt"), "is a file")]
    for args, message in cases:
        with pytest.raises(ExportError, match=message) as caught:
            export(*args)
        assert "\n" not in str(caught.value)
    assert issubclass(ExportError, ValueError)
    assert not (tmp_path / "a").exists()


def test_refuses_a_folder_it_did_not_write(flow_output, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty; choose an empty folder, or --overwrite"):
        export(flow_output, "dj", dest)
    with pytest.raises(ExportError, match="holds no bricks-dj export"):
        export(flow_output, "dj", dest, overwrite=True)
    assert sorted(p.name for p in dest.iterdir()) == ["notes.txt"]


def test_overwrite_replaces_only_the_earlier_export(flow_output, tmp_path):
    dest = tmp_path / "dest"
    export(flow_output, "opensora", dest)
    (dest / "notes.txt").write_text("mine")
    (dest / "media" / "mine.txt").write_text("mine too")
    with pytest.raises(ExportError, match="not empty"):
        export(flow_output, "webdataset", dest)
    summary = export(flow_output, "webdataset", dest, overwrite=True)
    left = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*"))
    assert left == sorted(["notes.txt", "media", "media/mine.txt", "export.json", *summary["files"]])
    assert (dest / "notes.txt").read_text() == "mine"
    record = json.loads((dest / "export.json").read_text())
    assert record["format"] == "webdataset" and record["files"] == summary["files"]
    # Replacing it again, now into a folder holding only the last export and the user's files.
    export(flow_output, "dj", dest, overwrite=True)
    assert not list(dest.glob("shard-*.tar")) and (dest / "out.jsonl").is_file()
    assert (dest / "media" / "mine.txt").read_text() == "mine too"
    assert not list(tmp_path.glob(".*bricks-tmp"))


def test_overwrite_never_replaces_a_file_of_others(flow_output, tmp_path):
    dest = tmp_path / "dest"
    export(flow_output, "dj", dest)
    (dest / "out.csv").write_text("mine")
    with pytest.raises(ExportError, match="holds out.csv, which bricks-dj did not write"):
        export(flow_output, "opensora", dest, overwrite=True)
    assert (dest / "out.csv").read_text() == "mine" and (dest / "out.jsonl").is_file()


def test_a_failed_export_leaves_nothing(tmp_path):
    short_video(tmp_path / "videos" / "a.mp4")
    out = tmp_path / "out"
    run(from_dict({"input": str(tmp_path / "videos"), "output": str(out), "executor": {"mode": "local"},
                   "process": [{"shot_split": {}}]}))
    (tmp_path / "videos" / "a.mp4").unlink()  # reference mode: the clips cannot be cut any more
    with pytest.raises(ExportError, match=r"sample [0-9a-f]+: source .*a\.mp4: file not found") as caught:
        export(out, "opensora", tmp_path / "dest")
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "videos"]


# -- Open-Sora's own code -------------------------------------------------------------------------

# An Open-Sora v1.1.0 checkout, and the Python of an environment with its requirements (its
# torch and torchvision, which still has `read_video`; bricks' own by default).
OPENSORA_SRC = os.environ.get("BRICKS_OPENSORA_SRC")
OPENSORA_PYTHON = os.environ.get("BRICKS_OPENSORA_PYTHON", sys.executable)


@pytest.mark.skipif(not OPENSORA_SRC, reason="BRICKS_OPENSORA_SRC is not set: it names an Open-Sora v1.1.0 "
                    "checkout (BRICKS_OPENSORA_PYTHON: an interpreter with its requirements) to read the CSV with")
@pytest.mark.parametrize("mode", MODES)
def test_opensora_datasets_read_the_csv(mode, request, tmp_path):
    out = request.getfixturevalue(mode)
    export(out, "opensora", tmp_path / "os")
    fields = ("kind", "num_frames", "height", "width", "fps", "text")
    expected = {key: {f: row[f] for f in fields} for key, row in shard_rows(out).items()}
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    reader = Path(__file__).with_name("opensora_reader.py")
    env = dict(os.environ, PYTHONPATH=OPENSORA_SRC)
    done = subprocess.run([OPENSORA_PYTHON, str(reader), str(tmp_path / "os" / "out.csv"),
                           str(tmp_path / "expected.json")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Open-Sora read {len(expected)} rows" in done.stdout


def test_media_check_fails_on_a_wrong_row(brick_shards, tmp_path):
    """The check above can fail: a row whose frame count is off does not pass."""
    row = next(r for r in shard_rows(brick_shards).values() if r["kind"] == "video")
    path = tmp_path / "clip.mp4"
    path.write_bytes(row["media"])
    check_media(str(path), row)
    with pytest.raises(AssertionError):
        check_media(str(path), dict(row, num_frames=row["num_frames"] + 1))


def test_exports_an_output_on_s3(flow_output, s3, tmp_path):
    uri = s3.upload(flow_output, "runs/flow")
    summary = export(uri, "opensora", tmp_path / "os")
    rows = shard_rows(flow_output)
    assert summary["rows"] == len(rows) and summary["files"] == ["flow.csv"]
    with open(tmp_path / "os" / "flow.csv", newline="") as f:
        for line in csv.DictReader(f):
            check_media(line["path"], rows[Path(line["path"]).stem])


def test_an_odd_sized_source_exports_its_clips_at_their_exact_size(tmp_path):
    from bricks.common.video import clip_arrays, encode_mp4, probe

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (91, 161, 3), dtype=np.uint8) for _ in range(12)]
    source = tmp_path / "odd.mp4"
    source.write_bytes(encode_mp4(frames, 24, keep_size=True))
    assert (probe(str(source)).width, probe(str(source)).height) == (161, 91)
    out = tmp_path / "out"
    run(from_dict({"input": str(source), "output": str(out), "executor": {"mode": "local"},
                   "process": [{"fps_filter": {"min_fps": 1}}]}))
    summary = export(out, "opensora", tmp_path / "os")
    assert summary["cut_from_source"] == 1
    with open(tmp_path / "os" / "out.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["width"], row["height"], row["num_frames"]) == ("161", "91", "12")
    decoded = clip_arrays(row["path"], 0, 12, 0.0)
    assert len(decoded) == 12 and decoded[0].shape == (91, 161, 3)
