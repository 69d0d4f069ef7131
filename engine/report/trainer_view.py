"""The trainer's view of an output: how `bricks-train` with a given config would bucket it.

The same code the trainer runs: `ShardIndex.build` over the output's shards, `Buckets` from
the config's `data` section and `plan_epoch` for epoch 0 (its keep_prob draws seeded as the
trainer seeds them), so counts and steps are the trainer's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainerView:
    config: str
    world_size: int
    samples: int  # rows in the shards
    usable: int  # with a caption and media (or a source path)
    buckets: dict[str, tuple[int, int]] = field(default_factory=dict)  # bucket -> (samples, batch size)
    unfit: int = 0
    unfit_reason: str = ""
    steps_per_epoch: int = 0
    samples_per_second: float | None = None
    max_length: int = 200
    text_encoder: str = ""

    @property
    def bucketed(self) -> int:
        return sum(n for n, _ in self.buckets.values())

    @property
    def gpu_hours(self) -> float | None:
        """Per epoch, for a measured job throughput (samples/s over all ranks, as bricks-train logs it)."""
        if not self.samples_per_second:
            return None
        return self.bucketed / self.samples_per_second / 3600 * self.world_size


class TrainerViewError(ValueError):
    pass


def trainer_view(shards: str, config_ref: str, world_size: int = 1,
                 samples_per_second: float | None = None) -> TrainerView:
    if world_size < 1:
        raise TrainerViewError(f"--world-size must be at least 1, not {world_size}")
    if samples_per_second is not None and samples_per_second <= 0:
        raise TrainerViewError(f"--samples-per-second must be positive, not {samples_per_second:g}")
    try:
        from bricks.train.config import TrainConfigError, load_config
    except ImportError as exc:
        raise TrainerViewError(f"--train-config needs the models extra ({exc.name} is not installed): "
                               "pip install 'bricks[models]'") from None
    from bricks.train.buckets import Buckets
    from bricks.train.plan import plan_epoch
    from bricks.train.shards import ShardError, ShardIndex

    try:
        config = load_config(config_ref, for_training=False)
    except TrainConfigError as exc:
        raise TrainerViewError(str(exc)) from None
    try:
        index = ShardIndex.build(shards)
    except ShardError as exc:
        raise TrainerViewError(str(exc)) from None
    buckets = Buckets(config.data.bucket_config, config.data.frame_interval)
    plan = plan_epoch(index, buckets, seed=config.train.seed, epoch=0, world_size=world_size, rank=0,
                      streams=max(config.data.num_workers, 1))
    return TrainerView(
        config=config_ref, world_size=world_size, samples=len(index), usable=int(index.usable.sum()),
        buckets={str(key): (n, buckets.batch_size(key)) for key, n in plan.bucket_counts.items()},
        unfit=plan.unassigned, unfit_reason=buckets.requirements(), steps_per_epoch=plan.steps,
        samples_per_second=samples_per_second, max_length=config.model.model_max_length,
        text_encoder="tiny" if config.model.tiny else config.model.text_encoder)
