"""Exponential moving average of the trained weights, in float32, laid out as the parameters are.

Under FSDP the averages are sharded like the parameters they follow, so no rank holds a whole
copy (Open-Sora shards its EMA too). Frozen parameters are not averaged: the EMA model
takes them from the model itself when saved.
"""

from __future__ import annotations

import torch
from torch import nn

from .parallel import full_tensor, shard_like


class EMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = {name: p.detach().clone().float()
                       for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.params:
                self.params[name].lerp_(p.detach().float(), 1 - self.decay)

    def full_state(self, model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A whole state dict of the EMA model: the averages over the model's full state. Every
        rank must call it (gathering a sharded average is collective)."""
        state = dict(model_state)
        for name, value in self.params.items():
            state[name] = full_tensor(value).cpu()
        return state

    def load(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.params) - set(state))
        if missing:
            raise KeyError(f"EMA checkpoint lacks {missing[:4]}{'...' if len(missing) > 4 else ''}")
        for name, value in self.params.items():
            self.params[name] = shard_like(state[name], value).float()
