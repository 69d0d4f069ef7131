"""The epoch plan: which batches each rank trains on, in which order, decided from metadata alone.

Every process computes the same plan from the shard index, the seed and the epoch:

1. each usable sample gets its bucket (with the keep_prob draws seeded by sample id);
2. row groups are shuffled and dealt to `world_size x streams` units, each to the unit with
   the fewest rows so far, so every row group is read by exactly one loader worker; when
   there are fewer than `SLICES_PER_UNIT` row groups per unit, they are cut into slices of
   consecutive rows first (a row group is then read by as many workers as it has slices, each
   keeping only its own rows);
3. each unit reads its slices in order (rows shuffled within one) and emits a batch
   whenever a bucket has `batch_size` samples; what is left at the end goes out as smaller
   batches, so no sample is dropped or repeated;
4. a rank's streams are merged round robin, skipping exhausted ones (what a DataLoader does
   with one stream per worker), and every rank stops after the fewest batches any rank has,
   so that all ranks take the same number of steps.

A position in the merged order (batches consumed) is the loader's whole state: from it the
plan tells how far each stream got and which stream is next, so a resumed run sees exactly
the batches it would have seen.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .buckets import BucketKey, Buckets, stable_seed
from .latents import parse_bucket
from .shards import ShardIndex

SLICES_PER_UNIT = 4  # row-group slices each rank x worker should get, at least


@dataclass(frozen=True)
class Batch:
    bucket: BucketKey
    rows: tuple[int, ...]  # indices into the ShardIndex


@dataclass
class EpochPlan:
    epoch: int
    streams: list[list[Batch]]  # this rank's, one per loader worker
    steps: int  # batches every rank takes this epoch
    dropped_batches: int  # this rank's batches beyond `steps` (to keep ranks in step)
    unassigned: int  # usable samples that fit no bucket
    bucket_counts: dict[BucketKey, int] = field(default_factory=dict)  # samples per bucket, all ranks

    def merged(self) -> list[tuple[int, int]]:
        """(stream, index in stream) of each batch, in training order, cut to `steps`."""
        return merge_round_robin([len(s) for s in self.streams])[: self.steps]

    def resume_point(self, consumed: int) -> tuple[list[int], int]:
        """After `consumed` batches: how many each stream has given, and the stream to ask next."""
        order = merge_round_robin([len(s) for s in self.streams])
        done = [0] * len(self.streams)
        for stream, _ in order[:consumed]:
            done[stream] += 1
        following = order[consumed][0] if consumed < len(order) else 0
        return done, following


def merge_round_robin(lengths: list[int]) -> list[tuple[int, int]]:
    order, position = [], [0] * len(lengths)
    while True:
        progressed = False
        for s, n in enumerate(lengths):
            if position[s] < n:
                order.append((s, position[s]))
                position[s] += 1
                progressed = True
        if not progressed:
            return order


def assign_buckets(index: ShardIndex, buckets: Buckets, seed: int, epoch: int) -> list[BucketKey | None]:
    """Each row's bucket this epoch; a row with a stored latent (checked against the config by
    `latents.check_latents`) keeps the bucket it was encoded for."""
    keys: list[BucketKey | None] = []
    stored: dict[str, BucketKey] = {}
    for i in range(len(index)):
        if not index.usable[i]:
            keys.append(None)
            continue
        if index.latent_bucket is not None and index.latent_bucket[i] is not None:
            text = index.latent_bucket[i]
            if text not in stored:
                stored[text] = parse_bucket(text)
            keys.append(stored[text])
            continue
        keys.append(buckets.assign(int(index.num_frames[i]), int(index.height[i]), int(index.width[i]),
                                   bool(index.is_image[i]), seed=(seed, epoch, index.sample_id[i])))
    return keys


def plan_epoch(index: ShardIndex, buckets: Buckets, *, seed: int, epoch: int, world_size: int = 1, rank: int = 0,
               streams: int = 1) -> EpochPlan:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    streams = max(streams, 1)
    keys = assign_buckets(index, buckets, seed, epoch)
    by_group: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        if key is not None:
            by_group[(int(index.file[i]), int(index.row_group[i]))].append(i)
    # Deal slices of row groups: whole row groups when there are plenty, so each is read by one
    # worker only; cut into slices when there are too few for every unit to get several, which
    # would leave units empty or far apart in load (all ranks stop at the smallest).
    pieces = max(1, math.ceil(SLICES_PER_UNIT * world_size * streams / max(len(by_group), 1)))
    slices = [((*group, j), [int(i) for i in part])
              for group in sorted(by_group)
              for j, part in enumerate(np.array_split(by_group[group], min(pieces, len(by_group[group]))))]
    rng = np.random.default_rng(stable_seed("row-groups", seed, epoch))
    slices = [slices[i] for i in rng.permutation(len(slices))]

    units = world_size * streams
    owned: list[list[tuple]] = [[] for _ in range(units)]
    load = [0] * units
    for piece in slices:
        unit = min(range(units), key=lambda u: (load[u], u))
        owned[unit].append(piece)
        load[unit] += len(piece[1])

    unit_batches = [_stream(owned[u], keys, buckets, seed, epoch) for u in range(units)]
    per_rank = [sum(len(unit_batches[r * streams + s]) for s in range(streams)) for r in range(world_size)]
    steps = min(per_rank)
    mine = unit_batches[rank * streams:(rank + 1) * streams]
    counts: dict[BucketKey, int] = defaultdict(int)
    for key in keys:
        if key is not None:
            counts[key] += 1
    unassigned = int(sum(1 for i, k in enumerate(keys) if k is None and index.usable[i]))
    return EpochPlan(epoch=epoch, streams=mine, steps=steps, dropped_batches=per_rank[rank] - steps,
                     unassigned=unassigned, bucket_counts=dict(sorted(counts.items())))


def _stream(pieces, keys, buckets: Buckets, seed: int, epoch: int) -> list[Batch]:
    pending: dict[BucketKey, list[int]] = {}
    batches: list[Batch] = []
    for key, rows in pieces:
        rng = np.random.default_rng(stable_seed("rows", seed, epoch, *key))
        for i in (rows[j] for j in rng.permutation(len(rows))):
            queue = pending.setdefault(keys[i], [])
            queue.append(i)
            if len(queue) == buckets.batch_size(keys[i]):
                batches.append(Batch(keys[i], tuple(queue)))
                pending[keys[i]] = []
    batches += [Batch(key, tuple(rows)) for key, rows in sorted(pending.items()) if rows]
    return batches
