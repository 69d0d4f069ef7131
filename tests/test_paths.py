"""Paths: where relative recipe paths point, what shards record, and what an input folder lists."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bricks.engine.inputs import InputError, list_sources
from bricks.engine.recipe import load

from conftest import read_manifest, read_rejects, read_shards, short_video

CLI = [sys.executable, "-m", "bricks.engine.cli"]


@pytest.fixture(scope="module")
def two_videos(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("two")
    return [short_video(folder / f"v{i}.mp4", shots=((20, False), (20, False))).path for i in range(2)]


def project(tmp_path: Path, videos: list[Path], **recipe) -> Path:
    """tmp_path/proj/recipe.yaml with relative `input: videos` and `output: out`."""
    proj = tmp_path / "proj"
    (proj / "videos").mkdir(parents=True)
    for video in videos:
        shutil.copy(video, proj / "videos" / Path(video).name)
    body = {"input": "videos", "output": "out", "executor": {"mode": "local"},
            "process": [{"shot_split": {"min_scene_len": 15}}], **recipe}
    (proj / "recipe.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    return proj


def bricks_dj(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, cwd=cwd)


def test_validate_gives_the_same_answer_from_any_folder(tmp_path, two_videos):
    proj = project(tmp_path, two_videos)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    answers = {bricks_dj("validate", proj / "recipe.yaml", cwd=cwd).stdout for cwd in (proj, tmp_path, elsewhere)}
    assert answers == {f"{proj / 'recipe.yaml'}: ok (2 sources; shot_split)\n"}


def test_file_paths_resolve_against_the_recipe_and_set_paths_against_the_cwd(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "recipe.yaml").write_text(yaml.safe_dump(
        {"input": ["videos", "~/clips", "s3://bucket/raw/"], "output": "../out/./a", "process": [{"shot_split": {}}]}))
    monkeypatch.chdir(tmp_path)
    recipe = load("proj/recipe.yaml")
    assert recipe.model.input == [str(proj / "videos"), os.path.expanduser("~/clips"), "s3://bucket/raw/"]
    assert recipe.model.output == str(tmp_path / "out" / "a")
    recipe = load(proj / "recipe.yaml", ["input=mine", "output=o"])
    assert (recipe.model.input, recipe.model.output) == (str(tmp_path / "mine"), str(tmp_path / "o"))
    # An override of one list item: that item is the caller's, the others stay the recipe's.
    recipe = load(proj / "recipe.yaml", ["input.2=more"])
    assert recipe.model.input[0] == str(proj / "videos") and recipe.model.input[2] == str(tmp_path / "more")


def test_runs_from_different_folders_give_the_same_shards_with_absolute_paths(tmp_path, two_videos):
    proj = project(tmp_path, two_videos)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert bricks_dj("run", "recipe.yaml", "--local", cwd=proj).returncode == 0
    moved = bricks_dj("run", proj / "recipe.yaml", "--local", "--set", "output=from-elsewhere", cwd=elsewhere)
    assert moved.returncode == 0, moved.stderr
    here, there = read_shards(proj / "out"), read_shards(elsewhere / "from-elsewhere")
    assert here.column("sample_id").to_pylist() == there.column("sample_id").to_pylist()
    expected = {str(proj / "videos" / Path(v).name) for v in two_videos}
    for table in (here, there):
        assert set(table.column("source_uri").to_pylist()) == expected
        assert table.column("path").to_pylist() == table.column("source_uri").to_pylist()
    assert read_manifest(proj / "out")["recipe"]["input"] == str(proj / "videos")


def test_set_input_resolves_against_the_current_folder(tmp_path, two_videos):
    proj = project(tmp_path, two_videos[:1])
    cwd = tmp_path / "work"
    (cwd / "vids").mkdir(parents=True)
    for video in two_videos:
        shutil.copy(video, cwd / "vids" / Path(video).name)
    proc = bricks_dj("validate", proj / "recipe.yaml", "--set", "input=vids", cwd=cwd)
    assert proc.returncode == 0 and "ok (2 sources" in proc.stdout, proc.stderr


def test_list_file_entries_are_relative_to_the_list(tmp_path, two_videos, monkeypatch):
    lists = tmp_path / "lists"
    lists.mkdir()
    shutil.copy(two_videos[0], tmp_path / "a.mp4")
    (lists / "videos.txt").write_text("../a.mp4\n# a comment\n")
    monkeypatch.chdir(lists)
    assert list_sources("videos.txt") == [str(tmp_path / "a.mp4")]
    monkeypatch.chdir(tmp_path)
    assert list_sources("lists/videos.txt") == [str(tmp_path / "a.mp4")]
    assert list_sources(["./lists/videos.txt", "a.mp4"]) == [str(tmp_path / "a.mp4")]


def test_broken_and_looping_symlinks_in_an_input_folder_are_rejects(tmp_path, two_videos):
    videos = tmp_path / "videos"
    (videos / "more").mkdir(parents=True)
    shutil.copy(two_videos[0], videos / "good.mp4")
    (videos / "gone.mp4").symlink_to("missing.mp4")
    (videos / "loop-a.mp4").symlink_to("loop-b.mp4")
    (videos / "loop-b.mp4").symlink_to("loop-a.mp4")
    (videos / "more" / "up").symlink_to("..")  # a folder loop: walked once, not forever
    (videos / "old-shoot").symlink_to(tmp_path / "unmounted-disk")  # a folder that is not there
    (videos / "notes.txt").symlink_to("missing.txt")  # not named like a video: not a source
    linked = tmp_path / "linked"
    linked.mkdir()
    shutil.copy(two_videos[1], linked / "other.mp4")
    (videos / "more" / "linked").symlink_to(linked)  # a symlinked folder is followed

    sources = list_sources(str(videos))
    assert sorted(Path(s).name for s in sources) == ["gone.mp4", "good.mp4", "loop-a.mp4", "loop-b.mp4",
                                                      "old-shoot", "other.mp4"]
    out = tmp_path / "out"
    proc = bricks_dj("run", _recipe(tmp_path, videos, out), "--local", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    reasons = {Path(r["source_uri"]).name: r["reason"] for r in read_rejects(out).to_pylist() if r["op"] == "read"}
    assert reasons == {"gone.mp4": "broken symlink -> missing.mp4", "loop-a.mp4": "symlink loop",
                       "loop-b.mp4": "symlink loop", "old-shoot": f"broken symlink -> {tmp_path / 'unmounted-disk'}"}
    manifest = read_manifest(out)
    assert manifest["sources"]["total"] == 6 and manifest["sources"]["failed"] == 4 and manifest["accounted"]
    assert {Path(u).name for u in read_shards(out).column("source_uri").to_pylist()} == {"good.mp4", "other.mp4"}


def test_a_broken_symlink_given_as_input_says_so(tmp_path):
    (tmp_path / "clip.mp4").symlink_to("elsewhere.mp4")
    with pytest.raises(InputError, match=r"clip.mp4: broken symlink -> elsewhere.mp4"):
        list_sources(str(tmp_path / "clip.mp4"))


def test_an_unreadable_folder_in_the_input_stops_with_one_line(tmp_path, two_videos, monkeypatch):
    (tmp_path / "videos" / "locked").mkdir(parents=True)
    shutil.copy(two_videos[0], tmp_path / "videos" / "a.mp4")
    real_scandir = os.scandir

    def scandir(path="."):  # as for a folder without read permission (the tests may run as root)
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(InputError, match=r"input folder .*locked: cannot be read: Permission denied"):
        list_sources(str(tmp_path / "videos"))


@pytest.mark.parametrize("name", ["clips.tsv", "clips.parquet", "s3://bucket/clips.json"])
def test_unread_data_set_files_as_input_are_refused_before_any_work(tmp_path, name):
    if "://" not in name:
        (tmp_path / name).write_text("path,text\na.mp4,a caption\n")
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, name if "://" in name else tmp_path / name, out)
    for command in ("validate", "run"):
        proc = bricks_dj(command, recipe, "--local" if command == "run" else "--set=name=x", cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and "data-set files are not read" in proc.stderr
    assert not out.exists()


def _recipe(folder: Path, input, out: Path) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"input": str(input), "output": str(out), "executor": {"mode": "local"},
                                    "process": [{"shot_split": {"min_scene_len": 15}}]}))
    return path
