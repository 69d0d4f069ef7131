"""`parallel.strategy: colossalai` on CPU, in the ColossalAI environment (`make test-colossalai`);
skipped where ColossalAI is not installed.

Without CUDA the strategy runs ColossalAI's TorchDDPPlugin, so two ranks over gloo must compute
what `ddp` does, step for step, and write checkpoints in the same format (weights, EMA, optimizer
state by parameter name) that resume under either strategy. The ZeRO-2 path (LowLevelZeroPlugin)
needs an accelerator; `test_zero2_path_emulated_on_cpu` runs it on CPU behind a stand-in "cuda"
accelerator to check what bricks adds around it (gradient norm, full weights gathered from the
master shards, optimizer state by name, resume) against torch DDP on a small model.

This file is also the worker of that emulation: `python -m torch.distributed.run
--nproc-per-node 2 tests/test_train_colossalai.py zero-emulation fp32`.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest

colossalai = pytest.importorskip("colossalai")

import torch  # noqa: E402

TINY = ["--config", "tiny-cpu"]
COLOSSAL = ["--set", "parallel.strategy=colossalai"]


def _env() -> dict:
    # One thread per process: the two-process runs share the machine's cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train(*args: str, nproc: int | None = 2) -> None:
    """bricks-train under torchrun (`nproc` ranks, a free port), or one plain process."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc else []
    result = subprocess.run([sys.executable, *launcher, "-m", "bricks.train.cli", *TINY, *args],
                            capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def losses(run: Path) -> list[tuple[int, float, float]]:
    from bricks.train.metrics import read_metrics

    return [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(run / "metrics.jsonl")]


def assert_same_steps(a, b, tol=1e-5):
    assert [s for s, *_ in a] == [s for s, *_ in b]
    for (step, loss_a, norm_a), (_, loss_b, norm_b) in zip(a, b):
        assert loss_a == pytest.approx(loss_b, abs=tol), f"step {step}: loss {loss_a} != {loss_b}"
        assert norm_a == pytest.approx(norm_b, abs=tol), f"step {step}: grad norm {norm_a} != {norm_b}"


@pytest.fixture(scope="module")
def shards(request, corpus, tmp_path_factory) -> Path:
    """The suite's `brick_shards`; under a transformers older than the project's (ColossalAI
    pins 4.51.3), whose tiny Qwen2-VL captioner cannot be built, the same recipe without
    `vlm_caption` and a fixed caption per row instead."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) >= Version("4.56"):
        return request.getfixturevalue("brick_shards")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bricks.engine.recipe import from_dict
    from bricks.engine.run import run

    out = tmp_path_factory.mktemp("colossal-shards") / "out"
    process = [{"shot_split": {"min_scene_len": 15}}, {"clip_length": {"min_frames": 15, "max_frames": 60}},
               {"middle_frame": {}}, {"encode_clips": {}}]
    run(from_dict({"input": str(corpus[0]), "output": str(out), "executor": {"mode": "local"}, "process": process}))
    words = "red blue yellow green brick house tree car figure street".split()
    files = sorted((out / "shards").glob("*.parquet"))
    assert files
    for file in files:
        source, tmp = pq.ParquetFile(file), file.with_name(f".{file.name}.tmp")
        column = source.schema_arrow.get_field_index("text")  # present, null until captioned
        schema = source.schema_arrow.set(column, pa.field("text", pa.string()))
        with pq.ParquetWriter(tmp, schema) as writer:
            for group in range(source.num_row_groups):  # keep the row-group layout the plan reads
                table = source.read_row_group(group)
                text = [f"a {words[i % 10]} brick {words[(i * 3 + group) % 10]}" for i in range(table.num_rows)]
                writer.write_table(table.set_column(column, schema.field(column), pa.array(text, pa.string())))
        tmp.replace(file)
    return out


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> dict[str, Path]:
    """Four steps on two ranks, under ddp and under colossalai (checkpoint at step 4)."""
    folder = tmp_path_factory.mktemp("colossal-runs")
    found = {}
    for name, extra in (("ddp", []), ("colossalai", COLOSSAL)):
        found[name] = folder / name
        train("--data", str(shards), "--output", str(found[name]), "--max-steps", "4", *extra)
    return found


def test_colossalai_matches_ddp_and_writes_loadable_checkpoints(runs):
    from safetensors.torch import load_file

    from bricks.model.stdit2 import STDiT2

    assert len(losses(runs["colossalai"])) == 4
    assert_same_steps(losses(runs["colossalai"]), losses(runs["ddp"]))
    assert "TorchDDPPlugin" in (runs["colossalai"] / "train.log").read_text()

    ckpt = {name: run / "checkpoints" / "step-00000004" for name, run in runs.items()}
    model = STDiT2.from_pretrained(ckpt["colossalai"] / "model")
    ema = STDiT2.from_pretrained(ckpt["colossalai"] / "ema")
    reference = STDiT2.from_pretrained(ckpt["ddp"] / "model")
    for (name, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), ema.state_dict().values()))
    for which in ("model", "ema"):
        a, b = (load_file(str(ckpt[n] / which / "model.safetensors")) for n in ("colossalai", "ddp"))
        assert list(a) == list(b)

    # The optimizer state is keyed by parameter name, as ddp/fsdp write it.
    ours, theirs = (torch.load(ckpt[n] / "optimizer.pt", map_location="cpu", weights_only=True)
                    for n in ("colossalai", "ddp"))
    assert list(ours["state"]) == list(theirs["state"]) == [n for n, p in model.named_parameters() if p.requires_grad]
    assert [g["params"] for g in ours["param_groups"]] == [g["params"] for g in theirs["param_groups"]]
    for name, state in theirs["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(ours["state"][name][key], value, rtol=1e-5, atol=1e-7, msg=f"{name} {key}")


@pytest.mark.parametrize("first", ["colossalai", "ddp"])
def test_colossalai_resumes_its_own_and_ddp_checkpoints(runs, shards, tmp_path, first):
    run = tmp_path / "run"
    common = ["--data", str(shards), "--output", str(run)]
    train(*common, "--max-steps", "2", *(COLOSSAL if first == "colossalai" else []))
    train(*common, "--max-steps", "4", "--resume", *COLOSSAL)
    assert_same_steps(losses(run), losses(runs["colossalai"]))


def test_colossalai_in_one_process(shards, tmp_path):
    """No torchrun: the strategy makes the one-rank process group the plugins need."""
    for name, extra in (("ddp", []), ("colossalai", COLOSSAL)):
        train("--data", str(shards), "--output", str(tmp_path / name), "--max-steps", "2", *extra, nproc=None)
    assert_same_steps(losses(tmp_path / "colossalai"), losses(tmp_path / "ddp"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero2_path_emulated_on_cpu(precision):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             __file__, "zero-emulation", precision], capture_output=True, text=True, env=_env(),
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count("ZeRO-2 emulation OK") == 2


# --- the emulation's worker -----------------------------------------------------------------------


def _emulate_zero2(precision: str) -> None:
    """ColossalStrategy's ZeRO-2 path on two CPU ranks against torch DDP + AdamW + clipping."""
    import torch.distributed as dist
    from colossalai.accelerator import CpuAccelerator, set_accelerator
    from colossalai.booster import Booster
    from colossalai.booster.plugin import LowLevelZeroPlugin
    from torch import nn
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from bricks.train.colossal import BoostedModel, ColossalStrategy
    from bricks.train.parallel import World

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()

    def reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
        total = input.clone()  # gloo has no reduce-scatter
        dist.all_reduce(total, op=op, group=group)
        output.copy_(total.chunk(dist.get_world_size(group))[dist.get_rank(group)])
        assert not async_op

    dist.reduce_scatter_tensor = reduce_scatter_tensor

    class Stream:
        def wait_stream(self, other):
            pass

    class StandInCuda(CpuAccelerator):
        """The CPU, under the name ZeRO insists on, with no-op streams."""

        def __init__(self):
            super().__init__()
            self._name = "cuda"

        def Stream(self, *args, **kwargs):  # noqa: N802 (ColossalAI's name)
            return Stream()

        def current_stream(self, *args):
            return Stream()

        def stream(self, stream):
            return nullcontext()

        def synchronize(self, *args):
            pass

    max_norm, lr = 0.05, 1e-2
    tol = 1e-6 if precision == "fp32" else 3e-2

    class Net(nn.Module):
        def __init__(self):
            super().__init__()  # odd sizes: every parameter is padded to shard over two ranks
            self.a, self.frozen, self.b = nn.Linear(7, 13), nn.Linear(13, 13), nn.Linear(13, 3)
            self.frozen.requires_grad_(False)
            self.register_buffer("scale", torch.tensor([1.5, 2.0, 0.25]))

        def forward(self, x):
            return self.b(torch.tanh(self.frozen(self.a(x)))) * self.scale

    def make_optimizer(params):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.1)

    def zero_strategy() -> ColossalStrategy:
        strategy = ColossalStrategy(World(rank, world_size, rank, torch.device("cpu")), precision="fp32",
                                    max_norm=max_norm)
        # What __init__ does for a CUDA world (overlap_communication off: no streams here).
        set_accelerator(StandInCuda())
        strategy.zero, strategy.precision = True, precision
        strategy.booster = Booster(plugin=LowLevelZeroPlugin(stage=2, precision=precision, initial_scale=2**16,
                                                             max_norm=max_norm, overlap_communication=False))
        return strategy

    def batch(step):
        generator = torch.Generator().manual_seed(step * 10 + rank)
        return torch.randn(5, 7, generator=generator), torch.randn(5, 3, generator=generator)

    def zero_step(strategy, model, optimizer, step) -> float:
        x, y = batch(step)
        loss = ((model(x) - y) ** 2).float().mean()
        strategy.backward(loss, optimizer)
        norm = strategy.clip_grad_norm(model, optimizer, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    torch.manual_seed(0)
    reference = Net()
    initial = copy.deepcopy(reference.state_dict())
    ddp = nn.parallel.DistributedDataParallel(reference)
    reference_optimizer = make_optimizer([p for p in reference.parameters() if p.requires_grad])

    def reference_step(step) -> float:
        x, y = batch(step)
        ((ddp(x) - y) ** 2).mean().backward()
        norm = torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.grad is not None], max_norm)
        reference_optimizer.step()
        reference_optimizer.zero_grad()
        return float(norm)

    strategy = zero_strategy()
    net = Net()
    net.load_state_dict(initial)
    model, optimizer = strategy.prepare(net, make_optimizer)
    assert isinstance(model, BoostedModel) and model.module is net
    for key, value in strategy.model_state(model).items():  # the float32 masters, not the bf16 copies
        assert torch.equal(value, initial[key]), key
    for step in range(3):
        want, got = reference_step(step), zero_step(strategy, model, optimizer, step)
        assert abs(got - want) <= tol * max(1.0, want), (step, got, want)

    state = strategy.model_state(model)
    assert list(state) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert state[key].dtype == torch.float32 and state[key].device.type == "cpu", key
        assert torch.allclose(state[key], value, atol=tol, rtol=0), (key, (state[key] - value).abs().max())
    for key in ("frozen.weight", "frozen.bias", "scale"):
        assert torch.equal(state[key], initial[key]), key  # the float32 originals, not bf16 copies

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    box = [get_optimizer_state_dict(reference, reference_optimizer, options=options)]
    dist.broadcast_object_list(box, src=0)  # (torch 2.5 fills it on rank 0 only)
    want = box[0]
    got = strategy.optimizer_state(model, optimizer)
    assert list(got["state"]) == list(want["state"])
    assert [g["params"] for g in got["param_groups"]] == [g["params"] for g in want["param_groups"]]
    for name, values in (want["state"] if rank == 0 else {}).items():  # the tensors: on rank 0, which saves
        for key, value in values.items():
            assert got["state"][name][key].shape == value.shape, (name, key)
            assert torch.allclose(got["state"][name][key].float(), value.float(), atol=10 * tol, rtol=10 * tol), \
                (name, key)

    # Resume: a fresh ZeRO model and optimizer from the full weights and an optimizer state, as
    # the trainer does on every rank from the files that rank 0 wrote.
    box = [got]
    dist.broadcast_object_list(box, src=0)
    saved = box[0]

    def resumed(optimizer_state) -> dict:
        strategy = zero_strategy()
        net = Net()
        net.load_state_dict(state)
        model, optimizer = strategy.prepare(net, make_optimizer)
        strategy.load_optimizer_state(model, optimizer, optimizer_state)
        for step in range(3, 5):
            zero_step(strategy, model, optimizer, step)
        return strategy.model_state(model)

    from_own, from_torch = resumed(saved), resumed(want)
    for step in range(3, 5):  # the run that was not interrupted
        reference_step(step)
        zero_step(strategy, model, optimizer, step)
    uninterrupted = strategy.model_state(model)
    for key, value in uninterrupted.items():
        assert torch.equal(from_own[key], value), key  # exactly where it would have been
    error = max((from_torch[k] - v).abs().max().item() for k, v in reference.state_dict().items())
    assert error <= 10 * tol, error
    print(f"rank {rank} {precision}: ZeRO-2 emulation OK (largest weight difference after resuming: {error:.1e})")
    dist.destroy_process_group()


if __name__ == "__main__" and sys.argv[1:2] == ["zero-emulation"]:
    _emulate_zero2(sys.argv[2])
