"""Text to video with STDiT2: T5 encodes the prompts, IDDPM denoises latents, the VAE decodes them.

`VideoSampler` holds the three models; `generate` returns videos as tensors and `save`
writes them as MP4 (PNG for single frames). `bricks-sample` is the command line over it,
and the trainer uses the same object to render fixed-seed samples of the model it trains.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .iddpm import IDDPM
from .stdit2 import STDiT2, STDiT2Config
from .text_encoder import DEFAULT_T5, T5TextEncoder, default_dtype
from .vae import DEFAULT_VAE, VideoVAE

DEFAULT_STDIT2 = "hpcai-tech/OpenSora-STDiT-v2-stage3"
IMAGE_FPS = 120  # the frame rate Open-Sora conditions still images on
TINY_STDIT2 = dict(depth=2, hidden_size=48, num_heads=4, caption_channels=32, model_max_length=16,
                   qk_norm=True, input_sq_size=32)


@dataclass
class SampleSpec:
    num_frames: int = 16
    height: int = 240
    width: int = 426
    fps: float = 24.0
    """The frame rate the model is conditioned on: that of the footage it should look like."""
    frame_interval: int = 3
    """Source frames between generated frames: the written video plays at fps / frame_interval."""
    steps: int = 100
    cfg_scale: float = 7.0
    cfg_channel: int | None = 3
    seed: int = 42
    batch_size: int = 1

    def __post_init__(self) -> None:
        for name in ("num_frames", "height", "width", "frame_interval", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps < 2:
            raise ValueError("steps must be at least 2")
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")

    @property
    def playback_fps(self) -> float:
        return self.fps / self.frame_interval


class VideoSampler:
    def __init__(self, model: STDiT2, vae: VideoVAE, text_encoder: T5TextEncoder) -> None:
        """Uses the models where they are (device, dtype): loading places them."""
        if text_encoder.output_dim != model.config.caption_channels:
            raise ValueError(f"text encoder gives {text_encoder.output_dim}-d states but STDiT2 takes "
                             f"caption_channels={model.config.caption_channels}")
        if vae.out_channels != model.config.in_channels:
            raise ValueError(f"VAE gives {vae.out_channels} latent channels but STDiT2 takes "
                             f"in_channels={model.config.in_channels}")
        self.model, self.vae, self.text_encoder = model, vae, text_encoder

    @classmethod
    def from_pretrained(cls, ckpt: str | Path = DEFAULT_STDIT2, vae: str | Path = DEFAULT_VAE,
                        text_encoder: str | Path = DEFAULT_T5, model_max_length: int = 200,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        config: STDiT2Config | dict | None = None) -> "VideoSampler":
        """Weights from local folders or the Hugging Face cache (never downloaded). The STDiT2's
        caption length and width follow the text encoder's, as in Open-Sora."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or default_dtype(device)
        t5 = T5TextEncoder.from_pretrained(text_encoder, model_max_length, device=device)
        autoencoder = VideoVAE.from_pretrained(vae).to(device, dtype)
        model = STDiT2.from_pretrained(ckpt, config=config, model_max_length=model_max_length,
                                       caption_channels=t5.output_dim, in_channels=autoencoder.out_channels)
        return cls(model.to(device, dtype).eval(), autoencoder, t5)

    @classmethod
    def tiny(cls, device: str | torch.device = "cpu", seed: int = 0, ckpt: str | Path | None = None) -> "VideoSampler":
        """Random-init STDiT2, VAE and T5 small enough for CPU tests and the demo (they say so).

        With `ckpt`, the model/ or ema/ folder of a `bricks-train` checkpoint of a tiny run
        (`model.tiny: true`), the STDiT2 has those weights and the encoders are the ones it was
        trained with: the tiny VAE and T5 are random too, rebuilt from the run's seed."""
        from bricks.common.weights import warn_tiny

        if ckpt is not None:
            seed = tiny_run_seed(Path(ckpt))
            model = STDiT2.from_pretrained(ckpt).eval()
        else:
            warn_tiny("STDiT2")
            torch.manual_seed(seed)
            model = STDiT2(STDiT2Config(**TINY_STDIT2)).eval()
        t5, vae = tiny_encoders(seed)
        return cls(model.to(device), vae.to(device), t5.to(device))

    @torch.no_grad()
    def generate(self, prompts: list[str], spec: SampleSpec,
                 callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Videos [N, 3, T, H, W] in [-1, 1] (float32, on CPU) for N prompts. Batch k draws its
        noise after seeding with `spec.seed + k * batch_size`, so a prompt's video does not
        depend on the prompts after it; the caller's RNG state is left as it was."""
        model, vae = self.model, self.vae
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        diffusion = IDDPM(num_sampling_steps=spec.steps, cfg_scale=spec.cfg_scale, cfg_channel=spec.cfg_channel)
        latent_frames, latent_h, latent_w = vae.latent_size(spec.num_frames, spec.height, spec.width)
        fps = IMAGE_FPS if spec.num_frames == 1 else spec.fps
        total = -(-len(prompts) // spec.batch_size) * spec.steps
        done = 0

        def step(i: int, _steps: int) -> None:
            if callback is not None:
                callback(done + i, total)

        was_training = model.training
        model.eval()
        videos = []
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                for start in range(0, len(prompts), spec.batch_size):
                    batch = list(prompts[start:start + spec.batch_size])
                    n = len(batch)
                    torch.manual_seed(spec.seed + start)
                    z = torch.randn(n, vae.out_channels, latent_frames, latent_h, latent_w, device=device, dtype=dtype)
                    text = self.text_encoder.encode(batch)
                    y_null = model.y_embedder.y_embedding[None, None].expand(n, 1, -1, -1)
                    conditions = dict(
                        mask=text["mask"].to(device),
                        height=torch.full((n,), float(spec.height), device=device),
                        width=torch.full((n,), float(spec.width), device=device),
                        num_frames=torch.full((n,), float(spec.num_frames), device=device),
                        ar=torch.full((n,), spec.height / spec.width, device=device),
                        fps=torch.full((n,), float(fps), device=device),
                    )
                    latents = diffusion.sample(model, z, text["y"].to(device, dtype), y_null.to(dtype),
                                               conditions, callback=step)
                    videos.append(vae.decode(latents.to(vae.dtype)).float().clamp(-1, 1).cpu())
                    done += spec.steps
        finally:
            model.train(was_training)
        return torch.cat(videos)

    def save(self, videos: torch.Tensor, prompts: list[str], out_dir: str | Path, spec: SampleSpec,
             prefix: str = "") -> list[Path]:
        """Write each video as `{prefix}{index:04d}-{prompt words}.mp4` (`.png` for one frame)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for index, (video, prompt) in enumerate(zip(videos, prompts)):
            stem = f"{prefix}{index:04d}-{slug(prompt)}"
            frames = to_uint8_frames(video)
            if len(frames) == 1:
                path = out_dir / f"{stem}.png"
                write_png(path, frames[0])
            else:
                path = out_dir / f"{stem}.mp4"
                write_mp4(path, frames, spec.playback_fps)
            paths.append(path)
        return paths


def tiny_encoders(seed: int = 0, vae_micro_batch: int | None = 4) -> tuple[T5TextEncoder, VideoVAE]:
    """The tiny random-init T5 and VAE of `seed`: the trainer's (`model.tiny`) and the sampler's
    are built here alike, so a tiny run's checkpoint samples with the encoders it was trained with."""
    t5 = T5TextEncoder.tiny(model_max_length=TINY_STDIT2["model_max_length"], d_model=TINY_STDIT2["caption_channels"],
                            seed=seed)  # seeds the global generator, so the VAE's draws follow from `seed` too
    return t5, VideoVAE.tiny(micro_batch_size=vae_micro_batch)


def tiny_run_seed(folder: Path) -> int:
    """The seed of a tiny `bricks-train` run, from the state.json beside its model/ or ema/ folder."""
    state_file = folder.parent / "state.json"
    if not folder.is_dir() or not state_file.is_file():
        raise ValueError(f"{folder}: --tiny --ckpt takes the model/ or ema/ folder of a bricks-train checkpoint "
                         "(RUN/checkpoints/step-N/ema), whose state.json gives the seed of the tiny encoders")
    try:
        config = json.loads(state_file.read_text())["config"]
        tiny, seed = config["model"]["tiny"], config["train"]["seed"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{state_file}: not a bricks-train checkpoint's state ({exc})") from None
    if not tiny:
        raise ValueError(f"{folder} was trained with the real VAE and T5 (model.tiny is false): sample it without "
                         "--tiny, with its --vae and --text-encoder")
    return int(seed)


def slug(text: str, words: int = 6) -> str:
    return "-".join(re.findall(r"[a-z0-9]+", text.lower())[:words]) or "prompt"


def to_uint8_frames(video: torch.Tensor) -> list[np.ndarray]:
    """[3, T, H, W] in [-1, 1] to T arrays [H, W, 3] uint8 (rounded, as Open-Sora saves)."""
    pixels = ((video.clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    return list(pixels.permute(1, 2, 3, 0).numpy())


def write_mp4(path: Path, frames: list[np.ndarray], fps: float) -> None:
    from bricks.common.files import write_atomic
    from bricks.common.video import encode_mp4

    write_atomic(path, encode_mp4(frames, fps, crf=18, preset="medium"))


def write_png(path: Path, frame: np.ndarray) -> None:
    import io

    from PIL import Image

    from bricks.common.files import write_atomic

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())
