"""The output on a local folder and on S3 (a moto server) alike: parts staged by workers,
commits as one ledger object each, resume after a kill at each point of a commit, the
lock, foreign files, `--overwrite`, errors as one line; and inputs listed from S3."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bricks.common.video import decode, probe
from bricks.engine.inputs import InputError, input_folders, list_sources
from bricks.engine.output import (LOCK, ObjectLock, OutputError, ShardWriter, check_location, claim,
                                  prepare, read_ledger, stage_part, write_manifest)
from bricks.engine.schema import rejects_schema, to_table
from bricks.engine.store import Store, open_store

from conftest import short_video

KEY = "recipe-key"


@dataclass
class Where:
    """An output location and plain access to what is in it, bypassing bricks."""

    out: str
    local: Path | None = None
    s3: Any = None
    prefix: str = ""

    def keys(self) -> list[str]:
        if self.local:
            return sorted(p.relative_to(self.local).as_posix() for p in self.local.rglob("*") if p.is_file())
        return self.s3.keys(self.prefix)

    def read(self, name: str) -> bytes:
        return (self.local / name).read_bytes() if self.local else self.s3.read(f"{self.prefix}/{name}")

    def put(self, name: str, data: bytes) -> None:
        if self.local:
            (self.local / name).parent.mkdir(parents=True, exist_ok=True)
            (self.local / name).write_bytes(data)
        else:
            self.s3.fs.pipe_file(f"{self.s3.bucket}/{self.prefix}/{name}", data)

    def delete(self, name: str) -> None:
        if self.local:
            (self.local / name).unlink()
        else:
            self.s3.fs.rm_file(f"{self.s3.bucket}/{self.prefix}/{name}")

    def rename(self, src: str, dst: str) -> None:
        if self.local:
            (self.local / src).rename(self.local / dst)
        else:
            self.s3.fs.mv(f"{self.s3.bucket}/{self.prefix}/{src}", f"{self.s3.bucket}/{self.prefix}/{dst}")


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> Where:
    if request.param == "local":
        return Where(str(tmp_path / "out"), local=tmp_path / "out")
    s3 = request.getfixturevalue("s3")
    return Where(s3.uri("runs/out"), s3=s3, prefix="runs/out")


def kept(source: str, n: int, kind: str = "video") -> pa.Table:
    return pa.table({"sample_id": [f"{Path(source).stem}-{i}" for i in range(n)], "kind": [kind] * n,
                     "source_uri": [source] * n, "start_frame": list(range(n))})


def rejects(source: str, n: int) -> pa.Table:
    return to_table([{"sample_id": f"{Path(source).stem}-r{i}", "kind": "video", "source_uri": source,
                      "status": "dropped", "op": "clip_length", "reason": "too short"} for i in range(n)],
                    rejects_schema())


def stats(source: str, frames: int = 10) -> dict[str, Any]:
    return {"uri": source, "status": "kept", "ops": {"shot_split": {"in": 1, "out": 1, "dropped": 0, "failed": 0,
                                                                     "seconds": 0.5}},
            "frames_decoded": frames, "decode_seconds": 0.25}


def add_source(writer: ShardWriter, out: str, source: str, rows: list[int], rejected: int = 0) -> list[dict]:
    """One finished source the way the engine hands it over: parts staged (by a worker), then added."""
    parts = [stage_part(out, kept(source, n).slice(0, n)) for n in rows]
    writer.add(source, parts, rejects(source, rejected), stats(source))
    return parts


def read_shard_ids(where: Where) -> list[str]:
    names = [k for k in where.keys() if k.startswith("shards/") and k.endswith(".parquet")]
    return sorted(i for k in names for i in pq.read_table(io.BytesIO(where.read(k))).column("sample_id").to_pylist())


def temp_keys(where: Where) -> list[str]:
    return [k for k in where.keys() if k.endswith(".bricks-tmp")]


class Killed(BaseException):
    """What a kill -9 at that point amounts to for the output: nothing after it happens."""


# --- commits ---------------------------------------------------------------------------------


def test_consecutive_small_parts_are_merged_into_one_shard_in_order(where):
    from bricks.engine.output import merge_parts

    progress = prepare(where.out, KEY, overwrite=False)
    writer = ShardWriter(where.out, progress, rows_per_shard=6, shard_bytes=1 << 30,
                         merge=lambda parts: merge_parts(where.out, parts))
    add_source(writer, where.out, "/v/a.mp4", [2])
    add_source(writer, where.out, "/v/b.mp4", [1, 2])
    add_source(writer, where.out, "/v/c.mp4", [3])  # 8 rows: the commit's parts over 6 rows make 2 shards
    writer.commit()
    shards = [k for k in where.keys() if k.startswith("shards/")]
    assert shards == ["shards/part-000000.parquet", "shards/part-000001.parquet"] and temp_keys(where) == []
    ids = [pq.read_table(io.BytesIO(where.read(k))).column("sample_id").to_pylist() for k in shards]
    assert ids == [["a-0", "a-1", "b-0", "b-0", "b-1"], ["c-0", "c-1", "c-2"]]
    entry = json.loads(where.read("_state/commits/00000.json"))
    assert [s["rows"] for s in entry["shards"]] == [5, 3] and entry["samples"]["video"] == 8
    assert prepare(where.out, KEY, overwrite=False).done_sources == {"/v/a.mp4", "/v/b.mp4", "/v/c.mp4"}


def test_a_large_part_is_not_merged(where):
    from bricks.engine.output import merge_parts

    progress = prepare(where.out, KEY, overwrite=False)
    merged = []
    writer = ShardWriter(where.out, progress, rows_per_shard=100, shard_bytes=4096,
                         merge=lambda parts: merged.append(len(parts)) or merge_parts(where.out, parts))
    add_source(writer, where.out, "/v/a.mp4", [1])
    big = [stage_part(where.out, kept("/v/b.mp4", 40))]
    big[0]["bytes"] = 4096  # as large as a shard: left alone
    writer.add("/v/b.mp4", big, rejects("/v/b.mp4", 0), stats("/v/b.mp4"))
    writer.commit()
    assert merged == [] and len([k for k in where.keys() if k.startswith("shards/")]) == 2


def test_a_commit_is_one_ledger_object_naming_staged_and_final_files(where):
    progress = prepare(where.out, KEY, overwrite=False)
    writer = ShardWriter(where.out, progress, rows_per_shard=5, shard_bytes=1 << 30)
    staged = add_source(writer, where.out, "/v/a.mp4", [2], rejected=1)
    assert [k for k in where.keys() if k.startswith("shards/")] == [staged[0]["staged"]]
    assert staged[0]["staged"].startswith("shards/.") and staged[0]["staged"].endswith(".parquet.bricks-tmp")
    assert staged[0]["rows"] == 2 and staged[0]["bytes"] == len(where.read(staged[0]["staged"]))
    assert staged[0]["samples"] == {"video": 2, "image": 0}
    add_source(writer, where.out, "/v/b.mp4", [3, 1])  # over rows_per_shard: commits both sources
    add_source(writer, where.out, "/v/c.mp4", [1])
    writer.commit()

    assert where.keys() == ["_state/commits/00000.json", "_state/commits/00001.json", "_state/run.json",
                            "rejects/part-00000.parquet", "shards/part-000000.parquet",
                            "shards/part-000001.parquet", "shards/part-000002.parquet",
                            "shards/part-000003.parquet"]
    first = json.loads(where.read("_state/commits/00000.json"))
    assert first["sources"] == ["/v/a.mp4", "/v/b.mp4"] and first["reject_files"] == ["rejects/part-00000.parquet"]
    assert [(s["file"], s["rows"]) for s in first["shards"]] == [
        ("shards/part-000000.parquet", 2), ("shards/part-000001.parquet", 3), ("shards/part-000002.parquet", 1)]
    assert first["shards"][0]["staged"] == staged[0]["staged"]
    assert first["samples"] == {"video": 6, "image": 0} and first["rejects"] == {"dropped": 1, "failed": 0}
    assert first["frames_decoded"] == 20 and first["source_status"] == {"kept": 2, "dropped": 0, "failed": 0}
    assert read_shard_ids(where) == sorted(["a-0", "a-1", "b-0", "b-1", "b-2", "b-0", "c-0"])

    resumed = prepare(where.out, KEY, overwrite=False)
    assert resumed.done_sources == {"/v/a.mp4", "/v/b.mp4", "/v/c.mp4"} and resumed.next_part == 2
    assert resumed.samples == {"video": 7, "image": 0} and resumed.ops["shot_split"].seconds == 1.5
    assert all("staged" not in s for s in resumed.shards)  # the manifest lists final names only
    assert [s["file"] for s in resumed.shards] == [s["file"] for s in progress.shards]


def test_stage_part_refuses_an_empty_table(where):
    prepare(where.out, KEY, overwrite=False)
    with pytest.raises(ValueError, match="stage_part: the table is empty"):
        stage_part(where.out, kept("/v/a.mp4", 0))


KILL_POINTS = ["before the ledger object", "before the moves", "half-moved", "copied, not deleted"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_commit_killed_at_any_point_resumes_without_loss_or_duplicates(where, monkeypatch, point):
    progress = prepare(where.out, KEY, overwrite=False)
    writer = ShardWriter(where.out, progress, rows_per_shard=100, shard_bytes=1 << 30)
    add_source(writer, where.out, "/v/a.mp4", [2], rejected=1)
    writer.commit()
    add_source(writer, where.out, "/v/b.mp4", [3, 2], rejected=2)

    real_write, real_move, moves = Store.write, Store.move, []

    def write(self, name, data):
        if point == "before the ledger object" and name.startswith("_state/commits/"):
            raise Killed
        return real_write(self, name, data)

    def move(self, src, dst):
        moves.append(dst)
        if point == "before the moves" or (point == "half-moved" and len(moves) == 2):
            raise Killed
        if point == "copied, not deleted":  # an object store's move is a copy, then a delete
            self.fs.cp_file(self.path(src), self.path(dst))
            raise Killed
        return real_move(self, src, dst)

    monkeypatch.setattr(Store, "write", write)
    monkeypatch.setattr(Store, "move", move)
    with pytest.raises(Killed):
        writer.commit()
    monkeypatch.undo()
    assert temp_keys(where), "the kill should leave staged files behind"

    resumed = prepare(where.out, KEY, overwrite=False)
    assert temp_keys(where) == []
    if point == "before the ledger object":  # the commit never happened: b is redone later
        assert resumed.done_sources == {"/v/a.mp4"} and resumed.next_part == 1
        assert read_shard_ids(where) == ["a-0", "a-1"]
        assert where.keys() == ["_state/commits/00000.json", "_state/run.json", "rejects/part-00000.parquet",
                                "shards/part-000000.parquet"]
    else:
        assert resumed.done_sources == {"/v/a.mp4", "/v/b.mp4"} and resumed.next_part == 2
        assert read_shard_ids(where) == sorted(["a-0", "a-1", "b-0", "b-1", "b-2", "b-0", "b-1"])
        assert "rejects/part-00001.parquet" in where.keys()
        assert resumed.samples["video"] == 7 and resumed.rejects["dropped"] == 3
    # The resumed run carries on where the ledger ends.
    writer = ShardWriter(where.out, resumed, rows_per_shard=100, shard_bytes=1 << 30)
    add_source(writer, where.out, "/v/c.mp4", [1])
    writer.commit()
    assert f"_state/commits/{resumed.next_part - 1:05d}.json" in where.keys()
    assert "c-0" in read_shard_ids(where) and temp_keys(where) == []


def test_a_part_staged_by_a_worker_that_was_killed_is_deleted(where):
    prepare(where.out, KEY, overwrite=False)
    orphan = stage_part(where.out, kept("/v/a.mp4", 2))  # never added: the run died first
    where.put("shards/.part-00099.parquet.tmp", b"an earlier version's temporary file")
    assert sorted(k for k in where.keys() if k.startswith("shards/")) == sorted(
        [orphan["staged"], "shards/.part-00099.parquet.tmp"])
    progress = prepare(where.out, KEY, overwrite=False)
    assert progress.done_sources == set()
    assert where.keys() == ["_state/run.json"]


def test_a_committed_file_that_is_gone_is_an_error(where):
    progress = prepare(where.out, KEY, overwrite=False)
    writer = ShardWriter(where.out, progress, rows_per_shard=1, shard_bytes=1 << 30)
    add_source(writer, where.out, "/v/a.mp4", [1])
    where.delete("shards/part-000000.parquet")
    with pytest.raises(OutputError, match="shards/part-000000.parquet is in the commit ledger but missing; "
                                          "use --overwrite"):
        prepare(where.out, KEY, overwrite=False)


def test_a_ledger_object_that_does_not_parse_is_an_error_naming_it(where):
    prepare(where.out, KEY, overwrite=False)
    where.put("_state/commits/00000.json", b'{"part": 0, "shards": [')
    with pytest.raises(OutputError, match=r"the ledger object .*_state/commits/00000.json is not a commit"):
        prepare(where.out, KEY, overwrite=False)


def test_ledger_objects_are_read_in_part_order(where):
    progress = prepare(where.out, KEY, overwrite=False)
    writer = ShardWriter(where.out, progress, rows_per_shard=1, shard_bytes=1 << 30)
    for k in range(3):
        add_source(writer, where.out, f"/v/{k}.mp4", [1])
    entry = json.loads(where.read("_state/commits/00002.json"))
    where.delete("_state/commits/00002.json")
    where.put("_state/commits/100000.json", json.dumps(dict(entry, part=100000)).encode())  # past 5 digits
    assert [e["part"] for e in read_ledger(where.out).entries] == [0, 1, 100000]


def test_an_earlier_versions_commits_jsonl_is_read_and_never_appended(where):
    where.put("_state/run.json", json.dumps({"recipe_key": KEY}).encode())
    table = io.BytesIO()
    pq.write_table(kept("/v/old.mp4", 2), table)
    where.put("shards/.part-00000.parquet.bricks-tmp", table.getvalue())  # committed, killed before its rename
    old = {"part": 0, "shards": [{"file": "shards/part-00000.parquet", "rows": 2, "bytes": len(table.getvalue())}],
           "reject_files": [], "sources": ["/v/old.mp4"], "source_status": {"kept": 1, "dropped": 0, "failed": 0},
           "samples": {"video": 2, "image": 0}, "rejects": {"dropped": 0, "failed": 0}, "ops": {},
           "frames_decoded": 5, "decode_seconds": 0.1}
    legacy = (json.dumps(old) + "\n" + json.dumps(dict(old, part=1))[:40]).encode()  # a torn last line
    where.put("_state/commits.jsonl", legacy)
    progress = prepare(where.out, KEY, overwrite=False)
    assert progress.done_sources == {"/v/old.mp4"} and progress.next_part == 1
    assert read_shard_ids(where) == ["old-0", "old-1"]
    writer = ShardWriter(where.out, progress, rows_per_shard=1, shard_bytes=1 << 30)
    add_source(writer, where.out, "/v/new.mp4", [1])
    assert where.read("_state/commits.jsonl") == legacy
    assert json.loads(where.read("_state/commits/00001.json"))["sources"] == ["/v/new.mp4"]
    assert prepare(where.out, KEY, overwrite=False).done_sources == {"/v/old.mp4", "/v/new.mp4"}


# --- the user's files ------------------------------------------------------------------------


def test_overwrite_deletes_only_what_bricks_wrote(where):
    progress = prepare(where.out, KEY, overwrite=False)
    writer = ShardWriter(where.out, progress, rows_per_shard=1, shard_bytes=1 << 30)
    add_source(writer, where.out, "/v/a.mp4", [2], rejected=1)
    stage_part(where.out, kept("/v/b.mp4", 1))  # staged, never committed
    write_manifest(where.out, {"shards": progress.shards})
    where.put("DATASET_CARD.md", b"the user's notes")
    where.put("notes/todo.txt", b"the user's folder")
    progress = prepare(where.out, "another-key", overwrite=True)
    assert progress.done_sources == set() and progress.next_part == 0
    assert where.keys() == ["DATASET_CARD.md", "_state/run.json", "notes/todo.txt"]
    assert where.read("DATASET_CARD.md") == b"the user's notes"
    assert json.loads(where.read("_state/run.json")) == {"recipe_key": "another-key"}


@pytest.mark.parametrize("foreign", ["shards/part-00007.parquet", "rejects/README", "_state/commits/notes.txt"])
def test_foreign_files_where_bricks_writes_are_refused_and_kept(where, foreign):
    progress = prepare(where.out, KEY, overwrite=False)
    add_source(ShardWriter(where.out, progress, rows_per_shard=1, shard_bytes=1 << 30), where.out, "/v/a.mp4", [1])
    where.put(foreign, b"not bricks'")
    before = {k: where.read(k) for k in where.keys()}
    for overwrite in (False, True):
        with pytest.raises(OutputError, match=f"holds files that bricks-dj did not write \\({foreign}\\)"):
            prepare(where.out, KEY, overwrite=overwrite)
        assert {k: where.read(k) for k in where.keys()} == before


def test_a_folder_that_is_not_a_bricks_output_is_refused_untouched(where):
    where.put("photos/a.jpg", b"jpeg")
    with pytest.raises(OutputError, match=r"is not empty and holds no bricks-dj run \(photos/\)"):
        with claim(where.out):
            pass
    assert where.keys() == ["photos/a.jpg"]


# --- the lock --------------------------------------------------------------------------------


def ended_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)


def test_claim_holds_the_lock_and_a_second_run_is_refused(where):
    with claim(where.out) as store:
        holder = json.loads(where.read(LOCK))
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert store.uri == where.out
        with pytest.raises(OutputError, match=f"is in use by another bricks-dj run \\(pid {os.getpid()} on host"):
            with claim(where.out):
                pass
        assert json.loads(where.read(LOCK)) == holder  # the refused run left it alone
    assert LOCK not in where.keys()


def test_a_stale_lock_on_this_host_is_taken_over(where, caplog):
    pid = ended_pid()
    where.put(LOCK, json.dumps({"pid": pid, "host": socket.gethostname(), "since": "2024-01-01T00:00:00+00:00"}).encode())
    with caplog.at_level(logging.WARNING, logger="bricks"):
        with claim(where.out):
            assert json.loads(where.read(LOCK))["pid"] == os.getpid()
    assert f"taking over the stale lock of pid {pid} on host {socket.gethostname()}" in caplog.text
    assert LOCK not in where.keys()


def test_a_lock_from_another_host_is_respected(where):
    other = {"pid": 4242, "host": "render-node-7", "since": "2024-01-01T00:00:00+00:00"}
    where.put(LOCK, json.dumps(other).encode())
    lock_file = f"{where.out}/{LOCK}"
    with pytest.raises(OutputError, match=f"is locked by pid 4242 on host render-node-7, since .*; if that run has ended, "
                                          f"delete {re.escape(lock_file)} and rerun$"):
        with claim(where.out):
            pass
    assert json.loads(where.read(LOCK)) == other


def test_two_runs_creating_the_s3_lock_at_once_get_one_holder(s3, monkeypatch):
    """The create is conditional (If-None-Match): a run that saw no lock, but was beaten to it,
    is refused rather than writing over the winner's lock."""
    store = open_store(s3.uri("out"))
    first = ObjectLock(store, LOCK)
    first.acquire()
    real_info, real_pipe, calls = store.fs.info, store.fs.pipe_file, []

    def info(path, **kwargs):  # the second run looked before the first run's lock was there
        calls.append("info")
        if len(calls) == 1:
            raise FileNotFoundError(path)
        return real_info(path, **kwargs)

    def pipe_file(path, data, **kwargs):
        calls.append(kwargs)
        return real_pipe(path, data, **kwargs)

    monkeypatch.setattr(store.fs, "info", info)
    monkeypatch.setattr(store.fs, "pipe_file", pipe_file)
    with pytest.raises(OutputError, match="is in use by another bricks-dj run"):
        ObjectLock(store, LOCK).acquire()
    monkeypatch.undo()
    assert calls[:3] == ["info", {"mode": "create"}, "info"]
    first.release()
    assert s3.keys("out") == []


