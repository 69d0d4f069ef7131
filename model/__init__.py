"""The STDiT2 (Open-Sora 1.1) video diffusion model, free of distributed code."""

from .stdit2 import STDiT2, STDiT2Config

__all__ = ["STDiT2", "STDiT2Config"]
