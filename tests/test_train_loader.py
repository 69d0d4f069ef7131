"""The shard loader on `bricks-dj` output: pixels, workers, exact resume, data changes, bad samples."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")

from torch.utils.data import DataLoader  # noqa: E402

from bricks.train.buckets import Buckets  # noqa: E402
from bricks.train.decode import normalize  # noqa: E402
from bricks.train.loader import LoaderStateError, ShardDataset  # noqa: E402
from bricks.train.shards import ShardError, ShardIndex  # noqa: E402

# The corpus is 320x180: the 144p buckets (256x144 at 16:9).
BUCKETS = {"144p": {1: (1.0, 4), 8: (1.0, 2), 16: (1.0, 3)}}


def dataset(shards, streams=1, seed=0, **kwargs) -> ShardDataset:
    return ShardDataset(ShardIndex.build(shards), Buckets(BUCKETS, frame_interval=2), seed=seed, streams=streams,
                        **kwargs)


def batches(ds: ShardDataset, workers: int = 0) -> list[dict]:
    return list(DataLoader(ds, batch_size=None, num_workers=workers))


def test_batches_hold_every_sample_once_as_pixels(brick_shards):
    ds = dataset(brick_shards)
    plan = ds.set_epoch(0)
    out = batches(ds)
    ids = [i for b in out for i in b["sample_id"]]
    table = pq.read_table(brick_shards / "shards", columns=["sample_id", "kind", "text"])
    # Every row once, but those too short for any bucket (a 15-frame clip needs more than 8 x 2).
    assert len(ids) == len(set(ids)) == table.num_rows - plan.unassigned and set(ids) <= set(table["sample_id"].to_pylist())
    assert plan.unassigned == sum(1 for n in pq.read_table(brick_shards / "shards", columns=["num_frames"])
                                  ["num_frames"].to_pylist() if 1 < n <= 16)
    assert len(out) == plan.steps and not any(b["skipped"] for b in out)
    captions = dict(zip(table.column("sample_id").to_pylist(), table.column("text").to_pylist()))
    for b in out:
        T = b["num_frames"]
        assert b["video"].shape == (len(b["sample_id"]), 3, T, 144, 256) and (b["height"], b["width"]) == (144, 256)
        assert b["video"].dtype == torch.uint8
        pixels = normalize(b["video"])
        assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.std() > 0.05
        assert b["text"] == [captions[i] for i in b["sample_id"]]
        assert b["fps"].tolist() == [120.0 if T == 1 else 24.0] * len(b["sample_id"])
        assert len(b["sample_id"]) <= {1: 4, 8: 2, 16: 3}[T]


def test_worker_streams_give_the_in_process_order(brick_shards):
    ds = dataset(brick_shards, streams=2)
    in_process = batches(ds)
    with_workers = batches(ds, workers=2)
    assert [b["sample_id"] for b in with_workers] == [b["sample_id"] for b in in_process]
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(in_process, with_workers))


def test_ranks_share_the_epoch_without_overlap(brick_shards):
    ranks = [dataset(brick_shards, world_size=2, rank=r) for r in range(2)]
    out = [batches(ds) for ds in ranks]
    assert len(out[0]) == len(out[1]) == ranks[0].plan.steps
    ids = [i for rank in out for b in rank for i in b["sample_id"]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(brick_shards, workers):
    full = dataset(brick_shards, streams=2, seed=3)
    full.set_epoch(1)
    expected = batches(full, workers)
    first = dataset(brick_shards, streams=2, seed=3)
    first.set_epoch(1)
    taken = []
    for batch in DataLoader(first, batch_size=None, num_workers=workers):
        taken.append(batch)
        if len(taken) == 5:
            break
    state = first.state(consumed=5).to_dict()

    resumed = dataset(brick_shards, streams=2, seed=3)
    resumed.restore(state)
    rest = batches(resumed, workers)
    assert [b["sample_id"] for b in taken + rest] == [b["sample_id"] for b in expected]
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(taken + rest, expected))


def test_a_changed_data_set_is_refused_or_starts_the_next_epoch(brick_shards, tmp_path):
    ds = dataset(brick_shards)
    ds.set_epoch(2)
    state = ds.state(consumed=3).to_dict()
    shard = next((brick_shards / "shards").glob("*.parquet"))
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, table.num_rows - 2), tmp_path / "part-00000.parquet")
    changed = dataset(tmp_path)
    with pytest.raises(LoaderStateError, match="data set differs.*--allow-data-change"):
        changed.restore(state)
    changed.restore(state, allow_data_change=True)
    assert (changed.epoch, changed.consumed) == (3, 0)
    other_layout = dataset(brick_shards, streams=2)
    with pytest.raises(LoaderStateError, match="1 streams, this run has 0, 1 and 2"):
        other_layout.restore(state)


def test_bad_samples_are_skipped_and_counted(brick_shards, tmp_path):
    shard = next((brick_shards / "shards").glob("*.parquet"))
    rows = pq.read_table(shard).to_pylist()
    videos = [i for i, r in enumerate(rows) if r["kind"] == "video"]
    rows[videos[0]]["media"] = b"\x00\x01 not an mp4 at all" * 10
    rows[videos[1]]["media"] = rows[videos[1]]["media"][: len(rows[videos[1]]["media"]) // 3]  # truncated
    images = [i for i, r in enumerate(rows) if r["kind"] == "image"]
    rows[images[0]]["media"] = b"not a jpeg"
    bad_ids = {rows[i]["sample_id"] for i in (videos[0], videos[1], images[0])}
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(shard)), tmp_path / "part-00000.parquet")
    ds = dataset(tmp_path)
    out = batches(ds)
    skipped = {sid: reason for b in out for sid, reason in b["skipped"]}
    assert set(skipped) >= bad_ids - {rows[videos[1]]["sample_id"]}  # a truncated MP4 may still decode enough
    assert all(reason.startswith(("undecodable", "too few frames")) for reason in skipped.values())
    kept = [i for b in out for i in b["sample_id"]]
    assert len(kept) + len(skipped) == len(rows) - ds.plan.unassigned and not set(kept) & set(skipped)


def test_reference_mode_reads_the_source_files(reference_shards):
    ds = dataset(reference_shards)
    out = batches(ds)
    clips = [b for b in out if b["num_frames"] > 1]
    assert clips and not any(b["skipped"] for b in out)
    assert all(b["video"].shape[2:] == (b["num_frames"], 144, 256) for b in clips)


def test_missing_or_foreign_data_is_a_clear_error(tmp_path):
    with pytest.raises(ShardError, match="does not exist"):
        ShardIndex.build(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="no .parquet shards"):
        ShardIndex.build(str(tmp_path / "empty"))
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(ShardError, match="not a bricks shard"):
        ShardIndex.build(str(tmp_path / "other.parquet"))


def test_shards_copied_elsewhere_are_the_same_data(brick_shards, tmp_path):
    shutil.copytree(brick_shards / "shards", tmp_path / "shards")
    assert ShardIndex.build(str(tmp_path)).fingerprint == ShardIndex.build(str(brick_shards)).fingerprint
