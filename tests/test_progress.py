"""Progress during a run (frames decoded within the sources in flight, in-process and on Ray)
and output that never breaks inside a phrase, on a narrow terminal or into a pipe."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from rich.console import Console

from bricks.engine import live_frames
from bricks.engine.live_frames import FrameBoard
from bricks.engine.progress import RunProgress, print_summary
from bricks.engine.recipe import from_dict
from bricks.engine.run import run
from bricks.common.synthetic import ShotSpec, write_video

from conftest import write_recipe

LONG_FRAMES = 1200


@pytest.fixture(scope="module")
def long_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("long")
    write_video(folder / "long.mp4", [ShotSpec(300, static=False, seed=i) for i in range(LONG_FRAMES // 300)])
    return folder


class RecordingBoard(FrameBoard):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, int]] = []

    def update(self, uri: str, frames: int, expected: int) -> None:
        self.events.append(("update", frames))
        super().update(uri, frames, expected)

    def finish(self, uri: str) -> None:
        self.events.append(("finish", 0))
        super().finish(uri)


def long_run(tmp_path, folder, mode, board):
    recipe = from_dict({"input": str(folder), "output": str(tmp_path / "out"),
                        "executor": {"mode": mode, "num_cpus": 2}, "process": [{"shot_split": {}}]})
    return run(recipe, frames=board)


def test_frames_are_reported_while_a_source_decodes_in_process(tmp_path, long_source, monkeypatch):
    monkeypatch.setattr(live_frames, "REPORT_EVERY_S", 0.0)  # every CLOCK_EVERY_FRAMES frames
    board = RecordingBoard()
    manifest = long_run(tmp_path, long_source, "local", board)
    assert manifest["decode"]["frames"] == LONG_FRAMES
    updates = [frames for event, frames in board.events if event == "update"]
    assert updates == list(range(live_frames.CLOCK_EVERY_FRAMES, LONG_FRAMES + 1, live_frames.CLOCK_EVERY_FRAMES))
    assert board.events[-1] == ("finish", 0) and board.in_flight() == []


def test_frames_are_reported_from_ray_workers(tmp_path, long_source):
    board = FrameBoard()
    long_run(tmp_path, long_source, "ray", board)
    # Workers report once a second, the first time at the first CLOCK_EVERY_FRAMES frames.
    [(uri, frames)] = board.reported().items()
    assert uri.endswith("long.mp4") and live_frames.CLOCK_EVERY_FRAMES <= frames <= LONG_FRAMES
    assert board.in_flight() == []


def plain_console(width: int) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=width), out


def terminal_console(width: int) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, color_system=None, width=width), out


def test_plain_progress_shows_frames_in_flight_on_unbroken_lines():
    console, out = plain_console(40)
    display = RunProgress(console=console, interval=3600)
    display.start(2, 0)
    display.frames.update("/videos/a_rather_long_name.mp4", 1200, 4300)
    display.frames.update("/videos/b.mp4", 16, 0)
    display.line()
    display.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "processing 2 sources"
    assert lines[1].startswith("0/2 sources, 0 samples kept, 0 rejected, ")
    assert lines[1].endswith(", decoding 1200/4300 frames of a_rather_long_name.mp4, 16 frames of b.mp4")
    assert len(lines) == 2


def test_live_progress_breaks_between_phrases_at_40_columns():
    console, _ = terminal_console(40)
    display = RunProgress(console=console)
    display.total = 3
    display.frames.update("/videos/a.mp4", 1200, 4300)
    display.frames.update("/videos/b.mp4", 320, 900)
    lines = display._describe()
    assert all(len(line) <= 40 for line in lines)
    text = " ".join(line.strip().rstrip(",") for line in lines)
    for phrase in ("0/3 sources", "0 samples kept", "0 rejected", "frames/s", "decoding 1200/4300 frames of a.mp4",
                   "320/900 frames of b.mp4"):
        assert phrase in text


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("summary") / "out"
    return run(from_dict({"input": str(corpus[0]), "output": str(out), "executor": {"mode": "local"},
                          "process": [{"shot_split": {"min_scene_len": 15}}, {"motion_filter": {"min_score": 0.1}}]}))


def summary_phrases(manifest: dict) -> list[str]:
    s = manifest["sources"]
    return [f"bricks-dj: {manifest['samples']['total']} samples in {len(manifest['shards'])} shards",
            f"sources: {s['total']}", f"{s['kept']} kept", f"{s['dropped']} dropped", f"{s['failed']} failed",
            f"frames decoded: {manifest['decode']['frames']}", "1 motion_filter: ", "0 shot_split: "]


def test_summary_on_a_40_column_terminal_breaks_only_between_phrases(manifest):
    console, out = terminal_console(40)
    print_summary(manifest, "out/x", console)
    lines = out.getvalue().splitlines()
    assert all(len(line) <= 40 for line in lines), lines
    for phrase in summary_phrases(manifest):
        assert any(phrase in line for line in lines), (phrase, lines)


def test_summary_into_a_pipe_is_never_broken(manifest):
    console, out = plain_console(40)
    print_summary(manifest, "out/x", console)
    lines = out.getvalue().splitlines()
    s = manifest["sources"]
    assert f"sources: {s['total']}, {s['kept']} kept, {s['dropped']} dropped, {s['failed']} failed" in lines
    assert lines[-1] == "output: out/x" and len(lines) == 1 + len(manifest["ops"]) + 3


def test_summary_on_a_wide_terminal_is_a_table(manifest):
    console, out = terminal_console(120)
    print_summary(manifest, "out/x", console)
    assert "┃ operator" in out.getvalue()


def test_cli_output_into_a_pipe_with_40_columns_keeps_phrases_whole(tmp_path, corpus):
    recipe = write_recipe(tmp_path, [{"shot_split": {"min_scene_len": 15}}, {"motion_filter": {"min_score": 0.1}}],
                          input=corpus[0])
    proc = subprocess.run([sys.executable, "-m", "bricks.engine.cli", "run", str(recipe)], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "40"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    stdout = proc.stdout.splitlines()
    for phrase in summary_phrases(manifest):
        assert any(phrase in line for line in stdout), (phrase, proc.stdout)
    assert f"output: {tmp_path / 'out'}" in stdout
    done = [line for line in proc.stderr.splitlines() if line.startswith("3/3 sources, ")]
    assert len(done) == 1 and "samples kept" in done[0] and "frames/s" in done[0]
