"""What every caption backend takes and returns."""

from __future__ import annotations

from dataclasses import dataclass

from bricks.engine.operator import FatalModelError


@dataclass
class CaptionRequest:
    prompt: str
    images: list[bytes]  # JPEG, in order


class EndpointDown(FatalModelError):
    """The caption service cannot be reached: the run stops instead of failing every sample."""
