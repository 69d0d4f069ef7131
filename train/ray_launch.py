"""`bricks-train` on a Ray cluster through Ray Train: the cluster that ran `bricks-dj` also trains.

    bricks-train --config text2bricks-360p-32f --data /shared/shards --output /shared/runs/t2b \\
        --ray-address auto --ray-workers 16

This process (the driver) only launches and waits. It joins the cluster, then Ray Train's
`TorchTrainer` starts `--ray-workers` workers, joins them in one process group (NCCL with a GPU
each, gloo on CPUs) and sets RANK, WORLD_SIZE and LOCAL_RANK as torchrun would; each worker runs
the same training loop as a torchrun rank, which takes that process group as it is. The losses
are those of a torchrun run with the same world size and seed.

Every worker reads the shards and rank 0 writes the run directory, so on more than one machine
both must be shared storage, under the same path on every node. Ray Train's own bookkeeping (a
`RunConfig(storage_path=...)` it insists on) goes to a temporary folder on this machine, removed
when the run ends: nothing of Ray's lands in the run directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

from bricks.common.errors import first_line

from .config import TrainConfig
from .trainer import RunOptions

log = logging.getLogger("bricks")

# A head node across a slow network answers in this time; a dead address fails in it.
CONNECT_TIMEOUT_S = 5.0
LOOPBACK = ("localhost", "127.0.0.1", "::1")
INSTALL_HINT = "pip install 'bricks[train]'"
HINT = "start one with `ray start --head` (then --ray-address auto), or pass --ray-address local"


class RayLaunchError(RuntimeError):
    pass


@dataclass(frozen=True)
class RayLaunch:
    address: str
    """HOST:PORT or ray://HOST:PORT of a running cluster, `auto` (the cluster this machine is a
    node of), or `local` (Ray started on this machine for this run)."""
    workers: int
    """Ray Train workers: the world size."""
    gpus_per_worker: int | None = None
    """1: each worker trains on a GPU of its own, over NCCL; 0: on CPU, over gloo. None: 1 when
    the cluster has GPUs."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves for each worker (and sets OMP_NUM_THREADS to)."""


def launch(config: TrainConfig, options: RunOptions, spec: RayLaunch, verbose: bool = False) -> dict:
    """Train on Ray Train workers and wait; rank 0's summary, as `trainer.train` returns it.
    A worker's own error (a bad shard, an existing run directory, ...) is raised here as it was
    raised there."""
    if spec.workers < 1:
        raise RayLaunchError(f"--ray-workers {spec.workers}: give at least 1 worker")
    _check_address(spec.address)
    _quiet_worker_logs()
    train_api = _import_ray_train()
    _join(spec.address)
    gpus = _gpus_per_worker(spec)
    if gpus and options.device is not None and not options.device.startswith("cuda"):
        raise RayLaunchError(f"--device {options.device} with GPU workers (--ray-gpus-per-worker 1): "
                             "leave --device out, or pass --ray-gpus-per-worker 0 for CPU workers")
    _check_resources(spec.workers, spec.cpus_per_worker, gpus)
    backend = "nccl" if gpus else "gloo"
    log.info("Ray Train: %d workers (%s), %s", spec.workers, f"{gpus} GPU each" if gpus else "CPU", backend)

    storage = tempfile.mkdtemp(prefix="bricks-train-ray-")
    trainer = train_api.TorchTrainer(
        _train_worker,
        train_loop_config={"config": config, "options": _absolute(options), "cwd": os.getcwd(), "verbose": verbose},
        scaling_config=train_api.ScalingConfig(num_workers=spec.workers, use_gpu=bool(gpus),
                                               resources_per_worker={"CPU": spec.cpus_per_worker,
                                                                     **({"GPU": gpus} if gpus else {})}),
        torch_config=train_api.TorchConfig(backend=backend, timeout_s=int(config.parallel.timeout_minutes * 60)),
        run_config=train_api.RunConfig(
            name="bricks-train", storage_path=storage,
            failure_config=_no_retries(train_api.FailureConfig),
            **({"logging_config": train_api.LoggingConfig(log_level="WARNING")} if train_api.LoggingConfig else {})),
    )
    try:
        result = trainer.fit()
    except train_api.WorkerGroupError as exc:
        raise _worker_error(exc) from None
    except train_api.ControllerError as exc:
        raise RayLaunchError(f"Ray Train failed: {first_line(exc.controller_failure)}") from None
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    return result.return_value


