"""Learning rate as a pure function of the step, so a resumed run needs only the step to continue.

- `constant`: `lr` (after an optional warm-up).
- `cosine_warmup`: a cosine ramp from `start_lr` to `lr` over `warmup_steps`, then constant:
  Text2Bricks' 64-frame stage (500 steps to 1e-5).
- `one_cycle`: the same ramp, then cosine annealing from `lr` to `final_lr` over
  `anneal_steps`, then `final_lr`: the 32-frame recipe (1500 steps from 1e-7 to 1e-4, 2500
  down to 1e-5).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LRSchedule:
    kind: str
    lr: float
    warmup_steps: int = 0
    start_lr: float = 0.0
    anneal_steps: int = 0
    final_lr: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "cosine_warmup", "one_cycle"):
            raise ValueError(f"unknown lr_schedule.kind {self.kind!r}")
        if self.kind == "one_cycle" and (self.final_lr is None or self.anneal_steps < 1):
            raise ValueError("lr_schedule: one_cycle needs final_lr and anneal_steps >= 1")

    def at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return _cosine(self.start_lr, self.lr, step / self.warmup_steps)
        if self.kind != "one_cycle":
            return self.lr
        into = step - self.warmup_steps
        if into >= self.anneal_steps:
            return self.final_lr
        return _cosine(self.lr, self.final_lr, into / self.anneal_steps)

    def to_dict(self) -> dict:
        return asdict(self)


def _cosine(start: float, end: float, progress: float) -> float:
    """From `start` at progress 0 to `end` at progress 1 along half a cosine."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))
