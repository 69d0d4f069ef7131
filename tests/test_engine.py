"""Engine mechanics: Ray vs in-process, the frame buffer's fallback, frame requests, schema."""

from __future__ import annotations

import pyarrow as pa
import pytest

from bricks.engine.frames import request_indices, scaled_size
from bricks.engine.operator import FrameRequest
from bricks.engine.recipe import from_dict
from bricks.engine.run import run
from bricks.engine.schema import BASE_COLUMNS

from conftest import CPU_PROCESS, read_manifest, read_rejects, read_shards


def run_demo(tmp_path, corpus, name, **executor):
    out = tmp_path / name
    manifest = run(from_dict({"input": str(corpus[0]), "output": str(out), "executor": executor,
                              "process": CPU_PROCESS}))
    return read_shards(out), read_rejects(out), manifest


def test_ray_and_in_process_runs_give_the_same_shards(tmp_path, corpus):
    local, local_rejects, local_manifest = run_demo(tmp_path, corpus, "local", mode="local")
    ray_shards, ray_rejects, ray_manifest = run_demo(tmp_path, corpus, "ray", mode="ray", num_cpus=2)
    assert ray_shards.equals(local)
    assert ray_rejects.equals(local_rejects)
    def counts(manifest):
        return [{k: v for k, v in op.items() if k != "seconds"} for op in manifest["ops"]]

    assert counts(ray_manifest) == counts(local_manifest)


def test_overflowing_the_frame_buffer_decodes_the_shot_again(tmp_path, corpus):
    # 16 MB holds ~190 frames at 320x180: the 260-frame shot overflows and is served again
    # from a second, seeking decode; the results must not change.
    roomy, _, roomy_manifest = run_demo(tmp_path, corpus, "roomy", mode="local")
    tight, _, tight_manifest = run_demo(tmp_path, corpus, "tight", mode="local", frame_buffer_mb=16)
    assert tight.equals(roomy)
    corpus_frames = sum(t.num_frames for t in corpus[1])
    assert roomy_manifest["decode"]["frames"] == corpus_frames  # decoded exactly once
    assert tight_manifest["decode"]["frames"] > corpus_frames


def test_every_source_and_sample_is_accounted_for(tmp_path, corpus):
    shards, rejects, manifest = run_demo(tmp_path, corpus, "out", mode="local")
    sources = manifest["sources"]
    assert sources["total"] == 3 == sources["kept"] + sources["dropped"] + sources["failed"]
    ops = {op["name"]: op for op in manifest["ops"]}
    for name in ("resolution_filter", "fps_filter", "motion_filter"):
        assert ops[name]["in"] == ops[name]["out"] + ops[name]["dropped"] + ops[name]["failed"]
    # Shots in = clips out + dropped pieces; images = clips after the motion filter.
    assert ops["clip_length"]["in"] == ops["shot_split"]["out"]
    assert ops["motion_filter"]["in"] == ops["clip_length"]["out"]
    assert ops["middle_frame"]["out"] == 2 * ops["motion_filter"]["out"]
    assert manifest["samples"]["total"] == shards.num_rows
    assert manifest["rejects"]["dropped"] == rejects.num_rows
    assert sum(s["rows"] for s in manifest["shards"]) == shards.num_rows


def test_shard_schema_is_the_documented_contract(tmp_path, corpus):
    shards, _, manifest = run_demo(tmp_path, corpus, "out", mode="local")
    assert shards.schema.names == list(BASE_COLUMNS) + ["flow"]
    for name, dtype in BASE_COLUMNS.items():
        assert shards.schema.field(name).type == dtype
    assert shards.schema.metadata[b"bricks.schema_version"] == b"1"
    assert manifest["columns"]["flow"] == "double"
    for row in shards.to_pylist():
        assert row["num_frames"] == row["end_frame"] - row["start_frame"]
        assert row["aspect_ratio"] == pytest.approx(row["height"] / row["width"])
        assert row["resolution"] == row["height"] * row["width"]
        assert row["path"] == row["source_uri"]
        if row["kind"] == "video":
            assert row["end_time"] == pytest.approx(row["end_frame"] / 24, abs=1e-6)
            assert row["media"] is None and row["fps"] == 24
    files = [s["file"] for s in manifest["shards"]]
    assert files == sorted(files) and all(f.startswith("shards/part-") for f in files)


def test_shards_roll_over_at_rows_per_shard(tmp_path, corpus):
    out = tmp_path / "out"
    manifest = run(from_dict({"input": str(corpus[0]), "output": str(out),
                              "executor": {"mode": "local", "rows_per_shard": 4}, "process": [{"shot_split": {}}]}))
    rows = [s["rows"] for s in manifest["shards"]]
    assert len(rows) >= 3 and sum(rows) == read_shards(out).num_rows


