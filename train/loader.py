"""Streaming Parquet shards into bucket batches, resumable to the batch.

`ShardDataset` is an IterableDataset that yields whole batches (use it with
`DataLoader(batch_size=None, num_workers=streams)`, or `num_workers=0`). Each loader worker
plays one stream of the epoch plan: it reads its own row groups once each, decodes the rows
that its batches need, and keeps in memory only rows waiting for a later batch.

A batch is a dict: `video` [B, 3, T, H, W] uint8 (`decode.normalize` maps it to [-1, 1] on
the training device) or, when every row carries a precomputed `vae_latent`, `latent` [B, C,
T, H/8, W/8] instead (plus `t5_states`, a list of [tokens, D], when every row carries those);
`text`, `sample_id`, `fps` [B], the bucket's `num_frames`, `height`, `width`, `bucket`, and
`skipped`: (sample id, reason) of rows that could not be decoded (the batch is smaller by
them, possibly empty; never a crash).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from bricks.model.sampling import IMAGE_FPS

from .buckets import Buckets, stable_seed
from .decode import BadSample, read_array, read_sample
from .plan import Batch, EpochPlan, plan_epoch
from .shards import SAMPLE_COLUMNS, ShardIndex, open_parquet

log = logging.getLogger("bricks")


class LoaderStateError(ValueError):
    pass


@dataclass
class LoaderState:
    """Where the loader is: saved with every checkpoint."""

    epoch: int
    consumed: int  # batches this rank has taken in `epoch`
    seed: int
    world_size: int
    streams: int
    fingerprint: str  # of the data set the plan was made from

    def to_dict(self) -> dict:
        return asdict(self)


class ShardDataset(IterableDataset):
    def __init__(self, index: ShardIndex, buckets: Buckets, *, seed: int = 0, world_size: int = 1, rank: int = 0,
                 streams: int = 1, temporal_crop: str = "random") -> None:
        self.index, self.buckets = index, buckets
        self.temporal_crop = temporal_crop  # "random" (seeded per sample and epoch) or "center"
        self.seed, self.world_size, self.rank, self.streams = seed, world_size, rank, max(streams, 1)
        self.epoch, self.consumed = 0, 0
        self._plan: EpochPlan | None = None

    # --- position ------------------------------------------------------------------------------

    def set_epoch(self, epoch: int, consumed: int = 0) -> EpochPlan:
        """Plan `epoch` and start it after `consumed` batches (0 for a fresh epoch)."""
        if self._plan is None or self._plan.epoch != epoch:
            self._plan = plan_epoch(self.index, self.buckets, seed=self.seed, epoch=epoch,
                                    world_size=self.world_size, rank=self.rank, streams=self.streams)
        self.epoch, self.consumed = epoch, consumed
        return self._plan

    @property
    def plan(self) -> EpochPlan:
        return self._plan if self._plan is not None else self.set_epoch(self.epoch)

    def state(self, consumed: int) -> LoaderState:
        return LoaderState(self.epoch, consumed, self.seed, self.world_size, self.streams, self.index.fingerprint)

    def restore(self, state: dict | LoaderState, allow_data_change: bool = False) -> None:
        """Continue from a checkpoint's loader state. A different data set is refused unless
        `allow_data_change`, which starts the checkpoint's next epoch on the new data."""
        state = state if isinstance(state, LoaderState) else LoaderState(**state)
        layout = (state.seed, state.world_size, state.streams)
        if state.fingerprint != self.index.fingerprint:
            if not allow_data_change:
                raise LoaderStateError(
                    "the data set differs from the one this checkpoint was trained on (other shards, rows or ids); "
                    "resume with --allow-data-change to start its next epoch on the new data")
            log.warning("data set changed since the checkpoint: starting epoch %d on the new data", state.epoch + 1)
            self.set_epoch(state.epoch + 1)
            return
        if layout != (self.seed, self.world_size, self.streams):
            if not allow_data_change:
                raise LoaderStateError(
                    f"the checkpoint's loader ran with seed {state.seed}, {state.world_size} ranks and "
                    f"{state.streams} streams, this run has {self.seed}, {self.world_size} and {self.streams}: "
                    "the epoch's order cannot be continued exactly; keep them, or pass --allow-data-change "
                    "to start the next epoch")
            self.set_epoch(state.epoch + 1)
            return
        self.set_epoch(state.epoch, state.consumed)

    # --- iteration -----------------------------------------------------------------------------

    def __iter__(self):
        plan = self.plan
        done, following = plan.resume_point(self.consumed)
        remaining = plan.steps - self.consumed
        worker = get_worker_info()
        if worker is None:
            yield from self._merged(plan, done, remaining)
            return
        if worker.num_workers != self.streams:
            raise LoaderStateError(f"the loader has {worker.num_workers} workers but the plan {self.streams} streams")
        # Worker w plays the stream after the one last served, so that the DataLoader's round
        # robin over workers (which restarts at worker 0) continues the planned order.
        stream = (following + worker.id) % self.streams
        order = plan.merged()[self.consumed:]
        quota = sum(1 for s, _ in order if s == stream)
        yield from self._stream(plan.streams[stream], done[stream], quota)

    def _merged(self, plan: EpochPlan, done: list[int], remaining: int):
        readers = [self._stream(batches, done[s], None) for s, batches in enumerate(plan.streams)]
        order = plan.merged()[self.consumed:]
        for stream, _ in order[:remaining]:
            yield next(readers[stream])

    def _stream(self, batches: list[Batch], start: int, quota: int | None):
        reader = RowReader(self.index, batches[start:] if quota is None else batches[start:start + quota])
        try:
            for batch in reader.batches:
                yield self._materialise(batch, reader)
        finally:
            reader.close()

    def _materialise(self, batch: Batch, reader: "RowReader") -> dict:
        num_frames, height, width = self.buckets.frame_size(batch.bucket)
        rows = [reader.take(i) for i in batch.rows]
        # Precomputed inputs are used when the whole batch has them (a batch is encoded as one).
        use_latents = all(row.get("vae_latent") is not None for row in rows)
        use_states = all(row.get("t5_states") is not None for row in rows)
        videos, states, texts, ids, fps, skipped = [], [], [], [], [], []
        for i, row in zip(batch.rows, rows):
            sample_id = str(self.index.sample_id[i])
            try:
                if use_latents:
                    videos.append(_latent(row["vae_latent"], row.get("latent_dtype"), num_frames, height, width))
                else:
                    videos.append(self._pixels(row, sample_id, num_frames, height, width))
                if use_states:
                    states.append(read_array(row["t5_states"], "t5_states", row.get("latent_dtype")))
            except BadSample as exc:
                skipped.append((sample_id, str(exc)))
                continue
            texts.append(row["text"])
            ids.append(sample_id)
            fps.append(IMAGE_FPS if num_frames == 1 or not row.get("fps") else float(row["fps"]))
        out = {"text": texts, "sample_id": ids, "fps": torch.tensor(fps, dtype=torch.float32),
               "num_frames": num_frames, "height": height, "width": width, "bucket": str(batch.bucket),
               "skipped": skipped}
        if use_latents:
            out["latent"] = torch.stack(videos) if videos else torch.zeros(0, 4, num_frames, height // 8, width // 8)
        else:
            out["video"] = (torch.stack(videos) if videos
                            else torch.zeros(0, 3, num_frames, height, width, dtype=torch.uint8))
        if use_states:
            out["t5_states"] = states
        return out

    def _pixels(self, row: dict, sample_id: str, num_frames: int, height: int, width: int) -> torch.Tensor:
        rng = (None if self.temporal_crop == "center"
               else np.random.default_rng(stable_seed("crop", self.seed, self.epoch, sample_id)))
        return read_sample(row, num_frames, (height, width), self.buckets.frame_interval, rng)


def _latent(data: bytes, dtype: str | None, num_frames: int, height: int, width: int) -> torch.Tensor:
    latent = read_array(data, "vae_latent", dtype)
    if latent.ndim != 4 or latent.shape[1:] != (num_frames, height // 8, width // 8):
        raise BadSample(f"vae_latent is {tuple(latent.shape)}, the bucket needs [C, {num_frames}, {height // 8}, "
                        f"{width // 8}]")
    return latent


class RowReader:
    """Rows of the shards for a list of batches: each row group is read once, when first
    needed, and only the rows that these batches use are kept until taken."""

    def __init__(self, index: ShardIndex, batches: list[Batch]) -> None:
        self.index, self.batches = index, batches
        self.needed: dict[tuple[int, int], set[int]] = {}
        for batch in batches:
            for i in batch.rows:
                self.needed.setdefault(self._group(i), set()).add(i)
        self.rows: dict[int, dict] = {}
        self._files: dict[int, object] = {}

    def _group(self, i: int) -> tuple[int, int]:
        return int(self.index.file[i]), int(self.index.row_group[i])

    def take(self, i: int) -> dict:
        if i not in self.rows:
            self._load(self._group(i))
        return self.rows.pop(i)

    def _load(self, group: tuple[int, int]) -> None:
        file, row_group = group
        if file not in self._files:
            self._files[file] = open_parquet(self.index.files[file])
        parquet = self._files[file]
        columns = [c for c in SAMPLE_COLUMNS if c in parquet.schema_arrow.names]
        wanted = sorted(self.needed.pop(group))
        positions = [int(self.index.row[i]) for i in wanted]
        table = parquet.read_row_group(row_group, columns=columns).take(positions)
        for i, row in zip(wanted, table.to_pylist()):
            self.rows[i] = row

    def close(self) -> None:
        for parquet in self._files.values():
            parquet.close()
        self._files.clear()
