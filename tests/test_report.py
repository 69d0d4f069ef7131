"""OUT/report.html: what it gathers (funnel, thresholds, near-threshold picks, the trainer's
buckets), how it is written, and how it renders in headless Chromium."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from bricks.engine.cli import main
from bricks.engine.recipe import from_dict
from bricks.engine.report import REPORT, ReportError, ReportOptions, write_report
from bricks.engine.report import gather
from bricks.engine.report.thumbs import HEIGHT, thumbnails
from bricks.engine.report.tokens import count_tokens
from bricks.engine.run import run

MIN_SCORE = 0.25


@pytest.fixture(scope="module")
def output(tmp_path_factory, corpus) -> Path:
    """The CPU recipe with encoded clips and tiny captions: some clips dropped by motion_filter
    (static shots) and by clip_length (a 10-frame shot)."""
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("report") / "out"
    process = [{"shot_split": {"min_scene_len": 15}}, {"clip_length": {"min_frames": 15, "max_frames": 200}},
               {"motion_filter": {"sampling_fps": 2, "min_score": MIN_SCORE}}, {"middle_frame": {}},
               {"encode_clips": {}},
               {"vlm_caption": {"backend": "transformers", "preset": "tiny", "device": "cpu", "batch_size": 8,
                                "max_new_tokens": 6}}]
    run(from_dict({"input": str(corpus[0]), "output": str(out), "executor": {"mode": "local"}, "process": process}))
    return out


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_run_writes_the_report(output):
    assert _manifest(output)["report"] == {"written": True, "file": REPORT}
    assert (output / REPORT).read_text().startswith("<!doctype html>")


def test_funnel_counts_are_the_manifests(output):
    data = gather.read_output(str(output))
    manifest = _manifest(output)
    steps = {s["label"]: s for s in gather.funnel(data)}
    for op in manifest["ops"]:
        step = steps[f"{op['index']}:{op['name']}"]
        assert (step["in"], step["out"], step["dropped"], step["failed"]) == (op["in"], op["out"], op["dropped"],
                                                                              op["failed"])
        assert sum(n for _, _, n in step["reasons"]) == op["dropped"] + op["failed"]
    assert sum(n for s in steps.values() for _, _, n in s["reasons"]) == \
        manifest["rejects"]["dropped"] + manifest["rejects"]["failed"]
    motion = steps["2:motion_filter"]
    assert motion["dropped"] > 0 and motion["reasons"] == [("dropped", "flow # < min_score #", motion["dropped"])]
    assert len(data.kept) == manifest["samples"]["total"]


def test_thresholds_are_read_from_the_recipe():
    manifest = {"columns": {"flow": "double", "aes": "double", "text": "string"},
                "recipe": {"process": [{"resolution_filter": {"min_width": 160, "max_width": None}},
                                       {"motion_filter": {"min_score": 0.3, "max_score": 2.5, "sampling_fps": 2}},
                                       {"aesthetic_filter": {"min_score": 4, "max_score": None}}]}}
    found, notes = gather.thresholds(manifest, gather.score_columns(manifest))
    assert [(t.column, t.op_label, t.param, t.value) for t in found] == [
        ("flow", "1:motion_filter", "min_score", 0.3), ("flow", "1:motion_filter", "max_score", 2.5),
        ("aes", "2:aesthetic_filter", "min_score", 4.0)]
    assert notes == []
    unknown = {"columns": {}, "recipe": {"process": [{"no_such_filter": {"min_score": 1}}]}}
    assert "no_such_filter" in gather.thresholds(unknown, [])[1][0]


def test_data_juicer_thresholds_without_its_no_bound_maximum():
    pytest.importorskip("data_juicer")
    import sys

    manifest = {"columns": {"dj_video_motion_score": "double"},
                "recipe": {"process": [{"dj.video_motion_score_filter": {
                    "min_score": 0.25, "max_score": sys.float_info.max, "sampling_fps": 2, "any_or_all": "any"}}]}}
    found, notes = gather.thresholds(manifest, gather.score_columns(manifest))
    assert [(t.column, t.param, t.value) for t in found] == [("dj_video_motion_score", "min_score", 0.25)]
    assert notes == []
    # an operator with several stats: each bound goes to the column it names
    manifest = {"columns": {"dj_video_width": "double", "dj_video_height": "double"},
                "recipe": {"process": [{"dj.video_resolution_filter": {
                    "min_width": 160, "max_width": sys.float_info.max, "min_height": 90}}]}}
    found, _ = gather.thresholds(manifest, gather.score_columns(manifest))
    assert [(t.column, t.param, t.value) for t in found] == [("dj_video_width", "min_width", 160.0),
                                                           ("dj_video_height", "min_height", 90.0)]


def test_near_threshold_picks_are_the_closest(output):
    data = gather.read_output(str(output))
    (threshold,) = data.thresholds
    assert (threshold.column, threshold.param, threshold.value) == ("flow", "min_score", MIN_SCORE)
    picks = gather.near_threshold(data, threshold, k=2)
    kept_flows = sorted(v for v, kind in zip(data.kept.get("flow"), data.kept.get("kind")) if kind == "video")
    assert [r["score"] for r in picks["kept"]] == kept_flows[:2]  # all above min_score: the lowest are closest
    dropped = [json.loads(s)["flow"] for s, op in zip(data.rejects.get("scores"), data.rejects.get("op"))
               if op == threshold.op_label]
    assert sorted(r["score"] for r in picks["dropped"]) == sorted(dropped, reverse=True)[:2][::-1]
    assert all(r["score"] < MIN_SCORE for r in picks["dropped"])
    values = gather.score_values(data, "flow")
    assert len(values["dropped here"]) == len(dropped) and len(values["kept"]) == len(data.kept)


def test_bucket_counts_are_the_trainers(output):
    pytest.importorskip("torch")
    from bricks.train.buckets import Buckets
    from bricks.train.config import load_config
    from bricks.engine.report.trainer_view import trainer_view

    view = trainer_view(str(output / "shards"), "tiny-cpu", world_size=2, samples_per_second=4.0)
    config = load_config("tiny-cpu", for_training=False)
    buckets = Buckets(config.data.bucket_config, config.data.frame_interval)
    data = gather.read_output(str(output))
    keys = [buckets.assign(r["num_frames"], r["height"], r["width"], r["kind"] == "image",
                           seed=(config.train.seed, 0, r["sample_id"]))
            for r in (data.kept.row(i) for i in range(len(data.kept))) if r["text"]]
    expected = Counter(str(k) for k in keys if k is not None)
    assert {k: n for k, (n, _) in view.buckets.items()} == dict(expected)
    assert view.unfit == sum(k is None for k in keys)
    assert view.steps_per_epoch > 0
    assert view.gpu_hours == pytest.approx(view.bucketed / 4.0 / 3600 * 2)


def test_token_counts_with_the_tiny_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    counts = count_tokens(["abc", "x" * 30], "tiny", max_length=16)
    assert counts.lengths == [4, 31] and counts.cut == 1  # a byte each, and the end-of-text token
    missing = count_tokens(["abc"], str(tmp_path / "no-t5"))
    assert missing.lengths == [] and "does not exist" in missing.missing


def test_thumbnails_read_from_the_source_in_reference_mode(corpus):
    video = corpus[1][0].path
    rows = [{"sample_id": "a", "kind": "video", "source_uri": video, "path": video, "start_frame": 0, "end_frame": 30},
            {"sample_id": "b", "kind": "image", "source_uri": video, "start_frame": 5, "end_frame": 6},
            {"sample_id": "c", "kind": "video", "source_uri": video, "start_frame": 10**6, "end_frame": 10**6 + 9},
            {"sample_id": "d", "kind": "source", "source_uri": video}]
    made = thumbnails(None, rows)
    strip = cv2.imdecode(np.frombuffer(made["a"], np.uint8), cv2.IMREAD_COLOR)
    single = cv2.imdecode(np.frombuffer(made["b"], np.uint8), cv2.IMREAD_COLOR)
    assert strip.shape[0] == single.shape[0] == HEIGHT
    assert strip.shape[1] == 3 * single.shape[1] + 2 * 4  # three frames with two gaps
    assert "fewer frames" in made["c"] and "no frames" in made["d"]


def test_report_refuses_a_file_it_did_not_write(output, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    (copy / REPORT).write_text("<html>my own notes</html>")
    with pytest.raises(ReportError, match="not written by bricks-dj"):
        write_report(str(copy))
    assert (copy / REPORT).read_text() == "<html>my own notes</html>"


def test_overwrite_discards_its_own_report_and_whatif_only(output, tmp_path):
    """A report describes the run `--overwrite` discards (a run that then fails must not leave
    it); someone else's report.html stays."""
    from bricks.engine.output import prepare

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for copy in (ours, theirs):
        shutil.copytree(output, copy)
    (theirs / REPORT).write_text("<html>my own notes</html>")
    (ours / "whatif").mkdir()
    (ours / "whatif" / "manifest.json").write_text(json.dumps({"refilter": {}}))  # as refilter writes them
    shutil.copy(ours / REPORT, ours / "whatif" / REPORT)
    (theirs / "whatif").mkdir()
    (theirs / "whatif" / "manifest.json").write_text("{}")
    for copy in (ours, theirs):
        prepare(str(copy), "another recipe", overwrite=True)
    assert not (ours / REPORT).exists() and not (ours / "manifest.json").exists()
    assert not (ours / "whatif" / "manifest.json").exists() and not (ours / "whatif" / REPORT).exists()
    assert (theirs / REPORT).read_text() == "<html>my own notes</html>"
    assert (theirs / "whatif" / "manifest.json").read_text() == "{}"


