"""Resume: a run killed at any point finishes on rerun without redoing or duplicating work."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa

from conftest import read_manifest, read_rejects, read_shards, write_recipe

PROCESS = [{"shot_split": {}}, {"clip_length": {}}, {"motion_filter": {}}, {"middle_frame": {}},
           {"encode_clips": {"short_side": 90}}]


def copies(tmp_path, corpus, n):
    folder = tmp_path / "videos"
    folder.mkdir()
    truths = corpus[1]
    for i in range(n):
        shutil.copy(truths[i % len(truths)].path, folder / f"v{i:02d}.mp4")
    return folder


def cli(recipe, *args):
    return [sys.executable, "-m", "bricks.engine.cli", "run", str(recipe), "--local", *args]


def rows_by_id(table: pa.Table) -> dict:
    # Encoded bytes are left out: x264's output is not bit-exact from one run to the next.
    return {r["sample_id"]: dict(r, media=r["media"] is not None) for r in table.to_pylist()}


def test_kill_9_then_rerun_matches_a_clean_run(tmp_path, corpus):
    videos = copies(tmp_path, corpus, 8)
    killed = write_recipe(tmp_path, PROCESS, input=videos, output=tmp_path / "killed",
                          executor={"rows_per_shard": 1})
    ledger = tmp_path / "killed" / "_state" / "commits"
    proc = subprocess.Popen(cli(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and len(list(ledger.glob("*.json"))) < 2:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(ledger.glob("*.json")))
    assert 2 <= done_before < 8, "the run should have been killed part-way"

    assert subprocess.run(cli(killed), capture_output=True).returncode == 0
    manifest = read_manifest(tmp_path / "killed")
    assert manifest["sources"]["skipped_as_done"] >= 2 and manifest["sources"]["done"] == 8

    clean = write_recipe(tmp_path, PROCESS, input=videos, output=tmp_path / "clean")
    assert subprocess.run(cli(clean), capture_output=True).returncode == 0
    resumed, reference = read_shards(tmp_path / "killed"), read_shards(tmp_path / "clean")
    ids = resumed.column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)), "no sample may be written twice"
    assert rows_by_id(resumed) == rows_by_id(reference)
    assert sorted(read_rejects(tmp_path / "killed").column("sample_id").to_pylist()) == \
        sorted(read_rejects(tmp_path / "clean").column("sample_id").to_pylist())


def test_partial_files_and_uncommitted_parts_are_discarded(tmp_path, corpus):
    recipe = write_recipe(tmp_path, [{"shot_split": {}}], input=corpus[0], executor={"rows_per_shard": 1})
    assert subprocess.run(cli(recipe), capture_output=True).returncode == 0
    out = tmp_path / "out"
    objects = sorted((out / "_state" / "commits").glob("*.json"))
    lines = [path.read_text() for path in objects]
    # Killed before the last commit's ledger object was written: the commit's files are still
    # under their staged and temporary names. A temporary file of an earlier version too.
    last = json.loads(lines[-1])
    objects[-1].unlink()
    for shard in last["shards"]:
        (out / shard["file"]).rename(out / shard["staged"])
    for name in last["reject_files"]:
        (out / name).rename(out / name.replace("/", "/.", 1).replace(".parquet", ".parquet.bricks-tmp"))
    (out / "shards" / ".part-00099.parquet.tmp").write_bytes(b"partial")
    assert subprocess.run(cli(recipe), capture_output=True).returncode == 0
    manifest = read_manifest(out)
    assert manifest["sources"]["skipped_as_done"] == len(lines) - 1
    assert not list(out.glob("*/.*tmp")), "temporary files are removed"
    ids = read_shards(out).column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == manifest["samples"]["total"]
    # The forgotten commit's sources were processed again and committed once.
    assert set(last["sources"]) <= {r["source_uri"] for r in read_shards(out).to_pylist()}


def test_changed_recipe_is_refused_and_overwrite_starts_over(tmp_path, corpus):
    recipe = write_recipe(tmp_path, [{"shot_split": {}}], input=corpus[0])
    assert subprocess.run(cli(recipe), capture_output=True).returncode == 0
    changed = cli(recipe, "--set", "process.shot_split.threshold=30")
    proc = subprocess.run(changed, capture_output=True, text=True)
    assert proc.returncode == 2 and "holds a run of a different recipe" in proc.stderr
    assert subprocess.run(changed + ["--overwrite"], capture_output=True).returncode == 0
    assert read_manifest(tmp_path / "out")["sources"]["skipped_as_done"] == 0
