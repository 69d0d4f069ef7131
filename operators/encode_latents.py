"""`encode_latents`: the VAE latents and T5 states that `bricks-train` would compute, stored in the shards.

A model operator, after captioning: for each sample, the bucket a training config puts it in
(the deterministic first choice: keep_prob draws do not apply to a stored latent), its frames
read as the trainer reads them (`bricks.train.decode.read_sample`: cover-scaled and centre-cropped
to the bucket's size, `frame_interval` apart, from the middle temporal window), the VAE
posterior's mean and the caption's T5 states, in bf16 or fp16 (see `bricks.train.latents` for
the columns and their encoding). The VAE and T5 are the config's (`model.tiny`: the tiny
random-init pair built from `train.seed`, the trainer's own). The trainer then skips decoding
and both encoders for these rows, after checking that they were made for its config.

A sample that fits no bucket of the config is kept without latents: the trainer leaves it out
too, and the row stays for other uses of the shards. One whose frames cannot be read as the
trainer reads them fails, with the reason.

Frames are decoded here rather than served by the decode pass: the trainer's own reader is
what makes the latents equal to those it would compute (its libswscale scaling, its crop).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from bricks.common.weights import ModelFile
from bricks.engine.operator import ModelOperator, ModelParams, OperatorParams
from bricks.engine.registry import register
from bricks.train.latents import LATENT_COLUMNS  # torch-free, unlike the rest of bricks.train

log = logging.getLogger("bricks")


class BucketSection(OperatorParams):
    bucket_config: dict[str, Any]
    """{resolution: {num_frames: [keep_prob, batch_size]}}, as in a training config's data section."""
    frame_interval: int = Field(default=1, ge=1)


class EncodeLatentsParams(ModelParams):
    config: str | None = None
    """A shipped bricks-train config (`tiny-cpu`, `text2bricks-360p-32f`, ...) or a config YAML:
    its buckets, frame interval, VAE and T5."""
    buckets: BucketSection | None = None
    """Buckets inline (over the config's, or without a config)."""
    vae: str | None = None
    """Over the config's `model.vae` (default without a config: stabilityai/sd-vae-ft-ema)."""
    text_encoder: str | None = None
    model_max_length: int | None = Field(default=None, ge=1)
    tiny: bool | None = None
    """The tiny random-init VAE and T5 (tests only); default: the config's `model.tiny`."""
    seed: int | None = None
    """Seed of the tiny encoders; default: the config's `train.seed` (the trainer's)."""
    dtype: Literal["bf16", "fp16"] = "bf16"

    @model_validator(mode="after")
    def _resolved(self) -> "EncodeLatentsParams":
        resolve_spec(self)  # an unknown config, a bad field: refused when the recipe is read
        return self


def resolve_spec(params: EncodeLatentsParams):
    """The `EncoderSpec` these parameters stand for (a ValueError with one line if none)."""
    from bricks.engine.extras import missing_extra

    problem = missing_extra(("torch",))
    if problem:
        raise ValueError(problem)
    from bricks.model.text_encoder import DEFAULT_T5
    from bricks.model.vae import DEFAULT_VAE
    from bricks.train.buckets import BucketConfigError, parse_bucket_config
    from bricks.train.config import ModelSection, RunSection, TrainConfigError, load_config
    from bricks.train.latents import EncoderSpec

    if params.config is None and params.buckets is None:
        raise ValueError("give `config` (a bricks-train config) or `buckets` (bucket_config and frame_interval)")
    model, seed = ModelSection(vae=DEFAULT_VAE, text_encoder=DEFAULT_T5), RunSection().seed
    bucket_config, frame_interval = None, None
    if params.config is not None:
        try:
            config = load_config(params.config, for_training=False)
        except TrainConfigError as exc:
            raise ValueError(str(exc).replace("--config ", "config: ", 1)) from None
        model, seed = config.model, config.train.seed
        bucket_config, frame_interval = config.data.bucket_config, config.data.frame_interval
    if params.buckets is not None:
        bucket_config, frame_interval = params.buckets.bucket_config, params.buckets.frame_interval
        try:
            parse_bucket_config(bucket_config)
        except BucketConfigError as exc:
            raise ValueError(f"buckets: {exc}") from None
    return EncoderSpec(bucket_config, frame_interval, params.vae or model.vae, params.text_encoder or model.text_encoder,
                       params.model_max_length or model.model_max_length,
                       model.tiny if params.tiny is None else params.tiny,
                       seed if params.seed is None else params.seed, model.vae_micro_batch)


@dataclass
class _Input:
    bucket: str | None  # None: fits no bucket
    pixels: np.ndarray | None  # [3, T, H, W] uint8
    text: str | None


