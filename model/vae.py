"""The image VAE that Open-Sora 1.1 applies to videos frame by frame (`stabilityai/sd-vae-ft-ema`).

Frozen: encoding and decoding run without gradients.

Videos in and out are [B, C, T, H, W] in [-1, 1]; latents are [B, 4, T, H/8, W/8], scaled by
0.18215 as Stable Diffusion's are. Frames go through the autoencoder in micro-batches so that
long clips fit in memory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .hub import locate

log = logging.getLogger("bricks")

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
SCALING_FACTOR = 0.18215
VAE_FILES = [("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")]


class VideoVAE(nn.Module):
    def __init__(self, autoencoder: nn.Module, micro_batch_size: int | None = 4) -> None:
        super().__init__()
        self.module = autoencoder
        self.micro_batch_size = micro_batch_size
        self.out_channels = autoencoder.config.latent_channels
        self.downsample = 2 ** (len(autoencoder.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, ref: str | Path = DEFAULT_VAE, micro_batch_size: int | None = 4,
                        subfolder: str | None = None) -> "VideoVAE":
        """A diffusers AutoencoderKL folder (`config.json` + weights), or a Hugging Face repo id
        already in the cache. Never downloads."""
        from diffusers import AutoencoderKL

        folder = locate(ref, "VAE", [] if subfolder else VAE_FILES)
        autoencoder = AutoencoderKL.from_pretrained(str(folder), subfolder=subfolder, local_files_only=True)
        return cls(autoencoder.eval(), micro_batch_size)

    @classmethod
    def tiny(cls, micro_batch_size: int | None = 4) -> "VideoVAE":
        """A random-init AutoencoderKL with the real one's shape of things (4 latent channels,
        8x downsampling) and a few thousand weights: for tests and the demo only."""
        from diffusers import AutoencoderKL

        from bricks.common.weights import warn_tiny

        warn_tiny("VAE")
        autoencoder = AutoencoderKL(
            block_out_channels=(8, 8, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=64,
        )
        return cls(autoencoder.eval(), micro_batch_size)

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        return num_frames, height // self.downsample, width // self.downsample

    def _framewise(self, x: torch.Tensor, fn) -> torch.Tensor:
        B, _, T = x.shape[:3]
        frames = x.permute(0, 2, 1, 3, 4).flatten(0, 1)  # (B*T, C, H, W)
        step = self.micro_batch_size or len(frames)
        out = torch.cat([fn(frames[i:i + step]) for i in range(0, len(frames), step)])
        return out.view(B, T, *out.shape[1:]).permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Video [B, 3, T, H, W] in [-1, 1] to scaled latents [B, 4, T, H/8, W/8]: a draw from
        the posterior (as Open-Sora trains), or its mean with `sample=False`."""
        def encode_frames(frames):
            posterior = self.module.encode(frames).latent_dist
            return (posterior.sample() if sample else posterior.mode()) * SCALING_FACTOR

        return self._framewise(x.to(self.dtype), encode_frames)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, 4, T, h, w] to video [B, 3, T, 8h, 8w], roughly in [-1, 1]."""
        return self._framewise(z.to(self.dtype), lambda frames: self.module.decode(frames / SCALING_FACTOR).sample)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