def test_two_runs_taking_over_a_stale_s3_lock_at_once_get_one_holder(s3, monkeypatch):
    """The take-over is conditional on the stale lock's ETag (If-Match): the slower run is refused."""
    store = open_store(s3.uri("out"))
    stale = json.dumps({"pid": ended_pid(), "host": socket.gethostname()}).encode()
    s3.fs.pipe_file(f"{s3.bucket}/out/{LOCK}", stale)
    stale_info = s3.fs.info(f"{s3.bucket}/out/{LOCK}")
    first = ObjectLock(store, LOCK)
    first.acquire()
    real_info, real_cat, real_pipe, calls = store.fs.info, store.fs.cat_file, store.fs.pipe_file, []

    def info(path, **kwargs):  # the second run read the lock before the first took it over
        calls.append("info")
        return stale_info if calls.count("info") == 1 else real_info(path, **kwargs)

    def cat_file(path, **kwargs):
        return stale if calls.count("info") == 1 else real_cat(path, **kwargs)

    def pipe_file(path, data, **kwargs):
        calls.append(kwargs)
        return real_pipe(path, data, **kwargs)

    monkeypatch.setattr(store.fs, "info", info)
    monkeypatch.setattr(store.fs, "cat_file", cat_file)
    monkeypatch.setattr(store.fs, "pipe_file", pipe_file)
    with pytest.raises(OutputError, match=f"is in use by another bricks-dj run \\(pid {os.getpid()}"):
        ObjectLock(store, LOCK).acquire()
    monkeypatch.undo()
    assert calls[:3] == ["info", {"IfMatch": stale_info["ETag"]}, "info"]  # its take-over was refused
    assert json.loads(s3.read(f"out/{LOCK}"))["token"] == first._token
    first.release()