def test_report_command(output, tmp_path):
    pytest.importorskip("torch")
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    result = CliRunner().invoke(main, ["report", str(copy), "--train-config", "tiny-cpu", "--world-size", "2",
                                       "--samples-per-second", "5", "--t5", "tiny"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(f"{copy}/{REPORT}")
    page = (copy / REPORT).read_text()
    assert "GPU-hours per epoch" in page and "would be cut by the trainer" in page
    bad = CliRunner().invoke(main, ["report", str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "not a bricks-dj output" in bad.output


def test_a_report_that_fails_keeps_the_run(corpus, tmp_path, monkeypatch, caplog):
    import bricks.engine.report as report

    def broken(*args, **kwargs):
        raise ReportError("no space for the report")

    monkeypatch.setattr(report, "write_report", broken)
    out = tmp_path / "out"
    run(from_dict({"input": str(corpus[1][0].path), "output": str(out), "executor": {"mode": "local"},
                   "process": [{"shot_split": {"min_scene_len": 15}}]}))
    manifest = _manifest(out)
    assert manifest["report"] == {"written": False, "reason": "no space for the report"}
    assert manifest["samples"]["total"] > 0 and not (out / REPORT).exists()
    assert "report not written: no space for the report" in caplog.text


# -- in a browser ---------------------------------------------------------------------------------

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")


def _chromium() -> tuple[str, str]:
    """Chromium and its driver, or a skip (a failure in CI, which installs them)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None or not _has_selenium():
        missing = "chromium" if browser is None else "chromedriver" if driver is None else "selenium"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{missing} is missing: CI installs chromium and chromium-driver and the test extra")
        pytest.skip(f"{missing} is not installed (apt-get install chromium chromium-driver)")
    return browser, driver


def _has_selenium() -> bool:
    return importlib.util.find_spec("selenium") is not None


def _artifacts() -> Path:
    folder = Path(os.environ.get("BRICKS_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_report_renders_in_chromium(output, tmp_path):
    browser, driver_path = _chromium()
    pytest.importorskip("torch")
    write_report(str(output), ReportOptions(train_config="tiny-cpu", samples_per_second=2.0, t5="tiny"))
    _check_in_chromium(browser, driver_path, output / REPORT, tmp_path / "profile", "report.png")


def test_the_demo_ends_with_a_report_that_renders_in_chromium(tmp_path):
    """`make demo` (`bricks-dj demo`, here in-process on 3 videos): the brickfilm recipe with
    tiny models ends with a report holding every section, the trainer's view included."""
    browser, driver_path = _chromium()
    pytest.importorskip("transformers")
    result = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path / "demo"), "--num-videos", "3", "--local"])
    assert result.exit_code == 0, result.output
    report = tmp_path / "demo" / "out" / REPORT
    assert f"report: {report} (with the buckets of bricks-train --config tiny-cpu)" in result.output
    page = report.read_text()
    for section in ("Funnel", "Scores", "Kept samples: distributions", "Trainer's view: tiny-cpu",
                    "4:motion_filter", "7:aesthetic_filter", "captions exceed model_max_length"):
        assert section in page, section
    _check_in_chromium(browser, driver_path, report, tmp_path / "profile", "demo-report.png")


def _check_in_chromium(browser: str, driver_path: str, report: Path, profile: Path, screenshot: str) -> None:
    """Loaded in headless Chromium: charts and thumbnails all load and are not blank, no
    console errors; a full-page screenshot goes to the test artefacts."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1200,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(report.as_uri())
        images = driver.find_elements("css selector", "img")
        charts = [i for i in images if "chart" in i.get_attribute("class")]
        thumbs = [i for i in images if "thumb" in i.get_attribute("class")]
        assert len(charts) >= 7 and len(thumbs) >= 8
        assert not driver.find_elements("css selector", ".missing"), "a thumbnail or chart is missing"
        for image in images:
            alt = image.get_attribute("alt")
            loaded = driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image)
            assert loaded and loaded > 0, f"{alt}: not loaded"
            driver.execute_script("arguments[0].scrollIntoView()", image)
            pixels = cv2.imdecode(np.frombuffer(image.screenshot_as_png, np.uint8), cv2.IMREAD_GRAYSCALE)
            assert pixels.size and pixels.std() > 3, f"{alt}: blank"
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1200, height)
        assert driver.save_screenshot(str(_artifacts() / screenshot))
    finally:
        driver.quit()
