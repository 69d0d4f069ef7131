"""The bricks data engine: operator registry, recipes, decode-once execution, Parquet shards.

One path through it: `recipe` (the YAML, validated) -> `plan` (operators in order, the shard
schema) -> `runners` (in-process or Ray) -> `pipeline` (one source: probe, decode, cut,
operators; `segments` for long sources) -> `rows` (each sample kept, dropped or failed, with op
and reason) -> `output` (workers stage shard parts, the driver commits them; `store` for local
folders and S3). `run` ties them together; `cli` is `bricks-dj`.

Operator authors need only these names (see the README's "Writing a custom operator")."""

from .operator import (FanOut, FatalModelError, Filter, FrameRequest, Frames, Mapper, ModelOperator, ModelParams,
                       OperatorParams, Resources, Segmenter)
from .registry import register
from .samples import Drop, Dropped, clip_of, image_of

__all__ = ["FanOut", "FatalModelError", "Filter", "FrameRequest", "Frames", "Mapper", "ModelOperator", "ModelParams",
           "OperatorParams", "Resources", "Segmenter",
           "register", "Drop", "Dropped", "clip_of", "image_of"]