def _train_worker(loop: dict) -> dict:
    """One rank, in a Ray Train worker: the process group and RANK, WORLD_SIZE, LOCAL_RANK are
    Ray Train's; from here on it is the torchrun rank's training loop."""
    import ray.train.torch

    from .cli import setup_logging
    from .trainer import train

    setup_logging(loop["verbose"], own_handler=True)
    # Ray Train logs a failing rank's traceback here, and the driver reports the same error (in
    # one line for bricks' own, with that traceback for the rest): once is enough.
    logging.getLogger("ray.train.v2._internal.util").addFilter(
        lambda record: not record.getMessage().startswith("Error in training function"))
    # Ray Train starts workers in a folder of its own; relative paths in the config mean what
    # they meant where bricks-train was started, wherever that folder exists.
    if os.path.isdir(loop["cwd"]):
        os.chdir(loop["cwd"])
    options: RunOptions = loop["options"]
    if options.device is None:
        options = replace(options, device=str(ray.train.torch.get_device()))
    return train(loop["config"], options)  # the driver gets rank 0's


def _import_ray_train() -> SimpleNamespace:
    # Ray Train's V2 API (the default in recent Rays; read when ray.train is imported) is the
    # one that hands back each worker's own exception.
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    try:
        import ray.train as api
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError as exc:
        raise RayLaunchError(f"--ray-address needs Ray Train ({exc}): {INSTALL_HINT}") from None
    if not hasattr(api, "WorkerGroupError") or "return_value" not in {f.name for f in fields(api.Result)}:
        raise RayLaunchError(f"--ray-address needs Ray Train's V2 API, which ray {_ray_version()} lacks or has "
                             "switched off (RAY_TRAIN_V2_ENABLED=0): upgrade ray[train], or unset that variable")
    return SimpleNamespace(TorchTrainer=TorchTrainer, TorchConfig=TorchConfig, ScalingConfig=api.ScalingConfig,
                           RunConfig=api.RunConfig, FailureConfig=api.FailureConfig,
                           LoggingConfig=getattr(api, "LoggingConfig", None), WorkerGroupError=api.WorkerGroupError,
                           ControllerError=api.ControllerError)


def _no_retries(failure_config):
    """A failed or preempted worker fails the run, as under torchrun: a rerun with --resume
    continues it from its latest checkpoint (a retry by Ray Train would start it afresh)."""
    known = {f.name for f in fields(failure_config)}
    preemptions = {"max_preemption_failures": 0} if "max_preemption_failures" in known else {}
    return failure_config(max_failures=0, **preemptions)


def _ray_version() -> str:
    import ray

    return ray.__version__