# --- where the output may be, and errors -----------------------------------------------------


def test_s3_locations_are_checked(s3):
    with pytest.raises(OutputError, match="^output s3://no-such-bucket/out: bucket no-such-bucket does not exist$"):
        check_location("s3://no-such-bucket/out")
    s3.fs.pipe_file(f"{s3.bucket}/a-file", b"x")
    with pytest.raises(OutputError, match="is an object, not a prefix"):
        check_location(s3.uri("a-file"))
    folders = input_folders([s3.uri("videos/"), s3.uri("more/*.mp4"), s3.uri("one.mp4"), s3.uri("list.txt")])
    assert folders == [s3.uri("videos"), s3.uri("more")]
    for out, message in [(s3.uri("videos"), "is the input folder"),
                         (s3.uri("videos/derived/out"), f"is inside the input folder {s3.uri('videos')}"),
                         (s3.uri("more/out"), f"is inside the input folder {s3.uri('more')}")]:
        with pytest.raises(OutputError, match=f"^output {out} {message}; choose an output folder outside the input$"):
            check_location(out, folders)
    check_location(s3.uri("videos-out"), folders)  # a sibling prefix, not inside
    check_location(s3.uri("out"), ["/local/videos"])


@pytest.mark.parametrize("uri, message", [
    ("gs://bucket/out", "gs:// is not supported; give a local or mounted folder, or s3://BUCKET/PREFIX"),
    ("memory://out", "memory:// is not supported"),
    ("s3://", "names no bucket"),
    (Path("s3://bucket/out"), r"^output s3:/bucket/out: a URI with its '//' collapsed \(made into a Path\?\)"),
])
def test_unsupported_outputs_are_one_line(uri, message):
    with pytest.raises(OutputError, match=message):
        check_location(uri)