@register
class EncodeLatents(ModelOperator):
    name = "encode_latents"
    description = ("VAE latents (posterior mean) and T5 states of a bricks-train config's buckets and encoders, "
                   "in bf16/fp16, for the trainer to skip decoding and encoding.")
    Params = EncodeLatentsParams
    outputs = LATENT_COLUMNS

    def __init__(self, params: EncodeLatentsParams | None = None) -> None:
        super().__init__(params)
        from bricks.train.buckets import Buckets

        self.spec = resolve_spec(self.params)
        self.buckets = Buckets(self.spec.bucket_config, self.spec.frame_interval)

    @property
    def tiny_preset(self) -> bool:
        return self.spec.tiny

    def required_modules(self) -> tuple[str, ...]:
        return ("torch", "diffusers", "transformers")

    def model_files(self) -> list[ModelFile]:
        if self.spec.tiny:
            return []
        from bricks.model.hub import looks_like_repo_id

        return [ModelFile(ref, None) if looks_like_repo_id(ref) else ModelFile(ref, None, local_path=ref)
                for ref in (self.spec.vae, self.spec.text_encoder)]

    def load(self, device: str) -> None:
        import torch

        from bricks.model.text_encoder import T5TextEncoder, default_dtype
        from bricks.model.vae import VideoVAE

        spec, dtype = self.spec, default_dtype(device)  # the trainer's: bf16 on GPU, float32 on CPU
        if spec.tiny:
            from bricks.model.sampling import tiny_encoders

            torch.manual_seed(spec.seed)  # as the trainer builds them: the same weights
            text_encoder, vae = tiny_encoders(spec.seed, spec.vae_micro_batch)
        else:
            text_encoder = T5TextEncoder.from_pretrained(spec.text_encoder, spec.model_max_length, device=device,
                                                         dtype=dtype)
            vae = VideoVAE.from_pretrained(spec.vae, micro_batch_size=spec.vae_micro_batch)
        self.device = device
        self.model = (vae.to(device, dtype).eval().requires_grad_(False), text_encoder.to(device, dtype))

    def preprocess(self, sample, frames) -> _Input:
        from bricks.train.decode import read_sample

        text = sample.get("text") if (sample.get("text") or "").strip() else None
        key = self.buckets.assign(int(sample.get("num_frames") or 0), int(sample["height"]), int(sample["width"]),
                                  sample["kind"] == "image", seed=None, draw=False)
        if key is None:
            return _Input(None, None, text)
        num_frames, height, width = self.buckets.frame_size(key)
        pixels = read_sample(sample, num_frames, (height, width), self.buckets.frame_interval, rng=None)
        return _Input(str(key), pixels.numpy(), text)

    def infer(self, inputs: list[_Input]) -> list[dict | None]:
        import torch

        from bricks.train.decode import normalize

        vae, text_encoder = self.model
        latents: dict[int, np.ndarray] = {}
        by_size: dict[tuple, list[int]] = {}
        for i, item in enumerate(inputs):
            if item.pixels is not None:
                by_size.setdefault(item.pixels.shape, []).append(i)
        with torch.inference_mode():
            for members in by_size.values():  # one VAE batch per frame size
                video = torch.from_numpy(np.stack([inputs[i].pixels for i in members])).to(self.device)
                encoded = vae.encode(normalize(video), sample=False).float().cpu().numpy()
                latents.update(zip(members, encoded))
            captioned = [i for i in latents if inputs[i].text is not None]
            states = {}
            if captioned:
                out = text_encoder.encode([inputs[i].text for i in captioned])
                y, mask = out["y"].float().cpu(), out["mask"].cpu()
                for k, i in enumerate(captioned):
                    states[i] = y[k, 0, :int(mask[k].sum())].numpy()
        return [{"latent": latents[i], "states": states.get(i), "bucket": inputs[i].bucket} if i in latents else None
                for i in range(len(inputs))]

    def apply(self, sample, output: dict | None) -> dict:
        if output is None:
            return {}
        from bricks.train.latents import to_npy

        spec, dtype = self.spec, self.params.dtype
        fields = {"vae_latent": to_npy(output["latent"], dtype), "latent_dtype": dtype,
                  "vae_latent_shape": list(output["latent"].shape), "latent_bucket": output["bucket"],
                  "latent_frame_interval": spec.frame_interval, "latent_vae": spec.vae_name}
        if output["states"] is not None:
            fields["t5_states"] = to_npy(output["states"], dtype)
            fields["latent_text_encoder"] = spec.text_encoder_name
        return fields