def _check_address(address: str) -> None:
    """Before Ray is imported (it reads these settings then): a cluster that is not there is
    one line, and a Ray on this machine's loopback only is reached there."""
    if address == "local":
        # A Ray started here listens on 127.0.0.1 only, with the token authentication it
        # defaults to, without its warnings about either.
        _before_ray_import("RAY_AUTH_MODE", "token")
        _before_ray_import("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        return
    if address == "auto":
        return  # Ray looks the cluster up itself
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme == "ray" and parts.hostname and port is None:
        return  # Ray's client has a default port
    if not parts.hostname or port is None or parts.scheme not in ("", "ray"):
        raise RayLaunchError(f"--ray-address {address!r}: expected HOST:PORT (e.g. 10.0.0.5:6379), "
                             "ray://HOST:PORT, auto or local")
    if parts.hostname not in LOOPBACK:
        if not _listens(parts.hostname, port):
            raise RayLaunchError(f"no Ray cluster found at {address} (nothing accepts connections there); {HINT}")
        return
    # Ray turns a loopback address into this machine's network address and then waits (for
    # many minutes) on a Ray that listens on loopback only: keep loopback for such a Ray.
    node = _network_address()
    if node and _listens(node, port):
        return
    if not _listens(parts.hostname, port):
        raise RayLaunchError(f"no Ray cluster found at {address} (nothing accepts connections there); {HINT}")
    _before_ray_import("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _before_ray_import(name: str, value: str) -> None:
    if "ray" not in sys.modules:
        os.environ.setdefault(name, value)


def _join(address: str) -> None:
    import ray

    options = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    if address == "local":
        ray.init(**options)
        return
    try:
        ray.init(address=address, **options)
    except ConnectionError as exc:
        chain = _chain_text(exc).lower()
        if "authentication" in chain and "token" in chain:
            raise RayLaunchError(f"cannot join the Ray cluster at {address}: it wants its authentication token "
                                 "(set RAY_AUTH_MODE=token, and RAY_AUTH_TOKEN or ~/.ray/auth_token to the "
                                 "cluster's token)") from None
        why = "none runs on this machine" if address == "auto" else first_line(exc)
        raise RayLaunchError(f"no Ray cluster found at {address} ({why}); {HINT}") from None
    except Exception as exc:  # e.g. a Ray version mismatch
        raise RayLaunchError(f"cannot join the Ray cluster at {address}: {first_line(exc)}") from None


def _quiet_worker_logs() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # each rank's lines as they are, not merged
    if not (sys.stderr.isatty() and sys.stdout.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no ANSI codes in logs and pipes


def _listens(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def _network_address() -> str | None:
    """The address this machine reaches others from, as Ray finds it (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("8.8.8.8", 80))
            return probe.getsockname()[0]
    except OSError:
        return None


def _gpus_per_worker(spec: RayLaunch) -> int:
    if spec.gpus_per_worker is not None:
        return spec.gpus_per_worker
    import ray

    return 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0


def _check_resources(workers: int, cpus: float, gpus: int) -> None:
    """Ray Train waits for resources the cluster lacks (an autoscaler may add nodes): say so."""
    import ray

    have = ray.cluster_resources()
    for name, each in (("CPU", cpus), ("GPU", gpus)):
        if each and workers * each > have.get(name, 0):
            log.warning("%d workers need %g %ss, the cluster has %g now: Ray Train waits for nodes to join",
                        workers, workers * each, name, have.get(name, 0))


def _absolute(options: RunOptions) -> RunOptions:
    """Local paths made absolute here: the workers do not start in this folder."""
    def local(path: str) -> str:
        return path if "://" in path else str(Path(path).absolute())

    ckpt = options.ckpt
    if ckpt is not None and "://" not in ckpt and Path(ckpt).exists():
        ckpt = str(Path(ckpt).absolute())
    return replace(options, data=[local(d) for d in options.data], output=Path(options.output).absolute(), ckpt=ckpt)


def _worker_error(exc: Exception) -> Exception:
    """The lowest failing rank's own exception (bricks' errors are raised as they are, so the
    command line reports them as it does without Ray); anything else as Ray Train gave it."""
    from .cli import NO_SPACE, user_errors

    failures = getattr(exc, "worker_failures", None) or {}
    if failures:
        first = failures[min(failures)]
        if isinstance(first, user_errors()) or (isinstance(first, OSError) and first.errno in NO_SPACE):
            return first
    return exc


def _chain_text(exc: BaseException) -> str:
    parts = []
    while exc is not None and len(parts) < 8:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)

