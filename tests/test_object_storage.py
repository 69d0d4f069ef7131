"""`bricks-dj run` with its inputs and its output on S3 (moto's server on 127.0.0.1): the
shards, rejects and manifest land there; a run killed part-way resumes to the shards of a
clean local run."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import read_rejects, read_shards, write_recipe

PROCESS = [{"shot_split": {}}, {"clip_length": {"max_frames": 60}}, {"middle_frame": {}},
           {"encode_clips": {"short_side": 90}}]
COPIES = 6


def _cli(recipe, *args):
    return [sys.executable, "-m", "bricks.engine.cli", "run", str(recipe), *args]


def _table(s3, prefix: str) -> pa.Table:
    keys = [k for k in s3.keys(prefix) if k.endswith(".parquet") and not k.startswith(".")]
    return pa.concat_tables([pq.read_table(io.BytesIO(s3.read(f"{prefix}/{k}"))) for k in keys])


def _rows(table: pa.Table, local_root: str, s3_root: str) -> list[dict]:
    # x264's output is not bit-exact from one run to the next: media compared by presence.
    rows = []
    for row in table.to_pylist():
        row = dict(row, media=row["media"] is not None, sample_id=None,
                   source_uri=row["source_uri"].replace(s3_root, local_root),
                   path=row["path"].replace(s3_root, local_root) if row["path"] else None)
        rows.append(row)
    return sorted(rows, key=lambda r: (r["source_uri"], r["kind"], r["start_frame"]))


@pytest.fixture
def videos(tmp_path, corpus):
    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(COPIES):
        shutil.copy(corpus[1][i % len(corpus[1])].path, folder / f"v{i:02d}.mp4")
    return folder


@pytest.mark.parametrize("mode", ["local", "ray"])
def test_inputs_and_output_on_s3_survive_a_kill_and_resume(tmp_path, s3, videos, mode):
    inputs = s3.upload(videos, "videos")
    out = s3.uri("runs/brickfilm")
    recipe = write_recipe(tmp_path, PROCESS, input=inputs + "/", output=out,
                          executor={"mode": mode, "num_cpus": 2, "rows_per_shard": 1})
    proc = subprocess.Popen(_cli(recipe), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        commits = [k for k in s3.keys("runs/brickfilm") if k.startswith("_state/commits/")]
        if len(commits) >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if mode == "ray":  # the killed driver's Ray processes lose their parent; let them go
        time.sleep(1)
    before = [k for k in s3.keys("runs/brickfilm") if k.startswith("_state/commits/")]
    assert 2 <= len(before) < COPIES, "the run should have been killed part-way"
    assert ".bricks.lock" in s3.keys("runs/brickfilm")  # left by the killed run

    done = subprocess.run(_cli(recipe), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "taking over the stale lock" in done.stderr
    manifest = json.loads(s3.read("runs/brickfilm/manifest.json"))
    assert manifest["sources"]["done"] == COPIES and manifest["sources"]["skipped_as_done"] >= 2
    keys = s3.keys("runs/brickfilm")
    assert set(before) <= {k for k in keys if k.startswith("_state/commits/")}  # one object per commit
    assert not any("bricks-tmp" in k for k in keys) and ".bricks.lock" not in keys
    assert {s["file"] for s in manifest["shards"]} == {k for k in keys if k.startswith("shards/")}

    (tmp_path / "clean").mkdir()
    clean = write_recipe(tmp_path / "clean", PROCESS, input=videos, output=tmp_path / "clean" / "out")
    assert subprocess.run(_cli(clean), capture_output=True).returncode == 0
    shards = _table(s3, "runs/brickfilm/shards")
    ids = shards.column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)), "no sample may be written twice"
    assert _rows(shards, str(videos), inputs) == _rows(read_shards(tmp_path / "clean" / "out"), str(videos), inputs)
    rejects = _table(s3, "runs/brickfilm/rejects")
    assert rejects.num_rows == read_rejects(tmp_path / "clean" / "out").num_rows
