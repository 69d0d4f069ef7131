"""Precomputed VAE latents and T5 states: what `encode_latents` stores and what the trainer checks.

Columns of a row that carries them (all written together by `encode_latents`):

    vae_latent             .npy bytes, [C, T, H/8, W/8]: the VAE posterior's mean, scaled
    t5_states              .npy bytes, [tokens, D]: the caption's T5 states without padding
                           (null when the row has no caption)
    latent_dtype           "bf16" or "fp16": fp16 is a float16 .npy; bf16 is a uint16 .npy of
                           bfloat16 bit patterns (.npy has no bfloat16). Both read back exactly.
    vae_latent_shape       [C, T, H/8, W/8]
    latent_bucket          the bucket the latent was cut for, str(BucketKey): "144p/8f/0.56"
    latent_frame_interval  the source frames between two latent frames' frames
    latent_vae             the VAE (a repo id or path, or "tiny(seed=N)")
    latent_text_encoder    the T5 and its token length ("DeepFloyd/t5-v1_1-xxl (200 tokens)")

The frames are those the trainer reads (`decode.read_sample`) with the centre temporal crop:
a latent holds one crop, so the trainer's random temporal crop cannot apply to it. The bucket
is the deterministic first choice of `Buckets.assign` (no keep_prob fall-through), and the
trainer trains such a row in its stored bucket, after checking that its config puts the
sample there (`check_latents`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # buckets imports bricks.model, and so torch: this module's columns must not
    from .buckets import BucketKey, Buckets

LATENT_DTYPES = ("bf16", "fp16")
LATENT_COLUMNS: dict[str, pa.DataType] = {
    "vae_latent": pa.binary(), "t5_states": pa.binary(), "latent_dtype": pa.string(),
    "vae_latent_shape": pa.list_(pa.int64()), "latent_bucket": pa.string(), "latent_frame_interval": pa.int64(),
    "latent_vae": pa.string(), "latent_text_encoder": pa.string(),
}
# The small ones, which the shard index reads to check the rows against the config.
LATENT_METADATA = ["latent_bucket", "latent_frame_interval", "latent_vae", "latent_text_encoder", "vae_latent_shape"]


@dataclass(frozen=True)
class EncoderSpec:
    """The buckets and the frozen encoders of a training config, as far as latents depend on them."""

    bucket_config: dict
    frame_interval: int
    vae: str
    text_encoder: str
    model_max_length: int
    tiny: bool
    seed: int
    vae_micro_batch: int = 4

    @classmethod
    def from_config(cls, config) -> "EncoderSpec":
        """From a `TrainConfig` (its model and data sections, and the seed of the tiny encoders)."""
        m = config.model
        return cls(config.data.bucket_config, config.data.frame_interval, m.vae, m.text_encoder, m.model_max_length,
                   m.tiny, config.train.seed, m.vae_micro_batch)

    @property
    def vae_name(self) -> str:
        return f"tiny(seed={self.seed})" if self.tiny else self.vae

    @property
    def text_encoder_name(self) -> str:
        # The tiny T5 always has TINY_STDIT2's 16 tokens, whatever model_max_length says.
        return f"tiny(seed={self.seed})" if self.tiny else f"{self.text_encoder} ({self.model_max_length} tokens)"


def to_npy(array: np.ndarray, dtype: str) -> bytes:
    """float32 values as `dtype` .npy bytes (see the module docstring); rounding to nearest even."""
    if dtype == "fp16":
        stored = array.astype(np.float16)
    elif dtype == "bf16":
        import torch

        stored = torch.from_numpy(np.ascontiguousarray(array, np.float32)).to(torch.bfloat16).view(torch.int16)
        stored = stored.numpy().view(np.uint16)
    else:
        raise ValueError(f"latent dtype {dtype!r}: use one of {', '.join(LATENT_DTYPES)}")
    buffer = io.BytesIO()
    np.save(buffer, stored, allow_pickle=False)
    return buffer.getvalue()


def parse_bucket(text: str) -> BucketKey:
    """str(BucketKey) back to the key: "144p/8f/0.56"."""
    from .buckets import BucketKey

    parts = text.split("/")
    if len(parts) != 3 or not parts[1].endswith("f") or not parts[1][:-1].isdigit():
        raise ValueError(f"latent_bucket {text!r} is not RESOLUTION/Nf/RATIO")
    return BucketKey(parts[0], int(parts[1][:-1]), parts[2])


@dataclass(frozen=True)
class LatentGroup:
    """Rows that carry latents made the same way (the shard index counts them per group)."""

    bucket: str
    frame_interval: int | None
    vae: str | None
    text_encoder: str | None
    shape: tuple[int, ...]


def check_latents(index, buckets: Buckets, spec: EncoderSpec, channels: int | None = None) -> int:
    """The number of rows with stored latents; a ShardError (one line) when any of them was made
    for another bucket, frame interval, VAE, T5 or latent size than this config trains with."""
    from .shards import ShardError

    if index.latent_bucket is None:
        return 0
    problems: list[tuple[str, int]] = []  # (problem, row)
    for group, (count, row) in index.latent_groups.items():
        problem = _group_problem(group, buckets, spec, channels)
        if problem:
            problems.append((problem, row))
    for i, stored in enumerate(index.latent_bucket):
        if stored is None or not index.usable[i]:
            continue
        first = buckets.assign(int(index.num_frames[i]), int(index.height[i]), int(index.width[i]),
                               bool(index.is_image[i]), seed=None, draw=False)
        if first is None or str(first) != stored:
            where = "fits no bucket" if first is None else f"goes to bucket {first}"
            problems.append((f"a latent for bucket {stored}, but with data.bucket_config the sample {where}", i))
    if problems:
        problem, row = problems[0]
        rows = {r for _, r in problems} if len(problems) < 1000 else None
        count = f"{len(rows)} rows" if rows is not None else "rows"
        raise ShardError(f"data: {count} carry precomputed latents that do not match this config: "
                         f"{problem} (e.g. sample {index.sample_id[row]} in {index.files[index.file[row]]}); run "
                         "encode_latents again with this config, or train on shards without the vae_latent column")
    return sum(count for count, _ in index.latent_groups.values())


def _group_problem(group: LatentGroup, buckets: Buckets, spec: EncoderSpec, channels: int | None) -> str | None:
    try:
        key = parse_bucket(group.bucket)
    except ValueError as exc:
        return str(exc)
    lengths = buckets.config.get(key.resolution)
    if lengths is None or key.num_frames not in lengths or key.ratio not in buckets.sizes[key.resolution]:
        return f"a latent for bucket {key}, which data.bucket_config has no bucket for"
    if key.num_frames > 1 and group.frame_interval != buckets.frame_interval:
        return f"latent_frame_interval {group.frame_interval}, data.frame_interval is {buckets.frame_interval}"
    if group.vae != spec.vae_name:
        return f"latents of the VAE {group.vae}, this config's is {spec.vae_name}"
    if group.text_encoder is not None and group.text_encoder != spec.text_encoder_name:
        return f"t5_states of {group.text_encoder}, this config's T5 is {spec.text_encoder_name}"
    t, h, w = buckets.frame_size(key)
    if len(group.shape) != 4 or group.shape[1:] != (t, h // 8, w // 8):
        return f"vae_latent_shape {list(group.shape)}, bucket {key} needs [C, {t}, {h // 8}, {w // 8}]"
    if channels is not None and group.shape[0] != channels:
        return f"latents of {group.shape[0]} channels, this config's VAE makes {channels}"
    return None
