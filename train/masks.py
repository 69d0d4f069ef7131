"""Conditioning masks: which latent frames are given to the model clean, as Open-Sora 1.1 draws them.

A mask is [B, T] bool, True for a frame to generate, False for a conditioning frame (it
enters at t = 0 and is left out of the loss). Each sample draws one kind by the configured
ratios. "quarter" kinds condition on 1 to T // 4 frames, "image" kinds on one frame; at the
head, the tail, both, or a random place. Training on them is what lets the model extend and
connect clips. Stage 3's ratios: none 0.75, each quarter and image kind 0.025, the two
head+tail kinds 0.05.
"""

from __future__ import annotations

import torch

MASK_KINDS = ("mask_no", "mask_quarter_random", "mask_quarter_head", "mask_quarter_tail", "mask_quarter_head_tail",
              "mask_image_random", "mask_image_head", "mask_image_tail", "mask_image_head_tail")

STAGE3_RATIOS = {"mask_no": 0.75, "mask_quarter_random": 0.025, "mask_quarter_head": 0.025,
                 "mask_quarter_tail": 0.025, "mask_quarter_head_tail": 0.05, "mask_image_random": 0.025,
                 "mask_image_head": 0.025, "mask_image_tail": 0.025, "mask_image_head_tail": 0.05}


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform in [low, high], both included."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def frame_mask(kind: str, num_frames: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One sample's mask [T] of `kind`. Single frames are never conditioned on."""
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r} (known: {', '.join(MASK_KINDS)})")
    mask = torch.ones(num_frames, dtype=torch.bool)
    if num_frames <= 1 or kind == "mask_no":
        return mask
    size = 1 if kind.startswith("mask_image") else _randint(1, max(num_frames // 4, 1), generator)
    where = kind.rsplit("_", 1)[-1] if not kind.endswith("head_tail") else "head_tail"
    if where == "random":
        start = _randint(0, num_frames - size, generator)
        mask[start:start + size] = False
    if where in ("head", "head_tail"):
        mask[:size] = False
    if where in ("tail", "head_tail"):
        mask[-size:] = False
    return mask


def draw_masks(batch_size: int, num_frames: int, ratios: dict[str, float],
               generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, T] masks, each of a kind drawn with `ratios` (which sum to 1)."""
    kinds = list(ratios)
    weights = torch.tensor([ratios[k] for k in kinds], dtype=torch.float64)
    picks = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
    return torch.stack([frame_mask(kinds[int(i)], num_frames, generator) for i in picks])
