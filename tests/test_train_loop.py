"""`bricks-train` end to end on CPU with the tiny models and shards that `bricks-dj` wrote:
one process, kill and resume, DDP and FSDP over gloo, two torchrun nodes, bad samples."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from bricks.model.stdit2 import STDiT2  # noqa: E402
from bricks.train.checkpoint import checkpoints  # noqa: E402
from bricks.train.cli import main as train_cli  # noqa: E402
from bricks.train.metrics import read_metrics  # noqa: E402

from conftest import free_port  # noqa: E402

TINY = ["--config", "tiny-cpu"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bricks.train.cli", *args], capture_output=True, text=True,
                          env=_env(), timeout=300)


def torchrun(*args: str, nproc: int = 2, extra: tuple = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *extra,
            "-m", "bricks.train.cli", *args]


def _env() -> dict:
    # One thread per process: the two-process runs share two cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}




def losses(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run / "metrics.jsonl")]


def assert_same_losses(a, b, tol=1e-6):
    assert [s for s, _ in a] == [s for s, _ in b]
    for (step, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, rel=tol, abs=tol), f"step {step}: {x} != {y}"


def test_one_process_trains_logs_checkpoints_and_samples(brick_shards, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(train_cli, [*TINY, "--data", str(brick_shards), "--output", str(run),
                                            "--max-steps", "6", "--set", "sampling.every=3",
                                            "--set", "logging.tensorboard=true"])
    assert result.exit_code == 0, result.output
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    for m in metrics:
        assert {"loss", "mse", "vb", "lr", "grad_norm", "samples_per_s", "step_time", "data_wait", "encode",
                "fwd_bwd", "optim", "skipped"} <= set(m)
        assert 0 < m["loss"] < 10 and m["grad_norm"] > 0 and m["samples"] > 0
    assert metrics[0]["lr"] == pytest.approx(1e-6) and metrics[-1]["lr"] == pytest.approx(1e-4)  # the warm-up
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "train.log").read_text().count("step 6") >= 1

    # ckpt_every 4, keep_last 2, and a last one at the end.
    assert [c.step for c in checkpoints(run)] == [4, 6]
    last = checkpoints(run)[-1]
    model = STDiT2.from_pretrained(last.path / "model")
    ema = STDiT2.from_pretrained(last.path / "ema")
    trained = dict(model.named_parameters())
    moved = [n for n, p in ema.named_parameters() if not torch.equal(p, trained[n])]
    assert moved  # the EMA lags the weights
    state = last.state
    assert state["step"] == 6 and state["loader"]["consumed"] == 6 and state["loader"]["epoch"] == 0

    # Fixed-seed samples at steps 3 and 6, 4-frame MP4s.
    for step in (3, 6):
        files = list((run / "samples" / f"step-{step:08d}").glob("*.mp4"))
        assert len(files) == 1 and files[0].stat().st_size > 0


def test_kill_and_resume_gives_the_losses_of_an_uninterrupted_run(brick_shards, tmp_path):
    steps = ["--max-steps", "24", "--set", "train.ckpt_every=2", "--set", "train.keep_last=3"]
    reference = tmp_path / "reference"
    done = run_cli(*TINY, "--data", str(brick_shards), "--output", str(reference), *steps)
    assert done.returncode == 0, done.stderr

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "bricks.train.cli", *TINY, "--data", str(brick_shards),
                             "--output", str(run), *steps], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not checkpoints(run) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoints(run)[-1].step
    assert killed_at < 24  # it did not get to the end

    refused = run_cli(*TINY, "--data", str(brick_shards), "--output", str(run), *steps)
    assert refused.returncode == 2 and "--resume" in refused.stderr  # a run directory is not overwritten

    resumed = run_cli(*TINY, "--data", str(brick_shards), "--output", str(run), *steps, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step-{killed_at:08d}" in resumed.stderr
    assert_same_losses(losses(run), losses(reference), tol=0)  # bitwise: every draw is seeded per step
    assert read_metrics(run / "metrics.jsonl")[-1]["epoch"] == 1  # across an epoch boundary
    final = "checkpoints/step-00000024"
    for part in ("model/model.safetensors", "ema/model.safetensors"):
        assert (run / final / part).read_bytes() == (reference / final / part).read_bytes()


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_stops(brick_shards, tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "--data", str(brick_shards), "--output", str(run), "--set", "train.ckpt_every=1000"]
    proc = subprocess.Popen([sys.executable, "-m", "bricks.train.cli", *args, "--max-steps", "200"], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while (not metrics.exists() or len(read_metrics(metrics)) < 3) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + 15, stderr[-2000:]
    assert "rerun with --resume" in stderr
    last = read_metrics(metrics)[-1]["step"]
    assert 3 <= last < 200 and checkpoints(run)[-1].step == last  # the step it stopped at, saved
    resumed = run_cli(*args, "--resume", "--max-steps", str(last + 2))
    assert resumed.returncode == 0, resumed.stderr
    assert [m["step"] for m in read_metrics(metrics)] == list(range(1, last + 3))


def test_resume_refuses_changed_data_unless_allowed(brick_shards, tmp_path):
    run = tmp_path / "run"
    assert run_cli(*TINY, "--data", str(brick_shards), "--output", str(run), "--max-steps", "2").returncode == 0
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    table = pq.read_table(brick_shards / "shards")
    pq.write_table(table.slice(0, table.num_rows - 4), fewer / "part-00000.parquet")

    refused = run_cli(*TINY, "--data", str(fewer), "--output", str(run), "--max-steps", "4", "--resume")
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("bricks-train: error:")]
    assert len(errors) == 1 and "differs from the one this checkpoint was trained on" in errors[0]

    allowed = run_cli(*TINY, "--data", str(fewer), "--output", str(run), "--max-steps", "4", "--resume",
                      "--allow-data-change")
    assert allowed.returncode == 0, allowed.stderr
    assert "starting epoch 1 on the new data" in allowed.stderr
    assert checkpoints(run)[-1].state["loader"]["epoch"] == 1


def test_ddp_fsdp_and_two_torchrun_nodes_agree(brick_shards, tmp_path):
    args = [*TINY, "--data", str(brick_shards), "--max-steps", "5"]
    runs = {name: tmp_path / name for name in ("ddp", "fsdp", "nodes")}
    for name, strategy in (("ddp", "ddp"), ("fsdp", "fsdp")):
        done = subprocess.run(torchrun(*args, "--output", str(runs[name]), "--set", f"parallel.strategy={strategy}",
                                       extra=("--master-port", str(free_port()))),
                              capture_output=True, text=True, env=_env(), timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    # Two "nodes" of one process each, meeting at a c10d rendezvous on localhost.
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen(torchrun(*args, "--output", str(runs["nodes"]), nproc=1,
                                       extra=("--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                                              "--rdzv-id", "bricks-test")),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
             for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-3000:] + outputs[1][-3000:]

    ddp = losses(runs["ddp"])
    assert len(ddp) == 5
    assert_same_losses(losses(runs["nodes"]), ddp, tol=1e-6)  # the same world of 2, however launched
    assert_same_losses(losses(runs["fsdp"]), ddp, tol=1e-5)  # sharded: the same math, other summation order
    # Two ranks saw other batches than one process would: the plan deals row-group slices to both.
    assert checkpoints(runs["fsdp"])[-1].state["world_size"] == 2
    full = STDiT2.from_pretrained(checkpoints(runs["fsdp"])[-1].path / "model")
    ref = STDiT2.from_pretrained(checkpoints(runs["ddp"])[-1].path / "model")
    for (name, a), b in zip(full.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_bad_samples_are_skipped_and_counted(brick_shards, tmp_path):
    """Every clip's media is corrupt: clip batches come out empty, and with the skip bound lifted
    the run goes on (by default it stops: tests/test_train_seams.py)."""
    bad = tmp_path / "bad"
    bad.mkdir()
    table = pq.read_table(brick_shards / "shards")
    media = [m if kind == "image" else b"\x00not an mp4" for m, kind in
             zip(table["media"].to_pylist(), table["kind"].to_pylist())]
    import pyarrow as pa

    table = table.set_column(table.schema.get_field_index("media"), "media", pa.array(media, pa.binary()))
    pq.write_table(table, bad / "part-00000.parquet")
    run = tmp_path / "run"
    result = CliRunner().invoke(train_cli, [*TINY, "--data", str(bad), "--output", str(run), "--max-steps", "10",
                                            "--set", "data.max_skipped_fraction=1"])
    assert result.exit_code == 0, result.output
    metrics = read_metrics(run / "metrics.jsonl")
    assert len(metrics) == 10
    empty = [m for m in metrics if m["samples"] == 0]
    assert empty and all(m["loss"] is None and m["skipped"] > 0 for m in empty)
    assert any(m["samples"] > 0 and m["loss"] > 0 for m in metrics)  # the images still train
    assert metrics[-1]["skipped_total"] == sum(m["skipped"] for m in metrics)


def test_precomputed_latents_and_t5_states_replace_decoding_and_encoders(brick_shards, tmp_path):
    """Shards carrying `vae_latent` and `t5_states` train without touching `media` (here garbage)."""
    import io

    import numpy as np
    import pyarrow as pa

    table = pq.read_table(brick_shards / "shards")
    rng = np.random.default_rng(0)

    def npy(shape):
        buffer = io.BytesIO()
        np.save(buffer, rng.standard_normal(shape).astype(np.float16))
        return buffer.getvalue()

    # tiny-cpu's buckets at 144p 16:9: images [4, 1, 18, 32], clips of 8 frames [4, 8, 18, 32].
    latents = [npy((4, 1 if kind == "image" else 8, 18, 32)) for kind in table["kind"].to_pylist()]
    latents[0] = npy((4, 3, 18, 32))  # the wrong length for its bucket: skipped with the reason
    states = [npy((int(rng.integers(3, 12)), 32)) for _ in range(table.num_rows)]
    table = table.set_column(table.schema.get_field_index("media"), "media",
                             pa.array([b"not a video"] * table.num_rows, pa.binary()))
    table = table.append_column("vae_latent", pa.array(latents, pa.binary()))
    table = table.append_column("t5_states", pa.array(states, pa.binary()))
    folder = tmp_path / "precomputed"
    folder.mkdir()
    pq.write_table(table, folder / "part-00000.parquet")

    run = tmp_path / "run"
    result = CliRunner().invoke(train_cli, [*TINY, "--data", str(folder), "--output", str(run),
                                            "--max-steps", "18"])  # the whole first epoch
    assert result.exit_code == 0, result.output
    metrics = read_metrics(run / "metrics.jsonl")
    assert len(metrics) == 18 and all(m["loss"] is not None and m["loss"] > 0 for m in metrics)
    assert metrics[-1]["skipped_total"] == 1  # only the misshapen latent; no media was decoded


def test_config_errors_are_one_line_with_exit_status_2(brick_shards, tmp_path):
    runner = CliRunner()
    cases = [
        (["--set", "optim.lrr=1"], "unknown parameter 'optim.lrr'; did you mean 'lr'?"),
        (["--set", "lr_schedule.kind=one_cycle"], "one_cycle needs final_lr"),
        (["--set", "data.bucket_config.999p={1: [1, 2]}"], "unknown resolution '999p'"),
        (["--set", "diffusion.mask_ratios={mask_no: 0.5}"], "sum to 1"),
    ]
    for extra, message in cases:
        result = runner.invoke(train_cli, [*TINY, "--data", str(brick_shards), "--output", str(tmp_path / "x"), *extra])
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
        assert result.output.strip().count("\n") == 0
    missing = runner.invoke(train_cli, ["--config", "nope", "--data", str(brick_shards), "--output", str(tmp_path)])
    assert missing.exit_code == 2 and "shipped: text2bricks-360p-32f" in missing.output
    no_data = runner.invoke(train_cli, [*TINY, "--data", str(tmp_path / "none"), "--output", str(tmp_path / "y")])
    assert no_data.exit_code == 2 and "does not exist" in no_data.output
    real = runner.invoke(train_cli, ["--config", "text2bricks-360p-32f", "--data", str(brick_shards), "--output",
                                     str(tmp_path / "z"), "--set", "logging.tensorboard=false"],
                         env={"HF_HUB_CACHE": str(tmp_path / "empty-cache"), "BRICKS_MODEL_DIR": str(tmp_path)})
    assert real.exit_code == 2 and "hf download" in real.output  # real weights are never replaced by random ones
    listed = runner.invoke(train_cli, ["--list-configs"])
    assert listed.exit_code == 0 and {"tiny-cpu", "text2bricks-360p-32f", "text2bricks-360p-64f"} <= {
        line.split("\t")[0] for line in listed.output.splitlines()}
    shutil.rmtree(tmp_path / "x", ignore_errors=True)
