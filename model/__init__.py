"""The STDiT2 (Open-Sora 1.1) video diffusion model and what surrounds it: IDDPM, the VAE and
T5 wrappers, and text-to-video sampling. Free of distributed code."""

from .iddpm import IDDPM
from .sampling import SampleSpec, VideoSampler
from .stdit2 import STDiT2, STDiT2Config
from .text_encoder import T5TextEncoder
from .vae import VideoVAE

__all__ = ["IDDPM", "STDiT2", "STDiT2Config", "SampleSpec", "T5TextEncoder", "VideoSampler", "VideoVAE"]