def test_s3_write_errors_are_one_line(s3, monkeypatch):
    with pytest.raises(OutputError, match="^output s3://gone-bucket/out: bucket gone-bucket does not exist$"):
        write_manifest("s3://gone-bucket/out", {})

    def denied(*args, **kwargs):
        raise PermissionError("Access Denied")

    fs = open_store(s3.uri("out")).fs  # the instance bricks uses (s3fs keeps one per set of options)
    monkeypatch.setattr(fs, "pipe_file", denied)
    with pytest.raises(OutputError, match=f"^output {s3.uri('out')}: access denied \\(Access Denied\\); "
                                          "check the credentials"):
        write_manifest(s3.uri("out"), {})

    import botocore.exceptions

    def unreachable(*args, **kwargs):
        raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b/k")

    monkeypatch.setattr(fs, "pipe_file", unreachable)
    with pytest.raises(OutputError, match=f"^output {s3.uri('out')}: cannot reach the object store: Could not connect"):
        write_manifest(s3.uri("out"), {})


def test_a_full_disk_while_a_worker_stages_a_part_is_one_line(tmp_path, monkeypatch):
    import errno

    out = tmp_path / "out"
    prepare(out, KEY, overwrite=False)

    def no_space(table, where, **kwargs):
        where.write(b"PAR1 half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", no_space)
    with pytest.raises(OutputError, match=f"^no space left on /.* \\(writing {out}\\); rerun to resume$"):
        stage_part(str(out), kept("/v/a.mp4", 1))
    assert not list((out / "shards").iterdir()), "the part cut short is removed"


