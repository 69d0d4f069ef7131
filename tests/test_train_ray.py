"""`bricks-train --ray-address`: the tiny training run through Ray Train on a Ray cluster started
here (a head node of 2 CPUs on 127.0.0.1, two CPU workers over gloo) gives the losses of
torchrun with the same world size and seed; a worker's error is one line; a cluster that is not
there, or a Ray without Ray Train, is one line before anything starts."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ray.train")

from click.testing import CliRunner  # noqa: E402
from conftest import free_port  # noqa: E402
from test_train_loop import TINY, _env, losses, torchrun  # noqa: E402

from bricks.model.stdit2 import STDiT2  # noqa: E402
from bricks.train.checkpoint import checkpoints  # noqa: E402
from bricks.train.cli import main as train_cli  # noqa: E402

STEPS = "5"


def ray_env(**extra: str) -> dict:
    """The environment of the driver and the head: no cluster settings from outside, no
    authentication on a cluster that only 127.0.0.1 reaches."""
    drop = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_COLOR_PREFIX", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    return {**{k: v for k, v in _env().items() if k not in drop}, "RAY_AUTH_MODE": "disabled", **extra}


def bricks_train(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bricks.train.cli", *args], capture_output=True, text=True,
                          env=env or ray_env(), timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("bricks-train: error:")]


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` on 127.0.0.1 with 2 CPUs; stopped (its own processes only) at the end."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    folder = Path(tempfile.mkdtemp(prefix="ray-"))  # short: Ray's socket paths have a length limit
    env = ray_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # listen on 127.0.0.1 only
                  RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # stop at once when told
                  RAY_ADDRESS=address)  # this cluster's actors find it, whatever else runs here
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port", str(port),
               "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", str(folder),
               "--ray-client-server-port", str(free_port()), "--dashboard-port", str(free_port()),
               "--dashboard-agent-listen-port", str(free_port())]
    log = folder / "head.log"
    with log.open("w") as out:
        head = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start --head did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield address
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def runs(brick_shards, ray_head, tmp_path_factory) -> dict:
    """The same 5 steps with torchrun (2 processes) and through Ray Train (2 workers)."""
    root = tmp_path_factory.mktemp("ray-train")
    args = [*TINY, "--data", str(brick_shards), "--max-steps", STEPS]
    torch_run, ray_run, scratch = root / "torchrun", root / "ray", root / "tmp"
    done = subprocess.run(torchrun(*args, "--output", str(torch_run), extra=("--master-port", str(free_port()))),
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    scratch.mkdir()
    ray = bricks_train(*args, "--output", str(ray_run), "--ray-address", ray_head, "--ray-workers", "2",
                       env=ray_env(TMPDIR=str(scratch)))
    return {"torchrun": torch_run, "ray": ray_run, "proc": ray, "tmp": scratch, "args": args}


def test_ray_train_workers_give_the_losses_of_torchrun(runs):
    proc = runs["proc"]
    assert proc.returncode == 0, proc.stderr[-5000:]
    ray, ref = losses(runs["ray"]), losses(runs["torchrun"])
    assert len(ref) == int(STEPS)
    # Bit for bit: the same ranks, seeds, batches and gloo reductions, however the ranks started.
    assert ray == ref
    last = checkpoints(runs["ray"])[-1]
    assert last.state["world_size"] == 2
    model = STDiT2.from_pretrained(last.path / "model")
    ref_model = STDiT2.from_pretrained(checkpoints(runs["torchrun"])[-1].path / "model")
    for (name, a), b in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(a, b), name
    # The driver shows rank 0's progress as a plain run does.
    assert f"[rank 0] INFO step {STEPS}  loss" in proc.stderr
    assert f"INFO done: {STEPS} steps" in proc.stderr


def test_ray_train_leaves_nothing_of_its_own_in_the_run_directory(runs):
    assert runs["proc"].returncode == 0, runs["proc"].stderr[-5000:]
    assert sorted(p.name for p in runs["ray"].iterdir()) == sorted(p.name for p in runs["torchrun"].iterdir())
    assert sorted(p.name for p in (runs["ray"] / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]
    assert list(runs["tmp"].iterdir()) == []  # Ray Train's storage folder is gone too


def test_a_workers_error_is_one_line_with_exit_status_2(runs, ray_head):
    """The run directory holds checkpoints and --resume is not given: every rank refuses."""
    assert runs["proc"].returncode == 0, runs["proc"].stderr[-5000:]
    again = bricks_train(*runs["args"], "--output", str(runs["ray"]), "--ray-address", ray_head, "--ray-workers", "2")
    assert again.returncode == 2, again.stderr[-5000:]
    assert len(error_lines(again.stderr)) == 1, again.stderr[-5000:]
    assert "already holds checkpoints: pass --resume" in error_lines(again.stderr)[0]
    assert "Traceback" not in again.stderr, again.stderr[-5000:]


@pytest.fixture
def cli(monkeypatch, tmp_path):
    """bricks-train in this process, its Ray settings undone afterwards; (exit code, stderr)."""
    for name in ("RAY_DEDUP_LOGS", "RAY_COLOR_PREFIX", "RAY_TRAIN_V2_ENABLED"):
        monkeypatch.setenv(name, "")  # recorded as it was, so whatever the launcher sets goes
        monkeypatch.delenv(name)

    def invoke(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(train_cli, [*TINY, "--data", str(tmp_path), "--output", str(tmp_path / "run"),
                                                *args])
        assert not (tmp_path / "run").exists()
        return result.exit_code, result.stderr

    return invoke


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:{port}", "no Ray cluster found at 127.0.0.1:{port} (nothing accepts connections there)"),
    ("head-node", "--ray-address 'head-node': expected HOST:PORT"),
])
def test_no_cluster_at_the_address_is_one_line(cli, address, expected):
    port = free_port()
    status, stderr = cli("--ray-address", address.format(port=port), "--ray-workers", "2")
    assert status == 2, stderr
    (line,) = error_lines(stderr)
    assert line.startswith(f"bricks-train: error: {expected.format(port=port)}"), line


def test_without_ray_train_the_launch_is_one_line_naming_the_extra(cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray.train", None)  # `import ray.train` fails as if not installed
    status, stderr = cli("--ray-address", "auto", "--ray-workers", "2")
    assert status == 2, stderr
    (line,) = error_lines(stderr)
    assert "needs Ray Train" in line and "pip install 'bricks[train]'" in line


@pytest.mark.parametrize("args, expected", [
    (["--ray-workers", "2"], "--ray-workers needs --ray-address"),
    (["--ray-gpus-per-worker", "1"], "--ray-gpus-per-worker needs --ray-address"),
    (["--ray-address", "auto"], "--ray-address needs --ray-workers N"),
])
def test_ray_options_come_together(cli, args, expected):
    status, stderr = cli(*args)
    assert status == 2, stderr
    assert expected in stderr
