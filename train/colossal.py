"""`parallel.strategy: colossalai`: ColossalAI's Booster, as Open-Sora 1.1 trains STDiT2.

On CUDA the model goes through `LowLevelZeroPlugin` (ZeRO-2): the STDiT2's parameters become
bf16 working copies, the optimizer holds this rank's shard of float32 master weights, gradients
are reduce-scattered during backward, and the optimizer's `step()` clips them to `max_norm`
(Open-Sora: stage 2, bf16, initial_scale 2**16). ColossalAI's ZeRO optimizers refuse to run
without an accelerator, so on CPU the model goes through `TorchDDPPlugin` (gloo) and the
gradients are clipped here, as `TorchStrategy` does.

The optimizer is the torch AdamW the trainer makes; LowLevelZeroOptimizer wraps any torch
optimizer. ColossalAI's `HybridAdam` (Open-Sora's choice) needs ColossalAI's own Adam kernels,
compiled when it is first made (JIT: ninja and the CUDA toolkit) unless the package was built
with BUILD_EXT=1; without them it fails ("No usable kernel found for CPUAdamLoader").

Launching: `colossalai.launch_from_torch` always calls `init_process_group`, which fails once the
trainer's `init_world` has joined torchrun's group, and it reseeds every RNG. Neither is wanted:
the plugins only need the default process group and ColossalAI's accelerator, so this module
picks the accelerator from the trainer's device and, for a single process without torchrun,
makes a one-rank group (the plugins need one; `close_world` destroys it).

Checkpoints stay strategy-independent: `model_state` is the full float32 state dict under the
STDiT2's own names (gathered from the ZeRO master shards on CUDA, not the bf16 working copies),
and the optimizer state is keyed by parameter name, as `TorchStrategy` writes it, so a run can
resume under either strategy.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch import nn

from .parallel import World

log = logging.getLogger("bricks")


class BoostedModel(nn.Module):
    """What `ColossalStrategy.prepare` returns: calls go through ColossalAI's wrapper (DDP, or the
    ZeRO model that casts inputs), `.module` is the STDiT2 itself, so `unwrap(model)` gives its
    parameters, names and config. The wrapper is held as a plain attribute, not a submodule: this
    module's parameters and state dict are the STDiT2's, once."""

    def __init__(self, boosted: nn.Module) -> None:
        super().__init__()
        self.module = boosted.unwrap()
        object.__setattr__(self, "boosted", boosted)

    def forward(self, *args, **kwargs):
        return self.boosted(*args, **kwargs)

    def train(self, mode: bool = True) -> "BoostedModel":
        self.boosted.train(mode)
        return super().train(mode)


class ColossalStrategy:
    """The training loop's strategy interface (see `TorchStrategy`) over a ColossalAI Booster."""

    def __init__(self, world: World, precision: str = "bf16", max_norm: float | None = None,
                 initial_scale: float = 2**16) -> None:
        from colossalai.booster import Booster
        from colossalai.booster.plugin import LowLevelZeroPlugin, TorchDDPPlugin

        if precision not in ("bf16", "fp32"):
            raise ValueError(f"colossalai: precision {precision!r} is not bf16 or fp32")
        self.world, self.precision, self.max_norm = world, precision, max_norm
        self.zero = world.device.type == "cuda"
        _launch(world)
        if self.zero:
            plugin = LowLevelZeroPlugin(stage=2, precision=precision, initial_scale=initial_scale,
                                        max_norm=max_norm or 0.0)
        else:
            plugin = TorchDDPPlugin()
        self.booster = Booster(plugin=plugin)
        self._names: dict[int, str] = {}  # id(parameter) -> name in the STDiT2
        self._optimizer = None
        self._frozen: dict[str, torch.Tensor] = {}  # float32 copies of what ZeRO casts but never trains
        if self.zero:
            log.info("colossalai: LowLevelZeroPlugin (ZeRO-2, %s)", precision)
        else:
            log.info("colossalai: TorchDDPPlugin (no CUDA: ZeRO needs an accelerator; bricks clips the gradients)")

    # --- the interface -----------------------------------------------------------------------------

    def prepare(self, model: nn.Module, make_optimizer) -> tuple[nn.Module, object]:
        self._names = {id(p): name for name, p in model.named_parameters()}
        # ZeRO in bf16 casts the whole module, then takes its master weights from the cast copy:
        # keep the float32 values to start the masters from (exact resume) and to save what is
        # never trained (frozen parameters, buffers) as it was.
        originals = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} \
            if self.zero and self.precision != "fp32" else {}
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        boosted, optimizer, *_ = self.booster.boost(model, optimizer)
        self._optimizer = optimizer
        if originals:
            masters = optimizer.get_working_to_master_map()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if id(p) in masters:
                        masters[id(p)].copy_(self._shard(originals.pop(name), masters[id(p)]))
            self._frozen = originals
        return BoostedModel(boosted), optimizer

    def backward(self, loss: torch.Tensor, optimizer) -> None:
        self.booster.backward(loss, optimizer)

    def clip_grad_norm(self, model: nn.Module, optimizer, max_norm: float | None) -> float:
        """The global gradient norm before clipping. Under ZeRO the clipping itself happens in
        `optimizer.step()` (to the `max_norm` given at construction); otherwise here."""
        if self.zero:
            if (max_norm or 0.0) != (self.max_norm or 0.0):
                raise ValueError(f"colossalai: ZeRO clips to max_norm={self.max_norm} (set at construction), "
                                 f"not {max_norm}")
            return self._zero_grad_norm(optimizer)
        params = [p for p in _module(model).parameters() if p.grad is not None]
        if not params:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
        return float(norm)

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full float32 state dict, on CPU, on every rank (collective under ZeRO)."""
        module = _module(model)
        if not self.zero:
            return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        masters = self._optimizer.get_working_to_master_map()
        params = dict(module.named_parameters())
        state = {}
        for key, value in module.state_dict().items():
            param = params.get(key)
            if param is not None and id(param) in masters:
                state[key] = self._gather(masters[id(param)], param.numel()).view(param.shape).cpu()
            elif key in self._frozen:
                state[key] = self._frozen[key].clone()
            else:
                state[key] = value.detach().to("cpu", copy=True)
        return state

    def optimizer_state(self, model: nn.Module, optimizer) -> dict:
        """The full optimizer state by parameter name ({"state": {name: ...}, "param_groups":
        [{..., "params": [names]}]}), as `TorchStrategy` writes it. Under ZeRO it is collective
        and only rank 0 (which saves it) gets the tensors; the others get their names only."""
        names = self._order(optimizer)
        packed = optimizer.state_dict(only_on_master=True) if self.zero else optimizer.unwrap().state_dict()
        state = {names[i]: {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v for k, v in s.items()}
                 for i, s in packed["state"].items()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
                  for g in packed["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, model: nn.Module, optimizer, state: dict) -> None:
        names = self._order(optimizer)
        index = {name: i for i, name in enumerate(names)}
        groups, saved = optimizer.param_groups, state["param_groups"]
        if len(saved) != len(groups):
            raise ValueError(f"optimizer state has {len(saved)} parameter groups, the optimizer {len(groups)}")
        packed_groups, start = [], 0
        for group, saved_group in zip(groups, saved):
            ours = names[start:start + len(group["params"])]
            if set(ours) != set(saved_group["params"]):
                missing, extra = sorted(set(ours) - set(saved_group["params"])), \
                    sorted(set(saved_group["params"]) - set(ours))
                raise ValueError(f"optimizer state does not match the trained parameters: missing {missing[:4]}, "
                                 f"unexpected {extra[:4]}")
            # Ours, in our order: torch pairs saved and current parameters by position.
            packed_groups.append({**{k: v for k, v in saved_group.items() if k != "params"},
                                  "params": list(range(start, start + len(ours)))})
            start += len(ours)
        packed = {"state": {index[name]: value for name, value in state["state"].items()},
                  "param_groups": packed_groups}
        if self.zero:
            optimizer.load_state_dict(packed)  # keeps this rank's shard of each tensor
        else:
            optimizer.unwrap().load_state_dict(packed)

    # --- internals ---------------------------------------------------------------------------------

    def _order(self, optimizer) -> list[str]:
        """The parameter names in the order of the (inner) optimizer's parameter groups."""
        if self.zero:
            working = optimizer.get_master_to_working_map()
            params = [working[id(p)] for group in optimizer.param_groups for p in group["params"]]
        else:
            params = [p for group in optimizer.param_groups for p in group["params"]]
        return [self._names[id(p)] for p in params]

    def _zero_grad_norm(self, optimizer) -> float:
        """What `LowLevelZeroOptimizer.step` computes before clipping: the 2-norm of the reduced
        gradients, each rank summing the squares of its shards."""
        grads = [g for gid in range(optimizer.num_param_groups) for g in optimizer.get_working_grads_by_group_id(gid)]
        device = self.world.device
        local = torch.stack([g.detach().double().pow(2).sum() for g in grads]).sum().to(device) if grads \
            else torch.zeros((), dtype=torch.float64, device=device)
        dist.all_reduce(local)
        norm = math.sqrt(float(local))
        mixin = optimizer.mixed_precision_mixin
        return norm / mixin.get_grad_div_scale() if mixin is not None else norm

    def _shard(self, full: torch.Tensor, master: torch.Tensor) -> torch.Tensor:
        """This rank's part of `full` laid out as ZeRO lays out `master` (flat, padded)."""
        flat = full.flatten().to(master.device, master.dtype)
        world_size, rank = dist.get_world_size(), dist.get_rank()
        flat = torch.nn.functional.pad(flat, [0, master.numel() * world_size - flat.numel()])
        return flat.view(world_size, -1)[rank]

    def _gather(self, shard: torch.Tensor, numel: int) -> torch.Tensor:
        """A flat ZeRO shard (padded to the world size) gathered whole and cut to `numel`."""
        shard = shard.detach().to(self.world.device).flatten()
        world_size = dist.get_world_size()
        out = torch.empty(shard.numel() * world_size, dtype=shard.dtype, device=shard.device)
        dist.all_gather_into_tensor(out, shard)
        return out[:numel]


def _module(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, BoostedModel) else model


def _launch(world: World) -> None:
    """What `colossalai.launch_from_torch` does that the plugins need, around the trainer's
    process group: ColossalAI's accelerator for this rank's device, and a default group."""
    from colossalai.accelerator import set_accelerator

    set_accelerator("cuda" if world.device.type == "cuda" else "cpu")
    if not dist.is_initialized():
        if world.distributed:
            raise RuntimeError("colossalai: WORLD_SIZE > 1 but no process group (init_world joins it first)")
        backend = "nccl" if world.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
