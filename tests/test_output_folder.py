"""The output folder is the user's: foreign files are never deleted, one run at a time, and
write errors (a full disk, a folder that cannot be written) are one line that a rerun resumes."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from bricks.engine import output
from bricks.engine.cli import main
from bricks.engine.output import LOCK, OutputError, OutputLock, prepare

from conftest import read_manifest, read_shards, short_video, write_recipe

PROCESS = [{"shot_split": {"min_scene_len": 15}}]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    for i in range(3):
        short_video(folder / f"v{i}.mp4", shots=((20, False), (20, False)))
    return folder


def cli(recipe: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bricks.engine.cli", "run", str(recipe), "--local", *args],
                          capture_output=True, text=True)


def one_line_error(proc, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_that_is_not_a_bricks_output_is_refused_untouched(tmp_path, videos):
    out = tmp_path / "out"
    (out / "photos").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "photos" / "a.jpg").write_bytes(b"jpeg")
    before = snapshot(out)
    recipe = write_recipe(tmp_path, PROCESS, input=videos, output=out)
    for extra in ((), ("--overwrite",)):
        one_line_error(cli(recipe, *extra), f"output {out} is not empty and holds no bricks-dj run",
                       "notes.txt, photos/")
        assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["notes.txt", "photos"]


def test_foreign_files_where_bricks_writes_are_refused_and_kept(tmp_path, videos):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, PROCESS, input=videos, output=out)
    assert cli(recipe).returncode == 0
    other = pa.table({"x": [1, 2]})
    pq.write_table(other, out / "shards" / "part-00007.parquet")  # another data set's shard
    (out / "rejects" / "README").write_text("mine")
    before = snapshot(out)
    for extra in ((), ("--overwrite",)):
        one_line_error(cli(recipe, *extra), "holds files that bricks-dj did not write",
                       "rejects/README, shards/part-00007.parquet")
        assert snapshot(out) == before


def test_overwrite_deletes_only_what_bricks_wrote(tmp_path, videos):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, PROCESS, input=videos, output=out)
    assert cli(recipe).returncode == 0
    (out / "DATASET_CARD.md").write_text("the user's notes beside the shards")
    (out / "shards" / ".part-00003.parquet.bricks-tmp").write_bytes(b"left by a killed run")
    proc = cli(recipe, "--overwrite", "--set", "process.shot_split.threshold=30")
    assert proc.returncode == 0, proc.stderr
    assert (out / "DATASET_CARD.md").read_text() == "the user's notes beside the shards"
    assert not list(out.rglob("*bricks-tmp")) and not (out / LOCK).exists()
    assert read_manifest(out)["sources"]["skipped_as_done"] == 0 and read_manifest(out)["accounted"]


@pytest.mark.parametrize("where", ["same", "inside"])
def test_an_output_in_the_input_folder_is_refused(tmp_path, videos, where):
    import shutil

    folder = tmp_path / "videos"
    shutil.copytree(videos, folder)
    out = folder if where == "same" else folder / "derived" / "out"
    recipe = write_recipe(tmp_path, PROCESS, input=folder, output=out)
    one_line_error(cli(recipe), f"output {out} is", "input folder", "choose an output folder outside the input")
    validate = subprocess.run([sys.executable, "-m", "bricks.engine.cli", "validate", str(recipe)],
                              capture_output=True, text=True)
    one_line_error(validate, f"output {out} is", "input folder")
    assert not (folder / "derived").exists() and not (folder / "_state").exists()
    glob_recipe = write_recipe(tmp_path, PROCESS, input=f"{folder}/*.mp4", output=folder / "out")
    one_line_error(cli(glob_recipe), "is inside the input folder")


def test_an_output_that_is_a_file_or_inside_one_is_refused(tmp_path, videos):
    a_file = tmp_path / "out.parquet"
    a_file.write_bytes(b"not ours")
    one_line_error(cli(write_recipe(tmp_path, PROCESS, input=videos, output=a_file)), f"output {a_file} is a file")
    nested = a_file / "out"
    one_line_error(cli(write_recipe(tmp_path, PROCESS, input=videos, output=nested)),
                   f"output {nested} is inside {a_file}, which is a file")
    assert a_file.read_bytes() == b"not ours"


def test_an_output_that_cannot_be_written_is_one_line(tmp_path, videos, monkeypatch):
    out = tmp_path / "readonly" / "out"
    recipe = write_recipe(tmp_path, PROCESS, input=videos, output=out)
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):  # what a folder without write permission gives (as root chmod would not)
        if self == out:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    result = CliRunner().invoke(main, ["run", str(recipe), "--local"])
    assert result.exit_code == 2 and result.exception.__class__ is SystemExit
    assert result.stderr == f"bricks-dj: error: output {out}: cannot write {out}: Permission denied\n"


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` made read-only: by its mode, or for root (whom modes do not stop) by a
    read-only bind mount; skips where neither is possible."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield "Permission denied"
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode:
        pytest.skip("a read-only bind mount needs privileges")
    try:
        assert subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)]).returncode == 0
        yield "Read-only file system"
    finally:
        subprocess.run(["umount", str(folder)])


def test_a_read_only_output_folder_is_one_line(tmp_path, videos):
    out = tmp_path / "out"
    out.mkdir()
    with read_only(out) as reason:
        one_line_error(cli(write_recipe(tmp_path, PROCESS, input=videos, output=out)),
                       f"output {out}: cannot write {out / LOCK}: {reason}")


@pytest.mark.parametrize("failing", ["second commit", "manifest"])
def test_a_full_disk_is_one_line_and_the_rerun_resumes(tmp_path, videos, monkeypatch, failing):
    (tmp_path / "clean").mkdir()
    clean = write_recipe(tmp_path / "clean", PROCESS, input=videos, output=tmp_path / "clean" / "out")
    assert cli(clean).returncode == 0
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, PROCESS, input=videos, output=out, executor={"rows_per_shard": 1})

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "manifest":
        real_write = output.Store.write
        monkeypatch.setattr(output.Store, "write", lambda self, name, data: no_space() if name == "manifest.json"
                            else real_write(self, name, data))
    else:
        real_write_table = pq.write_table

        def write_table(table, where, **kwargs):  # the first commit goes down, then the disk is full
            second = any(uri.endswith("v1.mp4") for uri in table.column("source_uri").to_pylist())
            return no_space() if second else real_write_table(table, where, **kwargs)

        monkeypatch.setattr(pq, "write_table", write_table)
    result = CliRunner().invoke(main, ["run", str(recipe), "--local"])
    assert result.exit_code == 2, result.output
    error = result.stderr.splitlines()[-1]  # after the progress line
    assert "Traceback" not in result.stderr and error.startswith("bricks-dj: error: no space left on /")
    assert error.endswith(f" (writing {out}); rerun to resume")
    assert not list(out.rglob("*bricks-tmp")) and not (out / LOCK).exists()
    monkeypatch.undo()

    assert cli(recipe).returncode == 0
    manifest = read_manifest(out)
    assert manifest["accounted"] and manifest["sources"]["done"] == manifest["sources"]["total"] == 3
    assert manifest["sources"]["skipped_as_done"] == (3 if failing == "manifest" else 1)
    ids = read_shards(out).column("sample_id").to_pylist()
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(read_shards(tmp_path / "clean" / "out").column("sample_id").to_pylist())


def test_a_really_full_disk_resumes_once_there_is_space(tmp_path, videos):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs privileges")
    try:
        out = disk / "out"
        recipe = write_recipe(tmp_path, PROCESS + [{"encode_clips": {}}], input=videos, output=out,
                              executor={"rows_per_shard": 1})
        full = cli(recipe)
        assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
        assert full.stderr.splitlines()[-1] == f"bricks-dj: error: no space left on {disk} (writing {out}); rerun to resume"
        assert subprocess.run(["mount", "-o", "remount,size=4m", str(disk)]).returncode == 0
        assert cli(recipe).returncode == 0
        manifest = read_manifest(out)
        assert manifest["accounted"] and manifest["sources"]["done"] == 3 and manifest["sources"]["skipped_as_done"] >= 1
        ids = read_shards(out).column("sample_id").to_pylist()
        assert len(ids) == len(set(ids)) == manifest["samples"]["total"]
    finally:
        subprocess.run(["umount", str(disk)])


def test_a_commit_killed_before_its_renames_is_finished_not_redone(tmp_path, videos):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, PROCESS, input=videos, output=out, executor={"rows_per_shard": 1})
    assert cli(recipe).returncode == 0
    last = json.loads(sorted((out / "_state" / "commits").glob("*.json"))[-1].read_text())
    shard = out / last["shards"][0]["file"]
    before = shard.read_bytes()
    shard.rename(out / last["shards"][0]["staged"])  # the ledger object was down, the move had not happened
    assert cli(recipe).returncode == 0
    assert shard.read_bytes() == before and read_manifest(out)["sources"]["skipped_as_done"] == 3
    shard.unlink()  # a committed shard that someone deleted
    one_line_error(cli(recipe), f"{last['shards'][0]['file']} is in the commit ledger but missing")


def test_a_ledger_of_relative_sources_is_refused(tmp_path):
    out = tmp_path / "out"
    (out / "_state").mkdir(parents=True)
    (out / "_state" / "run.json").write_text(json.dumps({"recipe_key": "k"}))
    (out / "_state" / "commits.jsonl").write_text(json.dumps(
        {"part": 0, "shards": [], "reject_files": [], "sources": ["videos/a.mp4"]}) + "\n")
    with pytest.raises(OutputError, match=r"relative source paths \(such as videos/a.mp4\).*--overwrite"):
        prepare(out, "k", overwrite=False)


def test_a_second_run_on_a_busy_output_exits_2_naming_the_holder(tmp_path, videos):
    gate = tmp_path / "gate"
    plugin = tmp_path / "wait_for_gate.py"
    plugin.write_text(
        "import os, time\nfrom bricks.engine.operator import Mapper\nfrom bricks.engine.registry import register\n"
        "@register\nclass WaitForGate(Mapper):\n    name = 'wait_for_gate'\n    description = 'holds the run'\n"
        "    def process(self, sample, frames):\n"
        f"        while not os.path.exists({str(gate)!r}):\n            time.sleep(0.02)\n        return sample\n")
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, PROCESS + [{"wait_for_gate": {}}], input=videos, output=out,
                          plugins=[str(plugin)])
    first = subprocess.Popen([sys.executable, "-m", "bricks.engine.cli", "run", str(recipe), "--local"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / LOCK).exists() or not (out / LOCK).read_text():
            assert first.poll() is None and time.monotonic() < deadline, "the first run should hold the lock"
            time.sleep(0.02)
        second = cli(recipe)
        one_line_error(second, f"output {out} is in use by another bricks-dj run",
                       f"pid {first.pid} on host {socket.gethostname()}")
    finally:
        gate.touch()
        assert first.wait(timeout=60) == 0, first.stderr.read()
    ledger = sorted((out / "_state" / "commits").glob("*.json"))
    sources = [s for path in ledger for s in json.loads(path.read_text())["sources"]]
    assert len(sources) == len(set(sources)) == 3 and read_manifest(out)["accounted"]
    assert not (out / LOCK).exists()


def test_a_stale_lock_on_this_host_is_taken_over(tmp_path, videos):
    out = tmp_path / "out"
    out.mkdir()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK).write_text(json.dumps({"pid": int(ended.stdout), "host": socket.gethostname(),
                                        "since": "2024-01-01T00:00:00+00:00"}))
    proc = cli(write_recipe(tmp_path, PROCESS, input=videos, output=out))
    assert proc.returncode == 0, proc.stderr
    assert f"taking over the stale lock of pid {int(ended.stdout)}" in proc.stderr
    assert not (out / LOCK).exists() and read_manifest(out)["accounted"]


def test_a_lock_from_another_host_is_respected(tmp_path, videos):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": 4242, "host": "render-node-7", "since": "2024-01-01T00:00:00+00:00"}))
    one_line_error(cli(write_recipe(tmp_path, PROCESS, input=videos, output=out)),
                   "is locked by pid 4242 on host render-node-7", f"delete {out / LOCK}")
    assert json.loads((out / LOCK).read_text())["host"] == "render-node-7"


def test_the_lock_is_exclusive_within_a_process_too(tmp_path):
    first, second = OutputLock(tmp_path / LOCK), OutputLock(tmp_path / LOCK)
    first.acquire()
    try:
        with pytest.raises(OutputError, match=f"pid {os.getpid()} on host"):
            second.acquire()
    finally:
        first.release()
    second.acquire()
    second.release()
    assert not (tmp_path / LOCK).exists()