@pytest.mark.parametrize("mode", ["local", "ray"])
def test_short_sources_share_shards(tmp_path, corpus, mode):
    # Each source's kept samples are staged apart; a commit merges the small ones into one shard.
    out = tmp_path / mode
    manifest = run(from_dict({"input": str(corpus[0]), "output": str(out), "process": [{"shot_split": {}}],
                              "executor": {"mode": mode, "num_cpus": 2}}))
    assert manifest["sources"]["done"] == 3 and [s["file"] for s in manifest["shards"]] == ["shards/part-000000.parquet"]
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["part-000000.parquet"]
    assert manifest["shards"][0]["rows"] == read_shards(out).num_rows == manifest["samples"]["video"]


@pytest.mark.parametrize("req, start, end, expected", [
    (FrameRequest("fractions", fractions=(0.2, 0.5, 0.8)), 10, 20, [12, 15, 18]),
    (FrameRequest("fractions", fractions=(0.5,)), 0, 1, [0]),
    (FrameRequest("fractions", fractions=(1.0,)), 0, 10, [9]),
    (FrameRequest("all"), 5, 8, [5, 6, 7]),
    (FrameRequest("fps", fps=2.0), 0, 60, [0, 12, 24, 36, 48]),
    (FrameRequest("fps", fps=2.0, min_count=2), 100, 105, [100, 104]),
])
def test_request_indices(req, start, end, expected):
    assert request_indices(req, start, end, fps=24.0) == expected


def test_scaled_size_keeps_aspect_and_never_upscales():
    assert scaled_size(1280, 720, 360) == (640, 360)
    assert scaled_size(720, 1280, 360) == (360, 640)
    assert scaled_size(320, 180, 360) == (320, 180)
    assert scaled_size(1920, 1080, None) == (1920, 1080)


def test_windows_settled_early_match_windows_cut_at_the_shot_end(tmp_path, corpus, monkeypatch):
    """clip_length windows are processed while their shot is still being decoded; the output
    must be that of waiting for the cut, with less memory held."""
    from bricks.engine.pipeline import process_source
    from bricks.engine.plan import build
    from bricks.operators import shot_split

    recipe = {"input": str(corpus[0]), "output": str(tmp_path / "unused"), "executor": {"mode": "local"},
              "process": [{"shot_split": {}}, {"clip_length": {"max_frames": 40, "trim_frames": 2}},
                          {"motion_filter": {}}, {"middle_frame": {}}]}
    plan = build(from_dict(recipe))
    early = [process_source(plan, t.path) for t in corpus[1]]

    start = shot_split.ShotSplit.start

    def never_settled(self, sample):
        tracker = start(self, sample)
        tracker.lag = None  # as if cuts could come any distance back: wait for every cut
        return tracker

    monkeypatch.setattr(shot_split.ShotSplit, "start", never_settled)
    late = [process_source(plan, t.path) for t in corpus[1]]
    for a, b in zip(early, late):
        assert [dict(s, _image=None) for s in a.kept] == [dict(s, _image=None) for s in b.kept]
        assert sorted(a.rejects, key=str) == sorted(b.rejects, key=str)
        assert {k: v.to_dict() | {"seconds": 0} for k, v in a.ops.items()} == \
            {k: v.to_dict() | {"seconds": 0} for k, v in b.ops.items()}
    # Video 0 has a 260-frame shot: early windows never hold all of it.
    assert early[0].buffer_peak_bytes < late[0].buffer_peak_bytes


SLOW_OP = '''
import threading
import time

from bricks.engine.operator import Mapper
from bricks.engine.registry import register

SPANS = []  # (instance, source, start, end), read by the test
LOCK = threading.Lock()


@register
class SlowNote(Mapper):
    name = "slow_note"
    description = "Sleep, then check that this instance saw no other source meanwhile."

    def process(self, sample, frames):
        self.current = sample["source_uri"]
        started = time.perf_counter()
        time.sleep(0.3)
        if self.current != sample["source_uri"]:
            raise RuntimeError("another source went through this instance meanwhile")
        with LOCK:
            SPANS.append((id(self), sample["source_uri"], started, time.perf_counter()))
        return sample
'''


def test_in_process_runs_overlap_sources_but_not_operator_instances(tmp_path, corpus):
    import sys

    (tmp_path / "slow_note_op.py").write_text(SLOW_OP)
    out = tmp_path / "out"
    manifest = run(from_dict({"input": str(corpus[0]), "output": str(out), "executor": {"mode": "local"},
                              "plugins": [str(tmp_path / "slow_note_op.py")], "process": [{"slow_note": {}}]}))
    assert manifest["sources"]["kept"] == 3 and manifest["sources"]["failed"] == 0
    spans = next(m for name, m in sys.modules.items() if name.endswith("slow_note_op")).SPANS
    assert len(spans) == 3
    overlapping = [(a, b) for a in spans for b in spans if a[1] < b[1] and a[2] < b[3] and b[2] < a[3]]
    assert overlapping, "sources were processed one at a time"
    assert all(a[0] != b[0] for a, b in overlapping)  # ... each by an instance of its own
    assert [row["source_uri"] for row in read_shards(out).to_pylist()] == sorted(s[1] for s in spans)
