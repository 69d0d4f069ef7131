"""Buckets as Open-Sora 1.1 defines them, and the epoch plan that deals batches to ranks."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from bricks.train.buckets import BucketConfigError, BucketKey, Buckets
from bricks.train.plan import SLICES_PER_UNIT, merge_round_robin, plan_epoch
from bricks.train.shards import ShardIndex

TEXT2BRICKS_64F = {"360p": {1: (1.0, 256), 32: (1.0, 8), 64: (1.0, 4)}}


def test_text2bricks_buckets():
    buckets = Buckets(TEXT2BRICKS_64F, frame_interval=2)
    # 720p 16:9 clips: the longest T with more than T * frame_interval frames.
    assert buckets.assign(200, 720, 1280, False, seed=0) == BucketKey("360p", 64, "0.56")
    assert buckets.assign(129, 720, 1280, False, seed=0) == BucketKey("360p", 64, "0.56")
    assert buckets.assign(128, 720, 1280, False, seed=0) == BucketKey("360p", 32, "0.56")
    assert buckets.assign(64, 720, 1280, False, seed=0) is None  # not more than 32 x 2
    assert buckets.assign(1, 720, 1280, True, seed=0) == BucketKey("360p", 1, "0.56")
    # At least 0.8x the pixels of 360p (230,400): 184,320.
    assert buckets.assign(200, 320, 576, False, seed=0) == BucketKey("360p", 64, "0.56")
    assert buckets.assign(200, 300, 533, False, seed=0) is None
    assert buckets.frame_size(BucketKey("360p", 32, "0.56")) == (32, 360, 640)
    assert buckets.batch_size(BucketKey("360p", 1, "0.56")) == 256
    # Portrait footage gets the portrait size.
    assert buckets.frame_size(buckets.assign(200, 1280, 720, False, seed=0)) == (64, 640, 360)


def test_keep_prob_falls_through_to_the_next_resolution():
    buckets = Buckets({"480p": {16: (0.3, 2)}, "240p": {16: (1.0, 4)}}, frame_interval=1)
    keys = Counter(buckets.assign(100, 720, 1280, False, seed=("s", i)).resolution for i in range(2000))
    assert 0.25 < keys["480p"] / 2000 < 0.35 and keys["480p"] + keys["240p"] == 2000
    assert buckets.assign(100, 720, 1280, False, seed=7) == buckets.assign(100, 720, 1280, False, seed=7)


def test_bucket_config_errors_name_the_entry():
    with pytest.raises(BucketConfigError, match="unknown resolution '361p'"):
        Buckets({"361p": {16: (1.0, 2)}})
    with pytest.raises(BucketConfigError, match=r"bucket_config.360p.16: expected \[keep_prob, batch_size\]"):
        Buckets({"360p": {16: 2}})
    assert Buckets({"360p": {"16": [1.0, 2]}}).config == {"360p": {16: (1.0, 2)}}  # as YAML gives it


def fake_index(rows_per_group=(5, 7, 3, 6, 4, 8), frames=(40, 20, 1)) -> ShardIndex:
    n = sum(rows_per_group)
    group = np.concatenate([np.full(k, g) for g, k in enumerate(rows_per_group)]).astype(np.int32)
    row = np.concatenate([np.arange(k) for k in rows_per_group]).astype(np.int32)
    num_frames = np.array([frames[i % len(frames)] for i in range(n)])
    return ShardIndex(files=["a.parquet"], file=np.zeros(n, np.int32), row_group=group, row=row,
                      sample_id=np.array([f"id{i}" for i in range(n)], dtype=object),
                      is_image=num_frames == 1, num_frames=num_frames, height=np.full(n, 180),
                      width=np.full(n, 320), usable=np.ones(n, bool), fingerprint="x")


BUCKETS = {"144p": {1: (1.0, 3), 8: (1.0, 2), 16: (1.0, 2)}}


@pytest.mark.parametrize("world_size,streams", [(1, 1), (2, 1), (2, 3), (3, 2)])
def test_every_sample_once_whole_buckets_and_equal_steps(world_size, streams):
    index, buckets = fake_index(), Buckets(BUCKETS, frame_interval=2)
    plans = [plan_epoch(index, buckets, seed=1, epoch=0, world_size=world_size, rank=r, streams=streams)
             for r in range(world_size)]
    seen = []
    for plan in plans:
        assert plan.steps == min(sum(len(s) for s in p.streams) for p in plans)
        for stream in plan.streams:
            for batch in stream:
                assert len(batch.rows) <= buckets.batch_size(batch.bucket)
                assert {BucketKey("144p", 16 if index.num_frames[i] == 40 else 8 if index.num_frames[i] == 20 else 1,
                                  "0.56") for i in batch.rows} == {batch.bucket}
                seen += batch.rows
    # A row group is read by one stream, or by as many as it was cut into slices when there are
    # too few row groups for every stream to get several.
    readers: dict[int, set] = {}
    for r, plan in enumerate(plans):
        for s, stream in enumerate(plan.streams):
            for batch in stream:
                for i in batch.rows:
                    readers.setdefault(int(index.row_group[i]), set()).add((r, s))
    pieces = math.ceil(SLICES_PER_UNIT * world_size * streams / 6)
    assert max(len(r) for r in readers.values()) <= pieces
    if pieces == 1:
        assert all(len(r) == 1 for r in readers.values())
    assert sorted(seen) == list(range(len(index)))  # every sample exactly once


def test_a_single_row_group_is_shared_between_ranks():
    index, buckets = fake_index(rows_per_group=(40,)), Buckets(BUCKETS, frame_interval=2)
    plans = [plan_epoch(index, buckets, seed=1, epoch=0, world_size=2, rank=r, streams=2) for r in range(2)]
    assert all(plan.steps >= 3 for plan in plans)
    rows = [i for plan in plans for stream in plan.streams for batch in stream for i in batch.rows]
    assert sorted(rows) == list(range(40))


def test_plans_are_deterministic_and_change_with_the_epoch():
    index, buckets = fake_index(), Buckets(BUCKETS, frame_interval=2)
    a = plan_epoch(index, buckets, seed=1, epoch=0, world_size=2, rank=1, streams=2)
    b = plan_epoch(index, buckets, seed=1, epoch=0, world_size=2, rank=1, streams=2)
    c = plan_epoch(index, buckets, seed=1, epoch=1, world_size=2, rank=1, streams=2)
    assert a.streams == b.streams and a.streams != c.streams


def test_round_robin_merge_and_resume_point():
    assert merge_round_robin([2, 0, 3]) == [(0, 0), (2, 0), (0, 1), (2, 1), (2, 2)]
    index, buckets = fake_index(), Buckets(BUCKETS, frame_interval=2)
    plan = plan_epoch(index, buckets, seed=0, epoch=0, streams=3)
    order = plan.merged()
    for consumed in range(len(order)):
        done, following = plan.resume_point(consumed)
        assert sum(done) == consumed and following == order[consumed][0]