# --- inputs on S3 ----------------------------------------------------------------------------


def test_s3_folders_globs_and_lists_are_read_and_videos_decode_from_s3(s3, tmp_path):
    local = tmp_path / "videos"
    (local / "nested").mkdir(parents=True)
    truth = short_video(local / "a.mp4", shots=((12, False), (8, False)))
    short_video(local / "nested" / "b.mov", shots=((6, False),))
    (local / "notes.txt.bak").write_text("not a video")
    s3.upload(local, "videos")
    s3.fs.pipe_file(f"{s3.bucket}/lists/some.txt", b"# two of them\n../videos/a.mp4\ns3://%s/videos/nested/b.mov\n"
                    % s3.bucket.encode())

    assert list_sources(s3.uri("videos/")) == [s3.uri("videos/a.mp4"), s3.uri("videos/nested/b.mov")]
    assert list_sources(s3.uri("videos")) == list_sources(s3.uri("videos/"))
    assert list_sources(s3.uri("videos/*.mp4")) == [s3.uri("videos/a.mp4")]
    assert list_sources(s3.uri("videos/**/*.mov")) == [s3.uri("videos/nested/b.mov")]
    assert list_sources(s3.uri("lists/some.txt")) == [s3.uri("lists/../videos/a.mp4"), s3.uri("videos/nested/b.mov")]
    assert list_sources(s3.uri("videos/missing.mp4")) == [s3.uri("videos/missing.mp4")]  # fails at run time
    with pytest.raises(InputError, match="matched no video files"):
        list_sources(s3.uri("empty/"))
    with pytest.raises(InputError, match="^input s3://no-such-bucket/videos/: not found"):
        list_sources("s3://no-such-bucket/videos/")

    info = probe(s3.uri("videos/a.mp4"))
    assert (info.width, info.height) == (truth.width, truth.height)
    assert sum(1 for _ in decode(s3.uri("videos/a.mp4"))) == 20


def test_a_local_output_in_a_local_input_folder_is_still_refused(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    assert input_folders(str(videos)) == [str(videos)]
    with pytest.raises(OutputError, match="is inside the input folder"):
        check_location(str(videos / "out"), input_folders(str(videos)))
    check_location(str(tmp_path / "out"), input_folders([str(videos), "s3://bucket/videos/"]))
