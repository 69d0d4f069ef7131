"""The bricks data engine: operator registry, recipes, decode-once execution, Parquet shards.

Operator authors need only these names (see the README's "Writing a custom operator")."""

from .operator import (FanOut, FatalModelError, Filter, FrameRequest, Frames, Mapper, ModelOperator, ModelParams,
                       OperatorParams, Resources, Segmenter)
from .registry import register
from .samples import Drop, Dropped, clip_of, image_of

__all__ = ["FanOut", "FatalModelError", "Filter", "FrameRequest", "Frames", "Mapper", "ModelOperator", "ModelParams",
           "OperatorParams", "Resources", "Segmenter",
           "register", "Drop", "Dropped", "clip_of", "image_of"]
