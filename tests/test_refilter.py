"""`bricks-dj refilter`: new thresholds decided from the stored scores equal a re-run, without decoding."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import av
import pytest
from click.testing import CliRunner

from bricks.engine.recipe import load
from bricks.engine.refilter import refilter_command
from bricks.engine.run import run

from conftest import read_manifest, read_rejects, read_shards, short_video, write_recipe

# Metadata filter after the motion filter: samples a looser motion threshold brings back are
# scored by it from their stored fields.
PROCESS = [{"shot_split": {}}, {"clip_length": {"min_frames": 15, "max_frames": 60}},
           {"motion_filter": {"min_score": 0.25}}, {"duration_filter": {"min_duration": 1.5}}]


@pytest.fixture(scope="module")
def original(tmp_path_factory, corpus) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("refilter")
    recipe = write_recipe(folder, PROCESS, input=corpus[0], output=folder / "out")
    run(load(recipe))
    return recipe, folder / "out"


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.parts[len(folder.parts)] != "whatif"}


def refilter(*args: str, decoding: bool = False):
    """The command, where any probe or decode of a video raises (every reader opens
    containers with av.open)."""
    def refuse(*args, **kwargs):
        raise AssertionError("refilter opened a video")

    with pytest.MonkeyPatch.context() as patched:
        if not decoding:
            patched.setattr(av, "open", refuse)
        return CliRunner().invoke(refilter_command, list(args))


def rows_by_id(table) -> dict[str, dict]:
    return {row["sample_id"]: row for row in table.to_pylist()} if table is not None else {}


def counts(manifest: dict) -> list[tuple]:
    return [(op["name"], op["in"], op["out"], op["dropped"], op["failed"]) for op in manifest["ops"]]


@pytest.mark.parametrize("overrides", [
    ["process.motion_filter.min_score=3.5"],   # tighter: kept clips are dropped
    ["process.motion_filter.min_score=0"],     # looser: static clips come back, then meet duration_filter
    ["process.duration_filter.min_duration=2.2"],
    ["process.duration_filter.min_duration=0.5"],
    ["process.motion_filter.min_score=0", "process.duration_filter.min_duration=0.8"],
])
def test_new_thresholds_give_what_a_rerun_gives(tmp_path, original, overrides):
    recipe, out = original
    before = checksums(out)
    sets = [arg for o in overrides for arg in ("--set", o)]
    result = refilter(str(out), *sets, "--to", str(tmp_path / "what"))
    assert result.exit_code == 0, result.output
    assert checksums(out) == before
    run(load(recipe, [*overrides, f"output={tmp_path / 'rerun'}"]))
    new, rerun = read_shards(tmp_path / "what"), read_shards(tmp_path / "rerun")
    assert new.schema.names == rerun.schema.names
    assert rows_by_id(new) == rows_by_id(rerun)
    assert len(new) != len(read_shards(out))
    mine, theirs = read_rejects(tmp_path / "what"), read_rejects(tmp_path / "rerun")
    key = lambda r: (r["sample_id"], r["source_uri"], r["start_frame"], r["op"], r["status"], r["reason"])  # noqa: E731
    assert sorted(map(key, mine.to_pylist())) == sorted(map(key, theirs.to_pylist()))
    a, b = read_manifest(tmp_path / "what"), read_manifest(tmp_path / "rerun")
    assert counts(a) == counts(b)
    assert (a["samples"], a["rejects"], a["recipe_key"]) == (b["samples"], b["rejects"], b["recipe_key"])
    assert {k: a["sources"][k] for k in ("total", "kept", "dropped", "failed")} == \
        {k: b["sources"][k] for k in ("total", "kept", "dropped", "failed")}
    assert a["decode"]["frames"] == 0 and a["refilter"]["set"] == overrides


def test_loosening_brings_back_the_static_clips(tmp_path, original):
    _, out = original
    result = refilter(str(out), "--set", "process.motion_filter.min_score=0", "--to", str(tmp_path / "what"))
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "what")
    assert manifest["refilter"]["brought_back"] > 0
    motion = next(op for op in manifest["ops"] if op["name"] == "motion_filter")
    assert motion["dropped"] == 0


def test_a_new_output_gets_its_report(tmp_path, original):
    """Deciding needs no frames; the report's thumbnails of the new output are decoded afterwards."""
    _, out = original
    result = refilter(str(out), "--set", "process.motion_filter.min_score=0", "--to", str(tmp_path / "what"),
                      decoding=True)
    assert result.exit_code == 0, result.output
    report = tmp_path / "what" / "report.html"
    assert f"report: {report}" in result.output and "motion_filter" in report.read_text()


