"""Built-in operators, one per module; importing this package registers them all."""

from . import (  # noqa: F401  (imported for registration)
    aesthetic_filter,
    clip_length,
    encode_clips,
    encode_latents,
    metadata_filters,
    middle_frame,
    motion_filter,
    shot_split,
    vlm_caption,
)
