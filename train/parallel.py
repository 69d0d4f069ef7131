"""Process group and model wrapping, kept outside the model: `ddp` or `fsdp` (FSDP2).

`bricks-train` reads the environment that `torchrun` sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, ...); without it, it is one process and the model is not wrapped. NCCL on GPUs,
gloo on CPUs. A launcher that has joined the ranks already (Ray Train, which sets the same
variables) keeps its process group: it is used as it is, and left for the launcher to close.
FSDP2 shards each STDiT2 block and then the rest (`fully_shard`), keeping the parameters
gathered from forward to backward for ZeRO-2 style or re-sharding them after forward for
ZeRO-3 style. State dicts are always gathered to full, CPU, fully qualified names, so a
checkpoint is the same whatever the strategy or world size that wrote it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("bricks")


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# Whether the process group was there before init_world (a launcher's, which it closes itself).
_adopted = False


def init_world(timeout_minutes: float = 30.0, device: str | None = None) -> World:
    """Join the process group that torchrun describes (if any), or take the one a launcher has
    initialised, and pick this rank's device."""
    global _adopted
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    _adopted = dist.is_available() and dist.is_initialized()
    if _adopted and (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise RuntimeError(f"the process group that is already set up has rank {dist.get_rank()} of "
                           f"{dist.get_world_size()}, the environment says RANK={rank} WORLD_SIZE={world_size}")
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not _adopted:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return World(rank, world_size, local_rank, device)


def close_world() -> None:
    """Leave the process group that init_world joined (an adopted one stays up)."""
    global _adopted
    if dist.is_initialized() and not _adopted:
        dist.destroy_process_group()
    _adopted = False


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_sum(world: World, values: list[float]) -> list[float]:
    """Elementwise sum over ranks (float64, so counts and losses stay exact enough)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=world.device if world.device.type == "cuda" else "cpu")
    if world.distributed:
        dist.all_reduce(tensor)
    return tensor.tolist()


def wrap(model: nn.Module, strategy: str, world: World, zero_stage: int = 2,
         param_dtype: torch.dtype | None = None) -> nn.Module:
    """The model as the strategy trains it. `param_dtype` (FSDP) computes in that dtype while
    the sharded master weights and gradient reduction stay float32."""
    if not world.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError:  # torch < 2.6 (the ColossalAI environment); FSDP2 there needs CUDA
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(world.device.type, (world.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
        options = dict(mesh=mesh, reshard_after_forward=zero_stage == 3)
        if policy is not None:
            options["mp_policy"] = policy
        for block in model.blocks:
            fully_shard(block, **options)
        fully_shard(model, **options)
        return model
    raise ValueError(f"parallel.strategy {strategy!r} is not ddp or fsdp")


class TorchStrategy:
    """`ddp` or `fsdp` with a plain torch optimizer: what the training loop asks of a strategy."""

    def __init__(self, world: World, kind: str, zero_stage: int = 2, param_dtype: torch.dtype | None = None) -> None:
        self.world, self.kind, self.zero_stage, self.param_dtype = world, kind, zero_stage, param_dtype

    def prepare(self, model: nn.Module, make_optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = wrap(model, self.kind, self.world, self.zero_stage, self.param_dtype)
        return model, make_optimizer([p for p in model.parameters() if p.requires_grad])

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        loss.backward()

    def clip_grad_norm(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None) -> float:
        """The global gradient norm before clipping (clipped to `max_norm` when given)."""
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
        return float(full_tensor(norm))

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model_state(model)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer_state(model, optimizer)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        load_optimizer_state(model, optimizer, state)


def unwrap(model: nn.Module) -> nn.Module:
    """The STDiT2 inside a DDP wrapper (FSDP2 shards the module in place)."""
    return model.module if hasattr(model, "module") else model


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on CPU under the STDiT2's own key names: collective, and complete on
    rank 0 (which writes checkpoints; torch gives the other ranks an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(unwrap(model), options=_full_options())


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap(model), optimizer, options=_full_options())


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(unwrap(model), optimizer, state, options=_full_options())


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value gathered whole; a plain tensor as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like` is: sharded the same way if `like` is a DTensor."""
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)
    return full.to(like.device, like.dtype)