def test_the_whatif_gets_its_report_beside_its_manifest(original):
    _, out = original
    before = checksums(out)
    result = refilter(str(out), "--set", "process.motion_filter.min_score=3.5", decoding=True)
    assert result.exit_code == 0, result.output
    assert checksums(out) == before  # the what-if's files are in OUT/whatif only
    report = out / "whatif" / "report.html"
    whatif = json.loads((out / "whatif" / "manifest.json").read_text())
    assert whatif["report"] == {"written": True, "file": "whatif/report.html"}
    assert f"report: {report}" in result.output
    page = report.read_text()
    motion, = (op for op in whatif["ops"] if op["name"] == "motion_filter")
    was, = (op for op in read_manifest(out)["ops"] if op["name"] == "motion_filter")
    assert motion["dropped"] > was["dropped"]
    # the funnel row of the what-if's counts, and thumbnails of its samples
    row = "".join(f'<td class="n">{motion[k]}</td>' for k in ("in", "out", "dropped", "failed"))
    assert f"<td>2:motion_filter</td>{row}" in page and "data:image/jpeg;base64," in page


def test_without_to_a_whatif_manifest_in_out_and_a_table(original):
    _, out = original
    before = checksums(out)
    result = refilter(str(out), "--set", "process.motion_filter.min_score=3.5")
    assert result.exit_code == 0, result.output
    assert checksums(out) == before
    whatif = json.loads((out / "whatif" / "manifest.json").read_text())
    original_manifest = read_manifest(out)
    assert whatif["samples"]["total"] < original_manifest["samples"]["total"]
    assert whatif["shards"] == [] and whatif["recipe"]["process"][2]["motion_filter"]["min_score"] == 3.5
    assert sum(whatif["sources"][k] for k in ("kept", "dropped", "failed")) == original_manifest["sources"]["total"]
    total = lambda m: m["samples"]["total"] + m["rejects"]["dropped"] + m["rejects"]["failed"]  # noqa: E731
    assert total(whatif) == total(original_manifest)
    line = next(line for line in result.output.splitlines() if line.startswith("2:motion_filter"))
    assert "->" in line
    again = refilter(str(out), "--set", "process.motion_filter.min_score=0.5")  # its own file is replaced
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize("args, says", [
    (["--set", "process.clip_length.min_frames=30"], "clip_length is not a filter"),
    (["--set", "process.motion_filter.sampling_fps=4"], "motion_filter.sampling_fps: not a threshold"),
    (["--set", "executor.mode=ray"], "refilter changes thresholds only"),
    (["--set", "process.aesthetic_filter.min_score=1"], "no item named 'aesthetic_filter'"),
    (["--set", "process.motion_filter.min_score=0.25"], "changes no parameter"),
    (["--set", "process.motion_filter.min_score=-1"], "motion_filter"),
    ([], "give at least one --set"),
])
def test_refusals_are_one_line_with_status_2(original, args, says):
    _, out = original
    before = checksums(out)
    result = refilter(str(out), *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bricks-dj: error: ") and says in lines[0], result.output
    assert checksums(out) == before


def test_to_a_folder_that_is_not_empty_is_refused(tmp_path, original):
    _, out = original
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    result = refilter(str(out), "--set", "process.motion_filter.min_score=1", "--to", str(tmp_path / "taken"))
    assert result.exit_code == 2 and "not empty" in result.output
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_samples_that_would_need_frames_later_are_refused(tmp_path):
    video = short_video(tmp_path / "v.mp4", shots=((30, False), (30, True)))
    process = [{"shot_split": {}}, {"motion_filter": {"min_score": 0.25}}, {"encode_clips": {"short_side": 32}}]
    run(load(write_recipe(tmp_path, process, input=video.path, output=tmp_path / "out")))
    tighter = refilter(str(tmp_path / "out"), "--set", "process.motion_filter.min_score=1000")
    assert tighter.exit_code == 0, tighter.output  # dropping more needs nothing new
    looser = refilter(str(tmp_path / "out"), "--set", "process.motion_filter.min_score=0")
    assert looser.exit_code == 2
    assert "never reached 2:encode_clips, which needs frames" in looser.output


@pytest.fixture(scope="module")
def with_model(tmp_path_factory, corpus) -> tuple[Path, Path]:
    """A model filter last: the tiny aesthetic model (random weights, seeded) on CPU."""
    pytest.importorskip("open_clip")
    folder = tmp_path_factory.mktemp("refilter-model")
    process = [*PROCESS[:3], {"aesthetic_filter": {"preset": "tiny", "device": "cpu", "min_score": 0.0765}}]
    recipe = write_recipe(folder, process, input=corpus[0], output=folder / "out")
    run(load(recipe))
    return recipe, folder / "out"


@pytest.mark.parametrize("override", ["process.aesthetic_filter.min_score=0.077",
                                      "process.aesthetic_filter.min_score=0"])
def test_a_model_filter_decides_again_from_its_stored_scores(tmp_path, with_model, override):
    recipe, out = with_model
    result = refilter(str(out), "--set", override, "--to", str(tmp_path / "what"))
    assert result.exit_code == 0, result.output
    run(load(recipe, [override, f"output={tmp_path / 'rerun'}"]))
    new, rerun = read_shards(tmp_path / "what"), read_shards(tmp_path / "rerun")
    assert len(new) != len(read_shards(out)) and rows_by_id(new) == rows_by_id(rerun)
    assert counts(read_manifest(tmp_path / "what")) == counts(read_manifest(tmp_path / "rerun"))


def test_bringing_back_samples_a_model_never_saw_is_refused(with_model):
    _, out = with_model
    result = refilter(str(out), "--set", "process.motion_filter.min_score=0")
    assert result.exit_code == 2
    assert "never reached 3:aesthetic_filter, which needs a model" in result.output


# -- Data-Juicer's filters ----------------------------------------------------------------------------

DJ_PROCESS = [{"shot_split": {}}, {"dj.video_duration_filter": {"min_duration": 1.5, "video_backend": "av"}},
              {"dj.video_motion_score_filter": {"min_score": 0.1}},
              {"dj.video_aspect_ratio_filter": {"min_ratio": "3/2"}}]


@pytest.fixture(scope="module")
def with_dj(tmp_path_factory) -> tuple[Path, Path]:
    """a.mp4: 320x180, shots of 30 (moving), 60 (static) and 48 (moving) frames; b.mp4: 180x180,
    two moving shots of 40. Kept: a's last shot; dropped: a's first (too short), a's static one,
    b's two (square)."""
    pytest.importorskip("data_juicer")
    folder = tmp_path_factory.mktemp("refilter-dj")
    short_video(folder / "a.mp4", shots=((30, False), (60, True), (48, False)))
    short_video(folder / "b.mp4", shots=((40, False), (40, False)), width=180, height=180)
    recipe = write_recipe(folder, DJ_PROCESS, input=[str(folder / "a.mp4"), str(folder / "b.mp4")],
                          output=folder / "out")
    run(load(recipe))
    return recipe, folder / "out"


def dj_refilter(*args: str):
    """The command, where Data-Juicer's filters may not compute a stat (nor open a video)."""
    from bricks.operators.dj.in_bricks import DJFilter

    def refuse(*args, **kwargs):
        raise AssertionError("refilter computed Data-Juicer stats")

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(DJFilter, "_stats_and_decision", refuse)
        return refilter(*args)


@pytest.mark.parametrize("overrides", [
    ["process.dj.video_duration_filter.min_duration=2.5"],  # tighter: a's last shot (2 s) goes
    ["process.dj.video_motion_score_filter.min_score=2"],
    ["process.dj.video_aspect_ratio_filter.min_ratio=1/2"],  # looser, last: b's shots come back
    ["process.dj.video_aspect_ratio_filter.any_or_all=all", "process.dj.video_motion_score_filter.max_score=1"],
])
def test_data_juicer_filters_decide_again_from_their_stored_stats(tmp_path, with_dj, overrides):
    recipe, out = with_dj
    sets = [arg for o in overrides for arg in ("--set", o)]
    result = dj_refilter(str(out), *sets, "--to", str(tmp_path / "what"))
    assert result.exit_code == 0, result.output
    run(load(recipe, [*overrides, f"output={tmp_path / 'rerun'}"]))
    # Scores as stored: a re-run's clips cut for Data-Juicer are encoded again, and libx264
    # does not always give the same pixels twice, so its motion scores may differ slightly.
    new, rerun = rows_by_id(read_shards(tmp_path / "what")), rows_by_id(read_shards(tmp_path / "rerun"))
    assert new.keys() == rerun.keys()
    for sample_id, row in new.items():
        theirs = rerun[sample_id]
        assert row["dj_video_motion_score"] == pytest.approx(theirs["dj_video_motion_score"], rel=0.02)
        assert {**row, "dj_video_motion_score": None} == {**theirs, "dj_video_motion_score": None}
    mine, theirs = read_rejects(tmp_path / "what"), read_rejects(tmp_path / "rerun")
    key = lambda r: (r["sample_id"], r["op"], r["status"])  # noqa: E731
    assert sorted(map(key, mine.to_pylist())) == sorted(map(key, theirs.to_pylist()))
    where = lambda r: (r["source_uri"], r["start_frame"])  # noqa: E731  (ids depend on the recipe)
    stored = {**{where(r): {**json.loads(r["fields"] or "{}"), **json.loads(r["scores"])}
                 for r in read_rejects(out).to_pylist()},
              **{where(r): r for r in read_shards(out).to_pylist()}}
    for reject in mine.to_pylist():  # the reason gives the stored stat
        stat = reject["reason"].split(": ", 1)[1].split(" ")[0]
        assert f"{stat} {stored[where(reject)]['dj_' + stat]:g} " in reject["reason"], reject
    assert counts(read_manifest(tmp_path / "what")) == counts(read_manifest(tmp_path / "rerun"))


@pytest.mark.parametrize("override, says", [
    # sampling_fps changes the stat itself; its parameters that only Data-Juicer's decision reads are listed
    ("process.dj.video_motion_score_filter.sampling_fps=4",
     "not a threshold that dj.video_motion_score_filter decides with from stored scores (those are: min_score, "
     "max_score, any_or_all)"),
    ("process.dj.video_duration_filter.min_duration=1",  # a's first shot would need motion scores
     "that never reached 2:dj.video_motion_score_filter, which opens the media (or a model) itself"),
])
def test_data_juicer_refusals(with_dj, override, says):
    _, out = with_dj
    result = dj_refilter(str(out), "--set", override)
    assert result.exit_code == 2 and says in result.output, result.output


def test_stored_scores_that_do_not_give_the_recorded_decisions_are_refused(tmp_path, original):
    """A motion_filter reject whose stored flow passes the recipe's own threshold: the stored
    scores are not what the filter decided on, and no what-if is made from them."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    _, out = original
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("whatif"))
    files = sorted((copy / "rejects").glob("*.parquet"))
    for file in files:
        rows = pq.read_table(file).to_pylist()
        touched = [r for r in rows if r["op"] == "2:motion_filter"]
        if touched:
            touched[0]["scores"] = json.dumps({"flow": 9.0})
            pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(file)), file)
            break
    else:
        pytest.fail("the corpus gave no motion_filter reject")
    result = refilter(str(copy), "--set", "process.motion_filter.min_score=0.5")
    assert result.exit_code == 2, result.output
    assert f"sample {touched[0]['sample_id']} was dropped by 2:motion_filter, but its stored scores give kept" \
        in result.output


def test_data_juicer_decisions_from_stored_stats_of_either_shape():
    """Text filters read one value per stat, media filters a list per sample's media: the
    stored column is given in the shape the decision reads."""
    pytest.importorskip("data_juicer")
    from bricks.engine.registry import get

    text = get("dj.text_length_filter")
    assert text.thresholds == ("min_len", "max_len")
    assert text(text.Params(min_len=5)).keep_stored({"dj_text_len": 6.0}) is True
    assert text(text.Params(min_len=10)).keep_stored({"dj_text_len": 6.0}) == \
        "dj.text_length_filter: text_len 6 outside [10, inf]"
    video = get("dj.video_duration_filter")
    assert video(video.Params(min_duration=1.5, video_backend="av")).keep_stored({"dj_video_duration": 1.25}) == \
        "dj.video_duration_filter: video_duration 1.25 outside [1.5, inf]"
    assert video(video.Params(min_duration=1.0, video_backend="av")).keep_stored({"dj_video_duration": 1.25}) is True
    with pytest.raises(RuntimeError, match="keep called without score"):  # a run's keep needs its score
        video(video.Params(min_duration=1.0, video_backend="av")).keep({"dj_video_duration": 1.25})


# -- across a fan-out that keeps its parent: the Text2Bricks recipe --------------------------------------

@pytest.fixture(scope="module")
def brickfilm(tmp_path_factory, corpus) -> tuple[list[str], Path]:
    """recipes/brickfilm.yaml as `bricks-dj demo` runs it (tiny models, CPU), in-process:
    motion_filter runs before middle_frame, which keeps each clip and adds its image."""
    pytest.importorskip("transformers")
    from bricks.engine.cli import DEMO_OVERRIDES

    out = tmp_path_factory.mktemp("refilter-brickfilm") / "out"
    base = [f"input={corpus[0]}", *DEMO_OVERRIDES, "executor.mode=local"]
    run(load(BRICKFILM, [*base, f"output={out}"]))
    return base, out


BRICKFILM = str(Path(__file__).resolve().parent.parent / "recipes" / "brickfilm.yaml")


def test_a_filter_before_middle_frame_drops_each_clip_with_its_image(tmp_path, brickfilm):
    base, out = brickfilm
    change = "process.motion_filter.min_score=3.5"
    result = refilter(str(out), "--set", change, "--to", str(tmp_path / "what"))
    assert result.exit_code == 0, result.output
    run(load(BRICKFILM, [*base, change, f"output={tmp_path / 'rerun'}"]))

    def rows(folder):  # media aside: encoded clips may differ by a few bytes between runs
        return {k: {**r, "media": None} for k, r in rows_by_id(read_shards(folder)).items()}

    new, rerun = rows(tmp_path / "what"), rows(tmp_path / "rerun")
    assert new == rerun and 0 < len(new) < len(rows(out))
    assert {r["kind"] for r in new.values()} == {"video", "image"}
    key = lambda r: (r["sample_id"], r["op"], r["status"], r["reason"])  # noqa: E731
    mine, theirs = read_rejects(tmp_path / "what").to_pylist(), read_rejects(tmp_path / "rerun").to_pylist()
    assert sorted(map(key, mine)) == sorted(map(key, theirs))
    assert counts(read_manifest(tmp_path / "what")) == counts(read_manifest(tmp_path / "rerun"))
    dropped = [r for r in mine if r["op"] == "4:motion_filter" and r["reason"].endswith("< min_score 3.5")]
    assert dropped and all(r["kind"] == "video" for r in dropped)  # the clip, and no reject for its image


def test_loosening_a_filter_before_middle_frame_is_refused(brickfilm):
    _, out = brickfilm
    result = refilter(str(out), "--set", "process.motion_filter.min_score=0")
    assert result.exit_code == 2
    assert "never reached 5:middle_frame, which needs frames" in result.output
